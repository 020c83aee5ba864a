"""Fixtures: a fresh database per test, on SQLite and (when configured) PostgreSQL.

TEST_DATABASE_URL names a PostgreSQL server database; each test gets a fresh schema there.
With CI=true, PostgreSQL tests must run: a missing TEST_DATABASE_URL fails them.
"""
from __future__ import annotations

import os
import uuid

import pytest
from flask import has_app_context
from flask.testing import FlaskClient

os.environ.setdefault("SECRET_KEY", "test-secret-key-not-for-production")

from argon2 import PasswordHasher  # noqa: E402
from psycopg.errors import InsufficientPrivilege  # noqa: E402
from sqlalchemy import Engine, create_engine, text  # noqa: E402
from sqlalchemy.exc import DatabaseError  # noqa: E402

from console import accounts, create_app  # noqa: E402
from console.config import database_url  # noqa: E402
from console.extensions import db, limiter  # noqa: E402

# Production hashes cost ~130 ms each to make and to check, and most tests make or log in a
# user. The tests in this process use the cheapest argon2id instead; servers and CLI commands
# the tests start keep the production parameters (test_auth checks both, and the upgrade of
# a cheap hash to the production one at the next login).
PRODUCTION_HASHER = accounts._hasher
accounts._hasher = PasswordHasher(time_cost=1, memory_cost=8, parallelism=1)

IN_CI = os.environ.get("CI", "").lower() == "true"
PG_URL = os.environ.get("TEST_DATABASE_URL")
REDIS_URL = os.environ.get("REDIS_URL")


def need_postgres() -> str:
    """The PostgreSQL URL, or skip (fail in CI) with a clear reason."""
    if PG_URL:
        os.environ["DATABASE_URL"] = PG_URL
        url = database_url()
        del os.environ["DATABASE_URL"]
        return url
    if IN_CI:
        pytest.fail("CI=true but TEST_DATABASE_URL is not set: PostgreSQL tests must run in CI")
    pytest.skip("PostgreSQL not configured (set TEST_DATABASE_URL to run these)")


def need_redis() -> str:
    if REDIS_URL:
        return REDIS_URL
    if IN_CI:
        pytest.fail("CI=true but REDIS_URL is not set: Redis tests must run in CI")
    pytest.skip("Redis not configured (set REDIS_URL to run these)")


def reset_postgres(url: str) -> None:
    """Drop everything in the public schema (append-only triggers forbid TRUNCATE, not DROP)."""
    engine = create_engine(url, isolation_level="AUTOCOMMIT")
    with engine.connect() as conn:
        conn.execute(text("DROP SCHEMA IF EXISTS public CASCADE"))
        conn.execute(text("CREATE SCHEMA public"))
    engine.dispose()


# Everything in the public schema but its rows: relations, columns, defaults, indexes,
# constraints, triggers (and whether they are enabled), functions with their settings, rules.
SCHEMA_FINGERPRINT = text("""
SELECT md5(coalesce(string_agg(item, E'\n' ORDER BY item), '')) FROM (
  SELECT 'rel ' || relname || ' ' || relkind::text || relpersistence::text || coalesce(relacl::text, '') AS item
    FROM pg_class WHERE relnamespace = 'public'::regnamespace
  UNION ALL
  SELECT 'col ' || c.relname || '.' || a.attname || ' ' || format_type(a.atttypid, a.atttypmod)
         || ' ' || a.attnotnull || ' ' || coalesce(pg_get_expr(d.adbin, d.adrelid), '')
    FROM pg_attribute a JOIN pg_class c ON c.oid = a.attrelid
    LEFT JOIN pg_attrdef d ON d.adrelid = a.attrelid AND d.adnum = a.attnum
   WHERE c.relnamespace = 'public'::regnamespace AND a.attnum > 0 AND NOT a.attisdropped
  UNION ALL
  SELECT 'idx ' || pg_get_indexdef(indexrelid) FROM pg_index
   WHERE indrelid IN (SELECT oid FROM pg_class WHERE relnamespace = 'public'::regnamespace)
  UNION ALL
  SELECT 'con ' || conname || ' ' || pg_get_constraintdef(oid) FROM pg_constraint
   WHERE connamespace = 'public'::regnamespace
  UNION ALL
  SELECT 'trg ' || t.tgname || ' ' || t.tgenabled::text || ' ' || pg_get_triggerdef(t.oid)
    FROM pg_trigger t JOIN pg_class c ON c.oid = t.tgrelid
   WHERE c.relnamespace = 'public'::regnamespace AND NOT t.tgisinternal
  UNION ALL
  SELECT 'fn ' || oid::regprocedure::text || ' ' || md5(prosrc) || ' '
         || coalesce(array_to_string(proconfig, ','), '') FROM pg_proc
   WHERE pronamespace = 'public'::regnamespace
  UNION ALL
  SELECT 'rule ' || rulename || ' ' || definition FROM pg_rules WHERE schemaname = 'public'
) parts
""")
_CREATE_ALL_FINGERPRINT: str | None = None
# One kept connection per server for fresh_postgres: a new backend's cold catalog cache made
# the fingerprint three times slower. Idle between tests, it holds no lock.
_KEPT: dict[str, Engine] = {}

EMPTY_SCHEMA_ROWS = """
SET LOCAL session_replication_role = replica;
{deletes}
DO $$ DECLARE seq regclass; BEGIN
  FOR seq IN SELECT oid::regclass FROM pg_class
              WHERE relkind = 'S' AND relnamespace = 'public'::regnamespace LOOP
    EXECUTE 'ALTER SEQUENCE ' || seq::text || ' RESTART';
  END LOOP;
END $$;
"""


def fresh_postgres(url: str) -> None:
    """Leave the models' schema (as create_all builds it) on `url` with no rows in it.

    Building it takes ~150 ms of DDL, so when the last test left exactly that schema (same
    fingerprint as this run's first build) only its rows go and its sequences restart, in one
    round trip. Replica mode fires no trigger: neither the append-only guards nor the foreign
    keys' checks (every table is emptied); it needs a superuser. Any other schema, a migrated
    one say, is dropped and built anew. `flask db upgrade` needs an empty schema:
    tests/support/server.migrate() drops it first.
    """
    global _CREATE_ALL_FINGERPRINT
    engine = _KEPT.get(url)
    if engine is None:
        engine = _KEPT[url] = create_engine(url, pool_size=1, pool_pre_ping=True)
    if _CREATE_ALL_FINGERPRINT is not None:
        try:
            with engine.begin() as conn:
                if conn.scalar(SCHEMA_FINGERPRINT) == _CREATE_ALL_FINGERPRINT:
                    deletes = "\n".join(f'DELETE FROM "{t.name}";' for t in db.metadata.sorted_tables)
                    conn.exec_driver_sql(EMPTY_SCHEMA_ROWS.format(deletes=deletes))
                    return
        except DatabaseError as exc:
            if not isinstance(exc.orig, InsufficientPrivilege):
                raise  # only a server that won't skip triggers builds it anew each time
    reset_postgres(url)
    db.metadata.create_all(engine)
    with engine.connect() as conn:
        _CREATE_ALL_FINGERPRINT = _CREATE_ALL_FINGERPRINT or conn.scalar(SCHEMA_FINGERPRINT)


@pytest.fixture(params=["sqlite", "postgres"])
def db_url(request, tmp_path) -> str:
    """A fresh database URL of each kind, with no rows: an empty SQLite file; on PostgreSQL
    the models' schema (create_all then finds it in place), see fresh_postgres()."""
    if request.param == "sqlite":
        return f"sqlite:///{tmp_path / 'test.db'}"
    url = need_postgres()
    fresh_postgres(url)
    return url


class IsolatedClient(FlaskClient):
    """Each request runs in its own app context, as in production (fresh `g`, fresh session).

    A test holding an app context (the `ctx` fixture) would otherwise share `g` and the
    database session with every request it makes. Around each request the test's own
    session ends its transaction (so it sees what the request committed) and is expired.
    """

    def open(self, *args, **kwargs):
        # Like a WSGI server, read the whole body and then close the response: the relay
        # settles a call in close() (a test reading a stream step by step passes buffered=False).
        kwargs.setdefault("buffered", True)
        outer = has_app_context()
        if outer:
            db.session.commit()
        with self.application.app_context():
            resp = super().open(*args, **kwargs)
        if outer:
            db.session.expire_all()
        return resp


def make_app(url: str, **overrides):
    config = {
        "SQLALCHEMY_DATABASE_URI": url,
        "TESTING": True,
        "SECRET_KEY": "test-secret-key-not-for-production",
        "RATELIMIT_STORAGE_URI": "memory://",
        "RATELIMIT_KEY_PREFIX": f"test-{uuid.uuid4().hex}",
        "SERVER_NAME": None,
    }
    config.update(overrides)
    # The limiter is one object for every app of the process (one app per process in
    # production). A test whose limit storage was unreachable leaves it on its in-memory
    # fallback, and a later test's app would switch back to its own storage a few seconds in,
    # losing the counts made meanwhile: each app starts with the storage it was given.
    limiter._storage_dead = False
    limiter._Limiter__check_backend_count = 0
    application = create_app(config)
    application.test_client_class = IsolatedClient
    _APPS.append(application)
    return application


_APPS: list = []


@pytest.fixture(autouse=True)
def _dispose_engines():
    """Close the pooled connections of every app a test made, when the test ends. A pool left
    to the garbage collector closes its PostgreSQL connections whenever it runs, and psycopg's
    ResourceWarning then fails whichever test is running at that moment."""
    first = len(_APPS)
    yield
    made, _APPS[first:] = _APPS[first:], []
    for application in made:
        with application.app_context():
            db.session.remove()
            for engine in db.engines.values():
                engine.dispose()


@pytest.fixture
def app(db_url):
    """The app on a fresh database built with create_all (migrations are tested separately)."""
    application = make_app(db_url)
    with application.app_context():
        db.create_all()
    yield application
    with application.app_context():
        db.session.remove()
        db.engine.dispose()


@pytest.fixture
def ctx(app):
    with app.app_context():
        yield app
        db.session.remove()


@pytest.fixture
def client(app):
    return app.test_client()
