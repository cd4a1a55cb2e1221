"""Shared fixtures: a movable clock and a small price table for pure aggregator tests."""

from __future__ import annotations

import pytest

from exporter.pricing import Price, PricingTable

T0 = 1_790_000_000.0  # a fixed "now" in the past (2026-09-21), seconds since the epoch


class FakeClock:
    """A clock the test moves by hand; the aggregator reads time only through it."""

    def __init__(self, start: float = T0) -> None:
        self.now = start

    def __call__(self) -> float:
        return self.now

    def advance(self, seconds: float) -> None:
        self.now += seconds

    @property
    def ms(self) -> int:
        return int(self.now * 1000)


@pytest.fixture
def clock() -> FakeClock:
    return FakeClock()


@pytest.fixture
def pricing() -> PricingTable:
    return PricingTable(
        [
            Price(model="claude-opus-4-1", provider="anthropic", tier="opus", input=15, output=75),
            Price(
                model="claude-sonnet-4-5", provider="anthropic", tier="sonnet", input=3, output=15
            ),
            Price(model="claude-haiku-4-5", provider="anthropic", tier="haiku", input=1, output=5),
            Price(
                model="gpt-4o", provider="openai", tier="gpt", input=2.5, output=10, cache_read=1.25
            ),
        ]
    )
