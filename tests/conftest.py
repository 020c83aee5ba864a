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
from sqlalchemy import create_engine, text  # noqa: E402

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


@pytest.fixture(params=["sqlite", "postgres"])
def db_url(request, tmp_path) -> str:
    """A fresh, empty database URL of each kind."""
    if request.param == "sqlite":
        return f"sqlite:///{tmp_path / 'test.db'}"
    url = need_postgres()
    reset_postgres(url)
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
