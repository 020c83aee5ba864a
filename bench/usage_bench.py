"""Usage pages at scale: generate usage records in bulk, then time the pages and the CSV export.

    .venv/bin/python -m bench.usage_bench generate --url sqlite:////tmp/usage-bench.db --total 5000000
    .venv/bin/python -m bench.usage_bench measure  --url sqlite:////tmp/usage-bench.db
    .venv/bin/python -m bench.usage_bench csv-memory --url … --rows 100000   (run once per size)

One user (the first) owns total/users records; the others own the rest, interleaved in time
over --days days ending now, as a busy relay would write them. Pages are timed in-process
through the Flask test client (server time, no network). Not part of the test suite.
"""
from __future__ import annotations

import argparse
import os
import random
import resource
import sqlite3
import sys
import time
from datetime import UTC, datetime, timedelta

os.environ.setdefault("SECRET_KEY", "bench-secret-key")

from sqlalchemy import select, text

from console import create_app
from console.config import database_url
from console.extensions import db
from console.models import ApiKey, Group, UsageRecord, User
from console.money import charge_micros

MODELS = [  # name, input, output, cache write, cache read (micro-USD per 1M tokens)
    ("claude-sonnet-4", 3_000_000, 15_000_000, 3_750_000, 300_000),
    ("claude-haiku-4", 1_000_000, 5_000_000, 1_250_000, 100_000),
    ("claude-opus-4", 15_000_000, 75_000_000, 18_750_000, 1_500_000),
    ("gpt-4o", 2_500_000, 10_000_000, 2_500_000, 1_250_000),
    ("gpt-4o-mini", 150_000, 600_000, 150_000, 75_000),
    ("o3", 2_000_000, 8_000_000, 2_000_000, 500_000),
]
GROUPS = [("budget", 300_000), ("standard", 600_000), ("dedicated", 1_000_000), ("premium", 1_500_000)]
KEYS_PER_USER = 5
PASSWORD = "bench password is long enough"
COLUMNS = ("request_id", "user_id", "key_id", "group_id", "model", "endpoint", "stream", "status",
           "usage_source", "input_tokens", "output_tokens", "cache_write_5m_tokens",
           "cache_write_1h_tokens", "cache_read_tokens", "input_price", "output_price",
           "cache_write_5m_price", "cache_write_1h_price", "cache_read_price", "per_call_price",
           "multiplier_ppm", "official_cost_pico", "charge_micros", "hold_micros", "latency_ms",
           "ttfb_ms", "attempts", "delivered_chars", "created_at", "deadline_at", "settled_at")


def app_for(url: str):
    os.environ["DATABASE_URL"] = url
    return create_app({"SQLALCHEMY_DATABASE_URI": database_url(), "RATELIMIT_STORAGE_URI": "memory://",
                       "WTF_CSRF_ENABLED": False})


def machine() -> str:
    with open("/proc/cpuinfo") as fh:
        cpu = next((ln.split(":", 1)[1].strip() for ln in fh if ln.startswith("model name")), "?")
    return f"nproc={os.cpu_count()}, CPU: {cpu}"


# ---- generation ------------------------------------------------------------------------------

def _rows(total: int, users: list[int], keys: dict[int, list[tuple[int, int, int]]], days: int):
    rnd = random.Random(42)
    end = datetime.now(UTC)
    start = end - timedelta(days=days)
    step = (end - start) / total
    for i in range(total):
        t = start + step * i
        uid = users[i % len(users)]
        key_id, group_id, mult = rnd.choice(keys[uid])
        name, p_in, p_out, p_cw, p_cr = MODELS[rnd.randrange(len(MODELS))]
        r = rnd.random()
        status = "failed" if r < 0.02 else "partial" if r < 0.03 else "ok"
        source = "estimated" if status == "partial" or rnd.random() < 0.005 else "upstream"
        tin, tout = rnd.randrange(50, 20_000), rnd.randrange(1, 4_000)
        tcw = rnd.randrange(0, 5_000) if rnd.random() < 0.2 else 0
        tcr = rnd.randrange(0, 30_000) if rnd.random() < 0.4 else 0
        if status == "failed":
            tin = tout = tcw = tcr = 0
        official = tin * p_in + tout * p_out + tcw * p_cw + tcr * p_cr
        lat = rnd.randrange(300, 30_000)
        yield (f"req_{i:014d}", uid, key_id, group_id, name, "/v1/messages", rnd.random() < 0.7, status,
               source, tin, tout, tcw, 0, tcr, p_in, p_out, p_cw, p_cw, p_cr, 0, mult, official,
               charge_micros(official, mult), 0, lat, lat // 8 if status != "failed" else None, 1, 0,
               t, t + timedelta(minutes=10), t + timedelta(milliseconds=lat))


def _sqlite_value(v):
    if isinstance(v, datetime):
        return v.astimezone(UTC).strftime("%Y-%m-%d %H:%M:%S.%f")
    if isinstance(v, bool):
        return int(v)
    return v


def generate(url: str, total: int, users_n: int, days: int) -> None:
    app = app_for(url)
    t0 = time.perf_counter()
    with app.app_context():
        db.drop_all()
        if db.engine.dialect.name == "postgresql":
            with db.engine.begin() as c:
                c.execute(text("DROP SCHEMA public CASCADE; CREATE SCHEMA public"))
        db.create_all()
        from console import accounts

        users = [accounts.create_user(f"user{n}@bench.example", PASSWORD).id for n in range(users_n)]
        groups = []
        for slug, mult in GROUPS:
            g = Group(slug=slug, name=slug.title(), multiplier_ppm=mult)
            db.session.add(g)
            db.session.flush()
            groups.append((g.id, mult))
        keys: dict[int, list[tuple[int, int, int]]] = {}
        for uid in users:
            for k in range(KEYS_PER_USER):
                gid, mult = groups[k % len(groups)]
                key = ApiKey(user_id=uid, name=f"key-{k}", key_hash=f"{uid:032d}{k:032d}",
                             display_prefix=f"sk-bench…{k:04d}", group_id=gid)
                db.session.add(key)
                db.session.flush()
                keys.setdefault(uid, []).append((key.id, gid, mult))
        db.session.commit()
        indexes = list(UsageRecord.__table__.indexes)
        for idx in indexes:  # bulk load first, index after: much faster on both databases
            idx.drop(db.engine)
        dialect = db.engine.dialect.name
        db.session.remove()
        rows = _rows(total, users, keys, days)
        if dialect == "sqlite":
            conn = sqlite3.connect(url.removeprefix("sqlite:///"))
            conn.execute("PRAGMA synchronous=OFF")
            sql = f"INSERT INTO usage_records ({', '.join(COLUMNS)}) VALUES ({', '.join('?' * len(COLUMNS))})"
            batch = []
            for row in rows:
                batch.append(tuple(_sqlite_value(v) for v in row))
                if len(batch) == 50_000:
                    conn.executemany(sql, batch)
                    batch.clear()
            conn.executemany(sql, batch)
            conn.commit()
            conn.close()
        else:
            import psycopg

            dsn = database_url().replace("postgresql+psycopg://", "postgresql://")
            copy_sql = f"COPY usage_records ({', '.join(COLUMNS)}) FROM STDIN"
            with psycopg.connect(dsn) as conn, conn.cursor() as cur, cur.copy(copy_sql) as cp:
                for row in rows:
                    cp.write_row(row)
        t1 = time.perf_counter()
        print(f"loaded {total:,} rows in {t1 - t0:.0f} s", flush=True)
        for idx in indexes:
            idx.create(db.engine)
        with db.engine.begin() as c:
            c.execute(text("ANALYZE"))
        print(f"indexed and analyzed in {time.perf_counter() - t1:.0f} s", flush=True)


# ---- measurement --------------------------------------------------------------------------------

def _pct(samples: list[float], p: float) -> float:
    s = sorted(samples)
    return s[min(len(s) - 1, round(p / 100 * (len(s) - 1)))]


def measure(url: str, reps: int) -> None:
    from console import usage

    app = app_for(url)
    client = app.test_client()
    with app.app_context():
        main = db.session.scalar(select(User.id).where(User.email == "user0@bench.example"))
        n_main = db.session.scalar(select(text("count(*)")).select_from(UsageRecord).where(UsageRecord.user_id == main))
        total = db.session.scalar(select(text("count(*)")).select_from(UsageRecord))
        key_id = db.session.scalar(select(ApiKey.id).where(ApiKey.user_id == main).order_by(ApiKey.id))
        group_id = db.session.scalar(select(Group.id).order_by(Group.id))
        order = (UsageRecord.created_at.desc(), UsageRecord.id.desc())
        deep = list(db.session.scalars(select(UsageRecord.id).where(UsageRecord.user_id == main)
                                       .order_by(*order).offset(min(50 * 999, n_main - reps)).limit(reps)))
        sample = list(db.session.scalars(select(UsageRecord.id).where(UsageRecord.user_id == main)
                                         .order_by(*order).offset(1000).limit(reps * 7)))[::7]
        old = (datetime.now(UTC) - timedelta(days=90)).date()
    print(f"{url.split('@')[-1]}: {total:,} records, {n_main:,} for the measured user; {machine()}")
    resp = client.post("/login", data={"email": "user0@bench.example", "password": PASSWORD})
    assert resp.status_code == 302, resp.status_code
    t = time.perf_counter()
    client.get("/usage/summary")
    print(f"first visit (rolls up closed days once): {1000 * (time.perf_counter() - t):.0f} ms")

    cases = {
        "records: first page": lambda i: "/usage/",
        "records: page 1,000 (keyset)": lambda i: f"/usage/?before={deep[i % len(deep)]}",
        "filter: key": lambda i: f"/usage/?key={key_id}",
        "filter: model": lambda i: "/usage/?model=claude-opus-4",
        "filter: group": lambda i: f"/usage/?group={group_id}",
        "filter: status=failed": lambda i: "/usage/?status=failed",
        "filter: status=estimated": lambda i: "/usage/?status=estimated",
        "filter: today": lambda i: "/usage/?range=today",
        "filter: 7 days": lambda i: "/usage/?range=7d",
        "filter: 30 days": lambda i: "/usage/?range=30d",
        "filter: custom day 90 days ago": lambda i: f"/usage/?range=custom&from={old}&to={old}",
        "filter: model + page 1,000": lambda i: f"/usage/?model=gpt-4o&before={deep[i % len(deep)]}",
        "records fragment (htmx)": lambda i: "/usage/?status=ok",
        "detail (htmx fragment)": lambda i: f"/usage/{sample[i % len(sample)]}",
        "detail (page)": lambda i: f"/usage/{sample[(i + 3) % len(sample)]}",
        "dashboard": lambda i: "/",
        "summary + charts": lambda i: "/usage/summary",
    }
    htmx = {"records fragment (htmx)", "detail (htmx fragment)"}
    print("\n| page | p50 ms | p95 ms | max ms |\n|---|---:|---:|---:|")
    for name, path in cases.items():
        headers = {"HX-Request": "true"} if name in htmx else {}
        client.get(path(0), headers=headers)  # warm the process (templates, statement cache)
        times = []
        for i in range(reps):
            t = time.perf_counter()
            r = client.get(path(i), headers=headers)
            times.append(1000 * (time.perf_counter() - t))
            assert r.status_code == 200, (name, r.status_code)
        print(f"| {name} | {_pct(times, 50):.1f} | {_pct(times, 95):.1f} | {max(times):.1f} |", flush=True)
    with app.app_context():
        cold = []
        for _ in range(5):
            usage.clear_caches()
            t = time.perf_counter()
            usage.group_stats()
            cold.append(1000 * (time.perf_counter() - t))
        warm = []
        for _ in range(reps):
            t = time.perf_counter()
            usage.group_stats()
            warm.append(1000 * (time.perf_counter() - t))
    print(f"| group stats, cached (every request) | {_pct(warm, 50):.3f} | {_pct(warm, 95):.3f} | {max(warm):.3f} |")
    print(f"| group stats, recomputed (once a minute per process) | {_pct(cold, 50):.1f} | {_pct(cold, 95):.1f} | {max(cold):.1f} |")
    times = []
    for _ in range(reps):
        t = time.perf_counter()
        r = client.get("/groups/")
        times.append(1000 * (time.perf_counter() - t))
    print(f"| group cards page /groups/ (status {r.status_code}) | {_pct(times, 50):.1f} | {_pct(times, 95):.1f} | {max(times):.1f} |")


def csv_memory(url: str, rows: int) -> None:
    """Peak RSS of one process that streams an export of about `rows` records of the user."""
    app = app_for(url)
    client = app.test_client()
    with app.app_context():
        main = db.session.scalar(select(User.id).where(User.email == "user0@bench.example"))
        order = (UsageRecord.created_at.desc(), UsageRecord.id.desc())
        cut = db.session.scalar(select(UsageRecord.created_at).where(UsageRecord.user_id == main)
                                .order_by(*order).offset(rows - 1).limit(1))
    client.post("/login", data={"email": "user0@bench.example", "password": PASSWORD})
    client.get("/usage/")
    query = "" if cut is None else f"?range=custom&from={cut.date().isoformat()}"
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    t = time.perf_counter()
    resp = client.get("/usage/export.csv" + query)
    n = size = 0
    for chunk in resp.response:
        size += len(chunk)
        n += chunk.count(b"\n") if isinstance(chunk, bytes) else chunk.count("\n")
    resp.close()
    after = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    print(f"csv {query or '(all time)'}: {n - 2:,} rows, {size / 1e6:.0f} MB in {time.perf_counter() - t:.1f} s; "
          f"peak RSS before {before / 1024:.0f} MiB, after {after / 1024:.0f} MiB (+{(after - before) / 1024:.1f} MiB)")


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("command", choices=["generate", "measure", "csv-memory"])
    ap.add_argument("--url", required=True)
    ap.add_argument("--total", type=int, default=5_000_000)
    ap.add_argument("--users", type=int, default=5)
    ap.add_argument("--days", type=int, default=180)
    ap.add_argument("--reps", type=int, default=40)
    ap.add_argument("--rows", type=int, default=100_000)
    a = ap.parse_args()
    if a.command == "generate":
        generate(a.url, a.total, a.users, a.days)
    elif a.command == "measure":
        measure(a.url, a.reps)
    else:
        csv_memory(a.url, a.rows)
    return 0


if __name__ == "__main__":
    sys.exit(main())
