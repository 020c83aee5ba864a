"""Foundation: health, security headers, vendored htmx, page-or-fragment rendering."""
from __future__ import annotations

import hashlib
from pathlib import Path

from tests.support.web import HX, login, make_user

ROOT = Path(__file__).resolve().parents[1]
HTMX_SHA256 = "d6fdc75f204e6bdefa99b69bf1e6d4ac69b8a364f77929f45c13476b4000f717"
PUBLIC_PAGES = ["/", "/login", "/register", "/pricing", "/faq"]


def test_healthz_reports_database(client):
    """GET /healthz answers 200 JSON when the database is reachable."""
    resp = client.get("/healthz")
    assert resp.status_code == 200
    assert resp.get_json() == {"status": "ok", "database": "ok"}


def test_vendored_htmx_is_the_pinned_release():
    """The vendored htmx file is byte-for-byte htmx 2.0.11, shipped with its license."""
    data = (ROOT / "static/vendor/htmx-2.0.11.min.js").read_bytes()
    assert hashlib.sha256(data).hexdigest() == HTMX_SHA256
    assert "BSD" in (ROOT / "static/vendor/htmx-2.0.11.LICENSE").read_text() or "Zero-Clause" in (
        ROOT / "static/vendor/htmx-2.0.11.LICENSE").read_text()


def test_csp_is_strict_on_every_page(ctx, client):
    """Every console page carries a CSP without unsafe-inline or unsafe-eval, plus the other headers."""
    make_user()
    pages = list(PUBLIC_PAGES)
    for path in pages:
        resp = client.get(path)
        csp = resp.headers["Content-Security-Policy"]
        assert "unsafe-inline" not in csp and "unsafe-eval" not in csp
        assert "frame-ancestors 'none'" in csp and "script-src 'self'" in csp
        assert resp.headers["X-Content-Type-Options"] == "nosniff"
        assert resp.headers["Referrer-Policy"] == "same-origin"
        assert "HX-Request" in resp.headers.get("Vary", "")
    login(client)
    for rule in ctx.url_map.iter_rules():
        if "GET" in rule.methods and not rule.arguments and not rule.rule.startswith(("/v1", "/static")):
            resp = client.get(rule.rule)
            if resp.status_code == 200 and resp.mimetype == "text/html":
                csp = resp.headers["Content-Security-Policy"]
                assert "unsafe-inline" not in csp and "unsafe-eval" not in csp, rule.rule
                assert resp.headers["Cache-Control"] == "no-store", rule.rule


def test_templates_have_no_inline_script_or_style():
    """No inline <script>, style= attribute or <style> block anywhere (the CSP would block them)."""
    for path in (ROOT / "templates").rglob("*.html"):
        html = path.read_text()
        assert "<style" not in html, path
        assert " style=" not in html, path
        for chunk in html.split("<script")[1:]:
            assert chunk.lstrip().startswith("src="), f"inline script in {path}"
        assert "hx-on" not in html, f"hx-on needs eval, which the CSP forbids: {path}"


def test_htmx_config_is_csp_safe(client):
    """The page configures htmx without eval, inline indicator styles or script tags."""
    html = client.get("/").data.decode()
    assert '"allowEval":false' in html
    assert '"includeIndicatorStyles":false' in html
    assert '"allowScriptTags":false' in html
    assert 'hx-headers=\'{"X-CSRFToken": "' in html


def test_login_page_full_and_fragment(client):
    """The login URL renders the full page, or only its form for a targeted htmx request."""
    full = client.get("/login")
    assert b"<html" in full.data and b'id="login-form"' in full.data
    frag = client.get("/login", headers=HX)
    assert b"<html" not in frag.data and frag.data.lstrip().startswith(b'<form id="login-form"')
    boosted = client.get("/login", headers={**HX, "HX-Boosted": "true"})
    assert b"<html" in boosted.data


def test_request_size_is_limited(client):
    """A console POST over the size limit is refused with 413, not processed."""
    resp = client.post("/login", data={"email": "x" * (300 * 1024)})
    assert resp.status_code == 413


def test_unknown_page_is_404_html(client):
    """Unknown console paths give a 404 page."""
    resp = client.get("/no-such-page")
    assert resp.status_code == 404 and b"<html" in resp.data


def test_relay_errors_are_json(client):
    """Unknown relay paths answer in the API's JSON error shape, not HTML."""
    resp = client.post("/v1/no-such-endpoint", json={})
    assert resp.status_code == 404
    assert resp.get_json()["error"]["message"]
