"""Wallet pages and the htmx redeem flow: fragments, out-of-band badge, toasts, PRG, throttling."""
from __future__ import annotations

import json

from sqlalchemy import select

from console import ledger, settings, vouchers
from console.extensions import db
from console.models import User
from tests.conftest import make_app
from tests.support.web import HX, csrf_from, login, make_user


def uid(email: str = "user@example.com") -> int:
    return db.session.scalar(select(User.id).where(User.email == email))


def mint(n: int = 1, credits: int = 50, **kw) -> list[str]:
    return vouchers.mint_batch(n, credits * 1_000_000, **kw)[1]


def balance(user_id: int) -> int:
    db.session.expire_all()
    return ledger.wallet_of(user_id).balance_micros


def test_wallet_page_shows_balances_purchase_and_support(ctx, client):
    """The wallet page shows balance, held and available, the redeem form, purchase link and support contact."""
    make_user()
    settings.put("purchase_url", "https://shop.example.com/cards")
    settings.put("support_contact", "WeChat: relay-help")
    u = uid()
    ledger.credit(u, 30_000_000, kind="voucher_credit")
    ledger.hold(u, 5_000_000)
    login(client)
    html = client.get("/wallet/").get_data(as_text=True)
    assert 'id="wallet-summary"' in html and 'id="redeem-form"' in html and 'id="ledger-history"' in html
    assert "¥25.00" in html and "¥30.00" in html and "¥5.00" in html  # available, balance, held
    assert 'href="https://shop.example.com/cards"' in html and "WeChat: relay-help" in html
    assert "Buy a redemption code" in html and "/faq#how-to-purchase" in html


def test_purchase_link_must_be_http(ctx, client):
    """A purchase URL that is not http(s) is not rendered as a link."""
    make_user()
    settings.put("purchase_url", "javascript:alert(1)")
    login(client)
    assert "javascript:" not in client.get("/wallet/").get_data(as_text=True)


def test_htmx_redeem_returns_form_oob_badge_and_toast(ctx, client):
    """htmx redeem: 200, the form fragment, OOB badge and summary, HX-Trigger toast JSON, credit applied."""
    make_user()
    code = mint(credits=50)[0]
    login(client)
    token = csrf_from(client.get("/wallet/").data)
    resp = client.post("/wallet/redeem", data={"code": code.lower(), "csrf_token": token}, headers=HX)
    assert resp.status_code == 200
    html = resp.get_data(as_text=True)
    assert html.lstrip().startswith('<form id="redeem-form"') and "<html" not in html
    assert 'id="balance-badge"' in html and html.count('hx-swap-oob="true"') == 2
    assert 'id="wallet-summary"' in html and "¥50.00" in html
    events = json.loads(resp.headers["HX-Trigger"])
    assert events["toast"]["level"] == "success" and "¥50.00" in events["toast"]["message"]
    assert events["wallet-changed"] is True
    assert "HX-Request" in resp.headers["Vary"]
    assert balance(uid()) == 50_000_000


def test_htmx_redeem_error_is_422_with_inline_error(ctx, client):
    """An unknown code over htmx: 422, the form fragment with the inline error, no toast, no credit."""
    make_user()
    login(client)
    token = csrf_from(client.get("/wallet/").data)
    resp = client.post("/wallet/redeem", data={"code": "ABCD-EFGH-JKMN-PQRS-TUVW", "csrf_token": token},
                       headers=HX)
    assert resp.status_code == 422
    html = resp.get_data(as_text=True)
    assert html.lstrip().startswith('<form id="redeem-form"') and 'role="alert"' in html
    assert "does not exist" in html and 'value="ABCD-EFGH-JKMN-PQRS-TUVW"' in html
    assert "HX-Trigger" not in resp.headers
    assert balance(uid()) == 0


def test_plain_redeem_is_post_redirect_get_with_flash(ctx, client):
    """Without htmx a redemption redirects (302) to the wallet, which shows the flash and new balance."""
    make_user()
    code = mint(credits=7)[0]
    login(client)
    token = csrf_from(client.get("/wallet/").data)
    resp = client.post("/wallet/redeem", data={"code": code, "csrf_token": token})
    assert resp.status_code == 302 and resp.headers["Location"].endswith("/wallet/")
    page = client.get("/wallet/").get_data(as_text=True)
    assert "Redeemed ¥7.00" in page and "code …" + code[-4:] in page


def test_plain_redeem_error_renders_page_422(ctx, client):
    """Without htmx a bad code re-renders the whole wallet page with 422 and the message."""
    make_user()
    login(client)
    token = csrf_from(client.get("/wallet/").data)
    resp = client.post("/wallet/redeem", data={"code": "not a code", "csrf_token": token})
    assert resp.status_code == 422
    assert b"<html" in resp.data and b"That is not a voucher code" in resp.data


def test_redeem_without_csrf_token_is_400(ctx, client):
    """A redemption without the CSRF token is refused with 400 and credits nothing."""
    make_user()
    code = mint()[0]
    login(client)
    resp = client.post("/wallet/redeem", data={"code": code}, headers=HX)
    assert resp.status_code == 400
    assert balance(uid()) == 0
    assert vouchers.redeem(uid(), code).value_micros == 50_000_000  # the code is still unused


def test_wallet_needs_login(client):
    """Anonymous users are sent to log in; an htmx request gets 401 with HX-Redirect."""
    assert client.get("/wallet/").status_code == 302
    resp = client.post("/wallet/redeem", data={}, headers=HX)
    assert resp.status_code in (400, 401)


def test_history_keyset_pagination(ctx, client):
    """History is newest first, 25 a page; the older page comes as a fragment over htmx; a bad marker is 400."""
    make_user()
    u = uid()
    for i in range(1, 31):
        ledger.credit(u, i * 1_000_000, kind="voucher_credit")
    login(client)
    page = ledger.history(u)
    assert [r.entry.amount_micros for r in page.rows][:2] == [30_000_000, 29_000_000]
    assert len(page.rows) == 25 and page.next_before is not None
    html = client.get("/wallet/").get_data(as_text=True)
    assert f"before={page.next_before}" in html
    older = client.get(f"/wallet/?before={page.next_before}", headers=HX)
    frag = older.get_data(as_text=True)
    assert frag.lstrip().startswith('<section id="ledger-history"') and "<html" not in frag
    assert frag.count("<tr>") == 1 + 5  # header + the 5 oldest entries
    assert "Older" not in frag and "Newest" in frag
    for bad in ("-1", "abc", "1e9", "٣", "9" * 40, "1 "):
        assert client.get("/wallet/", query_string={"before": bad}).status_code == 400


def test_history_is_owner_scoped(ctx, client):
    """A user's history never shows another user's entries."""
    make_user()
    make_user("other@example.com")
    ledger.credit(uid("other@example.com"), 123_456_789, kind="voucher_credit")
    login(client)
    html = client.get("/wallet/").get_data(as_text=True)
    assert "123.456789" not in html and "No entries yet" in html
    assert ledger.history(uid()).rows == []


def test_failed_redeems_are_throttled_per_user(db_url):
    """After the configured number of failures the user gets 429 (toast over htmx); successes don't count."""
    app = make_app(db_url, REDEEM_LIMITS="3 per minute")
    with app.app_context():
        db.create_all()
        make_user()
        codes = mint(5, credits=1)
        client = app.test_client()
        login(client)
        token = csrf_from(client.get("/wallet/").data)
        for code in codes:  # five successes in a row are fine
            assert client.post("/wallet/redeem", data={"code": code, "csrf_token": token},
                               headers=HX).status_code == 200
        for _ in range(3):
            assert client.post("/wallet/redeem", data={"code": "ZZZZ-ZZZZ-ZZZZ-ZZZZ-ZZZZ",
                                                       "csrf_token": token}, headers=HX).status_code == 422
        resp = client.post("/wallet/redeem", data={"code": "ZZZZ-ZZZZ-ZZZZ-ZZZZ-ZZZZ", "csrf_token": token},
                           headers=HX)
        assert resp.status_code == 429
        assert json.loads(resp.headers["HX-Trigger"])["toast"]["level"] == "error"
        plain = client.post("/wallet/redeem", data={"code": "x", "csrf_token": token})
        assert plain.status_code == 429 and b"Too many redemption attempts" in plain.data
        # a valid code is refused too while throttled, so the limit cannot be side-stepped
        fresh = mint(1)[0]
        assert client.post("/wallet/redeem", data={"code": fresh, "csrf_token": token}).status_code == 429
        db.session.remove()
        db.engine.dispose()


def test_throttle_per_ip_spans_users(db_url):
    """The per-IP limit counts failures of every account behind one address."""
    app = make_app(db_url, REDEEM_LIMITS="100 per minute", REDEEM_IP_LIMITS="2 per minute")
    with app.app_context():
        db.create_all()
        make_user("a@example.com")
        make_user("b@example.com")
        statuses = []
        for email in ("a@example.com", "b@example.com"):
            client = app.test_client()
            login(client, email)
            token = csrf_from(client.get("/wallet/").data)
            for _ in range(2):
                statuses.append(client.post("/wallet/redeem", headers=HX, data={
                    "code": "ZZZZ-ZZZZ-ZZZZ-ZZZZ-ZZZZ", "csrf_token": token}).status_code)
        assert statuses == [422, 422, 429, 429]
        db.session.remove()
        db.engine.dispose()
