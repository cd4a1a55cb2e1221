"""Upkeep of the SQLite file: backup, incremental vacuum, WAL checkpoint, monthly archives.

The functions take a connection and do one bounded piece of work each, so the server can run
them on the writer's connection between flushes (`BatchWriter.run_exclusive`) and the CLI on a
connection of its own. When each last ran is kept in the `config` table.
"""

from __future__ import annotations

import datetime as dt
import os
from collections.abc import Iterator
from pathlib import Path
from typing import Final

import aiosqlite
import msgspec

from exporter.store.db import connect

__all__ = [
    "ARCHIVE_SOURCE",
    "AgentUsage",
    "Checkpoint",
    "ModelUsage",
    "MonthArchive",
    "ProjectUsage",
    "Usage",
    "auto_vacuum_mode",
    "backup",
    "checkpoint",
    "disk_bytes",
    "finished_months",
    "freelist_count",
    "get_stamp",
    "incremental_vacuum",
    "month_bounds",
    "month_of",
    "month_summary",
    "oldest_event_ms",
    "oldest_rollup_ms",
    "set_stamp",
    "vacuum",
    "write_atomically",
]

#: `PRAGMA auto_vacuum` answers 2 when free pages can be given back with incremental_vacuum.
_INCREMENTAL: Final = 2
ARCHIVE_SOURCE: Final = "metrics_aggregated"
_USAGE_SUMS: Final = (
    "sum(m.calls), sum(m.errors), sum(m.input_tokens), sum(m.output_tokens),"
    " sum(m.cache_read_tokens), sum(m.cache_creation_tokens), sum(m.cost_nanos),"
    " sum(m.savings_nanos)"
)


# -- backup ------------------------------------------------------------------------------------


async def backup(source: str | Path, dest: Path) -> int:
    """Copy `source` into a temporary file beside `dest`, then rename it: readers of `dest`
    never see half a copy, and a failed backup leaves an older `dest` alone. Returns its size.

    The copy is one backup step (every page at once) inside one read transaction of the source,
    so it is the database as of one commit: in WAL mode writers go on meanwhile, and a copy made
    in several steps would restart whenever another connection commits (forever, under load).
    """
    dest.parent.mkdir(parents=True, exist_ok=True)
    partial = dest.with_name(f".{dest.name}.partial")
    partial.unlink(missing_ok=True)
    src = await connect(source)
    try:
        async with aiosqlite.connect(partial) as target:
            await src.backup(target, pages=-1)
            # The copy inherits WAL mode; a backup is one self-contained file.
            await target.execute("PRAGMA journal_mode = DELETE")
    finally:
        await src.close()
    partial.replace(dest)
    return dest.stat().st_size


# -- vacuum and checkpoint -----------------------------------------------------------------------


class Checkpoint(msgspec.Struct, frozen=True):
    """What `PRAGMA wal_checkpoint` answered: whether a reader kept it from finishing, the WAL's
    frames and how many of them are now in the database file."""

    busy: bool
    wal_frames: int
    checkpointed: int


async def auto_vacuum_mode(conn: aiosqlite.Connection) -> int:
    """0 none, 1 full, 2 incremental (set only before the first table exists)."""
    return await _pragma_int(conn, "PRAGMA auto_vacuum")


async def freelist_count(conn: aiosqlite.Connection) -> int:
    """Pages of the file that hold nothing (what incremental_vacuum gives back)."""
    return await _pragma_int(conn, "PRAGMA freelist_count")


async def incremental_vacuum(conn: aiosqlite.Connection, pages: int) -> int:
    """Give back at most `pages` free pages (all of them when 0) to the file system; returns
    the free pages left.

    Bounded so that a caller holding the writer never holds it for long: a week's purge can
    free hundreds of megabytes, and each page moved rewrites a page and its pointer-map entry.
    """
    # Not `execute`: the pragma frees one page per step of its statement and has no result
    # columns, so Python's sqlite3 steps it once (one page, whatever N says) and resets it.
    # `executescript` steps each statement to its end. It would first commit an open
    # transaction; callers run it between transactions (autocommit).
    await conn.executescript(f"PRAGMA incremental_vacuum({int(pages)})")
    return await freelist_count(conn)


async def checkpoint(
    conn: aiosqlite.Connection, mode: str = "TRUNCATE", *, busy_ms: int | None = None
) -> Checkpoint:
    """Copy the WAL into the database file (`mode` TRUNCATE also empties the WAL file).

    `busy_ms` bounds how long it waits for readers of older snapshots; the connection's own
    busy timeout is put back afterwards. A checkpoint that runs out of time has still copied
    what it could, like a PASSIVE one, and says `busy`.
    """
    if mode not in ("PASSIVE", "FULL", "RESTART", "TRUNCATE"):
        raise ValueError(f"unknown checkpoint mode {mode!r}")
    previous = await _pragma_int(conn, "PRAGMA busy_timeout")
    if busy_ms is not None:
        await conn.execute(f"PRAGMA busy_timeout = {int(busy_ms)}")
    try:
        async with conn.execute(f"PRAGMA wal_checkpoint({mode})") as cursor:
            row = await cursor.fetchone()
    finally:
        if busy_ms is not None:
            await conn.execute(f"PRAGMA busy_timeout = {previous}")
    busy, frames, done = row if row is not None else (0, -1, -1)
    return Checkpoint(bool(busy), int(frames), int(done))


async def vacuum(path: str | Path) -> tuple[bool, bool]:
    """`cco-exporter db vacuum`: every free page back to the file system, then the WAL
    truncated; returns (incremental auto-vacuum is on, a reader kept the WAL from truncating)."""
    conn = await connect(path)
    try:
        incremental = await auto_vacuum_mode(conn) == _INCREMENTAL
        if incremental:
            await incremental_vacuum(conn, 0)
        result = await checkpoint(conn)
    finally:
        await conn.close()
    return incremental, result.busy


def disk_bytes(db_path: str | Path) -> int:
    """Bytes of the database file and its WAL."""
    files = (Path(db_path), Path(f"{db_path}-wal"))
    return sum(p.stat().st_size for p in files if p.exists())


# -- what is stored, for the schedule ------------------------------------------------------------


async def oldest_event_ms(conn: aiosqlite.Connection) -> int | None:
    """The oldest timestamp of a raw call or activity event (both indexed by time)."""
    oldest: int | None = None
    for table in ("api_calls", "activity_events"):
        async with conn.execute(f"SELECT min(timestamp) FROM {table}") as cursor:
            row = await cursor.fetchone()
        if row is not None and row[0] is not None:
            oldest = int(row[0]) if oldest is None else min(oldest, int(row[0]))
    return oldest


async def oldest_rollup_ms(conn: aiosqlite.Connection) -> int | None:
    """The start of the oldest per-minute rollup (the first column of its primary key)."""
    async with conn.execute("SELECT min(minute) FROM metrics_aggregated") as cursor:
        row = await cursor.fetchone()
    return None if row is None or row[0] is None else int(row[0])


async def get_stamp(conn: aiosqlite.Connection, key: str) -> int | None:
    """An epoch-ms value kept in `config` under `key`, if any."""
    async with conn.execute("SELECT value FROM config WHERE key = ?", (key,)) as cursor:
        row = await cursor.fetchone()
    if row is None:
        return None
    try:
        return int(row[0])
    except ValueError:
        return None  # Not ours to interpret: treat as never run.


async def set_stamp(conn: aiosqlite.Connection, key: str, value_ms: int) -> None:
    """Keep `value_ms` in `config` under `key` (committed at once: autocommit connection)."""
    await conn.execute(
        "INSERT OR REPLACE INTO config (key, value) VALUES (?, ?)", (key, str(value_ms))
    )


# -- monthly archives ----------------------------------------------------------------------------


class Usage(msgspec.Struct, kw_only=True):
    """Sums over a month of rollups. Money in exact nano-USD and, for people, in USD.

    Keyword-only, so that the name fields of the subclasses come first in their JSON.
    """

    calls: int = 0
    errors: int = 0
    input_tokens: int = 0
    output_tokens: int = 0
    cache_read_tokens: int = 0
    cache_creation_tokens: int = 0
    cost_nanos: int = 0
    savings_nanos: int = 0
    cost_usd: float = 0.0
    savings_usd: float = 0.0

    def add(self, sums: tuple[int, ...]) -> None:
        self.calls += sums[0]
        self.errors += sums[1]
        self.input_tokens += sums[2]
        self.output_tokens += sums[3]
        self.cache_read_tokens += sums[4]
        self.cache_creation_tokens += sums[5]
        self.cost_nanos += sums[6]
        self.savings_nanos += sums[7]
        self.cost_usd = self.cost_nanos / 1e9
        self.savings_usd = self.savings_nanos / 1e9


class ModelUsage(Usage):
    provider: str
    model: str


class ProjectUsage(Usage):
    project: str


class AgentUsage(Usage):
    agent: str | None
    """None for calls that named no agent."""


class MonthArchive(msgspec.Struct, kw_only=True):
    """One finished month's usage, as written to `<archive dir>/YYYY-MM.json`."""

    month: str
    """`YYYY-MM` of the month in `timezone`."""
    timezone: str
    start: str
    """The month's first instant, RFC 3339 in `timezone`; `end` is the next month's."""
    end: str
    start_ms: int
    end_ms: int
    generated_at: str
    source: str = ARCHIVE_SOURCE
    total: Usage
    by_model: list[ModelUsage]
    by_project: list[ProjectUsage]
    by_agent: list[AgentUsage]


def month_bounds(year: int, month: int, zone: dt.tzinfo) -> tuple[int, int]:
    """[start, end) in epoch ms of a calendar month in `zone`.

    fold=0 resolves a midnight that DST skips to the instant of the jump, as budgets do, so an
    archived month and a budget month are the same span of time.
    """
    after = (year + 1, 1) if month == 12 else (year, month + 1)
    return _midnight_ms(year, month, zone), _midnight_ms(*after, zone)


def month_of(ms: int, zone: dt.tzinfo) -> tuple[int, int]:
    """(year, month) in `zone` of the instant `ms` (epoch ms)."""
    local = dt.datetime.fromtimestamp(ms // 1000, zone)
    return local.year, local.month


def finished_months(first_ms: int, now_ms: int, zone: dt.tzinfo) -> Iterator[tuple[int, int]]:
    """(year, month) of every month in `zone` from the one holding `first_ms` up to, not
    including, the one holding `now_ms`."""
    year, month = month_of(first_ms, zone)
    current = month_of(now_ms, zone)
    while (year, month) < current:
        yield year, month
        year, month = (year + 1, 1) if month == 12 else (year, month + 1)


async def month_summary(
    conn: aiosqlite.Connection,
    year: int,
    month: int,
    zone: dt.tzinfo,
    *,
    timezone: str,
    now_ms: int,
) -> MonthArchive | None:
    """The month's sums per model, project and agent from the per-minute rollups, or None when
    it has none. Every zone's month starts on a whole minute, so each rollup minute lies in
    exactly one month: the sums are exact."""
    start_ms, end_ms = month_bounds(year, month, zone)
    async with conn.execute(
        f"SELECT s.provider, s.model, s.project, s.agent, {_USAGE_SUMS}"
        " FROM metrics_aggregated m JOIN series s ON s.id = m.series_id"
        " WHERE m.minute >= ? AND m.minute < ? GROUP BY m.series_id",
        (start_ms, end_ms),
    ) as cursor:
        rows = await cursor.fetchall()
    if not rows:
        return None
    total = Usage()
    models: dict[tuple[str, str], ModelUsage] = {}
    projects: dict[str, ProjectUsage] = {}
    agents: dict[str, AgentUsage] = {}
    for provider, model, project, agent, *raw in rows:
        sums = tuple(int(value or 0) for value in raw)
        total.add(sums)
        key = (str(provider), str(model))
        models.setdefault(key, ModelUsage(provider=key[0], model=key[1])).add(sums)
        projects.setdefault(project, ProjectUsage(project=str(project))).add(sums)
        agents.setdefault(agent, AgentUsage(agent=str(agent) or None)).add(sums)
    return MonthArchive(
        month=f"{year:04d}-{month:02d}",
        timezone=timezone,
        start=_iso(start_ms, zone),
        end=_iso(end_ms, zone),
        start_ms=start_ms,
        end_ms=end_ms,
        generated_at=_iso(now_ms, dt.UTC),
        total=total,
        by_model=sorted(models.values(), key=lambda u: (-u.cost_nanos, u.provider, u.model)),
        by_project=sorted(projects.values(), key=lambda u: (-u.cost_nanos, u.project)),
        by_agent=sorted(agents.values(), key=lambda u: (-u.cost_nanos, u.agent or "")),
    )


def write_atomically(path: Path, data: bytes) -> None:
    """Write `data` to `path` through a temporary file in the same directory, fsync'd, then
    renamed over it: a reader, or a crash, sees the old file or the whole new one."""
    path.parent.mkdir(parents=True, exist_ok=True)
    temporary = path.with_name(f".{path.name}.tmp")
    with temporary.open("wb") as out:
        out.write(data)
        out.flush()
        os.fsync(out.fileno())
    temporary.replace(path)
    # The rename itself is durable only once the directory is synced (not possible on Windows).
    if hasattr(os, "O_DIRECTORY"):
        fd = os.open(path.parent, os.O_RDONLY | os.O_DIRECTORY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


# -- helpers -------------------------------------------------------------------------------------


async def _pragma_int(conn: aiosqlite.Connection, sql: str) -> int:
    async with conn.execute(sql) as cursor:
        row = await cursor.fetchone()
    return int(row[0]) if row is not None else 0


def _midnight_ms(year: int, month: int, zone: dt.tzinfo) -> int:
    return round(dt.datetime(year, month, 1, tzinfo=zone).timestamp() * 1000)


def _iso(ms: int, zone: dt.tzinfo) -> str:
    return dt.datetime.fromtimestamp(ms // 1000, zone).isoformat()
