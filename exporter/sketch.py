"""Mergeable latency sketch: quantiles with bounded relative error, memory independent of count.

A value v > 0 falls in log bucket ceil(log(v) / log(gamma)), gamma = (1 + a) / (1 - a); every
value in a bucket is within a relative distance `a` of the bucket's representative value (the
DDSketch construction). Buckets are plain counts, so sketches add and subtract exactly, which is
what lets the ring of one-second buckets keep window sketches incrementally.
"""

from __future__ import annotations

import math
from typing import Final

__all__ = ["RELATIVE_ACCURACY", "LatencySketch", "sketch_key"]

#: Relative error bound of every quantile (1 %, inside the 2 % the spec asks for).
RELATIVE_ACCURACY: Final = 0.01
_GAMMA: Final = (1 + RELATIVE_ACCURACY) / (1 - RELATIVE_ACCURACY)
_INV_LOG_GAMMA: Final = 1.0 / math.log(_GAMMA)
#: Values at or below this (ms) count in the zero bucket: a microsecond is below any real latency.
_MIN_VALUE: Final = 1e-3


def sketch_key(value: float) -> int:
    """The bucket index of a positive value; `LatencySketch.ZERO` for values at or near zero."""
    if value <= _MIN_VALUE:
        return LatencySketch.ZERO
    return math.ceil(math.log(value) * _INV_LOG_GAMMA)


class LatencySketch:
    """Counts per log bucket. `add` and `merge` accept negative weights to subtract."""

    __slots__ = ("count", "counts")

    ZERO: Final = -(2**31)

    def __init__(self) -> None:
        self.counts: dict[int, int] = {}
        self.count = 0

    def add(self, value: float, weight: int = 1) -> None:
        """Count `value` (milliseconds) `weight` times."""
        self.add_key(sketch_key(value), weight)

    def add_key(self, key: int, weight: int = 1) -> None:
        """Count a precomputed bucket index; drops the bucket when its count reaches zero."""
        counts = self.counts
        left = counts.get(key, 0) + weight
        if left:
            counts[key] = left
        else:
            del counts[key]
        self.count += weight

    def merge(self, other: LatencySketch, sign: int = 1) -> None:
        """Add (sign=1) or subtract (sign=-1) another sketch's counts."""
        for key, weight in other.counts.items():
            self.add_key(key, weight * sign)

    def copy(self) -> LatencySketch:
        clone = LatencySketch()
        clone.counts = dict(self.counts)
        clone.count = self.count
        return clone

    def clear(self) -> None:
        self.counts.clear()
        self.count = 0

    def quantile(self, q: float) -> float | None:
        """The nearest-rank q-quantile (the ceil(q * count)-th smallest value) within the relative
        accuracy; None if empty."""
        if self.count <= 0:
            return None
        rank = _rank(q, self.count)
        seen = 0
        for key in sorted(self.counts):
            seen += self.counts[key]
            if seen > rank:
                return _representative(key)
        return _representative(max(self.counts))  # pragma: no cover - counts sum to count

    def quantiles(self, *qs: float) -> list[float | None]:
        """Several quantiles in one pass over the sorted buckets."""
        if self.count <= 0:
            return [None for _ in qs]
        keys = sorted(self.counts)
        out: list[float | None] = []
        for q in qs:
            rank = _rank(q, self.count)
            seen = 0
            for key in keys:
                seen += self.counts[key]
                if seen > rank:
                    out.append(_representative(key))
                    break
        return out


def _rank(q: float, count: int) -> int:
    """0-based rank of the nearest-rank quantile: p99 of three calls is the slowest one."""
    return max(0, math.ceil(q * count) - 1)


def _representative(key: int) -> float:
    if key == LatencySketch.ZERO:
        return 0.0
    # The value that minimises the worst relative error over (gamma^(k-1), gamma^k].
    return 2.0 * _GAMMA**key / (_GAMMA + 1.0)
