"""Races with real processes: charges against one balance, and redemptions through a real gunicorn.

Processes come from a forkserver (fork from a clean, single-threaded parent), released
together by a Barrier, so the database sees true concurrency from separate connections.
"""
from __future__ import annotations

import json
import multiprocessing as mp
import subprocess
import sys
import time

import httpx
import pytest
from sqlalchemy import func, select

from console import accounts, ledger, vouchers
from console.extensions import db
from console.models import LedgerEntry, Voucher
from tests.conftest import make_app
from tests.support.server import gunicorn, migrate
from tests.support.web import PASSWORD, csrf_from

CREDIT = 1_000_000


def _ctx():
    ctx = mp.get_context("forkserver")
    # Import everything once in the server (about a second of imports), so the children
    # start fast.
    ctx.set_forkserver_preload(["tests.test_ledger_races"])
    return ctx


def _run(ctx, target, args_per_proc: list[tuple], barrier) -> tuple[list, float]:
    queue = ctx.Queue()
    procs = [ctx.Process(target=target, args=(barrier, queue, *a)) for a in args_per_proc]
    for p in procs:
        p.start()
    started = time.monotonic()
    results = [queue.get(timeout=120) for _ in procs]
    elapsed = time.monotonic() - started
    for p in procs:
        p.join(timeout=30)
        assert p.exitcode == 0
    return results, elapsed


# ---- service level: 1,000 charges against 500 credits ----------------------------------

def _charge_worker(barrier, queue, db_url: str, user_id: int, n: int) -> None:
    app = make_app(db_url)
    ok = refused = errors = 0
    with app.app_context():
        db.session.execute(select(1))  # connect before the start line
        db.session.remove()
        barrier.wait(timeout=120)
        t0 = time.monotonic()
        for _ in range(n):
            try:
                ledger.charge(user_id, CREDIT, ref_type="race", ref_id="x")
                ok += 1
            except ledger.InsufficientFunds:
                refused += 1
            except Exception as exc:  # noqa: BLE001  (counted; the test fails on any)
                errors += 1
                print("charge error:", type(exc).__name__, exc)
            db.session.remove()
        spent = time.monotonic() - t0
        db.engine.dispose()
    queue.put((ok, refused, errors, spent))


@pytest.mark.slow
def test_1000_concurrent_charges_against_500_credits(db_url):
    """1,000 concurrent charges of 1 credit against 500: exactly 500 succeed, final 0, never negative."""
    app = make_app(db_url)
    with app.app_context():
        db.create_all()
        user_id = accounts.create_user("race@example.com", PASSWORD).id
        ledger.credit(user_id, 500 * CREDIT, kind="voucher_credit")
        db.session.remove()
    procs, per = 20, 50
    ctx = _ctx()
    results, _ = _run(ctx, _charge_worker, [(db_url, user_id, per)] * procs, ctx.Barrier(procs))
    elapsed = max(r[3] for r in results)
    ok = sum(r[0] for r in results)
    refused = sum(r[1] for r in results)
    errors = sum(r[2] for r in results)
    print(f"\n[{db_url.split(':')[0]}] {procs * per} charges from {procs} processes in {elapsed:.2f}s: "
          f"{ok} ok, {refused} refused, {errors} errors")
    assert (ok, refused, errors) == (500, 500, 0)
    with app.app_context():
        w = ledger.wallet_of(user_id)
        assert w.balance_micros == 0 and w.held_micros == 0
        after = db.session.scalars(select(LedgerEntry.balance_after_micros)
                                   .where(LedgerEntry.user_id == user_id)).all()
        assert len(after) == 501 and min(after) >= 0  # never negative at any step
        assert ledger.verify() == []
        db.session.remove()
        db.engine.dispose()


# ---- HTTP: 200 processes against a real gunicorn ----------------------------------------

# Forking 200 children of the pytest process (or of a server that imported the console) costs
# ~100 ms of copy-on-write each; a helper interpreter that imports only httpx forks them in ms.
RACE_CLIENT = r"""
import json, sys, time, multiprocessing as mp
import httpx

def worker(barrier, queue, client, token, code):
    # The client was built before the fork (its TLS context is costly) and has no open socket.
    with client:
        barrier.wait(timeout=120)
        t0 = time.monotonic()
        try:
            r = client.post("/wallet/redeem", data={"code": code, "csrf_token": token},
                            headers={"HX-Request": "true"})
            queue.put((r.status_code, time.monotonic() - t0, r.text[:2000]))
        except httpx.HTTPError as exc:
            queue.put((0, time.monotonic() - t0, repr(exc)))

spec = json.load(sys.stdin)
ctx = mp.get_context("fork")  # this interpreter is single-threaded: fork is safe here
barrier, queue = ctx.Barrier(len(spec["codes"])), ctx.Queue()
client = httpx.Client(base_url=spec["base"], cookies=spec["cookies"], timeout=60)
procs = [ctx.Process(target=worker, args=(barrier, queue, client, spec["token"], code))
         for code in spec["codes"]]
for p in procs:
    p.start()
t0 = time.monotonic()
results = [queue.get(timeout=180) for _ in procs]
elapsed = time.monotonic() - t0
for p in procs:
    p.join(timeout=30)
json.dump({"results": results, "elapsed": elapsed,
           "exitcodes": sorted({p.exitcode for p in procs})}, sys.stdout)
"""


def _race_http(base: str, cookies: dict, token: str, codes: list[str]) -> tuple[list, float]:
    spec = json.dumps({"base": base, "cookies": cookies, "token": token, "codes": codes})
    done = subprocess.run([sys.executable, "-c", RACE_CLIENT], input=spec, capture_output=True,
                          text=True, timeout=240, check=False)
    assert done.returncode == 0, done.stderr[-2000:]
    out = json.loads(done.stdout)
    assert out["exitcodes"] == [0], done.stderr[-2000:]
    return out["results"], out["elapsed"]


def _login(base: str) -> tuple[dict, str]:
    """Log in once (argon2 is deliberately slow); the workers share the cookie and token."""
    with httpx.Client(base_url=base, timeout=30) as client:
        token = csrf_from(client.get("/login").text)
        resp = client.post("/login", data={"email": "race@example.com", "password": PASSWORD,
                                           "csrf_token": token})
        assert resp.status_code == 302, resp.text[:300]
        token = csrf_from(client.get("/wallet/").text)
        return dict(client.cookies), token


def _setup(db_url: str, codes: int) -> list[str]:
    # The schema comes from the migration, as in production.
    migrate(db_url)
    app = make_app(db_url)
    with app.app_context():
        accounts.create_user("race@example.com", PASSWORD)
        _, minted = vouchers.mint_batch(codes, 10 * CREDIT)
        db.session.remove()
        db.engine.dispose()
    return minted


def _summary(label: str, results: list, elapsed: float) -> str:
    times = sorted(r[1] for r in results)
    statuses: dict[int, int] = {}
    for r in results:
        statuses[r[0]] = statuses.get(r[0], 0) + 1
    return (f"\n[{label}] {len(results)} redeems in {elapsed:.2f}s wall; latency p50 "
            f"{times[len(times) // 2] * 1000:.0f} ms, p99 {times[int(len(times) * .99) - 1] * 1000:.0f} ms, "
            f"max {times[-1] * 1000:.0f} ms; statuses {dict(sorted(statuses.items()))}")


GUNICORN_ENV = {"REDEEM_LIMITS": "100000 per minute", "LOG_LEVEL": "warning", "ACCESS_LOG": "/dev/null"}


def _check_db(db_url: str, *, entries: int, balance: int, redeemed: int) -> None:
    app = make_app(db_url)
    with app.app_context():
        uid = db.session.scalar(select(func.min(LedgerEntry.user_id))) or 0
        assert db.session.scalar(select(func.count()).select_from(LedgerEntry)) == entries
        assert ledger.wallet_of(uid).balance_micros == balance
        assert db.session.scalar(select(func.count(Voucher.redeemed_at))) == redeemed
        assert ledger.verify() == []
        db.session.remove()
        db.engine.dispose()


@pytest.mark.slow
def test_200_processes_redeem_through_gunicorn(db_url, tmp_path):
    """Via gunicorn, 200 processes redeem one code (exactly one credit, 199 clear 422s), then
    200 distinct codes for one user (exactly 200 credits); no 5xx; ledger sum = balance."""
    codes = _setup(db_url, 201)
    same, distinct = codes[0], codes[1:]
    with gunicorn(db_url, workers=3, env=GUNICORN_ENV, log_path=tmp_path / "gunicorn.log") as base:
        cookies, token = _login(base)
        results, elapsed = _race_http(base, cookies, token, [same] * 200)
        print(_summary(f"{db_url.split(':')[0]} same code", results, elapsed))
        statuses = [r[0] for r in results]
        assert statuses.count(200) == 1 and statuses.count(422) == 199, _summary("", results, elapsed)
        assert all("already been redeemed" in r[2] for r in results if r[0] == 422)
        _check_db(db_url, entries=1, balance=10 * CREDIT, redeemed=1)

        results, elapsed = _race_http(base, cookies, token, distinct)
        print(_summary(f"{db_url.split(':')[0]} distinct codes", results, elapsed))
        assert [r[0] for r in results].count(200) == 200, _summary("", results, elapsed)
        _check_db(db_url, entries=201, balance=201 * 10 * CREDIT, redeemed=201)
