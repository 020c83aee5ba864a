"""Relay authentication and the per-call policy: who is calling, with which group and model.

A key is found by its SHA-256 (one query joined with its owner). Billed calls may use the row
this process read for the same key within `KEY_CACHE_TTL_S` seconds, which saves the hot path a
database round trip, without giving up immediate revocation: the admission re-reads the key
inside its own transaction and admits only if the row is unchanged and still usable
(metering.admit raises StaleKey otherwise), and a refusal decided on a remembered row is
checked against a fresh read before it is answered (routes._relay). So a disabled, expired,
deleted or rolled key, a disabled account or a narrowed allowlist takes effect at once in every
worker, as with a read on every call. Unbilled endpoints (/v1/models, count_tokens) always read
afresh. Groups and model prices change rarely and are cached per process for
`CATALOG_TTL_S` seconds. Cookies are never read here: only `Authorization: Bearer` or
`x-api-key`.
"""
from __future__ import annotations

import time
from dataclasses import dataclass

from flask import current_app
from sqlalchemy import select

from console import keys
from console.extensions import db
from console.models import Group, GroupModel, ModelPrice, utcnow
from console.pricing import Prices
from console.relay.errors import RelayError

CATALOG_TTL_S = 5.0
KEY_CACHE_TTL_S = 30.0
KEY_CACHE_MAX = 10_000


@dataclass(frozen=True)
class ModelInfo:
    id: int
    name: str
    provider: str
    kind: str
    prices: Prices
    max_output_tokens: int
    context_window: int


@dataclass(frozen=True)
class GroupInfo:
    id: int
    slug: str
    multiplier_ppm: int
    concurrency_limit: int
    rpm_limit: int
    models: tuple[str, ...]


@dataclass(frozen=True)
class Caller:
    key_id: int
    user_id: int
    group: GroupInfo
    spend_limit_micros: int | None
    model_allowlist: frozenset[str]
    key: keys.RelayKey  # the row read for this call, re-checked by the admission
    remembered: bool = False  # the row came from this process's key cache, not a read just now


def presented_secret(headers) -> str | None:
    auth = headers.get("Authorization", "")
    if auth[:7].lower() == "bearer ":
        return auth[7:].strip()
    return headers.get("x-api-key") or None


def _catalog() -> dict:
    app = current_app._get_current_object()
    c = app.extensions.get("relay_catalog")
    if c is None or time.monotonic() - c["at"] > CATALOG_TTL_S:
        models = {
            m.name: ModelInfo(m.id, m.name, m.provider, m.kind, Prices.of(m), m.max_output_tokens,
                              m.context_window)
            for m in db.session.scalars(select(ModelPrice).where(ModelPrice.enabled.is_(True)))
        }
        by_id = {m.id: m.name for m in models.values()}
        members: dict[int, list[str]] = {}
        for gid, mid in db.session.execute(select(GroupModel.group_id, GroupModel.model_id)):
            if mid in by_id:
                members.setdefault(gid, []).append(by_id[mid])
        groups = {
            g.id: GroupInfo(g.id, g.slug, g.multiplier_ppm, g.concurrency_limit, g.rpm_limit,
                            tuple(members.get(g.id, ())))
            for g in db.session.scalars(select(Group))
        }
        c = app.extensions["relay_catalog"] = {"at": time.monotonic(), "models": models, "groups": groups}
    return c


def invalidate_catalog() -> None:
    current_app.extensions.pop("relay_catalog", None)


def _key_cache() -> dict:
    return current_app.extensions.setdefault("relay_keys", {})


def _find_key(secret: str, *, remember: bool) -> tuple[keys.RelayKey | None, bool]:
    """(row or None, whether it came from the cache). Only usable keys are remembered."""
    if not keys.looks_like_key(secret):
        return None, False
    cache, digest, now = _key_cache(), keys.hash_secret(secret), time.monotonic()
    if remember:
        hit = cache.get(digest)
        if (hit is not None and now - hit[1] < KEY_CACHE_TTL_S
                and (hit[0].expires_at is None or hit[0].expires_at > utcnow())):
            return hit[0], True
    row = keys.relay_lookup(secret)
    if row is None:
        cache.pop(digest, None)
    else:
        if len(cache) >= KEY_CACHE_MAX:
            cache.clear()  # rare; the next calls read their keys again
        cache[digest] = (row, now)
    return row, False


def authenticate(secret: str | None, remote_addr: str | None, *, remember: bool = False) -> Caller:
    """The caller behind a presented key, or RelayError 401/403. The key is never echoed.

    remember=True: a row read by this process within KEY_CACHE_TTL_S may stand in for a read
    (billed calls only, whose admission re-checks it); a refusal is only ever decided on a
    fresh read."""
    key, remembered = _find_key(secret, remember=remember) if secret else (None, False)
    try:
        return _authorize(key, remote_addr, remembered)
    except RelayError:
        if not remembered:
            raise
    key, _ = _find_key(secret, remember=False)
    return _authorize(key, remote_addr, False)


def _authorize(key: keys.RelayKey | None, remote_addr: str | None, remembered: bool) -> Caller:
    if key is None:
        raise RelayError(401, "Invalid API key.", code="invalid_api_key")
    if not keys.ip_allowed(key, remote_addr):
        raise RelayError(403, "This key may not be used from this IP address.", code="ip_not_allowed")
    group = _catalog()["groups"].get(key.group_id or key.default_group_id)
    if group is None:
        raise RelayError(403, "This key has no group; choose one in the console.", code="no_group")
    return Caller(key.id, key.user_id, group, key.spend_limit_micros,
                  frozenset(keys.split_list(key.model_allowlist)), key, remembered)


def resolve_model(caller: Caller, name: str) -> ModelInfo:
    """The model if the caller's group serves it and the key allows it (404 unknown, 403 not allowed)."""
    model = _catalog()["models"].get(name)
    if model is None:
        raise RelayError(404, f"The model '{name[:100]}' does not exist.", code="model_not_found")
    if name not in caller.group.models:
        raise RelayError(403, f"The model '{name}' is not available in your group.", code="model_not_allowed")
    if caller.model_allowlist and name not in caller.model_allowlist:
        raise RelayError(403, f"This key may not use the model '{name}'.", code="model_not_allowed")
    return model


def group_models(caller: Caller) -> list[ModelInfo]:
    models = _catalog()["models"]
    names = [m for m in caller.group.models if not caller.model_allowlist or m in caller.model_allowlist]
    return [models[m] for m in names if m in models]
