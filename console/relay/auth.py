"""Relay authentication and the per-call policy: who is calling, with which group and model.

The key is looked up by its SHA-256 on every call (one query joined with its owner), so a
disabled, expired or deleted key stops at once in every worker. Groups and model prices
change rarely and are cached per process for `CATALOG_TTL_S` seconds (the hot path then
runs no catalog query). Cookies are never read here: only `Authorization: Bearer` or
`x-api-key`.
"""
from __future__ import annotations

import time
from dataclasses import dataclass

from flask import current_app
from sqlalchemy import select

from console import keys
from console.extensions import db
from console.models import Group, GroupModel, ModelPrice
from console.pricing import Prices
from console.relay.errors import RelayError

CATALOG_TTL_S = 5.0


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


def authenticate(secret: str | None, remote_addr: str | None) -> Caller:
    """The caller behind a presented key, or RelayError 401/403. The key is never echoed."""
    key = keys.relay_lookup(secret) if secret else None
    if key is None:
        raise RelayError(401, "Invalid API key.", code="invalid_api_key")
    if not keys.ip_allowed(key, remote_addr):
        raise RelayError(403, "This key may not be used from this IP address.", code="ip_not_allowed")
    group = _catalog()["groups"].get(key.group_id or key.default_group_id)
    if group is None:
        raise RelayError(403, "This key has no group; choose one in the console.", code="no_group")
    return Caller(key.id, key.user_id, group, key.spend_limit_micros,
                  frozenset(keys.split_list(key.model_allowlist)))


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
