"""The catalog: groups (multiplier, badge, models served, limits), official model prices,
the group cards, the public pricing table and the cost calculator.

Prices shown here are computed by console/pricing.py, the code that bills; this module
only picks the rows and parses admin input. Users only ever see and pick visible groups.
"""
from __future__ import annotations

import re
import unicodedata
from dataclasses import dataclass

from sqlalchemy import delete, select

from console import audit, keys, money, pricing, settings, usage
from console.database import write_tx
from console.extensions import db
from console.models import Group, GroupModel, ModelPrice, User

BADGES = ("recommended", "dedicated", "none")
PROVIDERS = ("openai", "anthropic")
MODEL_KINDS = ("chat", "embedding")
TOKENS_MAX = 1_000_000_000
_SLUG = re.compile(r"[a-z0-9][a-z0-9-]{0,39}")
_MODEL_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._:/-]{0,99}")
_INT = re.compile(r"-?[0-9]{1,10}")


class CatalogInputError(ValueError):
    """Invalid input; `errors` maps form field names to messages safe to show."""

    def __init__(self, errors: dict[str, str]):
        super().__init__("; ".join(errors.values()))
        self.errors = errors


GroupNotAvailable = keys.GroupNotAvailable


class NotFound(LookupError):
    """No such catalog row (admin pages answer 404)."""


# ---- groups for users ----------------------------------------------------------------------

def visible_groups() -> list[Group]:
    return list(db.session.scalars(
        select(Group).where(Group.visible.is_(True)).order_by(Group.sort_order, Group.id)
    ))


def all_groups() -> list[Group]:
    return list(db.session.scalars(select(Group).order_by(Group.sort_order, Group.id)))


def get_visible(group_id: int) -> Group:
    group = db.session.get(Group, group_id)
    if group is None or not group.visible:
        raise GroupNotAvailable(group_id)
    return group


def by_slug(slug: str, *, visible_only: bool = True) -> Group | None:
    stmt = select(Group).where(Group.slug == slug)
    if visible_only:
        stmt = stmt.where(Group.visible.is_(True))
    return db.session.scalar(stmt)


def share_of_official(multiplier_ppm: int) -> str:
    """'4.3' for 0.3x at the configured exchange rate (display only)."""
    return money.share_of_official_percent(multiplier_ppm, settings.get("exchange_rate"))


@dataclass(frozen=True)
class GroupCard:
    group: Group
    share_pct: str
    stats: usage.GroupStats | None
    is_default: bool


def cards(user_id: int | None) -> list[GroupCard]:
    """One card per visible group, with the last 24 h of measured speed when there is any."""
    default_id = db.session.scalar(select(User.default_group_id).where(User.id == user_id)) if user_id else None
    stats = usage.group_stats() or {}
    return [GroupCard(g, share_of_official(g.multiplier_ppm), stats.get(g.id), g.id == default_id)
            for g in visible_groups()]


def set_default_group(user_id: int, group_id: int) -> Group:
    group = get_visible(group_id)
    with write_tx():
        user = db.session.get(User, user_id)
        user.default_group_id = group.id
    return group


def default_group(user_id: int) -> Group | None:
    gid = db.session.scalar(select(User.default_group_id).where(User.id == user_id))
    return db.session.get(Group, gid) if gid is not None else None


# ---- pricing page and calculator ------------------------------------------------------------

def enabled_models() -> list[ModelPrice]:
    return list(db.session.scalars(
        select(ModelPrice).where(ModelPrice.enabled.is_(True)).order_by(ModelPrice.sort_order, ModelPrice.id)
    ))


@dataclass(frozen=True)
class PriceCell:
    label: str
    official_micro_usd: int
    effective_micros: int


@dataclass(frozen=True)
class PriceRow:
    model: ModelPrice
    official: tuple[tuple[str, int], ...]          # (label, micro-USD per 1M or per call)
    per_call: bool
    by_group: dict[int, tuple[PriceCell, ...]]    # group id → effective prices (only groups serving it)


def _classes(model: ModelPrice) -> list[tuple[str, str]]:
    if model.per_call_price:
        return [("per_call", "per call")]
    if model.kind == "embedding":
        return [("input", "input")]
    out = [("input", "input"), ("output", "output")]
    if model.provider == "anthropic":
        out += [("cache_write_5m", "cache write 5m"), ("cache_write_1h", "cache write 1h")]
    out.append(("cache_read", "cache read"))
    if model.long_context_threshold:
        above = f"above {model.long_context_threshold:,} input tokens"
        out += [("long_input", f"input {above}"), ("long_output", f"output {above}")]
    # The premium tier is Anthropic's fast mode (speed "fast") or OpenAI's priority processing.
    fast = "fast mode" if model.provider == "anthropic" else "priority tier"
    for tier, ppm, label in (("priority", model.priority_ppm, fast), ("flex", model.flex_ppm, "flex tier")):
        if ppm:
            out += [(f"{tier}_input", f"input, {label}"), (f"{tier}_output", f"output, {label}")]
    if model.web_search_price:
        out.append(("web_search", WEB_SEARCH_LABEL))
    return out


SEARCHES_MAX = 10_000  # the calculator's web searches per call
# Providers list search fees per 1,000 searches: the page does too.
WEB_SEARCH_LABEL = "web search / 1k"
SEARCHES_SHOWN = 1000


def _official(prices: pricing.Prices, cls: str) -> int:
    """Micro-USD per 1M tokens (of the long-context or a processing tier for long_*,
    priority_*, flex_*), per call, or per SEARCHES_SHOWN searches."""
    if cls == "web_search":
        return prices.web_search * SEARCHES_SHOWN
    tier, _, base = cls.partition("_")
    if tier == "long":
        return getattr(prices.for_input(prices.long_threshold + 1), base)
    if tier in ("priority", "flex"):
        return getattr(prices.for_service(tier), base)
    return getattr(prices, cls)


def _effective(prices: pricing.Prices, cls: str, ppm: int) -> int:
    """The charge for 1M tokens of one class (one call, SEARCHES_SHOWN searches), by the
    billing function itself."""
    if cls == "per_call":
        return pricing.quote(pricing.Tokens(), pricing.Prices(per_call=prices.per_call), ppm).charge_micros
    if cls == "web_search":
        return pricing.quote(pricing.Tokens(web_searches=SEARCHES_SHOWN),
                             pricing.Prices(web_search=prices.web_search), ppm).charge_micros
    return pricing.price_per_million_credits(_official(prices, cls), ppm)


def pricing_table() -> tuple[list[Group], list[PriceRow]]:
    groups = visible_groups()
    served = {g.id: {m.id for m in g.models} for g in groups}
    rows = []
    for model in enabled_models():
        prices = pricing.Prices.of(model)
        classes = _classes(model)
        official = tuple((label, _official(prices, cls)) for cls, label in classes)
        by_group = {
            g.id: tuple(PriceCell(label, _official(prices, cls), _effective(prices, cls, g.multiplier_ppm))
                        for cls, label in classes)
            for g in groups if model.id in served[g.id]
        }
        rows.append(PriceRow(model, official, bool(model.per_call_price), by_group))
    return groups, rows


def _count(raw: object, field: str, errors: dict[str, str], *, most: int = TOKENS_MAX, of: str = "tokens") -> int:
    text = raw.strip() if isinstance(raw, str) else ""
    if not text:
        return 0
    if not re.fullmatch(r"[0-9]{1,10}", text) or int(text) > most:
        errors[field] = f"Enter a whole number of {of} up to {most:,}."
        return 0
    return int(text)


@dataclass(frozen=True)
class Calculation:
    model: ModelPrice
    group: Group
    quote: pricing.Quote


def calculate(model_name: object, group_slug: object, tokens: dict[str, object]) -> Calculation:
    """Quote a call exactly as billing would: pricing.quote with the model's prices and the
    group's multiplier. Raises CatalogInputError naming the bad fields."""
    errors: dict[str, str] = {}
    model = db.session.scalar(select(ModelPrice).where(
        ModelPrice.name == model_name, ModelPrice.enabled.is_(True))) if isinstance(model_name, str) else None
    if model is None:
        errors["model"] = "Pick one of the listed models."
    group = by_slug(group_slug) if isinstance(group_slug, str) else None
    if group is None:
        errors["group"] = "Pick one of the listed groups."
    counts = {c: _count(tokens.get(c), c, errors) for c in pricing.TOKEN_CLASSES}
    counts["web_searches"] = _count(tokens.get("web_searches"), "web_searches", errors,
                                    most=SEARCHES_MAX, of="searches")
    if model is not None and group is not None and model.id not in {m.id for m in group.models}:
        errors["group"] = f"{group.name} does not serve {model.name}."
    if errors:
        raise CatalogInputError(errors)
    quote = pricing.quote(pricing.Tokens(**counts), pricing.Prices.of(model), group.multiplier_ppm)
    return Calculation(model, group, quote)


# ---- admin editing ----------------------------------------------------------------------------

def _text(raw: object, field: str, errors: dict[str, str], *, max_len: int, required: bool = True) -> str:
    text = raw.strip() if isinstance(raw, str) else ""
    if required and not text:
        errors[field] = "Required."
    elif len(text) > max_len:
        errors[field] = f"At most {max_len} characters."
    elif any(unicodedata.category(ch) in {"Cf", "Co", "Cs"} or (unicodedata.category(ch) == "Cc" and ch not in "\r\n\t")
             for ch in text):
        errors[field] = "Use printable characters only."
    return text


def _int(raw: object, field: str, errors: dict[str, str], lo: int, hi: int) -> int:
    text = raw.strip() if isinstance(raw, str) else ""
    if not _INT.fullmatch(text) or not lo <= int(text) <= hi:
        errors[field] = f"Enter a whole number from {lo} to {hi}."
        return lo
    return int(text)


def _usd(raw: object, field: str, errors: dict[str, str], *, optional: bool) -> int | None:
    text = raw.strip() if isinstance(raw, str) else ""
    if not text:
        if optional:
            return None
        errors[field] = "Required."
        return 0
    try:
        return money.parse_usd(text)
    except money.MoneyError as exc:
        errors[field] = str(exc)
        return 0


def get_group(group_id: int) -> Group:
    group = db.session.get(Group, group_id)
    if group is None:
        raise NotFound(group_id)
    return group


def save_group(group_id: int | None, form: dict, *, actor_id: int, model_ids: list[str]) -> Group:
    """Create (group_id None) or update a group from raw form strings; audited."""
    errors: dict[str, str] = {}
    slug = (form.get("slug") or "").strip()
    if not _SLUG.fullmatch(slug):
        errors["slug"] = "Lowercase letters, digits and dashes; at most 40."
    values = {
        "slug": slug,
        "name": _text(form.get("name"), "name", errors, max_len=80),
        "description": _text(form.get("description"), "description", errors, max_len=1000, required=False),
        "badge": form.get("badge") if form.get("badge") in BADGES else errors.setdefault("badge", "Pick a badge."),
        "concurrency_limit": _int(form.get("concurrency_limit"), "concurrency_limit", errors, 1, 100_000),
        "rpm_limit": _int(form.get("rpm_limit"), "rpm_limit", errors, 1, 10_000_000),
        "sort_order": _int(form.get("sort_order") or "0", "sort_order", errors, -100_000, 100_000),
        "visible": form.get("visible") in ("1", "on", "true", "y"),
    }
    try:
        values["multiplier_ppm"] = money.parse_multiplier((form.get("multiplier") or "").strip())
    except money.MoneyError as exc:
        errors["multiplier"] = str(exc)
    ids = set()
    for raw in model_ids:
        if not re.fullmatch(r"[0-9]{1,9}", raw or ""):
            errors["models"] = "Unknown model."
        else:
            ids.add(int(raw))
    known = set(db.session.scalars(select(ModelPrice.id).where(ModelPrice.id.in_(ids)))) if ids else set()
    if ids - known:
        errors["models"] = "Unknown model."
    clash = db.session.scalar(select(Group.id).where(Group.slug == slug))
    if clash is not None and clash != group_id:
        errors["slug"] = "Another group uses this slug."
    if errors:
        raise CatalogInputError(errors)
    with write_tx():
        group = Group() if group_id is None else get_group(group_id)
        before = None if group_id is None else _group_audit(group)
        for field, value in values.items():
            setattr(group, field, value)
        if group_id is None:
            db.session.add(group)
        db.session.flush()
        db.session.execute(delete(GroupModel).where(GroupModel.group_id == group.id))
        for mid in sorted(ids):
            db.session.add(GroupModel(group_id=group.id, model_id=mid))
        db.session.flush()
        db.session.expire(group, ["models"])
        audit.record("catalog.group_saved", actor_id=actor_id, target_type="group", target_id=group.id,
                     before=before, after={**_group_audit(group), "models": sorted(ids)})
    return group


def _group_audit(group: Group) -> dict:
    return {"slug": group.slug, "name": group.name, "multiplier_ppm": group.multiplier_ppm,
            "badge": group.badge, "visible": group.visible, "concurrency_limit": group.concurrency_limit,
            "rpm_limit": group.rpm_limit, "sort_order": group.sort_order}


def all_models() -> list[ModelPrice]:
    return list(db.session.scalars(select(ModelPrice).order_by(ModelPrice.sort_order, ModelPrice.id)))


def get_model(model_id: int) -> ModelPrice:
    model = db.session.get(ModelPrice, model_id)
    if model is None:
        raise NotFound(model_id)
    return model


PRICE_FIELDS = ("input_price", "output_price", "cache_write_5m_price", "cache_write_1h_price",
                "cache_read_price", "per_call_price", "web_search_price")
# Price ratios (ppm): the long-context tier's (empty: 1x) and the processing tiers' (empty:
# the tier is refused); see pricing.Prices.
RATIO_FIELDS = ("long_context_input_ppm", "long_context_output_ppm", "priority_ppm", "flex_ppm")
TIER_FIELDS = ("long_context_threshold", *RATIO_FIELDS)


def _tiers(form: dict, errors: dict[str, str]) -> dict:
    """The long-context threshold (empty: none) and the price ratios."""
    text = (form.get("long_context_threshold") or "").strip()
    out = {"long_context_threshold": None if not text else
           _int(text, "long_context_threshold", errors, 1, 100_000_000)}
    for field in RATIO_FIELDS:
        raw = (form.get(field) or "").strip()
        out[field] = None
        if raw:
            try:
                out[field] = money.parse_multiplier(raw)
            except money.MoneyError as exc:
                errors[field] = str(exc)
    return out


def save_model(model_id: int | None, form: dict, *, actor_id: int) -> ModelPrice:
    """Create or update an official model price (USD typed as decimals, stored as micro-USD)."""
    errors: dict[str, str] = {}
    name = (form.get("name") or "").strip()
    if not _MODEL_NAME.fullmatch(name):
        errors["name"] = "Letters, digits and . _ : / -; at most 100."
    values = {
        "name": name,
        "provider": form.get("provider") if form.get("provider") in PROVIDERS else errors.setdefault("provider", "Pick a provider."),
        "kind": form.get("kind") if form.get("kind") in MODEL_KINDS else errors.setdefault("kind", "Pick a kind."),
        "input_price": _usd(form.get("input_price"), "input_price", errors, optional=False),
        "output_price": _usd(form.get("output_price"), "output_price", errors, optional=False),
        "cache_write_5m_price": _usd(form.get("cache_write_5m_price"), "cache_write_5m_price", errors, optional=True),
        "cache_write_1h_price": _usd(form.get("cache_write_1h_price"), "cache_write_1h_price", errors, optional=True),
        "cache_read_price": _usd(form.get("cache_read_price"), "cache_read_price", errors, optional=True),
        "per_call_price": _usd(form.get("per_call_price"), "per_call_price", errors, optional=True),
        "web_search_price": _usd(form.get("web_search_price"), "web_search_price", errors, optional=True),
        **_tiers(form, errors),
        "max_output_tokens": _int(form.get("max_output_tokens"), "max_output_tokens", errors, 1, 10_000_000),
        "context_window": _int(form.get("context_window"), "context_window", errors, 1, 100_000_000),
        "sort_order": _int(form.get("sort_order") or "0", "sort_order", errors, -100_000, 100_000),
        "enabled": form.get("enabled") in ("1", "on", "true", "y"),
    }
    clash = db.session.scalar(select(ModelPrice.id).where(ModelPrice.name == name))
    if clash is not None and clash != model_id:
        errors["name"] = "Another model has this name."
    if errors:
        raise CatalogInputError(errors)
    with write_tx():
        model = ModelPrice() if model_id is None else get_model(model_id)
        audited = ("name", *PRICE_FIELDS, *TIER_FIELDS)
        before = None if model_id is None else {f: getattr(model, f) for f in audited}
        for field, value in values.items():
            setattr(model, field, value)
        if model_id is None:
            db.session.add(model)
        db.session.flush()
        audit.record("catalog.model_saved", actor_id=actor_id, target_type="model", target_id=model.id,
                     before=before, after={f: getattr(model, f) for f in audited})
    return model
