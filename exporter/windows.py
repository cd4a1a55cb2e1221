"""Rings of time buckets with incremental window sums: 600 one-second buckets for 1m / 5m / 10m.

Each bucket holds one row of sums per key and a latency sketch. The aggregator keeps two rings:
one-second buckets keyed by tier (the windows themselves), and ten one-minute buckets keyed by
label set (breakdowns of a window by any label, at minute resolution). Keying the one-second ring
by label set would cost a row per active label set per second: ~200 MB at 1,000 label sets.

A window's sums cover its closed slots and are kept incrementally: when a slot closes its bucket
is added to every window, and the bucket that falls out of a window is subtracted from it.
Reading a window adds the open slot's bucket, so a read costs O(keys + sketch buckets), whatever
the event rate, and a record touches only the open bucket.
"""

from __future__ import annotations

import operator
from collections.abc import Hashable
from typing import Final, Generic, TypeVar

from exporter.sketch import LatencySketch

K = TypeVar("K", bound=Hashable)

__all__ = [
    "CACHE_CREATION",
    "CACHE_READ",
    "CALLS",
    "COST",
    "ERRORS",
    "LATENCY_COUNT",
    "LATENCY_SUM",
    "RING_SECONDS",
    "ROW_FIELDS",
    "SAVINGS",
    "TOKENS_IN",
    "TOKENS_OUT",
    "WINDOWS",
    "WindowRing",
    "add_row",
    "empty_row",
]

# Layout of a row of sums (a plain list of ints: cheap to add to on the hot path).
CALLS, ERRORS, TOKENS_IN, TOKENS_OUT, CACHE_READ, CACHE_CREATION = 0, 1, 2, 3, 4, 5
COST, SAVINGS, LATENCY_SUM, LATENCY_COUNT = 6, 7, 8, 9  # nano-USD, nano-USD, µs, n
ROW_FIELDS: Final = 10

RING_SECONDS: Final = 600
#: Window name -> length in seconds.
WINDOWS: Final = {"1m": 60, "5m": 300, "10m": 600}


def empty_row() -> list[int]:
    return [0] * ROW_FIELDS


def add_row(into: list[int], row: list[int], sign: int = 1) -> None:
    """into += sign * row, field by field (map over C-level add: several times a Python loop)."""
    into[:] = map(operator.add if sign > 0 else operator.sub, into, row)


class _Bucket(Generic[K]):
    __slots__ = ("rows", "second", "sketch")

    def __init__(self) -> None:
        self.second = -1
        self.rows: dict[K, list[int]] = {}
        self.sketch = LatencySketch()

    def reset(self, second: int) -> None:
        self.second = second
        self.rows = {}
        self.sketch.clear()


class WindowRing(Generic[K]):
    """The ring; `current` is the open slot (epoch seconds // slot width). Time only moves
    forward. `spans` are the windows' lengths in slots, the open slot included."""

    def __init__(
        self, now_slot: int, slots: int = RING_SECONDS, spans: tuple[int, ...] = (60, 300, 600)
    ) -> None:
        self._slots = slots
        self._spans = spans
        self._buckets: list[_Bucket[K]] = [_Bucket() for _ in range(slots)]
        self._closed: list[dict[K, list[int]]] = [{} for _ in spans]
        self._closed_sketches = [LatencySketch() for _ in spans]
        self.current = now_slot
        self.open = self._buckets[now_slot % slots]
        self.open.reset(now_slot)

    def advance(self, now_s: int) -> None:
        """Close every slot up to `now_s` (a slot number), moving each window forward."""
        if now_s <= self.current:
            return
        if now_s - self.current >= self._slots:
            for bucket in self._buckets:
                bucket.reset(-1)
            for closed, sketch in zip(self._closed, self._closed_sketches, strict=True):
                closed.clear()
                sketch.clear()
        else:
            for second in range(self.current, now_s):
                self._close(second)
        self.current = now_s
        self.open = self._buckets[now_s % self._slots]
        self.open.reset(now_s)

    def add(self, second: int, key: K, row: list[int], sketch_key: int | None, sign: int) -> bool:
        """Add (or, with sign -1, take back) one event's row at `second`.

        Seconds after the open one are clamped to it (clients' clocks run a little ahead);
        seconds that have left the ring are not windowed. Returns whether the event was placed.
        """
        current = self.current
        if second > current:
            second = current
        elif second <= current - self._slots:
            return False
        bucket = self._buckets[second % self._slots]
        if bucket.second != second:
            bucket.reset(second)
        _add_to(bucket.rows, key, row, sign)
        if sketch_key is not None:
            bucket.sketch.add_key(sketch_key, sign)
        if second < current:
            for index, span in enumerate(self._spans):
                if second > current - span:
                    _add_to(self._closed[index], key, row, sign)
                    if sketch_key is not None:
                        self._closed_sketches[index].add_key(sketch_key, sign)
        return True

    def window(self, span: int) -> tuple[dict[K, list[int]], LatencySketch]:
        """Rows per key and the latency sketch of the last `span` slots (a copy)."""
        index = self._spans.index(span)
        rows = {key: list(row) for key, row in self._closed[index].items()}
        for key, row in self.open.rows.items():
            _add_to(rows, key, row, 1)
        sketch = self._closed_sketches[index].copy()
        sketch.merge(self.open.sketch)
        return {key: row for key, row in rows.items() if any(row)}, sketch

    def _close(self, second: int) -> None:
        closing = self._buckets[second % self._slots]
        if closing.second == second:
            for index in range(len(self._spans)):
                for key, row in closing.rows.items():
                    _add_to(self._closed[index], key, row, 1)
                self._closed_sketches[index].merge(closing.sketch)
        following = second + 1
        for index, span in enumerate(self._spans):
            leaving = self._buckets[(following - span) % self._slots]
            if leaving.second == following - span:
                for key, row in leaving.rows.items():
                    _add_to(self._closed[index], key, row, -1)
                self._closed_sketches[index].merge(leaving.sketch, -1)


def _add_to(rows: dict[K, list[int]], key: K, row: list[int], sign: int) -> None:
    into = rows.get(key)
    if into is None:
        into = rows[key] = [0] * ROW_FIELDS
    add_row(into, row, sign)
