"""Database sessions done right on SQLite and PostgreSQL.

Owns: the SQLite connection pragmas, the pysqlite transaction recipe (we emit BEGIN
ourselves, BEGIN IMMEDIATE for writes), and `write_tx()`, the only way code opens a
transaction that writes.
"""
from __future__ import annotations

import random
import sqlite3
import time
from contextlib import contextmanager
from typing import Iterator

from flask import current_app
from sqlalchemy import event
from sqlalchemy.engine import Engine
from sqlalchemy.orm import Session

from console.extensions import db

_IMMEDIATE = "sqlite_immediate"
_DEFERRED_SYNC = "deferred_sync"


@event.listens_for(Engine, "connect")
def _sqlite_on_connect(dbapi_conn, _record) -> None:
    if not isinstance(dbapi_conn, sqlite3.Connection):
        return
    # Autocommit at the driver level: pysqlite's own implicit BEGIN runs SELECTs outside
    # the transaction; the "begin" listener below starts transactions instead.
    dbapi_conn.isolation_level = None
    try:
        timeout = int(current_app.config.get("SQLITE_BUSY_TIMEOUT_MS", 5000))
    except RuntimeError:  # outside an app (alembic offline, scripts)
        timeout = 5000
    _record.info["busy_timeout_ms"] = timeout
    cur = dbapi_conn.cursor()
    cur.execute("PRAGMA journal_mode=WAL")
    cur.execute(f"PRAGMA busy_timeout={timeout:d}")
    cur.execute("PRAGMA foreign_keys=ON")
    # NORMAL may lose a committed transaction on power loss; this is a money database.
    cur.execute("PRAGMA synchronous=FULL")
    cur.close()


@event.listens_for(Engine, "begin")
def _sqlite_on_begin(conn) -> None:
    if conn.dialect.name != "sqlite":
        return
    # A deferred transaction that later writes fails at once with SQLITE_BUSY when another
    # writer got in first (busy_timeout is not consulted); IMMEDIATE waits for the lock.
    opts = conn.get_execution_options()
    if opts.get(_IMMEDIATE):
        # Set per transaction (outside it, as SQLite requires); see write_tx(durable=).
        conn.exec_driver_sql("PRAGMA synchronous=" + ("NORMAL" if opts.get(_DEFERRED_SYNC) else "FULL"))
        _begin_immediate(conn.connection)
    else:
        conn.exec_driver_sql("BEGIN")


def _begin_immediate(fairy) -> None:
    """BEGIN IMMEDIATE, waiting for the write lock with time.sleep between tries.

    SQLite's own busy handler sleeps inside C, which would freeze every greenlet of a gevent
    worker for the whole wait; time.sleep is cooperative there (and an ordinary sleep
    elsewhere). The connection's busy_timeout still guards every other statement.
    """
    timeout_ms = fairy.info.get("busy_timeout_ms", 5000)
    deadline = time.monotonic() + timeout_ms / 1000
    cur = fairy.dbapi_connection.cursor()
    cur.execute("PRAGMA busy_timeout=0")
    try:
        delay = 0.0005
        while True:
            try:
                cur.execute("BEGIN IMMEDIATE")
                return
            except sqlite3.OperationalError as exc:
                if "locked" not in str(exc) or time.monotonic() + delay > deadline:
                    raise
            time.sleep(delay * random.uniform(0.5, 1.5))
            delay = min(delay * 2, 0.02)
    finally:
        cur.execute(f"PRAGMA busy_timeout={int(timeout_ms):d}")
        cur.close()


def sqlite_engine_options(uri: str) -> dict:
    if uri.startswith("sqlite"):
        # The pool hands a connection to one thread at a time.
        return {"connect_args": {"check_same_thread": False}}
    return {}


@contextmanager
def write_tx(session: Session | None = None, *, durable: bool = True) -> Iterator[Session]:
    """One short write transaction, committed on exit and rolled back on error.

    Nested uses join the outer transaction. A read transaction still open on the session
    is ended first, so the write starts fresh with BEGIN IMMEDIATE on SQLite.

    durable=False lets the commit return before it reaches the disk (SQLite synchronous=NORMAL
    for this transaction, PostgreSQL synchronous_commit off). A crash of the machine (not of
    the process) may then lose the transaction whole, never part of it; a later durable commit
    makes it durable too. Only for the relay's admission: losing it loses a hold together with
    its pending record, never money on the ledger.
    """
    s = session or db.session()  # the request's real Session, not the scoped proxy
    depth = s.info.get("write_tx_depth", 0)
    if depth:
        s.info["write_tx_depth"] = depth + 1
        try:
            yield s
        finally:
            s.info["write_tx_depth"] = depth
        return
    if s.in_transaction():
        s.commit()
    conn = s.connection(execution_options={_IMMEDIATE: True, _DEFERRED_SYNC: not durable})
    if not durable and conn.dialect.name == "postgresql":
        conn.exec_driver_sql("SET LOCAL synchronous_commit TO OFF")
    s.info["write_tx_depth"] = 1
    try:
        yield s
        s.commit()
    except BaseException:
        s.rollback()
        raise
    finally:
        s.info["write_tx_depth"] = 0
