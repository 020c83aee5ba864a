"""API keys: generation, hashing, the relay's lookup, and key management.

A key is `sk-` + 43 URL-safe characters (256 bits). Only its SHA-256 and a display prefix
are stored; the secret is shown once. A disabled, deleted, expired or rolled key stops working at
once in every worker and host: the console reads keys afresh on every request, and the relay
re-reads a key it remembers inside the admission of every billed call (console/relay/auth.py).

Every management function takes the owner's user id and finds the key by (id, owner):
another user's key id is indistinguishable from a missing one (KeyNotFound → 404).
"""
from __future__ import annotations

import hashlib
import ipaddress
import re
import secrets
import unicodedata
from collections import namedtuple
from datetime import UTC, date, datetime, time, timedelta

from sqlalchemy import bindparam, func, select
from sqlalchemy.orm import joinedload

from console import money
from console.database import Prepared, raw_tx, write_tx
from console.extensions import db
from console.models import ApiKey, Group, User, utcnow

PREFIX = "sk-"
_ALPHABET_LEN = 43  # token_urlsafe(32) → 43 chars = 256 bits
NAME_MAX = 80
MAX_ALLOWLIST_ENTRIES = 50
_DATE = re.compile(r"[0-9]{4}-[0-9]{2}-[0-9]{2}")


class KeyError_(ValueError):
    """A key management error safe to show the user."""


class KeyInputError(KeyError_):
    """Invalid input; `errors` maps form field names to messages."""

    def __init__(self, errors: dict[str, str]):
        super().__init__("; ".join(errors.values()))
        self.errors = errors


class KeyNotFound(LookupError):
    """No such key for this owner (or deleted): the view answers 404."""


class GroupNotAvailable(LookupError):
    """No such group, or not visible to users: the view answers 404 or a form error."""


# ---- secrets ---------------------------------------------------------------------------

def generate_secret() -> str:
    return PREFIX + secrets.token_urlsafe(32)


def hash_secret(secret: str) -> str:
    # A fast hash is right here: keys carry 256 bits of entropy, unlike passwords.
    return hashlib.sha256(secret.encode("utf-8")).hexdigest()


def display_prefix(secret: str) -> str:
    return f"{secret[:7]}…{secret[-4:]}"


def looks_like_key(secret: str) -> bool:
    return (isinstance(secret, str) and secret.startswith(PREFIX)
            and len(secret) == len(PREFIX) + _ALPHABET_LEN
            and all(c.isascii() and (c.isalnum() or c in "-_") for c in secret[len(PREFIX):]))


def _usable(status: str, deleted_at, expires_at, owner_status: str) -> bool:
    """The one rule for a key that may call the relay."""
    return (status == "active" and deleted_at is None and owner_status == "active"
            and (expires_at is None or expires_at > utcnow()))


def authenticate(secret: str) -> ApiKey | None:
    """The usable key for this secret, or None (unknown, disabled, deleted, expired, rolled,
    or its account disabled).

    Always a fresh database read (no cache, and populate_existing so a key object already in
    this session is reloaded), which is what makes revocation immediate across workers.
    """
    if not looks_like_key(secret):
        return None
    key = db.session.scalar(
        select(ApiKey).where(ApiKey.key_hash == hash_secret(secret))
        .options(joinedload(ApiKey.user))
        .execution_options(populate_existing=True)
    )
    if key is None or not _usable(key.status, key.deleted_at, key.expires_at, key.user.status):
        return None
    return key


_K, _USERS = ApiKey.__table__, User.__table__
# What the relay reads of a key (and its owner) to authorize a call. The same columns serve the
# relay's key cache: an admission re-reads them by id inside its own transaction and goes ahead
# only if nothing changed (relay_key_current(), PG_KEY_UNCHANGED).
_RELAY_COLUMNS = (_K.c.id, _K.c.key_hash, _K.c.user_id, _K.c.group_id, _K.c.status, _K.c.deleted_at,
                  _K.c.expires_at, _K.c.spend_limit_micros, _K.c.model_allowlist, _K.c.ip_allowlist,
                  _USERS.c.status.label("owner_status"), _USERS.c.default_group_id)
_RELAY_FROM = _K.join(_USERS, _USERS.c.id == _K.c.user_id)
_RELAY_LOOKUP = Prepared(select(*_RELAY_COLUMNS).select_from(_RELAY_FROM).where(_K.c.key_hash == bindparam("p_hash")))
_RELAY_RECHECK = Prepared(select(*_RELAY_COLUMNS).select_from(_RELAY_FROM).where(_K.c.id == bindparam("p_key")))
RelayKey = namedtuple("RelayKey", [c.name for c in _RELAY_LOOKUP.stmt.selected_columns])


def relay_lookup(secret: str) -> RelayKey | None:
    """The relay's per-call form of authenticate(): the same rule, one prebuilt Core query
    returning a row (id, key_hash, user_id, group_id, …, owner_status, default_group_id)."""
    if not looks_like_key(secret):
        return None
    with raw_tx(write=False) as tx:
        found = tx.first(_RELAY_LOOKUP, {"p_hash": hash_secret(secret)})
    row = None if found is None else RelayKey(*found)
    if row is None or not _usable(row.status, row.deleted_at, row.expires_at, row.owner_status):
        return None
    return row


def relay_key_current(tx, row: RelayKey) -> bool:
    """Inside a write transaction (SQLite): the key still reads exactly as `row` and is usable now."""
    found = tx.first(_RELAY_RECHECK, {"p_key": row.id})
    return (found is not None and RelayKey(*found) == row
            and _usable(row.status, row.deleted_at, row.expires_at, row.owner_status))


def _pg_key_unchanged_sql() -> str:
    from sqlalchemy.dialects import postgresql

    pg = postgresql.dialect()
    cols = [getattr(c, "element", c) for c in _RELAY_COLUMNS]  # owner_status is a label
    same = " AND ".join(
        f"{'u' if c.table is _USERS else 'k'}.{c.name} IS NOT DISTINCT FROM %(kv_{name})s::{c.type.compile(dialect=pg)}"
        for name, c in zip(RelayKey._fields, cols, strict=True))
    return (" AS (SELECT 1 FROM api_keys k JOIN users u ON u.id = k.user_id"
            f" WHERE k.id = %(kv_id)s AND {same}"
            " AND k.status = 'active' AND k.deleted_at IS NULL AND u.status = 'active'"
            " AND (k.expires_at IS NULL OR k.expires_at > %(p_now)s))")


PG_KEY_UNCHANGED = _pg_key_unchanged_sql()  # a CTE body: "<name>" + PG_KEY_UNCHANGED


def pg_key_params(row: RelayKey) -> dict:
    """The parameters of PG_KEY_UNCHANGED for a key read earlier."""
    return {f"kv_{name}": value for name, value in row._asdict().items()}


# ---- per-key restrictions, read by the relay ---------------------------------------------

def split_list(raw: str | None) -> list[str]:
    return [item for item in (raw or "").split(",") if item]


def model_allowed(key: ApiKey, model: str) -> bool:
    """An empty allowlist allows every model of the key's group."""
    allowed = split_list(key.model_allowlist)
    return not allowed or model in allowed


def ip_allowed(key, ip: str | None) -> bool:
    """An empty allowlist allows every address; an unparsable client address is refused.
    `key` is an ApiKey or a relay_lookup() row."""
    nets = split_list(key.ip_allowlist)
    if not nets:
        return True
    try:
        addr = ipaddress.ip_address(ip or "")
    except ValueError:
        return False
    return any(addr in ipaddress.ip_network(n) for n in nets)


def status_of(key: ApiKey) -> str:
    """What the owner sees: active, disabled, expired or limit reached."""
    if key.status != "active":
        return "disabled"
    if key.expires_at is not None and key.expires_at <= utcnow():
        return "expired"
    if spend_limit_reached(key):
        return "limit reached"
    return "active"


def spend_limit_reached(key: ApiKey) -> bool:
    return key.spend_limit_micros is not None and key.spent_micros >= key.spend_limit_micros


# ---- input parsing (raw strings from forms or the CLI) -------------------------------------

def clean_name(raw: object) -> str:
    name = raw.strip() if isinstance(raw, str) else ""
    if not name:
        raise KeyInputError({"name": "Give the key a name."})
    if len(name) > NAME_MAX:
        raise KeyInputError({"name": f"Use at most {NAME_MAX} characters."})
    if any(unicodedata.category(ch) in {"Cc", "Cf", "Co", "Cs"} for ch in name):
        raise KeyInputError({"name": "Use printable characters only."})
    return name


def parse_expiry(raw: object, *, today: date | None = None) -> datetime | None:
    """'2027-01-31' → the key works until the end of that day (UTC); '' → never expires."""
    raw = raw.strip() if isinstance(raw, str) else ""
    if not raw:
        return None
    if not _DATE.fullmatch(raw):
        raise KeyInputError({"expires": "Enter a date as YYYY-MM-DD."})
    try:
        day = date.fromisoformat(raw)
    except ValueError as exc:
        raise KeyInputError({"expires": "Enter a real calendar date."}) from exc
    if day < (today or utcnow().date()):
        raise KeyInputError({"expires": "The expiry date is in the past."})
    return datetime.combine(day + timedelta(days=1), time(0, 0), tzinfo=UTC)


def parse_spend_limit(raw: object) -> int | None:
    """Credits as typed ('25', '12.5') → micro-credits; '' → no limit."""
    raw = raw.strip() if isinstance(raw, str) else ""
    if not raw:
        return None
    try:
        return money.parse_credits(raw)
    except money.MoneyError as exc:
        raise KeyInputError({"spend_limit": str(exc)}) from exc


def _entries(raw: object) -> list[str]:
    text = raw if isinstance(raw, str) else ""
    return [p.strip() for p in re.split(r"[,\s]+", text) if p.strip()]


def parse_ip_allowlist(raw: object) -> str:
    """Addresses or CIDRs, comma/space/newline separated → normalized, de-duplicated CSV.

    Host bits are cleared ('10.1.2.3/8' → '10.0.0.0/8'); a bare address is a /32 or /128.
    """
    out: list[str] = []
    for entry in _entries(raw):
        if len(entry) > 64 or not entry.isascii():
            raise KeyInputError({"ip_allowlist": "Each entry must be an IP address or CIDR."})
        try:
            net = ipaddress.ip_network(entry, strict=False)
        except ValueError as exc:
            raise KeyInputError({"ip_allowlist": f"“{entry}” is not an IP address or CIDR."}) from exc
        if str(net) not in out:
            out.append(str(net))
    if len(out) > MAX_ALLOWLIST_ENTRIES:
        raise KeyInputError({"ip_allowlist": f"At most {MAX_ALLOWLIST_ENTRIES} entries."})
    return ",".join(out)


def parse_model_allowlist(raw: object, group: Group | None) -> str:
    """Model names → CSV; each must be a model the key's group serves."""
    served = {m.name for m in group.models} if group is not None else set()
    out: list[str] = []
    for entry in _entries(raw):
        if entry not in served:
            where = f"the {group.name} group" if group is not None else "this key's group"
            raise KeyInputError({"model_allowlist": f"“{entry[:100]}” is not a model of {where}."})
        if entry not in out:
            out.append(entry)
    if len(out) > MAX_ALLOWLIST_ENTRIES:
        raise KeyInputError({"model_allowlist": f"At most {MAX_ALLOWLIST_ENTRIES} entries."})
    return ",".join(out)


# ---- queries -----------------------------------------------------------------------------

def list_keys(user_id: int) -> list[ApiKey]:
    return list(db.session.scalars(
        select(ApiKey).where(ApiKey.user_id == user_id, ApiKey.deleted_at.is_(None))
        .order_by(ApiKey.id.desc())
    ))


def count_keys(user_id: int) -> int:
    return db.session.scalar(
        select(func.count()).select_from(ApiKey)
        .where(ApiKey.user_id == user_id, ApiKey.deleted_at.is_(None))
    ) or 0


def get_key(user_id: int, key_id: int) -> ApiKey:
    """The owner's live key, or KeyNotFound (another user's id looks exactly like a missing one)."""
    key = db.session.scalar(
        select(ApiKey).where(ApiKey.id == key_id, ApiKey.user_id == user_id,
                             ApiKey.deleted_at.is_(None))
    )
    if key is None:
        raise KeyNotFound(key_id)
    return key


def _group(group_id: int | None, *, allow_hidden: bool) -> Group:
    group = db.session.get(Group, group_id) if group_id is not None else None
    if group is None or (not group.visible and not allow_hidden):
        raise GroupNotAvailable(group_id)
    return group


def _default_group_id(user_id: int) -> int | None:
    """The account's default group, else the first visible group."""
    gid = db.session.scalar(select(User.default_group_id).where(User.id == user_id))
    if gid is not None:
        return gid
    return db.session.scalar(
        select(Group.id).where(Group.visible.is_(True)).order_by(Group.sort_order, Group.id).limit(1)
    )


# ---- changes -----------------------------------------------------------------------------

def _parse_limits(values: dict, errors: dict, group: Group | None, *, expires: str, spend_limit: str,
                  model_allowlist: str, ip_allowlist: str) -> None:
    """Parse every optional limit into `values`, collecting all messages into `errors`."""
    for field, parse in (("expires_at", lambda: parse_expiry(expires)),
                         ("spend_limit_micros", lambda: parse_spend_limit(spend_limit)),
                         ("ip_allowlist", lambda: parse_ip_allowlist(ip_allowlist)),
                         ("model_allowlist", lambda: parse_model_allowlist(model_allowlist, group))):
        try:
            values[field] = parse()
        except KeyInputError as exc:
            errors.update(exc.errors)


def create_key(user_id: int, name: str, *, group_id: int | None = None,
               expires: str = "", spend_limit: str = "", model_allowlist: str = "",
               ip_allowlist: str = "", allow_hidden_group: bool = False) -> tuple[ApiKey, str]:
    """A new key for user_id; returns the row and the secret (shown once, never stored).

    Without a group the key gets the account's default group. Users may pick only visible
    groups; operators (CLI) may pass allow_hidden_group.
    """
    errors: dict[str, str] = {}
    values: dict = {}
    group = None
    try:
        values["name"] = clean_name(name)
    except KeyInputError as exc:
        errors.update(exc.errors)
    try:
        gid = group_id if group_id is not None else _default_group_id(user_id)
        group = _group(gid, allow_hidden=allow_hidden_group) if gid is not None else None
    except GroupNotAvailable:
        errors["group_id"] = "Pick one of the listed groups."
    _parse_limits(values, errors, group, expires=expires, spend_limit=spend_limit,
                  model_allowlist=model_allowlist, ip_allowlist=ip_allowlist)
    if errors:
        raise KeyInputError(errors)
    secret = generate_secret()
    with write_tx():
        key = ApiKey(user_id=user_id, key_hash=hash_secret(secret),
                     display_prefix=display_prefix(secret), group_id=group.id if group else None,
                     status="active", spent_micros=0, **values)
        db.session.add(key)
        db.session.flush()
    return key, secret


def rename(user_id: int, key_id: int, name: str) -> ApiKey:
    name = clean_name(name)
    with write_tx():
        key = get_key(user_id, key_id)
        key.name = name
    return key


def set_enabled(user_id: int, key_id: int, enabled: bool) -> ApiKey:
    with write_tx():
        key = get_key(user_id, key_id)
        key.status = "active" if enabled else "disabled"
    return key


def delete(user_id: int, key_id: int) -> None:
    """Soft delete: usage records keep pointing at the row; the secret never works again."""
    with write_tx():
        key = get_key(user_id, key_id)
        key.status = "disabled"
        key.deleted_at = utcnow()


def roll(user_id: int, key_id: int) -> tuple[ApiKey, str]:
    """A new secret with the same settings; the old secret stops working at once."""
    secret = generate_secret()
    with write_tx():
        key = get_key(user_id, key_id)
        key.key_hash = hash_secret(secret)
        key.display_prefix = display_prefix(secret)
    return key, secret


def update_limits(user_id: int, key_id: int, *, expires: str = "", spend_limit: str = "",
                  model_allowlist: str = "", ip_allowlist: str = "") -> ApiKey:
    """Replace the optional limits of a key (empty = none). All fields are checked first."""
    key = get_key(user_id, key_id)
    errors: dict[str, str] = {}
    values: dict = {}
    _parse_limits(values, errors, key.group, expires=expires, spend_limit=spend_limit,
                  model_allowlist=model_allowlist, ip_allowlist=ip_allowlist)
    if errors:
        raise KeyInputError(errors)
    with write_tx():
        key = get_key(user_id, key_id)
        for field, value in values.items():
            setattr(key, field, value)
    return key


def create_key_for_email(email: str, name: str, group_slug: str | None = None) -> tuple[ApiKey, str]:
    """Operator path (CLI): any group by slug, hidden ones included."""
    from console.accounts import AccountError, normalize_email

    try:
        email = normalize_email(email)
    except AccountError as exc:
        raise KeyInputError({"email": str(exc)}) from exc
    user_id = db.session.scalar(select(User.id).where(User.email == email))
    if user_id is None:
        raise KeyInputError({"email": f"No account with the e-mail {email}."})
    group_id = None
    if group_slug is not None:
        group_id = db.session.scalar(select(Group.id).where(Group.slug == group_slug))
        if group_id is None:
            raise KeyInputError({"group_id": f"No group with the slug {group_slug!r}."})
    return create_key(user_id, name, group_id=group_id, allow_hidden_group=True)


def move_to_group(user_id: int, key_id: int, group_id: int) -> ApiKey:
    """Put a key in another visible group.

    A model allowlist naming models the new group does not serve is refused rather than
    pruned: pruning it to empty would silently widen the key to every model.
    """
    key = get_key(user_id, key_id)
    group = _group(group_id, allow_hidden=False)
    served = {m.name for m in group.models}
    missing = [m for m in split_list(key.model_allowlist) if m not in served]
    if missing:
        raise KeyInputError({"group_id": f"{group.name} does not serve {', '.join(missing)}, "
                                         "which this key's model allowlist names. Edit the allowlist first."})
    with write_tx():
        key = get_key(user_id, key_id)
        key.group_id = group.id
    return key
