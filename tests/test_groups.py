"""Groups: the picker cards, default group, moving keys, visibility, and admin editing."""
from __future__ import annotations

import json
from datetime import timedelta

import pytest
from sqlalchemy import select

from console import groups, keys, seed, usage
from console.database import write_tx
from console.extensions import db
from console.models import AuditLog, Group, ModelPrice, UsageRecord, User, utcnow
from tests.support.web import HX, login, make_user, page_token


def _group(slug: str) -> Group:
    return db.session.scalar(select(Group).where(Group.slug == slug))


def _uid(email: str = "user@example.com") -> int:
    return db.session.scalar(select(User.id).where(User.email == email))


@pytest.fixture
def user_client(ctx, client):
    seed.seed_reference()
    make_user()
    login(client)
    return client


def test_share_of_official_price_at_the_exchange_rate(ctx):
    """0.3x at 7 per USD is ≈ 4.3% of the official price; 1x is 14.3%."""
    assert groups.share_of_official(300_000) == "4.3"
    assert groups.share_of_official(1_000_000) == "14.3"


def test_cards_show_multiplier_share_models_and_limits(user_client):
    """Each visible group has a card: multiplier, share, models, concurrency, rpm, and no data yet."""
    resp = user_client.get("/groups/")
    html = resp.data.decode()
    assert resp.status_code == 200 and "<html" in html
    rec = _group("recommended")
    assert f'id="group-card-{rec.id}"' in html
    assert "0.3x" in html and "≈ 4.3% of official price" in html
    assert "10 calls in flight per account" in html and "600 requests/min per key" in html
    assert "claude-sonnet-4-5" in html and "no data yet" in html
    frag = user_client.get("/groups/", headers=HX)
    assert frag.data.lstrip().startswith(b'<div id="group-cards"')


def test_cards_render_measured_stats_from_usage(user_client):
    """Whatever usage.group_stats() measures for a group (latency, TTFB, success) appears on its card."""
    rec = _group("recommended")
    uid = _uid()
    now = utcnow()
    with write_tx():
        for i, (status, latency) in enumerate([("ok", 800), ("ok", 1200), ("failed", 300)]):
            db.session.add(UsageRecord(
                request_id=f"req-{i}", user_id=uid, group_id=rec.id, model="gpt-5", endpoint="chat",
                status=status, multiplier_ppm=rec.multiplier_ppm, latency_ms=latency, ttfb_ms=100 + i,
                created_at=now - timedelta(minutes=5), deadline_at=now, settled_at=now))
    stats = usage.group_stats().get(rec.id)
    html = user_client.get("/groups/").data.decode()
    card = html.split(f'id="group-card-{rec.id}"')[1].split("</article>")[0]
    if stats is None or not stats.calls:
        assert "no data yet" in card
    else:
        assert f"({stats.calls} calls)" in card
        if stats.median_latency_ms is not None:
            assert f"median latency {stats.median_latency_ms} ms" in card
        if stats.success_rate is not None:
            assert f"success {stats.success_rate * 100:.1f}%" in card


def test_hidden_groups_are_not_offered_or_pickable(user_client):
    """A hidden group has no card, and setting it as default answers 404."""
    with write_tx():
        _group("economy").visible = False
    hidden = _group("economy")
    html = user_client.get("/groups/").data.decode()
    assert f'id="group-card-{hidden.id}"' not in html
    token = page_token(user_client, "/groups/")
    assert user_client.post(f"/groups/{hidden.id}/default", data={"csrf_token": token}).status_code == 404
    assert user_client.post("/groups/99999/default", data={"csrf_token": token}).status_code == 404
    assert db.session.get(User, _uid()).default_group_id is None


def test_set_default_group_in_place_and_without_js(user_client):
    """Make default: htmx gets the cards and a default-group-changed event; plain POST redirects."""
    ded = _group("dedicated")
    token = page_token(user_client, "/groups/")
    resp = user_client.post(f"/groups/{ded.id}/default", data={"csrf_token": token}, headers=HX)
    assert resp.status_code == 200 and resp.data.lstrip().startswith(b'<div id="group-cards"')
    trig = json.loads(resp.headers["HX-Trigger"])
    assert trig["default-group-changed"] is True and trig["toast"]["level"] == "success"
    assert "your default" in resp.data.decode().split(f'id="group-card-{ded.id}"')[1].split("</article>")[0]
    db.session.expire_all()
    assert db.session.get(User, _uid()).default_group_id == ded.id
    key, _ = keys.create_key(_uid(), "after-default")
    assert key.group_id == ded.id  # new keys use the account default
    eco = _group("economy")
    resp = user_client.post(f"/groups/{eco.id}/default", data={"csrf_token": token})
    assert resp.status_code == 302 and resp.headers["Location"].endswith("/groups/")


def test_move_a_key_from_a_card(user_client):
    """Move key here: 302 without JS, keys-changed with htmx, 422 for a missing key id."""
    key, _ = keys.create_key(_uid(), "k", group_id=_group("recommended").id)
    eco, ded = _group("economy"), _group("dedicated")
    token = page_token(user_client, "/groups/")
    resp = user_client.post(f"/groups/{eco.id}/assign", data={"csrf_token": token, "key_id": str(key.id)})
    assert resp.status_code == 302
    resp = user_client.post(f"/groups/{ded.id}/assign", data={"csrf_token": token, "key_id": str(key.id)},
                            headers=HX)
    assert resp.status_code == 200 and "keys-changed" in resp.headers["HX-Trigger"]
    db.session.expire_all()
    assert keys.get_key(_uid(), key.id).group_id == ded.id
    resp = user_client.post(f"/groups/{ded.id}/assign", data={"csrf_token": token, "key_id": "x"}, headers=HX)
    assert resp.status_code == 422 and resp.data.lstrip().startswith(b'<div id="group-cards"')
    assert user_client.post(f"/groups/{ded.id}/assign", data={"csrf_token": token, "key_id": "424242"}).status_code == 404


def test_catalog_admin_is_admin_only(user_client):
    """A plain user gets 404 on the catalog admin pages."""
    assert user_client.get("/admin/catalog/").status_code == 404
    assert user_client.get("/admin/catalog/groups/new").status_code == 404


def test_admin_creates_and_edits_groups_and_prices(ctx, client):
    """Admins save groups (exact multiplier, models) and prices; bad input is 422; changes are audited."""
    seed.seed_reference()
    make_user("admin@example.com", role="admin")
    login(client, "admin@example.com")
    assert client.get("/admin/catalog/").status_code == 200
    token = page_token(client, "/admin/catalog/groups/new")
    mini = db.session.scalar(select(ModelPrice).where(ModelPrice.name == "gpt-5-mini"))
    form = {"csrf_token": token, "slug": "night", "name": "Night 0.125x", "multiplier": "0.125",
            "badge": "none", "concurrency_limit": "3", "rpm_limit": "60", "sort_order": "9", "visible": "on",
            "model_ids": [str(mini.id)]}
    for field, bad in [("multiplier", "NaN"), ("multiplier", "0"), ("slug", "Bad Slug"), ("badge", "gold"),
                       ("concurrency_limit", "-1"), ("model_ids", ["99999"])]:
        resp = client.post("/admin/catalog/groups/new", data={**form, field: bad})
        assert resp.status_code == 422, field
    assert _group("night") is None
    resp = client.post("/admin/catalog/groups/new", data=form)
    assert resp.status_code == 302
    night = _group("night")
    assert night.multiplier_ppm == 125_000 and [m.name for m in night.models] == ["gpt-5-mini"]
    page = client.get(f"/admin/catalog/groups/{night.id}")
    assert page.status_code == 200 and 'value="0.125"' in page.data.decode()
    resp = client.post(f"/admin/catalog/groups/{night.id}", data={**form, "slug": "recommended"})
    assert resp.status_code == 422  # slug taken
    model = db.session.scalar(select(ModelPrice).where(ModelPrice.name == "gpt-5"))
    page = client.get(f"/admin/catalog/models/{model.id}")
    assert page.status_code == 200 and 'value="1.25"' in page.data.decode()
    assert 'name="web_search_price" value="0.01"' in page.data.decode()  # the seed's $10 / 1k
    mform = {"csrf_token": token, "name": "gpt-5", "provider": "openai", "kind": "chat", "input_price": "1.5",
             "output_price": "12", "cache_read_price": "0.15", "web_search_price": "0.025",
             "max_output_tokens": "128000", "context_window": "400000", "sort_order": "0", "enabled": "on"}
    assert client.post(f"/admin/catalog/models/{model.id}", data={**mform, "input_price": "1e3"}).status_code == 422
    assert client.post(f"/admin/catalog/models/{model.id}", data={**mform, "web_search_price": "-1"}).status_code == 422
    for field, bad in [("long_context_threshold", "0"), ("long_context_threshold", "2e5"),
                       ("long_context_input_ppm", "0"), ("long_context_output_ppm", "x1.5"),
                       ("priority_ppm", "-2"), ("flex_ppm", "half")]:
        assert client.post(f"/admin/catalog/models/{model.id}", data={**mform, field: bad}).status_code == 422, field
    long = {"long_context_threshold": "272000", "long_context_input_ppm": "2", "long_context_output_ppm": "1.5",
            "priority_ppm": "1.75"}
    assert client.post(f"/admin/catalog/models/{model.id}", data={**mform, **long}).status_code == 302
    db.session.expire_all()
    model = db.session.get(ModelPrice, model.id)
    assert (model.input_price, model.output_price, model.cache_read_price) == (1_500_000, 12_000_000, 150_000)
    assert model.web_search_price == 25_000
    assert (model.long_context_threshold, model.long_context_input_ppm, model.long_context_output_ppm) == (
        272_000, 2_000_000, 1_500_000)
    assert (model.priority_ppm, model.flex_ppm) == (1_750_000, None)
    page = client.get(f"/admin/catalog/models/{model.id}").data.decode()
    assert 'name="long_context_threshold" value="272000"' in page and 'name="long_context_output_ppm" value="1.5"' in page
    actions = list(db.session.scalars(select(AuditLog.action).where(AuditLog.action.like("catalog.%"))))
    assert actions.count("catalog.group_saved") == 1 and actions.count("catalog.model_saved") == 1
    after = db.session.scalar(select(AuditLog.after).where(AuditLog.action == "catalog.model_saved"))
    assert json.loads(after)["long_context_threshold"] == 272_000
    assert client.get("/admin/catalog/groups/99999").status_code == 404
