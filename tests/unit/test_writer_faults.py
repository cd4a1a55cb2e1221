"""The writer when the disk fails it: health while events wait in memory, a spill write cut
short, a spill line torn by a crash, and how often a failing write is retried.

SQLite is made to refuse writes with `PRAGMA max_page_count` (the file may not grow: "database
or disk is full"); the spill file is refused by a file size limit (RLIMIT_FSIZE), which cuts a
write short at the limit and fails the rest with EFBIG, as a disk that fills up mid-write does.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import signal
import sqlite3
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from exporter import ApiCall, Exporter, Settings

pytestmark = pytest.mark.skipif(
    sys.platform == "win32", reason="file size limits (RLIMIT_FSIZE) are POSIX"
)

#: The writer flushes only when told to, so each test decides when a write is attempted.
MANUAL = {"batch_size": 1_000_000, "flush_interval": 3600.0, "max_queue": 2_000_000}


async def start(tmp_path: Path, **overrides: object) -> Exporter:
    settings = Settings(db_path=str(tmp_path / "metrics.db"), **{**MANUAL, **overrides})  # type: ignore[arg-type]
    return await Exporter.start(settings)


async def refuse_writes(exporter: Exporter) -> None:
    """SQLite may not grow the file by a single page: every flush with new rows fails."""
    await exporter.writer.limit_pages()


async def allow_writes(exporter: Exporter) -> None:
    await exporter.writer.limit_pages(1_073_741_823)


@contextlib.contextmanager
def file_size_limit(limit: int) -> Iterator[None]:
    """No file of this process may grow past `limit` bytes while the block runs."""
    import resource

    soft, hard = resource.getrlimit(resource.RLIMIT_FSIZE)
    # Past the limit the kernel sends SIGXFSZ, which would end the process; ignored, the
    # write fails with EFBIG instead.
    previous = signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
    resource.setrlimit(resource.RLIMIT_FSIZE, (limit, hard))
    try:
        yield
    finally:
        resource.setrlimit(resource.RLIMIT_FSIZE, (soft, hard))
        signal.signal(signal.SIGXFSZ, previous)


def record(exporter: Exporter, prefix: str, count: int) -> None:
    for i in range(count):
        exporter.record(ApiCall(model="gpt-4o", input_tokens=i + 1, request_id=f"{prefix}{i}"))


def stored(path: Path) -> tuple[int, int]:
    """(api_calls rows, distinct request ids) in the database file."""
    with contextlib.closing(sqlite3.connect(path)) as conn:
        rows = conn.execute("SELECT count(*) FROM api_calls").fetchone()[0]
        ids = conn.execute("SELECT count(DISTINCT request_id) FROM api_calls").fetchone()[0]
    return int(rows), int(ids)


async def test_health_is_degraded_while_events_wait_in_memory_for_a_full_disk(
    tmp_path: Path,
) -> None:
    exporter = await start(tmp_path)
    await refuse_writes(exporter)
    # The spill path is a directory: appending to it fails as on a full disk.
    exporter.writer._spill_path = tmp_path / "not-a-file"
    exporter.writer._spill_path.mkdir()
    record(exporter, "k", 3_000)
    await exporter.flush()
    health = exporter.health()
    assert health.degraded
    assert health.spill_backlog == 0
    assert health.queue_depth == 3_000

    await allow_writes(exporter)
    await exporter.flush()
    health = exporter.health()
    assert not health.degraded
    assert health.queue_depth == 0
    await exporter.close()
    assert stored(tmp_path / "metrics.db") == (3_000, 3_000)


async def test_a_spill_write_cut_short_by_the_disk_loses_no_line(tmp_path: Path) -> None:
    exporter = await start(tmp_path)
    spill = tmp_path / "metrics.db.spill.jsonl"
    await refuse_writes(exporter)
    record(exporter, "a", 2_000)
    await exporter.flush()
    assert exporter.health().spill_backlog == 2_000
    size = spill.stat().st_size

    record(exporter, "b", 2_000)
    with file_size_limit(size + 100):  # room for the first 100 bytes of the next line only
        await exporter.flush()
    assert exporter.health().queue_depth == 2_000  # kept in memory, in order
    assert spill.stat().st_size == size  # the cut-short line is gone again

    record(exporter, "c", 10)
    await exporter.flush()  # the database still refuses; the spill file takes them now
    assert exporter.health().spill_backlog == 4_010

    await allow_writes(exporter)
    await exporter.flush()
    assert exporter.health().spill_backlog == 0
    assert not exporter.health().degraded
    await exporter.close()
    assert stored(tmp_path / "metrics.db") == (4_010, 4_010)


async def test_a_spill_file_the_disk_refused_at_creation_is_started_again_with_its_header(
    tmp_path: Path,
) -> None:
    exporter = await start(tmp_path)
    spill = tmp_path / "metrics.db.spill.jsonl"
    await refuse_writes(exporter)
    record(exporter, "a", 2_000)
    with file_size_limit(0):
        await exporter.flush()
    assert exporter.health().queue_depth == 2_000
    assert not spill.exists()

    await exporter.flush()
    assert exporter.health().spill_backlog == 2_000
    await allow_writes(exporter)
    await exporter.flush()
    await exporter.close()
    assert stored(tmp_path / "metrics.db") == (2_000, 2_000)


async def test_a_spill_line_torn_by_a_crash_does_not_swallow_the_next_line(
    tmp_path: Path,
) -> None:
    exporter = await start(tmp_path)
    spill = tmp_path / "metrics.db.spill.jsonl"
    await refuse_writes(exporter)
    record(exporter, "a", 2_000)
    await exporter.flush()
    # The process dies while appending the next line: half of it is on disk, no newline.
    with spill.open("ab") as out:
        out.write(b'{"calls": [[1790000000000, ["openai", "gpt-4o"')
    exporter.writer._closing = True
    await exporter.writer.connection.close()

    exporter = await start(tmp_path)
    assert exporter.health().spill_backlog == 2_000
    await refuse_writes(exporter)
    record(exporter, "b", 2_000)
    await exporter.flush()
    assert exporter.health().spill_backlog == 4_000

    await allow_writes(exporter)
    await exporter.flush()
    assert exporter.health().spill_backlog == 0
    await exporter.close()
    assert stored(tmp_path / "metrics.db") == (4_000, 4_000)


async def test_while_writes_fail_the_writer_retries_once_an_interval_not_once_a_batch(
    tmp_path: Path,
) -> None:
    exporter = await start(tmp_path, batch_size=10, flush_interval=0.2)
    await refuse_writes(exporter)
    exporter.writer._spill_path = tmp_path / "not-a-file"
    exporter.writer._spill_path.mkdir()
    loop = asyncio.get_running_loop()
    started = loop.time()
    batches = 0
    while loop.time() - started < 1.0:
        # Each batch fills a flush: without a pause between failed attempts, each would be one.
        record(exporter, f"r{batches}-", 10)
        batches += 1
        await asyncio.sleep(0.01)
    attempts = exporter.health().write_errors // 2  # the database, then the spill file
    assert batches > 40
    assert attempts <= 1.0 / 0.2 + 2
    await allow_writes(exporter)
    await exporter.close()
    assert stored(tmp_path / "metrics.db") == (batches * 10, batches * 10)


async def test_close_says_how_many_events_neither_the_database_nor_the_disk_took(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    exporter = await start(tmp_path)
    await refuse_writes(exporter)
    exporter.writer._spill_path = tmp_path / "not-a-file"
    exporter.writer._spill_path.mkdir()
    record(exporter, "k", 3_000)
    with caplog.at_level(logging.ERROR, logger="exporter.store.writer"):
        await exporter.close()
    assert "3000 accepted events are lost" in caplog.text
    assert stored(tmp_path / "metrics.db") == (0, 0)


async def test_a_value_sqlite_cannot_take_keeps_the_batch_queued_and_degraded(
    tmp_path: Path,
) -> None:
    settings = Settings(db_path=str(tmp_path / "m.db"), flush_interval=3600.0)
    exporter = await Exporter.start(settings)
    try:
        # A cost past SQLite's 64-bit integers: the driver raises OverflowError, not a
        # sqlite3.Error. Nothing may be lost and nothing may pretend to be committed.
        exporter.record(ApiCall(model="gpt-4o", cost_usd=1e12))
        exporter.record(ApiCall(model="gpt-4o", input_tokens=5))
        await exporter.flush()
        health = exporter.health()
        assert health.degraded
        assert health.queue_depth == 2
        assert health.write_errors == 1
        assert "OverflowError" in (health.last_error or "")
    finally:
        await exporter.close()  # the batch still fails: closing logs it as lost


async def test_a_non_integer_count_is_refused_by_the_schema_and_held(tmp_path: Path) -> None:
    settings = Settings(db_path=str(tmp_path / "m.db"), flush_interval=3600.0)
    exporter = await Exporter.start(settings)
    try:
        # The Python API does not validate a constructed event: a float token count would be
        # stored as a REAL and poison every sum. The schema's CHECK refuses it; the batch is
        # held (not spilled: replay would fail the same way) and health says why.
        exporter.record(ApiCall(model="gpt-4o", input_tokens=1.5))  # type: ignore[arg-type]
        await exporter.flush()
        health = exporter.health()
        assert health.degraded
        assert health.queue_depth == 1
        assert health.spill_backlog == 0
        assert "IntegrityError" in (health.last_error or "")
        assert "input_tokens" in (health.last_error or "")
    finally:
        await exporter.close()  # the batch still fails: closing logs it as lost
