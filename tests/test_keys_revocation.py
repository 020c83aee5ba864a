"""Revocation across processes: a disabled, deleted, expired or rolled key is refused by every
worker within the same second (keys.authenticate and the relay's keys.relay_lookup read the
database on every call)."""
from __future__ import annotations

import multiprocessing
import os
import time

import pytest
from sqlalchemy import select

from console import keys
from console.database import write_tx
from console.extensions import db
from console.models import ApiKey, User, utcnow
from tests.support.web import make_user


def _worker(db_url: str, conn) -> None:
    """A stand-in for a gunicorn worker: its own app, engine and connections; one lookup per request."""
    os.environ.setdefault("SECRET_KEY", "test-secret-key-not-for-production")
    from tests.conftest import make_app

    app = make_app(db_url)
    with app.app_context():
        conn.send("ready")
        while (secret := conn.recv()) is not None:
            # The console's lookup and the relay's per-call lookup must agree on every key.
            ok = keys.authenticate(secret) is not None
            relay_ok = keys.relay_lookup(secret) is not None
            db.session.remove()  # what the end of a request does
            conn.send(ok if ok == relay_ok else "lookups disagree")


def _ask(workers, secret: str) -> list[bool]:
    for conn in workers:
        conn.send(secret)
    return [conn.recv() for conn in workers]


@pytest.mark.slow
def test_revocation_reaches_every_worker_within_a_second(app, db_url):
    """Two separate processes accept a key, then refuse it right after each kind of revocation."""
    ctx = multiprocessing.get_context("spawn")
    pipes, procs = [], []
    for _ in range(2):
        parent, child = ctx.Pipe()
        proc = ctx.Process(target=_worker, args=(db_url, child), daemon=True)
        proc.start()
        pipes.append(parent)
        procs.append(proc)
    try:
        for conn in pipes:
            assert conn.poll(60) and conn.recv() == "ready"
        with app.app_context():
            make_user()
            uid = db.session.scalar(select(User.id))

            def disable(key_id):
                keys.set_enabled(uid, key_id, False)

            def delete(key_id):
                keys.delete(uid, key_id)

            def expire(key_id):
                with write_tx():
                    db.session.get(ApiKey, key_id).expires_at = utcnow()

            def roll(key_id):
                keys.roll(uid, key_id)

            def disable_account(key_id):
                with write_tx():
                    db.session.get(User, uid).status = "disabled"

            for revoke in (disable, delete, expire, roll, disable_account):
                key, secret = keys.create_key(uid, revoke.__name__)
                assert _ask(pipes, secret) == [True, True], revoke.__name__
                # Warm the workers' identity maps and pools with the key, as a busy relay would.
                assert _ask(pipes, secret) == [True, True]
                revoke(key.id)
                started = time.monotonic()
                assert _ask(pipes, secret) == [False, False], revoke.__name__
                assert time.monotonic() - started < 1.0
    finally:
        for conn in pipes:
            conn.send(None)
        for proc in procs:
            proc.join(10)
            if proc.is_alive():
                proc.terminate()
