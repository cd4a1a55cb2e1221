"""The server's maintenance schedule on a real SQLite file, with the clock moved by hand."""

from __future__ import annotations

import asyncio
import contextlib
import datetime as dt
import logging
import sqlite3
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import msgspec
import pytest

from exporter import ApiCall, CacheHit, Exporter, Settings
from exporter.maintenance import ARCHIVE_GRACE_S, Maintenance, archive_dir
from exporter.store.db import connect
from exporter.store.maintenance import (
    MonthArchive,
    freelist_count,
    incremental_vacuum,
    month_bounds,
    vacuum,
)
from exporter.store.queries import history
from tests.conftest import FakeClock

UTC = dt.UTC
DAY = 86_400.0
HOUR = 3600.0
#: Sept 21 2026, 12:00 UTC: "now" for these tests (before it, July and August are finished).
NOW = dt.datetime(2026, 9, 21, 12, tzinfo=UTC).timestamp()
MODELS = ("claude-sonnet-4-5", "claude-haiku-4-5", "gpt-4o")
PROJECTS = ("web", "api")
AGENTS = (None, "planner", "coder")


def ms(*args: int, tz: dt.tzinfo = UTC) -> int:
    return int(dt.datetime(*args, tzinfo=tz).timestamp() * 1000)  # type: ignore[misc]


def settings_for(tmp_path: Path, **overrides: Any) -> Settings:
    base: dict[str, Any] = {
        "db_path": str(tmp_path / "m.db"),
        "budget_timezone": "UTC",
        # Flushes happen when the test says so, not on their own.
        "flush_interval": 3600.0,
        "batch_size": 100_000,
        "max_queue": 200_000,
    }
    return Settings(**(base | overrides))


def call(ts_ms: int, i: int, **fields: Any) -> ApiCall:
    values: dict[str, Any] = {
        "timestamp": ts_ms,
        "model": MODELS[i % len(MODELS)],
        "project": PROJECTS[i % len(PROJECTS)],
        "agent": AGENTS[i % len(AGENTS)],
        "input_tokens": 1000 + i,
        "output_tokens": 100 + i % 7,
        "cache_read_tokens": 50 * (i % 3),
        "cache_creation_tokens": 10 * (i % 5),
        "status": "error" if i % 11 == 0 else "ok",
    }
    return ApiCall(**(values | fields))


@contextlib.asynccontextmanager
async def running(settings: Settings, clock: FakeClock) -> AsyncIterator[Maintenance]:
    """An engine with its maintenance schedule (no loop task: the test calls run_due)."""
    exporter = await Exporter.start(settings, clock=clock)
    try:
        yield Maintenance(exporter, clock=clock)
    finally:
        await exporter.close()


def query(db: str | Path, sql: str, *args: object) -> list[tuple[Any, ...]]:
    with contextlib.closing(sqlite3.connect(db)) as conn:
        return conn.execute(sql, args).fetchall()


def stamps(db: str | Path) -> dict[str, int]:
    rows = query(db, "SELECT key, value FROM config WHERE key LIKE 'maintenance.%'")
    return {str(key).split(".")[1]: int(value) for key, value in rows}


async def test_the_first_pass_runs_every_task_and_stamps_it_in_config(tmp_path: Path) -> None:
    clock = FakeClock(NOW)
    settings = settings_for(tmp_path)
    async with running(settings, clock) as maintenance:
        assert await maintenance.run_due() == ["purge", "vacuum", "checkpoint", "archive"]
        assert await maintenance.run_due() == []
        counters = maintenance.exporter.self_counters
    assert stamps(settings.db_path) == dict.fromkeys(
        ("purge", "vacuum", "checkpoint", "archive"), clock.ms
    )
    assert counters[("maintenance_runs", ("purge", "success"))] == 1
    assert not any(labels[-1:] == ("failure",) for _, labels in counters)


async def test_purge_removes_old_raw_calls_and_history_still_answers_for_those_days(
    tmp_path: Path,
) -> None:
    clock = FakeClock(NOW)
    settings = settings_for(tmp_path)
    old_days = (40, 35, 31)
    async with running(settings, clock) as maintenance:
        exporter = maintenance.exporter
        for days in (*old_days, 29, 1):
            for i in range(10):
                exporter.record(call(clock.ms - int(days * DAY * 1000) + i * 60_000, i))
        exporter.record(CacheHit(timestamp=clock.ms - int(40 * DAY * 1000), model="gpt-4o"))
        await exporter.flush()

        assert "purge" in await maintenance.run_due()

        kept = query(settings.db_path, "SELECT min(timestamp), count(*) FROM api_calls")
        assert kept == [(clock.ms - int(29 * DAY * 1000), 20)]
        assert query(settings.db_path, "SELECT count(*) FROM activity_events") == [(0,)]
        # History reads rollups, which are kept for rollup_retention_days (400).
        rows = await history(
            exporter.writer.connection,
            from_ms=clock.ms - int(41 * DAY * 1000),
            to_ms=clock.ms,
            step_ms=int(DAY * 1000),
            by=None,
        )
    calls_by_day = {(clock.ms - row.start_ms) // int(DAY * 1000): row.sums[0] for row in rows}
    assert calls_by_day == {40: 10, 35: 10, 31: 10, 29: 10, 1: 10}


async def test_purge_is_due_again_after_a_day_and_not_before(tmp_path: Path) -> None:
    clock = FakeClock(NOW)
    settings = settings_for(tmp_path)
    async with running(settings, clock) as maintenance:
        await maintenance.run_due()
        exporter = maintenance.exporter
        # 31 days old at the next day's purge, 30 days and 1 hour old now: kept by this one.
        exporter.record(call(clock.ms - int((30 * DAY + HOUR) * 1000), 1))
        await exporter.flush()
        clock.advance(DAY - 60)
        assert "purge" not in await maintenance.run_due()
        assert query(settings.db_path, "SELECT count(*) FROM api_calls") == [(1,)]
        clock.advance(60)
        assert "purge" in await maintenance.run_due()
        assert query(settings.db_path, "SELECT count(*) FROM api_calls") == [(0,)]


async def test_a_backlog_of_many_days_is_purged_completely(tmp_path: Path) -> None:
    clock = FakeClock(NOW)
    settings = settings_for(tmp_path, retention_days=2)
    async with running(settings, clock) as maintenance:
        exporter = maintenance.exporter
        for i in range(300):  # one call every 4 hours for 50 days
            exporter.record(call(clock.ms - i * 4 * 3_600_000, i))
        await exporter.flush()
        result = await maintenance.purge(clock.ms)
    # Kept: the calls of the last 48 hours, i = 0..12 (the one at exactly 48 h is not older).
    assert result.api_calls == 300 - 13
    assert query(settings.db_path, "SELECT count(*) FROM api_calls") == [(13,)]
    assert query(settings.db_path, "SELECT sum(calls) FROM metrics_aggregated") == [(300,)]


async def test_vacuum_gives_freed_pages_back_when_a_week_has_passed(tmp_path: Path) -> None:
    clock = FakeClock(NOW)
    settings = settings_for(tmp_path)
    db = Path(settings.db_path)
    async with running(settings, clock) as maintenance:
        await maintenance.run_due()
        exporter = maintenance.exporter
        for i in range(20_000):
            exporter.record(call(clock.ms - int(31 * DAY * 1000) + i, i, session_id=f"s{i}"))
        await exporter.flush()
        clock.advance(DAY)
        assert await maintenance.run_due() == ["purge", "checkpoint"]
        freed = query(db, "PRAGMA freelist_count")[0][0]
        assert freed > 100
        size_before = db.stat().st_size

        clock.advance(6 * DAY)
        assert "vacuum" in await maintenance.run_due()
    assert query(db, "PRAGMA freelist_count") == [(0,)]
    # The vacuum's checkpoint truncated the file by the pages it gave back.
    assert db.stat().st_size <= size_before - freed * 4096 + 4096


async def test_checkpoint_truncates_the_wal_every_hour(tmp_path: Path) -> None:
    clock = FakeClock(NOW)
    settings = settings_for(tmp_path)
    wal = Path(settings.db_path + "-wal")
    async with running(settings, clock) as maintenance:
        await maintenance.run_due()
        exporter = maintenance.exporter
        for i in range(20_000):
            exporter.record(call(clock.ms - i, i))
        await exporter.flush()
        grown = wal.stat().st_size
        assert grown > 1_000_000

        clock.advance(HOUR - 1)
        assert "checkpoint" not in await maintenance.run_due()
        assert wal.stat().st_size == grown
        clock.advance(1)
        assert await maintenance.run_due() == ["checkpoint"]
        # Empty, but for the commit that stamped the run in `config` (a page or two).
        assert wal.stat().st_size < 32 * 1024


def expected_month(db: str, start_ms: int, end_ms: int) -> dict[str, Any]:
    """Per-model sums of the raw calls of a month: a source the archive does not read."""
    rows = query(
        db,
        "SELECT s.model, count(*), sum(c.status), sum(c.input_tokens), sum(c.output_tokens),"
        " sum(c.cache_read_tokens), sum(c.cache_creation_tokens), sum(c.cost_nanos),"
        " sum(c.savings_nanos)"
        " FROM api_calls c JOIN series s ON s.id = c.series_id"
        " WHERE c.timestamp >= ? AND c.timestamp < ? GROUP BY s.model",
        start_ms,
        end_ms,
    )
    names = ("calls", "errors", "input_tokens", "output_tokens", "cache_read_tokens")
    return {
        str(row[0]): dict(
            zip(
                (*names, "cache_creation_tokens", "cost_nanos", "savings_nanos"),
                row[1:],
                strict=True,
            )
        )
        for row in rows
    }


async def test_each_finished_month_is_archived_with_the_sums_of_its_rollups(tmp_path: Path) -> None:
    clock = FakeClock(NOW)
    settings = settings_for(tmp_path)
    archive = archive_dir(settings)
    async with running(settings, clock) as maintenance:
        exporter = maintenance.exporter
        stamps_ms = [
            ms(2026, 7, 31, 23, 59),
            ms(2026, 8, 1),
            ms(2026, 8, 15, 9),
            ms(2026, 8, 31, 23, 59, 59),
        ]
        stamps_ms.append(ms(2026, 9, 1))
        for n, ts in enumerate(stamps_ms):
            for i in range(40):
                exporter.record(call(ts, n * 40 + i))
        exporter.record(CacheHit(timestamp=ms(2026, 8, 10), model="gpt-4o", savings_usd=1.25))
        await exporter.flush()
        august = month_bounds(2026, 8, UTC)
        expected = expected_month(settings.db_path, *august)

        assert "archive" in await maintenance.run_due()

    assert sorted(p.name for p in archive.iterdir()) == ["2026-07.json", "2026-08.json"]
    data = msgspec.json.decode((archive / "2026-08.json").read_bytes(), type=MonthArchive)
    assert (data.month, data.timezone, (data.start_ms, data.end_ms)) == ("2026-08", "UTC", august)
    assert data.start == "2026-08-01T00:00:00+00:00"
    by_model = {u.model: msgspec.structs.asdict(u) for u in data.by_model}
    call_savings = sum(s["savings_nanos"] for s in expected.values())
    # Savings: the calls' cache reads, and the proxy's cache hit credited to gpt-4o.
    expected["gpt-4o"]["savings_nanos"] += 1_250_000_000
    for model, sums in expected.items():
        assert {k: by_model[model][k] for k in sums} == sums
    assert data.total.calls == 120
    assert data.total.cost_nanos == sum(s["cost_nanos"] for s in expected.values())
    assert call_savings > 0
    assert data.total.savings_nanos == call_savings + 1_250_000_000
    assert data.total.savings_usd == data.total.savings_nanos / 1e9
    assert sum(u.calls for u in data.by_project) == sum(u.calls for u in data.by_agent) == 120
    assert {u.agent for u in data.by_agent} == {None, "planner", "coder"}
    # The same figures as the rollups (metrics_aggregated), summed here independently.
    (rollups,) = query(
        settings.db_path,
        "SELECT sum(calls), sum(errors), sum(input_tokens), sum(cost_nanos), sum(savings_nanos)"
        " FROM metrics_aggregated WHERE minute >= ? AND minute < ?",
        *august,
    )
    total = data.total
    assert rollups == (
        total.calls,
        total.errors,
        total.input_tokens,
        total.cost_nanos,
        total.savings_nanos,
    )
    july = msgspec.json.decode((archive / "2026-07.json").read_bytes(), type=MonthArchive)
    assert july.total.calls == 40


async def test_archive_months_are_those_of_the_budget_time_zone(tmp_path: Path) -> None:
    clock = FakeClock(NOW)
    settings = settings_for(tmp_path, budget_timezone="Europe/Berlin")
    async with running(settings, clock) as maintenance:
        exporter = maintenance.exporter
        # 22:30 UTC on July 31st is 00:30 on August 1st in Berlin (UTC+2 in summer).
        exporter.record(call(ms(2026, 7, 31, 22, 30), 1))
        exporter.record(call(ms(2026, 7, 31, 21, 30), 2))
        await exporter.flush()
        await maintenance.run_due()
    archive = archive_dir(settings)
    august = msgspec.json.decode((archive / "2026-08.json").read_bytes(), type=MonthArchive)
    july = msgspec.json.decode((archive / "2026-07.json").read_bytes(), type=MonthArchive)
    assert (july.total.calls, august.total.calls) == (1, 1)
    assert august.start == "2026-08-01T00:00:00+02:00"
    assert august.timezone == "Europe/Berlin"


async def test_a_month_is_archived_once_its_grace_period_has_passed(tmp_path: Path) -> None:
    clock = FakeClock(NOW)
    settings = settings_for(tmp_path)
    september = archive_dir(settings) / "2026-09.json"
    async with running(settings, clock) as maintenance:
        maintenance.exporter.record(call(ms(2026, 9, 30, 23, 59, 59), 1))
        await maintenance.exporter.flush()
        await maintenance.run_due()
        clock.now = ms(2026, 10, 1) / 1000 + ARCHIVE_GRACE_S - 1
        assert "archive" not in await maintenance.run_due()
        assert not september.exists()
        clock.advance(1)
        assert "archive" in await maintenance.run_due()
    assert msgspec.json.decode(september.read_bytes(), type=MonthArchive).total.calls == 1


async def test_nothing_is_redone_after_a_restart(tmp_path: Path) -> None:
    clock = FakeClock(NOW)
    settings = settings_for(tmp_path)
    async with running(settings, clock) as maintenance:
        maintenance.exporter.record(call(ms(2026, 8, 3), 1))
        await maintenance.exporter.flush()
        await maintenance.run_due()
    august = archive_dir(settings) / "2026-08.json"
    written = august.stat().st_mtime_ns, august.read_bytes()

    clock.advance(2 * HOUR)
    async with running(settings, clock) as maintenance:
        assert await maintenance.run_due() == ["checkpoint"]
        assert maintenance.last_run["purge"] == int(NOW * 1000)
    assert (august.stat().st_mtime_ns, august.read_bytes()) == written


async def test_an_archive_already_there_is_not_written_again(tmp_path: Path) -> None:
    clock = FakeClock(NOW)
    settings = settings_for(tmp_path)
    august = archive_dir(settings) / "2026-08.json"
    august.parent.mkdir()
    august.write_text("kept\n")
    async with running(settings, clock) as maintenance:
        maintenance.exporter.record(call(ms(2026, 8, 3), 1))
        maintenance.exporter.record(call(ms(2026, 7, 3), 1))
        await maintenance.exporter.flush()
        assert [p.name for p in await maintenance.archive(clock.ms)] == ["2026-07.json"]
    assert august.read_text() == "kept\n"


async def test_a_failing_task_is_logged_counted_and_retried_later_not_at_every_check(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    clock = FakeClock(NOW)
    blocker = tmp_path / "not-a-dir"
    blocker.write_text("a file where the archive directory should be\n")
    settings = settings_for(tmp_path, archive_dir=str(blocker))
    async with running(settings, clock) as maintenance:
        maintenance.exporter.record(call(ms(2026, 8, 3), 1))
        await maintenance.exporter.flush()
        with caplog.at_level(logging.ERROR, logger="exporter.maintenance"):
            assert await maintenance.run_due() == ["purge", "vacuum", "checkpoint", "archive"]
        assert "maintenance: archive failed" in caplog.text
        counters = maintenance.exporter.self_counters
        assert counters[("maintenance_runs", ("archive", "failure"))] == 1
        assert "archive" not in stamps(settings.db_path)

        clock.advance(60)
        assert await maintenance.run_due() == []
        blocker.unlink()
        clock.advance(15 * 60)
        assert await maintenance.run_due() == ["archive"]
        assert counters[("maintenance_runs", ("archive", "success"))] == 1
    assert (blocker / "2026-08.json").exists()


async def test_a_stamp_in_the_future_counts_as_due(tmp_path: Path) -> None:
    clock = FakeClock(NOW + 10 * DAY)
    settings = settings_for(tmp_path)
    async with running(settings, clock) as maintenance:
        await maintenance.run_due()
    # The clock was ten days ahead and is now put right.
    clock.now = NOW
    async with running(settings, clock) as maintenance:
        # The archive too: its stamp's month (October) is not the last finished one.
        assert await maintenance.run_due() == ["purge", "vacuum", "checkpoint", "archive"]


async def test_the_task_runs_a_first_pass_after_its_delay_and_stops_when_closed(
    tmp_path: Path,
) -> None:
    clock = FakeClock(NOW)
    settings = settings_for(tmp_path)
    exporter = await Exporter.start(settings, clock=clock)
    try:
        maintenance = Maintenance(exporter, clock=clock, start_delay=0.05, check_every=0.05)
        maintenance.start()
        for _ in range(200):  # bounded: 10 s
            if len(maintenance.last_run) == 4:
                break
            await asyncio.sleep(0.05)
        assert maintenance.last_run == dict.fromkeys(
            ("purge", "vacuum", "checkpoint", "archive"), clock.ms
        )
        await asyncio.wait_for(maintenance.close(), 5)
    finally:
        await exporter.close()
    assert stamps(settings.db_path)["checkpoint"] == clock.ms


async def test_a_vacuum_step_gives_back_its_pages_and_db_vacuum_gives_back_all(
    tmp_path: Path,
) -> None:
    db = tmp_path / "v.db"
    conn = await connect(db)
    try:
        await conn.execute("CREATE TABLE t (x BLOB)")
        await conn.execute(
            "WITH RECURSIVE r(i) AS (SELECT 1 UNION ALL SELECT i + 1 FROM r WHERE i < 2000)"
            " INSERT INTO t SELECT randomblob(1000) FROM r"
        )
        await conn.execute("DELETE FROM t")
        free = await freelist_count(conn)
        assert free > 400
        # One statement, many pages: Python's sqlite3 would step a plain execute() once.
        assert await incremental_vacuum(conn, 300) == free - 300
    finally:
        await conn.close()
    assert await vacuum(db) == (True, False)
    assert query(db, "PRAGMA freelist_count") == [(0,)]
    (pages,) = query(db, "PRAGMA page_count")[0]
    assert db.stat().st_size == pages * 4096 < free * 4096


async def test_a_database_without_incremental_auto_vacuum_is_left_alone_with_one_warning(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    settings = settings_for(tmp_path)
    # A table before the exporter's first connection: auto_vacuum can no longer be set.
    with contextlib.closing(sqlite3.connect(settings.db_path)) as conn:
        conn.execute("CREATE TABLE older (x)")
    clock = FakeClock(NOW)
    async with running(settings, clock) as maintenance:
        with caplog.at_level(logging.WARNING, logger="exporter.maintenance"):
            assert await maintenance.vacuum() == 0
            assert await maintenance.vacuum() == 0
    assert caplog.text.count("without incremental auto-vacuum") == 1
