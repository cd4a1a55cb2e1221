"""Rings of time buckets with incremental window sums: 600 one-second buckets for 1m / 5m / 10m.

Each bucket holds one row of sums per key and a latency sketch. The aggregator keeps two rings:
one-second buckets keyed by tier (the windows themselves), and ten one-minute buckets keyed by
label set (breakdowns of a window by any label, at minute resolution). Keying the one-second ring
by label set would cost a row per active label set per second: ~200 MB at 1,000 label sets.

A window's sums cover its closed slots and are kept incrementally: when a slot closes its bucket
is added to every window, and the bucket that falls out of a window is subtracted from it.
Reading a window adds the open slot's bucket, so a read costs O(keys + sketch buckets), whatever
the event rate, and a record touches only the open bucket.

A bucket can also hold rows staged under another key: the aggregator adds a call to its label
set's row in the open second only, and folds those rows into the second's tier rows, the minute
ring and the totals when the second moves on or a reader asks (one row per call instead of three).
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
    "Bucket",
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


class Bucket(Generic[K]):
    """One slot: rows of sums per key, a latency sketch, and rows staged by the owner."""

    __slots__ = ("rows", "second", "sketch", "staged")

    def __init__(self) -> None:
        self.second = -1
        self.rows: dict[K, list[int]] = {}
        self.sketch = LatencySketch()
        #: Rows under another key, for the ring's owner to fold into `rows` (and elsewhere)
        #: before the slot closes: the aggregator's open seconds gather rows per label set.
        self.staged: dict[int, list[int]] = {}

    def reset(self, second: int) -> None:
        self.second = second
        self.rows = {}
        self.staged = {}
        self.sketch.clear()


class WindowRing(Generic[K]):
    """The ring; `current` is the newest slot (epoch seconds // slot width). Time only moves
    forward. `spans` are the windows' lengths in slots, the newest slot included.

    The newest `lag + 1` slots stay open: an event stamped in one of them (clients stamp a call
    when it ends and send it a moment later) is added to its bucket in place, like one stamped
    now; only older slots are in the windows' incremental sums. A window read adds the open
    slots' buckets, at most `lag + 1` of them.
    """

    def __init__(
        self,
        now_slot: int,
        slots: int = RING_SECONDS,
        spans: tuple[int, ...] = (60, 300, 600),
        lag: int = 0,
    ) -> None:
        if not 0 <= lag < slots or max(spans) > slots:
            raise ValueError("need 0 <= lag < slots and every span <= slots")
        self._slots = slots
        self._spans = spans
        self.lag = lag
        self.buckets: list[Bucket[K]] = [Bucket() for _ in range(slots)]
        self._closed: list[dict[K, list[int]]] = [{} for _ in spans]
        self._closed_sketches = [LatencySketch() for _ in spans]
        self.current = now_slot
        self._open_slots(now_slot)

    def _open_slots(self, now: int) -> None:
        # Every open slot's bucket is its own (reset when it became current, or here).
        for slot in range(now - self.lag, now + 1):
            self.buckets[slot % self._slots].reset(slot)
        self.open = self.buckets[now % self._slots]

    def advance(self, now_s: int) -> None:
        """Move the newest slot to `now_s` (a slot number), closing the slots that leave the
        open range and moving each window forward."""
        if now_s <= self.current:
            return
        if now_s - self.current >= self._slots:
            for bucket in self.buckets:
                bucket.reset(-1)
            for closed, sketch in zip(self._closed, self._closed_sketches, strict=True):
                closed.clear()
                sketch.clear()
            self.current = now_s
            self._open_slots(now_s)
            return
        for slot in range(self.current + 1, now_s + 1):
            self._step(slot)
        self.current = now_s
        self.open = self.buckets[now_s % self._slots]

    def add(self, second: int, key: K, row: list[int], sketch_key: int | None, sign: int) -> bool:
        """Add (or, with sign -1, take back) one event's row at `second` (a slot number).

        Slots after the newest are clamped to it (clients' clocks run a little ahead); slots
        that have left the ring are not windowed. Returns whether the event was placed.
        """
        current = self.current
        if second > current:
            second = current
        elif second <= current - self._slots:
            return False
        bucket = self.buckets[second % self._slots]
        if bucket.second != second:
            bucket.reset(second)
        _add_to(bucket.rows, key, row, sign)
        if sketch_key is not None:
            bucket.sketch.add_key(sketch_key, sign)
        if second < current - self.lag:
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
        sketch = self._closed_sketches[index].copy()
        for slot in range(self.current - min(self.lag, span - 1), self.current + 1):
            bucket = self.buckets[slot % self._slots]
            for key, row in bucket.rows.items():
                _add_to(rows, key, row, 1)
            sketch.merge(bucket.sketch)
        return {key: row for key, row in rows.items() if any(row)}, sketch

    def _step(self, now: int) -> None:
        """The newest slot becomes `now`: slot now-lag-1 closes, each window's oldest leaves."""
        lag = self.lag
        closing = self.buckets[(now - lag - 1) % self._slots]
        closing_slot = now - lag - 1
        for index, span in enumerate(self._spans):
            if span <= lag + 1:
                continue  # a window this short only ever holds open slots
            if closing.second == closing_slot:
                for key, row in closing.rows.items():
                    _add_to(self._closed[index], key, row, 1)
                self._closed_sketches[index].merge(closing.sketch)
            leaving_slot = now - span
            leaving = self.buckets[leaving_slot % self._slots]
            if leaving.second == leaving_slot:
                for key, row in leaving.rows.items():
                    _add_to(self._closed[index], key, row, -1)
                self._closed_sketches[index].merge(leaving.sketch, -1)
        self.buckets[now % self._slots].reset(now)


def _add_to(rows: dict[K, list[int]], key: K, row: list[int], sign: int) -> None:
    into = rows.get(key)
    if into is None:
        into = rows[key] = [0] * ROW_FIELDS
    add_row(into, row, sign)
