"""API keys: secrets, storage, the relay's lookup, limits parsing, views, IDOR and the CLI."""
from __future__ import annotations

import json
import re
from datetime import date, timedelta

import pytest
from sqlalchemy import select

from console import keys, seed
from console.database import write_tx
from console.extensions import db
from console.models import ApiKey, Group, User, utcnow
from tests.conftest import make_app
from tests.support.server import flask_cli
from tests.support.web import HX, login, make_user, page_token

SECRET = re.compile(r"sk-[A-Za-z0-9_-]{43}")


def _user_id(email: str = "user@example.com") -> int:
    return db.session.scalar(select(User.id).where(User.email == email))


def _group(slug: str) -> Group:
    return db.session.scalar(select(Group).where(Group.slug == slug))


# ---- service -----------------------------------------------------------------------------------

def test_secret_is_256_bit_urlsafe_and_only_its_hash_is_stored(ctx):
    """A key is sk- + 43 URL-safe chars; the row holds its SHA-256 and a short display prefix only."""
    make_user()
    key, secret = keys.create_key(_user_id(), "laptop")
    assert SECRET.fullmatch(secret) and keys.looks_like_key(secret)
    row = db.session.get(ApiKey, key.id)
    assert row.key_hash == keys.hash_secret(secret) and secret not in row.key_hash
    assert row.display_prefix == f"{secret[:7]}…{secret[-4:]}"
    assert keys.authenticate(secret).id == key.id
    assert keys.authenticate(secret[:-1] + ("A" if secret[-1] != "A" else "B")) is None
    assert keys.authenticate("Bearer " + secret) is None and keys.authenticate("") is None


def test_sqlite_file_contains_no_plaintext_key(tmp_path):
    """After creating and rolling keys through the views, the SQLite files hold no secret bytes."""
    path = tmp_path / "keys.db"
    app = make_app(f"sqlite:///{path}")
    with app.app_context():
        db.create_all()
        seed.seed_reference()
        make_user()
        client = app.test_client()
        login(client)
        secrets_seen = []
        for name in ("one", "two", "three"):
            token = page_token(client, "/keys/")
            resp = client.post("/keys/", data={"name": name, "csrf_token": token})
            secrets_seen += SECRET.findall(resp.data.decode())
        resp = client.post("/keys/1/roll", data={"csrf_token": page_token(client, "/keys/")})
        secrets_seen += SECRET.findall(resp.data.decode())
        _, cli_like = keys.create_key(_user_id(), "service")
        secrets_seen.append(cli_like)
        assert len(set(secrets_seen)) == 5
        db.session.remove()
        db.engine.dispose()
    blob = b"".join(p.read_bytes() for p in tmp_path.iterdir() if p.name.startswith("keys.db"))
    assert blob, "the database file is empty"
    for secret in secrets_seen:
        assert secret.encode() not in blob
        assert secret[3:].encode() not in blob  # nor the body without its prefix
        assert secret[3:30].encode() not in blob


@pytest.mark.parametrize("revoke", ["disable", "delete", "expire", "roll"])
def test_revoked_secret_is_rejected_by_the_relay_lookup(ctx, revoke):
    """Disabling, deleting, expiring or rolling a key makes authenticate() refuse the old secret."""
    make_user()
    uid = _user_id()
    key, secret = keys.create_key(uid, "k")
    assert keys.authenticate(secret) is not None  # loaded into this session's identity map
    if revoke == "disable":
        keys.set_enabled(uid, key.id, False)
    elif revoke == "delete":
        keys.delete(uid, key.id)
    elif revoke == "expire":
        with write_tx():
            db.session.get(ApiKey, key.id).expires_at = utcnow() - timedelta(seconds=1)
    else:
        _, new_secret = keys.roll(uid, key.id)
        assert keys.authenticate(new_secret).id == key.id
    assert keys.authenticate(secret) is None
    if revoke == "disable":
        keys.set_enabled(uid, key.id, True)
        assert keys.authenticate(secret) is not None


def test_ip_allowlist_is_validated_and_normalized():
    """CIDRs are parsed by ipaddress, host bits cleared, bare addresses become /32 or /128."""
    assert keys.parse_ip_allowlist(" 10.1.2.3/8, 203.0.113.7\n2001:DB8::1/32 10.0.0.0/8") == \
        "10.0.0.0/8,203.0.113.7/32,2001:db8::/32"
    assert keys.parse_ip_allowlist("") == ""
    for bad in ("10.0.0.0/33", "999.1.1.1", "localhost", "10.0.0.0/8;drop", "１.2.3.4"):
        with pytest.raises(keys.KeyInputError) as exc:
            keys.parse_ip_allowlist(bad)
        assert "ip_allowlist" in exc.value.errors


def test_relay_helpers_apply_allowlists_and_spend_limit(ctx):
    """ip_allowed, model_allowed and spend_limit_reached read the stored restrictions."""
    make_user()
    seed.seed_reference()
    key, _ = keys.create_key(_user_id(), "k", group_id=_group("economy").id,
                             ip_allowlist="10.0.0.0/8", model_allowlist="gpt-5-mini", spend_limit="1")
    assert keys.ip_allowed(key, "10.9.8.7") and not keys.ip_allowed(key, "11.0.0.1")
    assert not keys.ip_allowed(key, "not-an-ip")
    assert keys.model_allowed(key, "gpt-5-mini") and not keys.model_allowed(key, "gpt-4o-mini")
    assert not keys.spend_limit_reached(key)
    key.spent_micros = 1_000_000
    assert keys.spend_limit_reached(key) and keys.status_of(key) == "limit reached"


def test_limits_are_checked_against_the_keys_group(ctx):
    """A model allowlist may only name models of the key's group; expiry must not be in the past."""
    make_user()
    seed.seed_reference()
    uid = _user_id()
    with pytest.raises(keys.KeyInputError) as exc:
        keys.create_key(uid, "k", group_id=_group("economy").id, model_allowlist="claude-opus-4-1")
    assert set(exc.value.errors) == {"model_allowlist"}
    with pytest.raises(keys.KeyInputError) as exc:
        keys.create_key(uid, "k", expires=(date.today() - timedelta(days=2)).isoformat(), spend_limit="-5")
    assert set(exc.value.errors) == {"expires", "spend_limit"}
    key, _ = keys.create_key(uid, "k", expires=(date.today() + timedelta(days=3)).isoformat())
    assert key.expires_at > utcnow() + timedelta(days=3)
    assert key.group_id == _group("recommended").id  # first visible group when no default is set


def test_moving_a_key_keeps_its_allowlist_valid(ctx):
    """Moving a key to a group that lacks an allowlisted model is refused instead of widening it."""
    make_user()
    seed.seed_reference()
    uid = _user_id()
    key, _ = keys.create_key(uid, "k", group_id=_group("recommended").id, model_allowlist="claude-opus-4-1")
    with pytest.raises(keys.KeyInputError):
        keys.move_to_group(uid, key.id, _group("economy").id)
    assert db.session.get(ApiKey, key.id).group_id == _group("recommended").id
    assert keys.move_to_group(uid, key.id, _group("dedicated").id).group_id == _group("dedicated").id


def test_seed_demo_rolls_the_demo_key_each_run(ctx):
    """seed --demo gives the demo user one key; a re-run rolls it, so only the newest secret works."""
    first = {r: p for r, _e, p in seed.seed_demo()}["key"]
    second = {r: p for r, _e, p in seed.seed_demo()}["key"]
    assert first != second and SECRET.fullmatch(second)
    assert keys.authenticate(first) is None and keys.authenticate(second) is not None
    uid = _user_id("demo@example.com")
    assert [k.name for k in keys.list_keys(uid)] == ["demo"]


@pytest.mark.slow
def test_cli_create_key_prints_the_secret_last(app, db_url):
    """`flask create-key EMAIL --name --group` prints the key alone on the last line; errors exit non-zero."""
    with app.app_context():
        seed.seed_reference()
        make_user()
    out = flask_cli(db_url, "create-key", "user@example.com", "--name", "ci", "--group", "economy")
    last = out.stdout.strip().splitlines()[-1]
    assert SECRET.fullmatch(last)
    with app.app_context():
        key = keys.authenticate(last)
        assert key.name == "ci" and key.group.slug == "economy"
    bad = flask_cli(db_url, "create-key", "nobody@example.com", check=False)
    assert bad.returncode != 0 and "No account" in bad.stderr
    bad = flask_cli(db_url, "create-key", "user@example.com", "--group", "nope", check=False)
    assert bad.returncode != 0 and "No group" in bad.stderr


# ---- views -------------------------------------------------------------------------------------

@pytest.fixture
def keys_client(ctx, client):
    seed.seed_reference()
    make_user()
    login(client)
    return client


def test_keys_page_full_and_fragment(keys_client):
    """/keys/ renders the full page, or only the key list for a targeted htmx request."""
    full = keys_client.get("/keys/")
    assert full.status_code == 200 and b"<html" in full.data and b'id="key-form"' in full.data
    assert b'hx-trigger="keys-changed from:body"' in full.data
    frag = keys_client.get("/keys/", headers=HX)
    assert b"<html" not in frag.data and frag.data.lstrip().startswith(b'<div id="key-list"')


def test_create_without_js_shows_the_secret_once_uncached(keys_client):
    """A plain POST answers the secret page itself: no-store, hx-history=false, a copy button; never again."""
    token = page_token(keys_client, "/keys/")
    resp = keys_client.post("/keys/", data={"name": "laptop", "csrf_token": token, "ip_allowlist": "10.1.2.3/8"})
    assert resp.status_code == 200 and b"<html" in resp.data
    assert resp.headers["Cache-Control"] == "no-store"
    html = resp.data.decode()
    secret = SECRET.search(html).group(0)
    assert 'hx-history="false"' in html and 'data-copy="#new-key-secret"' in html
    key = keys.authenticate(secret)
    assert key.ip_allowlist == "10.0.0.0/8"
    listing = keys_client.get("/keys/").data.decode()
    assert secret not in listing and key.display_prefix in listing


def test_create_with_htmx_swaps_form_and_secret_out_of_band(keys_client):
    """htmx create: the fresh form, the secret panel swapped OOB, keys-changed and a toast."""
    token = page_token(keys_client, "/keys/")
    resp = keys_client.post("/keys/", data={"name": "ci", "csrf_token": token}, headers=HX)
    assert resp.status_code == 200 and b"<html" not in resp.data
    assert resp.headers["Cache-Control"] == "no-store"
    assert resp.data.lstrip().startswith(b'<form id="key-form"')
    assert b'<div id="key-secret" hx-history="false" hx-swap-oob="true">' in resp.data
    trig = json.loads(resp.headers["HX-Trigger"])
    assert trig["keys-changed"] is True and trig["toast"]["level"] == "success"
    assert SECRET.search(resp.data.decode())


INVALID_CREATES = [
    ({"name": "   "}, "Give the key a name"),
    ({"name": "ok", "group_id": "999"}, "Pick one of the listed groups"),
    ({"name": "ok", "group_id": "abc"}, "Pick one of the listed groups"),
    ({"name": "ok", "ip_allowlist": "10.0.0.0/33"}, "is not an IP address or CIDR"),
    ({"name": "ok", "spend_limit": "NaN"}, "Enter an amount"),
    ({"name": "ok", "expires": "2020-01-01"}, "in the past"),
    ({"name": "x\u202ey"}, "printable characters"),
]


def test_invalid_create_is_422_and_creates_nothing(keys_client):
    """Empty name, unknown group, bad CIDR, bad amount, past date or bidi control: 422 with the form, no key."""
    token = page_token(keys_client, "/keys/")
    for fields, message in INVALID_CREATES:
        resp = keys_client.post("/keys/", data={**fields, "csrf_token": token}, headers=HX)
        assert resp.status_code == 422, fields
        assert resp.data.lstrip().startswith(b'<form id="key-form"') and message in resp.data.decode()
        assert "HX-Trigger" not in resp.headers
        plain = keys_client.post("/keys/", data={**fields, "csrf_token": token})
        assert plain.status_code == 422 and b"<html" in plain.data
    assert keys.list_keys(_user_id()) == []


def test_hidden_group_cannot_be_picked(keys_client):
    """A group that is not visible is refused like an unknown one."""
    with write_tx():
        _group("economy").visible = False
    gid = str(_group("economy").id)
    token = page_token(keys_client, "/keys/")
    assert keys_client.post("/keys/", data={"name": "k", "group_id": gid, "csrf_token": token}).status_code == 422
    assert gid not in re.findall(r'option value="(\d+)"', keys_client.get("/keys/").data.decode())


def test_row_actions_in_place_and_without_js(keys_client):
    """Disable/enable return the row; delete returns nothing; without htmx each redirects (302)."""
    key, secret = keys.create_key(_user_id(), "k")
    token = page_token(keys_client, "/keys/")
    resp = keys_client.post(f"/keys/{key.id}/disable", data={"csrf_token": token}, headers=HX)
    assert resp.status_code == 200 and resp.data.lstrip().startswith(f'<tr id="key-row-{key.id}"'.encode())
    assert b"disabled" in resp.data and "keys-changed" in resp.headers["HX-Trigger"]
    assert keys.authenticate(secret) is None
    resp = keys_client.post(f"/keys/{key.id}/enable", data={"csrf_token": token})
    assert resp.status_code == 302 and resp.headers["Location"].endswith("/keys/")
    assert keys.authenticate(secret) is not None
    resp = keys_client.post(f"/keys/{key.id}/delete", data={"csrf_token": token}, headers=HX)
    assert resp.status_code == 200 and b"<tr" not in resp.data and "keys-changed" in resp.headers["HX-Trigger"]
    assert keys.authenticate(secret) is None
    assert keys_client.get(f"/keys/{key.id}").status_code == 404


def test_roll_shows_a_new_secret_once(keys_client):
    """Roll swaps the one-time secret panel in (htmx) and keeps name, group and limits."""
    key, old = keys.create_key(_user_id(), "k", spend_limit="5")
    token = page_token(keys_client, "/keys/")
    resp = keys_client.post(f"/keys/{key.id}/roll", data={"csrf_token": token}, headers=HX)
    assert resp.status_code == 200 and resp.headers["Cache-Control"] == "no-store"
    assert resp.data.lstrip().startswith(b'<div id="key-secret" hx-history="false">')
    new = SECRET.search(resp.data.decode()).group(0)
    assert keys.authenticate(old) is None
    rolled = keys.authenticate(new)
    assert rolled.id == key.id and rolled.name == "k" and rolled.spend_limit_micros == 5_000_000


def test_edit_forms_rename_limits_and_group(keys_client):
    """Edit page forms: rename (302 without JS), limits (fragment with htmx, 422 on a bad CIDR), group."""
    key, _ = keys.create_key(_user_id(), "k", group_id=_group("recommended").id)
    page = keys_client.get(f"/keys/{key.id}")
    assert page.status_code == 200 and b'id="key-summary"' in page.data
    token = page_token(keys_client, f"/keys/{key.id}")
    resp = keys_client.post(f"/keys/{key.id}/rename", data={"name": "renamed", "csrf_token": token})
    assert resp.status_code == 302 and resp.headers["Location"].endswith(f"/keys/{key.id}")
    resp = keys_client.post(f"/keys/{key.id}/rename", data={"name": "", "csrf_token": token}, headers=HX)
    assert resp.status_code == 422 and resp.data.lstrip().startswith(b'<form id="key-rename-form"')
    resp = keys_client.post(f"/keys/{key.id}/limits", headers=HX, data={
        "csrf_token": token, "ip_allowlist": "192.168.1.9/24, ::1", "spend_limit": "12.5",
        "model_allowlist": "gpt-5, claude-haiku-4-5", "expires": ""})
    assert resp.status_code == 200 and resp.data.lstrip().startswith(b'<form id="key-limits-form"')
    assert "keys-changed" in resp.headers["HX-Trigger"]
    db.session.expire_all()
    row = db.session.get(ApiKey, key.id)
    assert (row.name, row.ip_allowlist, row.spend_limit_micros, row.model_allowlist) == \
        ("renamed", "192.168.1.0/24,::1/128", 12_500_000, "gpt-5,claude-haiku-4-5")
    resp = keys_client.post(f"/keys/{key.id}/limits", headers=HX, data={"csrf_token": token, "ip_allowlist": "nope"})
    assert resp.status_code == 422 and b"is not an IP address" in resp.data
    resp = keys_client.post(f"/keys/{key.id}/group", data={"csrf_token": token, "group_id": str(_group("economy").id)},
                            headers=HX)
    assert resp.status_code == 422 and resp.data.lstrip().startswith(b'<form id="key-group-form"')
    resp = keys_client.post(f"/keys/{key.id}/group", data={"csrf_token": token, "group_id": str(_group("dedicated").id)})
    assert resp.status_code == 302
    db.session.expire_all()
    assert db.session.get(ApiKey, key.id).group_id == _group("dedicated").id


def test_second_user_gets_404_on_every_key_route(ctx, client):
    """IDOR: every /keys/<id> route and the group assign route answer 404 for another user's key."""
    seed.seed_reference()
    make_user("owner@example.com")
    make_user("other@example.com")
    key, secret = keys.create_key(_user_id("owner@example.com"), "owner-key")
    login(client, "other@example.com")
    token = page_token(client, "/keys/")
    routes = [r for r in ctx.url_map.iter_rules() if "key_id" in r.arguments]
    assert len(routes) >= 8
    for rule in routes:
        url = rule.rule.replace("<int:key_id>", str(key.id))
        for method in rule.methods - {"HEAD", "OPTIONS"}:
            data = {"csrf_token": token, "name": "pwned", "group_id": str(_group("dedicated").id),
                    "ip_allowlist": "0.0.0.0/0"}
            resp = client.open(url, method=method, data=data if method == "POST" else None)
            assert resp.status_code == 404, (method, url, resp.status_code)
            resp = client.open(url, method=method, data=data if method == "POST" else None, headers=HX)
            assert resp.status_code == 404, (method, url, "htmx")
    resp = client.post(f"/groups/{_group('dedicated').id}/assign", data={"csrf_token": token, "key_id": str(key.id)})
    assert resp.status_code == 404
    assert b"owner-key" not in client.get("/keys/").data
    db.session.expire_all()
    row = db.session.get(ApiKey, key.id)
    assert (row.name, row.status, row.deleted_at, row.ip_allowlist) == ("owner-key", "active", None, "")
    assert keys.authenticate(secret) is not None


def test_key_routes_need_login(ctx, client):
    """Anonymous visitors are sent to the login page; htmx requests get 401 with HX-Redirect."""
    assert client.get("/keys/").status_code == 302
    resp = client.get("/keys/", headers=HX)
    assert resp.status_code == 401 and resp.headers["HX-Redirect"].startswith("/login")
