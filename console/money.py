"""Money units, parsing, formatting and the one rounding rule.

Units (never a float on a money path):
- balances and charges: integer micro-credits (1 credit = 1_000_000);
- official prices: integer micro-USD per 1M tokens (or micro-USD per call);
- official cost of a call: integer pico-USD (tokens × micro-USD-per-1M is exactly pico-USD);
- group multiplier: integer parts-per-million (0.3x = 300_000).
A charge is official cost × multiplier, rounded once, half-up, to the micro-credit.
"""
from __future__ import annotations

import re
from decimal import Decimal

MICROS = 1_000_000          # micro-credits per credit, micro-USD per USD, ppm per 1x
PICO_PER_MICRO_CREDIT = 10**6 * MICROS  # pico-USD × ppm per micro-credit (see charge_micros)

# Raw-string shapes, checked before any conversion: ASCII digits only, bounded lengths.
# Decimal() alone accepts "NaN", "1E+999", " 7 ", "1_000", "٣" and "１２".
_AMOUNT = re.compile(r"(-?)([0-9]{1,9})(?:\.([0-9]{1,6}))?")
_MULTIPLIER = re.compile(r"([0-9]{1,4})(?:\.([0-9]{1,6}))?")
_USD = re.compile(r"([0-9]{1,6})(?:\.([0-9]{1,6}))?")


class MoneyError(ValueError):
    """A money string that is not acceptable; the message is safe to show."""


def _fixed_to_int(whole: str, frac: str | None, places: int = 6) -> int:
    return int(whole) * 10**places + int((frac or "").ljust(places, "0"))


def parse_credits(raw: object, *, allow_negative: bool = False, allow_zero: bool = False) -> int:
    """'12.5' → 12_500_000 micro-credits. At most 9 integer digits and 6 decimals."""
    if not isinstance(raw, str) or len(raw) > 20:
        raise MoneyError("Enter an amount such as 12.50 (digits, at most 6 decimals).")
    m = _AMOUNT.fullmatch(raw)
    if not m:
        raise MoneyError("Enter an amount such as 12.50 (digits, at most 6 decimals).")
    sign, whole, frac = m.groups()
    if sign and not allow_negative:
        raise MoneyError("The amount must be positive.")
    value = _fixed_to_int(whole, frac)
    if value == 0 and not allow_zero:
        raise MoneyError("The amount must not be zero.")
    return -value if sign else value


def parse_multiplier(raw: object) -> int:
    """'0.3' → 300_000 ppm. Positive, at most 9999.999999x."""
    if not isinstance(raw, str) or len(raw) > 12:
        raise MoneyError("Enter a multiplier such as 0.3.")
    m = _MULTIPLIER.fullmatch(raw)
    if not m:
        raise MoneyError("Enter a multiplier such as 0.3.")
    ppm = _fixed_to_int(*m.groups())
    if ppm == 0:
        raise MoneyError("The multiplier must be above zero.")
    return ppm


def parse_usd(raw: object) -> int:
    """'3.00' (USD per 1M tokens, or per call) → 3_000_000 micro-USD."""
    if not isinstance(raw, str) or len(raw) > 14:
        raise MoneyError("Enter a USD price such as 3.00.")
    m = _USD.fullmatch(raw)
    if not m:
        raise MoneyError("Enter a USD price such as 3.00.")
    return _fixed_to_int(*m.groups())


def round_half_up_div(numerator: int, denominator: int) -> int:
    """The one rounding rule: exact integer division, half away from zero."""
    if denominator <= 0:
        raise ValueError("denominator must be positive")
    q, r = divmod(abs(numerator), denominator)
    if 2 * r >= denominator:
        q += 1
    return q if numerator >= 0 else -q


def charge_micros(official_pico_usd: int, multiplier_ppm: int) -> int:
    """Official cost (pico-USD) × multiplier (ppm) → micro-credits, rounded once.

    1 USD at 1x is 1 credit: pico-USD × ppm / 10^12 = micro-credits.
    """
    return round_half_up_div(official_pico_usd * multiplier_ppm, PICO_PER_MICRO_CREDIT)


def scaled_price(price_micro_usd: int, ratio_ppm: int) -> int:
    """A unit price × a ratio (ppm), as a tier's price (pricing.Prices.for_input): rounded
    half-up to the micro-USD, the unit prices are stored in."""
    return round_half_up_div(price_micro_usd * ratio_ppm, MICROS)


# ---- formatting (the Jinja filters call these) ----------------------------------------

def _group_thousands(n: int) -> str:
    return f"{n:,}"


def format_fixed(value: int, places: int = 6, min_places: int = 2) -> str:
    """Integer in 10^-places units → '1,234.50' (trailing zeros trimmed to min_places)."""
    sign = "-" if value < 0 else ""
    whole, frac = divmod(abs(value), 10**places)
    frac_s = str(frac).rjust(places, "0").rstrip("0").ljust(min_places, "0")
    return f"{sign}{_group_thousands(whole)}" + (f".{frac_s}" if frac_s else "")


def format_credits(micros: int, symbol: str = "¥") -> str:
    return f"{symbol}{format_fixed(micros)}" if micros >= 0 else f"-{symbol}{format_fixed(-micros)}"


def format_usd_micros(micro_usd: int) -> str:
    return "$" + format_fixed(micro_usd)


def format_usd_pico(pico_usd: int) -> str:
    """Official cost with full precision: '$0.014607'."""
    return "$" + format_fixed(pico_usd, places=12, min_places=6)


def format_multiplier(ppm: int) -> str:
    return format_fixed(ppm, min_places=0) + "x"


def share_of_official_percent(multiplier_ppm: int, exchange_rate: str) -> str:
    """0.3x at an exchange rate of 7 → '4.3' (% of the official price in local money).

    Display only; never used to bill.
    """
    rate = Decimal(exchange_rate)
    pct = Decimal(multiplier_ppm) / Decimal(MICROS) / rate * 100
    return f"{pct.quantize(Decimal('0.1')):f}"


def to_decimal_credits(micros: int) -> Decimal:
    """For exact CSV output."""
    return Decimal(micros).scaleb(-6)
