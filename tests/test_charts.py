"""Server-rendered SVG charts: valid SVG, the right number of bars, accessible text fallbacks."""
from __future__ import annotations

import xml.etree.ElementTree as ET

from markupsafe import Markup

from console import charts

SVG = "{http://www.w3.org/2000/svg}"


def _parse(chart: charts.Chart) -> ET.Element:
    root = ET.fromstring(str(chart.svg))
    assert root.tag == f"{SVG}svg"
    assert root.get("role") == "img"
    ids = root.get("aria-labelledby").split()
    titles = {el.get("id"): el.text for el in root if el.tag in (f"{SVG}title", f"{SVG}desc")}
    assert set(ids) == set(titles) and all(titles.values())
    return root


def _classes(el: ET.Element) -> set[str]:
    return set((el.get("class") or "").split())


def test_stacked_bars_one_group_per_day_and_segments_per_series():
    """30 days give 30 bar groups; only non-zero values get a segment; the table has every number."""
    days = [f"05-{d:02d}" for d in range(1, 31)]
    a = [i * 1000 for i in range(30)]
    b = [500 if i % 2 else 0 for i in range(30)]
    chart = charts.stacked_bars("Daily spend", days, [("gpt-4o", a), ("claude", b)], str)
    root = _parse(chart)
    groups = [g for g in root.iter(f"{SVG}g") if "bar" in _classes(g)]
    assert len(groups) == 30
    segs = [r for r in root.iter(f"{SVG}rect") if "seg" in _classes(r)]
    assert len(segs) == sum(1 for v in a if v) + sum(1 for v in b if v)
    table = ET.fromstring(str(chart.table))
    rows = table.findall("./tbody/tr")
    assert len(rows) == 30
    assert [c.text for c in rows[3]] == ["05-04", "3000", "500", "3500"]
    assert "gpt-4o" in chart.legend and "claude" in chart.legend


def test_bar_heights_are_proportional_and_zero_is_flat():
    """Heights scale with values, the tallest bar fills the plot and a zero is a zero-height bar."""
    chart = charts.bars("Calls per hour", [f"{h:02d}" for h in range(24)], [0] * 23 + [40])
    root = _parse(chart)
    rects = [r for r in root.iter(f"{SVG}rect") if "bar" in _classes(r)]
    assert len(rects) == 24
    heights = [float(r.get("height")) for r in rects]
    assert heights[:23] == [0.0] * 23 and heights[23] > 100
    assert rects[23].find(f"{SVG}title").text == "23: 40"


def test_sparkline_has_one_point_per_value():
    """A 7-value sparkline is one polyline of 7 points with a text description."""
    chart = charts.sparkline("Spend", [f"d{i}" for i in range(7)], [1, 5, 0, 3, 3, 9, 2])
    root = _parse(chart)
    line = root.find(f"{SVG}polyline")
    assert len(line.get("points").split()) == 7
    assert "d5: 9" in root.find(f"{SVG}desc").text


def test_labels_are_escaped_and_no_inline_style():
    """Hostile labels are escaped; the markup carries no style attribute or script (CSP)."""
    chart = charts.stacked_bars("<b>t</b>", ["<script>"], [("x\" onload=\"y", [5])], str)
    html = str(Markup(chart.__html__()))
    _parse(chart)
    assert "<script>" not in html and "style=" not in html and 'onload="' not in html
    assert "&lt;script&gt;" in html


def test_empty_data_renders():
    """No data still gives a valid chart (a flat line of zero bars)."""
    root = _parse(charts.stacked_bars("Empty", [], [], str))
    assert not [g for g in root.iter(f"{SVG}g") if "bar" in _classes(g)]
    _parse(charts.sparkline("Empty", [], []))
