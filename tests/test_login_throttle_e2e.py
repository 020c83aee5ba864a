"""Login throttling holds across gunicorn workers when Redis is the limiter's storage."""
from __future__ import annotations

import re
import uuid

import httpx
import pytest

from tests.conftest import need_redis
from tests.support.server import flask_cli, gunicorn, migrate
from tests.support.web import PASSWORD

pytestmark = pytest.mark.slow


def _attempt(base: str, password: str) -> int:
    # A new connection per attempt, so attempts spread over the workers.
    with httpx.Client(base_url=base, timeout=10) as c:
        page = c.get("/login")
        token = re.search(r'name="csrf_token"[^>]*value="([^"]+)"', page.text).group(1)
        resp = c.post("/login", data={"email": "victim@example.com", "password": password,
                                      "csrf_token": token})
        return resp.status_code


def test_login_throttle_shared_across_workers(db_url):
    """With REDIS_URL set, N failures across 3 workers trip the limit for every worker."""
    redis_url = need_redis()
    migrate(db_url)
    flask_cli(db_url, "create-user", "victim@example.com", "--password", PASSWORD)
    env = {"REDIS_URL": redis_url, "LOGIN_LIMITS": "4 per 15 minutes",
           "RATELIMIT_KEY_PREFIX": f"test-{uuid.uuid4().hex}"}
    with gunicorn(db_url, workers=3, env=env) as base:
        statuses = [_attempt(base, "wrong password!!") for _ in range(4)]
        assert statuses == [422] * 4
        # Every further attempt, on whichever worker, is refused — even the right password.
        after = [_attempt(base, PASSWORD) for _ in range(6)]
        assert after == [429] * 6
