"""Ring of 600 one-second buckets with incremental 1m / 5m / 10m window sums.

Each bucket holds one row of sums per label set (the aggregator's series id) and a latency sketch,
so a window can be broken down by any label at read time. A window's sums cover its closed
seconds and are kept incrementally: when a second closes its bucket is added to every window, and
the bucket that falls out of a window is subtracted from it. Reading a window adds the open
second's bucket, so a read costs O(active label sets + sketch buckets), whatever the event rate,
and a record touches only the open bucket.
"""

from __future__ import annotations

import operator
from typing import Final

from exporter.sketch import LatencySketch

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
_SPANS: Final = tuple(WINDOWS.values())


def empty_row() -> list[int]:
    return [0] * ROW_FIELDS


def add_row(into: list[int], row: list[int], sign: int = 1) -> None:
    """into += sign * row, field by field (map over C-level add: several times a Python loop)."""
    into[:] = map(operator.add if sign > 0 else operator.sub, into, row)


class _Bucket:
    __slots__ = ("rows", "second", "sketch")

    def __init__(self) -> None:
        self.second = -1
        self.rows: dict[int, list[int]] = {}
        self.sketch = LatencySketch()

    def reset(self, second: int) -> None:
        self.second = second
        self.rows = {}
        self.sketch.clear()


class WindowRing:
    """The ring; `current` is the open second (epoch seconds). Time only moves forward."""

    def __init__(self, now_s: int) -> None:
        self._buckets = [_Bucket() for _ in range(RING_SECONDS)]
        self._closed: list[dict[int, list[int]]] = [{} for _ in _SPANS]
        self._closed_sketches = [LatencySketch() for _ in _SPANS]
        self.current = now_s
        self.open = self._buckets[now_s % RING_SECONDS]
        self.open.reset(now_s)

    def advance(self, now_s: int) -> None:
        """Close every second up to `now_s`, moving each window forward."""
        if now_s <= self.current:
            return
        if now_s - self.current >= RING_SECONDS:
            for bucket in self._buckets:
                bucket.reset(-1)
            for closed, sketch in zip(self._closed, self._closed_sketches, strict=True):
                closed.clear()
                sketch.clear()
        else:
            for second in range(self.current, now_s):
                self._close(second)
        self.current = now_s
        self.open = self._buckets[now_s % RING_SECONDS]
        self.open.reset(now_s)

    def add(
        self, second: int, series: int, row: list[int], sketch_key: int | None, sign: int
    ) -> bool:
        """Add (or, with sign -1, take back) one event's row at `second`.

        Seconds after the open one are clamped to it (clients' clocks run a little ahead);
        seconds that have left the ring are not windowed. Returns whether the event was placed.
        """
        current = self.current
        if second > current:
            second = current
        elif second <= current - RING_SECONDS:
            return False
        bucket = self._buckets[second % RING_SECONDS]
        if bucket.second != second:
            bucket.reset(second)
        _add_to(bucket.rows, series, row, sign)
        if sketch_key is not None:
            bucket.sketch.add_key(sketch_key, sign)
        if second < current:
            for index, span in enumerate(_SPANS):
                if second > current - span:
                    _add_to(self._closed[index], series, row, sign)
                    if sketch_key is not None:
                        self._closed_sketches[index].add_key(sketch_key, sign)
        return True

    def window(self, span_s: int) -> tuple[dict[int, list[int]], LatencySketch]:
        """Rows per series and the latency sketch of the last `span_s` seconds (a copy)."""
        index = _SPANS.index(span_s)
        rows = {series: list(row) for series, row in self._closed[index].items()}
        for series, row in self.open.rows.items():
            _add_to(rows, series, row, 1)
        sketch = self._closed_sketches[index].copy()
        sketch.merge(self.open.sketch)
        return {series: row for series, row in rows.items() if any(row)}, sketch

    def _close(self, second: int) -> None:
        closing = self._buckets[second % RING_SECONDS]
        if closing.second == second:
            for index in range(len(_SPANS)):
                for series, row in closing.rows.items():
                    _add_to(self._closed[index], series, row, 1)
                self._closed_sketches[index].merge(closing.sketch)
        following = second + 1
        for index, span in enumerate(_SPANS):
            leaving = self._buckets[(following - span) % RING_SECONDS]
            if leaving.second == following - span:
                for series, row in leaving.rows.items():
                    _add_to(self._closed[index], series, row, -1)
                self._closed_sketches[index].merge(leaving.sketch, -1)


def _add_to(rows: dict[int, list[int]], series: int, row: list[int], sign: int) -> None:
    into = rows.get(series)
    if into is None:
        into = rows[series] = [0] * ROW_FIELDS
    add_row(into, row, sign)
