"""Server-rendered SVG charts: stacked daily bars, plain bars and a sparkline.

No JavaScript and no inline styles (the CSP forbids both): colours come from classes in
app.css. Each chart is accessible: role="img" with a <title> and <desc>, a <title> per bar
for hover, and a data table with the same numbers as a text fallback. Callers pass values
already in display units and a formatter; nothing here knows about money.
"""
from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from itertools import count

from markupsafe import Markup

SERIES_CLASSES = 6  # .s0 … .s5 in app.css
_ids = count(1)


@dataclass(frozen=True)
class Chart:
    """An SVG and its data table; renders as a <figure> when placed in a template."""

    title: str
    svg: Markup
    table: Markup
    legend: Markup = field(default_factory=Markup)

    def __html__(self) -> str:
        return str(Markup('<figure class="chart">{svg}<figcaption>{title}</figcaption>{legend}'
                          '<details class="chart-data"><summary>Data table</summary>{table}</details>'
                          '</figure>').format(svg=self.svg, title=self.title, legend=self.legend,
                                              table=self.table))


def _n(x: float) -> str:
    return f"{x:.1f}".rstrip("0").rstrip(".")


def _table(caption: str, headers: Sequence[str], rows: Sequence[Sequence[str]]) -> Markup:
    head = Markup("").join(Markup('<th scope="col">{}</th>').format(h) for h in headers)
    body = Markup("").join(
        Markup("<tr>{}{}</tr>").format(
            Markup('<th scope="row">{}</th>').format(r[0]),
            Markup("").join(Markup('<td class="num">{}</td>').format(c) for c in r[1:]))
        for r in rows)
    return Markup('<table class="data-table"><caption>{}</caption><thead><tr>{}</tr></thead>'
                  "<tbody>{}</tbody></table>").format(caption, head, body)


def _frame(uid: str, title: str, desc: str, width: int, height: int, inner: Markup) -> Markup:
    return Markup('<svg xmlns="http://www.w3.org/2000/svg" class="chart-svg" role="img" '
                  'viewBox="0 0 {w} {h}" aria-labelledby="{u}-t {u}-d">'
                  '<title id="{u}-t">{title}</title><desc id="{u}-d">{desc}</desc>{inner}</svg>'
                  ).format(w=width, h=height, u=uid, title=title, desc=desc, inner=inner)


def _axes(left: int, top: int, plot_w: int, plot_h: int, top_label: str) -> Markup:
    bottom = top + plot_h
    return Markup(
        '<line class="axis" x1="{l}" y1="{b}" x2="{r}" y2="{b}"/>'
        '<line class="grid" x1="{l}" y1="{t}" x2="{r}" y2="{t}"/>'
        '<text class="tick" x="{lx}" y="{ty}" text-anchor="end">{top_label}</text>'
        '<text class="tick" x="{lx}" y="{b}" text-anchor="end">0</text>'
    ).format(l=left, r=left + plot_w, t=top, b=bottom, lx=left - 4, ty=top + 4, top_label=top_label)


def stacked_bars(title: str, labels: Sequence[str], series: Sequence[tuple[str, Sequence[int]]],
                 fmt: Callable[[int], str], *, unit: str = "", tick_every: int = 5) -> Chart:
    """One stacked bar per label (a <g class="bar">), one segment per non-zero series value."""
    uid = f"chart{next(_ids)}"
    width, height, left, top, bottom_pad = 720, 240, 64, 12, 28
    plot_w, plot_h = width - left - 8, height - top - bottom_pad
    totals = [sum(vals[i] for _name, vals in series) for i in range(len(labels))]
    peak = max(totals, default=0) or 1
    slot = plot_w / max(len(labels), 1)
    bar_w = max(slot * 0.72, 1.0)
    parts = [_axes(left, top, plot_w, plot_h, fmt(max(totals, default=0)))]
    for i, label in enumerate(labels):
        x = left + i * slot + (slot - bar_w) / 2
        y = float(top + plot_h)
        segs = []
        for s_idx, (name, vals) in enumerate(series):
            v = vals[i]
            if v <= 0:
                continue
            h = plot_h * v / peak
            y -= h
            segs.append(Markup('<rect class="seg s{c}" x="{x}" y="{y}" width="{w}" height="{h}">'
                               "<title>{label} · {name}: {val}{unit}</title></rect>").format(
                c=s_idx % SERIES_CLASSES, x=_n(x), y=_n(y), w=_n(bar_w), h=_n(h), label=label,
                name=name, val=fmt(v), unit=unit))
        parts.append(Markup('<g class="bar"><title>{label}: {val}{unit}</title>{segs}</g>').format(
            label=label, val=fmt(totals[i]), unit=unit, segs=Markup("").join(segs)))
        if i % tick_every == 0 or i == len(labels) - 1:
            parts.append(Markup('<text class="tick" x="{x}" y="{y}" text-anchor="middle">{label}</text>')
                         .format(x=_n(x + bar_w / 2), y=height - 8, label=label))
    desc = f"{len(labels)} bars from {labels[0]} to {labels[-1]}." if labels else "No data."
    svg = _frame(uid, title, desc, width, height, Markup("").join(parts))
    names = [name for name, _vals in series]
    rows = [[label, *[fmt(vals[i]) for _n_, vals in series], fmt(totals[i])]
            for i, label in enumerate(labels)]
    legend = Markup('<ul class="legend">{}</ul>').format(Markup("").join(
        Markup('<li><span class="swatch s{c}" aria-hidden="true"></span>{name}</li>').format(
            c=i % SERIES_CLASSES, name=name) for i, name in enumerate(names)))
    return Chart(title, svg, _table(title, ["Day", *names, "Total"], rows), legend)


def bars(title: str, labels: Sequence[str], values: Sequence[int], fmt: Callable[[int], str] = str,
         *, unit: str = "", tick_every: int = 3) -> Chart:
    """One <rect class="bar"> per label (zero values give a zero-height bar)."""
    uid = f"chart{next(_ids)}"
    width, height, left, top, bottom_pad = 720, 200, 48, 12, 28
    plot_w, plot_h = width - left - 8, height - top - bottom_pad
    peak = max(values, default=0) or 1
    slot = plot_w / max(len(labels), 1)
    bar_w = max(slot * 0.72, 1.0)
    parts = [_axes(left, top, plot_w, plot_h, fmt(max(values, default=0)))]
    for i, (label, v) in enumerate(zip(labels, values)):
        x = left + i * slot + (slot - bar_w) / 2
        h = plot_h * max(v, 0) / peak
        parts.append(Markup('<rect class="bar s0" x="{x}" y="{y}" width="{w}" height="{h}">'
                            "<title>{label}: {val}{unit}</title></rect>").format(
            x=_n(x), y=_n(top + plot_h - h), w=_n(bar_w), h=_n(h), label=label, val=fmt(v), unit=unit))
        if i % tick_every == 0:
            parts.append(Markup('<text class="tick" x="{x}" y="{y}" text-anchor="middle">{label}</text>')
                         .format(x=_n(x + bar_w / 2), y=height - 8, label=label))
    desc = f"{len(labels)} bars from {labels[0]} to {labels[-1]}." if labels else "No data."
    svg = _frame(uid, title, desc, width, height, Markup("").join(parts))
    rows = [[label, fmt(v)] for label, v in zip(labels, values)]
    return Chart(title, svg, _table(title, ["", title], rows))


def sparkline(title: str, labels: Sequence[str], values: Sequence[int],
              fmt: Callable[[int], str] = str) -> Chart:
    """A small line of values over labels, with a dot on the last point."""
    uid = f"chart{next(_ids)}"
    width, height, pad = 160, 40, 3
    peak = max(values, default=0) or 1
    step = (width - 2 * pad) / max(len(values) - 1, 1)
    pts = [(pad + i * step, height - pad - (height - 2 * pad) * max(v, 0) / peak)
           for i, v in enumerate(values)]
    line = " ".join(f"{_n(x)},{_n(y)}" for x, y in pts)
    inner = Markup('<polyline class="spark" points="{}"/>').format(line)
    if pts:
        inner += Markup('<circle class="spark-dot" cx="{}" cy="{}" r="2.5"/>').format(
            _n(pts[-1][0]), _n(pts[-1][1]))
    desc = ", ".join(f"{label}: {fmt(v)}" for label, v in zip(labels, values)) or "No data."
    svg = _frame(uid, title, desc, width, height, inner)
    return Chart(title, svg, _table(title, ["", title], [[lb, fmt(v)] for lb, v in zip(labels, values)]))
