"""The migrated schema: it matches the models, and ledger/audit rows are append-only in the DB."""
from __future__ import annotations

import pytest
from alembic.autogenerate import compare_metadata
from alembic.migration import MigrationContext
from sqlalchemy import create_engine, text
from sqlalchemy.exc import DatabaseError

from console import ledger
from console.extensions import db
from tests.conftest import make_app, need_postgres, reset_postgres
from tests.support.server import flask_cli, migrate
from tests.support.web import make_user


@pytest.fixture
def migrated_app(db_url):
    """An app on a database built by `flask db upgrade`, as production builds it."""
    migrate(db_url)
    application = make_app(db_url)
    yield application
    with application.app_context():
        db.session.remove()
        db.engine.dispose()


def test_migrations_match_models(migrated_app):
    """After `flask db upgrade` there is no difference between the database and the models."""
    with migrated_app.app_context():
        with db.engine.connect() as conn:
            diff = compare_metadata(MigrationContext.configure(conn), db.metadata)
    assert diff == []


@pytest.mark.parametrize("statement", [
    "UPDATE ledger_entries SET amount_micros = amount_micros + 1",
    "DELETE FROM ledger_entries",
    "UPDATE audit_log SET action = 'x'",
    "DELETE FROM audit_log",
])
def test_append_only_enforced_by_database(migrated_app, statement):
    """Updating or deleting ledger and audit rows fails inside the database itself."""
    with migrated_app.app_context():
        user = make_user()
        ledger.credit(user.id, 5_000_000, kind="admin_adjust", reason="test")
        with pytest.raises(DatabaseError, match="append-only"):
            db.session.execute(text(statement))
        db.session.rollback()
        assert ledger.verify() == []


def test_create_all_schema_is_append_only_too(ctx):
    """The create_all path used by most tests installs the same triggers."""
    user = make_user()
    ledger.credit(user.id, 1_000_000, kind="admin_adjust", reason="test")
    with pytest.raises(DatabaseError, match="append-only"):
        db.session.execute(text("UPDATE ledger_entries SET kind = 'refund'"))
    db.session.rollback()


def test_postgres_truncate_is_refused():
    """On PostgreSQL, TRUNCATE (which skips row triggers) is refused as well."""
    db_url = need_postgres()
    reset_postgres(db_url)
    flask_cli(db_url, "db", "upgrade")
    engine = create_engine(db_url)
    with engine.connect() as conn, pytest.raises(DatabaseError, match="append-only"):
        conn.execute(text("TRUNCATE ledger_entries"))
    engine.dispose()


def test_migration_installs_the_models_relay_function(migrated_app):
    """`flask db upgrade` installs relay_admission_counts() as create_all does (PostgreSQL),
    from a copy in the latest migration that defines it, which must not drift from the models;
    and its queries are planned once per connection, not on every call."""
    import importlib.util
    from pathlib import Path

    from console.models import RELAY_ADMISSION_COUNTS_SQL

    versions = Path(__file__).parent.parent / "migrations" / "versions"
    copies = []
    for path in sorted(versions.glob("0*.py")):
        spec = importlib.util.spec_from_file_location(f"migration_{path.stem}", path)
        migration = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(migration)
        if "relay_admission_counts" in getattr(migration, "FUNCTION", ""):
            copies.append(migration.FUNCTION)
    assert copies and copies[-1] == RELAY_ADMISSION_COUNTS_SQL
    with migrated_app.app_context():
        if db.engine.dialect.name != "postgresql":
            return
        config = db.session.scalar(text("SELECT proconfig FROM pg_proc WHERE proname = 'relay_admission_counts'"))
    assert config == ["plan_cache_mode=force_generic_plan"]


def test_postgres_generic_plans_migration_goes_down_and_up():
    """Migration 0003 is reversible: down to 0002 the function plans as PostgreSQL decides,
    up again it is pinned to generic plans."""
    db_url = need_postgres()
    reset_postgres(db_url)
    engine = create_engine(db_url)
    query = text("SELECT proconfig FROM pg_proc WHERE proname = 'relay_admission_counts'")
    try:
        for step, expected in ((("upgrade",), ["plan_cache_mode=force_generic_plan"]),
                               (("downgrade", "0002"), None),
                               (("upgrade",), ["plan_cache_mode=force_generic_plan"])):
            flask_cli(db_url, "db", *step)
            with engine.connect() as conn:
                assert conn.execute(query).scalar_one() == expected, step
    finally:
        engine.dispose()


def _inspected(db_url: str, read):
    """read(inspector) on an engine of its own."""
    from sqlalchemy import inspect

    engine = create_engine(db_url)
    try:
        return read(inspect(engine))
    finally:
        engine.dispose()


def _columns(db_url: str, table: str) -> set[str]:
    return _inspected(db_url, lambda i: {c["name"] for c in i.get_columns(table)})


def _assert_schema_is_the_models(db_url: str) -> None:
    engine = create_engine(db_url)
    try:
        with engine.connect() as conn:
            assert compare_metadata(MigrationContext.configure(conn), db.metadata) == []
    finally:
        engine.dispose()


def test_usage_index_migration_goes_down_and_up(db_url):
    """Migration 0004 is reversible on both databases: down to 0003 the (user_id, id) index is
    back, up again it is gone and the schema equals the models'."""
    def usage_indexes():
        return _inspected(db_url, lambda i: {ix["name"] for ix in i.get_indexes("usage_records")})

    migrate(db_url)
    assert "ix_usage_user_id_desc" not in usage_indexes()
    flask_cli(db_url, "db", "downgrade", "0003")
    assert "ix_usage_user_id_desc" in usage_indexes()
    flask_cli(db_url, "db", "upgrade")
    assert "ix_usage_user_id_desc" not in usage_indexes()
    _assert_schema_is_the_models(db_url)


def test_web_search_migration_goes_down_and_up_keeping_records(db_url):
    """Migration 0005 is reversible on both databases, and a record written before it reads as
    a call with no search (0 searches at $0) once it is applied again."""
    from datetime import timedelta

    from console.models import ModelPrice, UsageRecord, utcnow

    migrate(db_url)
    application = make_app(db_url)
    with application.app_context():
        uid = make_user("old-record@example.com").id
        db.session.add(ModelPrice(name="m", provider="anthropic", web_search_price=10_000))
        db.session.add(UsageRecord(request_id="req_old", user_id=uid, model="m", endpoint="messages",
                                   status="ok", input_tokens=1000, multiplier_ppm=300_000,
                                   web_searches=3, web_search_price=10_000,
                                   deadline_at=utcnow() + timedelta(minutes=5)))
        db.session.commit()
        db.session.remove()
        db.engine.dispose()

    flask_cli(db_url, "db", "downgrade", "0004")
    assert not {"web_searches", "web_search_price"} & _columns(db_url, "usage_records")
    assert "web_search_price" not in _columns(db_url, "model_prices")
    flask_cli(db_url, "db", "upgrade")
    engine = create_engine(db_url)
    try:
        with engine.connect() as conn:
            assert conn.execute(text("SELECT input_tokens, web_searches, web_search_price FROM usage_records"
                                     " WHERE request_id = 'req_old'")).one() == (1000, 0, 0)
            assert conn.execute(text("SELECT web_search_price FROM model_prices")).scalar_one() is None
    finally:
        engine.dispose()
    _assert_schema_is_the_models(db_url)


def test_long_context_migration_goes_down_and_up(db_url):
    """Migration 0006 is reversible on both databases: down to 0005 the tier columns are gone,
    up again the schema equals the models'."""
    tier = {"long_context_threshold", "long_context_input_ppm", "long_context_output_ppm"}
    migrate(db_url)
    assert tier <= _columns(db_url, "model_prices")
    flask_cli(db_url, "db", "downgrade", "0005")
    assert not tier & _columns(db_url, "model_prices")
    flask_cli(db_url, "db", "upgrade")
    _assert_schema_is_the_models(db_url)


def test_processing_tier_migration_goes_down_and_up(db_url):
    """Migration 0007 is reversible on both databases."""
    migrate(db_url)
    assert {"priority_ppm", "flex_ppm"} <= _columns(db_url, "model_prices")
    flask_cli(db_url, "db", "downgrade", "0006")
    assert not {"priority_ppm", "flex_ppm"} & _columns(db_url, "model_prices")
    flask_cli(db_url, "db", "upgrade")
    _assert_schema_is_the_models(db_url)
