"""The synthetic load: every event valid, a realistic mix, and the pacing schedule."""

from __future__ import annotations

import itertools
import json
import random
import time
from collections import Counter
from pathlib import Path

import httpx
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from exporter.events import event_from_dict, timestamp_ms
from exporter.pricing import tier_by_name
from exporter.simulate import (
    ERROR_SHARE,
    MODELS,
    SimulationStats,
    auto_batch,
    local_url,
    plan_batches,
    run_simulation,
    synthetic_events,
)
from exporter.store.db import connect, load_pricing, migrate

NOW_MS = 1_790_000_000_000


@settings(max_examples=60, deadline=None)
@given(
    seed=st.integers(min_value=0, max_value=2**64),
    now_ms=st.integers(min_value=0, max_value=int(time.time() * 1000)),
    count=st.integers(min_value=0, max_value=300),
)
def test_every_generated_event_is_valid(seed: int, now_ms: int, count: int) -> None:
    events = synthetic_events(random.Random(seed), now_ms, count)
    assert len(events) == count
    for item in events:
        event = event_from_dict(item)
        assert now_ms - 1000 < timestamp_ms(event) <= now_ms
        # What the CLI posts is JSON: the dict must survive the trip unchanged.
        assert json.loads(json.dumps(item)) == item


def test_the_same_seed_gives_the_same_events() -> None:
    first = synthetic_events(random.Random(7), NOW_MS, 200)
    assert synthetic_events(random.Random(7), NOW_MS, 200) == first
    assert synthetic_events(random.Random(8), NOW_MS, 200) != first


def test_the_mix_looks_like_a_coding_agent_workload() -> None:
    events = synthetic_events(random.Random(1), NOW_MS, 20_000)
    types = Counter(e.get("type", "api_call") for e in events)
    assert set(types) == {
        "api_call",
        "cache_hit",
        "cache_miss",
        "model_override",
        "error",
        "system",
    }
    assert 0.93 < types["api_call"] / len(events) < 0.97

    calls = [e for e in events if e["type"] == "api_call"]
    tiers = Counter(tier_by_name(c["model"]) for c in calls)
    assert tiers.most_common(1)[0][0] == "sonnet"
    assert {"opus", "haiku"} <= set(tiers)
    providers = Counter(c["provider"] for c in calls)
    assert set(providers) == {"anthropic", "openai", "ollama"}

    failed = [c for c in calls if c.get("status") == "error"]
    assert ERROR_SHARE * 0.7 < len(failed) / len(calls) < ERROR_SHARE * 1.3
    assert {c["error_type"] for c in failed} >= {"rate_limit", "overloaded", "timeout"}

    ok = [c for c in calls if c.get("status") != "error"]
    anthropic = [c for c in ok if c["provider"] == "anthropic"]
    assert sum("cache_read_tokens" in c for c in anthropic) / len(anthropic) > 0.6
    assert any(c.get("cache_creation_1h_tokens") for c in anthropic)
    assert not any("cache_creation_tokens" in c for c in ok if c["provider"] != "anthropic")
    inputs = sorted(c["input_tokens"] for c in ok)
    # Heavy-tailed: the largest prompts are many times the median one.
    assert inputs[len(inputs) // 2] < 5_000 < inputs[-1]
    assert all(c["latency_ms"] > 0 for c in ok)

    assert len({e["project"] for e in events}) >= 5
    assert len({e.get("agent") for e in events}) >= 5
    assert len({e["request_id"] for e in calls}) == len(calls)


def test_sessions_repeat_within_a_ten_minute_slot() -> None:
    first = synthetic_events(random.Random(1), NOW_MS, 500)
    later = synthetic_events(random.Random(2), NOW_MS + 60_000, 500)
    sessions = {e["session_id"] for e in first}
    assert len(sessions) <= 6 * 3
    assert sessions & {e["session_id"] for e in later}


async def test_every_simulated_model_is_in_the_shipped_price_table(tmp_path: Path) -> None:
    conn = await connect(tmp_path / "m.db")
    try:
        await migrate(conn)
        table = await load_pricing(conn)
    finally:
        await conn.close()
    for model in MODELS:
        price = table.match(model.id)
        assert price is not None, model.id
        assert price.provider == model.provider


def test_batches_are_due_when_their_first_event_is() -> None:
    plan = list(plan_batches(rate=100, duration=2, batch=30))
    assert [size for _, size in plan] == [30] * 6 + [20]
    assert [due for due, _ in plan] == [0.0, 0.3, 0.6, 0.9, 1.2, 1.5, 1.8]


def test_a_slow_rate_sends_single_events_seconds_apart() -> None:
    assert list(plan_batches(rate=0.5, duration=10, batch=1)) == [
        (0.0, 1),
        (2.0, 1),
        (4.0, 1),
        (6.0, 1),
        (8.0, 1),
    ]


def test_a_zero_duration_runs_until_stopped() -> None:
    plan = list(itertools.islice(plan_batches(rate=1000, duration=0, batch=100), 1000))
    assert len(plan) == 1000
    assert plan[-1] == (99.9, 100)


@pytest.mark.parametrize(
    ("rate", "duration", "batch"), [(0, 1, 1), (-1, 1, 1), (1, -1, 1), (1, 1, 0)]
)
def test_a_nonsense_plan_is_refused(rate: float, duration: float, batch: int) -> None:
    with pytest.raises(ValueError, match="rate"):
        next(plan_batches(rate, duration, batch))


@pytest.mark.parametrize(
    ("rate", "batch"), [(0.5, 1), (10, 1), (100, 10), (2_500, 250), (1e6, 1000)]
)
def test_the_automatic_batch_makes_about_ten_requests_a_second(rate: float, batch: int) -> None:
    assert auto_batch(rate) == batch


@pytest.mark.parametrize(
    ("host", "url"),
    [
        ("127.0.0.1", "http://127.0.0.1:9469"),
        ("0.0.0.0", "http://127.0.0.1:9469"),
        ("::", "http://[::1]:9469"),
        ("::1", "http://[::1]:9469"),
        ("localhost", "http://localhost:9469"),
    ],
)
def test_the_local_url_reaches_a_server_bound_anywhere(host: str, url: str) -> None:
    assert local_url(host, 9469) == url


class FakeTime:
    """Monotonic time that only moves when the simulation sleeps or a request takes time."""

    def __init__(self) -> None:
        self.now = 100.0
        self.sleeps: list[float] = []

    def monotonic(self) -> float:
        return self.now

    def sleep(self, seconds: float) -> None:
        self.sleeps.append(round(seconds, 6))
        self.now += seconds


def test_the_run_follows_the_plan_and_counts_rejected_batches() -> None:
    # The transport stands in for the server only to observe the requests and to answer one
    # of them with 422; end-to-end runs against the real server live in tests/e2e.
    fake = FakeTime()
    bodies: list[list[dict[str, object]]] = []

    def answer(request: httpx.Request) -> httpx.Response:
        fake.now += 0.05  # each request takes 50 ms
        batch = json.loads(request.content)
        bodies.append(batch)
        assert request.headers["authorization"] == "Bearer t0ken"
        assert request.url.path == "/api/events"
        status = 422 if len(bodies) == 2 else 202
        return httpx.Response(status, json={"accepted": len(batch)})

    stats = SimulationStats()
    with httpx.Client(transport=httpx.MockTransport(answer)) as client:
        run_simulation(
            client,
            "http://127.0.0.1:9469",
            rate=20,
            duration=1,
            batch=5,
            rng=random.Random(3),
            stats=stats,
            token="t0ken",
            monotonic=fake.monotonic,
            sleep=fake.sleep,
            wall_ms=lambda: NOW_MS,
        )
    assert [len(b) for b in bodies] == [5, 5, 5, 5]
    # Batches are due at 0, 0.25, 0.5, 0.75 s; each request used 50 ms of the wait.
    assert fake.sleeps == [0.2, 0.2, 0.2]
    assert (stats.sent, stats.rejected, stats.requests) == (15, 5, 4)
    assert stats.statuses == {202: 3, 422: 1}
    assert stats.elapsed_s == pytest.approx(0.8)
    assert stats.rate == pytest.approx(15 / 0.8)
    assert "HTTP 422" in (stats.last_error or "")
    assert stats.summary().startswith("sent 15 events in 4 requests over 0.8 s (18.8/s)")
