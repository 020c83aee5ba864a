"""Usage records: filters, keyset pages, owner scoping, detail formula, CSV export, summary,
rollup and group statistics, against a real database (SQLite and PostgreSQL)."""
from __future__ import annotations

import csv
import io
import itertools
import re
import uuid
from datetime import UTC, datetime, timedelta

import pytest
from sqlalchemy import func, insert, select

from console import usage
from console.database import write_tx
from console.extensions import db
from console.models import ApiKey, Group, ModelPrice, UsageDaily, UsageRecord, UsageRollupMark, User, utcnow
from console.money import format_fixed, format_usd_pico
from console.pricing import Prices, Tokens, quote
from tests.support.web import HX, login, make_user

_seq = itertools.count(1)


def make_group(name: str = "Budget", multiplier_ppm: int = 300_000) -> int:
    with write_tx():
        g = Group(slug=f"{name.lower()}-{next(_seq)}", name=name, multiplier_ppm=multiplier_ppm)
        db.session.add(g)
    return g.id


def make_key(user_id: int, name: str = "laptop", group_id: int | None = None) -> int:
    with write_tx():
        k = ApiKey(user_id=user_id, name=name, key_hash=uuid.uuid4().hex * 2,
                   display_prefix=f"sk-{name[:3]}…{next(_seq):04d}", group_id=group_id)
        db.session.add(k)
    return k.id


def record_values(user_id: int, *, created_at: datetime | None = None, model: str = "claude-sonnet-4",
                  key_id: int | None = None, group_id: int | None = None, multiplier_ppm: int = 300_000,
                  status: str = "ok", usage_source: str = "upstream", input_tokens: int = 1000,
                  output_tokens: int = 500, cache_write_5m_tokens: int = 0, cache_read_tokens: int = 0,
                  web_searches: int = 0, web_search_price: int = 10_000,
                  input_price: int = 3_000_000, output_price: int = 15_000_000,
                  cache_write_price: int = 3_750_000, cache_read_price: int = 300_000,
                  latency_ms: int | None = 1200, ttfb_ms: int | None = 300, stream: bool = True,
                  service_tier: str = "") -> dict:
    """A usage record billed the way the relay bills: by quote(); failed calls charge nothing."""
    created_at = created_at or utcnow()
    prices = Prices(input=input_price, output=output_price, cache_write_5m=cache_write_price,
                    cache_write_1h=cache_write_price, cache_read=cache_read_price, web_search=web_search_price)
    tokens = Tokens(input=input_tokens, output=output_tokens, cache_write_5m=cache_write_5m_tokens,
                    cache_read=cache_read_tokens, web_searches=web_searches)
    q = quote(tokens, prices, multiplier_ppm)
    billed = status in ("ok", "partial")
    return {
        "request_id": f"req_{uuid.uuid4().hex}", "user_id": user_id, "key_id": key_id, "group_id": group_id,
        "model": model, "endpoint": "/v1/messages", "stream": stream, "status": status, "usage_source": usage_source,
        "input_tokens": input_tokens, "output_tokens": output_tokens,
        "cache_write_5m_tokens": cache_write_5m_tokens, "cache_write_1h_tokens": 0,
        "cache_read_tokens": cache_read_tokens, "input_price": input_price, "output_price": output_price,
        "cache_write_5m_price": cache_write_price, "cache_write_1h_price": cache_write_price,
        "cache_read_price": cache_read_price, "per_call_price": 0, "multiplier_ppm": multiplier_ppm,
        "web_searches": web_searches, "web_search_price": web_search_price, "service_tier": service_tier,
        "official_cost_pico": q.official_pico if billed else 0,
        "charge_micros": q.charge_micros if billed else 0, "hold_micros": 0,
        "latency_ms": latency_ms, "ttfb_ms": ttfb_ms, "attempts": 1, "created_at": created_at,
        "deadline_at": created_at + timedelta(minutes=10),
        "settled_at": None if status == "pending" else created_at + timedelta(seconds=2)}


def add_records(rows: list[dict]) -> None:
    with write_tx():
        db.session.execute(insert(UsageRecord), rows)


def add_record(user_id: int, **kw) -> int:
    values = record_values(user_id, **kw)
    add_records([values])
    return db.session.scalar(select(UsageRecord.id).where(UsageRecord.request_id == values["request_id"]))


def user_id(email: str = "user@example.com") -> int:
    return db.session.scalar(select(User.id).where(User.email == email))


def setup_user(client, email: str = "user@example.com") -> int:
    make_user(email)
    login(client, email)
    return user_id(email)


def row_ids(html: str) -> list[int]:
    return [int(x) for x in re.findall(r'id="usage-row-(\d+)"', html)]


# ---- the records page --------------------------------------------------------------------------

def test_records_newest_first_and_only_the_owners(ctx, client):
    """The page lists the user's calls newest first and never another user's."""
    make_user("other@example.com")
    other = user_id("other@example.com")
    me = setup_user(client)
    now = utcnow()
    mine = [add_record(me, created_at=now - timedelta(minutes=i)) for i in range(3)]
    theirs = add_record(other, created_at=now)
    resp = client.get("/usage/")
    assert resp.status_code == 200
    html = resp.get_data(as_text=True)
    assert row_ids(html) == mine
    assert theirs not in row_ids(html)
    assert 'id="usage-filters"' in html and 'id="usage-results"' in html


def test_another_users_record_is_404_everywhere(ctx, client):
    """Detail, row and pagination cursors of another user's record answer 404."""
    make_user("other@example.com")
    theirs = add_record(user_id("other@example.com"))
    setup_user(client)
    assert client.get(f"/usage/{theirs}").status_code == 404
    assert client.get(f"/usage/{theirs}/row", headers=HX).status_code == 404
    assert client.get(f"/usage/?before={theirs}").status_code == 404
    assert client.get(f"/usage/?after={theirs}").status_code == 404
    assert client.get("/usage/999999").status_code == 404


def test_filters_by_key_model_group_status_and_range(ctx, client):
    """Each filter narrows the rows to exactly the matching calls."""
    me = setup_user(client)
    g1, g2 = make_group("Budget"), make_group("Dedicated", 1_000_000)
    k1, k2 = make_key(me, "laptop"), make_key(me, "server")
    now = utcnow()
    a = add_record(me, key_id=k1, group_id=g1, model="gpt-4o", created_at=now - timedelta(minutes=1))
    b = add_record(me, key_id=k2, group_id=g2, model="claude-sonnet-4", status="failed",
                   created_at=now - timedelta(minutes=2))
    c = add_record(me, key_id=k1, group_id=g2, model="claude-sonnet-4", usage_source="estimated",
                   status="partial", created_at=now - timedelta(days=3))
    d = add_record(me, key_id=k2, group_id=g1, model="gpt-4o", created_at=now - timedelta(days=20))

    def ids(query: str) -> list[int]:
        resp = client.get("/usage/?" + query)
        assert resp.status_code == 200, query
        return row_ids(resp.get_data(as_text=True))

    assert ids("") == [a, b, c, d]
    assert ids(f"key={k1}") == [a, c]
    assert ids("model=gpt-4o") == [a, d]
    assert ids(f"group={g2}") == [b, c]
    assert ids("status=failed") == [b]
    assert ids("status=ok") == [a, d]
    assert ids("status=partial") == [c]
    assert ids("status=estimated") == [c]
    midnight = now.replace(hour=0, minute=0, second=0, microsecond=0)
    assert ids("range=today") == [x for x, m in ((a, 1), (b, 2)) if now - timedelta(minutes=m) >= midnight]
    assert ids("range=7d") == [a, b, c]
    assert ids("range=30d") == [a, b, c, d]
    day = (now - timedelta(days=3)).date().isoformat()
    assert ids(f"range=custom&from={day}&to={day}") == [c]
    assert ids(f"range=custom&from={day}") == [a, b, c]
    assert ids(f"key={k1}&model=claude-sonnet-4") == [c]
    # Dates without "custom" are ignored rather than half-applied.
    assert ids(f"range=all&from={day}&to={day}") == [a, b, c, d]


BAD_QUERIES = [
    "range=yesterday", "key=abc", "key=-1", "group=1.5", "status=weird", "range=custom&from=2024-02-30",
    "range=custom&from=2024-05-02&to=2024-05-01", "range=custom&from=%D9%A3", "before=x",
    "model=" + "m" * 101,
]


def test_bad_filters_are_422_with_the_form(ctx, client):
    """Invalid filter values answer 422 with a message and no rows (page and fragment), never a 500."""
    me = setup_user(client)
    add_record(me)
    for query in BAD_QUERIES:
        resp = client.get("/usage/?" + query)
        assert resp.status_code == 422, query
        html = resp.get_data(as_text=True)
        assert 'role="alert"' in html and row_ids(html) == [], query
        frag = client.get("/usage/?" + query, headers=HX)
        assert frag.status_code == 422, query
        assert frag.get_data(as_text=True).lstrip().startswith('<div id="usage-results">'), query


def test_htmx_gets_the_results_fragment_with_pushable_links(ctx, client):
    """A targeted htmx request gets #usage-results only; its links push the URL."""
    me = setup_user(client)
    for i in range(usage.PAGE_SIZE + 1):
        add_record(me, created_at=utcnow() - timedelta(seconds=i))
    resp = client.get("/usage/?status=ok", headers=HX)
    html = resp.get_data(as_text=True)
    assert resp.status_code == 200 and "HX-Request" in resp.headers["Vary"]
    assert html.lstrip().startswith('<div id="usage-results">') and "<html" not in html
    assert 'hx-push-url="true"' in html and "status=ok&amp;before=" in html
    boosted = client.get("/usage/", headers={**HX, "HX-Boosted": "true"})
    assert "<html" in boosted.get_data(as_text=True)


def _walk(client, first: str, direction: str) -> list[list[int]]:
    pages, url = [], first
    while url:
        html = client.get(url).get_data(as_text=True)
        pages.append(row_ids(html))
        m = re.search(r'rel="%s" href="([^"]+)"' % ("next" if direction == "older" else "prev"), html)
        url = m.group(1).replace("&amp;", "&") if m else None
    return pages


def test_keyset_pages_cover_every_record_once_including_ties(ctx, client):
    """Older/newer links walk all records exactly once, even with equal timestamps at a page edge."""
    me = setup_user(client)
    n = usage.PAGE_SIZE * 2 + 1
    base = utcnow().replace(microsecond=0)
    # Ten records share each timestamp, so page edges fall inside runs of equal created_at.
    add_records([record_values(me, created_at=base - timedelta(seconds=i // 10)) for i in range(n)])
    expected = list(db.session.scalars(select(UsageRecord.id).order_by(
        UsageRecord.created_at.desc(), UsageRecord.id.desc())))
    pages = _walk(client, "/usage/", "older")
    assert [len(p) for p in pages] == [usage.PAGE_SIZE, usage.PAGE_SIZE, 1]
    assert [i for p in pages for i in p] == expected
    # Back from the last page with "Newer": the same pages in reverse.
    last_first = pages[-1][0]
    back = _walk(client, f"/usage/?after={last_first}", "newer")
    assert back == [pages[1], pages[0]]


def test_exactly_one_page_has_no_older_link(ctx, client):
    """With exactly PAGE_SIZE records there is no "Older" link (no empty last page)."""
    me = setup_user(client)
    add_records([record_values(me, created_at=utcnow() - timedelta(seconds=i))
                 for i in range(usage.PAGE_SIZE)])
    html = client.get("/usage/").get_data(as_text=True)
    assert len(row_ids(html)) == usage.PAGE_SIZE
    assert 'rel="next"' not in html and 'rel="prev"' not in html


def test_pagination_keeps_the_filter(ctx, client):
    """Pages of a filtered list contain only matching records."""
    me = setup_user(client)
    add_records([record_values(me, model="gpt-4o" if i % 2 else "claude-sonnet-4",
                               created_at=utcnow() - timedelta(seconds=i)) for i in range(150)])
    pages = _walk(client, "/usage/?model=gpt-4o", "older")
    assert [len(p) for p in pages] == [50, 25]
    models = set(db.session.scalars(select(UsageRecord.model).where(
        UsageRecord.id.in_([i for p in pages for i in p]))))
    assert models == {"gpt-4o"}


# ---- detail ---------------------------------------------------------------------------------------

def test_detail_formula_comes_from_billing_and_equals_the_charge(ctx, client):
    """The detail shows the billing formula with its numbers; its result is the stored charge."""
    me = setup_user(client)
    g = make_group("Budget", 300_000)
    rid = add_record(me, group_id=g, input_tokens=1234, output_tokens=567, cache_read_tokens=8000)
    rec = db.session.get(UsageRecord, rid)
    expected = ("(1,234 × $3.00 + 567 × $15.00 + 8,000 × $0.30) / 1M = $0.014607 official × 0.3 "
                "= ¥0.004382 credits")
    assert quote(Tokens.of_record(rec), Prices.of_record(rec), rec.multiplier_ppm).formula("¥") == expected
    page = client.get(f"/usage/{rid}")
    html = page.get_data(as_text=True)
    assert page.status_code == 200 and expected in html and rec.request_id in html
    charged = re.search(r"= ¥([0-9.,]+) credits", expected).group(1)
    assert charged == format_fixed(rec.charge_micros)
    official = re.search(r"= (\$[0-9.]+) official", expected).group(1)
    assert official == format_usd_pico(rec.official_cost_pico)
    assert "differs from the recomputed" not in html


def test_detail_names_the_web_searches_billed(ctx, client):
    """A call with two web searches: the formula adds them at their price, the facts list them,
    and the result is the stored charge."""
    me = setup_user(client)
    rid = add_record(me, input_tokens=1234, output_tokens=567, web_searches=2)
    rec = db.session.get(UsageRecord, rid)
    expected = ("(1,234 × $3.00 + 567 × $15.00) / 1M + 2 searches × $0.01 = $0.032207 official × 0.3 "
                "= ¥0.009662 credits")
    html = client.get(f"/usage/{rid}").get_data(as_text=True)
    assert expected in html and format_fixed(rec.charge_micros) == "0.009662"
    assert re.search(rf'id="web-searches-{rid}">2 × \$0.01 each', html)
    assert "differs from the recomputed" not in html


def test_detail_says_when_the_long_context_tier_priced_the_call(ctx, client):
    """A record whose prompt passed its model's long-context threshold says so beside its formula
    (the prices in the formula are the tier's); a shorter one does not."""
    me = setup_user(client)
    with write_tx():
        db.session.add(ModelPrice(name="claude-sonnet-4", provider="anthropic", input_price=3_000_000,
                                  output_price=15_000_000, long_context_threshold=200_000,
                                  long_context_input_ppm=2_000_000, long_context_output_ppm=1_500_000))
    long = add_record(me, input_tokens=150_000, cache_read_tokens=50_001, input_price=6_000_000,
                      output_price=22_500_000, cache_read_price=600_000)
    short = add_record(me, input_tokens=150_000, cache_read_tokens=50_000)
    html = client.get(f"/usage/{long}").get_data(as_text=True)
    assert f'id="long-context-{long}"' in html and "passed 200,000 input tokens" in html
    assert "150,000 × $6.00" in html and "differs from the recomputed" not in html
    assert "long-context-" not in client.get(f"/usage/{short}").get_data(as_text=True)


def test_detail_and_csv_name_the_processing_tier_that_priced_the_call(ctx, client):
    """A record billed at fast mode's prices says so beside its formula and in the CSV; a
    standard one does not."""
    me = setup_user(client)
    fast = add_record(me, input_tokens=1000, input_price=18_000_000, output_price=90_000_000,
                      service_tier="fast")
    plain = add_record(me, input_tokens=1000)
    html = client.get(f"/usage/{fast}").get_data(as_text=True)
    assert f'id="service-tier-{fast}"' in html and "Served with fast mode" in html
    assert "1,000 × $18.00" in html and "differs from the recomputed" not in html
    assert "service-tier-" not in client.get(f"/usage/{plain}").get_data(as_text=True)
    table = list(csv.reader(io.StringIO(client.get("/usage/export.csv").get_data(as_text=True))))
    col = table[0].index("service_tier")
    assert [line[col] for line in table[1:-1]] == ["", "fast"] and table[-1][col] == ""


def test_detail_expands_in_place_for_htmx_and_collapses_back(ctx, client):
    """htmx gets the expanded <tbody> for the row; "Hide" returns the collapsed row."""
    me = setup_user(client)
    rid = add_record(me)
    frag = client.get(f"/usage/{rid}", headers=HX).get_data(as_text=True)
    assert frag.lstrip().startswith(f'<tbody id="usage-detail-{rid}"') and "<html" not in frag
    assert "official ×" in frag
    row = client.get(f"/usage/{rid}/row", headers=HX).get_data(as_text=True)
    assert row.lstrip().startswith(f'<tbody id="usage-row-{rid}"')
    plain = client.get(f"/usage/{rid}/row")
    assert plain.status_code == 302 and plain.headers["Location"].endswith(f"/usage/{rid}")


def test_failed_call_detail_explains_the_zero_charge(ctx, client):
    """A failed call shows its formula and says that nothing was charged."""
    me = setup_user(client)
    rid = add_record(me, status="failed")
    html = client.get(f"/usage/{rid}").get_data(as_text=True)
    assert "failed calls are not charged" in html


# ---- CSV ------------------------------------------------------------------------------------------

def test_csv_export_rows_and_totals_equal_the_records(ctx, client):
    """The CSV has one row per filtered record, screen-equal numbers, and a totals line of their sums."""
    me = setup_user(client)
    k = make_key(me, "=cmd|evil")
    rows = [record_values(me, key_id=k, model="gpt-4o" if i % 3 else "claude-sonnet-4",
                          input_tokens=1000 + i, output_tokens=7 * i, cache_read_tokens=i * 11,
                          web_searches=i % 4, created_at=utcnow() - timedelta(seconds=i)) for i in range(40)]
    rows.append(record_values(me, key_id=k, status="failed", model="gpt-4o"))
    add_records(rows)
    resp = client.get("/usage/export.csv?model=gpt-4o", buffered=False)
    assert resp.status_code == 200 and resp.mimetype == "text/csv"
    assert resp.is_streamed
    assert "attachment" in resp.headers["Content-Disposition"]
    table = list(csv.reader(io.StringIO(resp.get_data(as_text=True))))
    header, body, total = table[0], table[1:-1], table[-1]
    assert header[0] == "time_utc" and total[0] == "TOTAL"
    recs = list(db.session.scalars(select(UsageRecord).where(UsageRecord.model == "gpt-4o").order_by(
        UsageRecord.created_at.desc(), UsageRecord.id.desc())))
    assert [r[1] for r in body] == [r.request_id for r in recs]
    col = {name: i for i, name in enumerate(header)}
    for line, rec in zip(body, recs):
        assert line[col["credits"]] == format_fixed(rec.charge_micros).replace(",", "")
        assert line[col["official_usd"]] == format_usd_pico(rec.official_cost_pico)[1:]
        assert line[col["key"]] == "'=cmd|evil"  # a spreadsheet must not run it as a formula
    assert total[1] == f"{len(recs)} calls"
    assert int(total[col["input_tokens"]]) == sum(r.input_tokens for r in recs)
    assert int(total[col["cache_read_tokens"]]) == sum(r.cache_read_tokens for r in recs)
    assert [int(line[col["web_searches"]]) for line in body] == [r.web_searches for r in recs]
    assert int(total[col["web_searches"]]) == sum(r.web_searches for r in recs) > 0
    assert total[col["credits"]] == format_fixed(sum(r.charge_micros for r in recs)).replace(",", "")
    assert total[col["official_usd"]] == format_usd_pico(sum(r.official_cost_pico for r in recs))[1:]


def test_csv_export_is_owner_scoped_and_rejects_bad_filters(ctx, client):
    """Another user's records never reach the CSV; a bad filter is a 422."""
    make_user("other@example.com")
    add_record(user_id("other@example.com"))
    me = setup_user(client)
    mine = add_record(me)
    table = list(csv.reader(io.StringIO(client.get("/usage/export.csv").get_data(as_text=True))))
    assert len(table) == 3 and table[1][1] == db.session.get(UsageRecord, mine).request_id
    assert client.get("/usage/export.csv?status=nope").status_code == 422


# ---- summary, rollup --------------------------------------------------------------------------------

def _history(me: int, now: datetime) -> list[dict]:
    g = make_group()
    k = make_key(me)
    rows = []
    for day in range(0, 45, 3):
        for j in range(3):
            rows.append(record_values(me, key_id=k, group_id=g, model=("gpt-4o", "claude-sonnet-4", "o3")[j],
                                      input_tokens=100 * (day + 1), output_tokens=10 * j,
                                      created_at=now - timedelta(days=day, minutes=j)))
    return rows


def test_summary_totals_equal_the_records_and_the_rollup_is_exact(ctx, client):
    """Today, month and all-time totals match the records, before and after days are rolled up."""
    me = setup_user(client)
    now = utcnow()
    rows = _history(me, now)
    add_records(rows)
    s = usage.summary(me, now=now)
    recs = list(db.session.scalars(select(UsageRecord).where(UsageRecord.user_id == me)))
    tokens = lambda r: (r.input_tokens + r.output_tokens + r.cache_write_5m_tokens
                        + r.cache_write_1h_tokens + r.cache_read_tokens)
    today0 = now.replace(hour=0, minute=0, second=0, microsecond=0)
    month0 = today0.replace(day=1)
    for t, since in ((s.all_time, None), (s.month, month0), (s.today, today0)):
        sel = [r for r in recs if since is None or r.created_at >= since]
        assert (t.calls, t.tokens, t.charge_micros) == (
            len(sel), sum(map(tokens, sel)), sum(r.charge_micros for r in sel))
    mark = db.session.get(UsageRollupMark, me)
    assert mark is not None and mark.closed_through < now.date()
    assert db.session.scalar(select(func.sum(UsageDaily.calls)).where(UsageDaily.user_id == me)) == len(
        [r for r in recs if r.created_at.date() <= mark.closed_through])
    # Again: the rollup is not added twice.
    again = usage.summary(me, now=now)
    assert again.all_time == s.all_time
    assert sum(sum(v) for v in s.spend_by_model.values()) == sum(
        r.charge_micros for r in recs if r.created_at.date() >= now.date() - timedelta(days=29))
    html = client.get("/usage/summary").get_data(as_text=True)
    assert "Daily spend, last 30 days" in html and "Calls per hour today" in html
    assert html.count('<g class="bar">') == 30


def test_a_pending_call_keeps_its_day_open(ctx):
    """Days from the earliest pending call on are not rolled up, so its settlement still counts."""
    make_user()
    me = user_id()
    now = utcnow()
    add_records([record_values(me, created_at=now - timedelta(days=10)),
                 record_values(me, created_at=now - timedelta(days=5), status="pending")])
    usage.summary(me, now=now)
    mark = db.session.get(UsageRollupMark, me)
    assert mark.closed_through == (now - timedelta(days=5)).date() - timedelta(days=1)
    with write_tx():
        rec = db.session.scalar(select(UsageRecord).where(UsageRecord.status == "pending"))
        rec.status, rec.charge_micros = "ok", 1234
    db.session.expire_all()
    s = usage.summary(me, now=now)
    assert s.all_time.calls == 2
    assert s.all_time.charge_micros == 1234 + db.session.scalar(
        select(UsageRecord.charge_micros).where(UsageRecord.created_at < now - timedelta(days=9)))


# ---- group stats ---------------------------------------------------------------------------------

def test_group_stats_medians_success_rate_and_minute_cache(ctx):
    """Per group: last-24h median latency/TTFB and success rate, cached rather than recomputed."""
    make_user()
    me = user_id()
    g1, g2 = make_group("Budget"), make_group("Dedicated")
    now = utcnow()
    rows = [record_values(me, group_id=g1, latency_ms=lat, ttfb_ms=lat // 10, created_at=now)
            for lat in (100, 200, 300, 400, 5000)]
    rows.append(record_values(me, group_id=g1, status="failed", latency_ms=9, ttfb_ms=None))
    rows.append(record_values(me, group_id=g1, latency_ms=1, created_at=now - timedelta(hours=25)))
    rows.append(record_values(me, group_id=g2, status="pending", latency_ms=None))
    add_records(rows)
    usage.clear_caches()
    stats = usage.group_stats()
    s1 = stats[g1]
    assert s1.calls == 6 and s1.success_rate == pytest.approx(5 / 6)
    assert s1.median_latency_ms == 300 and s1.median_ttfb_ms == 30
    assert g2 not in stats  # only in-flight calls: nothing measured yet
    add_records([record_values(me, group_id=g2, created_at=now)])
    assert usage.group_stats() is stats  # served from the cache
    usage.clear_caches()
    assert usage.group_stats()[g2].calls == 1


def test_usage_pages_need_login(client):
    """Usage pages redirect anonymous users to the login page; htmx gets 401 + HX-Redirect."""
    for path in ("/usage/", "/usage/1", "/usage/export.csv", "/usage/summary"):
        resp = client.get(path)
        assert resp.status_code == 302 and "/login" in resp.headers["Location"]
    resp = client.get("/usage/", headers=HX)
    assert resp.status_code == 401 and "HX-Redirect" in resp.headers


def test_timestamps_are_utc(ctx):
    """Records come back timezone-aware in UTC on both databases."""
    make_user()
    rid = add_record(user_id(), created_at=datetime(2024, 5, 1, 23, 30, tzinfo=UTC))
    assert db.session.get(UsageRecord, rid).created_at.tzinfo is not None
