"""Active re-probe of paused channels.

A channel that fails `channels.FAIL_THRESHOLD` times in a row is paused (auto-disabled,
channels.record_failure), each pause twice as long as the last (1 min up to 15 min). When a
pause ends, a server worker probes the channel with the provider's free model list
(`GET …/models` with the channel's key): an answer that is not a 5xx, 429, 401 or 403 — the
statuses a relay call counts as the channel's failure — re-enables it; no answer or one of
those pauses it again. Every worker runs `probe_due()` every `CHANNEL_PROBE_EVERY_S` seconds;
a probe first claims its channel with a conditional update, so a channel is probed by one
worker at a time, whatever the number of workers and hosts. `flask --app app channel-probe`
runs the same pass once.

Real calls skip a paused channel while another channel serves the model (channels.candidates).
"""
from __future__ import annotations

from datetime import timedelta

import httpx
from flask import current_app
from sqlalchemy import select, update

from console import channels
from console.database import write_tx
from console.extensions import db
from console.logging_setup import redact
from console.models import Channel, utcnow
from console.relay.upstream import client, discard, request_headers

PROBE_PATHS = {"openai": "/models", "anthropic": "/v1/models"}
PROBE_TIMEOUT_S = 10.0
# While a probe is out its channel stays paused this much longer, which is also what keeps
# other workers from probing it at the same time.
_CLAIM = timedelta(seconds=PROBE_TIMEOUT_S * 3)


def healthy(status: int) -> bool:
    """The same line a relay call draws (upstream.open_call): 5xx, 429, 401 and 403 are failures."""
    return status < 500 and status not in (401, 403, 429)


def _due() -> list[int]:
    now = utcnow()
    ids = db.session.scalars(
        select(Channel.id).where(Channel.status == "auto_disabled")
        .where((Channel.disabled_until.is_(None)) | (Channel.disabled_until <= now))
        .order_by(Channel.id)).all()
    db.session.remove()
    return list(ids)


def _claim(channel_id: int) -> bool:
    """True if this process may probe the channel now (its pause is over and nobody else took it)."""
    now = utcnow()
    with write_tx():
        claimed = db.session.execute(
            update(Channel).where(Channel.id == channel_id, Channel.status == "auto_disabled")
            .where((Channel.disabled_until.is_(None)) | (Channel.disabled_until <= now))
            .values(disabled_until=now + _CLAIM)
        ).rowcount
    return claimed == 1


def probe_one(route: channels.Route) -> str | None:
    """None if the channel answered as a healthy one, else what went wrong (no secret, no URL)."""
    headers = request_headers(route, {})
    headers.pop("content-type", None)
    http = client()
    req = http.build_request("GET", route.base_url + PROBE_PATHS[route.type], headers=headers,
                             timeout=httpx.Timeout(PROBE_TIMEOUT_S))
    try:
        resp = http.send(req, stream=True)  # the status is the answer: the list is not read on
    except httpx.HTTPError as exc:
        return redact(f"probe: {type(exc).__name__}")
    discard(resp)
    return None if healthy(resp.status_code) else f"probe: upstream status {resp.status_code}"


def probe_due() -> int:
    """Probe every paused channel whose pause is over; returns how many this process probed."""
    probed = 0
    for channel_id in _due():
        if not _claim(channel_id):
            continue
        channels.invalidate()
        route = next((r for r in channels.routes() if r.id == channel_id), None)
        db.session.remove()
        if route is None:  # disabled by staff meanwhile, or its secret cannot be decrypted
            continue
        probed += 1
        error = probe_one(route)
        if error is None:
            channels.record_success(route)
            current_app.logger.info("channel %s answered its probe; enabled again", channel_id)
        else:
            channels.record_failure(channel_id, error, probe=True)
            current_app.logger.warning("channel %s failed its probe (%s); paused again", channel_id, error)
    return probed
