"""The billing of a relay call alone — admission, then settle — in process, per call.

The end-to-end benchmark (relay_bench) shares two cores between its load generator, the fake
upstream and the server, and its rates move by 20 % from one minute to the next; a change of
a few percent in the billing hides in that. This runs admission + settle (relay.metering, the
code a relay call runs) back to back on one connection, with no server and no upstream, and
reports the CPU each call costs: this process's (Python, SQLite's C code, psycopg) and, on
PostgreSQL, the server backends' (read from /proc, so the server must run on this machine).
Rounds take turns between the variants, so compared numbers are measured seconds apart.

    .venv/bin/python -m bench.billing_bench                       # SQLite and PostgreSQL
    .venv/bin/python -m bench.billing_bench --calls 2000 --rounds 5 --statements
    .venv/bin/python -m bench.billing_bench --compare-plans       # + PostgreSQL without finding 22

PostgreSQL: `BENCH_DATABASE_URL` or `--pg-url` (its public schema is dropped and migrated
afresh); `--sqlite-only` leaves it out. Each database is seeded as relay_bench seeds it.
"""
from __future__ import annotations

import argparse
import collections
import os
import statistics
import sys
import tempfile
import time
from contextlib import contextmanager
from pathlib import Path

from bench.relay_bench import PG_URL, SECRET_KEY, cpu_ms, machine, prepare_relay_db

_COUNTS_FN = "relay_admission_counts(bigint, bigint, bigint, boolean)"


@contextmanager
def _env(**values):
    old = {k: os.environ.get(k) for k in values}
    os.environ.update(values)
    try:
        yield
    finally:
        for k, v in old.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


class Variant:
    """One database with its app, caller and model, ready to admit and settle."""

    def __init__(self, name: str, db_url: str, key: str, workdir: Path, plans: str | None = None):
        from console import create_app

        self.name, self.plans = name, plans
        with _env(DATABASE_URL=db_url, SECRET_KEY=SECRET_KEY, DB_POOL_SIZE="2",
                  INSTANCE_PATH=str(workdir / "instance")):
            self.app = create_app()
        self.key = key
        self.backends: list[int] = []

    def setup(self) -> None:
        from sqlalchemy import text

        from console.extensions import db
        from console.relay import metering
        from console.relay.auth import authenticate, resolve_model

        ctx = self.app.test_request_context()
        ctx.push()
        self.caller = authenticate(self.key, "127.0.0.1")
        self.model = resolve_model(self.caller, "bench-fast")
        self.est = metering.estimate({"model": "bench-fast", "max_tokens": 64,
                                      "messages": [{"role": "user", "content": "Say hello to the benchmark."}]})
        self.pg = db.engine.dialect.name == "postgresql"
        if self.pg and self.plans:
            db.session.execute(text(f"ALTER FUNCTION {_COUNTS_FN} {self.plans}"))
            db.session.commit()
        db.session.close()
        ctx.pop()

    def calls(self, n: int) -> dict:
        from sqlalchemy import text

        from console.extensions import db
        from console.pricing import Tokens
        from console.relay import metering
        from console.relay.metering import Outcome

        with self.app.test_request_context():
            def one():
                adm = metering.admit(self.caller, self.model, request_id=metering.new_request_id(),
                                     endpoint="chat", stream=False, est=self.est, client_ip="127.0.0.1")
                metering.settle(adm, Outcome("ok", "upstream", Tokens(input=12, output=5)))

            for _ in range(20):  # the pool's connections exist and have prepared their statements
                one()
            if self.pg:
                self.backends = list(db.session.scalars(text(
                    "SELECT pid FROM pg_stat_activity WHERE datname = current_database()")))
                db.session.close()
            s0, c0, w0 = cpu_ms(self.backends), time.process_time(), time.perf_counter()
            for _ in range(n):
                one()
            w1, c1, s1 = time.perf_counter(), time.process_time(), cpu_ms(self.backends)
        return {"client_ms": (c1 - c0) * 1000 / n, "wall_ms": (w1 - w0) * 1000 / n,
                "server_ms": (s1 - s0) / n if self.pg else None}

    def check(self) -> str:
        from sqlalchemy import func, select

        from console import ledger
        from console.extensions import db
        from console.models import UsageRecord

        with self.app.app_context():
            pending = db.session.scalar(
                select(func.count()).select_from(UsageRecord).where(UsageRecord.status == "pending"))
            bad = ledger.verify()
            db.session.remove()
            db.engine.dispose()
        return "ok" if not pending and not bad else f"{pending} pending, {len(bad)} ledger mismatches"


def _statement_costs(variant: Variant, n: int) -> list[tuple[float, float, str]]:
    """CPU per call of each hot-path statement on SQLite (RawTx.execute: the statement and its
    fetch; not the transaction's BEGIN and COMMIT). PostgreSQL runs a call's admission and its
    settle as one statement each, whose cost is the server's."""
    from console import database

    spent: collections.Counter = collections.Counter()
    count: collections.Counter = collections.Counter()
    original = database.RawTx.execute

    def timed(self, prepared, params):
        t0 = time.thread_time()
        try:
            return original(self, prepared, params)
        finally:
            head = " ".join(prepared._compiled(self.dialect, params)[0].split()[:3])[:48]
            spent[head] += time.thread_time() - t0
            count[head] += 1

    database.RawTx.execute = timed
    try:
        variant.calls(n)
    finally:
        database.RawTx.execute = original
    return [(spent[k] * 1e6 / n, count[k] / n, k) for k in sorted(spent, key=spent.get, reverse=True)]


def _fmt(values: list[float | None]) -> str:
    if not values or values[0] is None:
        return "–"
    return f"{statistics.median(values):.3f} ({' / '.join(f'{v:.2f}' for v in values)})"


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description="Admission + settle alone, in process: CPU per call.")
    p.add_argument("--calls", type=int, default=1000, help="calls per round and variant")
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--pg-url", default=os.environ.get("BENCH_DATABASE_URL", PG_URL))
    p.add_argument("--sqlite-only", action="store_true")
    p.add_argument("--compare-plans", action="store_true",
                   help="also PostgreSQL with relay_admission_counts() left to the default plan cache mode")
    p.add_argument("--statements", action="store_true", help="then SQLite's CPU per call of each statement")
    p.add_argument("--workdir", type=Path, default=None, help="the SQLite file and the instance folder")
    args = p.parse_args(argv)

    workdir = args.workdir or Path(tempfile.mkdtemp(prefix="billing-bench-"))
    variants: list[Variant] = []
    _, key = prepare_relay_db(f"sqlite:///{workdir / 'billing.db'}", "http://127.0.0.1:9", workdir)
    variants.append(Variant("sqlite", f"sqlite:///{workdir / 'billing.db'}", key, workdir))
    if not args.sqlite_only:
        _, pg_key = prepare_relay_db(args.pg_url, "http://127.0.0.1:9", workdir)
        if args.compare_plans:
            variants.append(Variant("postgres, default plans", args.pg_url, pg_key, workdir,
                                    plans="RESET plan_cache_mode"))
        variants.append(Variant("postgres", args.pg_url, pg_key, workdir,
                                plans="SET plan_cache_mode = force_generic_plan" if args.compare_plans else None))
    for v in variants:
        v.setup()

    results: dict[str, list[dict]] = {v.name: [] for v in variants}
    for rnd in range(args.rounds):
        for v in variants:
            if v.plans:  # the variants share one PostgreSQL database: set its function each turn
                v.setup()
            row = v.calls(args.calls)
            results[v.name].append(row)
            server = f", server {row['server_ms']:.3f}" if row["server_ms"] is not None else ""
            print(f"[{v.name}] round {rnd + 1}: client {row['client_ms']:.3f}{server}, wall {row['wall_ms']:.3f} "
                  "ms/call", file=sys.stderr, flush=True)

    info = machine()
    print(f"Run {info['date']} on {info['nproc']} × {info['cpu']}, Python {info['python']}; "
          f"{args.calls} calls per round, {args.rounds} rounds taking turns; medians "
          "(each round in brackets).\n")
    print("| database | this process, CPU ms/call | server backends, CPU ms/call | wall ms/call | afterwards |")
    print("|---|--:|--:|--:|---|")
    for v in variants:
        rows = results[v.name]
        print(f"| {v.name} | {_fmt([r['client_ms'] for r in rows])} | {_fmt([r['server_ms'] for r in rows])} "
              f"| {_fmt([r['wall_ms'] for r in rows])} | {v.check()} |")
    if args.statements:
        for v in variants[:1]:
            print(f"\n{v.name}: CPU per call of each statement (this process)\n")
            print("| µs/call | runs/call | statement |\n|--:|--:|---|")
            for us, per_call, head in _statement_costs(v, args.calls):
                print(f"| {us:.1f} | {per_call:.0f} | `{head}…` |")


if __name__ == "__main__":
    main()
