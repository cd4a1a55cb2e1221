"""The server's own upkeep of its database: purge, vacuum, checkpoint and monthly archives.

What runs when (intervals between runs, measured on the injectable clock):

- purge, daily: raw calls and activity older than `retention_days`, rollups older than
  `rollup_retention_days` (`Exporter.purge`); history keeps answering from the rollups;
- incremental vacuum, weekly: the pages purges freed go back to the file system;
- WAL checkpoint (TRUNCATE), hourly: the WAL file goes back to zero bytes;
- archive, once per month: each finished month's usage per model, project and agent is written
  to `<archive dir>/YYYY-MM.json` (months in the budget time zone), once.

Each task's last run is kept in the `config` table, so a restart neither redoes nor skips work.
The first pass runs `maintenance_delay` seconds after start, then due tasks are looked for every
minute. Every write goes through `BatchWriter.run_exclusive`, between flushes and in bounded
steps, so ingest is never held for long. A failure is logged and counted
(`maintenance_runs{task, result="failure"}` in the exporter's own counters) and retried after
`RETRY_AFTER_S`; it never stops the server.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Final

import aiosqlite
import msgspec

from exporter.engine import Exporter
from exporter.settings import Settings
from exporter.store.maintenance import (
    Checkpoint,
    auto_vacuum_mode,
    checkpoint,
    finished_months,
    freelist_count,
    get_stamp,
    incremental_vacuum,
    month_bounds,
    month_of,
    month_summary,
    oldest_event_ms,
    oldest_rollup_ms,
    set_stamp,
    write_atomically,
)
from exporter.store.queries import PurgeResult

__all__ = [
    "ARCHIVE_GRACE_S",
    "CHECK_EVERY_S",
    "INTERVALS_S",
    "RETRY_AFTER_S",
    "TASKS",
    "Maintenance",
    "archive_dir",
]

log = logging.getLogger(__name__)

_HOUR_S: Final = 3600
_DAY_S: Final = 24 * _HOUR_S
_DAY_MS: Final = _DAY_S * 1000
#: The tasks in the order a pass runs them: the vacuum gives back what the purge freed, and
#: the checkpoint then shrinks the WAL both wrote.
TASKS: Final = ("purge", "vacuum", "checkpoint", "archive")
#: Seconds between runs of each task; the archive runs once per month instead (see `_due`).
INTERVALS_S: Final = {"purge": _DAY_S, "vacuum": 7 * _DAY_S, "checkpoint": _HOUR_S}
#: How often the loop looks for due tasks: a look is a few comparisons, no I/O.
CHECK_EVERY_S: Final = 60.0
#: A failed task is tried again after this long, not at every check (no log flood).
RETRY_AFTER_S: Final = 15 * 60
#: A month is archived this long after it ends: events of its last seconds may still wait in
#: the write queue (up to `flush_interval`) or come from clients a little late.
ARCHIVE_GRACE_S: Final = 10 * 60
#: Free pages given back per exclusive step (16 MiB of 4 KiB pages): each step holds the writer
#: for tens of milliseconds at most (docs/RELIABILITY.md, Maintenance).
VACUUM_PAGES_PER_STEP: Final = 4096
#: How long the hourly checkpoint waits for readers of an older snapshot. TRUNCATE (not
#: PASSIVE) so the WAL file shrinks back after a burst; the writer is ours already (we run
#: between flushes), so only readers can make it wait, and only this long: it then has done
#: what a PASSIVE checkpoint does and tries again the next hour.
CHECKPOINT_BUSY_MS: Final = 1000


def archive_dir(settings: Settings) -> Path:
    """Where monthly archives go: `archive_dir`, else `archive/` beside the database."""
    if settings.archive_dir:
        return Path(settings.archive_dir).expanduser()
    return Path(settings.db_path).parent / "archive"


def _stamp_key(task: str) -> str:
    return f"maintenance.{task}.last_run_ms"


class Maintenance:
    """The maintenance schedule of one running Exporter; `start()` its task, `close()` it."""

    def __init__(
        self,
        exporter: Exporter,
        *,
        clock: Callable[[], float] = time.time,
        start_delay: float | None = None,
        check_every: float = CHECK_EVERY_S,
    ) -> None:
        self.exporter = exporter
        self.archive_dir = archive_dir(exporter.settings)
        self._clock = clock
        self._start_delay = (
            exporter.settings.maintenance_delay if start_delay is None else start_delay
        )
        self._check_every = check_every
        #: Epoch ms of each task's last successful run (from `config`, loaded at the first pass).
        self.last_run: dict[str, int] = {}
        self._loaded = False
        self._retry_at: dict[str, int] = {}
        self._warned_no_vacuum = False
        self._stop = asyncio.Event()
        self._task: asyncio.Task[None] | None = None

    def start(self) -> None:
        self._task = asyncio.create_task(self._run(), name="cco-exporter-maintenance")

    async def close(self) -> None:
        """Stop after the step in progress (every step is short), before the engine closes."""
        self._stop.set()
        if self._task is not None:
            try:
                await asyncio.wait_for(self._task, timeout=30)
            except TimeoutError:  # pragma: no cover - a step stuck in SQLite
                log.warning("maintenance did not stop within 30 s; cancelled")

    async def _run(self) -> None:
        delay = self._start_delay
        while not await self._stopped_within(delay):
            delay = self._check_every
            try:
                await self.run_due()
            except Exception:
                # run_due guards each task; only reading the stamps can get here (the database
                # refuses reads): try again later rather than log this every minute.
                log.exception(
                    "maintenance pass failed; trying again in %d minutes", RETRY_AFTER_S // 60
                )
                delay = RETRY_AFTER_S

    async def _stopped_within(self, seconds: float) -> bool:
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self._stop.wait(), max(0.0, seconds))
        return self._stop.is_set()

    async def run_due(self) -> list[str]:
        """Run every task that is due now, in order; returns the names of those that ran
        (successfully or not)."""
        if not self._loaded:
            await self._load_stamps()
        now_ms = int(self._clock() * 1000)
        steps: dict[str, Callable[[int], Awaitable[str]]] = {
            "purge": self._purge_step,
            "vacuum": self._vacuum_step,
            "checkpoint": self._checkpoint_step,
            "archive": self._archive_step,
        }
        ran: list[str] = []
        for task in TASKS:
            if self._stop.is_set():
                break
            if not self._due(task, now_ms):
                continue
            ran.append(task)
            started = time.perf_counter()
            try:
                detail = await steps[task](now_ms)
                if self._stop.is_set():
                    # Cut short by shutdown: not stamped, so the next start finishes it.
                    break
                await self._stamp(task, now_ms)
            except Exception:
                log.exception(
                    "maintenance: %s failed; trying again in %d minutes",
                    task,
                    RETRY_AFTER_S // 60,
                )
                self.exporter.count_self("maintenance_runs", (task, "failure"))
                self._retry_at[task] = now_ms + RETRY_AFTER_S * 1000
                continue
            self.last_run[task] = now_ms
            self._retry_at.pop(task, None)
            self.exporter.count_self("maintenance_runs", (task, "success"))
            # The hourly checkpoint would be most of the log; it speaks up only when held back.
            level = (
                logging.DEBUG
                if task == "checkpoint" and not detail.startswith("busy")
                else logging.INFO
            )
            log.log(
                level, "maintenance: %s in %.2f s: %s", task, time.perf_counter() - started, detail
            )
        return ran

    def _due(self, task: str, now_ms: int) -> bool:
        retry = self._retry_at.get(task)
        if retry is not None and now_ms < retry:
            return False
        last = self.last_run.get(task)
        if last is None:
            return True
        if task == "archive":
            # Once per month: when the last finished month is not the one it was last time.
            return self._settled_month(now_ms) != self._settled_month(last)
        every_ms = INTERVALS_S[task] * 1000
        # A stamp further ahead than one interval means the clock was set back: run anyway
        # rather than wait for the clock to catch up.
        return now_ms - last >= every_ms or last - now_ms > every_ms

    def _settled_month(self, ms: int) -> tuple[int, int]:
        """The month that holds `ms` less the archive's grace period."""
        return month_of(ms - ARCHIVE_GRACE_S * 1000, self.exporter.aggregator.spend.zone)

    async def _stamp(self, task: str, now_ms: int) -> None:
        key = _stamp_key(task)
        await self.exporter.writer.run_exclusive(lambda conn: set_stamp(conn, key, now_ms))

    async def _load_stamps(self) -> None:
        async def load(conn: aiosqlite.Connection) -> dict[str, int]:
            stamps: dict[str, int] = {}
            for task in TASKS:
                value = await get_stamp(conn, _stamp_key(task))
                if value is not None:
                    stamps[task] = value
            return stamps

        self.last_run = await self.exporter.writer.run_exclusive(load)
        self._loaded = True

    # -- the tasks ---------------------------------------------------------------------------

    async def purge(self, now_ms: int) -> PurgeResult:
        """Apply the retentions as of `now_ms`, one day of old rows per exclusive step.

        A first purge of a large database that was never purged must not hold the writer, and
        with it every flush, for minutes; one day of rows is what a daily purge deletes anyway.
        """
        exporter = self.exporter
        retention_ms = exporter.settings.retention_days * _DAY_MS
        cutoff = now_ms - retention_ms
        removed = [0, 0, 0, 0]
        while True:
            oldest = await exporter.writer.run_exclusive(oldest_event_ms)
            upto = cutoff if oldest is None else min(cutoff, oldest + _DAY_MS)
            result = await exporter.purge(now_ms=upto + retention_ms)
            for index, count in enumerate(msgspec.structs.astuple(result)):
                removed[index] += int(count)
            if upto >= cutoff or self._stop.is_set():
                return PurgeResult(*removed)

    async def vacuum(self) -> int:
        """Give every free page back to the file system in bounded steps, then (if any were)
        checkpoint so the file really shrinks: a WAL database truncates its file at the
        checkpoint. Returns the pages given back."""
        writer = self.exporter.writer
        if await writer.run_exclusive(auto_vacuum_mode) != 2:
            if not self._warned_no_vacuum:
                self._warned_no_vacuum = True
                log.warning(
                    "maintenance: %s was created without incremental auto-vacuum, so free"
                    " pages stay in the file; to change that, stop the server and run"
                    " `PRAGMA auto_vacuum = INCREMENTAL; VACUUM;` on it once",
                    self.exporter.settings.db_path,
                )
            return 0
        before = left = await writer.run_exclusive(freelist_count)
        while left and not self._stop.is_set():
            now_left = await writer.run_exclusive(
                lambda conn: incremental_vacuum(conn, VACUUM_PAGES_PER_STEP)
            )
            if now_left >= left:
                break  # Nothing moved: never spin on a page SQLite will not give back.
            left = now_left
        if left < before:
            await self.checkpoint()
        return before - left

    async def checkpoint(self) -> Checkpoint:
        """Copy the WAL into the database file and truncate it."""
        return await self.exporter.writer.run_exclusive(
            lambda conn: checkpoint(conn, "TRUNCATE", busy_ms=CHECKPOINT_BUSY_MS)
        )

    async def archive(self, now_ms: int) -> list[Path]:
        """Write the summary of every finished month that has rollups and no archive file yet;
        returns the files written.

        Months are those of the budget time zone, so a month's archived cost is what its
        monthly budget counted. A month that began before the rollup retention is left out:
        its first days may be purged already, and an archive is a whole month or nothing.
        It reads through a read-only connection of its own: it writes nothing to the database,
        and a month of rollups can take a moment to sum that ingest need not wait for.
        """
        settings = self.exporter.settings
        spend = self.exporter.aggregator.spend
        floor_ms = now_ms - settings.rollup_retention_days * _DAY_MS
        settled_ms = now_ms - ARCHIVE_GRACE_S * 1000
        written: list[Path] = []
        conn = await aiosqlite.connect(
            f"file:{Path(settings.db_path).as_posix()}?mode=ro", uri=True
        )
        try:
            await conn.execute("PRAGMA busy_timeout = 5000")
            first = await oldest_rollup_ms(conn)
            if first is None:
                return written
            for year, month in finished_months(first, settled_ms, spend.zone):
                path = self.archive_dir / f"{year:04d}-{month:02d}.json"
                if path.exists() or month_bounds(year, month, spend.zone)[0] < floor_ms:
                    continue
                summary = await month_summary(
                    conn, year, month, spend.zone, timezone=spend.timezone, now_ms=now_ms
                )
                if summary is None:
                    continue
                data = msgspec.json.format(msgspec.json.encode(summary), indent=2) + b"\n"
                await asyncio.to_thread(write_atomically, path, data)
                written.append(path)
        finally:
            await conn.close()
        return written

    # -- one-line results for the log ---------------------------------------------------------

    async def _purge_step(self, now_ms: int) -> str:
        result = await self.purge(now_ms)
        return ", ".join(f"{k} {v}" for k, v in msgspec.structs.asdict(result).items())

    async def _vacuum_step(self, now_ms: int) -> str:
        return f"{await self.vacuum()} free pages given back"

    async def _checkpoint_step(self, now_ms: int) -> str:
        wal = Path(f"{self.exporter.settings.db_path}-wal")
        before = wal.stat().st_size if wal.exists() else 0
        result = await self.checkpoint()
        after = wal.stat().st_size if wal.exists() else 0
        if result.busy:
            return f"busy: a reader held an older snapshot; WAL {before} -> {after} bytes"
        return f"WAL {before} -> {after} bytes"

    async def _archive_step(self, now_ms: int) -> str:
        written = await self.archive(now_ms)
        names = ", ".join(path.name for path in written) or "nothing new"
        return f"{names} in {self.archive_dir}"
