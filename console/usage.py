"""Usage records: the queries behind the usage pages, the per-call detail, the CSV export,
summaries and charts, the dashboard, and the live group statistics.

Owns the read side of usage_records (the relay writes them) and the derived usage_daily
rollup. Every query of a user's records is scoped by user_id. Lists use keyset pagination on
(created_at, id), newest first, over the indexes declared on UsageRecord.
Days and hours are UTC.
"""
from __future__ import annotations

import re
import statistics
import threading
import time
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from datetime import UTC, date, datetime, timedelta
from urllib.parse import urlencode

from sqlalchemy import (
    Date,
    Integer,
    and_,
    case,
    cast,
    func,
    insert,
    literal,
    literal_column,
    or_,
    select,
    update,
)
from sqlalchemy.exc import IntegrityError

from console.database import write_tx
from console.extensions import db
from console.models import (
    ApiKey,
    Group,
    ModelPrice,
    UsageDaily,
    UsageRecord,
    UsageRollupMark,
    User,
    Wallet,
    utcnow,
)
from console.money import format_fixed
from console.pricing import CLASS_LABELS, TIER_LABELS, Prices, Quote, Tokens, quote

PAGE_SIZE = 50
STATUSES = ("ok", "failed", "partial", "estimated", "pending")
RANGES = ("all", "today", "7d", "30d", "custom")
STATS_TTL_SECONDS = 60.0
# A day is rolled up only once no call in it can still change: none pending, and this long
# after its end (longer than any relay deadline plus the reconciler's period).
ROLLUP_GRACE = timedelta(hours=2)

_DIGITS = re.compile(r"[0-9]{1,18}")
_ISO_DAY = re.compile(r"[0-9]{4}-[0-9]{2}-[0-9]{2}")


class UsageError(ValueError):
    """A filter value that is not acceptable; the message is safe to show."""


class UsageNotFound(LookupError):
    """No such record for this user (another user's record is indistinguishable)."""


# ---- filters ------------------------------------------------------------------------------

@dataclass(frozen=True)
class UsageFilter:
    """What the user asked to see. Built from a query string by `parse_filter`."""

    range: str = "all"
    start: date | None = None   # custom range, inclusive
    end: date | None = None     # custom range, inclusive
    key_id: int | None = None
    model: str | None = None
    group_id: int | None = None
    status: str | None = None

    def window(self, now: datetime) -> tuple[datetime | None, datetime | None]:
        """[since, until) in UTC for the chosen range."""
        today = _midnight(now)
        if self.range == "today":
            return today, None
        if self.range == "7d":
            return today - timedelta(days=6), None
        if self.range == "30d":
            return today - timedelta(days=29), None
        if self.range == "custom":
            since = _midnight_of(self.start) if self.start else None
            until = _midnight_of(self.end) + timedelta(days=1) if self.end else None
            return since, until
        return None, None

    def query_args(self) -> dict[str, str]:
        """The filter as query-string arguments (for links, pagination and the export)."""
        args: dict[str, str] = {}
        if self.range != "all":
            args["range"] = self.range
        if self.range == "custom":
            if self.start:
                args["from"] = self.start.isoformat()
            if self.end:
                args["to"] = self.end.isoformat()
        if self.key_id is not None:
            args["key"] = str(self.key_id)
        if self.model:
            args["model"] = self.model
        if self.group_id is not None:
            args["group"] = str(self.group_id)
        if self.status:
            args["status"] = self.status
        return args

    def query_string(self, **extra: str) -> str:
        return urlencode({**self.query_args(), **extra})

    @property
    def active(self) -> bool:
        return bool(self.query_args())


def _int_arg(raw: str | None, label: str) -> int | None:
    if raw is None or raw == "":
        return None
    if not _DIGITS.fullmatch(raw):
        raise UsageError(f"Choose a valid {label}.")
    return int(raw)


def _day_arg(raw: str | None, label: str) -> date | None:
    if raw is None or raw == "":
        return None
    if not _ISO_DAY.fullmatch(raw):
        raise UsageError(f"Enter the {label} date as YYYY-MM-DD.")
    try:
        day = date.fromisoformat(raw)
    except ValueError as exc:
        raise UsageError(f"Enter a real {label} date.") from exc
    if not 2000 <= day.year <= 2999:
        raise UsageError(f"Enter a {label} date between 2000 and 2999.")
    return day


def parse_filter(args: Mapping[str, str]) -> UsageFilter:
    """Validate query-string values; raises UsageError with a message for the form."""
    rng = args.get("range") or "all"
    if rng not in RANGES:
        raise UsageError("Choose a time range from the list.")
    start = _day_arg(args.get("from"), "start")
    end = _day_arg(args.get("to"), "end")
    if rng != "custom":
        start = end = None
    elif start and end and start > end:
        raise UsageError("The start date must not be after the end date.")
    model = args.get("model") or None
    if model is not None and (len(model) > 100 or not model.isprintable()):
        raise UsageError("Choose a model from the list.")
    status = args.get("status") or None
    if status is not None and status not in STATUSES:
        raise UsageError("Choose a status from the list.")
    return UsageFilter(range=rng, start=start, end=end, key_id=_int_arg(args.get("key"), "key"),
                       model=model, group_id=_int_arg(args.get("group"), "group"), status=status)


def parse_cursor(raw: str | None) -> int | None:
    if raw is None or raw == "":
        return None
    if not _DIGITS.fullmatch(raw):
        raise UsageError("That page link is not valid.")
    return int(raw)


def _midnight(now: datetime) -> datetime:
    return now.astimezone(UTC).replace(hour=0, minute=0, second=0, microsecond=0)


def _midnight_of(day: date) -> datetime:
    return datetime(day.year, day.month, day.day, tzinfo=UTC)


def _conditions(user_id: int, flt: UsageFilter, now: datetime) -> list:
    R = UsageRecord
    conds = [R.user_id == user_id]
    since, until = flt.window(now)
    if since is not None:
        conds.append(R.created_at >= since)
    if until is not None:
        conds.append(R.created_at < until)
    if flt.key_id is not None:
        conds.append(R.key_id == flt.key_id)
    if flt.model:
        conds.append(R.model == flt.model)
    if flt.group_id is not None:
        conds.append(R.group_id == flt.group_id)
    if flt.status == "estimated":
        # Matches the partial index ix_usage_user_estimated_time.
        conds.append(R.usage_source == "estimated")
    elif flt.status:
        conds.append(R.status == flt.status)
    return conds


# ---- the records page ----------------------------------------------------------------------

@dataclass(frozen=True)
class Choices:
    """What the filter form offers: the user's keys, the groups, the models they used."""

    keys: dict[int, ApiKey]
    groups: dict[int, Group]
    models: list[str]


@dataclass(frozen=True)
class RecordsPage:
    filter: UsageFilter
    records: list[UsageRecord]
    choices: Choices
    newer_cursor: int | None = None   # ?after= for the newer page
    older_cursor: int | None = None   # ?before= for the older page
    at_start: bool = True
    error: str | None = None


def _keys_and_groups(user_id: int) -> tuple[dict[int, ApiKey], dict[int, Group]]:
    keys = {k.id: k for k in db.session.scalars(
        select(ApiKey).where(ApiKey.user_id == user_id).order_by(ApiKey.created_at.desc()))}
    groups = {g.id: g for g in db.session.scalars(select(Group).order_by(Group.sort_order, Group.id))}
    return keys, groups


def choices(user_id: int) -> Choices:
    keys, groups = _keys_and_groups(user_id)
    # The models this user has called on closed days (the rollup) plus the catalog, which
    # holds every model the relay serves today. A DISTINCT over usage_records would read the
    # user's whole history (SQLite picks the covering model index and scans it all).
    rolled = db.session.scalars(select(UsageDaily.model).where(UsageDaily.user_id == user_id).distinct())
    catalog = db.session.scalars(select(ModelPrice.name))
    return Choices(keys, groups, sorted(set(rolled) | set(catalog)))


def records_page(user_id: int, flt: UsageFilter, *, before: int | None = None,
                 after: int | None = None, now: datetime | None = None,
                 limit: int = PAGE_SIZE) -> RecordsPage:
    """One page of records, newest first. `before`/`after` are record ids (keyset cursors)."""
    now = now or utcnow()
    _ensure_rollup(user_id, now)
    R = UsageRecord
    conds = _conditions(user_id, flt, now)
    cursor_id = before if before is not None else after
    if cursor_id is not None:
        cur = db.session.execute(select(R.created_at, R.id).where(
            R.id == cursor_id, R.user_id == user_id)).first()
        if cur is None:
            raise UsageNotFound(cursor_id)
        t, i = cur
        if before is not None:  # strictly older than the cursor in (created_at, id) order
            conds.append(and_(R.created_at <= t, or_(R.created_at < t, R.id < i)))
        else:
            conds.append(and_(R.created_at >= t, or_(R.created_at > t, R.id > i)))
    if after is not None:
        rows = list(db.session.scalars(select(R).where(*conds).order_by(
            R.created_at.asc(), R.id.asc()).limit(limit + 1)))
        more_newer = len(rows) > limit
        rows = rows[:limit][::-1]
        newer = rows[0].id if rows and more_newer else None
        older = rows[-1].id if rows else None
        at_start = not more_newer
    else:
        rows = list(db.session.scalars(select(R).where(*conds).order_by(
            R.created_at.desc(), R.id.desc()).limit(limit + 1)))
        more_older = len(rows) > limit
        rows = rows[:limit]
        older = rows[-1].id if rows and more_older else None
        newer = rows[0].id if rows and before is not None else None
        at_start = before is None
    return RecordsPage(flt, rows, choices(user_id), newer, older, at_start)


def empty_page(user_id: int, flt: UsageFilter, error: str) -> RecordsPage:
    """The page for a rejected filter: the form with its message, no rows."""
    return RecordsPage(flt, [], choices(user_id), error=error)


# ---- one record ----------------------------------------------------------------------------

@dataclass(frozen=True)
class Detail:
    record: UsageRecord
    key: ApiKey | None
    group: Group | None
    quote: Quote
    formula: str
    matches_charge: bool   # the recomputed charge equals the stored one
    lines: list[tuple[str, int, int]]  # (token class label, tokens, micro-USD per 1M)
    long_context_above: int | None = None  # the prompt passed the model's long-context threshold

    @property
    def tier_label(self) -> str:
        """The processing tier whose prices the record's token prices are ('' if standard)."""
        return TIER_LABELS.get(self.record.service_tier, "")


def detail(user_id: int, record_id: int, symbol: str = "") -> Detail:
    """A record of this user with its charge explained by the billing code itself."""
    rec = db.session.scalar(select(UsageRecord).where(
        UsageRecord.id == record_id, UsageRecord.user_id == user_id))
    if rec is None:
        raise UsageNotFound(record_id)
    q = quote(Tokens.of_record(rec), Prices.of_record(rec), rec.multiplier_ppm)
    key = db.session.get(ApiKey, rec.key_id) if rec.key_id else None
    group = db.session.get(Group, rec.group_id) if rec.group_id else None
    lines = [(CLASS_LABELS[c], n, p) for c, n, p in q.terms]
    threshold = db.session.scalar(select(ModelPrice.long_context_threshold).where(ModelPrice.name == rec.model))
    above = threshold if threshold and q.tokens.input_side > threshold and rec.status != "failed" else None
    return Detail(rec, key, group, q, q.formula(symbol), q.charge_micros == rec.charge_micros, lines, above)


def record_row(user_id: int, record_id: int) -> tuple[UsageRecord, Choices]:
    """One record for its collapsed table row."""
    rec = db.session.scalar(select(UsageRecord).where(
        UsageRecord.id == record_id, UsageRecord.user_id == user_id))
    if rec is None:
        raise UsageNotFound(record_id)
    keys, groups = _keys_and_groups(user_id)
    return rec, Choices(keys, groups, [])


# ---- CSV export ----------------------------------------------------------------------------

CSV_HEADER = ("time_utc", "request_id", "key", "key_prefix", "model", "group", "multiplier",
              "input_tokens", "output_tokens", "cache_write_tokens", "cache_read_tokens",
              "web_searches", "official_usd", "credits", "status", "usage_source", "stream", "latency_ms",
              "ttfb_ms", "service_tier")
_CSV_COLUMNS = (
    UsageRecord.id, UsageRecord.created_at, UsageRecord.request_id, UsageRecord.key_id,
    UsageRecord.model, UsageRecord.group_id, UsageRecord.multiplier_ppm,
    UsageRecord.input_tokens, UsageRecord.output_tokens, UsageRecord.cache_write_5m_tokens,
    UsageRecord.cache_write_1h_tokens, UsageRecord.cache_read_tokens, UsageRecord.web_searches,
    UsageRecord.official_cost_pico, UsageRecord.charge_micros, UsageRecord.status,
    UsageRecord.usage_source, UsageRecord.stream, UsageRecord.latency_ms, UsageRecord.ttfb_ms,
    UsageRecord.service_tier,
)


def _plain(formatted: str) -> str:
    """The on-screen number without thousands separators, so spreadsheets read it as a number."""
    return formatted.replace(",", "")


def export_rows(user_id: int, flt: UsageFilter, *, now: datetime | None = None,
                batch: int = 2000) -> Iterator[tuple]:
    """CSV rows of every record matching the filter, newest first, then a totals line.

    Streams: rows come from a server-side cursor on PostgreSQL (yield_per) and SQLite's
    incremental cursor, so memory stays flat whatever the row count.
    """
    now = now or utcnow()
    keys, groups = _keys_and_groups(user_id)
    yield CSV_HEADER
    stmt = (select(*_CSV_COLUMNS).where(*_conditions(user_id, flt, now))
            .order_by(UsageRecord.created_at.desc(), UsageRecord.id.desc())
            .execution_options(yield_per=batch))
    n = tin = tout = tcw = tcr = searches = pico = micros = 0
    for r in db.session.execute(stmt):
        key = keys.get(r.key_id) if r.key_id else None
        group = groups.get(r.group_id) if r.group_id else None
        cache_write = r.cache_write_5m_tokens + r.cache_write_1h_tokens
        n += 1
        tin += r.input_tokens
        tout += r.output_tokens
        tcw += cache_write
        tcr += r.cache_read_tokens
        searches += r.web_searches
        pico += r.official_cost_pico
        micros += r.charge_micros
        yield (r.created_at.strftime("%Y-%m-%d %H:%M:%S"), r.request_id,
               key.name if key else "", key.display_prefix if key else "", r.model,
               group.name if group else "", _plain(format_fixed(r.multiplier_ppm, min_places=0)),
               r.input_tokens, r.output_tokens, cache_write, r.cache_read_tokens, r.web_searches,
               _plain(format_fixed(r.official_cost_pico, places=12, min_places=6)),
               _plain(format_fixed(r.charge_micros)), r.status, r.usage_source,
               "yes" if r.stream else "no",
               "" if r.latency_ms is None else r.latency_ms, "" if r.ttfb_ms is None else r.ttfb_ms,
               r.service_tier)
    yield ("TOTAL", f"{n} calls", "", "", "", "", "", tin, tout, tcw, tcr, searches,
           _plain(format_fixed(pico, places=12, min_places=6)), _plain(format_fixed(micros)),
           "", "", "", "", "", "")


# ---- rollup of closed days -------------------------------------------------------------------

def _day_expr(col):
    """The UTC calendar day of a timestamp column, on either database."""
    if db.engine.dialect.name == "postgresql":
        return cast(func.timezone("UTC", col), Date)
    return func.substr(col, 1, 10)  # SQLite stores 'YYYY-MM-DD HH:MM:SS.ffffff' in UTC


def _hour_expr(col):
    if db.engine.dialect.name == "postgresql":
        return cast(func.extract("hour", func.timezone("UTC", col)), Integer)
    return cast(func.substr(col, 12, 2), Integer)


def _as_day(v) -> date:
    return v if isinstance(v, date) else date.fromisoformat(str(v)[:10])


_TOKENS_SUM = (UsageRecord.input_tokens + UsageRecord.output_tokens
               + UsageRecord.cache_write_5m_tokens + UsageRecord.cache_write_1h_tokens
               + UsageRecord.cache_read_tokens)


def _closed_through(user_id: int) -> date | None:
    return db.session.scalar(select(UsageRollupMark.closed_through).where(
        UsageRollupMark.user_id == user_id))


def _live_since(user_id: int) -> datetime:
    """Records from this instant on are not in the rollup yet."""
    mark = _closed_through(user_id)
    return _midnight_of(mark + timedelta(days=1)) if mark else datetime(2000, 1, 1, tzinfo=UTC)


def _ensure_rollup(user_id: int, now: datetime) -> None:
    """Roll up every day of this user that can no longer change and is not rolled up yet.

    Runs at most once per user per day in practice (a mark records progress). The mark moves
    with a conditional UPDATE, so two workers can never add the same day twice.
    """
    R = UsageRecord
    through = (now - ROLLUP_GRACE).date() - timedelta(days=1)
    pending = db.session.scalar(select(func.min(R.created_at)).where(
        R.user_id == user_id, R.status == "pending"))
    if pending is not None:
        through = min(through, pending.date() - timedelta(days=1))
    mark = _closed_through(user_id)
    if mark is not None and mark >= through:
        return
    if mark is None:
        first = db.session.scalar(select(func.min(R.created_at)).where(R.user_id == user_id))
        start = first.date() if first else through + timedelta(days=1)
    else:
        start = mark + timedelta(days=1)
    day = _day_expr(R.created_at)
    try:
        with write_tx():
            if mark is None:
                db.session.execute(insert(UsageRollupMark).values(user_id=user_id, closed_through=through))
            else:
                moved = db.session.execute(update(UsageRollupMark).where(
                    UsageRollupMark.user_id == user_id, UsageRollupMark.closed_through == mark,
                ).values(closed_through=through))
                if moved.rowcount != 1:
                    raise _Raced()
            if start <= through:
                key = func.coalesce(R.key_id, literal_column("0"))
                agg = (select(literal(user_id), day, key, R.model,
                              func.count(), func.sum(_TOKENS_SUM), func.sum(R.charge_micros))
                       .where(R.user_id == user_id, R.created_at >= _midnight_of(start),
                              R.created_at < _midnight_of(through + timedelta(days=1)))
                       .group_by(day, key, R.model))
                db.session.execute(insert(UsageDaily).from_select(
                    ["user_id", "day", "key_id", "model", "calls", "tokens", "charge_micros"], agg))
    except (_Raced, IntegrityError):
        pass  # another worker rolled these days up first


class _Raced(Exception):
    pass


@dataclass
class Totals:
    calls: int = 0
    tokens: int = 0
    charge_micros: int = 0

    def add(self, calls: int, tokens: int, charge: int) -> None:
        self.calls += int(calls or 0)
        self.tokens += int(tokens or 0)
        self.charge_micros += int(charge or 0)


def _cells(user_id: int, since: date | None) -> dict[tuple[date, int, str], Totals]:
    """Totals per (UTC day, key id, model) from `since` (None = all time) to now: closed days
    from the rollup, the rest from the records. One read of each; callers fold the cells."""
    D, R = UsageDaily, UsageRecord
    mark = _closed_through(user_id)
    cells: dict[tuple[date, int, str], Totals] = {}
    if mark is not None and (since is None or since <= mark):
        q = select(D.day, D.key_id, D.model, D.calls, D.tokens, D.charge_micros).where(D.user_id == user_id)
        if since is not None:
            q = q.where(D.day >= since)
        for day, key_id, model, calls, tokens, charge in db.session.execute(q):
            cells.setdefault((_as_day(day), key_id, model), Totals()).add(calls, tokens, charge)
    live_from = _midnight_of(mark + timedelta(days=1)) if mark is not None else None
    if since is not None and (live_from is None or _midnight_of(since) > live_from):
        live_from = _midnight_of(since)
    day = _day_expr(R.created_at)
    key = func.coalesce(R.key_id, literal_column("0"))
    q = select(day, key, R.model, func.count(), func.sum(_TOKENS_SUM), func.sum(R.charge_micros)).where(
        R.user_id == user_id)
    if live_from is not None:
        q = q.where(R.created_at >= live_from)
    for d, key_id, model, calls, tokens, charge in db.session.execute(q.group_by(day, key, R.model)):
        cells.setdefault((_as_day(d), key_id, model), Totals()).add(calls, tokens, charge)
    return cells


def _all_time(user_id: int) -> Totals:
    """All-time totals: the rollup's closed days plus the live records after them."""
    D, R = UsageDaily, UsageRecord
    t = Totals()
    mark = _closed_through(user_id)
    if mark is not None:
        t.add(*db.session.execute(select(func.sum(D.calls), func.sum(D.tokens), func.sum(D.charge_micros))
                                  .where(D.user_id == user_id)).one())
    q = select(func.count(), func.sum(_TOKENS_SUM), func.sum(R.charge_micros)).where(R.user_id == user_id)
    if mark is not None:
        q = q.where(R.created_at >= _midnight_of(mark + timedelta(days=1)))
    t.add(*db.session.execute(q).one())
    return t


def _fold(cells: dict[tuple[date, int, str], Totals], by, since: date | None = None) -> dict:
    """Sum cells (from `since` on) into groups named by `by(day, key_id, model)`."""
    out: dict = {}
    for (day, key_id, model), t in cells.items():
        if since is None or day >= since:
            out.setdefault(by(day, key_id, model), Totals()).add(t.calls, t.tokens, t.charge_micros)
    return out


# ---- summary and charts -----------------------------------------------------------------------

@dataclass(frozen=True)
class Ranked:
    label: str
    sub: str
    totals: Totals


@dataclass(frozen=True)
class Summary:
    today: Totals
    month: Totals
    all_time: Totals
    top_models: list[Ranked]
    top_keys: list[Ranked]
    days: list[date]                          # the last 30 days, oldest first
    spend_by_model: dict[str, list[int]]      # model → micro-credits per day (top models + other)
    hours: list[int]                          # 0..23
    calls_by_hour: list[int]
    generated_at: datetime = field(default_factory=utcnow)


TOP_N = 5
CHART_SERIES = 5


def summary(user_id: int, *, now: datetime | None = None) -> Summary:
    """Today, this month and all time; the top models and keys and the charts (last 30 days)."""
    now = now or utcnow()
    _ensure_rollup(user_id, now)
    today = _midnight(now).date()
    first_of_month = today.replace(day=1)
    since30 = today - timedelta(days=29)
    zero = Totals()
    # Only the window the page shows is loaded cell by cell; all time is summed in the database.
    cells = _cells(user_id, min(since30, first_of_month))

    def total(since: date) -> Totals:
        return _fold(cells, lambda d, k, m: "all", since).get("all", zero)

    today_t, month_t, all_t = total(today), total(first_of_month), _all_time(user_id)

    keys, _groups = _keys_and_groups(user_id)
    by_model = _fold(cells, lambda d, k, m: m, since30)
    by_key = _fold(cells, lambda d, k, m: k, since30)
    rank = sorted(by_model.items(), key=lambda kv: (-kv[1].charge_micros, -kv[1].calls, kv[0]))
    top_models = [Ranked(m, "", t) for m, t in rank[:TOP_N]]
    top_keys = []
    for kid, t in sorted(by_key.items(), key=lambda kv: (-kv[1].charge_micros, -kv[1].calls, kv[0]))[:TOP_N]:
        k = keys.get(kid)
        top_keys.append(Ranked(k.name if k else "(no key)", k.display_prefix if k else "", t))

    days = [since30 + timedelta(days=i) for i in range(30)]
    series_models = [m for m, _t in rank[:CHART_SERIES]]
    spend: dict[str, list[int]] = {m: [0] * 30 for m in series_models}
    for (day, model), t in _fold(cells, lambda d, k, m: (d, m), since30).items():
        idx = (day - since30).days
        if not 0 <= idx < 30:
            continue
        name = model if model in spend else "other"
        spend.setdefault(name, [0] * 30)[idx] += t.charge_micros

    calls_by_hour = [0] * 24
    R = UsageRecord
    hour = _hour_expr(R.created_at)
    for h, n in db.session.execute(select(hour, func.count()).where(
            R.user_id == user_id, R.created_at >= _midnight_of(today)).group_by(hour)):
        if h is not None and 0 <= int(h) < 24:
            calls_by_hour[int(h)] = int(n)
    return Summary(today_t, month_t, all_t, top_models, top_keys, days, spend,
                   list(range(24)), calls_by_hour)


@dataclass(frozen=True)
class Dashboard:
    wallet: Wallet | None
    today: Totals
    days: list[date]
    spend_7d: list[int]
    recent: list[UsageRecord]
    keys: dict[int, ApiKey]
    default_group: Group | None = None

    @property
    def active_keys(self) -> int:
        return sum(1 for k in self.keys.values() if k.deleted_at is None)

    @property
    def sparkline(self):
        from console.charts import sparkline

        return sparkline("Spend, last 7 days (credits)", [d.strftime("%m-%d") for d in self.days],
                         self.spend_7d, format_fixed)


def dashboard(user_id: int, *, now: datetime | None = None) -> Dashboard:
    """The home page: balance, today's spend, a 7-day sparkline and the last 5 calls."""
    now = now or utcnow()
    _ensure_rollup(user_id, now)
    today = _midnight(now).date()
    since7 = today - timedelta(days=6)
    by_day = _fold(_cells(user_id, since7), lambda d, k, m: d)
    days = [since7 + timedelta(days=i) for i in range(7)]
    spend = [by_day[d].charge_micros if d in by_day else 0 for d in days]
    today_t = by_day.get(today, Totals())
    recent = list(db.session.scalars(select(UsageRecord).where(UsageRecord.user_id == user_id)
                                     .order_by(UsageRecord.created_at.desc(), UsageRecord.id.desc())
                                     .limit(5)))
    wallet = db.session.scalar(select(Wallet).where(Wallet.user_id == user_id))
    keys = {k.id: k for k in db.session.scalars(select(ApiKey).where(ApiKey.user_id == user_id))}
    default_group = db.session.scalar(select(Group).join(User, User.default_group_id == Group.id)
                                      .where(User.id == user_id))
    return Dashboard(wallet, today_t, days, spend, recent, keys, default_group)


# ---- group statistics ----------------------------------------------------------------------

@dataclass(frozen=True)
class GroupStats:
    calls: int
    success_rate: float | None  # 0..1
    median_latency_ms: int | None
    median_ttfb_ms: int | None


_stats_lock = threading.Lock()
_stats_cache: dict[str, tuple[float, dict[int, GroupStats]]] = {}


def clear_caches() -> None:
    with _stats_lock:
        _stats_cache.clear()


def group_stats() -> dict[int, GroupStats]:
    """Last-24h stats per group id, over every user's settled calls.

    Cached per process for STATS_TTL_SECONDS (keyed by database), so group cards never
    compute them per request.
    """
    key = str(db.engine.url)
    now = time.monotonic()
    with _stats_lock:
        hit = _stats_cache.get(key)
        if hit and now - hit[0] < STATS_TTL_SECONDS:
            return hit[1]
    stats = _compute_group_stats(utcnow() - timedelta(hours=24))
    with _stats_lock:
        _stats_cache[key] = (time.monotonic(), stats)
    return stats


def _compute_group_stats(since: datetime) -> dict[int, GroupStats]:
    R = UsageRecord
    settled = and_(R.created_at >= since, R.group_id.is_not(None), R.status != "pending")
    counts = {gid: (int(n), int(bad or 0)) for gid, n, bad in db.session.execute(
        select(R.group_id, func.count(), func.sum(case((R.status == "failed", 1), else_=0)))
        .where(settled).group_by(R.group_id))}
    lat: dict[int, int | None] = {}
    ttfb: dict[int, int | None] = {}
    if db.engine.dialect.name == "postgresql":
        rows = db.session.execute(
            select(R.group_id,
                   func.percentile_disc(0.5).within_group(R.latency_ms).filter(R.status != "failed"),
                   func.percentile_disc(0.5).within_group(R.ttfb_ms).filter(R.status != "failed"))
            .where(settled).group_by(R.group_id))
        for gid, l_ms, t_ms in rows:
            lat[gid], ttfb[gid] = l_ms, t_ms
    else:
        # SQLite has no percentile function: read the window from the covering index.
        samples: dict[int, tuple[list[int], list[int]]] = {}
        for gid, l_ms, t_ms in db.session.execute(
                select(R.group_id, R.latency_ms, R.ttfb_ms).where(settled, R.status != "failed")):
            ls, ts = samples.setdefault(gid, ([], []))
            if l_ms is not None:
                ls.append(l_ms)
            if t_ms is not None:
                ts.append(t_ms)
        for gid, (ls, ts) in samples.items():
            lat[gid] = statistics.median_low(ls) if ls else None
            ttfb[gid] = statistics.median_low(ts) if ts else None
    return {gid: GroupStats(calls=n, success_rate=(n - bad) / n if n else None,
                            median_latency_ms=lat.get(gid), median_ttfb_ms=ttfb.get(gid))
            for gid, (n, bad) in counts.items()}


