"""Upstream channels: CRUD, secret encryption, routing and health.

Owns the `channels` table. A channel's secret is encrypted with Fernet under a key derived
(HKDF-SHA256) from CHANNEL_KEY, or SECRET_KEY when no separate key is set; it is decrypted
only in memory to call the upstream and is never shown, logged or put in an exception.

Routing: among the enabled channels of the right type that serve the model and the group, the
highest priority wins; within one priority, a weighted random order. A channel that fails
`FAIL_THRESHOLD` times in a row is auto-disabled (paused) for `PROBE_INTERVAL`, each further
failure doubling the pause up to `MAX_PAUSE`. When the pause ends, the server probes the channel
(console/relay/probe.py) and a healthy answer enables it again. Calls skip a paused channel
while an enabled one serves the model; if none does, a channel whose pause is over is tried
(a success re-enables it), so a model is not refused just because its only channel awaits a probe.
Each process caches the channel list for `CACHE_TTL_S` seconds so the hot path runs no query.
"""
from __future__ import annotations

import base64
import ipaddress
import random
import socket
import time
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from urllib.parse import urlsplit

from cryptography.fernet import Fernet, InvalidToken
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.kdf.hkdf import HKDF
from flask import current_app
from sqlalchemy import or_, select, update

from console.database import write_tx
from console.extensions import db
from console.models import Channel, utcnow

TYPES = ("openai", "anthropic")
FAIL_THRESHOLD = 5
PROBE_INTERVAL = timedelta(seconds=60)
MAX_PAUSE = timedelta(minutes=15)
CACHE_TTL_S = 2.0


class ChannelError(ValueError):
    """Invalid channel input; the message is safe to show staff (it never holds the secret)."""


# ---- secrets -------------------------------------------------------------------------------

def _fernet() -> Fernet:
    app = current_app._get_current_object()
    f = app.extensions.get("channel_fernet")
    if f is None:
        master = (app.config.get("CHANNEL_KEY") or app.config["SECRET_KEY"]).encode()
        key = HKDF(algorithm=hashes.SHA256(), length=32, salt=None,
                   info=b"relay-console channel secrets v1").derive(master)
        f = app.extensions["channel_fernet"] = Fernet(base64.urlsafe_b64encode(key))
    return f


def encrypt_secret(secret: str) -> str:
    return _fernet().encrypt(secret.encode()).decode()


def decrypt_secret(token: str) -> str:
    try:
        return _fernet().decrypt(token.encode()).decode()
    except InvalidToken:
        # Never include the token: a wrong CHANNEL_KEY must not leak ciphertext into logs.
        raise ChannelError("channel secret cannot be decrypted (CHANNEL_KEY changed?)") from None


# ---- validation ----------------------------------------------------------------------------

def is_public_address(address: str) -> bool:
    """False for loopback, private, link-local (cloud metadata), ULA, reserved, multicast and
    unspecified addresses. Used when a channel is saved and again on every upstream connection
    (relay/upstream.py pins the address it checked)."""
    ip = ipaddress.ip_address(address.split("%")[0])
    return not (ip.is_private or ip.is_loopback or ip.is_link_local or ip.is_reserved
                or ip.is_multicast or ip.is_unspecified)


def _private(host: str) -> bool:
    try:
        infos = socket.getaddrinfo(host, None)
    except OSError:
        raise ChannelError("The base URL's host does not resolve.") from None
    return any(not is_public_address(info[4][0]) for info in infos)


def validate_base_url(url: str, *, allow_private: bool) -> str:
    """https and a public address, unless private upstreams are allowed (demo, tests)."""
    url = (url or "").strip().rstrip("/")
    if not url or len(url) > 500:
        raise ChannelError("Enter a base URL such as https://api.openai.com/v1.")
    parts = urlsplit(url)
    if parts.scheme not in ("https", "http") or not parts.hostname:
        raise ChannelError("The base URL must be an absolute https URL.")
    if parts.username or parts.password or parts.query or parts.fragment:
        raise ChannelError("The base URL must not carry credentials, a query or a fragment.")
    if not allow_private:
        if parts.scheme != "https":
            raise ChannelError("The base URL must use https.")
        if _private(parts.hostname):
            raise ChannelError("The base URL points at a private or loopback address.")
    return url


def parse_models(raw: str) -> dict[str, str]:
    """'a, b=upstream-b' → {'a': 'a', 'b': 'upstream-b'} (public name → upstream name)."""
    out: dict[str, str] = {}
    for item in (raw or "").split(","):
        item = item.strip()
        if not item:
            continue
        public, _, upstream = item.partition("=")
        public, upstream = public.strip(), (upstream.strip() or public.strip())
        if not public or len(public) > 100 or len(upstream) > 200 or any(c.isspace() for c in public + upstream):
            raise ChannelError(f"Invalid model entry: {item[:60]!r}.")
        out[public] = upstream
    if not out:
        raise ChannelError("List at least one model.")
    return out


def _names(raw: str) -> list[str]:
    return [s.strip() for s in (raw or "").split(",") if s.strip()]


# ---- CRUD ----------------------------------------------------------------------------------

def create_channel(*, name: str, type: str, base_url: str, api_key: str, models: str,
                   groups: str = "", priority: int = 0, weight: int = 1) -> Channel:
    name = (name or "").strip()
    if not name or len(name) > 80:
        raise ChannelError("Enter a name (at most 80 characters).")
    if type not in TYPES:
        raise ChannelError("Type must be openai or anthropic.")
    if not api_key or len(api_key) > 1000 or any(c.isspace() for c in api_key):
        raise ChannelError("Enter the upstream API key.")
    if not (-1000 <= int(priority) <= 1000) or not (1 <= int(weight) <= 1000):
        raise ChannelError("Priority must be -1000..1000 and weight 1..1000.")
    url = validate_base_url(base_url, allow_private=current_app.config.get("ALLOW_PRIVATE_UPSTREAMS", False))
    mapping = parse_models(models)
    with write_tx():
        if db.session.scalar(select(Channel.id).where(Channel.name == name)):
            raise ChannelError("A channel with this name exists.")
        ch = Channel(name=name, type=type, base_url=url, secret_enc=encrypt_secret(api_key),
                     models=",".join(k if k == v else f"{k}={v}" for k, v in mapping.items()),
                     groups=",".join(_names(groups)), priority=int(priority), weight=int(weight),
                     status="enabled", fail_count=0)
        db.session.add(ch)
        db.session.flush()
    invalidate()
    return ch


def list_channels() -> list[Channel]:
    return list(db.session.scalars(select(Channel).order_by(Channel.priority.desc(), Channel.id)))


def set_enabled(channel_id: int, enabled: bool) -> Channel:
    with write_tx():
        ch = db.session.get(Channel, channel_id)
        if ch is None:
            raise LookupError(channel_id)
        ch.status = "enabled" if enabled else "disabled"
        ch.fail_count = 0
        ch.disabled_until = None
    invalidate()
    return ch


# ---- routing -------------------------------------------------------------------------------

@dataclass(frozen=True)
class Route:
    """A channel as the relay sees it (secret decrypted, in memory only)."""

    id: int
    name: str
    type: str
    base_url: str
    secret: str = field(repr=False)
    models: dict[str, str]
    groups: frozenset[str]
    priority: int
    weight: int
    status: str
    fail_count: int
    disabled_until: datetime | None

    def serves(self, kind: str, model: str, group_slug: str) -> bool:
        return (self.type == kind and model in self.models
                and (not self.groups or group_slug in self.groups))

    def eligible(self, now: datetime) -> bool:
        if self.status == "enabled":
            return True
        return self.status == "auto_disabled" and (self.disabled_until is None or self.disabled_until <= now)


def _cache() -> dict:
    return current_app.extensions.setdefault("channel_cache", {"at": 0.0, "routes": []})


def invalidate() -> None:
    _cache()["at"] = 0.0


def routes() -> list[Route]:
    c = _cache()
    if time.monotonic() - c["at"] > CACHE_TTL_S:
        rows = db.session.scalars(select(Channel).where(Channel.status != "disabled")).all()
        out = []
        for ch in rows:
            try:
                secret = decrypt_secret(ch.secret_enc)
            except ChannelError:
                current_app.logger.error("channel %s: secret cannot be decrypted; skipped", ch.id)
                continue
            out.append(Route(ch.id, ch.name, ch.type, ch.base_url, secret, parse_models(ch.models),
                             frozenset(_names(ch.groups)), ch.priority, ch.weight, ch.status,
                             ch.fail_count, ch.disabled_until))
        c["routes"], c["at"] = out, time.monotonic()
    return c["routes"]


def candidates(kind: str, model: str, group_slug: str, rng: random.Random | None = None) -> list[Route]:
    """Channels to try, best first: priority descending, weighted random order within a tier."""
    rng = rng or random
    now = utcnow()
    serving = [r for r in routes() if r.serves(kind, model, group_slug)]
    usable = [r for r in serving if r.status == "enabled"] or [r for r in serving if r.eligible(now)]
    out: list[Route] = []
    for prio in sorted({r.priority for r in usable}, reverse=True):
        tier = [r for r in usable if r.priority == prio]
        while tier:
            pick = rng.choices(tier, weights=[r.weight for r in tier])[0]
            out.append(pick)
            tier.remove(pick)
    return out


# ---- health --------------------------------------------------------------------------------

def pause_after(failures: int) -> timedelta:
    """How long a channel is paused after this many consecutive failures (≥ FAIL_THRESHOLD)."""
    return min(PROBE_INTERVAL * 2 ** min(max(failures - FAIL_THRESHOLD, 0), 10), MAX_PAUSE)


def record_failure(channel_id: int, error: str, *, probe: bool = False) -> None:
    """Count a consecutive failure; at the threshold the channel is paused (auto-disabled).

    Failures of calls that were already under way when the channel was paused are not counted
    (a burst of them would stretch the first pause to the longest); a failed probe, or a call
    that tried the channel after its pause, counts and doubles the pause."""
    now = utcnow()
    with write_tx():
        stmt = update(Channel).where(Channel.id == channel_id)
        if not probe:
            stmt = stmt.where(or_(Channel.status != "auto_disabled", Channel.disabled_until.is_(None),
                                  Channel.disabled_until <= now))
        row = db.session.execute(
            stmt.values(fail_count=Channel.fail_count + 1, last_error=error[:500])
            .returning(Channel.fail_count, Channel.status)
        ).first()
        if row and row[0] >= FAIL_THRESHOLD and row[1] != "disabled":
            db.session.execute(
                update(Channel).where(Channel.id == channel_id)
                .values(status="auto_disabled", disabled_until=now + pause_after(row[0]))
            )
    invalidate()


def record_success(route: Route) -> None:
    """Reset the failure count; only writes when there was something to reset."""
    if route.fail_count == 0 and route.status == "enabled":
        return
    with write_tx():
        db.session.execute(
            update(Channel).where(Channel.id == route.id, Channel.status != "disabled")
            .values(fail_count=0, status="enabled", disabled_until=None)
        )
    invalidate()
