"""In a real browser with htmx: redeem a voucher (badge updates in place), create a key
that the relay then accepts — no full page reload, no CSP violation. And a web app on another
origin calling the relay with a key (CORS), which the console's own pages do not allow."""
from __future__ import annotations

import csv
import functools
import threading
from http.server import SimpleHTTPRequestHandler, ThreadingHTTPServer

import httpx
import pytest

from tests.support.browser import browser_page
from tests.support.server import flask_cli, gunicorn
from tests.support.web import PASSWORD

pytestmark = [pytest.mark.browser, pytest.mark.slow]


@pytest.fixture(scope="module")
def live(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("browser-console")
    url = f"sqlite:///{tmp / 'c.db'}"
    flask_cli(url, "db", "upgrade")
    flask_cli(url, "seed")
    flask_cli(url, "create-user", "shopper@example.com", "--password", PASSWORD)
    out = tmp / "codes.csv"
    flask_cli(url, "mint-vouchers", "--count", "1", "--value", "12.5", "--out", str(out))
    with out.open() as fh:
        code = next(csv.DictReader(fh))["code"]
    with gunicorn(url, workers=1) as base:
        yield base, code, url


def _login(page, base):
    page.goto(base + "/login")
    page.fill("input[name=email]", "shopper@example.com")
    page.fill("input[name=password]", PASSWORD)
    page.click("form#login-form button[type=submit]")
    page.wait_for_url(base + "/")


def test_redeem_updates_badge_in_place(live):
    """Redeeming swaps the form, updates the nav badge out of band and shows a toast, without a reload."""
    base, code, _url = live
    with browser_page() as page:
        _login(page, base)
        page.goto(base + "/wallet/")
        assert page.locator("#balance-badge").inner_text().strip() == "¥0.00"
        page.evaluate("window.__marker = 1")  # survives only if the page is not reloaded
        page.fill("#redeem-form input[name=code]", code.lower().replace("-", " "))
        page.click("#redeem-form button[type=submit]")
        # A locator assertion waits without evaluating a string in the page (the CSP forbids eval).
        from playwright.sync_api import expect

        expect(page.locator("#balance-badge")).to_have_text("¥12.50")
        page.wait_for_selector("#toasts .toast-success")
        assert page.evaluate("window.__marker") == 1
        # The same code again: an inline error in the re-rendered form, balance unchanged.
        page.fill("#redeem-form input[name=code]", code)
        page.click("#redeem-form button[type=submit]")
        page.wait_for_selector("#redeem-error")
        assert page.locator("#balance-badge").inner_text().strip() == "¥12.50"
        real = [e for e in page.errors if "422" not in e]
        assert not real, real


def test_created_key_is_shown_once_and_works_on_the_relay(live):
    """A key created in the browser appears once, and the relay accepts it for /v1/models."""
    base, _code, _url = live
    with browser_page() as page:
        _login(page, base)
        page.goto(base + "/keys/")
        page.fill("input[name=name]", "browser key")
        page.click("text=Create key")
        page.wait_for_selector("#new-key-secret")
        secret = page.locator("#new-key-secret").inner_text().strip()
        assert secret.startswith("sk-")
        assert page.locator("#key-secret").get_attribute("hx-history") == "false"
        page.reload()
        assert secret not in page.content()
        assert not page.errors, page.errors
    resp = httpx.get(base + "/v1/models", headers={"Authorization": f"Bearer {secret}"})
    assert resp.status_code == 200 and resp.json()["data"]


APP_PAGE = "<!doctype html><title>a chat app</title><p>elsewhere</p>"


def test_a_web_app_on_another_origin_calls_the_relay_but_cannot_read_the_console(live, tmp_path):
    """A page served from another origin fetches /v1 with a key (a preflighted request) and
    reads the reply and its x-request-id; its fetch of a console page is refused by the browser."""
    base, _code, url = live
    secret = flask_cli(url, "create-key", "shopper@example.com", "--name", "web app").stdout.strip().splitlines()[-1]
    (tmp_path / "index.html").write_text(APP_PAGE)
    handler = functools.partial(SimpleHTTPRequestHandler, directory=str(tmp_path))
    handler.log_message = lambda *a: None
    site = ThreadingHTTPServer(("127.0.0.1", 0), handler)
    threading.Thread(target=site.serve_forever, daemon=True).start()
    try:
        with browser_page() as page:
            page.goto(f"http://127.0.0.1:{site.server_port}/index.html")
            got = page.evaluate("""async ([base, key]) => {
                const r = await fetch(base + "/v1/models", {headers: {"Authorization": "Bearer " + key}});
                return {status: r.status, id: r.headers.get("x-request-id"), models: (await r.json()).data.length};
            }""", [base, secret])
            assert got["status"] == 200 and got["id"].startswith("req_") and got["models"] > 0
            refused = page.evaluate("""async (base) => {
                try { await fetch(base + "/login"); return "read"; } catch (e) { return e.name; }
            }""", base)
            assert refused == "TypeError"
    finally:
        site.shutdown()
        site.server_close()
