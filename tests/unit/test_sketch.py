from __future__ import annotations

import math

from hypothesis import given
from hypothesis import strategies as st

from exporter.sketch import RELATIVE_ACCURACY, LatencySketch


def exact_quantile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[max(0, math.ceil(q * len(ordered)) - 1)]  # nearest rank


@given(st.lists(st.floats(min_value=0.01, max_value=1e7), min_size=1, max_size=500))
def test_quantiles_are_within_the_relative_accuracy(values: list[float]) -> None:
    sketch = LatencySketch()
    for value in values:
        sketch.add(value)
    for q in (0.0, 0.5, 0.95, 0.99, 1.0):
        estimate = sketch.quantile(q)
        exact = exact_quantile(values, q)
        assert estimate is not None
        assert abs(estimate - exact) <= RELATIVE_ACCURACY * exact * 1.0001


@given(
    st.lists(st.floats(min_value=0.01, max_value=1e5), min_size=1, max_size=100),
    st.lists(st.floats(min_value=0.01, max_value=1e5), min_size=1, max_size=100),
)
def test_subtracting_a_merged_sketch_restores_the_original(a: list[float], b: list[float]) -> None:
    first, second = LatencySketch(), LatencySketch()
    for value in a:
        first.add(value)
    for value in b:
        second.add(value)
    before = dict(first.counts)
    first.merge(second)
    assert first.count == len(a) + len(b)
    first.merge(second, -1)
    assert first.counts == before
    assert first.count == len(a)


def test_zero_latency_counts_in_the_zero_bucket_and_empty_sketch_has_no_quantile() -> None:
    sketch = LatencySketch()
    assert sketch.quantile(0.5) is None
    assert sketch.quantiles(0.5, 0.9) == [None, None]
    sketch.add(0.0)
    sketch.add(0.0)
    sketch.add(100.0)
    assert sketch.quantile(0.5) == 0.0
    high = sketch.quantile(1.0)
    assert high is not None
    assert abs(high - 100.0) <= 1.0


def test_memory_is_bounded_by_the_value_range_not_the_count() -> None:
    sketch = LatencySketch()
    for i in range(100_000):
        sketch.add(1 + (i % 1000))  # 1 ms .. 1 s
    # log(1000)/log(1.0202) ~ 346 buckets at most, whatever the count.
    assert len(sketch.counts) < 400
    assert sketch.count == 100_000
