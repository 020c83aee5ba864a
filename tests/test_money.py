"""Money units, raw-string parsing, formatting and the one rounding rule."""
from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from console import money

REJECTED = ["NaN", "nan", "Infinity", "-Infinity", "inf", "1E+9999", "1e3", "٣", "１２", "1_000",
            " 7 ", "7 ", "\t7", "+7", "0x10", "1,000", "1.", ".5", "1.0000001", "0.0000001",
            "1234567890", "9" * 20, "", " ", "--1", "1-", "1.2.3", "½", "1\n", "7\x00",
            "' OR 1=1 --", "<script>", "x" * 1_000_000, None, 7, 7.5, b"7"]


@pytest.mark.parametrize("raw,micros", [("0.000001", 1), ("1", 1_000_000), ("12.5", 12_500_000),
                                        ("007", 7_000_000), ("999999999.999999", 999_999_999_999_999)])
def test_parse_credits_accepts_plain_decimals(raw, micros):
    """ASCII digits with at most 9 integer and 6 decimal places become exact micro-credits."""
    assert money.parse_credits(raw) == micros


@pytest.mark.parametrize("raw", REJECTED, ids=lambda r: repr(r)[:20])
def test_parse_credits_rejects_the_corpus(raw):
    """NaN, infinities, exponents, non-ASCII digits, underscores, spaces, signs and huge strings fail."""
    with pytest.raises(money.MoneyError) as exc:
        money.parse_credits(raw)
    assert str(exc.value)  # a message safe to show


def test_signs_and_zero_only_when_allowed():
    """Negative amounts need allow_negative; zero needs allow_zero."""
    for raw in ("-1", "0", "0.000000", "-0"):
        with pytest.raises(money.MoneyError):
            money.parse_credits(raw)
    assert money.parse_credits("-1.5", allow_negative=True) == -1_500_000
    assert money.parse_credits("0", allow_zero=True) == 0


def test_multiplier_and_usd_parsing():
    """Multipliers and USD prices go through the same raw-string checks."""
    assert money.parse_multiplier("0.3") == 300_000 and money.parse_multiplier("1") == 1_000_000
    assert money.parse_usd("3.00") == 3_000_000 and money.parse_usd("0") == 0
    for raw in ("0", "NaN", "-0.3", "1e2", "٠.٣", "0.0000001", "12345"):
        with pytest.raises(money.MoneyError):
            money.parse_multiplier(raw)
    for raw in ("$3", "3e0", "Infinity", "-3", "1234567"):
        with pytest.raises(money.MoneyError):
            money.parse_usd(raw)


@pytest.mark.parametrize("num,den,expected", [(5, 10, 1), (4, 10, 0), (15, 10, 2), (-5, 10, -1),
                                              (-4, 10, 0), (-15, 10, -2), (0, 7, 0), (14, 7, 2)])
def test_round_half_up_away_from_zero(num, den, expected):
    """The one rounding rule: exact integer division, half away from zero."""
    assert money.round_half_up_div(num, den) == expected


def test_rounding_rejects_bad_denominators():
    """A zero or negative denominator is a programming error."""
    for den in (0, -1):
        with pytest.raises(ValueError):
            money.round_half_up_div(1, den)


def test_charge_is_official_cost_times_multiplier_rounded_once():
    """1 USD at 1x is 1 credit; 0.3x of $0.014607 is ¥0.004382 (half-up on the 7th decimal)."""
    assert money.charge_micros(10**12, 1_000_000) == 1_000_000
    assert money.charge_micros(14_607_000_000, 300_000) == 4_382
    assert money.charge_micros(1_500_000, 1_000_000) == 2  # 1.5 micro → 2
    assert money.charge_micros(1_499_999, 1_000_000) == 1


def test_formatting():
    """Micro-credits format with the site's symbol, grouping and trimmed decimals."""
    assert money.format_credits(1_234_500_000) == "¥1,234.50"
    assert money.format_credits(1, "$") == "$0.000001"
    assert money.format_credits(-2_000_000) == "-¥2.00"
    assert money.format_multiplier(300_000) == "0.3x"
    assert money.format_usd_pico(14_607_000_000) == "$0.014607"
    assert money.share_of_official_percent(300_000, "7") == "4.3"


def test_money_filter_uses_the_currency_setting(ctx):
    """The Jinja money filter uses the currency symbol from site settings (default ¥)."""
    from console import settings

    template = ctx.jinja_env.from_string("{{ m | money }}")  # a variable: Jinja folds constants
    assert template.render(m=1_500_000) == "¥1.50"
    settings.put("currency_symbol", "US$")
    assert template.render(m=1_500_000) == "US$1.50"


@given(st.integers(min_value=1, max_value=999_999_999_999_999))
def test_parse_inverts_plain_format(micros):
    """Any representable amount written as plain digits parses back to the same micro-credits."""
    whole, frac = divmod(micros, 1_000_000)
    assert money.parse_credits(f"{whole}.{frac:06d}") == micros
