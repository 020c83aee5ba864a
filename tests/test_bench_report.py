"""The benchmark's report: rounds are combined into medians, errors are never dropped."""
from __future__ import annotations

from bench.relay_bench import combine, evaluate


def _row(target, rps, p50, errors=0, kinds=None):
    return {"target": target, "point": "fast c=1", "rps": rps, "p50_ms": p50, "p99_ms": p50 * 2,
            "ttfb_p50_ms": p50, "ttfb_p99_ms": p50 * 2, "peak_rss_mb": 100.0, "loadavg": 1.0,
            "errors": errors, "error_kinds": kinds or {}}


def test_rounds_combine_into_medians_with_every_error_kept():
    rows = combine([_row("relay-sqlite", 100.0, 5.0), _row("relay-sqlite", 300.0, 1.0, 2, {"timeout": 2}),
                    _row("relay-sqlite", 200.0, 9.0, 1, {"status 500": 1}), _row("forwarder", 400.0, 1.0)])
    relay = next(r for r in rows if r["target"] == "relay-sqlite")
    assert (relay["rps"], relay["p50_ms"], relay["rps_rounds"]) == (200.0, 5.0, [100.0, 300.0, 200.0])
    assert relay["errors"] == 3 and relay["error_kinds"] == {"timeout": 2, "status 500": 1}
    verdicts = {label: (measured, verdict) for label, measured, _goal, verdict in evaluate(rows)}
    assert verdicts["fast c=1: relay-sqlite / forwarder rps"] == ("50 %", "**miss**")
