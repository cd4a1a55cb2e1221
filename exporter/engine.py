"""Exporter: the engine as a library — validate, price, aggregate, persist.

`record()` is synchronous and O(1): it updates the aggregator and appends to the writer's queue,
never touching I/O. The writer task persists in batches; `record_durable()` waits for the commit.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections import deque
from collections.abc import Callable, Hashable, Sequence

from exporter.aggregator import Aggregator
from exporter.events import ApiCall, Event
from exporter.settings import Settings
from exporter.store.db import connect, load_pricing, migrate
from exporter.store.queries import PurgeResult, purge, recent_request_ids, restore
from exporter.store.writer import BatchWriter, QueueFull, WriterHealth
from exporter.store.writer_process import WriterProcess

__all__ = ["Exporter", "QueueFull"]

log = logging.getLogger(__name__)

_DAY_MS = 86_400_000


class _SeenIds:
    """A bounded set of recent idempotency keys (oldest forgotten first).

    It holds the keys' 64-bit hashes, not the keys: a set of 200,000 request ids as strings
    costs ~30 MB, as ints ~10 MB. Two different ids share a hash with odds of about n / 2^64
    (1e-14 for 200,000 ids), and the second would be refused as a repeat; ids no longer held here
    are checked exactly at the flush: the writer finds stored calls by the id's key and
    compares the ids themselves.
    """

    __slots__ = ("_limit", "_order", "_set")

    def __init__(self, limit: int) -> None:
        self._limit = limit
        self._set: set[int] = set()
        self._order: deque[int] = deque()

    def add_new(self, key: Hashable) -> bool:
        """Remember `key`; False (and nothing changes) when it is remembered already."""
        digest = hash(key)
        known = self._set
        if digest in known:
            return False
        known.add(digest)
        order = self._order
        order.append(digest)
        if len(order) > self._limit:
            known.discard(order.popleft())
        return True


class Exporter:
    """One running engine: an aggregator, a SQLite store and its writer task."""

    def __init__(
        self,
        settings: Settings,
        aggregator: Aggregator,
        writer: BatchWriter,
        seen: _SeenIds,
        clock: Callable[[], float],
    ) -> None:
        self.settings = settings
        self.aggregator = aggregator
        self.writer = writer
        self._seen = seen
        self._clock = clock
        self._task: asyncio.Task[None] | None = None
        self._closed = False
        self.started_at = clock()
        #: The exporter's own counters, for /metrics and health: (name, label values) -> count.
        #: Names: events_ingested (source), events_rejected (reason), label_overflow (label),
        #: otlp_exports (result: success|failure).
        self.self_counters: dict[tuple[str, tuple[str, ...]], int] = {}

    @classmethod
    async def start(
        cls, settings: Settings | None = None, *, clock: Callable[[], float] = time.time
    ) -> Exporter:
        """Open the database, apply migrations, restore state, start the writer task."""
        settings = settings or Settings()
        conn = await connect(settings.db_path)
        process: WriterProcess | None = None
        starting: asyncio.Future[None] | None = None
        try:
            await migrate(conn)
            if settings.writer_process:
                # Started now, ready (its interpreter loaded) by the time the state is restored.
                process = WriterProcess(settings.db_path)
                starting = asyncio.ensure_future(process.start())
            pricing = await load_pricing(conn)
            aggregator = Aggregator(
                pricing,
                clock=clock,
                recent_size=settings.recent_size,
                budget_timezone=settings.budget_timezone,
            )
            await restore(conn, aggregator, int(clock() * 1000))
            seen = _SeenIds(settings.dedup_memory)
            for request_id in await recent_request_ids(conn, settings.dedup_memory):
                seen.add_new(request_id)
            writer = BatchWriter(
                conn,
                aggregator,
                spill_path=settings.spill_path,
                batch_size=settings.batch_size,
                flush_interval=settings.flush_interval,
                max_queue=settings.max_queue,
                process=process,
            )
            await writer.load_spill()
            if starting is not None:
                try:
                    await starting
                except Exception as exc:  # no interpreter, a database it cannot open, ...
                    log.warning(
                        "the writer process did not start (%s); calls are written from a thread"
                        " of this process instead",
                        exc,
                    )
                    writer.process = None
        except BaseException:
            if starting is not None:
                starting.cancel()
                with contextlib.suppress(BaseException):
                    await starting
            if process is not None:
                await process.close()
            await conn.close()
            raise
        exporter = cls(settings, aggregator, writer, seen, clock)
        exporter._task = asyncio.create_task(writer.run(), name="cco-exporter-writer")
        return exporter

    def record(self, event: Event) -> bool:
        """Count and queue one validated event. Returns False for a repeated request_id.

        Raises QueueFull (without taking the event) when the write queue is at its bound;
        `await record_durable()` or `await wait_for_room()` waits instead.
        """
        if self._closed:
            raise RuntimeError("the exporter is closed")
        writer = self.writer
        if writer.depth >= writer.max_queue:
            raise QueueFull(f"write queue is full ({writer.max_queue} events)")
        return self._record(event)

    def _record(self, event: Event) -> bool:
        request_id = event.request_id
        is_call = isinstance(event, ApiCall)
        if request_id is not None:
            key: Hashable = request_id if is_call else (type(event).__name__, request_id)
            if not self._seen.add_new(key):
                self.aggregator.duplicates += 1
                return False
        # Validation made every timestamp epoch ms (an int) or left it None (now).
        ts: int | None = event.timestamp  # type: ignore[assignment]
        if is_call:
            self.writer.enqueue_call(self.aggregator.record_call(event, ts))  # type: ignore[arg-type]
        else:
            self.aggregator.record_other(event, int(self._clock() * 1000) if ts is None else ts)
            self.writer.enqueue_other(event)
        return True

    def record_many(self, events: Sequence[Event]) -> int:
        """Record a validated batch, all or nothing as far as room goes; returns how many were
        new (repeated request ids are skipped, not errors)."""
        if self._closed:
            raise RuntimeError("the exporter is closed")
        if not self.writer.has_room(len(events)):
            raise QueueFull(f"no room for {len(events)} events")
        record = self._record
        return sum(1 for event in events if record(event))

    async def record_batch(self, events: Sequence[Event], *, chunk: int = 128) -> int:
        """Record a validated batch, all of it, letting the event loop run between chunks.

        A batch of thousands of events takes milliseconds to record; other requests (a read,
        a scrape) wait for none of it longer than one chunk. Room for the whole batch is checked
        (and waited for) once, before the first event, so the batch is never applied in part;
        concurrent batches may take the queue past its bound by at most their own sizes.
        """
        if self._closed:
            raise RuntimeError("the exporter is closed")
        if not self.writer.has_room(len(events)):
            raise QueueFull(f"no room for {len(events)} events")
        record = self._record
        accepted = 0
        for start in range(0, len(events), chunk):
            if start:
                await asyncio.sleep(0)
                if self._closed:  # pragma: no cover - shutdown drains requests first
                    raise RuntimeError("the exporter closed during a batch")
            accepted += sum(1 for event in events[start : start + chunk] if record(event))
        return accepted

    def count_self(self, name: str, labels: tuple[str, ...] = (), amount: int = 1) -> None:
        """Add to one of the exporter's own counters (see `self_counters`)."""
        key = (name, labels)
        self.self_counters[key] = self.self_counters.get(key, 0) + amount

    async def wait_for_room(self, count: int = 1) -> None:
        """Wait until `count` events fit in the write queue."""
        await self.writer.wait_for_room(count)

    async def record_durable(self, event: Event) -> bool:
        """Record one event and return once it is committed to SQLite (or fsync'd to the spill
        file while the database refuses writes; it is replayed from there)."""
        await self.wait_for_room()
        accepted = self.record(event)
        await self.writer.barrier()
        return accepted

    async def flush(self) -> None:
        """Write everything pending now."""
        await self.writer.flush()

    async def purge(self, *, now_ms: int | None = None) -> PurgeResult:
        """Apply the retention: raw calls after `retention_days`, rollups after theirs."""
        now = int(self._clock() * 1000) if now_ms is None else now_ms
        calls_before = now - self.settings.retention_days * _DAY_MS
        rollups_before = now - self.settings.rollup_retention_days * _DAY_MS
        return await self.writer.run_exclusive(
            lambda conn: purge(conn, calls_before_ms=calls_before, rollups_before_ms=rollups_before)
        )

    def health(self) -> WriterHealth:
        return self.writer.health()

    async def close(self) -> None:
        """Flush everything, stop the writer task, close the database."""
        if self._closed:
            return
        self._closed = True
        await self.writer.close()
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
        await self.writer.connection.close()
