"""Pricing page and calculator: every price shown is the price the billing code charges."""
from __future__ import annotations

import html as html_lib
import re
from decimal import Decimal

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from sqlalchemy import select, update

from console import groups, ledger, money, pricing, seed
from console.database import write_tx
from console.extensions import db
from console.models import Group, ModelPrice, User
from tests.support.web import HX, make_user

CHARGE = re.compile(r'<strong id="calc-charge"[^>]*>([^<]+)</strong>')


def _micros(shown: str) -> int:
    """'¥1,234.500001' → 1_234_500_001 micro-credits (the inverse of the money filter)."""
    text = html_lib.unescape(shown).strip().lstrip("-").replace(",", "")
    value = Decimal(re.sub(r"^[^0-9]+", "", text)) * money.MICROS
    assert value == value.to_integral_value()
    return int(value) * (-1 if shown.strip().startswith("-") else 1)


def _calc(client, model: str, group: str, **tokens):
    return client.get("/pricing", query_string={"model": model, "group": group, **tokens}, headers=HX)


@pytest.fixture
def seeded(ctx):
    seed.seed_reference()
    return ctx


def test_pricing_page_is_public_and_lists_models_by_group(seeded, client):
    """Anonymous visitors see every enabled model with official and effective prices per visible group."""
    resp = client.get("/pricing")
    html = resp.data.decode()
    assert resp.status_code == 200 and "<html" in html and 'id="calculator"' in html
    for model in db.session.scalars(select(ModelPrice)):
        assert f"<code>{model.name}</code>" in html
    for group in groups.visible_groups():
        assert group.name in html
    assert "not served" in html  # economy does not serve claude-opus-4-1


def test_every_effective_price_on_the_page_is_the_billing_price(seeded, client):
    """Each effective price cell equals pricing.price_per_million_credits of that class and group."""
    html = client.get("/pricing").data.decode()
    table_groups, rows = groups.pricing_table()
    checked = searches = longs = 0
    for row in rows:
        chunk = html.split(f'id="price-row-{row.model.id}"')[1].split("</tr>")[0]
        prices = pricing.Prices.of(row.model)
        for g in table_groups:
            cells = re.findall(rf'data-group="{g.slug}" data-price="([^"]+)">([^<]+)<', chunk)
            if row.model.id not in {m.id for m in g.models}:
                assert not cells
                continue
            for label, shown in cells:
                if " above " in label:  # "input above 200,000 input tokens": the tier's price
                    cls, threshold = label.split(" ")[0], int(label.split(" ")[2].replace(",", ""))
                    assert threshold == prices.long_threshold
                    over = pricing.quote(pricing.Tokens(input=threshold + 1), prices, g.multiplier_ppm)
                    assert over.prices.input == 2 * prices.input and over.prices.output * 2 == 3 * prices.output
                    tier = getattr(over.prices, cls)
                    assert _micros(shown) == pricing.price_per_million_credits(tier, g.multiplier_ppm)
                    longs += 1
                    continue
                if label == "web search / 1k":  # per 1,000 searches, not per 1M tokens
                    quoted = pricing.quote(pricing.Tokens(web_searches=1000), prices, g.multiplier_ppm)
                    assert quoted.official_pico == prices.web_search * 1000 * 10**6 > 0
                    assert _micros(shown) == quoted.charge_micros, (row.model.name, g.slug, label)
                    searches += 1
                    continue
                cls = {"input": "input", "output": "output", "cache write 5m": "cache_write_5m",
                       "cache write 1h": "cache_write_1h", "cache read": "cache_read"}[label]
                expected = pricing.price_per_million_credits(getattr(prices, cls), g.multiplier_ppm)
                assert _micros(shown) == expected, (row.model.name, g.slug, label)
                # The rate of calls below a long-context threshold (1M tokens would pass it).
                regular = prices.for_input(0)
                quoted = pricing.quote(pricing.Tokens(**{cls: 1_000_000}), regular, g.multiplier_ppm)
                assert quoted.charge_micros == expected
                checked += 1
    assert checked > 50 and searches > 10 and longs == 2 * sum(
        "claude-sonnet-4-5" in {m.name for m in g.models} for g in table_groups) > 0


def test_calculator_full_page_without_js_and_fragment_with_htmx(seeded, client):
    """The calculator is a GET form: full page without JS, its fragment for htmx, formula written out."""
    q = {"model": "claude-sonnet-4-5", "group": "recommended", "input": "1234", "output": "567"}
    full = client.get("/pricing", query_string=q)
    assert full.status_code == 200 and b"<html" in full.data
    frag = client.get("/pricing", query_string=q, headers=HX)
    assert frag.status_code == 200 and frag.data.lstrip().startswith(b'<form id="calculator"')
    expected = pricing.quote(pricing.Tokens(input=1234, output=567),
                             pricing.Prices.of(db.session.scalar(select(ModelPrice).where(
                                 ModelPrice.name == "claude-sonnet-4-5"))), 300_000)
    assert _micros(CHARGE.search(frag.data.decode()).group(1)) == expected.charge_micros == 3_662
    formula = html_lib.unescape(re.search(r'id="calc-formula">([^<]+)<', frag.data.decode()).group(1))
    assert formula == expected.formula("¥")
    assert "1,234 × $3.00 + 567 × $15.00" in formula


def test_a_prompt_above_200k_is_priced_whole_at_the_long_context_tier(seeded, client):
    """claude-sonnet-4-5: 150,000 input + 50,000 cache read is exactly 200,000 input-side
    tokens, regular prices; one token more and every token is priced at $6 / $22.50 / $0.60."""
    q = {"model": "claude-sonnet-4-5", "group": "dedicated", "input": "150000", "output": "1000",
         "cache_read": "50000"}
    at = client.get("/pricing", query_string=q, headers=HX).data.decode()
    formula = html_lib.unescape(re.search(r'id="calc-formula">([^<]+)<', at).group(1))
    assert formula.startswith("(150,000 × $3.00 + 1,000 × $15.00 + 50,000 × $0.30) / 1M = $0.480000 ")
    over = client.get("/pricing", query_string={**q, "input": "150001"}, headers=HX).data.decode()
    formula = html_lib.unescape(re.search(r'id="calc-formula">([^<]+)<', over).group(1))
    assert formula.startswith("(150,001 × $6.00 + 1,000 × $22.50 + 50,000 × $0.60) / 1M = $0.952506 ")
    assert _micros(CHARGE.search(over).group(1)) == 952_506


def test_tier_prices_round_half_up_to_the_micro_usd_and_bound_the_hold():
    """A tier's prices are the regular ones × its ratios, rounded half-up once; the hold of a
    prompt bound above the threshold is priced at the tier, at the dearest input-side price."""
    prices = pricing.Prices(input=1, output=3, cache_write_5m=5, cache_read=2, long_threshold=10,
                            long_input_ppm=1_500_000, long_output_ppm=1_500_000)
    tier = prices.for_input(11)
    assert (tier.input, tier.output, tier.cache_write_5m, tier.cache_read) == (2, 5, 8, 3)
    assert prices.for_input(10).input == 1 and tier.long_threshold == 0
    assert pricing.max_charge(prices, 1_000_000, 11, 0) == pricing.quote(
        pricing.Tokens(input=11), pricing.Prices(input=8), 1_000_000).charge_micros
    assert pricing.max_charge(prices, 1_000_000, 10, 0) == pricing.quote(
        pricing.Tokens(input=10), pricing.Prices(input=5), 1_000_000).charge_micros


def test_a_processing_tier_scales_every_token_price_and_stacks_with_long_context():
    """Priority ×1.75 scales input, output and cache prices (rounded half-up once each) and
    leaves per-call and search prices alone; an unpriced or standard tier keeps the prices;
    a long-context tier applies on top; the hold of a priority request is priced at it."""
    prices = pricing.Prices(input=1_000_000, output=3, cache_read=2, web_search=10_000, long_threshold=10,
                            long_input_ppm=2_000_000, long_output_ppm=1_000_000, priority_ppm=1_750_000)
    fast = prices.for_service("priority")
    assert (fast.input, fast.output, fast.cache_read, fast.web_search) == (1_750_000, 5, 4, 10_000)
    assert prices.for_service("flex").input == prices.for_service("default").input == 1_000_000
    assert prices.offers("priority") and not prices.offers("flex") and not prices.offers("scale")
    assert prices.offers("fast") and prices.for_service("fast") == fast  # fast mode: the same tier
    q = pricing.quote(pricing.Tokens(input=11, service_tier="priority"), prices, 1_000_000)
    assert q.prices.input == 3_500_000 and q.official_pico == 11 * 3_500_000
    assert pricing.max_charge(prices, 1_000_000, 5, 0, 0, "priority") == pricing.quote(
        pricing.Tokens(input=5), pricing.Prices(input=1_750_000), 1_000_000).charge_micros


def test_the_pricing_page_lists_a_models_processing_tiers(seeded, client):
    """A model with a priority ratio shows its priority prices in every group that serves it,
    each the billing price of a call served at that tier."""
    with write_tx():
        db.session.execute(update(ModelPrice).where(ModelPrice.name == "gpt-5").values(priority_ppm=2_000_000))
    model = db.session.scalar(select(ModelPrice).where(ModelPrice.name == "gpt-5"))
    chunk = client.get("/pricing").data.decode().split(f'id="price-row-{model.id}"')[1].split("</tr>")[0]
    group = groups.by_slug("recommended")
    cells = dict(re.findall(r'data-group="recommended" data-price="([^"]+)">([^<]+)<', chunk))
    assert _micros(cells["input, priority tier"]) == pricing.quote(
        pricing.Tokens(input=1_000_000, service_tier="priority"), pricing.Prices.of(model),
        group.multiplier_ppm).charge_micros == 750_000  # $2.50 × 0.3
    assert _micros(cells["output, priority tier"]) == 6_000_000 and "input, flex tier" not in cells


def test_the_pricing_page_calls_an_anthropic_models_premium_tier_fast_mode(seeded, client):
    """The same ratio on a Claude model prices its fast mode (speed "fast"): listed as such,
    at the billing price of a call served fast."""
    with write_tx():
        db.session.execute(update(ModelPrice).where(ModelPrice.name == "claude-sonnet-4-5")
                           .values(priority_ppm=6_000_000))
    model = db.session.scalar(select(ModelPrice).where(ModelPrice.name == "claude-sonnet-4-5"))
    chunk = client.get("/pricing").data.decode().split(f'id="price-row-{model.id}"')[1].split("</tr>")[0]
    cells = dict(re.findall(r'data-group="recommended" data-price="([^"]+)">([^<]+)<', chunk))
    assert "input, priority tier" not in cells
    fast = pricing.Prices.of(model).for_service("fast")  # below the model's long-context tier
    assert _micros(cells["input, fast mode"]) == pricing.price_per_million_credits(
        fast.input, groups.by_slug("recommended").multiplier_ppm) == 5_400_000  # $3 × 6 × 0.3


def test_calculator_prices_web_searches_on_top_of_tokens(seeded, client):
    """Three searches of claude-sonnet-4-5 at $10 / 1k add $0.03 official, 0.009 credits at 0.3x,
    and the formula names them."""
    q = {"model": "claude-sonnet-4-5", "group": "recommended", "input": "1234", "output": "567",
         "web_searches": "3"}
    frag = client.get("/pricing", query_string=q, headers=HX).data.decode()
    assert _micros(CHARGE.search(frag).group(1)) == 3_662 + 9_000
    formula = html_lib.unescape(re.search(r'id="calc-formula">([^<]+)<', frag).group(1))
    assert formula.startswith("(1,234 × $3.00 + 567 × $15.00) / 1M + 3 searches × $0.01 = $0.042")
    only = client.get("/pricing", query_string={**q, "input": "", "output": ""}, headers=HX).data.decode()
    assert _micros(CHARGE.search(only).group(1)) == 9_000
    formula = html_lib.unescape(re.search(r'id="calc-formula">([^<]+)<', only).group(1))
    assert formula == "3 searches × $0.01 = $0.030000 official × 0.3 = ¥0.009 credits"


@pytest.mark.parametrize("query,field", [
    ({"model": "nope", "group": "recommended"}, b"Pick one of the listed models"),
    ({"model": "gpt-5", "group": "hidden-or-missing"}, b"Pick one of the listed groups"),
    ({"model": "claude-opus-4-1", "group": "economy"}, b"does not serve"),
    ({"model": "gpt-5", "group": "recommended", "input": "-5"}, b"whole number of tokens"),
    ({"model": "gpt-5", "group": "recommended", "output": "1e9"}, b"whole number of tokens"),
    ({"model": "gpt-5", "group": "recommended", "input": "\u0663"}, b"whole number of tokens"),
    ({"model": "gpt-5", "group": "recommended", "input": "99999999999"}, b"whole number of tokens"),
    ({"model": "gpt-5", "group": "recommended", "web_searches": "10001"}, b"whole number of searches"),
    ({"model": "gpt-5", "group": "recommended", "web_searches": "2.5"}, b"whole number of searches"),
])
def test_calculator_rejects_bad_input_with_422(seeded, client, query, field):
    """Unknown model or group, a model the group lacks, or a non-digit token count: 422 with the form."""
    resp = client.get("/pricing", query_string=query, headers=HX)
    assert resp.status_code == 422 and field in resp.data
    assert resp.data.lstrip().startswith(b'<form id="calculator"') and b'id="calc-charge"' not in resp.data
    assert client.get("/pricing", query_string=query).status_code == 422


@pytest.mark.slow
@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(
    multiplier=st.decimals(min_value=Decimal("0.000001"), max_value=Decimal(20), places=6),
    input_tokens=st.integers(0, 2_000_000),
    output_tokens=st.integers(0, 200_000),
    cache_read=st.integers(0, 1_000_000),
    cache_write=st.integers(0, 500_000),
    searches=st.integers(0, 60),
    model_name=st.sampled_from(["claude-opus-4-1", "gpt-5", "claude-haiku-4-5", "gpt-4o-mini", "claude-sonnet-4-5"]),
)
def test_calculator_equals_quote_and_ledger_billing(seeded, client, multiplier, input_tokens, output_tokens,
                                                    cache_read, cache_write, searches, model_name):
    """For random tokens and multipliers: calculator = pricing.quote = what hold/settle takes from a wallet."""
    if not db.session.scalar(select(User.id)):
        make_user("billing@example.com")
    uid = db.session.scalar(select(User.id))
    text = format(multiplier.normalize(), "f")
    group = db.session.scalar(select(Group).where(Group.slug == "dedicated"))
    form = {"slug": "dedicated", "name": group.name, "description": "", "multiplier": text, "badge": "dedicated",
            "concurrency_limit": "50", "rpm_limit": "3000", "sort_order": "1", "visible": "on"}
    groups.save_group(group.id, form, actor_id=uid, model_ids=[str(m.id) for m in group.models])
    ppm = money.parse_multiplier(text)
    model = db.session.scalar(select(ModelPrice).where(ModelPrice.name == model_name))
    tokens = pricing.Tokens(input=input_tokens, output=output_tokens, cache_read=cache_read,
                            cache_write_5m=cache_write, web_searches=searches)
    expected = pricing.quote(tokens, pricing.Prices.of(model), ppm)

    resp = _calc(client, model_name, "dedicated", input=str(input_tokens), output=str(output_tokens),
                 cache_read=str(cache_read), cache_write_5m=str(cache_write), web_searches=str(searches))
    assert resp.status_code == 200
    shown = _micros(CHARGE.search(resp.data.decode()).group(1))
    assert shown == expected.charge_micros
    # The exact rational cost, rounded half-up once, is the same number.
    exact = (Decimal(expected.official_pico) * multiplier / Decimal(10**6)).quantize(Decimal(1), rounding="ROUND_HALF_UP")
    assert shown == int(exact)

    # Billing as the relay does it: hold the upper bound, then settle with the quoted charge.
    bound = pricing.max_charge(pricing.Prices.of(model), ppm, input_tokens + cache_read + cache_write, output_tokens,
                               searches)
    assert bound >= expected.charge_micros
    ledger.credit(uid, bound + 1, kind="admin_adjust", reason="property test top-up")
    before = ledger.wallet_of(uid).balance_micros
    if bound:
        ledger.hold(uid, bound)
    ledger.settle(uid, hold_micros=bound, charge_micros=expected.charge_micros, ref_type="test", ref_id="calc")
    db.session.expire_all()
    wallet = ledger.wallet_of(uid)
    assert before - wallet.balance_micros == shown and wallet.held_micros == 0
    assert ledger.verify() == []
