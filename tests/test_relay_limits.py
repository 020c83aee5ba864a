"""Per-key requests-per-minute limits of a group, in-process and across gunicorn workers."""
from __future__ import annotations

import time
import uuid

import httpx
import pytest

from console import keys
from console.extensions import db
from console.relay.upstream import close_client
from tests.conftest import make_app, need_redis
from tests.support.server import gunicorn
from tests.support.upstream import add_channels, fake_upstream, make_account, seed_catalog

CALL = {"model": "gpt-4o-mini", "messages": [{"role": "user", "content": "hi"}]}


@pytest.fixture(scope="module")
def upstream():
    with fake_upstream(chunks=2) as base:
        yield base


def _setup(db_url: str, upstream: str, rpm: int):
    app = make_app(db_url, ALLOW_PRIVATE_UPSTREAMS=True)
    with app.app_context():
        db.create_all()
        gid = seed_catalog(rpm=rpm)
        acct = make_account(gid)
        _key, second = keys.create_key(acct.user_id, "second key", group_id=gid)
        add_channels(upstream)
        db.session.remove()
    return app, acct, second


@pytest.fixture
def limited(db_url, upstream):
    """_setup(rpm) for a test; every app it made is closed afterwards, also when the test failed
    (an unclosed upstream connection would fail whichever later test collects it)."""
    apps = []

    def make(rpm: int):
        made = _setup(db_url, upstream, rpm)
        apps.append(made[0])
        return made

    yield make
    for app in apps:
        close_client(app)
        with app.app_context():
            db.engine.dispose()


def _inside_one_window(window_s: float = 60.0, margin_s: float = 5.0) -> None:
    """Start a test's counted calls well inside one rate-limit window. The sliding-window counter
    weighs the previous window's hits by the share of it still in the last minute, so calls that
    straddle a window edge (every whole minute) may count as one fewer: 2 hits then one more
    just after the edge weigh floor(1.99) + 1 = 2, within a limit of 2."""
    left = window_s - time.time() % window_s
    if left < margin_s:
        time.sleep(left + 0.05)


def test_rpm_is_counted_per_key(limited):
    """With rpm 2, a key's third call in a minute is 429 with Retry-After; another key still works."""
    app, acct, second = limited(rpm=2)
    client = app.test_client()
    _inside_one_window()
    auth = {"Authorization": f"Bearer {acct.key}"}
    assert [client.post("/v1/chat/completions", json=CALL, headers=auth).status_code
            for _ in range(2)] == [200, 200]
    refused = client.post("/v1/chat/completions", json=CALL, headers=auth)
    assert refused.status_code == 429
    assert int(refused.headers["Retry-After"]) >= 1
    assert refused.get_json()["error"]["type"] == "rate_limit_error"
    other = client.post("/v1/chat/completions", json=CALL, headers={"Authorization": f"Bearer {second}"})
    assert other.status_code == 200


@pytest.mark.slow
def test_rpm_is_shared_across_workers_with_redis(db_url, limited):
    """With REDIS_URL, the per-key limit holds across 3 gunicorn workers (new connection per call)."""
    redis_url = need_redis()
    _app, acct, _second = limited(rpm=3)
    env = {"REDIS_URL": redis_url, "ALLOW_PRIVATE_UPSTREAMS": "1",
           "RATELIMIT_KEY_PREFIX": f"test-{uuid.uuid4().hex}"}
    with gunicorn(db_url, workers=3, env=env) as base:
        codes = []
        _inside_one_window()
        for _ in range(7):
            with httpx.Client(base_url=base, timeout=10) as c:
                codes.append(c.post("/v1/chat/completions", json=CALL,
                                    headers={"Authorization": f"Bearer {acct.key}"}).status_code)
    assert codes == [200] * 3 + [429] * 4


def test_redis_outage_does_not_take_the_relay_down(limited):
    """Redis unreachable: calls are still served (never a 500), and each worker keeps counting
    the per-key limit in its own memory until Redis is back."""
    from tests.support.server import free_port

    app, acct, _second = limited(rpm=2)
    app.config["RATELIMIT_STORAGE_URI"] = f"redis://127.0.0.1:{free_port()}/0"
    client = app.test_client()
    auth = {"Authorization": f"Bearer {acct.key}"}
    _inside_one_window()
    codes = [client.post("/v1/chat/completions", json=CALL, headers=auth).status_code for _ in range(3)]
    assert codes == [200, 200, 429]


def test_a_redis_that_never_answers_costs_a_call_at_most_a_second(limited):
    """Redis accepts connections but never replies: the first call waits for the socket timeout
    (1 s; redis-py's own default is 5 s), then the limits count in memory and the next calls do
    not wait at all. The bound checked is the stall an outage causes, not a speed target."""
    import socket
    import threading

    silent = socket.socket()
    silent.bind(("127.0.0.1", 0))
    silent.listen(16)
    held = []
    threading.Thread(target=lambda: [held.append(silent.accept()) for _ in range(16)], daemon=True).start()
    app, acct, _second = limited(rpm=100)
    app.config["RATELIMIT_STORAGE_URI"] = f"redis://127.0.0.1:{silent.getsockname()[1]}/0"
    client = app.test_client()
    auth = {"Authorization": f"Bearer {acct.key}"}
    started = time.monotonic()
    assert client.post("/v1/chat/completions", json=CALL, headers=auth).status_code == 200
    first = time.monotonic() - started
    started = time.monotonic()
    assert [client.post("/v1/chat/completions", json=CALL, headers=auth).status_code
            for _ in range(3)] == [200, 200, 200]
    rest = time.monotonic() - started
    assert 0.9 <= first < 3.5 and rest < first
    silent.close()
    for conn, _addr in held:
        conn.close()


def test_in_memory_limits_start_no_timer_per_call_and_still_count_and_sweep(monkeypatch):
    """Without Redis the limits count in each worker's memory. limits' own storage starts a
    timer thread 10 ms after a hit whenever none runs (~0.5 ms of CPU each under gevent); the
    relay's sweeps inline at most once a second, and counts the same."""
    import threading

    from limits import RateLimitItemPerMinute
    from limits.strategies import SlidingWindowCounterRateLimiter

    from console.relay.metering import SweptMemoryStorage

    started = []

    class CountingTimer(threading.Timer):
        def start(self):
            started.append(self)
            super().start()

    monkeypatch.setattr(threading, "Timer", CountingTimer)
    storage = SweptMemoryStorage("memory://")
    limiter = SlidingWindowCounterRateLimiter(storage)
    item = RateLimitItemPerMinute(3)
    allowed = []
    _inside_one_window(margin_s=1.0)
    for _ in range(5):
        time.sleep(0.02)  # the stock storage's timer has ended: it would start another one
        allowed.append(limiter.hit(item, "relay", "key-1"))
    assert allowed == [True, True, True, False, False]
    assert len(started) == 1  # the constructor's, never one per hit

    storage.incr("stopped-calling", expiry=0.01)
    time.sleep(0.02)
    storage._next_sweep = 0.0  # the next hit is due to sweep
    limiter.hit(item, "relay", "key-2")
    assert "stopped-calling" not in storage.storage and "stopped-calling" not in storage.expirations
