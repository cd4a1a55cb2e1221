"""Pricing: the shipped price table (migration 002) against SPEC section 3, computed by hand.

The table under test is built the way the product builds it: a real SQLite file, every
migration applied, then `load_pricing`. Expected costs come from the SPEC's numbers written
below as literals, never from the table itself.
"""

from __future__ import annotations

import math
from collections.abc import AsyncIterator
from fractions import Fraction
from pathlib import Path

import msgspec
import pytest
import pytest_asyncio
from hypothesis import given, settings
from hypothesis import strategies as st

from exporter.events import from_openai_usage
from exporter.pricing import Price, PricingTable
from exporter.store.db import connect, load_pricing, migrate

NANOS_PER_USD = 1_000_000_000
TOKENS_PER_RATE = 1_000_000  # rates are USD per million tokens


@pytest_asyncio.fixture(scope="module", loop_scope="module")
async def shipped(tmp_path_factory: pytest.TempPathFactory) -> AsyncIterator[PricingTable]:
    """The price table as the product loads it from a freshly migrated database."""
    path: Path = tmp_path_factory.mktemp("pricing") / "exporter.db"
    conn = await connect(path)
    try:
        await migrate(conn)
        table = await load_pricing(conn)
    finally:
        await conn.close()
    yield table


def half_up(value: Fraction) -> int:
    """Round a non-negative exact value to the nearest integer, halves upwards."""
    return math.floor(value + Fraction(1, 2))


def expected_nanos(
    rates: tuple[str, str, str, str, str],
    input_tokens: int,
    output_tokens: int,
    cache_creation_tokens: int = 0,
    cache_read_tokens: int = 0,
    cache_creation_1h_tokens: int = 0,
) -> int:
    """SPEC's cost formula in exact arithmetic: rates are (in, out, write 5m, write 1h, read)."""
    rin, rout, rw5, rw1, rrd = (Fraction(rate) for rate in rates)
    usd = (
        input_tokens * rin
        + output_tokens * rout
        + (cache_creation_tokens - cache_creation_1h_tokens) * rw5
        + cache_creation_1h_tokens * rw1
        + cache_read_tokens * rrd
    ) / TOKENS_PER_RATE
    return half_up(usd * NANOS_PER_USD)


# SPEC section 3, "Shipped prices", USD per 1M tokens: (in, out, write 5m, write 1h, read).
# OpenAI lists in / out / cached in; it has no cache-write premium, so a cache write is billed
# as ordinary input (migration 002 says the same) and cached input is the cache-read rate.
SPEC_PRICES: list[tuple[str, str, str, tuple[str, str, str, str, str]]] = [
    ("claude-opus-4", "anthropic", "opus", ("15", "75", "18.75", "30", "1.50")),
    ("claude-opus-4-1", "anthropic", "opus", ("15", "75", "18.75", "30", "1.50")),
    ("claude-opus-4-5", "anthropic", "opus", ("5", "25", "6.25", "10", "0.50")),
    ("claude-opus-4-6", "anthropic", "opus", ("5", "25", "6.25", "10", "0.50")),
    ("claude-opus-4-7", "anthropic", "opus", ("5", "25", "6.25", "10", "0.50")),
    ("claude-opus-4-8", "anthropic", "opus", ("5", "25", "6.25", "10", "0.50")),
    ("claude-sonnet-4", "anthropic", "sonnet", ("3", "15", "3.75", "6", "0.30")),
    ("claude-sonnet-4-5", "anthropic", "sonnet", ("3", "15", "3.75", "6", "0.30")),
    ("claude-sonnet-4-6", "anthropic", "sonnet", ("3", "15", "3.75", "6", "0.30")),
    ("claude-haiku-4-5", "anthropic", "haiku", ("1", "5", "1.25", "2", "0.10")),
    ("claude-3-5-haiku", "anthropic", "haiku", ("0.80", "4", "1", "1.60", "0.08")),
    ("gpt-4o", "openai", "gpt", ("2.50", "10", "2.50", "2.50", "1.25")),
    ("gpt-4o-mini", "openai", "gpt-mini", ("0.15", "0.60", "0.15", "0.15", "0.075")),
    ("gpt-4.1", "openai", "gpt", ("2", "8", "2", "2", "0.50")),
    ("gpt-4.1-mini", "openai", "gpt-mini", ("0.40", "1.60", "0.40", "0.40", "0.10")),
    ("o3", "openai", "reasoning", ("2", "8", "2", "2", "0.50")),
    ("o4-mini", "openai", "reasoning", ("1.10", "4.40", "1.10", "1.10", "0.275")),
    ("gpt-5", "openai", "gpt", ("1.25", "10", "1.25", "1.25", "0.125")),
    ("gpt-5.1", "openai", "gpt", ("1.25", "10", "1.25", "1.25", "0.125")),
    ("gpt-5-mini", "openai", "gpt-mini", ("0.25", "2", "0.25", "0.25", "0.025")),
    ("llama3.1", "ollama", "local", ("0", "0", "0", "0", "0")),
    ("qwen3-coder", "ollama", "local", ("0", "0", "0", "0", "0")),
    ("gpt-oss", "ollama", "local", ("0", "0", "0", "0", "0")),
]

SONNET_RATES = ("3", "15", "3.75", "6", "0.30")
SONNET_LONG_RATES = ("6", "22.50", "7.50", "12", "0.60")

# A call that uses every kind of token, with a prompt (input + cache writes + cache reads) of
# 134,566 tokens: below the 200k long-context threshold of Sonnet 4 / 4.5.
EVERY_KIND = {
    "input_tokens": 12_345,
    "output_tokens": 6_789,
    "cache_creation_tokens": 23_456,
    "cache_read_tokens": 98_765,
    "cache_creation_1h_tokens": 7_890,
}


@pytest.mark.parametrize("model", ["claude-opus-4-1", "claude-opus-4-1-20250805"])
def test_seed_worked_example_opus_4_1_costs_exactly_0_225_usd(
    shipped: PricingTable, model: str
) -> None:
    assert shipped.cost_nanos(model, 5_000, 2_000) == 225_000_000


@pytest.mark.parametrize(
    ("model", "provider", "tier", "rates"),
    SPEC_PRICES,
    ids=[row[0] for row in SPEC_PRICES],
)
def test_shipped_price_charges_every_token_kind_at_the_spec_rate(
    shipped: PricingTable,
    model: str,
    provider: str,
    tier: str,
    rates: tuple[str, str, str, str, str],
) -> None:
    assert shipped.cost_nanos(model, **EVERY_KIND) == expected_nanos(rates, **EVERY_KIND)
    assert shipped.classify(model) == (provider, tier, True)


def test_every_paid_row_of_the_shipped_table_is_a_spec_price(shipped: PricingTable) -> None:
    spec_models = {row[0] for row in SPEC_PRICES}
    paid = {price.model for price in shipped.prices() if price.provider != "ollama"}
    assert paid == {row[0] for row in SPEC_PRICES if row[1] != "ollama"}
    assert spec_models - {price.model for price in shipped.prices()} == set()


def test_every_ollama_row_costs_nothing(shipped: PricingTable) -> None:
    local = [price.model for price in shipped.prices() if price.provider == "ollama"]
    assert len(local) >= 10
    for model in local:
        assert shipped.cost_nanos(model, **EVERY_KIND) == 0, model
        assert shipped.classify(f"{model}:latest") == ("ollama", "local", True)


# --- long context ------------------------------------------------------------------------


@pytest.mark.parametrize(
    "model", ["claude-sonnet-4-5", "claude-sonnet-4-5-20250929", "claude-sonnet-4"]
)
@pytest.mark.parametrize(
    ("tokens", "long_context"),
    [
        ({"input_tokens": 200_001, "output_tokens": 3_000}, True),
        ({"input_tokens": 200_000, "output_tokens": 3_000}, False),
        # Cache writes and cache reads are prompt tokens too.
        (
            {
                "input_tokens": 50_000,
                "output_tokens": 4_000,
                "cache_creation_tokens": 60_000,
                "cache_creation_1h_tokens": 10_000,
                "cache_read_tokens": 90_001,
            },
            True,
        ),
        (
            {
                "input_tokens": 50_000,
                "output_tokens": 4_000,
                "cache_creation_tokens": 60_000,
                "cache_creation_1h_tokens": 10_000,
                "cache_read_tokens": 90_000,
            },
            False,
        ),
        # Output tokens are not prompt tokens.
        ({"input_tokens": 150_000, "output_tokens": 100_000}, False),
    ],
    ids=["input-above", "input-exactly-200k", "prompt-above", "prompt-exactly-200k", "output"],
)
def test_sonnet_4_and_4_5_price_the_whole_call_at_long_rates_above_200k_prompt_tokens(
    shipped: PricingTable, model: str, tokens: dict[str, int], long_context: bool
) -> None:
    rates = SONNET_LONG_RATES if long_context else SONNET_RATES
    assert shipped.cost_nanos(model, **tokens) == expected_nanos(rates, **tokens)


def test_long_context_call_costs_the_hand_computed_amount(shipped: PricingTable) -> None:
    # 250,000 in at $6 + 10,000 out at $22.50 = $1.50 + $0.225.
    assert shipped.cost_nanos("claude-sonnet-4-5", 250_000, 10_000) == 1_725_000_000
    # The same call one token shorter than the threshold: $0.60 + $0.15 at the normal rates.
    assert shipped.cost_nanos("claude-sonnet-4-5", 200_000, 10_000) == 750_000_000


def test_sonnet_4_6_has_no_long_context_rate(shipped: PricingTable) -> None:
    tokens = {
        "input_tokens": 300_000,
        "output_tokens": 5_000,
        "cache_creation_tokens": 100_000,
        "cache_creation_1h_tokens": 40_000,
        "cache_read_tokens": 400_000,
    }
    assert shipped.cost_nanos("claude-sonnet-4-6", **tokens) == expected_nanos(
        SONNET_RATES, **tokens
    )


# --- matching ----------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("sent", "row"),
    [
        ("claude-sonnet-4-5", "claude-sonnet-4-5"),
        ("claude-sonnet-4-5-20250929", "claude-sonnet-4-5"),
        ("claude-opus-4-1-20250805", "claude-opus-4-1"),
        ("claude-opus-4-20250514", "claude-opus-4"),
        ("claude-sonnet-4-20250514", "claude-sonnet-4"),
        ("claude-3-5-haiku-20241022", "claude-3-5-haiku"),
        ("claude-3-5-haiku-latest", "claude-3-5-haiku"),
        ("claude-opus-4.1", "claude-opus-4-1"),
        ("anthropic.claude-sonnet-4-5-20250929-v1:0", "claude-sonnet-4-5"),
        ("us.anthropic.claude-opus-4-1-20250805-v1:0", "claude-opus-4-1"),
        ("claude-sonnet-4-5@20250929", "claude-sonnet-4-5"),
        ("gpt-4o-2024-08-06", "gpt-4o"),
        ("gpt-4o-mini-2024-07-18", "gpt-4o-mini"),
        ("gpt-4.1-mini-2025-04-14", "gpt-4.1-mini"),
        ("gpt-5-mini-2025-08-07", "gpt-5-mini"),
        ("o4-mini-2025-04-16", "o4-mini"),
        ("llama3.1:8b", "llama3.1"),
        ("llama3:70b", "llama3"),
    ],
)
def test_model_id_matches_exactly_or_by_longest_prefix_with_a_version_suffix(
    shipped: PricingTable, sent: str, row: str
) -> None:
    matched = shipped.match(sent)
    assert matched is not None
    assert matched.model == row


def test_dated_gpt_4o_is_priced_as_gpt_4o_not_gpt_4o_mini(shipped: PricingTable) -> None:
    # 1M in + 1M out: $2.50 + $10 for gpt-4o; gpt-4o-mini would be $0.15 + $0.60.
    assert shipped.cost_nanos("gpt-4o-2024-08-06", 1_000_000, 1_000_000) == 12_500_000_000
    assert shipped.cost_nanos("gpt-4o-mini-2024-07-18", 1_000_000, 1_000_000) == 750_000_000


def test_ollama_tag_is_priced_at_zero_and_classified_as_local(shipped: PricingTable) -> None:
    assert shipped.cost_nanos("llama3.1:8b", 10_000, 2_000) == 0
    assert shipped.classify("llama3.1:8b") == ("ollama", "local", True)


@pytest.mark.parametrize(
    ("model", "provider", "tier"),
    [
        ("claude-opus-9-turbo", "anthropic", "opus"),
        ("claude-sonnet-5", "anthropic", "sonnet"),
        ("claude-haiku-9", "anthropic", "haiku"),
        ("claude-instant-1", "anthropic", "other"),
        ("o3-mini", "openai", "other"),
        ("o1-preview", "openai", "other"),
        ("gpt-4o-audio-preview", "openai", "other"),
        ("mystery-model", "other", "other"),
    ],
)
def test_unknown_model_is_unpriced_and_classified_by_name(
    shipped: PricingTable, model: str, provider: str, tier: str
) -> None:
    assert shipped.match(model) is None
    assert shipped.cost_nanos(model, 1_000, 1_000, 1_000, 1_000, 500) is None
    assert shipped.classify(model) == (provider, tier, False)


# --- savings -----------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("model", "cache_read_tokens", "saved_nanos"),
    [
        # 1M reads * ($3 - $0.30) per 1M.
        ("claude-sonnet-4-5", 1_000_000, 2_700_000_000),
        # 40,000 reads * ($15 - $1.50) per 1M = $0.54.
        ("claude-opus-4-1-20250805", 40_000, 540_000_000),
        # 4,000 reads * ($2.50 - $1.25) per 1M = $0.005.
        ("gpt-4o", 4_000, 5_000_000),
        # 1,000 reads * ($0.80 - $0.08) per 1M = $0.00072.
        ("claude-3-5-haiku", 1_000, 720_000),
        ("llama3.1:8b", 50_000, 0),
        ("mystery-model", 50_000, 0),
        ("claude-sonnet-4-5", 0, 0),
    ],
)
def test_savings_are_cache_reads_times_input_minus_cache_read_rate(
    shipped: PricingTable, model: str, cache_read_tokens: int, saved_nanos: int
) -> None:
    assert shipped.savings_nanos(model, cache_read_tokens) == saved_nanos


# --- hand-made prices, defaults, validation ----------------------------------------------


def test_missing_cache_rates_default_to_anthropic_multipliers_of_input() -> None:
    table = PricingTable(
        [Price(model="house-model", provider="acme", tier="big", input=2, output=8)]
    )
    # $2 in + 600k 5m writes at $2.50 + 400k 1h writes at $4 + 1M reads at $0.20 = $5.30.
    cost = table.cost_nanos(
        "house-model",
        input_tokens=1_000_000,
        output_tokens=0,
        cache_creation_tokens=1_000_000,
        cache_read_tokens=1_000_000,
        cache_creation_1h_tokens=400_000,
    )
    assert cost == 5_300_000_000


def test_missing_long_context_rates_default_from_the_long_input_rate() -> None:
    price = Price(
        model="house-model",
        provider="acme",
        tier="big",
        input=2,
        output=8,
        long_context_threshold=1_000,
        long_input=4,
    )
    table = PricingTable([price])
    # Long: 1,000 in at $4, 1,000 out at $8 (no long output rate), 1,000 5m writes at $5,
    # 1,000 1h writes at $8, 1,000 reads at $0.40 (per 1M): $0.0254.
    cost = table.cost_nanos("house-model", 1_000, 1_000, 2_000, 1_000, 1_000)
    assert cost == 25_400_000


def test_cost_rounds_half_up_to_the_nano_dollar() -> None:
    # $0.0005 per 1M tokens is half a nano-dollar per token; $0.0004 is 0.4 of one.
    table = PricingTable(
        [Price(model="tiny", provider="acme", tier="other", input=0.0005, output=0.0004)]
    )
    assert table.cost_nanos("tiny", 1, 0) == 1
    assert table.cost_nanos("tiny", 3, 0) == 2
    assert table.cost_nanos("tiny", 0, 1) == 0
    assert table.cost_nanos("tiny", 0, 2) == 1


@pytest.mark.parametrize(
    "field",
    [
        "input",
        "output",
        "cache_write_5m",
        "cache_write_1h",
        "cache_read",
        "long_input",
        "long_output",
        "long_cache_write_5m",
        "long_cache_write_1h",
        "long_cache_read",
    ],
)
@pytest.mark.parametrize("value", [-1.0, -0.0001, math.inf, -math.inf, math.nan])
def test_negative_or_non_finite_price_is_rejected(field: str, value: float) -> None:
    rates = {"input": 1.0, "output": 2.0, field: value}
    with pytest.raises(ValueError, match=f"`{field}`"):
        msgspec.structs.replace(
            Price(model="bad", provider="acme", tier="other", input=1.0, output=2.0), **rates
        )


def test_zero_price_is_accepted() -> None:
    price = Price(model="free", provider="acme", tier="other", input=0, output=0, cache_read=0)
    assert PricingTable([price]).cost_nanos("free", 1_000, 1_000, 1_000, 1_000) == 0


def test_set_replaces_a_row_at_once_for_ids_matched_before(shipped: PricingTable) -> None:
    table = PricingTable(shipped.prices())
    assert table.cost_nanos("claude-opus-4-1-20250805", 5_000, 2_000) == 225_000_000
    table.set(
        Price(model="claude-opus-4-1", provider="anthropic", tier="opus", input=10, output=50)
    )
    # $0.05 + $0.10 at the new rates; the dated id was matched (and cached) before the change.
    assert table.cost_nanos("claude-opus-4-1-20250805", 5_000, 2_000) == 150_000_000
    # The shipped table it was copied from is untouched.
    assert shipped.cost_nanos("claude-opus-4-1-20250805", 5_000, 2_000) == 225_000_000


def test_set_prices_a_model_that_was_unpriced_a_moment_ago(shipped: PricingTable) -> None:
    table = PricingTable(shipped.prices())
    assert table.cost_nanos("claude-opus-9-20300101", 1_000_000, 0) is None
    table.set(Price(model="claude-opus-9", provider="anthropic", tier="opus", input=7, output=35))
    assert table.cost_nanos("claude-opus-9-20300101", 1_000_000, 0) == 7_000_000_000
    assert table.classify("claude-opus-9-20300101") == ("anthropic", "opus", True)


def test_remove_unprices_a_model_at_once(shipped: PricingTable) -> None:
    table = PricingTable(shipped.prices())
    assert table.cost_nanos("gpt-4o-2024-08-06", 1_000, 0) == 2_500_000
    assert table.remove("gpt-4o") is True
    # Not priced as gpt-4o-mini or anything else: an unknown id is never guessed at.
    assert table.cost_nanos("gpt-4o-2024-08-06", 1_000, 0) is None
    assert table.cost_nanos("gpt-4o", 1_000, 0) is None
    assert table.classify("gpt-4o") == ("openai", "other", False)
    assert table.remove("gpt-4o") is False
    assert len(table) == len(shipped) - 1


# --- OpenAI adapter ----------------------------------------------------------------------


def test_openai_cached_tokens_are_taken_out_of_prompt_tokens(shipped: PricingTable) -> None:
    call = from_openai_usage(
        "gpt-4o", prompt_tokens=10_000, completion_tokens=3_000, cached_tokens=4_000
    )
    assert (call.input_tokens, call.cache_read_tokens, call.output_tokens) == (6_000, 4_000, 3_000)
    assert call.provider == "openai"
    cost = shipped.cost_nanos(
        call.model,
        call.input_tokens,
        call.output_tokens,
        call.cache_creation_tokens,
        call.cache_read_tokens,
        call.cache_creation_1h_tokens,
    )
    # 6,000 * $2.50 + 4,000 * $1.25 + 3,000 * $10 per 1M = $0.015 + $0.005 + $0.03.
    assert cost == 50_000_000


def test_openai_usage_without_cache_keeps_every_prompt_token_as_input() -> None:
    call = from_openai_usage("gpt-4o-mini", prompt_tokens=1_200, completion_tokens=80)
    assert (call.input_tokens, call.cache_read_tokens, call.output_tokens) == (1_200, 0, 80)


@pytest.mark.parametrize("cached_tokens", [10_001, -1])
def test_openai_cached_tokens_outside_prompt_tokens_are_rejected(cached_tokens: int) -> None:
    with pytest.raises(ValueError, match="cached_tokens"):
        from_openai_usage(
            "gpt-4o", prompt_tokens=10_000, completion_tokens=10, cached_tokens=cached_tokens
        )


# --- property ----------------------------------------------------------------------------


@st.composite
def sonnet_calls(draw: st.DrawFn) -> dict[str, int]:
    cache_creation = draw(st.integers(0, 400_000))
    return {
        "input_tokens": draw(st.integers(0, 400_000)),
        "output_tokens": draw(st.integers(0, 200_000)),
        "cache_creation_tokens": cache_creation,
        "cache_read_tokens": draw(st.integers(0, 400_000)),
        "cache_creation_1h_tokens": draw(st.integers(0, cache_creation)),
    }


@settings(max_examples=300, deadline=None)
@given(tokens=sonnet_calls())
def test_sonnet_4_5_cost_is_the_exact_formula_rounded_half_up(
    shipped: PricingTable, tokens: dict[str, int]
) -> None:
    prompt = tokens["input_tokens"] + tokens["cache_creation_tokens"] + tokens["cache_read_tokens"]
    rates = SONNET_LONG_RATES if prompt > 200_000 else SONNET_RATES
    assert shipped.cost_nanos("claude-sonnet-4-5", **tokens) == expected_nanos(rates, **tokens)
