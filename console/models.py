"""The data model (SQLAlchemy 2.0 Mapped[] style).

Money columns are integers (see console/money.py for units). Ledger and audit rows are
append-only, enforced by database triggers created with the tables (and by the migration).
"""
from __future__ import annotations

from datetime import date, datetime, timezone

from sqlalchemy import (
    DDL,
    BigInteger,
    Boolean,
    CheckConstraint,
    Date,
    DateTime,
    ForeignKey,
    Index,
    Integer,
    String,
    Text,
    event,
    text,
)
from sqlalchemy.orm import Mapped, mapped_column, relationship

from console.extensions import db


def utcnow() -> datetime:
    return datetime.now(timezone.utc)


class TZDateTime(db.TypeDecorator):
    """Timezone-aware UTC datetimes on both SQLite (stored naive) and PostgreSQL."""

    impl = DateTime(timezone=True)
    cache_ok = True

    def process_bind_param(self, value, dialect):
        if value is not None and value.tzinfo is not None:
            value = value.astimezone(timezone.utc)
            if dialect.name == "sqlite":
                value = value.replace(tzinfo=None)
        return value

    def process_result_value(self, value, dialect):
        if value is not None and value.tzinfo is None:
            value = value.replace(tzinfo=timezone.utc)
        return value


Money = BigInteger  # micro-credits, micro-USD, pico-USD: always integers


class User(db.Model):
    __tablename__ = "users"
    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    email: Mapped[str] = mapped_column(String(254), unique=True)
    password_hash: Mapped[str] = mapped_column(String(255))
    role: Mapped[str] = mapped_column(String(16), default="user")
    status: Mapped[str] = mapped_column(String(16), default="active")
    default_group_id: Mapped[int | None] = mapped_column(ForeignKey("groups.id"), nullable=True)
    # Bound into the login id; rotating it invalidates every outstanding session cookie.
    session_token: Mapped[str] = mapped_column(String(64))
    created_at: Mapped[datetime] = mapped_column(TZDateTime, default=utcnow)
    last_login_at: Mapped[datetime | None] = mapped_column(TZDateTime, nullable=True)

    __table_args__ = (
        CheckConstraint("role IN ('user','support','admin')", name="role"),
        CheckConstraint("status IN ('active','disabled')", name="status"),
    )

    wallet: Mapped["Wallet"] = relationship(back_populates="user", uselist=False)
    default_group: Mapped["Group | None"] = relationship(foreign_keys=[default_group_id])

    # Flask-Login protocol
    @property
    def is_authenticated(self) -> bool:
        return True

    @property
    def is_active(self) -> bool:
        return self.status == "active"

    @property
    def is_anonymous(self) -> bool:
        return False

    def get_id(self) -> str:
        return f"{self.id}:{self.session_token}"

    @property
    def is_staff(self) -> bool:
        return self.role in ("support", "admin")

    @property
    def is_admin(self) -> bool:
        return self.role == "admin"


class Wallet(db.Model):
    """One per user. balance = Σ ledger entries; held = Σ open holds of in-flight calls."""

    __tablename__ = "wallets"
    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    user_id: Mapped[int] = mapped_column(ForeignKey("users.id"), unique=True)
    balance_micros: Mapped[int] = mapped_column(Money, default=0)
    held_micros: Mapped[int] = mapped_column(Money, default=0)
    updated_at: Mapped[datetime] = mapped_column(TZDateTime, default=utcnow)

    __table_args__ = (CheckConstraint("held_micros >= 0", name="held_nonneg"),)

    user: Mapped[User] = relationship(back_populates="wallet")

    @property
    def available_micros(self) -> int:
        return self.balance_micros - self.held_micros


class LedgerEntry(db.Model):
    """Append-only: every change of a balance, with the balance after it."""

    __tablename__ = "ledger_entries"
    id: Mapped[int] = mapped_column(BigInteger().with_variant(Integer, "sqlite"), primary_key=True)
    wallet_id: Mapped[int] = mapped_column(ForeignKey("wallets.id"))
    user_id: Mapped[int] = mapped_column(ForeignKey("users.id"))
    kind: Mapped[str] = mapped_column(String(24))
    amount_micros: Mapped[int] = mapped_column(Money)
    balance_after_micros: Mapped[int] = mapped_column(Money)
    ref_type: Mapped[str | None] = mapped_column(String(24), nullable=True)
    ref_id: Mapped[str | None] = mapped_column(String(64), nullable=True)
    actor_id: Mapped[int | None] = mapped_column(ForeignKey("users.id"), nullable=True)
    reason: Mapped[str | None] = mapped_column(String(500), nullable=True)
    created_at: Mapped[datetime] = mapped_column(TZDateTime, default=utcnow)

    __table_args__ = (
        CheckConstraint(
            "kind IN ('voucher_credit','usage_charge','admin_adjust','refund')", name="kind"
        ),
        Index("ix_ledger_wallet_id_desc", "wallet_id", "id"),
    )


class Group(db.Model):
    __tablename__ = "groups"
    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    slug: Mapped[str] = mapped_column(String(40), unique=True)
    name: Mapped[str] = mapped_column(String(80))
    description: Mapped[str] = mapped_column(Text, default="")
    multiplier_ppm: Mapped[int] = mapped_column(BigInteger)
    badge: Mapped[str] = mapped_column(String(16), default="none")
    concurrency_limit: Mapped[int] = mapped_column(Integer, default=10)
    rpm_limit: Mapped[int] = mapped_column(Integer, default=600)
    visible: Mapped[bool] = mapped_column(Boolean, default=True)
    sort_order: Mapped[int] = mapped_column(Integer, default=0)
    created_at: Mapped[datetime] = mapped_column(TZDateTime, default=utcnow)

    __table_args__ = (
        CheckConstraint("multiplier_ppm > 0", name="multiplier_pos"),
        CheckConstraint("badge IN ('recommended','dedicated','none')", name="badge"),
    )

    models: Mapped[list["ModelPrice"]] = relationship(
        secondary="group_models", order_by="ModelPrice.sort_order"
    )


class ModelPrice(db.Model):
    """Official prices: micro-USD per 1M tokens per class, or micro-USD per call."""

    __tablename__ = "model_prices"
    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    name: Mapped[str] = mapped_column(String(100), unique=True)
    provider: Mapped[str] = mapped_column(String(16))  # openai | anthropic
    kind: Mapped[str] = mapped_column(String(16), default="chat")  # chat | embedding
    input_price: Mapped[int] = mapped_column(Money, default=0)
    output_price: Mapped[int] = mapped_column(Money, default=0)
    cache_write_5m_price: Mapped[int | None] = mapped_column(Money, nullable=True)
    cache_write_1h_price: Mapped[int | None] = mapped_column(Money, nullable=True)
    cache_read_price: Mapped[int | None] = mapped_column(Money, nullable=True)
    per_call_price: Mapped[int | None] = mapped_column(Money, nullable=True)
    # A server tool's fee: micro-USD per web search the provider runs for a call (Anthropic's
    # web_search tool, OpenAI's hosted web search), billed on top of the tokens.
    web_search_price: Mapped[int | None] = mapped_column(Money, nullable=True)
    # Long-context tier (pricing.Prices.for_input): above this many input-side tokens the whole
    # call is priced at input-side prices × long_context_input_ppm, output × ..._output_ppm.
    long_context_threshold: Mapped[int | None] = mapped_column(Integer, nullable=True)
    long_context_input_ppm: Mapped[int | None] = mapped_column(BigInteger, nullable=True)
    long_context_output_ppm: Mapped[int | None] = mapped_column(BigInteger, nullable=True)
    # OpenAI processing tiers (pricing.Prices.for_service): every token price × this ratio when
    # the provider served the call at priority or flex; empty: the tier is refused.
    priority_ppm: Mapped[int | None] = mapped_column(BigInteger, nullable=True)
    flex_ppm: Mapped[int | None] = mapped_column(BigInteger, nullable=True)
    max_output_tokens: Mapped[int] = mapped_column(Integer, default=8192)
    context_window: Mapped[int] = mapped_column(Integer, default=128000)
    enabled: Mapped[bool] = mapped_column(Boolean, default=True)
    sort_order: Mapped[int] = mapped_column(Integer, default=0)

    __table_args__ = (
        CheckConstraint(
            "input_price >= 0 AND output_price >= 0 AND max_output_tokens > 0", name="prices"
        ),
    )


class GroupModel(db.Model):
    __tablename__ = "group_models"
    group_id: Mapped[int] = mapped_column(ForeignKey("groups.id", ondelete="CASCADE"), primary_key=True)
    model_id: Mapped[int] = mapped_column(ForeignKey("model_prices.id", ondelete="CASCADE"), primary_key=True)


class ApiKey(db.Model):
    """Only a SHA-256 of the secret and a display prefix are stored."""

    __tablename__ = "api_keys"
    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    user_id: Mapped[int] = mapped_column(ForeignKey("users.id"), index=True)
    name: Mapped[str] = mapped_column(String(80))
    key_hash: Mapped[str] = mapped_column(String(64), unique=True)
    display_prefix: Mapped[str] = mapped_column(String(32))
    group_id: Mapped[int | None] = mapped_column(ForeignKey("groups.id"), nullable=True)
    status: Mapped[str] = mapped_column(String(16), default="active")
    expires_at: Mapped[datetime | None] = mapped_column(TZDateTime, nullable=True)
    spend_limit_micros: Mapped[int | None] = mapped_column(Money, nullable=True)
    spent_micros: Mapped[int] = mapped_column(Money, default=0)
    model_allowlist: Mapped[str] = mapped_column(Text, default="")  # comma-separated
    ip_allowlist: Mapped[str] = mapped_column(Text, default="")  # comma-separated CIDRs
    last_used_at: Mapped[datetime | None] = mapped_column(TZDateTime, nullable=True)
    created_at: Mapped[datetime] = mapped_column(TZDateTime, default=utcnow)
    deleted_at: Mapped[datetime | None] = mapped_column(TZDateTime, nullable=True)

    __table_args__ = (CheckConstraint("status IN ('active','disabled')", name="status"),)

    group: Mapped[Group | None] = relationship()
    user: Mapped[User] = relationship()


class VoucherBatch(db.Model):
    __tablename__ = "voucher_batches"
    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    note: Mapped[str] = mapped_column(String(200), default="")
    face_value_micros: Mapped[int] = mapped_column(Money)
    count: Mapped[int] = mapped_column(Integer)
    expires_at: Mapped[datetime | None] = mapped_column(TZDateTime, nullable=True)
    status: Mapped[str] = mapped_column(String(16), default="active")
    created_by: Mapped[int | None] = mapped_column(ForeignKey("users.id"), nullable=True)
    created_at: Mapped[datetime] = mapped_column(TZDateTime, default=utcnow)

    __table_args__ = (
        CheckConstraint("face_value_micros > 0", name="value_pos"),
        CheckConstraint("status IN ('active','disabled')", name="status"),
    )


class Voucher(db.Model):
    """A code is stored only as its SHA-256 plus the last 4 characters."""

    __tablename__ = "vouchers"
    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    batch_id: Mapped[int] = mapped_column(ForeignKey("voucher_batches.id"), index=True)
    code_hash: Mapped[str] = mapped_column(String(64), unique=True)
    last4: Mapped[str] = mapped_column(String(4))
    value_micros: Mapped[int] = mapped_column(Money)
    redeemed_by: Mapped[int | None] = mapped_column(ForeignKey("users.id"), nullable=True)
    redeemed_at: Mapped[datetime | None] = mapped_column(TZDateTime, nullable=True)

    batch: Mapped[VoucherBatch] = relationship()


class Channel(db.Model):
    """An upstream provider account. The secret is encrypted and never shown again."""

    __tablename__ = "channels"
    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    name: Mapped[str] = mapped_column(String(80), unique=True)
    type: Mapped[str] = mapped_column(String(16))  # openai | anthropic
    base_url: Mapped[str] = mapped_column(String(500))
    secret_enc: Mapped[str] = mapped_column(Text)
    # "model" or "public-name=upstream-name", comma-separated
    models: Mapped[str] = mapped_column(Text, default="")
    groups: Mapped[str] = mapped_column(Text, default="")  # group slugs, comma-separated; empty = all
    priority: Mapped[int] = mapped_column(Integer, default=0)
    weight: Mapped[int] = mapped_column(Integer, default=1)
    status: Mapped[str] = mapped_column(String(16), default="enabled")
    fail_count: Mapped[int] = mapped_column(Integer, default=0)
    last_error: Mapped[str | None] = mapped_column(String(500), nullable=True)
    disabled_until: Mapped[datetime | None] = mapped_column(TZDateTime, nullable=True)
    created_at: Mapped[datetime] = mapped_column(TZDateTime, default=utcnow)

    __table_args__ = (
        CheckConstraint("type IN ('openai','anthropic')", name="type"),
        CheckConstraint("status IN ('enabled','auto_disabled','disabled')", name="status"),
    )


class UsageRecord(db.Model):
    """One per relay request that passed admission. Stores every input of its charge."""

    __tablename__ = "usage_records"
    id: Mapped[int] = mapped_column(BigInteger().with_variant(Integer, "sqlite"), primary_key=True)
    request_id: Mapped[str] = mapped_column(String(40), unique=True)
    user_id: Mapped[int] = mapped_column(ForeignKey("users.id"))
    key_id: Mapped[int | None] = mapped_column(ForeignKey("api_keys.id"), nullable=True)
    group_id: Mapped[int | None] = mapped_column(ForeignKey("groups.id"), nullable=True)
    channel_id: Mapped[int | None] = mapped_column(ForeignKey("channels.id"), nullable=True)
    model: Mapped[str] = mapped_column(String(100))
    endpoint: Mapped[str] = mapped_column(String(40))
    stream: Mapped[bool] = mapped_column(Boolean, default=False)
    # pending → ok | failed | partial ; usage_source: upstream | estimated
    status: Mapped[str] = mapped_column(String(16), default="pending")
    usage_source: Mapped[str] = mapped_column(String(16), default="upstream")
    input_tokens: Mapped[int] = mapped_column(Integer, default=0)
    output_tokens: Mapped[int] = mapped_column(Integer, default=0)
    cache_write_5m_tokens: Mapped[int] = mapped_column(Integer, default=0)
    cache_write_1h_tokens: Mapped[int] = mapped_column(Integer, default=0)
    cache_read_tokens: Mapped[int] = mapped_column(Integer, default=0)
    web_searches: Mapped[int] = mapped_column(Integer, default=0, server_default="0")
    # Unit prices (micro-USD per 1M tokens / per call) and multiplier used, so anyone can
    # recompute the charge from the row alone.
    input_price: Mapped[int] = mapped_column(Money, default=0)
    output_price: Mapped[int] = mapped_column(Money, default=0)
    cache_write_5m_price: Mapped[int] = mapped_column(Money, default=0)
    cache_write_1h_price: Mapped[int] = mapped_column(Money, default=0)
    cache_read_price: Mapped[int] = mapped_column(Money, default=0)
    per_call_price: Mapped[int] = mapped_column(Money, default=0)
    web_search_price: Mapped[int] = mapped_column(Money, default=0, server_default="0")
    # The priced processing tier the provider reported serving (pricing.Prices.tier_served):
    # '' standard, or priority / fast / flex, whose ratio the token prices above include.
    service_tier: Mapped[str] = mapped_column(String(16), default="", server_default="")
    multiplier_ppm: Mapped[int] = mapped_column(BigInteger)
    official_cost_pico: Mapped[int] = mapped_column(Money, default=0)
    charge_micros: Mapped[int] = mapped_column(Money, default=0)
    hold_micros: Mapped[int] = mapped_column(Money, default=0)
    latency_ms: Mapped[int | None] = mapped_column(Integer, nullable=True)
    ttfb_ms: Mapped[int | None] = mapped_column(Integer, nullable=True)
    attempts: Mapped[int] = mapped_column(Integer, default=0)
    upstream_request_id: Mapped[str | None] = mapped_column(String(100), nullable=True)
    error: Mapped[str | None] = mapped_column(String(500), nullable=True)
    client_ip: Mapped[str | None] = mapped_column(String(64), nullable=True)
    # Progress checkpoint for the reconciler (characters of output delivered so far).
    delivered_chars: Mapped[int] = mapped_column(Integer, default=0)
    created_at: Mapped[datetime] = mapped_column(TZDateTime, default=utcnow)
    deadline_at: Mapped[datetime] = mapped_column(TZDateTime)
    settled_at: Mapped[datetime | None] = mapped_column(TZDateTime, nullable=True)

    __table_args__ = (
        CheckConstraint("status IN ('pending','ok','failed','partial')", name="status"),
        CheckConstraint("usage_source IN ('upstream','estimated')", name="usage_source"),
        CheckConstraint("charge_micros >= 0 AND hold_micros >= 0", name="amounts"),
        Index("ix_usage_pending", "status", "deadline_at"),
        # Usage pages: keyset by (created_at, id) newest first, per user, optionally narrowed
        # by one filter column; a time range is a range on created_at in the same index.
        Index("ix_usage_user_time", "user_id", "created_at", "id"),
        Index("ix_usage_user_key_time", "user_id", "key_id", "created_at", "id"),
        Index("ix_usage_user_model_time", "user_id", "model", "created_at", "id"),
        Index("ix_usage_user_group_time", "user_id", "group_id", "created_at", "id"),
        Index("ix_usage_user_status_time", "user_id", "status", "created_at", "id"),
        Index("ix_usage_user_estimated_time", "user_id", "created_at", "id",
              sqlite_where=text("usage_source = 'estimated'"),
              postgresql_where=text("usage_source = 'estimated'")),
        # Group cards: the last 24 h of every group, read from the index alone.
        Index("ix_usage_recent_stats", "created_at", "group_id", "status", "latency_ms", "ttfb_ms"),
    )


class RelayInflight(db.Model):
    """A relay call between its admission and its settle: one row per pending usage record,
    written and removed in the same transactions as the record's status. The admission's limits
    (calls in flight per user and group, open holds per key) count these rows. Counting pending
    usage records instead walks, on PostgreSQL, one dead index entry per call settled since the
    last vacuum of that large table; this table stays as small as the number of calls in flight."""

    __tablename__ = "relay_inflight"
    record_id: Mapped[int] = mapped_column(BigInteger().with_variant(Integer, "sqlite"),
                                           ForeignKey("usage_records.id"), primary_key=True)
    user_id: Mapped[int] = mapped_column(Integer)
    group_id: Mapped[int | None] = mapped_column(Integer, nullable=True)
    key_id: Mapped[int | None] = mapped_column(Integer, nullable=True)
    hold_micros: Mapped[int] = mapped_column(Money, default=0)

    __table_args__ = (
        Index("ix_inflight_user_group", "user_id", "group_id"),
        Index("ix_inflight_key", "key_id"),
    )


class UsageDaily(db.Model):
    """Per user, day (UTC), key and model: settled calls, tokens and credits of closed days.

    A derived rollup of usage_records, filled by console/usage.py for days that can no longer
    change, so summaries and charts never scan a user's whole history.
    """

    __tablename__ = "usage_daily"
    user_id: Mapped[int] = mapped_column(ForeignKey("users.id"), primary_key=True)
    day: Mapped[date] = mapped_column(Date, primary_key=True)
    key_id: Mapped[int] = mapped_column(Integer, primary_key=True)  # 0 = no key
    model: Mapped[str] = mapped_column(String(100), primary_key=True)
    calls: Mapped[int] = mapped_column(BigInteger, default=0)
    tokens: Mapped[int] = mapped_column(BigInteger, default=0)
    charge_micros: Mapped[int] = mapped_column(Money, default=0)


class UsageRollupMark(db.Model):
    """How far usage_daily is complete for a user: every day up to closed_through, inclusive."""

    __tablename__ = "usage_rollup_marks"
    user_id: Mapped[int] = mapped_column(ForeignKey("users.id"), primary_key=True)
    closed_through: Mapped[date] = mapped_column(Date)


class AuditLog(db.Model):
    """Append-only: every staff action and every auth event."""

    __tablename__ = "audit_log"
    id: Mapped[int] = mapped_column(BigInteger().with_variant(Integer, "sqlite"), primary_key=True)
    actor_id: Mapped[int | None] = mapped_column(ForeignKey("users.id"), nullable=True)
    action: Mapped[str] = mapped_column(String(40))
    target_type: Mapped[str | None] = mapped_column(String(24), nullable=True)
    target_id: Mapped[str | None] = mapped_column(String(64), nullable=True)
    before: Mapped[str | None] = mapped_column(Text, nullable=True)
    after: Mapped[str | None] = mapped_column(Text, nullable=True)
    ip: Mapped[str | None] = mapped_column(String(64), nullable=True)
    user_agent: Mapped[str | None] = mapped_column(String(300), nullable=True)
    created_at: Mapped[datetime] = mapped_column(TZDateTime, default=utcnow)


class FaqEntry(db.Model):
    __tablename__ = "faq_entries"
    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    slug: Mapped[str] = mapped_column(String(80), unique=True)
    question: Mapped[str] = mapped_column(String(300))
    answer_md: Mapped[str] = mapped_column(Text)
    sort_order: Mapped[int] = mapped_column(Integer, default=0)
    published: Mapped[bool] = mapped_column(Boolean, default=True)
    updated_at: Mapped[datetime] = mapped_column(TZDateTime, default=utcnow)


class SiteSetting(db.Model):
    __tablename__ = "site_settings"
    key: Mapped[str] = mapped_column(String(64), primary_key=True)
    value: Mapped[str] = mapped_column(Text)


# ---- append-only enforcement in the database ------------------------------------------

APPEND_ONLY_TABLES = ("ledger_entries", "audit_log")


def append_only_sql(dialect: str, table: str) -> list[str]:
    """DDL that makes UPDATE and DELETE on `table` fail, on SQLite and PostgreSQL."""
    if dialect == "sqlite":
        return [
            f"CREATE TRIGGER {table}_no_update BEFORE UPDATE ON {table} "
            f"BEGIN SELECT RAISE(ABORT, '{table} is append-only'); END",
            f"CREATE TRIGGER {table}_no_delete BEFORE DELETE ON {table} "
            f"BEGIN SELECT RAISE(ABORT, '{table} is append-only'); END",
        ]
    if dialect == "postgresql":
        return [
            "CREATE OR REPLACE FUNCTION reject_change() RETURNS trigger LANGUAGE plpgsql AS "
            "$$ BEGIN RAISE EXCEPTION '% is append-only', TG_TABLE_NAME; END $$",
            f"CREATE TRIGGER {table}_append_only BEFORE UPDATE OR DELETE ON {table} "
            f"FOR EACH ROW EXECUTE FUNCTION reject_change()",
            # TRUNCATE bypasses row triggers.
            f"CREATE TRIGGER {table}_no_truncate BEFORE TRUNCATE ON {table} "
            f"FOR EACH STATEMENT EXECUTE FUNCTION reject_change()",
        ]
    return []


def _attach_append_only(table) -> None:
    for dialect in ("sqlite", "postgresql"):
        for stmt in append_only_sql(dialect, table.name):
            # DDL() applies %-formatting to its text.
            event.listen(table, "after_create", DDL(stmt.replace("%", "%%")).execute_if(dialect=dialect))


for _t in APPEND_ONLY_TABLES:
    _attach_append_only(db.metadata.tables[_t])


# ---- PostgreSQL: the relay admission's locked counts --------------------------------------
# One statement admits a relay call on PostgreSQL (relay.metering). Its concurrency and spend
# checks must count the in-flight rows committed up to the moment the user's wallet is
# locked, but a statement reads one snapshot taken when it starts, before any lock it waits
# for. A VOLATILE function takes a fresh snapshot for each query it runs, so this one locks the
# wallet first and then counts: the caller's statement stays a single round trip.
# Its queries run with generic plans: with the default plan_cache_mode PostgreSQL re-planned
# them on every call (p_key is NULL for a key without a spend limit, which a custom plan folds
# away, so the custom plan always looked cheaper): 9 % of the server's samples went to
# planning, and the server's CPU per relay call falls by ~7 % without it (bench/README.md,
# finding 22).

RELAY_ADMISSION_COUNTS_SQL = """\
CREATE OR REPLACE FUNCTION relay_admission_counts(p_user bigint, p_group bigint, p_key bigint,
                                                  p_async boolean)
RETURNS TABLE (in_flight bigint, key_committed bigint)
LANGUAGE plpgsql VOLATILE
SET plan_cache_mode = force_generic_plan
AS $$
BEGIN
  IF p_async THEN
    PERFORM set_config('synchronous_commit', 'off', true);
  END IF;
  PERFORM 1 FROM wallets WHERE user_id = p_user FOR UPDATE;
  RETURN QUERY SELECT
    (SELECT count(*) FROM relay_inflight WHERE user_id = p_user AND group_id = p_group),
    (SELECT k.spent_micros + COALESCE((SELECT sum(i.hold_micros) FROM relay_inflight i
                                        WHERE i.key_id = p_key), 0)::bigint
     FROM api_keys k WHERE k.id = p_key);
END
$$"""

event.listen(db.metadata.tables["usage_records"], "after_create",
             DDL(RELAY_ADMISSION_COUNTS_SQL.replace("%", "%%")).execute_if(dialect="postgresql"))
