"""Database sessions done right on SQLite and PostgreSQL.

Owns: the SQLite connection pragmas, the pysqlite transaction recipe (we emit BEGIN
ourselves, BEGIN IMMEDIATE for writes), and `write_tx()`, the only way code opens a
transaction that writes.
"""
from __future__ import annotations

import random
import sqlite3
import threading
import time
from contextlib import contextmanager
from typing import Any, Iterator

from flask import current_app
from psycopg.pq import TransactionStatus
from sqlalchemy import event
from sqlalchemy.engine import Engine
from sqlalchemy.exc import DisconnectionError
from sqlalchemy.orm import Session
from sqlalchemy.pool import Pool
from sqlalchemy.sql.dml import Insert

from console.extensions import db

_PG_IDLE = TransactionStatus.IDLE

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


PING_IDLE_S = 5.0


@event.listens_for(Pool, "checkin")
def _note_checkin(_dbapi_conn, record) -> None:
    record.info["checked_in_at"] = time.monotonic()


@event.listens_for(Pool, "checkout")
def _ping_if_idle(dbapi_conn, record, _proxy) -> None:
    """Pessimistic disconnect handling for PostgreSQL, only where it can matter: a connection
    that sat idle in the pool more than PING_IDLE_S (a server restart or an idle timeout may
    have closed it) is pinged, and replaced if dead. Busy connections are handed out as they
    are; one that breaks mid-use fails that use, as it would with a ping."""
    if isinstance(dbapi_conn, sqlite3.Connection):
        return
    last = record.info.get("checked_in_at")
    if last is not None and time.monotonic() - last <= PING_IDLE_S:
        return
    try:
        autocommit = dbapi_conn.autocommit
        dbapi_conn.autocommit = True
        try:
            dbapi_conn.execute("SELECT 1")
        finally:
            dbapi_conn.autocommit = autocommit
    except Exception as exc:
        raise DisconnectionError("idle pooled connection is dead") from exc


@event.listens_for(Engine, "begin")
def _sqlite_on_begin(conn) -> None:
    if conn.dialect.name != "sqlite":
        return
    # A deferred transaction that later writes fails at once with SQLITE_BUSY when another
    # writer got in first (busy_timeout is not consulted); IMMEDIATE waits for the lock.
    opts = conn.get_execution_options()
    if opts.get(_IMMEDIATE):
        _set_sqlite_sync(conn.connection, not opts.get(_DEFERRED_SYNC))
        _begin_immediate(conn.connection)
    else:
        conn.exec_driver_sql("BEGIN")


def _set_sqlite_sync(fairy, durable: bool) -> None:
    """synchronous=FULL or NORMAL for the next transaction (set outside it, as SQLite requires);
    see write_tx(durable=). The connection record remembers the setting, so it is only sent
    when it changes."""
    mode = "FULL" if durable else "NORMAL"
    if fairy.info.get("synchronous") != mode:
        fairy.dbapi_connection.execute("PRAGMA synchronous=" + mode)
        fairy.info["synchronous"] = mode


class DatabaseBusy(sqlite3.OperationalError):
    """The write lock was not free within the wait (SQLite, many writers at once)."""


def _begin_immediate(fairy, wait_s: float | None = None) -> None:
    """BEGIN IMMEDIATE, waiting for the write lock with time.sleep between tries.

    SQLite's own busy handler sleeps inside C, which would freeze every greenlet of a gevent
    worker for the whole wait; time.sleep is cooperative there (and an ordinary sleep
    elsewhere). The connection's busy_timeout still guards every other statement.
    wait_s: wait that long for the lock if it is longer than the connection's busy timeout.
    """
    timeout_ms = fairy.info.get("busy_timeout_ms", 5000)
    deadline = time.monotonic() + max(timeout_ms / 1000, wait_s or 0)
    cur = fairy.dbapi_connection.cursor()
    cur.execute("PRAGMA busy_timeout=0")
    try:
        delay = 0.0005
        while True:
            try:
                cur.execute("BEGIN IMMEDIATE")
                return
            except sqlite3.OperationalError as exc:
                if "locked" not in str(exc):
                    raise
                if time.monotonic() + delay > deadline:
                    raise DatabaseBusy(str(exc)) from None
            time.sleep(delay * random.uniform(0.5, 1.5))
            delay = min(delay * 2, 0.02)
    finally:
        cur.execute(f"PRAGMA busy_timeout={int(timeout_ms):d}")
        cur.close()


def engine_options(uri: str, pool_size: int, max_overflow: int) -> dict:
    """Pool settings. A gevent worker runs many calls at once, each holding a connection for
    a moment; with SQLAlchemy's default (5 kept, 10 more opened and closed on demand) a busy
    worker kept opening connections — a new server process per connection on PostgreSQL, a
    re-read schema and empty statement cache on SQLite. The pool keeps pool_size and opens no
    more by default: a call beyond that waits for a free one (the relay answers 503 after the
    pool timeout)."""
    opts: dict = {}
    if uri.startswith("sqlite"):
        # The pool hands a connection to one thread at a time.
        opts["connect_args"] = {"check_same_thread": False}
        if uri in ("sqlite://", "sqlite:///") or ":memory:" in uri:
            return opts  # one shared in-memory connection; no queue pool
    opts["pool_size"] = pool_size
    opts["max_overflow"] = max_overflow
    return opts


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


# ---- the relay's hot path: prepared Core statements on a raw DBAPI connection -------------

class Prepared:
    """A Core statement compiled once per dialect and run straight on a DBAPI cursor.

    A relay call runs a handful of fixed statements; there SQLAlchemy's execution layer
    (session bookkeeping, events, execution contexts, result objects) costs several times the
    statement itself. The statement stays Core — one definition for both dialects — and values
    pass through the column types' own bind and result processors, as SQLAlchemy would do.
    An INSERT without .values() is compiled per set of parameter names.
    """

    def __init__(self, stmt):
        self.stmt = stmt
        self._by_key: dict[tuple, tuple] = {}
        self._row_procs: dict[str, list] = {}

    def _compiled(self, dialect, params: dict) -> tuple:
        key = (dialect.name, tuple(params) if isinstance(self.stmt, Insert) else None)
        hit = self._by_key.get(key)
        if hit is None:
            comp = self.stmt.compile(dialect=dialect, column_keys=list(params) if key[1] else None)
            procs, fixed, required = {}, {}, set()
            for name, bind in comp.binds.items():
                proc = bind.type.dialect_impl(dialect).bind_processor(dialect)
                if proc is not None:
                    procs[name] = proc
                if name in params:
                    continue
                if key[1]:
                    # A column the INSERT names because it has a default: only constant defaults
                    # are applied here (SQLAlchemy would run the others in its execution context).
                    default = self.stmt.table.c[name].default
                    if default is None or not default.is_scalar:
                        raise ValueError(f"Prepared INSERT: pass '{name}' explicitly")
                    fixed[name] = default.arg
                elif bind.required:
                    required.add(name)
                else:
                    fixed[name] = bind.value  # a literal of the statement ('pending')
            order = tuple(comp.positiontup) if dialect.positional else tuple(comp.binds)
            hit = self._by_key[key] = (comp.string, procs, fixed, frozenset(required), order)
        return hit

    def row_processors(self, dialect) -> list:
        procs = self._row_procs.get(dialect.name)
        if procs is None:
            procs = self._row_procs[dialect.name] = [
                c.type.dialect_impl(dialect).result_processor(dialect, None)
                for c in self.stmt.exported_columns]
        return procs


class RawTx:
    """A DBAPI cursor on a pooled connection, for Prepared statements (see raw_tx())."""

    def __init__(self, dialect, cursor):
        self.dialect = dialect
        self.cursor = cursor

    def execute(self, prepared: Prepared, params: dict[str, Any]):
        sql, procs, fixed, required, order = prepared._compiled(self.dialect, params)
        if not required <= params.keys():
            raise KeyError(f"missing parameters: {sorted(required - params.keys())}")
        values = {**fixed, **params} if fixed else dict(params)
        for name, proc in procs.items():
            values[name] = proc(values[name])
        if self.dialect.positional:
            self.cursor.execute(sql, [values[n] for n in order])
        else:
            self.cursor.execute(sql, {n: values[n] for n in order})
        return self.cursor

    def first(self, prepared: Prepared, params: dict[str, Any]) -> tuple | None:
        row = self.execute(prepared, params).fetchone()
        if row is None:
            return None
        procs = prepared.row_processors(self.dialect)
        return tuple(p(v) if p else v for p, v in zip(procs, row))

    def scalar(self, prepared: Prepared, params: dict[str, Any]):
        row = self.first(prepared, params)
        return None if row is None else row[0]


def _off_loop(fn, *args):
    """fn(*args) in gevent's thread pool when this process runs gevent, so that the hub serves
    the other greenlets while fn blocks in C (a durable SQLite commit waits for its fsync, and
    would freeze every call of the worker meanwhile); inline otherwise.

    The caller's connection is busy in the pool thread until fn returns, so an interruption
    of the waiting greenlet (a kill at shutdown) first waits for fn's outcome: nothing may
    use, roll back or pool the connection while a COMMIT is still running on it."""
    from gevent import monkey

    if not monkey.is_module_patched("socket"):
        return fn(*args)
    from gevent import get_hub

    result = get_hub().threadpool.spawn(fn, *args)
    interrupted = None
    while True:
        try:
            value = result.get()
            break
        except BaseException as exc:
            if result.ready():  # fn itself failed
                raise
            interrupted = interrupted or exc
    if interrupted is not None:
        raise interrupted
    return value


@contextmanager
def raw_tx(*, write: bool, durable: bool = True, lock_wait_s: float | None = None,
           commit_off_loop: bool = False) -> Iterator[RawTx]:
    """One short transaction on a pooled DBAPI connection, outside the ORM session.

    write=True: BEGIN IMMEDIATE on SQLite (waiting cooperatively as write_tx() does, or up to
    lock_wait_s when that is longer; DatabaseBusy after that), committed on exit and rolled back on error;
    durable= as in write_tx(). write=False: autocommit, each statement its own transaction —
    a read, or on PostgreSQL one self-contained write statement (no BEGIN/COMMIT round trips).
    commit_off_loop: run the COMMIT through _off_loop() (SQLite: its fsync blocks in C).
    """
    engine = db.engine
    fairy = engine.raw_connection()
    dbapi = fairy.dbapi_connection
    sqlite = engine.dialect.name == "sqlite"
    cur = None
    began = False
    try:
        if sqlite:
            if write:
                _set_sqlite_sync(fairy, durable)
                _begin_immediate(fairy, lock_wait_s)
                began = True
        else:
            dbapi.autocommit = True
            if write:
                dbapi.execute("BEGIN" if durable else "BEGIN; SET LOCAL synchronous_commit TO OFF")
                began = True
        cur = dbapi.cursor()
        yield RawTx(engine.dialect, cur)
        if began:
            if commit_off_loop:
                _off_loop(cur.execute, "COMMIT")
            else:
                cur.execute("COMMIT")
    finally:
        try:
            # Whatever is still open (an error, or a COMMIT that failed) is rolled back.
            if dbapi.in_transaction if sqlite else dbapi.info.transaction_status != _PG_IDLE:
                dbapi.execute("ROLLBACK")
            if cur is not None:
                cur.close()
            if not sqlite:
                dbapi.autocommit = False
        finally:
            fairy.close()  # back to the pool


class _Job:
    __slots__ = ("work", "durable", "deadline", "done", "lead", "result", "error")

    def __init__(self, work, durable: bool, deadline: float):
        self.work, self.durable, self.deadline = work, durable, deadline
        self.done = threading.Event()
        self.lead = False
        self.result = self.error = None


class GroupCommit:
    """Group commit for SQLite: the relay's short write transactions of one process share a
    transaction when they arrive together.

    SQLite writes every page a transaction dirtied to the WAL at its commit, and a relay call's
    admission and settle each dirty the same hot pages (the wallet, the ends of the usage and
    ledger indexes). Run one by one, each call wrote ~25 pages and took the database write lock
    twice; batched, a page is written once per batch and the lock is taken once.

    Leader/follower: the first caller with nothing in progress leads — it takes the write lock
    (raw_tx) and runs every job queued by then, each in its own SAVEPOINT (a job alone needs
    none), so a job that raises (a refused admission) undoes only its own writes; then one
    COMMIT, durable if any job asked for durability. Callers that arrive meanwhile wait; when
    the batch is done the next waiter leads. Works with threads and with gevent (whose monkey
    patching makes the Event cooperative). A job is a function work(tx) -> result; it must not
    call run() itself.

    busy(): true when other work of this process could run during a commit. A durable commit
    then waits for its fsync in gevent's thread pool (_off_loop) instead of on the event loop;
    alone, it commits inline, which spares the hand-off to the thread.
    """

    def __init__(self, busy=None):
        self._mutex = threading.Lock()
        self._queue: list[_Job] = []
        self._leading = False
        self._busy = busy or (lambda: False)

    def run(self, work, *, durable: bool = True, lock_wait_s: float | None = None):
        wait = max(current_app.config.get("SQLITE_BUSY_TIMEOUT_MS", 5000) / 1000, lock_wait_s or 0)
        job = _Job(work, durable, time.monotonic() + wait)
        with self._mutex:
            self._queue.append(job)
            job.lead = not self._leading
            self._leading = True
        if not job.lead:
            job.done.wait()
        if job.lead:  # first in, or handed the lead after a batch
            self._lead(job)
        if job.error is not None:
            raise job.error
        return job.result

    def _lead(self, me: _Job) -> None:
        # Let callers that are ready to run reach their run() and join this batch.
        time.sleep(0)
        with self._mutex:
            batch, self._queue = self._queue, []
        try:
            self._commit(batch)
        finally:
            with self._mutex:
                nxt = self._queue[0] if self._queue else None
                self._leading = nxt is not None
            if nxt is not None:
                nxt.lead = True
            for job in batch:
                if job is not me:
                    job.done.set()
            if nxt is not None:
                nxt.done.set()

    def _commit(self, batch: list[_Job]) -> None:
        durable = any(j.durable for j in batch)
        try:
            with raw_tx(write=True, durable=durable, commit_off_loop=durable and self._busy(),
                        lock_wait_s=max(j.deadline for j in batch) - time.monotonic()) as tx:
                now = time.monotonic()
                if len(batch) == 1 and now <= batch[0].deadline:
                    # Alone, a job needs no savepoint: if it raises, the handler below
                    # records the error for it, and raw_tx rolls the whole transaction back.
                    batch[0].result = batch[0].work(tx)
                    return
                for job in batch:
                    if now > job.deadline:  # waited longer for the lock than it may
                        job.error = DatabaseBusy("database is locked")
                        continue
                    tx.cursor.execute("SAVEPOINT relay_job")
                    try:
                        job.result = job.work(tx)
                    except Exception as exc:
                        tx.cursor.execute("ROLLBACK TO relay_job")
                        job.error = exc
                    tx.cursor.execute("RELEASE relay_job")
        except Exception as exc:  # nothing of the batch was committed
            for job in batch:
                job.result, job.error = None, exc
        except BaseException:  # the leader is being stopped: its followers see a busy database
            for job in batch:
                job.result, job.error = None, DatabaseBusy("the write batch was interrupted")
            raise


class PgGroupCommit(GroupCommit):
    """Group commit for PostgreSQL: each job is ONE self-contained statement (sql, params,
    lock_key) that takes the row locks it needs itself, and the statements of one process that
    arrive together run as one pipelined transaction — `BEGIN; lock_sql for every job's
    lock_key, in order; the statements; COMMIT` — one network round trip and one commit for the
    batch. A job alone runs as its one statement in autocommit: no BEGIN, lock or COMMIT.

    lock_sql takes the rows every job writes first, sorted (a relay call locks its user's
    wallet), so two batches never wait for each other in a cycle, and each statement sees every
    transaction committed before the lock (READ COMMITTED) and the batch's own earlier
    statements. A statement that fails aborts its batch, which is then retried one job per
    transaction, so only the failing job sees the error. A job's result is its statement's
    first row.

    Durability: a batch with no durable job commits with synchronous_commit off. A statement
    alone decides for itself: it receives one more parameter, `async_commit`, true when its job
    asked for no durability, and may then call set_config('synchronous_commit', 'off', true)
    for its own transaction (in a batch `async_commit` is false and the batch decides).
    """

    def __init__(self, lock_sql: str):
        super().__init__()
        self._lock_sql = lock_sql

    def _commit(self, batch: list[_Job]) -> None:
        try:
            self._pipeline(batch)
        except Exception as exc:
            # The server refused a statement (it names an SQLSTATE): find whose. Anything else —
            # no connection within the pool timeout, a connection lost or shut down — would
            # fail each job alone just the same.
            state = getattr(exc, "sqlstate", None) or ""
            if len(batch) == 1 or not state or state[:2] in ("08", "57"):
                for job in batch:
                    job.result, job.error = None, exc
                return
            for job in batch:
                try:
                    self._pipeline([job])
                except Exception as one:
                    job.result, job.error = None, one
        except BaseException:
            for job in batch:
                job.result, job.error = None, DatabaseBusy("the write batch was interrupted")
            raise

    def _pipeline(self, batch: list[_Job]) -> None:
        with raw_tx(write=False) as tx:
            if len(batch) == 1:
                job = batch[0]
                params = {**job.work[1], "async_commit": not job.durable}
                job.result, job.error = tx.cursor.execute(job.work[0], params).fetchone(), None
                return
            conn = tx.cursor.connection
            cursors = []
            with conn.pipeline():
                conn.execute("BEGIN")
                if not any(j.durable for j in batch):
                    conn.execute("SET LOCAL synchronous_commit TO OFF")
                conn.execute(self._lock_sql, {"keys": sorted({j.work[2] for j in batch})})
                for job in batch:
                    cur = conn.cursor()
                    cur.execute(job.work[0], {**job.work[1], "async_commit": False})
                    cursors.append(cur)
                conn.execute("COMMIT")
            for job, cur in zip(batch, cursors):
                job.result, job.error = cur.fetchone(), None
