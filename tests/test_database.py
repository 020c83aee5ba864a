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


# ---- Prepared statements on raw_tx() (the relay's hot path) ---------------------------------

def _prepared_fixtures():
    from sqlalchemy import bindparam, insert, select, update

    from console.database import Prepared
    from console.models import FaqEntry

    t = FaqEntry.__table__
    return (t, Prepared(insert(t).returning(t.c.id, t.c.updated_at)),
            Prepared(select(t.c.question, t.c.updated_at, t.c.published).where(t.c.id == bindparam("p_id"))),
            Prepared(update(t).where(t.c.id == bindparam("p_id"), t.c.published.is_(True))
                     .values(question=bindparam("p_q")).returning(t.c.id)))


def _faq_row(created):
    return {"question": "Q?", "answer_md": "A.", "slug": "q", "sort_order": 0, "published": True,
            "updated_at": created}


def test_prepared_statements_round_trip_values_like_the_orm(ctx):
    """Datetimes, booleans and literals pass through the column types' processors on both databases,
    and what the raw path writes reads back identically through the ORM."""
    from datetime import UTC, datetime

    from console.database import raw_tx
    from console.models import FaqEntry

    _, ins, sel, upd = _prepared_fixtures()
    created = datetime(2026, 11, 28, 12, 30, 15, 123456, tzinfo=UTC)
    with raw_tx(write=True) as tx:
        new_id, returned_at = tx.first(ins, _faq_row(created))
    assert returned_at == created
    with raw_tx(write=False) as tx:
        assert tx.first(sel, {"p_id": new_id}) == ("Q?", created, True)
        assert tx.first(sel, {"p_id": new_id + 1}) is None
    with raw_tx(write=True) as tx:
        assert tx.scalar(upd, {"p_id": new_id, "p_q": "Why?"}) == new_id
    orm = db.session.get(FaqEntry, new_id)
    assert (orm.question, orm.updated_at, orm.published) == ("Why?", created, True)


def test_raw_tx_rolls_back_on_error_and_refuses_missing_parameters(ctx):
    from datetime import UTC, datetime

    import pytest
    from sqlalchemy import func, select

    from console.database import raw_tx
    from console.models import FaqEntry

    _, ins, sel, upd = _prepared_fixtures()
    with pytest.raises(RuntimeError):
        with raw_tx(write=True) as tx:
            tx.first(ins, _faq_row(datetime.now(UTC)))
            raise RuntimeError("after the insert")
    assert db.session.scalar(select(func.count()).select_from(FaqEntry)) == 0
    with pytest.raises(KeyError):
        with raw_tx(write=False) as tx:
            tx.first(sel, {})
    with pytest.raises(ValueError):  # a column with a callable default must be passed explicitly
        with raw_tx(write=True) as tx:
            tx.first(ins, {k: v for k, v in _faq_row(datetime.now(UTC)).items() if k != "updated_at"})
    # The pooled connection is clean afterwards: the ORM writes through it normally.
    with write_tx():
        db.session.add(FaqEntry(**_faq_row(datetime.now(UTC))))
    assert db.session.scalar(select(func.count()).select_from(FaqEntry)) == 1


def test_a_dead_idle_connection_is_replaced_at_checkout(ctx):
    """Without pool_pre_ping, a pooled connection idle past PING_IDLE_S is pinged at checkout and a
    dead one replaced, so the next relay statement works after the server dropped it."""
    import console.database as database
    from console.database import raw_tx

    if db.engine.dialect.name != "postgresql":
        return  # a SQLite file connection cannot be dropped by a server
    victim, killer = db.engine.raw_connection(), db.engine.raw_connection()
    for c in (victim, killer):
        c.dbapi_connection.autocommit = True
    pid = victim.dbapi_connection.execute("SELECT pg_backend_pid()").fetchone()[0]
    for c in (victim, killer):
        c.dbapi_connection.autocommit = False
    victim.close()  # back to the pool, alive
    killer.dbapi_connection.execute("SELECT pg_terminate_backend(%s)", (pid,))
    killer.dbapi_connection.commit()
    killer.close()
    saved, database.PING_IDLE_S = database.PING_IDLE_S, -1.0
    try:
        for _ in range(3):  # whichever pooled connection comes out, it works
            with raw_tx(write=False) as tx:
                assert tx.cursor.execute("SELECT 1").fetchone() == (1,)
    finally:
        database.PING_IDLE_S = saved


def test_a_connection_that_breaks_in_use_is_not_handed_out_again(ctx):
    """A raw_tx whose connection the server dropped fails once; the pool discards that connection
    when it comes back (its reset fails), so the next raw_tx works without any ping."""
    import pytest

    import console.database as database
    from console.database import raw_tx

    if db.engine.dialect.name != "postgresql":
        return  # a SQLite file connection cannot be dropped by a server
    saved, database.PING_IDLE_S = database.PING_IDLE_S, 1e9  # never ping: only invalidation helps
    try:
        with pytest.raises(Exception):
            with raw_tx(write=False) as tx:
                tx.cursor.execute("SELECT pg_terminate_backend(pg_backend_pid())")
        for _ in range(db.engine.pool.size() + 1):
            with raw_tx(write=False) as tx:
                assert tx.cursor.execute("SELECT 1").fetchone() == (1,)
    finally:
        database.PING_IDLE_S = saved


def test_the_pool_keeps_its_connections_through_bursts(ctx):
    """Bursts of simultaneous checkouts up to the pool size reuse the same connections: a busy
    worker does not open (PostgreSQL: fork a server process for) a connection per burst."""
    from flask import current_app
    from sqlalchemy import event

    size = current_app.config["DB_POOL_SIZE"]
    assert size >= 12
    db.engine.dispose()
    opened = []
    listener = lambda *_: opened.append(1)  # noqa: E731
    event.listen(db.engine, "connect", listener)
    try:
        for _ in range(4):
            held = [db.engine.raw_connection() for _ in range(12)]
            for conn in held:
                conn.close()
    finally:
        event.remove(db.engine, "connect", listener)
    assert len(opened) == 12
