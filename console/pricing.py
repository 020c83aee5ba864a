"""What a call costs: the single function that prices tokens, used by billing, the pricing
page, the calculator and the usage detail alike, so they can never disagree.
"""
from __future__ import annotations

from dataclasses import dataclass, field, replace

from console.money import (
    MICROS,
    charge_micros,
    format_fixed,
    format_multiplier,
    format_usd_micros,
    format_usd_pico,
    scaled_price,
)

TOKEN_CLASSES = ("input", "output", "cache_write_5m", "cache_write_1h", "cache_read")
# A usage record's processing tier (Prices.tier_served), as a person reads it. OpenAI renamed
# priority processing Fast mode and takes either name; Anthropic's fast mode is speed "fast".
TIER_LABELS = {"priority": "priority processing", "fast": "fast mode", "flex": "flex processing"}
CLASS_LABELS = {
    "input": "input",
    "output": "output",
    "cache_write_5m": "cache write (5 min)",
    "cache_write_1h": "cache write (1 h)",
    "cache_read": "cache read",
}


@dataclass(frozen=True)
class Prices:
    """Unit prices in micro-USD per 1M tokens (per_call: micro-USD per call; web_search:
    micro-USD per search the provider ran for the call, a server tool's fee per use)."""

    input: int = 0
    output: int = 0
    cache_write_5m: int = 0
    cache_write_1h: int = 0
    cache_read: int = 0
    per_call: int = 0
    web_search: int = 0
    # Long-context tier: a call whose input side (input + cache writes + cache reads) exceeds
    # long_threshold tokens is priced whole at input-side prices × long_input_ppm and the
    # output price × long_output_ppm (Anthropic's 1M-context beta: above 200K, ×2 and ×1.5).
    long_threshold: int = 0
    long_input_ppm: int = MICROS
    long_output_ppm: int = MICROS
    # Processing tiers: every token price × the tier's ratio; 0 = the tier is not offered (the
    # relay refuses a request for it). priority_ppm prices the faster tier at a premium, which
    # both providers now call fast mode: OpenAI's priority processing (service_tier "priority"
    # or, since its renaming, "fast") and Anthropic's fast mode (speed "fast").
    priority_ppm: int = 0
    flex_ppm: int = 0

    def _tier_ppm(self, service_tier: str) -> int:
        return {"priority": self.priority_ppm, "fast": self.priority_ppm,
                "flex": self.flex_ppm}.get(service_tier, 0)

    def offers(self, service_tier: str) -> bool:
        return bool(self._tier_ppm(service_tier))

    def tier_served(self, service_tier: str) -> str:
        """The tier a usage record names: the one reported, if it changes the prices."""
        return service_tier if self._tier_ppm(service_tier) else ""

    def _scaled(self, input_side_ppm: int, output_ppm: int) -> "Prices":
        """Every input-side price × one ratio and the output price × another."""
        return replace(self, input=scaled_price(self.input, input_side_ppm),
                       output=scaled_price(self.output, output_ppm),
                       cache_write_5m=scaled_price(self.cache_write_5m, input_side_ppm),
                       cache_write_1h=scaled_price(self.cache_write_1h, input_side_ppm),
                       cache_read=scaled_price(self.cache_read, input_side_ppm))

    def for_service(self, service_tier: str) -> "Prices":
        """The prices of a call the provider served at this processing tier; a tier without a
        ratio (or the standard one) keeps the standard prices."""
        ppm = self._tier_ppm(service_tier)
        base = replace(self, priority_ppm=0, flex_ppm=0) if self.priority_ppm or self.flex_ppm else self
        return base._scaled(ppm, ppm) if ppm else base

    def for_input(self, input_side_tokens: int) -> "Prices":
        """The flat prices of a call with this many input-side tokens (its tier's)."""
        flat = replace(self, long_threshold=0) if self.long_threshold else self
        if not self.long_threshold or input_side_tokens <= self.long_threshold:
            return flat
        return flat._scaled(self.long_input_ppm, self.long_output_ppm)

    @classmethod
    def of(cls, model) -> "Prices":
        """From a ModelPrice row; cache classes without a price fall back to the input price."""
        return cls(
            input=model.input_price,
            output=model.output_price,
            cache_write_5m=model.cache_write_5m_price if model.cache_write_5m_price is not None else model.input_price,
            cache_write_1h=model.cache_write_1h_price if model.cache_write_1h_price is not None else model.input_price,
            cache_read=model.cache_read_price if model.cache_read_price is not None else model.input_price,
            per_call=model.per_call_price or 0,
            web_search=model.web_search_price or 0,
            long_threshold=model.long_context_threshold or 0,
            long_input_ppm=model.long_context_input_ppm or MICROS,
            long_output_ppm=model.long_context_output_ppm or MICROS,
            priority_ppm=model.priority_ppm or 0,
            flex_ppm=model.flex_ppm or 0,
        )

    @classmethod
    def of_record(cls, rec) -> "Prices":
        """The prices a usage record was billed with."""
        return cls(rec.input_price, rec.output_price, rec.cache_write_5m_price,
                   rec.cache_write_1h_price, rec.cache_read_price, rec.per_call_price,
                   rec.web_search_price)


@dataclass(frozen=True)
class Tokens:
    """A call's usage: tokens per class, and the web searches the provider ran for it."""

    input: int = 0
    output: int = 0
    cache_write_5m: int = 0
    cache_write_1h: int = 0
    cache_read: int = 0
    web_searches: int = 0
    service_tier: str = ""  # the processing tier the provider reports it served the call at

    @classmethod
    def of_record(cls, rec) -> "Tokens":
        return cls(rec.input_tokens, rec.output_tokens, rec.cache_write_5m_tokens,
                   rec.cache_write_1h_tokens, rec.cache_read_tokens, rec.web_searches)

    @property
    def input_side(self) -> int:
        """Every token of the prompt, however it was priced (what a long-context tier counts)."""
        return self.input + self.cache_write_5m + self.cache_write_1h + self.cache_read


@dataclass(frozen=True)
class Quote:
    tokens: Tokens
    prices: Prices
    multiplier_ppm: int
    official_pico: int
    charge_micros: int
    terms: tuple[tuple[str, int, int], ...] = field(default=())  # (class, tokens, price)

    @property
    def searches(self) -> bool:
        """Web searches are part of the charge (run, and priced)."""
        return bool(self.tokens.web_searches and self.prices.web_search)

    def formula(self, symbol: str = "") -> str:
        """'(1,234 × $3.00 + 567 × $15.00) / 1M = $0.011739 official × 0.3 = 0.003522 credits'."""
        parts = [f"{n:,} × {format_usd_micros(p)}" for _c, n, p in self.terms]
        extra = []
        if self.prices.per_call or not (parts or self.searches):
            extra.append(f"{format_usd_micros(self.prices.per_call)} per call")
        if self.searches:
            n = self.tokens.web_searches
            extra.append(f"{n:,} search{'es' if n != 1 else ''} × {format_usd_micros(self.prices.web_search)}")
        head = " + ".join(([f"({' + '.join(parts)}) / 1M"] if parts else []) + extra)
        mult = format_multiplier(self.multiplier_ppm).removesuffix("x")
        return (f"{head} = {format_usd_pico(self.official_pico)} official × {mult} = "
                f"{symbol}{format_fixed(self.charge_micros)} credits")


def quote(tokens: Tokens, prices: Prices, multiplier_ppm: int) -> Quote:
    """Official cost in pico-USD (tokens × micro-USD-per-1M is exact) × multiplier, rounded once.
    The quote's prices are the flat prices of the call's tier (a record stores those)."""
    prices = prices.for_service(tokens.service_tier).for_input(tokens.input_side)
    terms = tuple(
        (c, getattr(tokens, c), getattr(prices, c))
        for c in TOKEN_CLASSES
        if getattr(tokens, c)
    )
    if tokens.web_searches < 0 or any(n < 0 for _c, n, _p in terms):
        raise ValueError("token counts are never negative")
    official = (sum(n * p for _c, n, p in terms) + prices.per_call * 10**6
                + tokens.web_searches * prices.web_search * 10**6)
    return Quote(tokens, prices, multiplier_ppm, official, charge_micros(official, multiplier_ppm), terms)


def max_charge(prices: Prices, multiplier_ppm: int, input_tokens_max: int, output_tokens_max: int,
               web_searches_max: int = 0, service_tier: str = "") -> int:
    """Upper bound of a call's charge, for the admission hold: every input token is priced at
    the dearest input class (a cache write costs more than plain input)."""
    dearest_input = max(prices.input, prices.cache_write_5m, prices.cache_write_1h, prices.cache_read)
    bound = replace(prices, input=dearest_input, cache_write_5m=0, cache_write_1h=0, cache_read=0)
    usage = Tokens(input=input_tokens_max, output=output_tokens_max, web_searches=web_searches_max,
                   service_tier=service_tier)
    return quote(usage, bound, multiplier_ppm).charge_micros


def price_per_million_credits(price_micro_usd: int, multiplier_ppm: int) -> int:
    """Effective price shown on the pricing page: micro-credits per 1M tokens in a group."""
    return quote(Tokens(input=1_000_000), Prices(input=price_micro_usd), multiplier_ppm).charge_micros
