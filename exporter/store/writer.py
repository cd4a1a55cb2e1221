"""BatchWriter: the one task that writes to SQLite.

Events wait in a bounded in-memory queue and are flushed when 100 have gathered or 5 s have
passed (both configurable), always everything pending in one transaction: under load batches
grow by themselves (group commit), and a durable record waits for the flush that carries it.
Per-minute rollups and cumulative series totals are written in the same transaction as the rows:
from the sums the aggregator kept per minute and label set for exactly the calls in the batch
(less any the store refuses as repeats), or, for a replayed spill file, summed by SQLite from the
rows just inserted; sessions always are. Either way they cannot disagree with `api_calls`.

If a flush fails (disk full, database locked or read-only), its events are appended to a
JSON-lines spill file beside the database and replayed in order once writes succeed; replay
progress is committed with the rows it writes, so a crash mid-replay never stores a row twice.
When the spill file cannot be written either (it shares the full disk), the events stay queued
in memory, in order. Health says degraded in both cases, and a failing write is retried once a
flush interval, not once a batch.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import itertools
import logging
import operator
import os
import sqlite3
import time
import uuid
from collections.abc import Awaitable, Callable, Iterable, Mapping
from pathlib import Path
from typing import Any, Final, TypeVar, cast

import aiosqlite
import msgspec

from exporter.aggregator import (
    HIST_OFFSET,
    HISTOGRAM_BOUNDS_S,
    TOTAL_FIELDS,
    Aggregator,
    CallRow,
    counter_updates,
    totals_row,
)
from exporter.events import CacheHit, Event, event_from_dict, timestamp_ms
from exporter.store.db import request_key
from exporter.store.writer_process import BATCH_MARK_KEY, WriterProcess

__all__ = ["CALL_COLUMNS", "BatchWriter", "QueueFull", "WriterHealth"]

log = logging.getLogger(__name__)
T = TypeVar("T")

#: api_calls columns in the order of a CallRow (`session` holds the interned session's id).
CALL_COLUMNS: Final = (
    "timestamp, series_id, session, input_tokens, output_tokens, cache_creation_tokens,"
    " cache_creation_1h_tokens, cache_read_tokens, latency_us, cost_nanos, savings_nanos,"
    " status, error_type, request_id"
)
#: A batch whose calls carry request ids also fills api_calls.request_key, the indexed key
#: they are found by (`request_key`).
_KEYED_COLUMNS: Final = CALL_COLUMNS + ", request_key"
# A batch of calls is inserted by multi-row INSERT ... VALUES statements of up to 1,024 rows,
# with the GIL released for each whole statement (when the connection's thread runs them, in the
# server's process; the writer process has a GIL of its own). executemany()
# steps row by row and takes the GIL back after every row: with the event loop busy on the
# other core, every take waits out a switch interval, and the writer managed a few thousand rows
# a second. A JSON array unpacked by json_each would need one release per batch, but SQLite's
# JSON parsing costs twice the insert itself. A session is bound as its interned id, looked up
# here: a scalar subquery per row made the insert three times slower. Statement sizes are
# powers of two, so at most eleven statements of each kind are ever compiled (and then cached by
# the driver). (Numbered parameters, ?NNN, made binding six times slower.)
_INSERT_ROWS_MAX: Final = 1024
_CALL_FIELDS: Final = 14
#: The stored calls among [[key, request id], ...] (JSON): found by key, then compared; one
#: row, a JSON array of their ids.
_STORED_REQUEST_IDS: Final = (
    "SELECT json_group_array(c.request_id) FROM json_each(?) j JOIN api_calls c"
    " ON c.request_key = j.value ->> 0 AND c.request_id = j.value ->> 1"
)
_SUMS: Final = (
    ("calls", "count(*)"),
    ("errors", "sum(status)"),
    ("input_tokens", "sum(input_tokens)"),
    ("output_tokens", "sum(output_tokens)"),
    ("cache_read_tokens", "sum(cache_read_tokens)"),
    ("cache_creation_tokens", "sum(cache_creation_tokens)"),
    ("cost_nanos", "sum(cost_nanos)"),
    ("savings_nanos", "sum(savings_nanos)"),
    ("latency_us_sum", "coalesce(sum(latency_us), 0)"),
    ("latency_count", "count(latency_us)"),
)
_SUM_NAMES: Final = [name for name, _ in _SUMS]
_SUM_FIELDS: Final = ", ".join(_SUM_NAMES)
_SUM_EXPRS: Final = ", ".join(expr for _, expr in _SUMS)
# After a batch's rows are inserted, one statement does the rest that SQLite sums: recording the
# batch's id span in flush_span fires the temp triggers below (sessions always; rollups, series
# totals and histogram only for a batch without the aggregator's sums, a replayed spill). Behind a
# busy event loop the connection's thread waits for the GIL after every statement, and after
# every row a query returns, so each lookup returns one row (a JSON array).
#
# The triggers' rollups and series totals come from one grouping of the batch's rows by (minute,
# series) into a temp table (a batch spans a minute or two: far fewer groups than rows), then
# from that small table; the latency histogram from one more pass that finds each row's bucket
# with a CASE, grouped by (series, bucket). Summing each bucket's condition over every row, in
# the same pass as the other sums, cost 2.7 µs a row against 2.0 for this.
_GROUP_CALLS: Final = f"""
INSERT INTO batch_rollup (minute, series_id, {_SUM_FIELDS})
SELECT (timestamp / 60000) * 60000, series_id, {_SUM_EXPRS}
FROM api_calls WHERE id BETWEEN NEW.lo AND NEW.hi GROUP BY 1, 2
"""
_ROLLUP_FROM_GROUPS: Final = f"""
INSERT INTO metrics_aggregated (minute, series_id, {_SUM_FIELDS})
SELECT minute, series_id, {_SUM_FIELDS} FROM batch_rollup WHERE true
ON CONFLICT (minute, series_id) DO UPDATE SET
{", ".join(f"{n} = {n} + excluded.{n}" for n in _SUM_NAMES)}
"""
_SERIES_FROM_GROUPS: Final = f"""
UPDATE series SET
{", ".join(f"{n} = series.{n} + agg.{n}" for n in _SUM_NAMES)}
FROM (
    SELECT series_id, {", ".join(f"sum({n}) AS {n}" for n in _SUM_NAMES)}
    FROM batch_rollup GROUP BY series_id
) AS agg
WHERE series.id = agg.series_id
"""


def _bucket_expr() -> str:
    """A latency's histogram bucket, matching bisect_left over the bounds in the aggregator:
    bucket i holds bounds[i-1] < latency <= bounds[i]; the last holds latency > bounds[-1]."""
    bounds = [round(b * 1_000_000) for b in HISTOGRAM_BOUNDS_S]
    whens = " ".join(f"WHEN latency_us <= {bound} THEN {i}" for i, bound in enumerate(bounds))
    return f"CASE {whens} ELSE {len(bounds)} END"


_HIST_COUNT: Final = TOTAL_FIELDS - HIST_OFFSET
_HISTOGRAM_FROM_CALLS: Final = f"""
UPDATE series SET
{", ".join(f"h{i} = series.h{i} + agg.h{i}" for i in range(_HIST_COUNT))}
FROM (
    SELECT series_id,
    {", ".join(f"sum(CASE bucket WHEN {i} THEN n ELSE 0 END) AS h{i}" for i in range(_HIST_COUNT))}
    FROM (
        SELECT series_id, {_bucket_expr()} AS bucket, count(*) AS n FROM api_calls
        WHERE id BETWEEN NEW.lo AND NEW.hi AND latency_us IS NOT NULL GROUP BY 1, 2
    ) GROUP BY series_id
) AS agg
WHERE series.id = agg.series_id
"""
_SESSIONS_FROM_CALLS: Final = """
UPDATE sessions SET
    first_seen = min(sessions.first_seen, agg.first_seen),
    last_seen = max(sessions.last_seen, agg.last_seen),
    calls = sessions.calls + agg.calls,
    cost_nanos = sessions.cost_nanos + agg.cost_nanos
FROM (
    SELECT session, min(timestamp) AS first_seen, max(timestamp) AS last_seen,
        count(*) AS calls, sum(cost_nanos) AS cost_nanos
    FROM api_calls WHERE id BETWEEN NEW.lo AND NEW.hi AND session IS NOT NULL GROUP BY session
) AS agg
WHERE sessions.id = agg.session
"""
#: Temp objects of the writer's connection, created before its first transaction (a rollback
#: would take them with it). A temp trigger names the main schema's tables unqualified.
_PREPARE_CONNECTION: Final = (
    "CREATE TEMP TABLE IF NOT EXISTS batch_rollup (minute INTEGER NOT NULL,"
    f" series_id INTEGER NOT NULL, {', '.join(f'{n} INTEGER NOT NULL' for n in _SUM_NAMES)})",
    "CREATE TEMP TABLE IF NOT EXISTS flush_span (id INTEGER PRIMARY KEY CHECK (id = 1),"
    " lo INTEGER NOT NULL, hi INTEGER NOT NULL, sessions INTEGER NOT NULL,"
    " rollups INTEGER NOT NULL)",
    "CREATE TEMP TRIGGER IF NOT EXISTS flush_calls AFTER INSERT ON flush_span"
    " WHEN NEW.rollups BEGIN"
    f" {_GROUP_CALLS}; {_ROLLUP_FROM_GROUPS}; {_SERIES_FROM_GROUPS}; DELETE FROM batch_rollup;"
    f" {_HISTOGRAM_FROM_CALLS}; END",
    "CREATE TEMP TRIGGER IF NOT EXISTS flush_sessions AFTER INSERT ON flush_span"
    f" WHEN NEW.sessions BEGIN {_SESSIONS_FROM_CALLS}; END",
)
#: Rollups, series totals and histogram (when `rollups`) and sessions (when `sessions`) of the
#: calls with ids lo..hi: the triggers.
_FLUSH_SPAN: Final = (
    "INSERT OR REPLACE INTO temp.flush_span (id, lo, hi, sessions, rollups) VALUES (1, ?, ?, ?, ?)"
)
# The calls the event loop recorded come with their sums per (minute, series) from the
# aggregator (`Aggregator.take_rollup`), which adds them up once per second and label set, not
# once per call: writing those takes two statements over a few dozen groups, where grouping the
# rows again in SQLite cost 3.8 µs a row, nearly half the writer's time. A spilled batch (rows
# only) is summed by the triggers when it is replayed.
#: Rollups as [[minute ms, series id, sums...], ...] (JSON).
_ROLLUP_FROM_JSON: Final = f"""
INSERT INTO metrics_aggregated (minute, series_id, {_SUM_FIELDS})
SELECT {", ".join(f"value ->> {i}" for i in range(len(_SUMS) + 2))} FROM json_each(?) WHERE true
ON CONFLICT (minute, series_id) DO UPDATE SET
{", ".join(f"{n} = {n} + excluded.{n}" for n in _SUM_NAMES)}
"""
_TOTALS_NAMES: Final = [*_SUM_NAMES, *(f"h{i}" for i in range(_HIST_COUNT))]
#: Series totals and histogram counts as [[series id, sums..., counts...], ...] (JSON).
_SERIES_FROM_JSON: Final = f"""
UPDATE series SET {", ".join(f"{n} = series.{n} + agg.{n}" for n in _TOTALS_NAMES)}
FROM (
    SELECT value ->> 0 AS id,
    {", ".join(f"value ->> {i} AS {n}" for i, n in enumerate(_TOTALS_NAMES, start=1))}
    FROM json_each(?)
) AS agg
WHERE series.id = agg.id
"""
_NO_SUMS: Final = (0,) * TOTAL_FIELDS
#: (minute, series id) -> a totals row (the window fields, then histogram counts).
Rollup = dict[tuple[int, int], list[int]]
#: Sessions new in a batch, as [[session_id, project, first timestamp], ...] (JSON): their ids
#: must exist before the calls that name them are inserted.
_NEW_SESSIONS: Final = """
INSERT INTO sessions (session_id, project, first_seen, last_seen)
SELECT value ->> 0, value ->> 1, value ->> 2, value ->> 2 FROM json_each(?) WHERE true
ON CONFLICT (session_id) DO NOTHING
"""
#: Their ids, as one JSON array of [session_id, id].
_SESSION_IDS: Final = (
    "SELECT json_group_array(json_array(s.session_id, s.id)) FROM json_each(?) j"
    " JOIN sessions s ON s.session_id = j.value ->> 0"
)
_UPSERT_COUNTER: Final = (
    "INSERT INTO event_counters (name, labels, value) VALUES (?, ?, ?)"
    " ON CONFLICT (name, labels) DO UPDATE SET value = value + excluded.value"
)
_UPSERT_SAVINGS_ROLLUP: Final = f"""
INSERT INTO metrics_aggregated (minute, series_id, {_SUM_FIELDS})
VALUES (?, ?, 0, 0, 0, 0, 0, 0, 0, ?, 0, 0)
ON CONFLICT (minute, series_id) DO UPDATE SET savings_nanos = savings_nanos + excluded.savings_nanos
"""
_SPILL_PROGRESS_KEY: Final = "spill_progress"
_SAVE_PROGRESS: Final = "INSERT OR REPLACE INTO config (key, value) VALUES (?, ?)"
#: Label sets as [[id, provider, model, tier, project, agent], ...] (JSON): one statement, where
#: executemany() would wait for the GIL after each row.
_INSERT_SERIES: Final = """
INSERT OR IGNORE INTO series (id, provider, model, tier, project, agent)
SELECT value ->> 0, value ->> 1, value ->> 2, value ->> 3, value ->> 4, value ->> 5
FROM json_each(?)
"""


class QueueFull(RuntimeError):
    """The write queue is at its bound; the event was not taken. Await capacity and retry."""


class WriterHealth(msgspec.Struct, frozen=True):
    """The writer's state, for health endpoints and self-metrics."""

    queue_depth: int
    max_queue: int
    flushes: int
    events_written: int
    last_flush_at: float | None
    last_flush_seconds: float | None
    last_flush_events: int
    write_errors: int
    spill_backlog: int
    degraded: bool
    last_error: str | None


class _Batch:
    """What one flush writes: call rows (their request ids included) and other events, and the
    calls' sums per (minute, series) when the aggregator made them (None: SQLite sums them)."""

    __slots__ = ("calls", "others", "rollup")

    def __init__(self) -> None:
        self.calls: list[CallRow] = []
        self.others: list[Event] = []
        self.rollup: Rollup | None = None

    def __len__(self) -> int:
        return len(self.calls) + len(self.others)


class BatchWriter:
    """Owns the connection's writes; `run()` is its task, `close()` drains it."""

    def __init__(
        self,
        conn: aiosqlite.Connection,
        aggregator: Aggregator,
        *,
        spill_path: Path,
        batch_size: int = 100,
        flush_interval: float = 5.0,
        max_queue: int = 100_000,
        process: WriterProcess | None = None,
    ) -> None:
        self._conn = conn
        #: Batches of calls are committed by this process (None: by the connection's thread).
        self.process = process
        self._aggregator = aggregator
        self._spill_path = spill_path
        self.batch_size = batch_size
        self.flush_interval = flush_interval
        self.max_queue = max_queue
        self._pending = _Batch()
        #: Events waiting for the writer (read on the per-event path: a plain attribute).
        self.depth = 0
        self._waiters: list[asyncio.Future[None]] = []
        self._wake = asyncio.Event()
        self._space = asyncio.Event()
        self._space.set()
        self._lock = asyncio.Lock()
        self._closing = False
        self._spill_id: str | None = None
        self._spill_events = 0
        self._flushes = 0
        self._written = 0
        self._write_errors = 0
        self._last_flush_at: float | None = None
        self._last_flush_seconds: float | None = None
        self._last_flush_events = 0
        self._last_error: str | None = None
        #: The last flush failed: SQLite refuses writes (its events are spilled, or held in
        #: memory when the spill file cannot be written either).
        self._failing = False
        #: The connection has the temp table and triggers of `_PREPARE_CONNECTION`.
        self._prepared = False

    # -- the per-event path -------------------------------------------------------------------

    def has_room(self, count: int = 1) -> bool:
        return self.depth + count <= self.max_queue

    def enqueue_call(self, row: CallRow) -> None:
        self._pending.calls.append(row)
        # _after_enqueue(), inlined: this runs once per call.
        depth = self.depth = self.depth + 1
        if depth >= self.batch_size:
            self._wake.set()
        if depth >= self.max_queue:
            self._space.clear()

    def enqueue_other(self, event: Event) -> None:
        self._pending.others.append(event)
        self._after_enqueue()

    def _after_enqueue(self) -> None:
        depth = self.depth = self.depth + 1
        if depth >= self.batch_size:
            self._wake.set()
        if depth >= self.max_queue:
            self._space.clear()

    async def wait_for_room(self, count: int = 1) -> None:
        """Back-pressure: wait until `count` more events fit in the queue."""
        while not self.has_room(min(count, self.max_queue)):
            self._space.clear()
            self._wake.set()
            await self._space.wait()

    def barrier(self) -> asyncio.Future[None]:
        """A future resolved when everything enqueued so far is committed (or spilled to disk)."""
        future: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self._waiters.append(future)
        self._wake.set()
        return future

    # -- the task -------------------------------------------------------------------------------

    async def run(self) -> None:
        """Flush whenever a batch is full, a durable record waits, or the interval passes."""
        while not self._closing:
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._wake.wait(), self.flush_interval)
            self._wake.clear()
            if self._closing:
                break
            try:
                await self.flush()
            except Exception:
                # flush() keeps what it could not write; the loop must outlive any surprise.
                log.exception("unexpected error in the writer; retrying at the next flush")
            if self._failing and not self._closing:
                # While writes fail, retry once an interval: every new batch would otherwise
                # start another attempt at once, re-encoding the whole held backlog on the
                # event loop for a disk that is still full.
                await asyncio.sleep(self.flush_interval)

    async def close(self) -> None:
        """Stop the loop and write everything still pending (spilling it if writes fail)."""
        self._closing = True
        self._wake.set()
        await self.flush()
        if self._spill_events:
            await self.flush()
        if self.process is not None:
            await self.process.close()
        if self.depth:
            # Neither SQLite nor the spill file took them, and memory ends with the process.
            log.error(
                "%d accepted events are lost: neither the database nor the spill file %s "
                "could be written (last error: %s)",
                self.depth,
                self._spill_path,
                self._last_error,
            )

    async def flush(self) -> None:
        """Write everything pending now, in one transaction (after any spill backlog)."""
        async with self._lock:
            batch, self._pending = self._pending, _Batch()
            # Every call recorded so far is in this batch: their sums go with it.
            batch.rollup = self._aggregator.take_rollup()
            self.depth = 0
            waiters, self._waiters = self._waiters, []
            self._space.set()
            started = time.perf_counter()
            written = 0
            try:
                if self._spill_events:
                    await self._replay_spill()
                if len(batch) or self._aggregator.new_series:
                    written = await self._commit(batch)
            except sqlite3.IntegrityError as exc:
                # A value the schema's CHECKs refuse (a float token count from the Python API,
                # say): not the disk, and spilling would only fail again at replay.
                self._hold(batch, waiters, exc)
                return
            except (sqlite3.Error, OSError) as exc:
                # Put the batch on disk behind any earlier backlog, so order is kept.
                self._failing = True
                self._failed(exc)
                try:
                    if len(batch):
                        self._spill(batch)
                except OSError as spill_exc:
                    # Neither the database nor the disk takes it: keep it in memory, in
                    # order, and try again at the next flush; durable waiters keep waiting.
                    self._requeue(batch)
                    self._waiters[:0] = waiters
                    self._failed(spill_exc, spilling=False)
                    return
            except Exception as exc:
                self._hold(batch, waiters, exc)
                return
            else:
                self._failing = False
                if len(batch):
                    self._flushes += 1
                    self._written += written
                    self._last_flush_at = time.time()
                    self._last_flush_events = len(batch)
                    self._last_flush_seconds = time.perf_counter() - started
            for waiter in waiters:
                if not waiter.done():
                    waiter.set_result(None)

    def _hold(self, batch: _Batch, waiters: list[asyncio.Future[None]], exc: Exception) -> None:
        """Not the disk but a value SQLite or the driver cannot take (a bug upstream).
        Spilling it would only fail again at replay: keep the batch in memory, in order, say so
        loudly, and retry at the next interval (health is degraded)."""
        self._failing = True
        self._requeue(batch)
        self._waiters[:0] = waiters
        self._failed(exc, spilling=False)
        log.error("unexpected error writing a batch; it stays queued", exc_info=exc)

    def _requeue(self, batch: _Batch) -> None:
        if batch.rollup:
            self._aggregator.give_back_rollup(batch.rollup)
        pending = self._pending
        pending.calls = batch.calls + pending.calls
        pending.others = batch.others + pending.others
        self.depth += len(batch)

    async def run_exclusive(self, work: Callable[[aiosqlite.Connection], Awaitable[T]]) -> T:
        """Run maintenance (purge, vacuum) between flushes, never inside one."""
        async with self._lock:
            return await work(self._conn)

    async def limit_pages(self, pages: int | None = None) -> None:
        """Cap the database file at `pages` pages (None: its size now) with `PRAGMA
        max_page_count` on each connection that writes, the writer process's included: a write
        that would grow the file fails as on a full disk (the tests' way to fill one)."""
        if pages is None:
            async with self._conn.execute("PRAGMA page_count") as cursor:
                row = await cursor.fetchone()
            pages = int(row[0]) if row is not None else 0
        await self._conn.execute(f"PRAGMA max_page_count = {int(pages)}")
        if self.process is not None:
            await self.process.set_page_limit(pages)

    @property
    def connection(self) -> aiosqlite.Connection:
        return self._conn

    def health(self) -> WriterHealth:
        return WriterHealth(
            queue_depth=self.depth,
            max_queue=self.max_queue,
            flushes=self._flushes,
            events_written=self._written,
            last_flush_at=self._last_flush_at,
            last_flush_seconds=self._last_flush_seconds,
            last_flush_events=self._last_flush_events,
            write_errors=self._write_errors,
            spill_backlog=self._spill_events,
            degraded=self._failing or self._spill_events > 0,
            last_error=self._last_error,
        )

    # -- writing ----------------------------------------------------------------------------------

    async def _commit(self, batch: _Batch, progress: str | None = None) -> int:
        """Write one batch in one transaction; returns how many events were new.

        Label sets created since the last commit are inserted first, in the same transaction,
        whichever batch (a spilled one or the current one) happens to be written first.
        """
        conn = self._conn
        aggregator = self._aggregator
        if not self._prepared:
            await _on_connection_thread(conn, _prepare_connection)
            self._prepared = True
        new_series, aggregator.new_series = aggregator.new_series, []
        if not batch.others:
            # Calls only (nearly every batch under load): the whole transaction in one request
            # to the writer process, or in one hop to the connection's thread, which otherwise
            # waits for the GIL at each statement.
            series = self._series_json(new_series) if new_series else None
            try:
                if self.process is not None:
                    retract_calls = await self.process.commit_calls(
                        batch.calls, batch.rollup, series, progress, conn
                    )
                else:
                    retract_calls = await _on_connection_thread(
                        conn,
                        _commit_calls,
                        batch.calls,
                        aggregator.series_keys,
                        batch.rollup,
                        series,
                        progress,
                    )
            except BaseException:
                aggregator.new_series[:0] = new_series
                raise
            for row in retract_calls:
                aggregator.retract_call(row)
            return len(batch) - len(retract_calls)
        await conn.execute("BEGIN IMMEDIATE")
        try:
            retract_calls, retract_others = await self._write_rows(batch, new_series)
            if progress is not None:
                await conn.execute(_SAVE_PROGRESS, (_SPILL_PROGRESS_KEY, progress))
            await conn.execute("COMMIT")
        except BaseException:
            aggregator.new_series[:0] = new_series
            with contextlib.suppress(sqlite3.Error):
                await conn.execute("ROLLBACK")
            raise
        # Only after the commit: these request ids were stored before, so take them back.
        for row in retract_calls:
            aggregator.retract_call(row)
        for event in retract_others:
            aggregator.retract_other(event)
        return len(batch) - len(retract_calls) - len(retract_others)

    async def _write_rows(
        self, batch: _Batch, new_series: list[int]
    ) -> tuple[list[CallRow], list[Event]]:
        conn = self._conn
        aggregator = self._aggregator
        if new_series:
            await self._ensure_series(new_series)
        duplicates: list[CallRow] = []
        if batch.calls:
            keys = aggregator.series_keys
            duplicates = await _on_connection_thread(
                conn, _write_calls, batch.calls, keys, batch.rollup
            )
        duplicate_others = await self._write_others(batch.others) if batch.others else []
        return duplicates, duplicate_others

    async def _write_others(self, events: list[Event]) -> list[Event]:
        conn = self._conn
        keyed = [e for e in events if e.request_id is not None]
        stored: set[str] = set()
        if keyed:
            pairs = {(str(e.__struct_config__.tag), e.request_id) for e in keyed}
            stored = await self._stored(
                "SELECT a.type || ':' || a.request_id FROM json_each(?) j JOIN activity_events a"
                " ON a.type = j.value ->> 0 AND a.request_id = j.value ->> 1",
                [list(pair) for pair in pairs],
            )
        duplicates: list[Event] = []
        rows: list[tuple[Any, ...]] = []
        counters: dict[tuple[str, str], int] = {}
        savings_by_minute: dict[tuple[int, int], int] = {}
        seen: set[str] = set()
        for event in events:
            tag = str(event.__struct_config__.tag)
            if event.request_id is not None:
                pair = f"{tag}:{event.request_id}"
                if pair in stored or pair in seen:
                    duplicates.append(event)
                    continue
                seen.add(pair)
            ts = timestamp_ms(event)
            model = getattr(event, "model", None) or getattr(event, "override_model", None)
            rows.append(
                (ts, tag, event.project, model, event.request_id, msgspec.json.encode(event))
            )
            for name, labels, savings in counter_updates(event):
                key = (name, msgspec.json.encode(labels).decode())
                counters[key] = counters.get(key, 0) + 1
                if savings:
                    counters[("cache_hit_savings_nanos", "[]")] = (
                        counters.get(("cache_hit_savings_nanos", "[]"), 0) + savings
                    )
                    if isinstance(event, CacheHit) and event.model:
                        series_id = self._aggregator.cache_hit_series(event)
                        minute = (ts // 60000) * 60000
                        key2 = (minute, series_id)
                        savings_by_minute[key2] = savings_by_minute.get(key2, 0) + savings
        if rows:
            await conn.executemany(
                "INSERT INTO activity_events (timestamp, type, project, model, request_id, payload)"
                " VALUES (?, ?, ?, ?, ?, ?)",
                [(*row[:5], row[5].decode()) for row in rows],
            )
        if counters:
            await conn.executemany(
                _UPSERT_COUNTER, [(n, lab, v) for (n, lab), v in counters.items()]
            )
        if savings_by_minute:
            await self._ensure_series(s for _, s in savings_by_minute)
            await conn.executemany(
                _UPSERT_SAVINGS_ROLLUP, [(m, s, v) for (m, s), v in savings_by_minute.items()]
            )
            per_series: dict[int, int] = {}
            for (_, series_id), value in savings_by_minute.items():
                per_series[series_id] = per_series.get(series_id, 0) + value
            await conn.executemany(
                "UPDATE series SET savings_nanos = savings_nanos + ? WHERE id = ?",
                [(v, s) for s, v in per_series.items()],
            )
        return duplicates

    async def _ensure_series(self, series_ids: Iterable[int]) -> None:
        await self._conn.execute(_INSERT_SERIES, (self._series_json(series_ids),))

    def _series_json(self, series_ids: Iterable[int]) -> bytes:
        """Label sets as `_INSERT_SERIES` takes them."""
        keys = self._aggregator.series_keys
        return msgspec.json.encode([(sid, *keys[sid]) for sid in set(series_ids)])

    async def _stored(self, query: str, values: list[Any]) -> set[str]:
        """The values `query` finds stored; it reads them from one JSON array parameter."""
        async with self._conn.execute(query, (msgspec.json.encode(values),)) as cursor:
            return {str(row[0]) for row in await cursor.fetchall()}

    # -- spill and replay -------------------------------------------------------------------

    def _failed(self, exc: BaseException, *, spilling: bool = True) -> None:
        self._write_errors += 1
        self._last_error = f"{type(exc).__name__}: {exc}"
        if spilling:
            log.error("database write failed, spilling to %s: %s", self._spill_path, exc)
        else:
            log.error(
                "spill file %s cannot be written either; %d events stay queued in memory: %s",
                self._spill_path,
                self.depth,
                exc,
            )

    def _spill(self, batch: _Batch) -> None:
        """Append one batch as a JSON line (series by their labels, not ids), fsync'd."""
        keys = self._aggregator.series_keys
        # The request id is the last field of a row: the layout of spill files before it was.
        calls = [[row[0], list(keys[row[1]]), *row[2:]] for row in batch.calls]
        line = msgspec.json.encode({"calls": calls, "others": batch.others}) + b"\n"
        if self._spill_id is None:
            spill_id = uuid.uuid4().hex
            header = msgspec.json.encode({"spill_id": spill_id}) + b"\n"
            self._write_spill(header + line, new=True)
            self._spill_id = spill_id
        else:
            self._write_spill(line, new=False)
        self._spill_events += len(batch)

    def _write_spill(self, data: bytes, *, new: bool) -> None:
        """Write whole lines to the spill file and fsync them, or leave the file as it was.

        A write the full disk cuts short leaves part of a line; it is cut off again, or the
        next line would run into it and the reader would drop both. A new file that cannot be
        written is removed, so a later spill starts it again with its header line.
        """
        path = self._spill_path
        flags = os.O_RDWR | os.O_CREAT | getattr(os, "O_BINARY", 0)
        # A new file replaces any earlier one: without a spill id, its lines were all replayed.
        fd = os.open(path, flags | (os.O_TRUNC if new else 0), 0o666)
        end = 0
        try:
            end = os.lseek(fd, 0, os.SEEK_END)
            if end:
                os.lseek(fd, end - 1, os.SEEK_SET)
                if os.read(fd, 1) != b"\n":
                    # A line torn by a crash mid-write: keep it on a line of its own, which the
                    # reader skips, rather than fused with this one.
                    data = b"\n" + data
            view = memoryview(data)
            while view:
                view = view[os.write(fd, view) :]
            os.fsync(fd)
        except OSError:
            with contextlib.suppress(OSError):
                os.ftruncate(fd, end)
            if new:
                with contextlib.suppress(OSError):
                    path.unlink()
            raise
        finally:
            os.close(fd)

    async def load_spill(self) -> int:
        """At start-up: find a spill file left by an earlier run, count its events into the
        aggregator (they are not in SQLite yet) and queue them for replay. Returns the count."""
        if not self._spill_path.exists():
            return 0
        spill_id, lines = self._read_spill()
        done = await self._replayed_lines(spill_id)
        events = 0
        for line_no, batch in lines:
            if line_no <= done:
                continue
            for row in batch.calls:
                self._aggregator.restore_call(row)
            for event in batch.others:
                self._aggregator.record_other(event, timestamp_ms(event))
            events += len(batch)
        self._spill_id = spill_id
        self._spill_events = events
        if not events:
            self._spill_path.unlink()
            self._spill_id = None
        return events

    async def _replayed_lines(self, spill_id: str) -> int:
        async with self._conn.execute(
            "SELECT value FROM config WHERE key = ?", (_SPILL_PROGRESS_KEY,)
        ) as cursor:
            row = await cursor.fetchone()
        if row is None:
            return 0
        stored_id, _, count = str(row[0]).partition(":")
        return int(count) if stored_id == spill_id else 0

    def _read_spill(self) -> tuple[str, list[tuple[int, _Batch]]]:
        raw = self._spill_path.read_bytes().splitlines()
        header = msgspec.json.decode(raw[0]) if raw else {}
        spill_id = str(header.get("spill_id", "unknown"))
        batches: list[tuple[int, _Batch]] = []
        for line_no, line in enumerate(raw[1:], start=1):
            try:
                data = msgspec.json.decode(line)
            except msgspec.DecodeError:
                # A torn last line from a crash mid-write: those events were never
                # acknowledged as durable (that waits for the fsync), so skip it.
                log.warning("spill file %s: skipping torn line %d", self._spill_path, line_no)
                continue
            batches.append((line_no, self._batch_from_json(data)))
        return spill_id, batches

    def _batch_from_json(self, data: dict[str, Any]) -> _Batch:
        batch = _Batch()
        aggregator = self._aggregator
        for item in data["calls"]:
            key = tuple(item[1])
            series_id = aggregator.series_ids.get(key)
            if series_id is None:
                series_id = aggregator.intern_series(key)
            batch.calls.append((item[0], series_id, *item[2:]))
        batch.others = [event_from_dict(item) for item in data["others"]]
        return batch

    async def _replay_spill(self) -> None:
        """Write the spill file's batches, one transaction each, recording progress in it."""
        spill_id, batches = self._read_spill()
        done = await self._replayed_lines(spill_id)
        for line_no, batch in batches:
            if line_no <= done:
                continue
            self._written += await self._commit(batch, f"{spill_id}:{line_no}")
            self._spill_events -= len(batch)
        self._spill_path.unlink(missing_ok=True)
        self._spill_id = None
        self._spill_events = 0
        log.info("spill file replayed into the database")


def _drop_repeated(calls: list[CallRow], stored: set[str]) -> tuple[list[CallRow], list[CallRow]]:
    """(calls to write, calls to take back): a request id already stored, or seen earlier in
    the batch, is a repeat."""
    kept: list[CallRow] = []
    repeated: list[CallRow] = []
    seen: set[str] = set()
    for row in calls:
        request_id = row[13]
        if request_id is not None:
            if request_id in stored or request_id in seen:
                repeated.append(row)
                continue
            seen.add(request_id)
        kept.append(row)
    return kept, repeated


async def _on_connection_thread(
    conn: aiosqlite.Connection, work: Callable[..., T], *args: Any
) -> T:
    """`work(sqlite3_connection, *args)` on the connection's own thread, queued behind its other
    operations like any aiosqlite call (aiosqlite has no public API for a whole function)."""
    result = await conn._execute(work, conn._conn, *args)  # type: ignore[no-untyped-call]
    return cast(T, result)


def _commit_calls(
    db: sqlite3.Connection,
    calls: list[CallRow],
    series_keys: Mapping[int, tuple[str, ...]],
    rollup: Rollup | None,
    new_series: bytes | None,
    progress: str | None,
    mark: str | None = None,
) -> list[CallRow]:
    """One transaction (on the connection's thread, or in the writer's process): new label
    sets, the calls (see `_write_calls`, whose repeats it returns), the spill replay's progress,
    if any, and `mark` with the id span of the rows written (see writer_process)."""
    db.execute("BEGIN IMMEDIATE")
    try:
        if new_series is not None:
            db.execute(_INSERT_SERIES, (new_series,))
        duplicates = _write_calls(db, calls, series_keys, rollup, mark) if calls else []
        if progress is not None:
            db.execute(_SAVE_PROGRESS, (_SPILL_PROGRESS_KEY, progress))
        db.execute("COMMIT")
    except BaseException:
        with contextlib.suppress(sqlite3.Error):
            db.execute("ROLLBACK")
        raise
    return duplicates


def _write_calls(
    db: sqlite3.Connection,
    calls: list[CallRow],
    series_keys: Mapping[int, tuple[str, ...]],
    rollup: Rollup | None = None,
    mark: str | None = None,
) -> list[CallRow]:
    """Insert a batch of calls with their rollups, series totals and sessions; returns the calls
    not written because their request id is stored already (or repeated in the batch).

    `rollup` holds the calls' sums per (minute, series) (see `Aggregator.take_rollup`); without
    it (or when it does not count these calls), SQLite sums the inserted rows.

    Runs inside the flush's transaction, in the writer process or on the connection's own
    thread: one request (or hop) from the event loop for the whole batch, not one per statement.
    `mark` (the process's batch token) is stored in `config` with the span of ids written.
    """
    duplicates: list[CallRow] = []
    if rollup is not None and sum(v[0] for v in rollup.values()) != len(calls):
        log.warning("the aggregator's sums do not count this batch's calls; SQLite sums them")
        rollup = None
    request_ids = [row[13] for row in calls if row[13] is not None]
    # Each id's key, computed once: for the lookup and for the rows (`get(None)` is None).
    keys = {rid: request_key(rid) for rid in request_ids}
    if request_ids:
        pairs = [[key, rid] for rid, key in keys.items()]
        (found,) = db.execute(_STORED_REQUEST_IDS, (msgspec.json.encode(pairs),)).fetchone()
        stored = set(msgspec.json.decode(found, type=list[str]))
        if stored or len(set(request_ids)) < len(request_ids):
            calls, duplicates = _drop_repeated(calls, stored)
            if rollup is not None:
                rollup = _without(rollup, duplicates)
            if not calls:
                if mark is not None:
                    db.execute(_SAVE_PROGRESS, (BATCH_MARK_KEY, f"{mark}:1:0"))
                return duplicates
    first: dict[str, CallRow] = {}
    for row in calls:
        session = row[2]
        if session is not None and session not in first:
            first[session] = row
    session_ids: dict[str | None, int] = {}
    if first:
        news = [[name, series_keys[row[1]][3], row[0]] for name, row in first.items()]
        body = (msgspec.json.encode(news),)
        db.execute(_NEW_SESSIONS, body)
        (found,) = db.execute(_SESSION_IDS, body).fetchone()
        session_ids = dict(msgspec.json.decode(found, type=list[tuple[str, int]]))
    start, total = 0, len(calls)
    keyed = bool(request_ids)
    key_of = keys.get
    last = 0
    while start < total:
        size = min(_INSERT_ROWS_MAX, 1 << ((total - start).bit_length() - 1))
        chunk: Iterable[tuple[Any, ...]] = calls[start : start + size]
        if keyed:
            chunk = [(*row, key_of(row[13])) for row in chunk]
        values = list(itertools.chain.from_iterable(chunk))
        if session_ids:
            stride = _CALL_FIELDS + keyed
            values[2::stride] = map(session_ids.get, values[2::stride])
        last = db.execute(_insert_calls_sql(size, keyed), values).lastrowid or 0
        start += size
    if rollup is not None:
        _write_rollup(db, rollup)
    # Single writer: SQLite numbers new rows max(id)+1, max(id)+2, ... in insert order.
    first_id = last - total + 1
    if first or rollup is None:
        db.execute(_FLUSH_SPAN, (first_id, last, bool(first), rollup is None))
    if mark is not None:
        db.execute(_SAVE_PROGRESS, (BATCH_MARK_KEY, f"{mark}:{first_id}:{last}"))
    return duplicates


def _without(rollup: Rollup, calls: list[CallRow]) -> Rollup:
    """A copy of `rollup` without these calls' sums (the batch's own rollup is kept as it was,
    for a retry if the transaction fails)."""
    out = dict(rollup)
    for row in calls:
        key = (row[0] // 60_000, row[1])
        out[key] = list(map(operator.sub, out.get(key, _NO_SUMS), totals_row(row)))
    return out


def _write_rollup(db: sqlite3.Connection, rollup: Rollup) -> None:
    """Add a batch's sums to metrics_aggregated (per minute) and series (per label set)."""
    groups: list[list[int]] = []
    per_series: dict[int, list[int]] = {}
    for (minute, series_id), values in rollup.items():
        if not any(values):
            continue  # a minute corrected to nothing (see Aggregator.record_call)
        groups.append([minute * 60_000, series_id, *values[:HIST_OFFSET]])
        into = per_series.get(series_id)
        if into is None:
            per_series[series_id] = values.copy()
        else:
            into[:] = map(operator.add, into, values)
    if groups:
        db.execute(_ROLLUP_FROM_JSON, (msgspec.json.encode(groups),))
        body = [[series_id, *values] for series_id, values in per_series.items()]
        db.execute(_SERIES_FROM_JSON, (msgspec.json.encode(body),))


def _prepare_connection(db: sqlite3.Connection) -> None:
    for statement in _PREPARE_CONNECTION:
        db.execute(statement)


@functools.cache
def _insert_calls_sql(rows: int, keyed: bool) -> str:
    """INSERT of `rows` calls; `keyed`: each row ends with its request key."""
    columns = _KEYED_COLUMNS if keyed else CALL_COLUMNS
    row = "(" + ", ".join("?" * (_CALL_FIELDS + keyed)) + ")"
    return f"INSERT INTO api_calls ({columns}) VALUES " + ", ".join([row] * rows)
