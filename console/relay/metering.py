"""Billing of relay calls: estimate → admit (reserve) → settle, the reconciler, rate limits.

Billing policy (the FAQ explains it to users; tests check it row by row):

| what happened                                   | charged                                     | status / source      |
|-------------------------------------------------|---------------------------------------------|----------------------|
| upstream succeeded and reported usage           | exactly that usage                          | ok / upstream        |
| upstream failed before any output reached the   | nothing (the record is kept)                | failed / upstream    |
|   client, after retries (incl. 4xx, deadline)   |                                             |                      |
| client disconnected mid-stream                  | input (exact if the upstream already        | partial / estimated  |
|                                                 |   reported it, else estimated) + output     |                      |
|                                                 |   delivered so far (estimated) + the web    |                      |
|                                                 |   searches whose call or results it got     |                      |
| upstream broke mid-stream (reset, deadline)     | same as a client disconnect                 | partial / estimated  |
| stream or reply ended without usage (or with a  | estimated from the request and the text     | ok / estimated       |
|   count beyond protocols.MAX_REPORTED_TOKENS)   |   delivered, + the web searches it shows    |                      |
| worker crashed mid-call                         | reconciler, after the deadline: estimated   | partial / estimated  |
|                                                 |   input + output and web searches           |                      |
|                                                 |   checkpointed so far                       |                      |

Estimates: output tokens = max(deltas delivered, ⌈characters delivered / 4⌉); input tokens =
⌈characters of the request's text / 4⌉ + 1,000 per image or file part.

The hold (admission reserve) is an upper bound of the call's charge, priced with
pricing.max_charge(): input ≤ UTF-8 bytes of every string in the request (a token is at
least one byte) + 4 per JSON object + 64, + 8,000 per image and the whole context window per
document part, capped at the model's context window; output = the request's max_tokens /
max_completion_tokens / max_output_tokens (× n) capped at the model's max_output_tokens,
or that cap when the request sets none; web searches = the max_uses of each server-side web
search tool, or SEARCH_HOLD_USES for one without, within max_tool_calls (see _search_bound);
a request allowing Anthropic's server-side compaction holds the input twice and one more
output cap (the compaction pass, billed from usage.iterations). Every input token is priced
at the dearest input class. The settle charges the actual usage even if it exceeds the hold (the upstream
already served it), so the overdraft bound is zero as long as the model's max_output_tokens is
the upstream's real cap and a search tool without max_uses runs at most SEARCH_HOLD_USES;
otherwise it is at most (actual − hold) per call.

Admission is ONE write transaction: re-read the caller's key and refuse (StaleKey) unless
it is unchanged and usable (auth.py: the key may come from the process's cache), hold
(conditional UPDATE; 402 when available < hold), then — with the wallet row locked
(PostgreSQL) or the write lock held (SQLite) — count the
user's calls in flight in the group against the group's concurrency limit (429), check the
key's spend limit (spent + open holds + this hold), and insert the pending record and its
`relay_inflight` row (the small table those two checks count; models.RelayInflight). Settle
is a conditional `UPDATE … WHERE status='pending'` plus the in-flight row's removal and
ledger.settle() in one transaction, so a call is settled exactly once, whoever (worker or
reconciler) gets there first.

On SQLite the admissions, settles and checkpoints of one worker process that arrive together
share one transaction (database.GroupCommit), each in its own savepoint: a page that every call
dirties is written to the WAL once per batch, and the write lock is taken once.

On PostgreSQL each is a single statement that locks the user's wallet itself — the settle a
data-modifying CTE, the admission one checked statement — run alone in autocommit; the
statements of one worker that arrive together share one transaction that locks their wallets
first, sent as one pipeline: one network round trip and one commit per batch
(database.PgGroupCommit; see _admit_pg and _settle_pg).
"""
from __future__ import annotations

import math
import secrets
import time
from dataclasses import dataclass, field
from datetime import timedelta

from flask import current_app
from limits import RateLimitItemPerMinute
from limits.errors import StorageError
from limits.storage import MemoryStorage, storage_from_string
from limits.strategies import SlidingWindowCounterRateLimiter
from sqlalchemy import bindparam, delete, func, insert, select, update
from sqlalchemy.exc import TimeoutError as PoolTimeout

from console import keys, ledger, rate_storage_options
from console.database import DatabaseBusy, GroupCommit, PgGroupCommit, Prepared, raw_tx
from console.extensions import db
from console.models import ApiKey, ModelPrice, RelayInflight, UsageRecord, utcnow
from console.money import MICROS
from console.pricing import Prices, Tokens, max_charge, quote
from console.relay.auth import Caller, ModelInfo
from console.relay.errors import RelayError
from console.relay.protocols import estimate_output_tokens

IMAGE_TYPES = frozenset({"image", "image_url", "input_image"})
FILE_TYPES = frozenset({"document", "file", "input_file", "input_audio", "audio"})
IMAGE_HOLD_TOKENS = 8_000
MEDIA_ESTIMATE_TOKENS = 1_000
MAX_OUTPUT_FIELDS = ("max_completion_tokens", "max_tokens", "max_output_tokens")
# Searches held for each web search tool a request offers without max_uses (OpenAI's tool has
# no such field): the settle bills the searches actually run, even beyond the hold.
SEARCH_HOLD_USES = 10
MAX_USES_LIMIT = 10_000


def new_request_id() -> str:
    return "req_" + secrets.token_hex(12)


# ---- estimates ----------------------------------------------------------------------------

@dataclass(frozen=True)
class Estimate:
    """What the request tells us about its size, before any upstream call."""

    text_bytes: int
    text_chars: int
    objects: int
    images: int
    files: int
    requested_output: int | None
    n: int
    web_searches: int = 0  # the most the request's web search tools may run
    service_tier: str = ""  # the processing tier the request asks for (OpenAI), "fast" for fast mode
    # Anthropic server-side compaction may run: one more pass of the model over the whole
    # prompt, writing a summary of up to the model's output cap (billed outside the top-level usage).
    compaction: bool = False

    def input_hold_tokens(self, model: ModelInfo) -> int:
        bound = (self.text_bytes + 4 * self.objects + 64 + IMAGE_HOLD_TOKENS * self.images
                 + model.context_window * self.files)
        return min(bound, model.context_window) * (2 if self.compaction else 1)

    def output_hold_tokens(self, model: ModelInfo) -> int:
        if model.kind == "embedding":
            return 0
        per_choice = model.max_output_tokens
        if self.requested_output is not None:
            per_choice = min(self.requested_output, model.max_output_tokens)
        return per_choice * self.n + (model.max_output_tokens if self.compaction else 0)

    def input_tokens(self) -> int:
        """Best guess of the input (billing when the upstream reported none)."""
        return math.ceil(self.text_chars / 4) + MEDIA_ESTIMATE_TOKENS * (self.images + self.files)


def _positive_int(body: dict, name: str, upper: int) -> int | None:
    v = body.get(name)
    if v is None:
        return None
    if not isinstance(v, int) or isinstance(v, bool) or not 1 <= v <= upper:
        raise RelayError(400, f"'{name}' must be an integer between 1 and {upper}.", code="invalid_value")
    return v


def estimate(body: dict) -> Estimate:
    """Walk the body without recursion (a deeply nested body cannot blow the stack)."""
    text_bytes = text_chars = objects = images = files = 0
    stack: list = [body]
    while stack:
        node = stack.pop()
        if isinstance(node, str):
            text_chars += len(node)
            # ASCII (most of a request) is a byte per character: no copy to count it.
            text_bytes += len(node) if node.isascii() else len(node.encode("utf-8", "surrogatepass"))
        elif isinstance(node, dict):
            objects += 1
            kind = node.get("type")
            if not isinstance(kind, str):  # a JSON schema's "type" may be a list
                kind = None
            if kind in IMAGE_TYPES:
                images += 1
                continue
            if kind in FILE_TYPES:
                files += 1
                continue
            stack.extend(node.values())
        elif isinstance(node, list):
            stack.extend(node)
    requested = None
    for name in MAX_OUTPUT_FIELDS:
        v = _positive_int(body, name, 10_000_000)
        if v is not None:
            requested = v if requested is None else max(requested, v)
    n = _positive_int(body, "n", 128) or 1
    tier = "fast" if body.get("speed") == "fast" else body.get("service_tier")  # Anthropic's speed
    cm = body.get("context_management")
    edits = cm.get("edits") if isinstance(cm, dict) else None
    compaction = any(isinstance(e, dict) and isinstance(e.get("type"), str) and e["type"].startswith("compact")
                     for e in (edits if isinstance(edits, list) else ()))
    return Estimate(text_bytes, text_chars, objects, images, files, requested, n, _search_bound(body),
                    tier if isinstance(tier, str) else "", compaction)


def _count_field(obj: dict, name: str) -> int | None:
    """A whole number from 0 to MAX_USES_LIMIT, else None (the upstream judges other values)."""
    v = obj.get(name)
    return v if isinstance(v, int) and not isinstance(v, bool) and 0 <= v <= MAX_USES_LIMIT else None


def _search_bound(body: dict) -> int:
    """Searches the request's server-side web search tools may run: Anthropic's
    `web_search_<version>` with its `max_uses`, OpenAI's `web_search[_preview][_<version>]`
    (no limit of its own), all within the Responses API's `max_tool_calls` when set. A tool
    without a limit counts as `max_tool_calls`, or SEARCH_HOLD_USES."""
    all_calls = _count_field(body, "max_tool_calls")
    bound = 0
    tools = body.get("tools")
    for tool in tools if isinstance(tools, list) else ():
        kind = tool.get("type") if isinstance(tool, dict) else None
        if isinstance(kind, str) and kind.startswith("web_search"):
            uses = _count_field(tool, "max_uses")
            bound += uses if uses is not None else SEARCH_HOLD_USES if all_calls is None else all_calls
    return bound if all_calls is None else min(bound, all_calls)


# ---- rate limits --------------------------------------------------------------------------

STORAGE_RETRY_S = 10.0  # after the shared limit storage failed, count locally this long


class SweptMemoryStorage(MemoryStorage):
    """limits' in-memory storage, its expiry sweep run inline at most once per SWEEP_EVERY_S.

    The stock storage starts a timer thread 10 ms after a hit whenever none is running: up to
    100 thread starts a second per worker, each ~0.5 ms of CPU under gevent, where a thread is
    a greenlet (bench/README.md, finding 19). Counters expire on read either way; the sweep
    only frees the counters of keys that stopped calling. limits is pinned (pyproject.toml):
    the hook below is the stock storage's private method, and a test checks it is still used."""

    SWEEP_EVERY_S = 1.0
    _next_sweep = 0.0

    def _MemoryStorage__schedule_expiry(self) -> None:  # replaces the timer start
        now = time.monotonic()
        if now >= self._next_sweep:
            self._next_sweep = now + self.SWEEP_EVERY_S
            self._MemoryStorage__expire_events()


def _storage(uri: str, **options):
    if uri.startswith("memory://"):
        return SweptMemoryStorage(uri, **options)
    return storage_from_string(uri, **options, **rate_storage_options(uri))


def _limiter() -> SlidingWindowCounterRateLimiter:
    """The shared limiter (Redis when configured), or this process's in-memory one while the
    shared storage is failing."""
    ext = current_app._get_current_object().extensions
    if ext.get("relay_limiter_down_until", 0.0) > time.monotonic():
        return _local_limiter()
    lim = ext.get("relay_limiter")
    if lim is None:
        uri = current_app.config["RATELIMIT_STORAGE_URI"]
        lim = ext["relay_limiter"] = SlidingWindowCounterRateLimiter(_storage(uri, wrap_exceptions=True))
    return lim


def _local_limiter() -> SlidingWindowCounterRateLimiter:
    ext = current_app._get_current_object().extensions
    lim = ext.get("relay_limiter_local")
    if lim is None:
        lim = ext["relay_limiter_local"] = SlidingWindowCounterRateLimiter(_storage("memory://"))
    return lim


def check_rate(caller: Caller) -> None:
    """The group's requests per minute, per key, in a sliding window shared by all workers
    (and hosts, when the storage is Redis). The sliding-window counter keeps two counters per
    key, so its cost does not grow with the limit (a moving window stores every hit).

    A Redis outage must not take the relay down with it: while the shared storage fails, each
    worker counts in its own memory (the limit then holds per worker, as without Redis) and
    tries the shared storage again after STORAGE_RETRY_S. Calls in flight are limited in the
    database either way."""
    if caller.group.rpm_limit <= 0:
        return
    item = RateLimitItemPerMinute(caller.group.rpm_limit)
    prefix = current_app.config.get("RATELIMIT_KEY_PREFIX", "relay")
    ids = (prefix, "relay-rpm", str(caller.key_id))
    lim = _limiter()
    try:
        allowed = lim.hit(item, *ids)
    except StorageError as exc:
        current_app.extensions["relay_limiter_down_until"] = time.monotonic() + STORAGE_RETRY_S
        current_app.logger.warning("rate-limit storage failed (%s); counting in this worker for %.0f s",
                                   type(exc.storage_error).__name__, STORAGE_RETRY_S)
        lim = _local_limiter()
        allowed = lim.hit(item, *ids)
    if not allowed:
        try:
            retry = max(1, math.ceil(lim.get_window_stats(item, *ids).reset_time - time.time()))
        except StorageError:
            retry = 60
        raise RelayError(429, f"Rate limit of {caller.group.rpm_limit} requests per minute reached.",
                         code="rate_limit_exceeded", headers={"Retry-After": str(retry)})


# ---- hot-path statements ----------------------------------------------------------------------
# Core statements compiled once per dialect and run on a raw DBAPI transaction (database.raw_tx):
# a relay call runs each of these once, where SQLAlchemy's execution layer would cost more
# than the statements themselves.
_U = UsageRecord.__table__
_K = ApiKey.__table__
_I = RelayInflight.__table__
_IN_FLIGHT = Prepared(select(func.count()).select_from(_I).where(
    _I.c.user_id == bindparam("p_user"), _I.c.group_id == bindparam("p_group")))
_KEY_COMMITTED = Prepared(select(
    _K.c.spent_micros,
    select(func.coalesce(func.sum(_I.c.hold_micros), 0)).where(_I.c.key_id == bindparam("p_key")).scalar_subquery(),
).where(_K.c.id == bindparam("p_key")))
_INSERT_PENDING = Prepared(insert(_U).returning(_U.c.id))
_INSERT_INFLIGHT = Prepared(insert(_I))
_DELETE_INFLIGHT = Prepared(delete(_I).where(_I.c.record_id == bindparam("p_id")))
# The token prices too: a long-context tier (pricing.Prices.for_input) is known only at settle.
_SETTLED_COLUMNS = ("status", "usage_source", "input_tokens", "output_tokens", "cache_write_5m_tokens",
                    "cache_write_1h_tokens", "cache_read_tokens", "web_searches", "input_price",
                    "output_price", "cache_write_5m_price", "cache_write_1h_price", "cache_read_price",
                    "official_cost_pico", "charge_micros", "latency_ms", "ttfb_ms", "attempts", "channel_id",
                    "upstream_request_id", "error", "delivered_chars", "settled_at", "service_tier")
_SETTLE_RECORD = Prepared(update(_U).where(_U.c.id == bindparam("p_id"), _U.c.status == "pending")
                          .values({c: bindparam(c, type_=_U.c[c].type) for c in _SETTLED_COLUMNS})
                          .returning(_U.c.id))
_KEY_SPENT = Prepared(update(_K).where(_K.c.id == bindparam("p_key"))
                      .values(spent_micros=_K.c.spent_micros + bindparam("p_charge"),
                              last_used_at=bindparam("p_now", type_=_K.c.last_used_at.type)))
_CHECKPOINT = Prepared(update(_U).where(_U.c.id == bindparam("p_id"), _U.c.status == "pending")
                       .values(delivered_chars=bindparam("delivered_chars"),
                               web_searches=bindparam("web_searches"),
                               service_tier=bindparam("service_tier")))


# ---- admission ----------------------------------------------------------------------------

@dataclass(frozen=True)
class Admission:
    """A pending call: everything settle() needs, so no ORM object outlives the transaction."""

    record_id: int
    request_id: str
    user_id: int
    key_id: int | None
    hold_micros: int
    prices: Prices
    multiplier_ppm: int
    est_input_tokens: int
    started: float = field(default_factory=time.monotonic)


def admit(caller: Caller, model: ModelInfo, *, request_id: str, endpoint: str, stream: bool,
          est: Estimate, client_ip: str | None) -> Admission:
    bound = (model.prices, caller.group.multiplier_ppm, est.input_hold_tokens(model), est.output_hold_tokens(model),
             est.web_searches)
    hold = max_charge(*bound)
    if est.service_tier:  # served at the tier asked for, or at the standard one if it is unavailable
        hold = max(hold, max_charge(*bound, est.service_tier))
    cfg = current_app.config
    now = utcnow()
    deadline = now + timedelta(seconds=cfg["RELAY_TOTAL_DEADLINE_S"] + cfg["RECONCILE_GRACE_S"])
    try:
        adm = _admit(caller, model, hold, now, deadline, request_id=request_id, endpoint=endpoint,
                     stream=stream, est=est, client_ip=client_ip)
        _OpenCalls.n += 1
        return adm
    except (DatabaseBusy, PoolTimeout):
        # Nothing was written; the client may retry (OpenAI and Anthropic SDKs do on 503).
        raise RelayError(503, "The service is busy; retry in a moment.", code="overloaded",
                         headers={"Retry-After": "1"}) from None


def _admit(caller: Caller, model: ModelInfo, hold: int, now, deadline, *, request_id: str, endpoint: str,
           stream: bool, est: Estimate, client_ip: str | None) -> Admission:
    prices, mult = model.prices, caller.group.multiplier_ppm
    row = {
        "request_id": request_id, "user_id": caller.user_id, "key_id": caller.key_id,
        "group_id": caller.group.id, "model": model.name, "endpoint": endpoint, "stream": stream,
        "status": "pending", "usage_source": "estimated",
        # Until settled, input_tokens holds the best estimate (the reconciler bills it).
        "input_tokens": est.input_tokens(),
        "input_price": prices.input, "output_price": prices.output,
        "cache_write_5m_price": prices.cache_write_5m, "cache_write_1h_price": prices.cache_write_1h,
        "cache_read_price": prices.cache_read, "per_call_price": prices.per_call,
        "web_search_price": prices.web_search, "multiplier_ppm": mult, "hold_micros": hold,
        "client_ip": client_ip, "created_at": now, "deadline_at": deadline,
    }
    if db.engine.dialect.name == "postgresql":
        rid = _admit_pg(caller, hold, now, row)
        return Admission(rid, request_id, caller.user_id, caller.key_id, hold, prices, mult, est.input_tokens())
    def job(tx):
        if not keys.relay_key_current(tx, caller.key):
            raise StaleKey()
        if hold:
            ledger.hold(caller.user_id, hold, tx=tx)
        # The write lock is held: the counts below cannot race another admission of this user.
        in_flight = tx.scalar(_IN_FLIGHT, {"p_user": caller.user_id, "p_group": caller.group.id})
        if in_flight >= caller.group.concurrency_limit:
            raise _concurrency_refused(caller)
        if caller.spend_limit_micros is not None:
            spent, open_holds = tx.first(_KEY_COMMITTED, {"p_key": caller.key_id})
            if (spent or 0) + (open_holds or 0) + hold > caller.spend_limit_micros:
                raise _KeySpendLimit()
        rid = tx.scalar(_INSERT_PENDING, row)
        tx.execute(_INSERT_INFLIGHT, {"record_id": rid, "user_id": caller.user_id, "group_id": caller.group.id,
                                      "key_id": caller.key_id, "hold_micros": hold})
        return rid

    # Not synced to disk on commit: a machine crash can lose this admission whole (hold and
    # pending record together), never a ledger entry; the settle's durable commit syncs it.
    try:
        rid = group_commit().run(job, durable=False)
    except ledger.InsufficientFunds as exc:
        raise InsufficientBalance(exc.available_micros or 0, hold) from None
    return Admission(rid, request_id, caller.user_id, caller.key_id, hold, prices, mult,
                     est.input_tokens())


class _OpenCalls:
    """Calls of this process between admission and settle. A hint for the SQLite group commit
    only: with other calls open, a settle's fsync is waited for off the event loop."""

    n = 0


def group_commit() -> GroupCommit:
    """This process's group commit for relay writes: on SQLite jobs are functions of the
    transaction, on PostgreSQL single statements run after locking their user's wallet
    (see database.GroupCommit, database.PgGroupCommit)."""
    ext = current_app.extensions
    gc = ext.get("relay_group_commit")
    if gc is None:
        pg = db.engine.dialect.name == "postgresql"
        gc = ext["relay_group_commit"] = (PgGroupCommit(ledger.PG_LOCK_WALLETS) if pg
                                          else GroupCommit(busy=lambda: _OpenCalls.n > 1))
    return gc


def _concurrency_refused(caller: Caller) -> RelayError:
    return RelayError(429, f"Concurrency limit of {caller.group.concurrency_limit} calls in flight "
                           "reached for your group.", code="concurrency_limit_exceeded",
                      headers={"Retry-After": "1"})


class StaleKey(Exception):
    """The key read before admission changed or stopped being usable before it: nothing was
    written; the caller reads the key afresh and decides again (never shown to a client)."""


class _KeySpendLimit(RelayError):
    def __init__(self):
        super().__init__(402, "This key's spend limit is reached.", code="key_spend_limit")


# PostgreSQL: the admission above as ONE statement. relay_admission_counts() (models.py) locks
# the user's wallet and then counts with a snapshot taken after the lock, so the counts see
# every admission committed before it; `kv` re-reads the key (keys.PG_KEY_UNCHANGED); the
# hold happens only if every check passes, and the
# pending record only if the hold happened. The row it returns says which check refused.
# Pending-record columns are cast to their column types (parameters in an INSERT … SELECT list
# would otherwise be typed as text). Alone it runs in autocommit: one round trip, committed
# without waiting for the WAL flush when async_commit is true (see database.PgGroupCommit).
_PG_CHECKS = """
kv""" + keys.PG_KEY_UNCHANGED + """,
c AS (SELECT in_flight, key_committed
      FROM relay_admission_counts(%(p_user)s, %(p_group)s, %(p_limited_key)s, %(async_commit)s)),
n AS (SELECT in_flight AS c FROM c),
ks AS (SELECT key_committed AS c FROM c)"""
_PG_CONDITION = ("EXISTS (SELECT 1 FROM kv) AND (SELECT c FROM n) < %(p_limit)s AND (%(p_spend_limit)s::bigint IS NULL"
                 " OR (SELECT c FROM ks) + %(p_hold)s <= %(p_spend_limit)s)")
_PG_ADMIT: dict[tuple, str] = {}


def _pg_admit_sql(columns: tuple[str, ...]) -> str:
    sql = _PG_ADMIT.get(columns)
    if sql is None:
        from sqlalchemy.dialects import postgresql

        pg = postgresql.dialect()
        values = ", ".join(f"%({c})s::{_U.c[c].type.compile(dialect=pg)}" for c in columns)
        sql = _PG_ADMIT[columns] = (
            "WITH" + _PG_CHECKS + "," + ledger.PG_HOLD_CTE.format(condition=_PG_CONDITION) + ",\n"
            f"ins AS (INSERT INTO usage_records ({', '.join(columns)}) SELECT {values}"
            " WHERE EXISTS (SELECT 1 FROM h) RETURNING id),\n"
            "inf AS (INSERT INTO relay_inflight (record_id, user_id, group_id, key_id, hold_micros)"
            " SELECT id, %(p_user)s, %(p_group)s, %(p_key)s, %(p_hold)s FROM ins)\n"
            "SELECT (SELECT id FROM ins), (SELECT c FROM n), (SELECT c FROM ks),"
            " (SELECT balance_micros - held_micros FROM wallets WHERE user_id = %(p_user)s),"
            " EXISTS (SELECT 1 FROM kv)")
    return sql


# Columns a pending record leaves to their constant defaults, written explicitly on PostgreSQL.
_PENDING_DEFAULTS = {c.name: c.default.arg for c in _U.columns if c.default is not None and c.default.is_scalar}


def _admit_pg(caller: Caller, hold: int, now, row: dict) -> int:
    full = {**{k: v for k, v in _PENDING_DEFAULTS.items() if k not in row}, **row}
    params = {**full, "p_user": caller.user_id, "p_group": caller.group.id, "p_key": caller.key_id,
              "p_hold": hold, "p_now": now, "p_limit": caller.group.concurrency_limit,
              "p_spend_limit": caller.spend_limit_micros,
              # The key's open holds are summed only when it has a spend limit to check.
              "p_limited_key": caller.key_id if caller.spend_limit_micros is not None else None,
              **keys.pg_key_params(caller.key)}
    found = group_commit().run((_pg_admit_sql(tuple(full)), params, caller.user_id), durable=False)
    rid, in_flight, _key_committed, available, key_current = found
    if rid is not None:
        return rid
    if not key_current:
        raise StaleKey()
    if available is None:
        raise ledger.NoWallet()
    if hold and available < hold:
        raise InsufficientBalance(available, hold)
    if in_flight >= caller.group.concurrency_limit:
        raise _concurrency_refused(caller)
    raise _KeySpendLimit()


class InsufficientBalance(RelayError):
    def __init__(self, available: int, needed: int):
        from flask import has_request_context, url_for

        from console.money import format_fixed

        wallet = url_for("wallet.index", _external=True) if has_request_context() else "/wallet/"
        super().__init__(
            402, f"Insufficient balance: {format_fixed(max(available, 0))} credits available, this "
                 f"call may cost up to {format_fixed(needed)}. Top up at {wallet}",
            code="insufficient_balance",
            extra={"available_credits": format_fixed(available), "required_credits": format_fixed(needed),
                   "wallet_url": wallet})


# ---- settle -------------------------------------------------------------------------------

@dataclass
class Outcome:
    status: str                      # ok | failed | partial
    usage_source: str = "upstream"   # upstream | estimated
    tokens: Tokens = field(default_factory=Tokens)
    latency_ms: int | None = None
    ttfb_ms: int | None = None
    attempts: int = 0
    channel_id: int | None = None
    upstream_request_id: str | None = None
    error: str | None = None
    delivered_chars: int = 0


def settle(adm: Admission, out: Outcome) -> bool:
    """Charge the outcome and release the hold, exactly once. False if already settled.
    For an admission of this process (admit()); the reconciler settles through _settle()."""
    try:
        return _settle(adm, out)
    finally:
        _OpenCalls.n -= 1


def _settle(adm: Admission, out: Outcome) -> bool:
    q = quote(out.tokens, adm.prices, adm.multiplier_ppm) if out.status != "failed" else None
    charge = q.charge_micros if q else 0
    official = q.official_pico if q else 0
    t = out.tokens if q else Tokens()
    used = q.prices if q else adm.prices
    now = utcnow()
    record = {
        "p_id": adm.record_id, "status": out.status, "usage_source": out.usage_source,
        "input_tokens": t.input, "output_tokens": t.output,
        "cache_write_5m_tokens": t.cache_write_5m, "cache_write_1h_tokens": t.cache_write_1h,
        "cache_read_tokens": t.cache_read, "web_searches": t.web_searches,
        "input_price": used.input, "output_price": used.output, "cache_write_5m_price": used.cache_write_5m,
        "cache_write_1h_price": used.cache_write_1h, "cache_read_price": used.cache_read,
        "official_cost_pico": official, "charge_micros": charge,
        "latency_ms": out.latency_ms, "ttfb_ms": out.ttfb_ms, "attempts": out.attempts,
        "channel_id": out.channel_id,
        "upstream_request_id": (out.upstream_request_id or None) and out.upstream_request_id[:100],
        "error": (out.error or None) and out.error[:500],
        "delivered_chars": out.delivered_chars, "settled_at": now,
        "service_tier": adm.prices.tier_served(t.service_tier),
    }
    # The call has been served: wait for the write lock as long as it takes within the
    # reconciler's grace, so the bill is the actual usage rather than the reconciler's estimate.
    if db.engine.dialect.name == "postgresql":
        return _settle_pg(adm, record, charge, now)
    def job(tx) -> bool:
        if tx.first(_SETTLE_RECORD, record) is None:
            return False
        tx.execute(_DELETE_INFLIGHT, {"p_id": adm.record_id})
        ledger.settle(adm.user_id, hold_micros=adm.hold_micros, charge_micros=charge,
                      ref_type="usage", ref_id=adm.request_id, tx=tx)
        if adm.key_id is not None:
            tx.execute(_KEY_SPENT, {"p_key": adm.key_id, "p_charge": charge, "p_now": now})
        return True

    return group_commit().run(job, lock_wait_s=current_app.config["RECONCILE_GRACE_S"])


# PostgreSQL: the whole settle above — claim the pending record, move the money, write the
# ledger row, add to the key's spend — as one statement (one round trip).
_PG_SETTLE = (
    "WITH claim AS (UPDATE usage_records SET "
    + ", ".join(f"{c} = %({c})s" for c in _SETTLED_COLUMNS)
    + " WHERE id = %(p_id)s AND status = 'pending' RETURNING id),\n"
    "gone AS (DELETE FROM relay_inflight WHERE record_id IN (SELECT id FROM claim)),"
    + ledger.PG_SETTLE_CTES + ",\n"
    "k AS (UPDATE api_keys SET spent_micros = spent_micros + %(s_charge)s, last_used_at = %(s_now)s"
    " WHERE id = %(p_key)s AND EXISTS (SELECT 1 FROM claim) RETURNING id)\n"
    "SELECT (SELECT count(*) FROM claim), " + ledger.PG_SETTLE_GUARD
)


def _settle_pg(adm: Admission, record: dict, charge: int, now) -> bool:
    claimed, _ = group_commit().run((_PG_SETTLE, {
        **record, "p_key": adm.key_id, "s_user": adm.user_id, "s_hold": adm.hold_micros,
        "s_charge": charge, "s_ref_type": "usage", "s_ref_id": adm.request_id, "s_now": now,
    }, adm.user_id))
    return bool(claimed)


def checkpoint(record_id: int, delivered_chars: int, web_searches: int = 0, service_tier: str = "") -> None:
    """Progress of a long stream, so a reconciler after a crash bills the output and the web
    searches delivered, at the processing tier the stream reported (priced ones only)."""
    params = {"p_id": record_id, "delivered_chars": delivered_chars, "web_searches": web_searches,
              "service_tier": service_tier}
    if db.engine.dialect.name == "postgresql":
        with raw_tx(write=False) as tx:
            tx.execute(_CHECKPOINT, params)
    else:
        # Progress only: a machine crash may lose the latest one, never money.
        group_commit().run(lambda tx: tx.execute(_CHECKPOINT, params) and None, durable=False)


def reconcile(limit: int = 500) -> int:
    """Settle pending records past their deadline (a worker died); idempotent. Returns how many."""
    rows = db.session.execute(
        select(UsageRecord.id, UsageRecord.request_id, UsageRecord.user_id, UsageRecord.key_id,
               UsageRecord.hold_micros, UsageRecord.input_price, UsageRecord.output_price,
               UsageRecord.cache_write_5m_price, UsageRecord.cache_write_1h_price,
               UsageRecord.cache_read_price, UsageRecord.per_call_price, UsageRecord.web_search_price,
               UsageRecord.multiplier_ppm, UsageRecord.input_tokens, UsageRecord.delivered_chars,
               UsageRecord.created_at, ModelPrice.long_context_threshold, ModelPrice.long_context_input_ppm,
               ModelPrice.long_context_output_ppm, UsageRecord.web_searches, UsageRecord.service_tier,
               ModelPrice.priority_ppm, ModelPrice.flex_ppm)
        .outerjoin(ModelPrice, ModelPrice.name == UsageRecord.model)
        .where(UsageRecord.status == "pending", UsageRecord.deadline_at < utcnow())
        .order_by(UsageRecord.id).limit(limit)
    ).all()
    db.session.rollback()  # end the read before the writes below
    settled = 0
    for r in rows:
        # The record's (regular) prices, with the model's long-context and processing tiers.
        tiers = {"long_threshold": r[16] or 0, "long_input_ppm": r[17] or MICROS,
                 "long_output_ppm": r[18] or MICROS, "priority_ppm": r[21] or 0, "flex_ppm": r[22] or 0}
        adm = Admission(r[0], r[1], r[2], r[3], r[4], Prices(*r[5:12], **tiers), r[12], r[13])
        tokens = Tokens(input=r[13], output=estimate_output_tokens(r[14], 0), web_searches=r[19],
                        service_tier=r[20])
        latency = int((utcnow() - r[15]).total_seconds() * 1000)
        out = Outcome("partial", "estimated", tokens, latency_ms=latency, delivered_chars=r[14],
                      error="not settled by its worker (crash or restart); settled by the reconciler")
        settled += _settle(adm, out)
    return settled
