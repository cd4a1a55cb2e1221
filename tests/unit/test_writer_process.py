"""The writer's process (a real child process on a real SQLite file): killed between batches,
killed after its COMMIT but before its answer, or impossible to start."""

from __future__ import annotations

import os
import signal
import sqlite3
import sys
from pathlib import Path

import pytest

from exporter import ApiCall, Exporter, Settings
from exporter.windows import CALLS, COST

pytestmark = pytest.mark.skipif(sys.platform == "win32", reason="signals and pipes are POSIX")

#: The writer flushes only when told to, so each test decides when a batch is sent.
MANUAL = {"batch_size": 1_000_000, "flush_interval": 3600.0, "max_queue": 2_000_000}


async def start(tmp_path: Path, **overrides: object) -> Exporter:
    settings = Settings(db_path=str(tmp_path / "metrics.db"), **{**MANUAL, **overrides})  # type: ignore[arg-type]
    return await Exporter.start(settings)


def call(i: int, request_id: str | None = None) -> ApiCall:
    return ApiCall(
        model="claude-sonnet-4-5",
        input_tokens=1000 + i,
        output_tokens=10 * i,
        latency_ms=100 + i,
        request_id=request_id,
        session_id=f"s-{i % 3}",
    )


def stored(path: Path) -> tuple[int, int, int, int, int]:
    """(calls, cost, distinct request ids, rollup calls, series calls) as SQLite has them."""
    with sqlite3.connect(path) as c:
        calls, cost, ids = c.execute(
            "SELECT count(*), coalesce(sum(cost_nanos), 0), count(DISTINCT request_id)"
            " FROM api_calls"
        ).fetchone()
        (rollup,) = c.execute("SELECT coalesce(sum(calls), 0) FROM metrics_aggregated").fetchone()
        (series,) = c.execute("SELECT coalesce(sum(calls), 0) FROM series").fetchone()
    return int(calls), int(cost), int(ids), int(rollup), int(series)


async def test_the_process_commits_the_calls(tmp_path: Path) -> None:
    exporter = await start(tmp_path)
    process = exporter.writer.process
    assert process is not None
    pid = process.pid
    assert pid is not None
    assert pid != os.getpid()
    for i in range(200):
        exporter.record(call(i, f"r{i}" if i % 2 else None))
    await exporter.flush()
    totals = exporter.aggregator.grand_total()
    assert process.starts == 1
    await exporter.close()
    assert process.pid is None  # it ended with its input
    assert stored(tmp_path / "metrics.db") == (200, totals[COST], 100, 200, 200)
    with sqlite3.connect(tmp_path / "metrics.db") as c:
        (mark,) = c.execute("SELECT value FROM config WHERE key = 'writer_batch'").fetchone()
    # Only the process's transactions carry a batch token: this one names all 200 rows.
    assert str(mark).endswith(":1:200")


async def test_a_killed_writer_process_is_started_again_and_nothing_is_lost(
    tmp_path: Path,
) -> None:
    """Killed between batches: the next batch either finds it gone and starts another, or is
    refused by the dead pipe, spilled and replayed by the next one. Either way every call is
    stored once."""
    exporter = await start(tmp_path)
    process = exporter.writer.process
    assert process is not None
    for i in range(300):
        exporter.record(call(i, f"a{i}"))
    await exporter.flush()
    pid = process.pid
    assert pid is not None
    os.kill(pid, signal.SIGKILL)
    for i in range(300, 700):
        exporter.record(call(i, f"a{i}" if i % 2 else None))
    await exporter.flush()
    exporter.record(call(700))
    await exporter.flush()
    health = exporter.health()
    assert health.spill_backlog == 0
    assert health.queue_depth == 0
    assert process.starts == 2
    assert process.pid not in (None, pid)
    totals = exporter.aggregator.grand_total()
    await exporter.close()
    assert totals[CALLS] == 701
    assert stored(tmp_path / "metrics.db") == (701, totals[COST], 500, 701, 701)


async def test_a_batch_committed_by_a_process_that_died_before_answering_counts_once(
    tmp_path: Path,
) -> None:
    """The process commits, then cannot answer (its answer's pipe is closed, and writing to it
    ends the process). The batch must count as written, not be spilled and written again, and
    the calls it refused as repeats must be taken back from the totals as usual."""
    # Remember one request id only: the repeats below reach the store, which refuses them.
    exporter = await start(tmp_path, dedup_memory=1)
    process = exporter.writer.process
    assert process is not None
    for i in range(100):
        exporter.record(call(i, f"r{i}"))
    await exporter.flush()
    for i in range(100, 400):
        # 50 repeats of stored ids, 50 new ids sent twice each, and 150 calls without one.
        request_id = f"r{i - 100}" if i < 150 else f"n{i % 50}" if i < 250 else None
        exporter.record(call(i, request_id))
    assert exporter.aggregator.grand_total()[CALLS] == 400
    proc = process._proc
    assert proc is not None
    proc._transport.get_pipe_transport(1).close()  # type: ignore[attr-defined]
    await exporter.flush()
    health = exporter.health()
    assert not health.degraded
    assert health.spill_backlog == 0
    assert health.queue_depth == 0
    totals = exporter.aggregator.grand_total()
    assert totals[CALLS] == 100 + 50 + 150  # less 50 repeats of r0-r49, 50 second sends of n*
    assert exporter.aggregator.duplicates == 100
    exporter.record(call(500))
    await exporter.flush()  # a new process
    assert process.starts == 2
    totals = exporter.aggregator.grand_total()
    await exporter.close()
    assert stored(tmp_path / "metrics.db") == (301, totals[COST], 150, 301, 301)


async def test_without_an_interpreter_to_start_the_calls_are_written_from_a_thread(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    monkeypatch.setattr(sys, "executable", str(tmp_path / "no-such-python"))
    exporter = await start(tmp_path)
    assert exporter.writer.process is None
    assert "writer process did not start" in caplog.text
    for i in range(50):
        exporter.record(call(i))
    totals = exporter.aggregator.grand_total()
    await exporter.close()
    assert stored(tmp_path / "metrics.db") == (50, totals[COST], 0, 50, 50)


async def test_with_the_process_turned_off_the_connection_thread_writes(tmp_path: Path) -> None:
    exporter = await start(tmp_path, writer_process=False)
    assert exporter.writer.process is None
    for i in range(50):
        exporter.record(call(i, f"t{i}"))
    await exporter.flush()
    totals = exporter.aggregator.grand_total()
    await exporter.close()
    assert stored(tmp_path / "metrics.db") == (50, totals[COST], 50, 50, 50)


async def test_a_page_limit_reaches_the_process(tmp_path: Path) -> None:
    """`limit_pages` (how tests fill the disk) applies to the process's connection too."""
    exporter = await start(tmp_path)
    await exporter.writer.limit_pages()
    for i in range(2_000):
        exporter.record(call(i))
    await exporter.flush()
    assert exporter.health().spill_backlog == 2_000
    await exporter.writer.limit_pages(1_073_741_823)
    await exporter.flush()
    assert exporter.health().spill_backlog == 0
    await exporter.close()
    assert stored(tmp_path / "metrics.db")[0] == 2_000
