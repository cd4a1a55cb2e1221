"""Aggregator: windows, totals and percentiles against a plain recomputation."""

from __future__ import annotations

import math
from dataclasses import dataclass

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from exporter.aggregator import HIST_OFFSET, Aggregator
from exporter.events import ApiCall, CacheHit, CacheMiss, ErrorEvent, ModelOverride, SystemEvent
from exporter.pricing import PricingTable
from exporter.windows import CALLS, COST, ERRORS, LATENCY_COUNT, SAVINGS, TOKENS_IN, TOKENS_OUT
from tests.conftest import FakeClock

MODELS = ["claude-opus-4-1", "claude-sonnet-4-5", "claude-haiku-4-5", "gpt-4o", "unknown-model"]


@dataclass
class Sent:
    ts_ms: int
    tier: str
    tokens_in: int
    tokens_out: int
    cost: int
    latency_ms: float | None
    error: bool


call_fields = (
    st.sampled_from(MODELS),
    st.integers(0, 50_000),
    st.integers(0, 8_000),
    st.one_of(st.none(), st.floats(min_value=0.5, max_value=120_000)),
    st.booleans(),
)
event_strategy = st.tuples(st.integers(0, 700), *call_fields)  # age in seconds when recorded
steps_strategy = st.lists(
    st.tuples(st.integers(0, 200), st.lists(event_strategy, max_size=30)), min_size=1, max_size=12
)


# Mostly calls stamped a few seconds before now (the ring's open slots; a few ahead of it, as a
# client clock can be), at a minute's edge, or anywhere in the ring; the clock moves a few
# seconds at a time. The last field takes the call back (a stored request id) at once.
recent_event_strategy = st.tuples(
    st.one_of(st.integers(-3, 8), st.integers(55, 66), st.integers(0, 700)),
    *call_fields,
    st.sampled_from([False] * 7 + [True]),
)
recent_steps_strategy = st.lists(
    st.tuples(st.integers(0, 7), st.lists(recent_event_strategy, max_size=30)),
    min_size=1,
    max_size=25,
)


def exact_quantile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[max(0, math.ceil(q * len(ordered)) - 1)]  # nearest rank


@settings(
    max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(steps=steps_strategy)
def test_windows_equal_a_plain_recomputation(pricing: PricingTable, steps: list) -> None:  # type: ignore[type-arg]
    check_windows(pricing, steps, every_step=False)


@settings(
    max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(steps=recent_steps_strategy)
def test_windows_of_calls_stamped_just_before_now_equal_a_recomputation(
    pricing: PricingTable,
    steps: list,  # type: ignore[type-arg]
) -> None:
    """Calls a few seconds old land in the ring's open slots (added in place) and must leave
    every window exactly when a plain recomputation says, checked after every step."""
    check_windows(pricing, steps, every_step=True)


def check_windows(pricing: PricingTable, steps: list, *, every_step: bool) -> None:  # type: ignore[type-arg]
    clock = FakeClock()
    aggregator = Aggregator(pricing, clock=clock)
    sent: list[Sent] = []
    for advance, events in steps:
        clock.advance(advance)
        for age, model, tokens_in, tokens_out, latency, error, *taken_back in events:
            ts = int((clock.now - age) * 1000)
            call = ApiCall(
                model=model,
                input_tokens=tokens_in,
                output_tokens=tokens_out,
                latency_ms=latency,
                status="error" if error else "ok",
            )
            row = aggregator.record_call(call, ts)
            assert call.tier is not None
            if taken_back and taken_back[0]:
                aggregator.retract_call(row)
                continue
            # A call stamped ahead of now counts in the current second (and minute).
            ts = min(ts, int(clock.now) * 1000)
            sent.append(Sent(ts, call.tier, tokens_in, tokens_out, row[9], latency, error))
        if every_step:
            compare(aggregator, sent, int(clock.now))
    compare(aggregator, sent, int(clock.now))


def compare(aggregator: Aggregator, sent: list[Sent], now_s: int) -> None:
    for name, span, minutes in (("1m", 60, 1), ("5m", 300, 5), ("10m", 600, 10)):
        inside = [s for s in sent if s.ts_ms // 1000 > now_s - span]
        snap = aggregator.window(name)
        # The per-label-set breakdown is at minute resolution: the open minute and those before.
        in_minutes = [s for s in sent if s.ts_ms // 60_000 > now_s // 60 - minutes]
        by_tier = aggregator.group(snap.by_series, "tier")
        assert {t: row[CALLS] for t, row in by_tier.items()} == {
            t: sum(1 for s in in_minutes if s.tier == t) for t in {s.tier for s in in_minutes}
        }
        assert sum(row[COST] for row in by_tier.values()) == sum(s.cost for s in in_minutes)
        assert snap.total[CALLS] == len(inside)
        assert snap.total[ERRORS] == sum(s.error for s in inside)
        assert snap.total[TOKENS_IN] == sum(s.tokens_in for s in inside)
        assert snap.total[TOKENS_OUT] == sum(s.tokens_out for s in inside)
        assert snap.total[COST] == sum(s.cost for s in inside)
        for tier in {s.tier for s in inside}:
            assert snap.by_tier[tier][CALLS] == sum(1 for s in inside if s.tier == tier)
        latencies = [round(s.latency_ms * 1000) / 1000 for s in inside if s.latency_ms is not None]
        assert snap.total[LATENCY_COUNT] == len(latencies)
        for q, estimate in ((0.5, snap.p50_ms), (0.95, snap.p95_ms), (0.99, snap.p99_ms)):
            if not latencies:
                assert estimate is None
                continue
            exact = exact_quantile(latencies, q)
            assert estimate is not None
            assert abs(estimate - exact) <= 0.02 * exact

    total = aggregator.grand_total()
    assert total[CALLS] == len(sent)
    assert total[COST] == sum(s.cost for s in sent)
    by_tier = aggregator.breakdown("tier")
    for tier in {s.tier for s in sent}:
        assert by_tier[tier][CALLS] == sum(1 for s in sent if s.tier == tier)
        assert by_tier[tier][TOKENS_IN] == sum(s.tokens_in for s in sent if s.tier == tier)
        timed = [s for s in sent if s.tier == tier and s.latency_ms is not None]
        assert by_tier[tier][LATENCY_COUNT] == len(timed)
        assert sum(by_tier[tier][HIST_OFFSET:]) == len(timed)


def test_events_leave_each_window_as_the_clock_moves(
    pricing: PricingTable, clock: FakeClock
) -> None:
    aggregator = Aggregator(pricing, clock=clock)
    aggregator.record_call(ApiCall(model="claude-sonnet-4-5", input_tokens=10), clock.ms)
    assert [aggregator.window(w).calls for w in ("1m", "5m", "10m")] == [1, 1, 1]
    clock.advance(59)
    assert aggregator.window("1m").calls == 1
    clock.advance(1)
    assert [aggregator.window(w).calls for w in ("1m", "5m", "10m")] == [0, 1, 1]
    clock.advance(240)
    assert [aggregator.window(w).calls for w in ("1m", "5m", "10m")] == [0, 0, 1]
    clock.advance(300)
    assert [aggregator.window(w).calls for w in ("1m", "5m", "10m")] == [0, 0, 0]
    # Cumulative totals are not windowed.
    assert aggregator.grand_total()[CALLS] == 1


def test_a_long_silence_clears_every_window(pricing: PricingTable, clock: FakeClock) -> None:
    aggregator = Aggregator(pricing, clock=clock)
    for _ in range(5):
        aggregator.record_call(ApiCall(model="gpt-4o", latency_ms=100.0), clock.ms)
    clock.advance(3600)
    snap = aggregator.window("10m")
    assert snap.calls == 0
    assert snap.p50_ms is None
    aggregator.record_call(ApiCall(model="gpt-4o", latency_ms=50.0), clock.ms)
    assert aggregator.window("1m").calls == 1


def test_future_timestamps_count_in_the_current_second_and_old_ones_only_in_totals(
    pricing: PricingTable, clock: FakeClock
) -> None:
    aggregator = Aggregator(pricing, clock=clock)
    aggregator.record_call(ApiCall(model="gpt-4o"), clock.ms + 120_000)
    aggregator.record_call(ApiCall(model="gpt-4o"), clock.ms - 3_600_000)
    assert aggregator.window("1m").calls == 1
    clock.advance(61)
    assert aggregator.window("1m").calls == 0
    assert aggregator.grand_total()[CALLS] == 2


def test_record_fills_in_provider_tier_and_cost(pricing: PricingTable, clock: FakeClock) -> None:
    aggregator = Aggregator(pricing, clock=clock)
    call = ApiCall(model="claude-opus-4-1-20250805", input_tokens=5000, output_tokens=2000)
    row = aggregator.record_call(call, clock.ms)
    assert (call.provider, call.tier) == ("anthropic", "opus")
    assert call.cost_usd == pytest.approx(0.225)
    assert row[9] == 225_000_000
    given = ApiCall(model="claude-opus-4-1", cost_usd=1.5, provider="acme", tier="gold")
    row = aggregator.record_call(given, clock.ms)
    assert row[9] == 1_500_000_000
    assert (given.provider, given.tier) == ("acme", "gold")


def test_unpriced_models_cost_nothing_and_are_counted(
    pricing: PricingTable, clock: FakeClock
) -> None:
    aggregator = Aggregator(pricing, clock=clock)
    call = ApiCall(model="claude-opus-9-preview", input_tokens=1000)
    row = aggregator.record_call(call, clock.ms)
    assert row[9] == 0
    assert aggregator.unpriced == 1
    assert (call.provider, call.tier) == ("anthropic", "opus")


def test_breakdowns_group_cumulative_totals_by_each_label(
    pricing: PricingTable, clock: FakeClock
) -> None:
    aggregator = Aggregator(pricing, clock=clock)
    for project, agent, model in [
        ("web", "planner", "claude-opus-4-1"),
        ("web", "coder", "claude-sonnet-4-5"),
        ("api", "coder", "claude-sonnet-4-5"),
        ("api", None, "gpt-4o"),
    ]:
        call = ApiCall(model=model, project=project, agent=agent, input_tokens=1_000_000)
        aggregator.record_call(call, clock.ms)
    by_project = aggregator.breakdown("project")
    assert {k: v[CALLS] for k, v in by_project.items()} == {"web": 2, "api": 2}
    assert by_project["web"][COST] == 18_000_000_000  # $15 + $3
    assert {k: v[CALLS] for k, v in aggregator.breakdown("agent").items()} == {
        "planner": 1,
        "coder": 2,
        "": 1,
    }
    assert set(aggregator.breakdown("tier")) == {"opus", "sonnet", "gpt"}
    assert set(aggregator.breakdown("provider")) == {"anthropic", "openai"}
    assert aggregator.breakdown("model")["claude-sonnet-4-5"][CALLS] == 2


def test_latency_histogram_counts_each_call_in_its_bucket(
    pricing: PricingTable, clock: FakeClock
) -> None:
    aggregator = Aggregator(pricing, clock=clock)
    for latency in (5.0, 10.0, 10.001, 100_000.0):  # ms; bounds are 10 ms, 20 ms, ... 81.92 s
        aggregator.record_call(ApiCall(model="gpt-4o", latency_ms=latency), clock.ms)
    hist = aggregator.grand_total()[HIST_OFFSET:]
    assert hist[0] == 2  # 5 ms and exactly 10 ms (le is inclusive)
    assert hist[1] == 1
    assert hist[-1] == 1  # above the last bound: +Inf only
    assert sum(hist) == 4


def test_rates_per_minute_come_from_the_last_minute(
    pricing: PricingTable, clock: FakeClock
) -> None:
    aggregator = Aggregator(pricing, clock=clock)
    for _ in range(30):
        aggregator.record_call(ApiCall(model="claude-sonnet-4-5", input_tokens=1_000_000), clock.ms)
    snap = aggregator.window("1m")
    assert snap.calls_per_minute == 30
    assert snap.cost_per_minute_usd == pytest.approx(90.0)
    assert aggregator.window("5m").calls_per_minute == 6


def test_non_call_events_are_counted(pricing: PricingTable, clock: FakeClock) -> None:
    aggregator = Aggregator(pricing, clock=clock)
    events = [
        CacheHit(model="claude-sonnet-4-5", savings_usd=0.25),
        CacheHit(savings_usd=0.5),
        CacheMiss(),
        ModelOverride(original_model="claude-opus-4-1", override_model="claude-sonnet-4-5"),
        ErrorEvent(error_type="rate_limit", message="429"),
        SystemEvent(message="started"),
    ]
    for event in events:
        aggregator.record_other(event, clock.ms)
    counters = aggregator.counters
    assert counters[("cache_events", ("hit",))] == 2
    assert counters[("cache_events", ("miss",))] == 1
    assert counters[("cache_hit_savings_nanos", ())] == 750_000_000
    assert (
        counters[("model_overrides", ("claude-opus-4-1", "claude-sonnet-4-5", "unspecified"))] == 1
    )
    assert counters[("errors", ("rate_limit",))] == 1
    assert counters[("system_events", ())] == 1
    assert aggregator.breakdown("model")["claude-sonnet-4-5"][SAVINGS] == 250_000_000
    assert len(aggregator.recent) == 6
    aggregator.retract_other(events[0])
    assert counters[("cache_events", ("hit",))] == 1
    assert aggregator.breakdown("model")["claude-sonnet-4-5"][SAVINGS] == 0


def test_retracting_a_call_undoes_it_everywhere(pricing: PricingTable, clock: FakeClock) -> None:
    aggregator = Aggregator(pricing, clock=clock)
    keep = aggregator.record_call(ApiCall(model="gpt-4o", input_tokens=7, latency_ms=10), clock.ms)
    clock.advance(3)
    row = aggregator.record_call(ApiCall(model="gpt-4o", input_tokens=9, latency_ms=900), clock.ms)
    clock.advance(2)
    aggregator.retract_call(row)
    snap = aggregator.window("1m")
    assert snap.calls == 1
    assert snap.total[TOKENS_IN] == 7
    assert snap.p99_ms is not None
    assert snap.p99_ms < 11
    assert aggregator.grand_total()[CALLS] == 1
    assert aggregator.grand_total()[HIST_OFFSET:] == [1] + [0] * 14
    assert aggregator.duplicates == 1
    assert keep[9] > 0


def test_recent_events_are_bounded(pricing: PricingTable, clock: FakeClock) -> None:
    aggregator = Aggregator(pricing, clock=clock, recent_size=10)
    for i in range(25):
        aggregator.record_call(ApiCall(model="gpt-4o", input_tokens=i), clock.ms)
    assert len(aggregator.recent) == 10
    newest = aggregator.recent[-1]
    assert isinstance(newest, ApiCall)
    assert newest.input_tokens == 24
