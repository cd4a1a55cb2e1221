"""Price table, model matching, provider/tier inference and cost calculation (pure, no I/O).

Money is computed in integer nano-dollars (1e-9 USD): rates are held as integer pico-dollars per
token, so a cost is an exact integer sum, rounded once to the nano-dollar. Totals built from these
integers never drift and equal `SUM(cost_nanos)` in SQLite exactly.
"""

from __future__ import annotations

import math
import re
from typing import Final

import msgspec

__all__ = [
    "NANOS_PER_USD",
    "Price",
    "PricingTable",
    "infer_provider",
    "nanos_to_usd",
    "tier_by_name",
    "usd_to_nanos",
]

NANOS_PER_USD: Final = 1_000_000_000
#: Pico-dollars per token for a rate of 1 USD per million tokens.
_PICO_PER_TOKEN_PER_USD_PER_M: Final = 1_000_000
#: Model ids that are a known id plus a version suffix: a date (`-20250929`, `-2024-08-06`),
#: `-latest`, a Bedrock/Vertex version (`-v1:0`, `@20250929`) or an Ollama tag (`:8b`).
#: Anything else after a known prefix is a different model and is not guessed at.
_VERSION_SUFFIX: Final = re.compile(
    r"^(?:-\d{8}|-\d{4}-\d{2}-\d{2})?(?:-v\d+(?::\d+)?)?(?:-latest)?$|^[:@].*$"
)
_VENDOR_PREFIX: Final = re.compile(r"^(?:[a-z]{2}\.)?(?:anthropic[./]|openai/|ollama/)")
_MATCH_CACHE_LIMIT: Final = 10_000


class Price(msgspec.Struct, frozen=True, kw_only=True):
    """One row of the price table, in USD per million tokens.

    Missing cache rates default to Anthropic's multipliers of the input rate: 1.25x for 5-minute
    cache writes, 2x for 1-hour writes, 0.1x for cache reads. Above `long_context_threshold`
    prompt tokens (input + cache writes + cache reads) the `long_*` rates apply to the whole call.
    """

    model: str
    provider: str
    tier: str
    input: float
    output: float
    cache_write_5m: float | None = None
    cache_write_1h: float | None = None
    cache_read: float | None = None
    long_context_threshold: int | None = None
    long_input: float | None = None
    long_output: float | None = None
    long_cache_write_5m: float | None = None
    long_cache_write_1h: float | None = None
    long_cache_read: float | None = None

    def __post_init__(self) -> None:
        for name in self.__struct_fields__[3:]:
            value = getattr(self, name)
            if value is not None and (not math.isfinite(value) or value < 0):
                raise ValueError(f"`{name}` must be a finite, non-negative number")
        if not self.model:
            raise ValueError("`model` must not be empty")

    def rates(self, long_context: bool) -> tuple[int, int, int, int, int]:
        """Integer pico-dollars per token: input, output, write 5m, write 1h, cache read."""
        if long_context and self.long_input is not None:
            inp = self.long_input
            out = self.output if self.long_output is None else self.long_output
            w5, w1, rd = self.long_cache_write_5m, self.long_cache_write_1h, self.long_cache_read
        else:
            inp, out = self.input, self.output
            w5, w1, rd = self.cache_write_5m, self.cache_write_1h, self.cache_read
        w5 = inp * 1.25 if w5 is None else w5
        w1 = inp * 2.0 if w1 is None else w1
        rd = inp * 0.1 if rd is None else rd
        return (_pico(inp), _pico(out), _pico(w5), _pico(w1), _pico(rd))


def _pico(usd_per_million: float) -> int:
    return round(usd_per_million * _PICO_PER_TOKEN_PER_USD_PER_M)


class _Compiled:
    """A price with its integer rates computed once, so pricing an event is a few multiplies."""

    __slots__ = ("long", "long_threshold", "normal", "price")

    def __init__(self, price: Price) -> None:
        self.price = price
        self.normal = price.rates(False)
        self.long = price.rates(True)
        self.long_threshold = price.long_context_threshold


class PricingTable:
    """The price table with cached model matching; replaced rows apply to new events at once."""

    def __init__(self, prices: list[Price] | None = None) -> None:
        self._rows: dict[str, _Compiled] = {}
        self._by_length: list[str] = []
        self._match_cache: dict[str, _Compiled | None] = {}
        for price in prices or []:
            self._rows[price.model] = _Compiled(price)
        self._reindex()

    def __len__(self) -> int:
        return len(self._rows)

    def prices(self) -> list[Price]:
        """Every row, sorted by model id."""
        return [self._rows[model].price for model in sorted(self._rows)]

    def set(self, price: Price) -> None:
        """Add or replace one row."""
        self._rows[price.model] = _Compiled(price)
        self._reindex()

    def remove(self, model: str) -> bool:
        """Drop one row; returns whether it existed."""
        found = self._rows.pop(model, None) is not None
        self._reindex()
        return found

    def match(self, model: str) -> Price | None:
        """The row for `model`: exact id, else the longest known id it extends with a version."""
        compiled = self._match(model)
        return None if compiled is None else compiled.price

    def cost_nanos(
        self,
        model: str,
        input_tokens: int,
        output_tokens: int,
        cache_creation_tokens: int = 0,
        cache_read_tokens: int = 0,
        cache_creation_1h_tokens: int = 0,
    ) -> int | None:
        """Cost of one call in nano-dollars, or None when the model has no price."""
        return self.price_call(
            model,
            input_tokens,
            output_tokens,
            cache_creation_tokens,
            cache_read_tokens,
            cache_creation_1h_tokens,
        )[2]

    def price_call(
        self,
        model: str,
        input_tokens: int,
        output_tokens: int,
        cache_creation_tokens: int,
        cache_read_tokens: int,
        cache_creation_1h_tokens: int,
    ) -> tuple[str, str, int | None, int]:
        """Everything the aggregator needs from one lookup: (provider, tier, cost nano-USD or
        None when unpriced, cache savings nano-USD)."""
        try:
            compiled = self._match_cache[model]  # _match(), inlined for the cached case
        except KeyError:
            compiled = self._match(model)
        if compiled is None:
            return infer_provider(model), tier_by_name(model), None, 0
        prompt = input_tokens + cache_creation_tokens + cache_read_tokens
        threshold = compiled.long_threshold
        rin, rout, rw5, rw1, rrd = (
            compiled.long if threshold is not None and prompt > threshold else compiled.normal
        )
        pico = (
            input_tokens * rin
            + output_tokens * rout
            + (cache_creation_tokens - cache_creation_1h_tokens) * rw5
            + cache_creation_1h_tokens * rw1
            + cache_read_tokens * rrd
        )
        savings = 0
        if cache_read_tokens:
            nin, _, _, _, nrd = compiled.normal
            savings = (cache_read_tokens * (nin - nrd) + 500) // 1000
        price = compiled.price
        return price.provider, price.tier, (pico + 500) // 1000, savings

    def savings_nanos(self, model: str, cache_read_tokens: int) -> int:
        """What prompt caching saved: cache reads at the input rate minus the cache-read rate."""
        if not cache_read_tokens:
            return 0
        compiled = self._match(model)
        if compiled is None:
            return 0
        rin, _, _, _, rrd = compiled.normal
        return (cache_read_tokens * (rin - rrd) + 500) // 1000

    def classify(self, model: str) -> tuple[str, str, bool]:
        """(provider, tier, priced) for a model id, from the table, else inferred from the name."""
        compiled = self._match(model)
        if compiled is not None:
            return compiled.price.provider, compiled.price.tier, True
        return infer_provider(model), tier_by_name(model), False

    def _match(self, model: str) -> _Compiled | None:
        try:
            return self._match_cache[model]
        except KeyError:
            pass
        found = self._lookup(_normalise(model))
        if len(self._match_cache) >= _MATCH_CACHE_LIMIT:
            # Model ids are few in practice; a flood of distinct ids must not grow memory.
            self._match_cache.clear()
        self._match_cache[model] = found
        return found

    def _lookup(self, model: str) -> _Compiled | None:
        exact = self._rows.get(model)
        if exact is not None:
            return exact
        for known in self._by_length:
            if model.startswith(known) and _VERSION_SUFFIX.match(model[len(known) :]):
                return self._rows[known]
        return None

    def _reindex(self) -> None:
        self._by_length = sorted(self._rows, key=len, reverse=True)
        self._match_cache.clear()


def _normalise(model: str) -> str:
    model = _VENDOR_PREFIX.sub("", model.strip().lower())
    if model.startswith("claude"):
        # "claude-opus-4.1" and "claude-opus-4-1" name the same model.
        model = model.replace(".", "-")
    return model


def infer_provider(model: str) -> str:
    """Provider from a model id: anthropic (claude-*), openai (gpt-*, o1/o3/o4*), else other."""
    name = _normalise(model)
    if name.startswith("claude"):
        return "anthropic"
    if name.startswith(("gpt-", "chatgpt", "o1", "o3", "o4", "text-embedding")):
        return "openai"
    return "other"


def tier_by_name(model: str) -> str:
    """Tier from a model id when the table does not know it: opus, sonnet, haiku, else other."""
    name = model.lower()
    for tier in ("opus", "sonnet", "haiku"):
        if tier in name:
            return tier
    return "other"


def usd_to_nanos(usd: float) -> int:
    """Dollars to integer nano-dollars, rounded to nearest."""
    return round(usd * NANOS_PER_USD)


def nanos_to_usd(nanos: int) -> float:
    """Integer nano-dollars to dollars (for display and JSON only)."""
    return nanos / NANOS_PER_USD
