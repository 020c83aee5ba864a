"""The relay benchmark in one command: upstream alone, bare forwarder, relay on SQLite and PostgreSQL.

    .venv/bin/python -m bench.relay_bench                    # everything, a few minutes
    .venv/bin/python -m bench.relay_bench --quick            # 2 s points, a smoke run
    .venv/bin/python -m bench.relay_bench --targets upstream,forwarder --write-readme

It starts the fake upstream and every server (each with the relay's gunicorn settings,
console/gunicorn_conf.py), then runs the points, the targets taking turns point by point so
compared numbers are measured seconds apart: the bare forwarder (bench/forwarder.py) on gevent
workers, the same forwarder on gthread workers (2 × 8, slow-stream points only, to check
the serving model), and the real relay on a fresh SQLite file and a fresh PostgreSQL
database, seeded through the project's CLI and services with a user with a large balance,
a key, a group with high limits and a channel pointing at the fake upstream. Every point
runs bench/load.py in its own process while this process samples the server's RSS (master
and workers, from /proc). All processes share the machine's cores, so only ratios from
the same run are compared. Results: a markdown table on stdout, JSON and logs in --workdir,
and with --write-readme the relay section of bench/README.md.
"""
from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import platform
import re
import resource
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import dataclass
from pathlib import Path

import httpx

ROOT = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent
PG_URL = "postgresql://postgres@127.0.0.1:5432/test_bench"
README = ROOT / "bench" / "README.md"
MARK_START, MARK_END = "<!-- relay-results:start -->", "<!-- relay-results:end -->"
SECRET_KEY = "relay-bench-secret-key-not-for-production-0123456789"

# Public model name on the relay → the fake upstream scenario it maps to (the channel's
# model mapping carries the scenario suffix, so the relay sends the same upstream call).
# The fake upstream runs with --chunks 20 --delay-ms 0, so each suffix needs one knob only:
# a comma would split the channel's model list.
UPSTREAM_DEFAULTS = ("--chunks", "20", "--delay-ms", "0")
SCENARIOS = {
    "bench-fast": "fake-model@chunks=5",          # 5 deltas, no delay
    "bench-slow": "fake-model@delay_ms=30",       # 20 deltas 30 ms apart: 0.6 s
    "bench-long": "fake-model@delay_ms=200",      # 20 deltas 200 ms apart: 4 s
}


@dataclass(frozen=True)
class Point:
    name: str
    model: str  # a SCENARIOS key
    stream: bool
    concurrency: int
    duration: float
    warmup: float
    ramp: float = 1.0  # the clients' first calls are spread over this many seconds
    body_kb: int = 0  # 0: the small chat body; else a coding agent's request of about this size


POINTS = [
    *(Point(f"fast c={c}{' stream' if s else ''}", "bench-fast", s, c, 5, 1)
      for s in (False, True) for c in (1, 16, 64)),
    Point("slow stream c=64", "bench-slow", True, 64, 6, 1.5),
    Point("slow stream c=256", "bench-slow", True, 256, 6, 1.5),
    # Spread over one stream's length (4 s): calls then arrive at a steady 250/s, as from
    # independent users, instead of 1,000 admissions in the same second every 4 s.
    Point("long stream c=1000", "bench-long", True, 1000, 12, 6, ramp=4),
    # A coding agent's turn: ~180 kB of system prompt, tool schemas and conversation
    # (bench/body_bench.py), a reply of 5 deltas; what the relay spends on a large body.
    Point("agent 180 kB c=16", "bench-fast", False, 16, 5, 1, body_kb=180),
]
TARGETS = ("upstream", "forwarder", "forwarder-gthread", "relay-sqlite", "relay-postgres")


# ---- processes -----------------------------------------------------------------------------

def _raise_fd_limit() -> None:
    # Children inherit it: 1,000 streams need ~3,000 descriptors across the processes.
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft < hard:
        resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _descendants(root: int) -> list[int]:
    children: dict[int, list[int]] = {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat") as f:
                ppid = int(f.read().rsplit(")", 1)[1].split()[1])
        except (OSError, IndexError, ValueError):
            continue
        children.setdefault(ppid, []).append(int(entry))
    out, todo = [], [root]
    while todo:
        pid = todo.pop()
        out.append(pid)
        todo.extend(children.get(pid, ()))
    return out


def cpu_ms(pids: list[int]) -> float:
    """User + system CPU of these processes so far, from /proc (a process gone meanwhile
    counts nothing)."""
    ticks = 0
    for pid in pids:
        try:
            with open(f"/proc/{pid}/stat") as f:
                fields = f.read().rsplit(")", 1)[1].split()
            ticks += int(fields[11]) + int(fields[12])
        except (OSError, IndexError, ValueError):
            pass
    return ticks * 1000 / os.sysconf("SC_CLK_TCK")


def _postgres_pids() -> list[int]:
    """Every PostgreSQL server process on this machine (backends, WAL writer, checkpointer):
    the relay on PostgreSQL spends CPU there too. The benchmark's is the only load on it."""
    pids = []
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                with open(f"/proc/{entry}/comm") as f:
                    if f.read().strip() == "postgres":
                        pids.append(int(entry))
            except OSError:
                pass
    return pids


def _rss_kb(pid: int) -> int:
    try:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                if line.startswith("VmRSS:"):
                    return int(line.split()[1])
    except OSError:
        pass
    return 0


class RssSampler(threading.Thread):
    """Peak of the summed RSS of a process tree, sampled every 200 ms."""

    def __init__(self, root: int):
        super().__init__(daemon=True)
        self.root, self.peak_kb, self._done = root, 0, threading.Event()

    def run(self):
        while not self._done.is_set():
            self.peak_kb = max(self.peak_kb, sum(_rss_kb(p) for p in _descendants(self.root)))
            self._done.wait(0.2)

    def stop(self) -> float:
        self._done.set()
        self.join()
        return round(self.peak_kb / 1024, 1)


class Server:
    """A child process (and its children) that we start and stop ourselves."""

    def __init__(self, name: str, argv: list[str], env: dict, log: Path):
        self.name, self.log = name, log
        self.out = open(log, "w")  # noqa: SIM115  (closed in stop(), after the process)
        self.proc = subprocess.Popen(argv, cwd=ROOT, env=env, stdout=self.out,
                                     stderr=subprocess.STDOUT, start_new_session=True)

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout=15)
            except subprocess.TimeoutExpired:
                # Only our own session: gunicorn master and workers, started above.
                os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait()
        self.out.close()


def start_upstream(workdir: Path) -> tuple[Server, str]:
    log = workdir / "upstream.log"
    argv = [sys.executable, "-m", "bench.fake_upstream", "--port", "0", *UPSTREAM_DEFAULTS]
    server = Server("upstream", argv, dict(os.environ), log)
    deadline = time.monotonic() + 20
    while time.monotonic() < deadline:
        m = re.search(r"LISTENING (\d+)", log.read_text())
        if m:
            return server, f"http://127.0.0.1:{m.group(1)}"
        if server.proc.poll() is not None:
            break
        time.sleep(0.05)
    raise RuntimeError(f"fake upstream did not start; see {log}")


def start_gunicorn(name: str, app: str, env: dict, workdir: Path, extra: list[str] = ()) -> tuple[Server, str]:
    port = _free_port()
    full = {**os.environ, "BIND": f"127.0.0.1:{port}", **env}
    server = Server(name, [str(BIN / "gunicorn"), "-c", "python:console.gunicorn_conf", *extra, app],
                    full, workdir / f"{name}.log")
    base = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        if server.proc.poll() is not None:
            raise RuntimeError(f"{name} exited with {server.proc.returncode}; see {server.log}")
        try:
            if httpx.get(base + "/healthz", timeout=1).status_code == 200:
                return server, base
        except httpx.HTTPError:
            pass
        time.sleep(0.1)
    server.stop()
    raise RuntimeError(f"{name} did not become healthy in 30 s; see {server.log}")


# ---- relay database and seed ---------------------------------------------------------------

def _flask(env: dict, *args: str) -> str:
    res = subprocess.run([str(BIN / "flask"), "--app", "app", *args], cwd=ROOT, env=env,
                         capture_output=True, text=True, timeout=180, check=False)
    if res.returncode != 0:
        raise RuntimeError(f"flask {args[0]} failed: {res.stderr.strip()[-2000:]}")
    return res.stdout


def _reset_postgres(url: str) -> None:
    from sqlalchemy import create_engine, text

    engine = create_engine("postgresql+psycopg://" + url.split("://", 1)[1], isolation_level="AUTOCOMMIT")
    with engine.connect() as conn:
        conn.execute(text("DROP SCHEMA IF EXISTS public CASCADE"))
        conn.execute(text("CREATE SCHEMA public"))
    engine.dispose()


def _seed_main() -> None:
    """Runs in its own process with DATABASE_URL set: models, group, balance (no CLI exists for
    these). Prints JSON."""

    from sqlalchemy import select

    from app import app
    from console import groups, ledger
    from console.extensions import db
    from console.models import User

    with app.app_context():
        admin = db.session.scalar(select(User).where(User.email == "bench-admin@example.com"))
        user = db.session.scalar(select(User).where(User.email == "bench@example.com"))
        model_ids = []
        for i, name in enumerate(SCENARIOS):
            m = groups.save_model(None, {
                "name": name, "provider": "openai", "kind": "chat", "input_price": "1",
                "output_price": "2", "max_output_tokens": "4096", "context_window": "128000",
                "sort_order": str(i), "enabled": "1"}, actor_id=admin.id)
            model_ids.append(str(m.id))
        group = groups.save_group(None, {
            "slug": "bench", "name": "Bench", "badge": "none", "multiplier": "1",
            "concurrency_limit": "100000", "rpm_limit": "10000000", "visible": "1"},
            actor_id=admin.id, model_ids=model_ids)
        groups.set_default_group(user.id, group.id)
        # One million credits: the holds of thousands of concurrent calls never run short.
        ledger.adjust(user.id, 10**12, actor_id=admin.id, reason="benchmark balance")
        print(json.dumps({"user_id": user.id, "group": group.slug}))


def _channel_models() -> str:
    return ",".join(f"{public}={upstream}" for public, upstream in SCENARIOS.items())


def prepare_relay_db(db_url: str, upstream: str, workdir: Path) -> tuple[dict, str]:
    """A fresh, migrated, seeded database; returns the server env and the API key."""
    if db_url.startswith("postgresql"):
        _reset_postgres(db_url)
    env = {**os.environ, "DATABASE_URL": db_url, "SECRET_KEY": SECRET_KEY,
           "ALLOW_PRIVATE_UPSTREAMS": "1", "INSTANCE_PATH": str(workdir / "instance")}
    _flask(env, "db", "upgrade")
    _flask(env, "create-user", "bench-admin@example.com", "--password", "bench-admin-password-1", "--role", "admin")
    _flask(env, "create-user", "bench@example.com", "--password", "bench-user-password-12")
    res = subprocess.run([sys.executable, "-m", "bench.relay_bench", "_seed"],
                         cwd=ROOT, env=env, capture_output=True, text=True, timeout=120, check=False)
    if res.returncode != 0:
        raise RuntimeError(f"seed failed: {res.stderr.strip()[-2000:]}")
    _flask(env, "channel-add", "--name", "bench-fake", "--type", "openai", "--base-url", upstream + "/v1",
           "--api-key", "sk-bench-upstream", "--models", _channel_models(), "--groups", "bench")
    # The secret is printed alone on the last line (the first shows only its prefix).
    lines = _flask(env, "create-key", "bench@example.com", "--group", "bench", "--name", "bench").strip().splitlines()
    key = lines[-1].strip() if lines else ""
    if not re.fullmatch(r"sk-\S+", key):
        raise RuntimeError("create-key printed no key")
    return env, key


# ---- points --------------------------------------------------------------------------------

def _agent_body(model: str, stream: bool, kb: int) -> str:
    from bench.body_bench import agent_body

    return json.dumps({**agent_body(kb), "model": model, "stream": stream})


def _body(model: str, stream: bool) -> str:
    return json.dumps({"model": model, "messages": [{"role": "user", "content": "Say hello to the benchmark."}],
                       "max_tokens": 64, "stream": stream})


def run_point(point: Point, base: str, model: str, auth: str, server_pid: int, scale: float,
              with_postgres: bool = False) -> dict:
    duration, warmup = max(1.0, point.duration * scale), max(0.5, point.warmup * min(1.0, scale * 2))
    body = _body(model, point.stream)
    if point.body_kb:  # too long for a command-line argument: the load generator reads a file
        with tempfile.NamedTemporaryFile("w", suffix=".json", delete=False) as f:
            f.write(_agent_body(model, point.stream, point.body_kb))
        body = "@" + f.name
    argv = [sys.executable, "-m", "bench.load", "--url", base + "/v1/chat/completions",
            "--body", body, "--header", f"authorization: Bearer {auth}",
            "-c", str(point.concurrency), "-d", str(duration), "--warmup", str(warmup), "--timeout", "60",
            "--ramp", str(min(warmup, point.ramp))]
    sampler = RssSampler(server_pid)
    sampler.start()
    def server_cpu() -> float:
        return cpu_ms(_descendants(server_pid) + (_postgres_pids() if with_postgres else []))

    cpu_before = server_cpu()
    try:
        res = subprocess.run(argv, cwd=ROOT, capture_output=True, text=True,
                             timeout=duration + warmup + 120, check=False)
    finally:
        peak = sampler.stop()
        if body.startswith("@"):
            os.unlink(body[1:])
    # Every call the server completed during the run, warm-up included, against its CPU over
    # the same run: what a call costs the server, which moves far less than rps when other
    # processes compete for the cores.
    cpu = server_cpu() - cpu_before
    if res.returncode != 0:
        raise RuntimeError(f"load generator failed: {res.stderr.strip()[-2000:]}")
    out = json.loads(res.stdout)
    out["peak_rss_mb"] = peak
    done = out.get("completed_total") or 0
    out["cpu_ms_per_call"] = round(cpu / done, 3) if done else None
    return out


def relay_ready(base: str, key: str, upstream: str) -> tuple[bool, str]:
    """One call per scenario answers 200 and reaches the fake upstream with the mapped model."""
    for public in ("bench-fast", "bench-slow"):
        try:
            r = httpx.post(base + "/v1/chat/completions",
                           headers={"authorization": f"Bearer {key}", "content-type": "application/json"},
                           content=_body(public, False), timeout=10)
            sent = httpx.get(upstream + "/_fake/last_request", timeout=5).json() or {}
        except httpx.HTTPError as exc:
            return False, f"{type(exc).__name__}"
        if r.status_code != 200:
            return False, f"{r.status_code} {r.text[:300].strip()}"
        model = (sent.get("body") or {}).get("model")
        if model != SCENARIOS[public]:
            return False, f"{public} reached the upstream as {model!r}, not {SCENARIOS[public]!r}"
    return True, "ok"


@dataclass
class Target:
    name: str
    base: str
    pid: int
    auth: str
    relay: bool
    server: Server | None = None

    def model(self, public: str) -> str:
        # The relay maps public names to upstream scenarios itself; the others get the scenario.
        return public if self.relay else SCENARIOS[public]


def start_target(name: str, upstream: tuple[Server, str], args, workdir: Path) -> Target:
    workers = str(args.workers)
    if name == "upstream":
        return Target(name, upstream[1], upstream[0].proc.pid, "bench", False)
    if name.startswith("forwarder"):
        env = {"UPSTREAM_URL": upstream[1], "WEB_CONCURRENCY": workers}
        extra = []
        if name == "forwarder-gthread":
            env["WORKER_CLASS"] = "gthread"
            extra = ["--threads", "8"]
        server, base = start_gunicorn(name, "bench.forwarder:app", env, workdir, extra)
        return Target(name, base, server.proc.pid, "bench", False, server)
    db_url = args.pg_url if name == "relay-postgres" else f"sqlite:///{workdir / 'relay.db'}"
    env, key = prepare_relay_db(db_url, upstream[1], workdir)
    env["WEB_CONCURRENCY"] = workers
    server, base = start_gunicorn(name, "app:app", env, workdir)
    target = Target(name, base, server.proc.pid, key, True, server)
    ok, why = relay_ready(base, key, upstream[1])
    if not ok:
        server.stop()
        raise RuntimeError(f"readiness check (POST /v1/chat/completions): {why}")
    return target


def _applies(target: str, point: Point) -> bool:
    # gthread is measured only where the serving model shows: slow streams.
    return target != "forwarder-gthread" or point.model == "bench-slow"


def _loadavg() -> float:
    with open("/proc/loadavg") as f:
        return float(f.read().split()[0])


def run_all(targets: list[str], upstream, args, workdir: Path, results: list, notes: list) -> None:
    """Start every server, then run each point against each target in turn.

    Interleaving by point keeps the ratios honest when the machine's background load changes
    during the run: the numbers compared with each other are measured minutes apart at most.
    """
    live: list[Target] = []
    try:
        for name in targets:
            try:
                live.append(start_target(name, upstream, args, workdir))
            except Exception as exc:  # noqa: BLE001  (one broken target must not lose the others' numbers)
                notes.append(f"{name}: not measured: {exc}")
                print(f"[{name}] not measured: {exc}", file=sys.stderr)
        for rnd, point in ((r, pt) for r in range(args.rounds) for pt in POINTS):
            if point.name not in args.points:
                continue
            for t in live:
                if not _applies(t.name, point):
                    continue
                load = _loadavg()
                try:
                    row = run_point(point, t.base, t.model(point.model), t.auth, t.pid, args.scale,
                                    with_postgres=t.name == "relay-postgres")
                except Exception as exc:  # noqa: BLE001  (reported in the results, the run goes on)
                    notes.append(f"{t.name} {point.name}: failed: {exc}")
                    continue
                row.update(target=t.name, point=point.name, loadavg=load, round=rnd)
                results.append(row)
                print(f"[{t.name}] {point.name} (round {rnd + 1}): {row['rps']} rps, p50 {row['p50_ms']} ms, "
                      f"p99 {row['p99_ms']} ms, ttfb p50 {row['ttfb_p50_ms']} ms, errors {row['errors']}, "
                      f"cpu {row['cpu_ms_per_call']} ms/call, rss {row['peak_rss_mb']} MB, load {load}",
                      file=sys.stderr, flush=True)
    finally:
        for t in live:
            if t.server is not None:
                t.server.stop()


# ---- report --------------------------------------------------------------------------------

def machine() -> dict:
    cpu = "unknown"
    with open("/proc/cpuinfo") as f:
        for line in f:
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    with open("/proc/meminfo") as f:
        mem_kb = int(f.readline().split()[1])
    return {"nproc": os.cpu_count(), "cpu": cpu, "memory_gib": round(mem_kb / 1024**2, 1),
            "kernel": platform.release(), "python": platform.python_version(),
            "date": dt.datetime.now(dt.UTC).strftime("%Y-%m-%d %H:%M UTC")}


def _fmt(v, digits=1):
    if v is None:
        return "–"
    return f"{v:.{digits}f}" if isinstance(v, float) else str(v)


def _ratio(a, b):
    return None if a is None or not b else a / b


def evaluate(results: list[dict]) -> list[tuple[str, str, str, str]]:
    """(target, measured, goal, verdict) rows for the issue's targets."""
    by = {(r["target"], r["point"]): r for r in results}
    rows = []

    def check(label, value, goal_text, ok, fmt):
        if value is None:
            verdict = "–"
        elif ok is None:
            verdict = "info"
        else:
            verdict = "pass" if ok(value) else "**miss**"
        rows.append((label, "–" if value is None else fmt(value), goal_text, verdict))

    pct = lambda v: f"{v * 100:.0f} %"
    ms = lambda v: f"{v:.2f} ms"
    fast = [p.name for p in POINTS if p.model == "bench-fast" and not p.body_kb]
    for name in fast:
        relay, fwd = by.get(("relay-sqlite", name)), by.get(("forwarder", name))
        check(f"{name}: relay-sqlite / forwarder rps", _ratio(relay and relay["rps"], fwd and fwd["rps"]),
              "≥ 70 %", lambda v: v >= 0.70, pct)
    for name in ("fast c=1", "fast c=1 stream"):
        relay, up = by.get(("relay-sqlite", name)), by.get(("upstream", name))
        if relay and up and relay["p50_ms"] is not None and up["p50_ms"] is not None:
            check(f"{name}: relay-sqlite added p50", relay["p50_ms"] - up["p50_ms"], "≤ 1.5 ms",
                  lambda v: v <= 1.5, ms)
            check(f"{name}: relay-sqlite added TTFB p50", relay["ttfb_p50_ms"] - up["ttfb_p50_ms"], "≤ 2 ms",
                  lambda v: v <= 2.0, ms)
        else:
            check(f"{name}: relay-sqlite added p50", None, "≤ 1.5 ms", None, ms)
    for target in ("forwarder", "relay-sqlite", "relay-postgres"):
        r, up = by.get((target, "slow stream c=256")), by.get(("upstream", "slow stream c=256"))
        relay = target.startswith("relay")
        check(f"slow stream c=256: {target} / upstream rps", _ratio(r and r["rps"], up and up["rps"]),
              "≥ 90 %" if relay else "(ceiling)", (lambda v: v >= 0.90) if relay else None, pct)
    for target in ("relay-sqlite", "relay-postgres"):
        r, up = by.get((target, "long stream c=1000")), by.get(("upstream", "long stream c=1000"))
        check(f"long stream c=1000: {target} errors", r and r["errors"], "0", lambda v: v == 0, str)
        added = None if not (r and up and r["ttfb_p99_ms"] is not None) else r["ttfb_p99_ms"] - up["ttfb_p99_ms"]
        check(f"long stream c=1000: {target} added TTFB p99", added, "≤ 100 ms", lambda v: v <= 100, ms)
    worst = None
    for p in POINTS:
        pg, sq = by.get(("relay-postgres", p.name)), by.get(("relay-sqlite", p.name))
        r = _ratio(pg and pg["rps"], sq and sq["rps"])
        if r is not None and (worst is None or r < worst[0]):
            worst = (r, p.name)
    check(f"relay-postgres / relay-sqlite rps, worst point ({worst[1] if worst else '–'})",
          worst and worst[0], "≥ 80 %", lambda v: v >= 0.80, pct)
    for p in POINTS:
        if p.body_kb:  # no target in the issue: how far a large body moves the relay from the forwarder
            relay, fwd = by.get(("relay-sqlite", p.name)), by.get(("forwarder", p.name))
            check(f"{p.name}: relay-sqlite / forwarder rps", _ratio(relay and relay["rps"], fwd and fwd["rps"]),
                  "(large body)", None, pct)
    for name in ("slow stream c=64", "slow stream c=256"):
        g, t = by.get(("forwarder", name)), by.get(("forwarder-gthread", name))
        check(f"{name}: forwarder gthread 2×8 / gevent rps", _ratio(t and t["rps"], g and g["rps"]),
              "(serving model)", None, pct)
    return rows


_MEDIAN_KEYS = ("rps", "p50_ms", "p99_ms", "ttfb_p50_ms", "ttfb_p99_ms", "cpu_ms_per_call", "peak_rss_mb",
                "loadavg")


def combine(rounds: list[dict]) -> list[dict]:
    """One row per (target, point): the median of each measure over the rounds, the rps of
    every round (`rps_rounds`), errors summed over all rounds."""
    grouped: dict[tuple, list[dict]] = {}
    for r in rounds:
        grouped.setdefault((r["target"], r["point"]), []).append(r)
    out = []
    for (target, point), rows in grouped.items():
        row = {"target": target, "point": point, "rounds": len(rows), "rps_rounds": [r["rps"] for r in rows],
               "errors": sum(r["errors"] for r in rows), "error_kinds": {}}
        for r in rows:
            for k, v in r.get("error_kinds", {}).items():
                row["error_kinds"][k] = row["error_kinds"].get(k, 0) + v
        for k in _MEDIAN_KEYS:
            vals = [r[k] for r in rows if r.get(k) is not None]
            row[k] = statistics.median(vals) if vals else None
        out.append(row)
    return out


def markdown(results: list[dict], info: dict, notes: list[str], args) -> str:
    up = {r["point"]: r for r in results if r["target"] == "upstream"}
    lines = [
        (f"Run {info['date']} on {info['nproc']} × {info['cpu']}, {info['memory_gib']} GiB RAM, "
        f"Linux {info['kernel']}, Python {info['python']}; servers with {args.workers} workers; "
        f"duration scale {args.scale}; {args.rounds} round(s): every point ran once per round, the targets "
        "taking turns, and each measure below is the median over the rounds (rps of each round in "
        "brackets; errors summed). Load generator, fake upstream and server share the cores; 'load' is "
        "the 1-minute load average when the point started; 'added' is against the upstream alone at the "
        "same point."),
        "",
        ("| point | target | rps (rounds) | p50 ms | p99 ms | TTFB p50 ms | TTFB p99 ms | added p50 ms | "
         "added TTFB p50 / p99 ms | errors | server CPU ms/call | peak RSS MB | load |"),
        "|---|---|--:|--:|--:|--:|--:|--:|--:|--:|--:|--:|--:|",
    ]
    order = {t: i for i, t in enumerate(TARGETS)}
    points = {p.name: i for i, p in enumerate(POINTS)}
    for r in sorted(results, key=lambda r: (points[r["point"]], order[r["target"]])):
        base = up.get(r["point"])
        added = added_t = "–"
        if base and r["target"] != "upstream" and r["p50_ms"] is not None and base["p50_ms"] is not None:
            added = _fmt(r["p50_ms"] - base["p50_ms"], 2)
            added_t = f"{_fmt(r['ttfb_p50_ms'] - base['ttfb_p50_ms'], 2)} / {_fmt(r['ttfb_p99_ms'] - base['ttfb_p99_ms'], 1)}"
        errors = str(r["errors"]) + (f" ({', '.join(f'{k}: {v}' for k, v in r['error_kinds'].items())})"
                                     if r["errors"] else "")
        each = r.get("rps_rounds") or []
        rps = _fmt(r["rps"]) + (f" ({' / '.join(_fmt(v, 0) for v in each)})" if len(each) > 1 else "")
        lines.append(f"| {r['point']} | {r['target']} | {rps} | {_fmt(r['p50_ms'], 2)} | "
                     f"{_fmt(r['p99_ms'], 2)} | {_fmt(r['ttfb_p50_ms'], 2)} | {_fmt(r['ttfb_p99_ms'], 2)} | "
                     f"{added} | {added_t} | {errors} | {_fmt(r.get('cpu_ms_per_call'), 2)} | "
                     f"{_fmt(r['peak_rss_mb'])} | {_fmt(r.get('loadavg'))} |")
    lines += ["", "| target (ratios from this run) | measured | goal | verdict |", "|---|--:|--:|---|"]
    lines += [f"| {a} | {b} | {c} | {d} |" for a, b, c, d in evaluate(results)]
    if notes:
        lines += [""] + [f"- {n}" for n in notes]
    return "\n".join(lines) + "\n"


def write_readme(table: str) -> None:
    text = README.read_text() if README.exists() else "# Benchmarks\n"
    block = f"{MARK_START}\n{table}{MARK_END}"
    if MARK_START in text and MARK_END in text:
        head, rest = text.split(MARK_START, 1)
        text = head + block + rest.split(MARK_END, 1)[1]
    else:
        text = text.rstrip("\n") + "\n\n" + block + "\n"
    README.write_text(text)


def main(argv=None) -> None:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["_seed"]:
        return _seed_main()
    p = argparse.ArgumentParser(description="Relay benchmark: upstream, forwarder, relay on SQLite and PostgreSQL.")
    p.add_argument("--targets", default=",".join(TARGETS), help=f"comma list of {', '.join(TARGETS)}")
    p.add_argument("--points", default=",".join(pt.name for pt in POINTS), help="comma list of point names")
    p.add_argument("--pg-url", default=os.environ.get("BENCH_DATABASE_URL", PG_URL))
    p.add_argument("--workers", type=int, default=min(4, os.cpu_count() or 1),
                   help="gunicorn workers (the config's default)")
    p.add_argument("--scale", type=float, default=1.0, help="multiply every point's duration")
    p.add_argument("--quick", action="store_true", help="short points (scale 0.4)")
    p.add_argument("--rounds", type=int, default=1,
                   help="run every point this many times, targets taking turns; report medians")
    p.add_argument("--workdir", type=Path, default=None, help="logs, JSON results and the SQLite file")
    p.add_argument("--write-readme", action="store_true", help="put the results in bench/README.md")
    args = p.parse_args(argv)
    if args.quick:
        args.scale = 0.4
    args.points = set(args.points.split(","))
    unknown = args.points - {pt.name for pt in POINTS}
    targets = [t.strip() for t in args.targets.split(",") if t.strip()]
    if unknown or set(targets) - set(TARGETS):
        p.error(f"unknown points or targets: {sorted(unknown | (set(targets) - set(TARGETS)))}")
    workdir = args.workdir or Path(tempfile.mkdtemp(prefix="relay-bench-"))
    if workdir.exists() and args.workdir:
        shutil.rmtree(workdir / "instance", ignore_errors=True)
        (workdir / "relay.db").unlink(missing_ok=True)
    workdir.mkdir(parents=True, exist_ok=True)
    _raise_fd_limit()
    info = machine()
    results: list[dict] = []
    notes: list[str] = []
    upstream = start_upstream(workdir)
    try:
        run_all(targets, upstream, args, workdir, results, notes)
    finally:
        upstream[0].stop()
    table = markdown(combine(results), info, notes, args)
    (workdir / "results.json").write_text(json.dumps({"machine": info, "rounds": results, "notes": notes}, indent=1))
    (workdir / "results.md").write_text(table)
    print(table)
    print(f"logs and results: {workdir}", file=sys.stderr)
    if args.write_readme:
        write_readme(table)


if __name__ == "__main__":
    main()
