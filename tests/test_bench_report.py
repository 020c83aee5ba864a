"""The benchmark's report: rounds are combined into medians, errors are never dropped; the
in-process benchmarks run and check what they measured."""
from __future__ import annotations

import pytest

from bench.relay_bench import combine, evaluate
from tests.conftest import PG_URL


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


def test_the_body_benchmark_builds_a_valid_agent_sized_request(capsys):
    """bench/body_bench.py: its synthetic coding-agent body is what the relay accepts (deep
    enough to take the nesting walk, not too deep), and the script runs every step."""
    import json

    from bench.body_bench import agent_body, main
    from console.relay.routes import _MAX_DEPTH, _too_deep

    body = agent_body(40)
    raw = json.dumps(body).encode()
    assert len(raw) >= 40 * 1024 and raw.count(b"[") + raw.count(b"{") > _MAX_DEPTH
    assert json.loads(raw) == body and not _too_deep(raw, body)
    main(["--kb", "20", "--reps", "1"])
    out = capsys.readouterr().out
    assert "nesting check" in out and "total" in out


def test_the_agent_point_is_reported_but_not_held_to_the_fast_call_target():
    """The large-body point has no target in the issue: an info row, not a fast-call verdict."""
    point = "agent 180 kB c=16"
    rows = combine([{**_row("relay-sqlite", 50.0, 5.0), "point": point},
                    {**_row("forwarder", 100.0, 1.0), "point": point}])
    verdicts = {label: (measured, goal, verdict) for label, measured, goal, verdict in evaluate(rows)}
    assert verdicts[f"{point}: relay-sqlite / forwarder rps"] == ("50 %", "(large body)", "info")
    assert not any(label.startswith("agent") and goal == "≥ 70 %" for label, (_m, goal, _v) in verdicts.items())


@pytest.mark.slow
def test_the_billing_benchmark_settles_every_call_with_the_ledger_consistent(capsys, tmp_path):
    """bench/billing_bench.py runs the relay's own admission and settle on a freshly migrated
    and seeded database, PostgreSQL too when configured: every call settled, the ledger equal
    to the balance, a row of numbers per database and SQLite's cost per statement."""
    from bench.billing_bench import main

    argv = ["--calls", "5", "--rounds", "1", "--statements", "--workdir", str(tmp_path)]
    main(argv + (["--pg-url", PG_URL] if PG_URL else ["--sqlite-only"]))
    out = capsys.readouterr().out
    rows = [line for line in out.splitlines() if line.startswith(("| sqlite |", "| postgres |"))]
    assert len(rows) == (2 if PG_URL else 1), out
    assert all(row.endswith("| ok |") for row in rows), out
    assert "`INSERT INTO usage_records…`" in out


def test_server_cpu_is_read_for_the_whole_process_tree(tmp_path):
    """The benchmark's server CPU per call counts the workers, not only the process it started
    (a gunicorn master that idles): a grandchild's CPU shows in its root's tree."""
    import subprocess
    import sys
    import time

    from bench.relay_bench import _descendants, cpu_ms

    ready = tmp_path / "burnt"
    burn = (f"import time, pathlib\nwhile time.process_time() < 0.3: pass\n"
            f"pathlib.Path({str(ready)!r}).touch()\ntime.sleep(30)")
    root = subprocess.Popen([sys.executable, "-c",
                             f"import subprocess, sys; subprocess.run([sys.executable, '-c', {burn!r}])"])
    try:
        deadline = time.monotonic() + 20
        while not ready.exists() and time.monotonic() < deadline:
            time.sleep(0.05)
        tree = _descendants(root.pid)
        assert len(tree) == 2
        assert cpu_ms(tree) >= 250
        assert cpu_ms([root.pid]) < 250
    finally:
        for pid in reversed(_descendants(root.pid)):
            subprocess.run(["kill", str(pid)], check=False)
        root.wait(timeout=10)
