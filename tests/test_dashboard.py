"""The logged-in home: balance, today's spend, a 7-day sparkline and the last 5 calls."""
from __future__ import annotations

import re
from datetime import timedelta

from console import ledger
from console.models import utcnow
from console.money import format_credits
from tests.support.web import login, make_user
from tests.test_usage import add_record, add_records, record_values, user_id


def test_dashboard_shows_balance_spend_sparkline_and_last_calls(ctx, client):
    """The dashboard shows the available balance, today's spend, a sparkline and 5 newest calls."""
    make_user()
    make_user("other@example.com")
    me = user_id()
    ledger.credit(me, 25_000_000, kind="voucher_credit")
    now = utcnow()
    today = [add_record(me, created_at=now - timedelta(seconds=i), model=f"model-{i}") for i in range(7)]
    add_records([record_values(me, created_at=now - timedelta(days=3)),
                 record_values(user_id("other@example.com"), model="their-model", created_at=now)])
    login(client)
    resp = client.get("/")
    html = resp.get_data(as_text=True)
    assert resp.status_code == 200
    assert format_credits(25_000_000) in html
    from console import usage

    dash = usage.dashboard(me, now=now)
    midnight = now.replace(hour=0, minute=0, second=0, microsecond=0)
    assert dash.today.calls == sum(1 for i in range(7) if now - timedelta(seconds=i) >= midnight)
    assert format_credits(dash.today.charge_micros) in html
    assert len(dash.spend_7d) == 7 and dash.spend_7d[-1] == dash.today.charge_micros
    assert html.count('<polyline class="spark"') == 1
    shown = re.findall(r'href="/usage/(\d+)"', html)
    assert [int(x) for x in shown] == today[:5]
    assert "their-model" not in html


def test_dashboard_without_usage(ctx, client):
    """A new account sees a zero balance, zero spend and a hint instead of an empty table."""
    make_user()
    login(client)
    html = client.get("/").get_data(as_text=True)
    assert "No calls yet" in html and '<polyline class="spark"' in html


def test_dashboard_shows_keys_count_default_group_and_base_url(ctx, client):
    """The home counts live keys (not deleted ones), names the default group and the relay base URL."""
    from sqlalchemy import update

    from console import keys
    from console.database import write_tx
    from console.extensions import db
    from console.models import Group, User

    user = make_user()
    with write_tx():
        group = Group(slug="g1", name="Cheap 0.3x", multiplier_ppm=300_000)
        db.session.add(group)
        db.session.flush()
        db.session.execute(update(User).where(User.id == user.id).values(default_group_id=group.id))
    for name in ("a", "b", "c"):
        keys.create_key(user.id, name)
    gone, _secret = keys.create_key(user.id, "gone")
    keys.delete(user.id, gone.id)
    login(client)
    html = client.get("/").get_data(as_text=True)
    assert re.search(r'API keys</p>\s*<p class="stat-value">3</p>', html)
    assert "Cheap 0.3x" in html and "0.3x" in html
    assert 'id="relay-base-url">http://localhost/v1<' in html
