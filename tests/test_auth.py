"""Accounts: registration, login, logout, session revocation, next= safety, throttling."""
from __future__ import annotations

import functools

import pytest
from sqlalchemy import select

from console import accounts
from console.extensions import db
from console.models import AuditLog, User, Wallet
from tests.conftest import PRODUCTION_HASHER, make_app
from tests.support.web import HX, PASSWORD, login, make_user, page_token


def _post_login(client, email, password, next_=None):
    token = page_token(client, "/login")
    url = "/login" + (f"?next={next_}" if next_ is not None else "")
    return client.post(url, data={"email": email, "password": password, "csrf_token": token})


def test_register_creates_user_wallet_and_logs_in(ctx, client):
    """Registering creates the account with an empty wallet and signs the user in."""
    token = page_token(client, "/register")
    resp = client.post("/register", data={"email": "New@Example.com", "password": PASSWORD, "csrf_token": token})
    assert resp.status_code == 302
    user = db.session.scalar(select(User).where(User.email == "new@example.com"))
    assert user is not None and user.role == "user"
    assert user.password_hash.startswith("$argon2id$")
    wallet = db.session.scalar(select(Wallet).where(Wallet.user_id == user.id))
    assert wallet.balance_micros == 0 and wallet.held_micros == 0
    assert client.get("/wallet/").status_code == 200


def test_production_passwords_are_hashed_with_argon2id_t3_m64mib_p4():
    """The module's own hasher, which servers use (this test process swaps in a cheap one)."""
    assert (PRODUCTION_HASHER.time_cost, PRODUCTION_HASHER.memory_cost,
            PRODUCTION_HASHER.parallelism) == (3, 65536, 4)
    assert PRODUCTION_HASHER.hash(PASSWORD).startswith("$argon2id$v=19$m=65536,t=3,p=4$")


def test_a_weaker_hash_is_upgraded_at_the_next_login(ctx, client, monkeypatch):
    """A hash made with other parameters is replaced by a production one when its owner logs in."""
    user = make_user("old@example.com")
    old = user.password_hash
    assert not old.startswith("$argon2id$v=19$m=65536,t=3,p=4$")
    monkeypatch.setattr(accounts, "_hasher", PRODUCTION_HASHER)
    monkeypatch.setattr(accounts, "_dummy_hash", functools.cache(accounts._dummy_hash.__wrapped__))
    assert _post_login(client, "old@example.com", PASSWORD).status_code == 302
    db.session.refresh(user)
    assert user.password_hash.startswith("$argon2id$v=19$m=65536,t=3,p=4$")
    assert PRODUCTION_HASHER.verify(user.password_hash, PASSWORD)
    client.post("/logout", data={"csrf_token": page_token(client, "/")})
    assert _post_login(client, "old@example.com", PASSWORD).status_code == 302


@pytest.mark.parametrize("password", ["short", "x" * 129])
def test_register_rejects_bad_passwords(ctx, client, password):
    """Passwords outside 12–128 characters are refused with 422 and no account."""
    token = page_token(client, "/register")
    resp = client.post("/register", data={"email": "a@example.com", "password": password, "csrf_token": token},
                       headers=HX)
    assert resp.status_code == 422
    assert b'id="register-form"' in resp.data and b"<html" not in resp.data
    assert db.session.scalar(select(User).where(User.email == "a@example.com")) is None


def test_register_duplicate_email(ctx, client):
    """A second registration with the same e-mail is refused with a clear message."""
    make_user("dup@example.com")
    token = page_token(client, "/register")
    resp = client.post("/register", data={"email": "DUP@example.com", "password": PASSWORD, "csrf_token": token})
    assert resp.status_code == 422 and b"already exists" in resp.data


def test_login_without_csrf_token_is_rejected(ctx, client):
    """CSRF is enforced on the login form too."""
    make_user()
    resp = client.post("/login", data={"email": "user@example.com", "password": PASSWORD})
    assert resp.status_code == 400


def test_unknown_email_and_wrong_password_look_alike(ctx, client):
    """Unknown e-mail and wrong password give the same status and message."""
    make_user()
    a = _post_login(client, "nobody@example.com", PASSWORD)
    b = _post_login(client, "user@example.com", "wrong password!!")
    assert a.status_code == b.status_code == 422
    assert b"Wrong e-mail or password." in a.data and b"Wrong e-mail or password." in b.data
    actions = db.session.scalars(select(AuditLog.action)).all()
    assert actions.count("auth.login_failed") == 2


def test_an_unknown_email_costs_one_hash_check_like_a_wrong_password(ctx, monkeypatch):
    """Both verify one argon2 hash of the same parameters, so their time does not tell them apart."""
    make_user()
    checked = []
    real = accounts._hasher

    class Spy:
        def __getattr__(self, name):
            return getattr(real, name)

        def verify(self, hash_, password):
            checked.append(hash_.rsplit("$", 2)[0])
            return real.verify(hash_, password)

    monkeypatch.setattr(accounts, "_hasher", Spy())
    accounts._dummy_hash.cache_clear()  # made by this process's hasher, as in production
    assert accounts.authenticate("nobody@example.com", PASSWORD) is None
    assert accounts.authenticate("user@example.com", "wrong password!!") is None
    assert len(checked) == 2 and checked[0] == checked[1]


def test_session_cookie_flags(ctx, client):
    """The session cookie is HttpOnly and SameSite=Lax."""
    make_user()
    resp = login(client)
    cookie = resp.headers["Set-Cookie"]
    assert "HttpOnly" in cookie and "SameSite=Lax" in cookie


def test_old_session_cookie_rejected_after_logout(ctx, app):
    """A copy of the session cookie taken before logout no longer authenticates."""
    make_user()
    c1 = app.test_client()
    login(c1)
    stolen = c1.get_cookie("session").value
    assert c1.get("/wallet/").status_code == 200
    token = page_token(c1, "/")
    assert c1.post("/logout", data={"csrf_token": token}).status_code == 302
    c2 = app.test_client()
    c2.set_cookie("session", stolen)
    resp = c2.get("/wallet/")
    assert resp.status_code == 302 and "/login" in resp.headers["Location"]


def test_password_change_revokes_other_sessions(ctx, app):
    """Changing the password signs out every other session but keeps this one."""
    make_user()
    other, me = app.test_client(), app.test_client()
    login(other)
    login(me)
    token = page_token(me, "/account/password")
    new = "another long passphrase"
    resp = me.post("/account/password", data={"current": PASSWORD, "new": new, "csrf_token": token})
    assert resp.status_code == 302
    assert me.get("/wallet/").status_code == 200
    assert other.get("/wallet/").status_code == 302


def test_expired_session_in_fragment_gets_hx_redirect(client):
    """An htmx request without a session gets 401 + HX-Redirect, not a login page in a fragment."""
    resp = client.get("/wallet/", headers=HX)
    assert resp.status_code == 401
    assert resp.headers["HX-Redirect"].startswith("/login")


@pytest.mark.parametrize("target", [
    "//evil.example", "https://evil.example/", "/\\evil.example", "\\\\evil.example",
    "http:/evil.example", "javascript:alert(1)", "/%0d%0aSet-Cookie:x", "", "evil.example",
])
def test_next_only_accepts_local_paths(ctx, client, target):
    """next= values that leave the site fall back to the home page."""
    make_user()
    resp = _post_login(client, "user@example.com", PASSWORD, next_=target)
    assert resp.status_code == 302
    location = resp.headers["Location"]
    assert location == "/" or (location.startswith("/") and not location.startswith("//")), location
    assert "evil" not in location


def test_next_local_path_is_followed(ctx, client):
    """A local next= path is where the login lands."""
    make_user()
    resp = _post_login(client, "user@example.com", PASSWORD, next_="/keys/")
    assert resp.headers["Location"] == "/keys/"


@pytest.mark.parametrize("storage", ["default", "redis unreachable"])
def test_login_throttled_per_account(db_url, storage):
    """After N failed attempts on one account, further attempts get 429 (even the right password).
    With Redis unreachable sign-in still works (no 500) and the attempts are counted in the
    worker's memory until Redis answers again."""
    from tests.support.server import free_port

    extra = {"RATELIMIT_STORAGE_URI": f"redis://127.0.0.1:{free_port()}/0"} if storage != "default" else {}
    app = make_app(db_url, LOGIN_LIMITS="3 per 15 minutes", **extra)
    with app.app_context():
        db.create_all()
        make_user()
        client = app.test_client()
        for _ in range(3):
            assert _post_login(client, "user@example.com", "wrong password!!").status_code == 422
        assert _post_login(client, "user@example.com", PASSWORD).status_code == 429
        db.session.remove()
        db.engine.dispose()


def test_staff_routes_hidden_from_users(ctx, client):
    """Every support/admin route answers 404 to a plain user and to anonymous visitors 302/404."""
    make_user()
    login(client)
    staff_rules = [r for r in ctx.url_map.iter_rules()
                   if r.rule.startswith(("/admin", "/support")) and "GET" in r.methods and not r.arguments]
    assert staff_rules
    for rule in staff_rules:
        assert client.get(rule.rule).status_code == 404, rule.rule


def test_every_console_route_is_gated(ctx):
    """Each view is public by intent, requires login, or requires a staff role (url_map audit)."""
    public = {"pages.home", "pages.pricing", "pages.faq", "pages.healthz", "auth.login",
              "auth.register", "static"}
    for rule in ctx.url_map.iter_rules():
        if rule.endpoint.startswith("relay.") or rule.endpoint in public or rule.endpoint.startswith("pages."):
            continue
        view = ctx.view_functions[rule.endpoint]
        client = ctx.test_client()
        method = "GET" if "GET" in rule.methods else "POST"
        url = rule.rule
        for arg in rule.arguments:
            url = url.replace(f"<int:{arg}>", "1").replace(f"<{arg}>", "x").replace(f"<string:{arg}>", "x")
        resp = client.open(url, method=method)
        # Anonymous: redirected to login, or CSRF-refused (400) before anything runs for POSTs.
        assert resp.status_code in (302, 400, 401, 404), (rule.rule, resp.status_code)
        if resp.status_code == 302:
            assert "/login" in resp.headers["Location"], rule.rule
        del view
