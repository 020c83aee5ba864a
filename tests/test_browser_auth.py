"""In a real browser: sign up, htmx-boosted navigation, logout — with no CSP violation."""
from __future__ import annotations

import pytest

from tests.support.browser import browser_page
from tests.support.server import flask_cli, gunicorn

pytestmark = [pytest.mark.browser, pytest.mark.slow]


@pytest.fixture(scope="module")
def live(tmp_path_factory):
    url = f"sqlite:///{tmp_path_factory.mktemp('browser') / 'b.db'}"
    flask_cli(url, "db", "upgrade")
    flask_cli(url, "seed")
    with gunicorn(url, workers=1) as base:
        yield base


def test_signup_navigate_logout(live):
    """A visitor signs up, moves around with htmx boost, sees no CSP error, and logs out."""
    with browser_page() as page:
        page.goto(live + "/register")
        page.fill("input[name=email]", "browser@example.com")
        page.fill("input[name=password]", "a long browser password")
        page.click("button[type=submit]")
        page.wait_for_url(live + "/")
        assert page.locator("#balance-badge").is_visible()
        # htmx must be loaded and configured (boosted links, no eval).
        assert page.evaluate("window.htmx && htmx.config.allowEval === false")
        page.click("nav >> text=Pricing")
        page.wait_for_url(live + "/pricing")
        page.click("text=Log out")
        page.wait_for_url(live + "/login")
        assert not [e for e in page.errors if "Content Security Policy" in e], page.errors


def test_wrong_password_shows_inline_error(live):
    """A failed login re-renders the form with the error (htmx swaps the 422 fragment)."""
    with browser_page() as page:
        page.goto(live + "/login")
        page.fill("input[name=email]", "nobody@example.com")
        page.fill("input[name=password]", "wrong password!!")
        page.click("button[type=submit]")
        page.wait_for_selector("text=Wrong e-mail or password.")
        assert page.url.startswith(live + "/login")
        # The 422 itself is logged as a failed resource; anything else is a real error.
        assert not [e for e in page.errors if "422" not in e], page.errors
