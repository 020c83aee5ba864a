"""Transactions: writes start with BEGIN IMMEDIATE on SQLite and are durable unless asked otherwise."""
from __future__ import annotations

from sqlalchemy import text

from console.database import write_tx
from console.extensions import db
from tests.conftest import make_app


def _sync_setting() -> str:
    if db.engine.dialect.name == "sqlite":
        return {0: "OFF", 1: "NORMAL", 2: "FULL", 3: "EXTRA"}[db.session.execute(text("PRAGMA synchronous")).scalar()]
    return db.session.execute(text("SHOW synchronous_commit")).scalar()


def test_money_writes_are_durable_and_admission_may_defer(ctx):
    """write_tx() commits to disk (FULL / synchronous_commit on); durable=False only for its own transaction."""
    durable = "FULL" if db.engine.dialect.name == "sqlite" else "on"
    deferred = "NORMAL" if db.engine.dialect.name == "sqlite" else "off"
    with write_tx():
        assert _sync_setting() == durable
    with write_tx(durable=False):
        assert _sync_setting() == deferred
    # The next ordinary write is durable again on the same pooled connection.
    with write_tx():
        assert _sync_setting() == durable


def test_write_tx_holds_the_sqlite_write_lock_from_the_start(tmp_path):
    """On SQLite a write transaction owns the write lock at BEGIN (IMMEDIATE), before any statement."""
    import sqlite3

    path = tmp_path / "lock.db"
    app = make_app(f"sqlite:///{path}")
    with app.app_context():
        db.create_all()
        with write_tx():
            other = sqlite3.connect(path, timeout=0, isolation_level=None)
            try:
                other.execute("BEGIN IMMEDIATE")
            except sqlite3.OperationalError as exc:
                assert "locked" in str(exc)
            else:
                raise AssertionError("a second writer got the lock while write_tx held it")
            finally:
                other.close()
        db.engine.dispose()
