"""Paused channels: the active probe that enables them again, its backoff, one prober at a time,
and calls preferring enabled channels. Against the real fake upstream on 127.0.0.1 (and a
real gunicorn server for the periodic probe); an httpx MockTransport only to give the probe
statuses the fake upstream does not answer to GET /v1/models."""
from __future__ import annotations

import time
from datetime import timedelta

import httpx
import pytest
from sqlalchemy import select, update

from console import channels
from console.database import write_tx
from console.extensions import db
from console.models import Channel, utcnow
from console.relay import probe
from console.relay.upstream import close_client
from tests.conftest import make_app
from tests.support.server import flask_cli, free_port, gunicorn
from tests.support.upstream import fake_last, fake_reset, fake_upstream, seed_catalog


@pytest.fixture(scope="module")
def upstream():
    with fake_upstream() as base:
        yield base


@pytest.fixture
def app(db_url, upstream):
    fake_reset(upstream)
    app = make_app(db_url, ALLOW_PRIVATE_UPSTREAMS=True)
    with app.app_context():
        db.create_all()
        seed_catalog()
        yield app
        close_client(app)
        db.session.remove()
        db.engine.dispose()


def paused(name: str, base_url: str, *, type: str = "openai", fail_count: int = 5,
           until: timedelta = -timedelta(seconds=1), secret: str = "sk-probe-channel-secret") -> int:
    """A channel paused by failures, its pause over by default."""
    ch = channels.create_channel(name=name, type=type, base_url=base_url, api_key=secret,
                                 models="gpt-4o-mini" if type == "openai" else "claude-haiku-4-5")
    cid = ch.id
    with write_tx():
        db.session.execute(update(Channel).where(Channel.id == cid).values(
            status="auto_disabled", fail_count=fail_count, disabled_until=utcnow() + until))
    channels.invalidate()
    db.session.remove()
    return cid


def channel(channel_id: int) -> Channel:
    db.session.remove()  # a fresh transaction: what other processes committed since
    return db.session.get(Channel, channel_id)


@pytest.mark.parametrize("type, path", [("openai", "/v1/models"), ("anthropic", "/v1/models")])
def test_a_paused_channel_that_answers_its_probe_is_enabled(app, upstream, type, path):
    """The probe asks the provider's model list with the channel's own key, and a healthy
    answer enables the channel with its failure count reset."""
    base = f"{upstream}/v1" if type == "openai" else upstream
    cid = paused("p", base, type=type, secret="sk-probe-channel-secret")
    assert probe.probe_due() == 1
    ch = channel(cid)
    assert (ch.status, ch.fail_count, ch.disabled_until) == ("enabled", 0, None)
    seen = fake_last(upstream)
    assert (seen["method"], seen["path"]) == ("GET", path)
    assert seen["credential"] == "sk-probe-channel-secret"
    assert seen["credential_header"] == ("x-api-key" if type == "anthropic" else "authorization")
    assert probe.probe_due() == 0  # nothing is paused any more


def test_a_dead_channel_is_paused_again_each_time_twice_as_long(app):
    cid = paused("dead", f"http://127.0.0.1:{free_port()}/v1")
    pauses = []
    for _ in range(6):
        start = utcnow()
        assert probe.probe_due() == 1
        ch = channel(cid)
        assert ch.status == "auto_disabled" and "probe" in ch.last_error
        pauses.append(round((ch.disabled_until - start).total_seconds() / 60))
        with write_tx():  # as if the pause were over
            db.session.execute(update(Channel).where(Channel.id == cid)
                               .values(disabled_until=utcnow() - timedelta(seconds=1)))
    assert pauses == [2, 4, 8, 15, 15, 15]  # minutes: 1 min after the 5th failure, doubling, capped
    assert channel(cid).fail_count == 11


def test_calls_already_under_way_do_not_lengthen_a_pause(app):
    """Failures reported while the channel is paused (calls routed before the pause) are not
    counted; only a failed probe, or a call after the pause, doubles it."""
    cid = paused("p", "http://127.0.0.1:9/v1", until=timedelta(seconds=60))
    until = channel(cid).disabled_until
    for _ in range(20):
        channels.record_failure(cid, "straggler")
    assert (channel(cid).fail_count, channel(cid).disabled_until) == (5, until)


@pytest.mark.parametrize("status, enabled", [(200, True), (404, True), (400, True),
                                             (401, False), (403, False), (429, False), (500, False),
                                             (503, False)])
def test_the_probe_draws_the_same_line_as_a_call(db_url, status, enabled):
    """Reachable and not refusing the key (even a 404 for the model list) is healthy;
    5xx, 429 and a refused key are not — what counts as a call's failure."""
    app = make_app(db_url, ALLOW_PRIVATE_UPSTREAMS=True,
                   RELAY_TRANSPORT=httpx.MockTransport(lambda request: httpx.Response(status, json={})))
    with app.app_context():
        db.create_all()
        cid = paused("mock", "http://127.0.0.1:9/v1")
        assert probe.probe_due() == 1
        assert (channel(cid).status == "enabled") is enabled
        db.session.remove()
        db.engine.dispose()


def test_channels_still_paused_or_disabled_by_staff_are_not_probed(app, upstream):
    waiting = paused("waiting", f"{upstream}/v1", until=timedelta(minutes=1))
    off = paused("off", f"{upstream}/v1")
    channels.set_enabled(off, False)
    assert probe.probe_due() == 0
    assert channel(waiting).status == "auto_disabled" and channel(off).status == "disabled"


def test_a_channel_is_probed_by_one_worker_at_a_time(app, upstream):
    """The claim is a conditional update: a second prober finds the pause extended and skips."""
    cid = paused("p", f"{upstream}/v1")
    assert probe._claim(cid) is True
    assert probe._claim(cid) is False
    assert channel(cid).disabled_until > utcnow() + timedelta(seconds=20)
    assert probe.probe_due() == 0


def test_calls_skip_a_paused_channel_while_an_enabled_one_serves_the_model(app, upstream):
    """A paused channel whose pause is over is used only when no enabled channel serves the model."""
    with write_tx():
        db.session.execute(update(Channel).values(status="disabled"))
    paused("paused", f"{upstream}/v1")
    ok = channels.create_channel(name="ok", type="openai", base_url=f"{upstream}/v1", api_key="k",
                                 models="gpt-4o-mini", priority=-5)
    channels.invalidate()
    assert [r.name for r in channels.candidates("openai", "gpt-4o-mini", "test")] == ["ok"]
    channels.set_enabled(ok.id, False)
    channels.invalidate()
    assert [r.name for r in channels.candidates("openai", "gpt-4o-mini", "test")] == ["paused"]


def test_channel_probe_cli_probes_what_is_due(app, upstream, db_url):
    cid = paused("p", f"{upstream}/v1")
    out = flask_cli(db_url, "channel-probe", env={"ALLOW_PRIVATE_UPSTREAMS": "1"})
    assert "probed 1 paused channels" in out.stdout
    assert channel(cid).status == "enabled"


@pytest.mark.slow
@pytest.mark.parametrize("worker_class", ["gevent", "gthread"])
def test_the_server_probes_paused_channels_by_itself(app, upstream, db_url, worker_class):
    """A real gunicorn: a channel whose pause is over is enabled again without any call, with
    the production worker class and with a threaded one."""
    cid = paused("p", f"{upstream}/v1")
    db.session.remove()
    env = {"ALLOW_PRIVATE_UPSTREAMS": "1", "CHANNEL_PROBE_EVERY_S": "0.5", "WORKER_CLASS": worker_class}
    with gunicorn(db_url, env=env):
        deadline = time.monotonic() + 15
        while channel(cid).status != "enabled":
            assert time.monotonic() < deadline, "the server never probed the paused channel"
            time.sleep(0.2)
    assert db.session.scalar(select(Channel.fail_count).where(Channel.id == cid)) == 0
