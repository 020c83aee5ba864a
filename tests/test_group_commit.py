"""SQLite group commit (database.GroupCommit): writes that arrive together share a transaction,
each keeps its own outcome, and a failed commit fails every write of its batch."""
from __future__ import annotations

import sqlite3
import threading
import time

import pytest

from console.database import GroupCommit
from console.extensions import db
from tests.conftest import make_app


def _scratch_app(url: str, *ddl: str):
    """An app on `url` with two scratch tables: parent, and item referencing it."""
    app = make_app(url)
    with app.app_context(), db.engine.begin() as conn:
        for statement in ddl:
            conn.exec_driver_sql(statement)
    return app


@pytest.fixture
def sqlite_app(tmp_path):
    app = _scratch_app(f"sqlite:///{tmp_path / 'gc.db'}", "CREATE TABLE parent (id INTEGER PRIMARY KEY)",
                       "CREATE TABLE item (id INTEGER PRIMARY KEY, tag TEXT, parent_id INTEGER REFERENCES parent(id))")
    yield app
    with app.app_context():
        db.engine.dispose()


def _insert(tag: str, parent_id: int | None = None):
    def job(tx):
        tx.cursor.execute("INSERT INTO item (tag, parent_id) VALUES (?, ?)", (tag, parent_id))
        return id(tx)
    return job


def _tags(app) -> list[str]:
    with app.app_context(), db.engine.connect() as conn:
        return [r[0] for r in conn.exec_driver_sql("SELECT tag FROM item ORDER BY id")]


class _Batch:
    """A leader whose job blocks until `release()`, so followers queue up behind it and run
    together in the next batch — deterministic batching without timing assumptions."""

    def __init__(self, app, gc: GroupCommit):
        self.app, self.gc = app, gc
        self.go = threading.Event()
        self.entered = threading.Event()
        self.results: dict[str, object] = {}
        self.threads: list[threading.Thread] = []

        def leader_job(tx):
            self.entered.set()
            assert self.go.wait(10)
            return id(tx)
        self._spawn("leader", leader_job, True)
        assert self.entered.wait(10)

    def _spawn(self, name: str, job, durable: bool) -> None:
        def run():
            with self.app.app_context():
                try:
                    self.results[name] = self.gc.run(job, durable=durable)
                except Exception as exc:
                    self.results[name] = exc
        t = threading.Thread(target=run)
        t.start()
        self.threads.append(t)

    def follow(self, name: str, job, durable: bool = True) -> None:
        queued = len(self.gc._queue)
        self._spawn(name, job, durable)
        deadline = time.monotonic() + 10
        while len(self.gc._queue) == queued:
            assert time.monotonic() < deadline, "the follower never queued"
            time.sleep(0.001)

    def release(self) -> dict[str, object]:
        self.go.set()
        for t in self.threads:
            t.join(10)
        return self.results


def test_writes_that_arrive_together_share_one_transaction(sqlite_app):
    gc = GroupCommit()
    batch = _Batch(sqlite_app, gc)
    for i in range(5):
        batch.follow(f"f{i}", _insert(f"f{i}"))
    res = batch.release()
    followers = {res[f"f{i}"] for i in range(5)}
    assert len(followers) == 1, "the five followers ran in one transaction"
    assert sorted(_tags(sqlite_app)) == [f"f{i}" for i in range(5)]
    assert not gc._queue and not gc._leading


def test_a_failing_write_undoes_only_its_own_changes(sqlite_app):
    gc = GroupCommit()
    batch = _Batch(sqlite_app, gc)

    def fails(tx):
        tx.cursor.execute("INSERT INTO item (tag) VALUES ('doomed')")
        raise ValueError("refused")
    batch.follow("a", _insert("a"))
    batch.follow("bad", fails)
    batch.follow("b", _insert("b"))
    res = batch.release()
    assert isinstance(res["bad"], ValueError)
    assert res["a"] == res["b"]  # same batch
    assert _tags(sqlite_app) == ["a", "b"]


def test_a_write_alone_that_fails_leaves_nothing(sqlite_app):
    """A job alone runs without a savepoint: its failure rolls back the whole transaction."""
    gc = GroupCommit()

    def fails(tx):
        tx.cursor.execute("INSERT INTO item (tag) VALUES ('doomed')")
        raise ValueError("refused")
    with sqlite_app.app_context():
        with pytest.raises(ValueError, match="refused"):
            gc.run(fails)
        assert gc.run(lambda tx: tx.cursor.execute("SELECT count(*) FROM item").fetchone()[0]) == 0
        gc.run(_insert("after"))
    assert _tags(sqlite_app) == ["after"]
    assert not gc._queue and not gc._leading


def test_a_failed_commit_fails_every_write_of_the_batch(sqlite_app):
    """A foreign-key violation deferred to COMMIT: the whole batch is rolled back and every
    caller gets the error — none may believe its write landed."""
    gc = GroupCommit()
    batch = _Batch(sqlite_app, gc)

    def orphan(tx):
        tx.cursor.execute("PRAGMA defer_foreign_keys=ON")
        tx.cursor.execute("INSERT INTO item (tag, parent_id) VALUES ('orphan', 42)")
    batch.follow("a", _insert("a"))
    batch.follow("orphan", orphan)
    res = batch.release()
    assert isinstance(res["a"], sqlite3.IntegrityError) and isinstance(res["orphan"], sqlite3.IntegrityError)
    assert _tags(sqlite_app) == []
    # The next write gets a fresh transaction.
    with sqlite_app.app_context():
        gc.run(_insert("after"))
    assert _tags(sqlite_app) == ["after"]


def test_a_batch_is_durable_when_any_write_asks_for_it(sqlite_app):
    gc = GroupCommit()

    def sync_mode(tx):
        return tx.cursor.execute("PRAGMA synchronous").fetchone()[0]
    batch = _Batch(sqlite_app, gc)
    batch.follow("deferred", sync_mode, durable=False)
    batch.follow("durable", sync_mode, durable=True)
    res = batch.release()
    assert res["deferred"] == res["durable"] == 2  # FULL
    with sqlite_app.app_context():
        assert gc.run(sync_mode, durable=False) == 1  # NORMAL when alone


def test_many_threads_lose_no_write(sqlite_app):
    gc = GroupCommit()
    errors: list[BaseException] = []

    def worker(n: int):
        with sqlite_app.app_context():
            for i in range(40):
                try:
                    gc.run(_insert(f"{n}-{i}"), durable=i % 2 == 0)
                except BaseException as exc:
                    errors.append(exc)
    threads = [threading.Thread(target=worker, args=(n,)) for n in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    assert not errors
    assert sorted(_tags(sqlite_app)) == sorted(f"{n}-{i}" for n in range(8) for i in range(40))
    assert not gc._queue and not gc._leading


# ---- PostgreSQL: one pipelined transaction per batch of statements -------------------------

@pytest.fixture
def pg_app():
    from tests.conftest import need_postgres, reset_postgres

    url = need_postgres()
    reset_postgres(url)
    app = _scratch_app(url, "CREATE TABLE parent (id INTEGER PRIMARY KEY)", "INSERT INTO parent VALUES (1), (2), (3)",
                       "CREATE TABLE item (id SERIAL PRIMARY KEY, tag TEXT, parent_id INTEGER REFERENCES parent(id))")
    yield app
    with app.app_context():
        db.engine.dispose()


_PG_LOCK = "SELECT 1 FROM parent WHERE id = ANY(%(keys)s) ORDER BY id FOR UPDATE"
_PG_INSERT = "INSERT INTO item (tag, parent_id) VALUES (%(tag)s, %(parent)s) RETURNING id, txid_current()"


@pytest.mark.parametrize("with_failure", [False, True])
def test_postgres_statements_that_arrive_together_share_one_transaction(pg_app, with_failure):
    """The leader's batch waits on a row lock held elsewhere while more statements queue; they
    then run as one transaction. When one of them fails, the batch is retried one statement per
    transaction: only that one fails, the others land."""
    import psycopg

    from console.database import PgGroupCommit

    gc = PgGroupCommit(_PG_LOCK)
    with pg_app.app_context():
        url = db.engine.url.set(drivername="postgresql").render_as_string(hide_password=False)
    blocker = psycopg.connect(url, autocommit=False)
    blocker.execute("SELECT 1 FROM parent WHERE id = 1 FOR UPDATE")
    results: dict[str, object] = {}

    def call(name: str, tag: str, parent: int):
        with pg_app.app_context():
            try:
                results[name] = gc.run((_PG_INSERT, {"tag": tag, "parent": parent}, parent))
            except Exception as exc:
                results[name] = exc
    threads = [threading.Thread(target=call, args=("leader", "leader", 1))]
    threads[0].start()
    deadline = time.monotonic() + 10
    with psycopg.connect(url, autocommit=True) as probe:
        while not probe.execute("SELECT count(*) FROM pg_locks WHERE NOT granted").fetchone()[0]:
            assert time.monotonic() < deadline, "the leader never waited for the lock"
            time.sleep(0.01)
    followers = (("a", 2), ("bad", 99), ("b", 3)) if with_failure else (("a", 2), ("b", 3))
    for name, parent in followers:
        queued = len(gc._queue)
        t = threading.Thread(target=call, args=(name, name, parent))
        t.start()
        threads.append(t)
        while len(gc._queue) == queued:
            assert time.monotonic() < deadline, "the follower never queued"
            time.sleep(0.001)
    blocker.rollback()
    blocker.close()
    for t in threads:
        t.join(10)
    if with_failure:
        assert isinstance(results["bad"], psycopg.errors.ForeignKeyViolation)
        assert len({results["a"][1], results["b"][1], results["leader"][1]}) == 3
    else:
        assert results["a"][1] == results["b"][1] != results["leader"][1]  # a and b: one transaction
    with pg_app.app_context(), db.engine.connect() as conn:
        assert sorted(r[0] for r in conn.exec_driver_sql("SELECT tag FROM item")) == ["a", "b", "leader"]
    assert not gc._queue and not gc._leading


_OFF_LOOP_SCRIPT = r"""
from gevent import monkey
monkey.patch_all()
import _thread, time, gevent
from console.database import _off_loop

ticks = []
def ticker():
    while True:
        ticks.append(time.monotonic())
        gevent.sleep(0.01)

t = gevent.spawn(ticker)
gevent.sleep(0.05)
before = len(ticks)
finished = []
def slow():
    # A call that blocks its OS thread in C for 0.3 s, as an fsync does.
    held = _thread.allocate_lock()
    held.acquire()
    held.acquire(True, 0.3)
    finished.append(time.monotonic())
    return "done"

assert _off_loop(slow) == "done"
progressed = len(ticks) - before
finished.clear()
waiter = gevent.spawn(_off_loop, slow)
gevent.sleep(0.05)
waiter.kill(block=False)
waiter.join()
killed_at = time.monotonic()
print(progressed, bool(finished), bool(finished) and finished[0] <= killed_at, type(waiter.value).__name__)
"""


def test_off_loop_commit_frees_the_event_loop_and_outlives_a_kill(tmp_path):
    """Under gevent, a blocking call sent off the loop lets other greenlets run; a greenlet killed
    while waiting for it returns only after the call finished (its connection is then free)."""
    import subprocess
    import sys

    from tests.support.server import ROOT

    res = subprocess.run([sys.executable, "-c", _OFF_LOOP_SCRIPT], cwd=ROOT, capture_output=True, text=True,
                         timeout=60, check=False)
    assert res.returncode == 0, res.stderr
    progressed, finished, in_order, exc = res.stdout.split()
    assert int(progressed) >= 10  # ~30 ticks of 10 ms while the pool thread blocked for 0.3 s
    assert (finished, in_order, exc) == ("True", "True", "GreenletExit")
