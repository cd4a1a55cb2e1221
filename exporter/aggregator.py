"""The one mutable in-memory state: record(event) in O(1), read-only snapshots for every view.

Per label set (provider, model, tier, project, agent) it keeps cumulative sums and a latency
histogram; per second, a bucket of sums per tier (see windows.py); a bounded deque of recent
events; and counters of the non-call events. Views (REST, Prometheus, OTLP) are computed from this
state when they are read, never on the per-event path.
"""

from __future__ import annotations

import bisect
import math
import operator
import time
from collections import deque
from collections.abc import Callable, Iterable
from typing import Final, Literal

import msgspec

from exporter.budget import SpendTracker
from exporter.events import (
    ApiCall,
    CacheHit,
    CacheMiss,
    ErrorEvent,
    Event,
    ModelOverride,
    SystemEvent,
)
from exporter.pricing import PricingTable, nanos_to_usd, usd_to_nanos
from exporter.sketch import _INV_LOG_GAMMA, _MIN_VALUE, LatencySketch, sketch_key
from exporter.windows import (
    CACHE_CREATION,
    CACHE_READ,
    CALLS,
    COST,
    ERRORS,
    LATENCY_COUNT,
    LATENCY_SUM,
    RING_SECONDS,
    ROW_FIELDS,
    SAVINGS,
    TOKENS_IN,
    TOKENS_OUT,
    WINDOWS,
    Bucket,
    WindowRing,
    add_row,
)

__all__ = [
    "HISTOGRAM_BOUNDS_S",
    "Aggregator",
    "CallRow",
    "Dimension",
    "SeriesKey",
    "WindowSnapshot",
    "counter_updates",
    "totals_row",
]

#: OTel GenAI latency buckets, seconds (upper bounds; +Inf is implied).
HISTOGRAM_BOUNDS_S: Final = (
    0.01, 0.02, 0.04, 0.08, 0.16, 0.32, 0.64, 1.28, 2.56, 5.12, 10.24, 20.48, 40.96, 81.92,
)  # fmt: skip
_BOUNDS_US: Final = tuple(round(b * 1_000_000) for b in HISTOGRAM_BOUNDS_S)
# Bound once at import for the hot path (module globals and attribute lookups cost there).
_bisect_left: Final = bisect.bisect_left
_ceil: Final = math.ceil
_log: Final = math.log
_SKETCH_ZERO: Final = LatencySketch.ZERO
_SKETCH_MIN: Final = _MIN_VALUE
_SKETCH_SCALE: Final = _INV_LOG_GAMMA
#: The per-series minute ring: ten one-minute slots; windows of 1, 5 and 10 slots (open included).
_MINUTE_SLOTS: Final = 10
_MINUTE_SPANS: Final = (1, 5, 10)
#: Slots kept open besides the newest (see WindowRing): calls stamped up to 5 s (or in the
#: previous minute) before now are added in place, not through the windows' sums.
_SECOND_LAG: Final = 5
_MINUTE_LAG: Final = 1
#: Cumulative rows: the window row layout followed by one count per histogram bucket (+Inf last).
HIST_OFFSET: Final = ROW_FIELDS
TOTAL_FIELDS: Final = ROW_FIELDS + len(HISTOGRAM_BOUNDS_S) + 1

#: (provider, model, tier, project, agent); agent is "" when the event has none.
SeriesKey = tuple[str, str, str, str, str]
Dimension = Literal["provider", "model", "tier", "project", "agent"]
_DIMENSION_INDEX: Final = {"provider": 0, "model": 1, "tier": 2, "project": 3, "agent": 4}

#: One call as the store writes it: timestamp, series_id, session_id (text; the store interns
#: it), input, output, cache_creation, cache_creation_1h, cache_read, latency_us, cost_nanos,
#: savings_nanos, status (0 ok / 1 error), error_type, request_id.
CallRow = tuple[
    int, int, str | None, int, int, int, int, int, int | None, int, int, int, str | None, str | None
]


class WindowSnapshot(msgspec.Struct, frozen=True):
    """Sums over one window, overall, per tier and per label set, with latency quantiles (ms)."""

    window: str
    seconds: int
    total: list[int]
    by_tier: dict[str, list[int]]
    #: Sums per series id (see `Aggregator.series_keys`), for breakdowns by any label; at
    #: minute resolution: the current minute and the 0, 4 or 9 minutes before it.
    by_series: dict[int, list[int]]
    p50_ms: float | None
    p95_ms: float | None
    p99_ms: float | None

    @property
    def calls(self) -> int:
        return self.total[CALLS]

    @property
    def cost_usd(self) -> float:
        return nanos_to_usd(self.total[COST])

    @property
    def avg_latency_ms(self) -> float | None:
        n = self.total[LATENCY_COUNT]
        return self.total[LATENCY_SUM] / n / 1000.0 if n else None

    @property
    def calls_per_minute(self) -> float:
        return self.total[CALLS] * 60.0 / self.seconds

    @property
    def cost_per_minute_usd(self) -> float:
        return nanos_to_usd(self.total[COST]) * 60.0 / self.seconds


class Aggregator:
    """Cumulative totals, time windows and recent events, fed by `record_call`/`record_other`."""

    def __init__(
        self,
        pricing: PricingTable,
        *,
        clock: Callable[[], float] = time.time,
        recent_size: int = 1000,
        budget_timezone: str = "",
    ) -> None:
        self.pricing = pricing
        self.clock = clock
        now_s = int(clock())
        #: One-second buckets keyed by tier: the 1m / 5m / 10m windows and their percentiles.
        self.ring: WindowRing[str] = WindowRing(now_s, RING_SECONDS, (60, 300, 600), _SECOND_LAG)
        #: One-minute buckets keyed by series id: a window broken down by any label.
        self.minutes: WindowRing[int] = WindowRing(
            now_s // 60, _MINUTE_SLOTS, _MINUTE_SPANS, _MINUTE_LAG
        )
        #: Label set <-> series id; the ids are the store's `series.id`.
        self.series_ids: dict[SeriesKey, int] = {}
        self.series_keys: dict[int, SeriesKey] = {}
        self._next_series_id = 1
        #: Series created since the store last persisted them (the store drains this list).
        self.new_series: list[int] = []
        #: Cumulative rows per series id, without the calls still staged (read `totals`).
        self._totals: dict[int, list[int]] = {}
        #: Open one-second buckets holding staged rows (see `record_call`); may repeat.
        self._staged: list[Bucket[str]] = []
        #: Sums (a totals row: window fields, then histogram counts) per (minute, series id) of
        #: the calls recorded since the store last took them (`take_rollup`): the store writes
        #: them as the per-minute rollups and series totals of the calls it flushes with them.
        self._rollup: dict[tuple[int, int], list[int]] = {}
        #: Newest call timestamp (ms) per series, for "last activity" views.
        self.last_seen: dict[int, int] = {}
        #: Non-call event counts: (name, label values) -> count; see `record_other`.
        self.counters: dict[tuple[str, tuple[str, ...]], int] = {}
        self.recent: deque[Event] = deque(maxlen=recent_size)
        self.unpriced = 0
        self.duplicates = 0
        self.started_at = clock()
        #: Spend per local day and project, for budgets (cache-hit savings are not spend).
        self.spend = SpendTracker(budget_timezone, clock=clock)

    # -- the per-event path -------------------------------------------------------------------

    def record_call(self, event: ApiCall, ts_ms: int | None = None) -> CallRow:
        """Count one API call; fills in its timestamp, provider, tier and cost; returns its row.

        This is the hot path: everything it touches is a dict lookup or an integer add. A call
        stamped in an open second (nearly all are) updates one row, its label set's in that
        second, written out in place; the rows are folded into the second's tier rows, the
        minute ring and the totals when the clock moves on a second or a reader asks
        (`_fold_staged`). `ts_ms` None means now (one clock read serves both).
        """
        now = self.clock()
        if ts_ms is None:
            ts_ms = int(now * 1000)
        model = event.model
        tokens_in, tokens_out = event.input_tokens, event.output_tokens
        cache_creation, cache_read = event.cache_creation_tokens, event.cache_read_tokens
        cache_1h = event.cache_creation_1h_tokens
        provider, tier, cost, savings = self.pricing.price_call(
            model, tokens_in, tokens_out, cache_creation, cache_read, cache_1h
        )
        if event.provider is None:
            event.provider = provider
        else:
            provider = event.provider
        if event.tier is None:
            event.tier = tier
        else:
            tier = event.tier
        if event.cost_usd is None:
            if cost is None:
                cost = 0
                self.unpriced += 1
            event.cost_usd = cost / 1e9
        else:
            cost = round(event.cost_usd * 1e9)
        latency = event.latency_ms
        error = 1 if event.status == "error" else 0
        event.timestamp = ts_ms

        project = event.project
        key = (provider, model, tier, project, event.agent or "")
        series_id = self.series_ids.get(key)
        if series_id is None:
            series_id = self._new_series(key)
        # SpendTracker.add, inlined for a call made in the cached day (nearly every call).
        spend = self.spend
        if spend.day_start_ms <= ts_ms < spend.day_end_ms:
            today = spend.today
            today[project] = today.get(project, 0) + cost
        else:
            spend.add_other_day(ts_ms, project, cost)
        self.last_seen[series_id] = ts_ms

        if latency is None:
            latency_us = None
            latency_key = 0
        else:
            latency_us = round(latency * 1000)
            # sketch_key(latency_us / 1000.0), inlined.
            value = latency_us / 1000.0
            latency_key = (
                _SKETCH_ZERO if value <= _SKETCH_MIN else _ceil(_log(value) * _SKETCH_SCALE)
            )
        row = (
            ts_ms,
            series_id,
            event.session_id,
            tokens_in,
            tokens_out,
            cache_creation,
            cache_1h,
            cache_read,
            latency_us,
            cost,
            savings,
            error,
            event.error_type,
            event.request_id,
        )

        ring = self.ring
        now_s = int(now)
        if now_s > ring.current:
            self._advance(now_s)
        current = ring.current
        second = ts_ms // 1000
        if second >= current - _SECOND_LAG:
            # An open second (or a client clock a little ahead): one row per label set, added
            # in place and folded into the tier rows, the minute ring and the totals once a
            # second (`_fold_staged`), not three rows per call.
            bucket = ring.open if second >= current else ring.buckets[second % RING_SECONDS]
            sums = bucket.staged.get(series_id)
            if sums is None:
                sums = bucket.staged[series_id] = [0] * TOTAL_FIELDS
                self._staged.append(bucket)
            sums[CALLS] += 1
            sums[ERRORS] += error
            sums[TOKENS_IN] += tokens_in
            sums[TOKENS_OUT] += tokens_out
            sums[CACHE_READ] += cache_read
            sums[CACHE_CREATION] += cache_creation
            sums[COST] += cost
            sums[SAVINGS] += savings
            if latency_us is not None:
                sums[LATENCY_SUM] += latency_us
                sums[LATENCY_COUNT] += 1
                sums[HIST_OFFSET + _bisect_left(_BOUNDS_US, latency_us)] += 1
                bucket.sketch.add_key(latency_key)
            if second > current and second // 60 != current // 60:
                # A client clock ahead, past a minute's end: staged in the open second, but
                # its rollup minute is its own.
                values = totals_row(row)
                self._rollup_add((current // 60, series_id), values, operator.sub)
                self._rollup_add((second // 60, series_id), values, operator.add)
        else:
            # Older: straight into the totals, the rollups and the windows' sums (rare).
            values = totals_row(row)
            total = self._totals[series_id]
            total[:] = map(operator.add, total, values)
            self._rollup_add((ts_ms // 60_000, series_id), values, operator.add)
            self._window_add(row, values[:ROW_FIELDS], 1)
        self.recent.append(event)
        return row

    def _advance(self, now_s: int) -> None:
        """Move both rings to `now_s` (epoch seconds), folding the staged rows first: a slot
        must hold all of its calls before it closes into the windows' sums."""
        if self._staged:
            self._fold_staged()
        self.ring.advance(now_s)
        self.minutes.advance(now_s // 60)

    def _fold_staged(self) -> None:
        """Move the rows staged per label set in open seconds into those seconds' tier rows,
        the minute ring, the cumulative totals and the rollups the store has yet to take. Any
        time is right: the seconds stay open."""
        keys = self.series_keys
        totals = self._totals
        minutes = self.minutes
        rollup = self._rollup
        add = operator.add
        for bucket in self._staged:
            staged = bucket.staged
            if not staged:
                continue  # listed twice: folded already
            bucket.staged = {}
            rows = bucket.rows
            minute = bucket.second // 60
            for series_id, values in staged.items():
                # `values` is a totals row; the windows keep its first ROW_FIELDS.
                tier = keys[series_id][2]
                into = rows.get(tier)
                if into is None:
                    rows[tier] = values[:ROW_FIELDS]
                else:
                    into[:] = map(add, into, values[:ROW_FIELDS])
                minutes.add(minute, series_id, values, None, 1)
                total = totals[series_id]
                total[:] = map(add, total, values)
                pending = rollup.get((minute, series_id))
                if pending is None:
                    rollup[minute, series_id] = values  # nothing else holds it now
                else:
                    pending[:] = map(add, pending, values)
        self._staged.clear()

    def _rollup_add(
        self, key: tuple[int, int], values: list[int], op: Callable[[int, int], int]
    ) -> None:
        pending = self._rollup.get(key)
        if pending is None:
            pending = self._rollup[key] = [0] * TOTAL_FIELDS
        pending[:] = map(op, pending, values)

    def take_rollup(self) -> dict[tuple[int, int], list[int]]:
        """Sums per (minute, series id) of every call recorded since the last take, as totals
        rows; the store takes them with the calls it is about to write (see BatchWriter)."""
        if self._staged:
            self._fold_staged()
        rollup, self._rollup = self._rollup, {}
        return rollup

    def give_back_rollup(self, rollup: dict[tuple[int, int], list[int]]) -> None:
        """Sums taken by `take_rollup` whose calls were not written: the next take has them."""
        for key, values in rollup.items():
            self._rollup_add(key, values, operator.add)

    @property
    def totals(self) -> dict[int, list[int]]:
        """Cumulative rows per series id (window-row sums, then histogram counts), up to now:
        reading it folds the calls still staged. Do not modify the rows."""
        if self._staged:
            self._fold_staged()
        return self._totals

    def _apply(self, row: CallRow, sign: int) -> None:
        """Add (sign 1) or take back (sign -1) a call row everywhere: totals and windows."""
        total = self._totals[row[1]]
        values = totals_row(row)
        total[:] = map(operator.add if sign > 0 else operator.sub, total, values)
        self.spend.add(row[0], self.series_keys[row[1]][3], sign * row[9])
        self._window_add(row, values[:ROW_FIELDS], sign)

    def _window_add(self, row: CallRow, values: list[int], sign: int) -> None:
        self._advance(int(self.clock()))
        tier = self.series_keys[row[1]][2]
        self.ring.add(row[0] // 1000, tier, values, _latency_key(row[8]), sign)
        self.minutes.add(row[0] // 60_000, row[1], values, None, sign)

    def retract_call(self, row: CallRow) -> None:
        """Take back a call counted by `record_call` (the store found its request_id stored)."""
        self._apply(row, -1)
        self.duplicates += 1

    def record_other(self, event: Event, ts_ms: int) -> None:
        """Count a non-call event: cache hit/miss, error, model override or system note."""
        event.timestamp = ts_ms
        for name, labels, savings in counter_updates(event):
            self.count(name, labels, 1)
            if savings:
                self._add_savings(event, savings)
        self.recent.append(event)

    def retract_other(self, event: Event) -> None:
        """Take back a non-call event (its request_id was already stored)."""
        for name, labels, savings in counter_updates(event):
            self.count(name, labels, -1)
            if savings:
                self._add_savings(event, -savings)
        self.duplicates += 1

    def count(self, name: str, labels: tuple[str, ...], delta: int) -> None:
        key = (name, labels)
        self.counters[key] = self.counters.get(key, 0) + delta

    def cache_hit_series(self, event: CacheHit) -> int:
        """The series a cache hit's savings are credited to (created when new)."""
        assert event.model is not None
        provider, tier, _ = self.pricing.classify(event.model)
        return self.intern_series((provider, event.model, tier, event.project, event.agent or ""))

    def _add_savings(self, event: Event, savings: int) -> None:
        # Savings of a response served from the proxy's cache: credited to the model's series
        # when the event names one, and always to the cache-hit savings counter.
        self.count("cache_hit_savings_nanos", (), savings)
        if isinstance(event, CacheHit) and event.model:
            self._totals[self.cache_hit_series(event)][SAVINGS] += savings

    def _new_series(self, key: SeriesKey) -> int:
        series_id = self._next_series_id
        self._next_series_id += 1
        self.series_ids[key] = series_id
        self.series_keys[series_id] = key
        self._totals[series_id] = [0] * TOTAL_FIELDS
        self.new_series.append(series_id)
        return series_id

    # -- restoring from the store -------------------------------------------------------------

    def restore_series(self, series_id: int, key: SeriesKey, totals: Iterable[int]) -> None:
        """Load one stored label set with its cumulative totals (at start-up)."""
        row = list(totals)
        if len(row) != TOTAL_FIELDS:
            raise ValueError(f"series {series_id}: expected {TOTAL_FIELDS} totals, got {len(row)}")
        self.series_ids[key] = series_id
        self.series_keys[series_id] = key
        self._totals[series_id] = row
        self._next_series_id = max(self._next_series_id, series_id + 1)

    def intern_series(self, key: SeriesKey) -> int:
        """The id of a label set, created (with zero totals) when new."""
        series_id = self.series_ids.get(key)
        return self._new_series(key) if series_id is None else series_id

    def restore_call(self, row: CallRow) -> None:
        """Count a call that was accepted but is not in SQLite yet (from a spill file)."""
        self._apply(row, 1)

    def restore_window(self, row: CallRow) -> None:
        """Put one stored call of the last 10 minutes back into the ring (not into totals)."""
        self._window_add(row, _window_row(row), 1)
        if row[0] > self.last_seen.get(row[1], -1):
            self.last_seen[row[1]] = row[0]

    # -- reads ----------------------------------------------------------------------------------

    def window(self, name: str = "10m") -> WindowSnapshot:
        """Sums over the last 1m, 5m or 10m (by event timestamp), as of the clock's now."""
        seconds = WINDOWS[name]
        now_s = int(self.clock())
        self._advance(now_s)
        by_tier, sketch = self.ring.window(seconds)
        total = [0] * ROW_FIELDS
        for row in by_tier.values():
            add_row(total, row)
        p50, p95, p99 = sketch.quantiles(0.50, 0.95, 0.99)
        by_series, _ = self.minutes.window(_MINUTE_SPANS[list(WINDOWS).index(name)])
        return WindowSnapshot(name, seconds, total, by_tier, by_series, p50, p95, p99)

    def group(self, rows: dict[int, list[int]], by: Dimension) -> dict[str, list[int]]:
        """Rows per series id summed by one label (a copy)."""
        index = _DIMENSION_INDEX[by]
        keys = self.series_keys
        out: dict[str, list[int]] = {}
        for series_id, row in rows.items():
            label = keys[series_id][index]
            into = out.get(label)
            if into is None:
                out[label] = list(row)
            else:
                add_row(into, row)
        return out

    def breakdown(self, by: Dimension) -> dict[str, list[int]]:
        """Cumulative totals (histogram included) grouped by one label."""
        return self.group(self.totals, by)

    def last_activity(self, by: Dimension) -> dict[str, int]:
        """Newest call timestamp (ms) per value of one label."""
        index = _DIMENSION_INDEX[by]
        keys = self.series_keys
        out: dict[str, int] = {}
        for series_id, ts in self.last_seen.items():
            label = keys[series_id][index]
            if ts > out.get(label, -1):
                out[label] = ts
        return out

    def grand_total(self) -> list[int]:
        """Cumulative totals over every label set."""
        out = [0] * TOTAL_FIELDS
        for row in self.totals.values():
            add_row(out, row)
        return out


def totals_row(row: CallRow) -> list[int]:
    """A call row as a totals row: its window row, then its histogram bucket's count."""
    values = _window_row(row) + [0] * (TOTAL_FIELDS - ROW_FIELDS)
    latency_us = row[8]
    if latency_us is not None:
        values[HIST_OFFSET + _bisect_left(_BOUNDS_US, latency_us)] = 1
    return values


def _window_row(row: CallRow) -> list[int]:
    """A call row as a row of sums (see windows.py for the layout)."""
    latency_us = row[8]
    return [
        1,
        row[11],
        row[3],
        row[4],
        row[7],
        row[5],
        row[9],
        row[10],
        latency_us or 0,
        0 if latency_us is None else 1,
    ]


def _latency_key(latency_us: int | None) -> int | None:
    return None if latency_us is None else sketch_key(latency_us / 1000.0)


def counter_updates(event: Event) -> list[tuple[str, tuple[str, ...], int]]:
    """(counter name, label values, savings nano-USD) for a non-call event."""
    if isinstance(event, CacheHit):
        return [("cache_events", ("hit",), usd_to_nanos(event.savings_usd))]
    if isinstance(event, CacheMiss):
        return [("cache_events", ("miss",), 0)]
    if isinstance(event, ModelOverride):
        labels = (event.original_model, event.override_model, event.reason)
        return [("model_overrides", labels, 0)]
    if isinstance(event, ErrorEvent):
        return [("errors", (event.error_type or "unknown",), 0)]
    if isinstance(event, SystemEvent):
        return [("system_events", (), 0)]
    raise TypeError(f"not a non-call event: {type(event).__name__}")  # pragma: no cover
