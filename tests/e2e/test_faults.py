"""Faults on the real server process: SQLite refusing writes (a lock held elsewhere, a full disk),
kill -9 and SIGTERM under load, and an OTLP collector that is down, slow or failing.

Every wait is bounded; every server listens on 127.0.0.1 only. Measured figures (events lost to
kill -9, ingest latency and RSS beside a broken collector) are printed as one `figures:` line per
test (`pytest -rP` shows them); the tests assert behaviour, never timings.
"""

from __future__ import annotations

import os
import shutil
import signal
import sqlite3
import statistics
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import httpx
import psutil
import pytest
from prometheus_client.parser import text_string_to_metric_families

from tests.e2e.conftest import Server
from tests.otlp_receiver import Receiver

#: The longest any single wait in these tests may take.
WAIT_S = 15.0
#: How long the load runs before the server is killed or stopped.
LOAD_S = 3.0
#: The writer's flush interval in the crash tests (`CCO_EXPORTER_FLUSH_INTERVAL`).
FLUSH_INTERVAL_S = 1.0


def _calls(prefix: str, start: int, count: int) -> list[dict[str, object]]:
    """`count` API calls with unique request ids; input_tokens is derived from the id's number,
    so the sum over any set of stored ids can be recomputed."""
    return [
        {
            "model": "claude-sonnet-4-5",
            "input_tokens": _tokens(i),
            "output_tokens": 7,
            "project": "faults",
            "request_id": f"{prefix}-{i}",
        }
        for i in range(start, start + count)
    ]


def _tokens(number: int) -> int:
    return 100 + number % 997


def _expected_tokens(request_ids: set[str]) -> int:
    return sum(_tokens(int(rid.rsplit("-", 1)[1])) for rid in request_ids)


def _metric(client: httpx.Client, name: str, **labels: str) -> float:
    """The sum of every sample of `name` (a counter without its `_total`) matching `labels`."""
    total = 0.0
    for family in text_string_to_metric_families(client.get("/metrics").text):
        for sample in family.samples:
            if sample.name in (name, f"{name}_total") and all(
                sample.labels.get(k) == v for k, v in labels.items()
            ):
                total += sample.value
    return total


def _stored(server: Server) -> tuple[set[str], int, int]:
    """(request ids, api_calls rows, sum of input tokens) as committed in the database."""
    ids = {
        str(row[0])
        for row in server.query("SELECT request_id FROM api_calls WHERE request_id IS NOT NULL")
    }
    rows, tokens = server.query("SELECT count(*), coalesce(sum(input_tokens), 0) FROM api_calls")[0]
    assert isinstance(rows, int)
    assert isinstance(tokens, int)
    return ids, rows, tokens


def _assert_exactly_once(server: Server, accepted: set[str]) -> None:
    """Every accepted event is in SQLite, none twice, nothing else."""
    ids, rows, tokens = _stored(server)
    assert ids == accepted
    assert rows == len(accepted)  # every call carries an id, so no row is stored twice
    assert tokens == _expected_tokens(accepted)


def _figures(**figures: object) -> None:
    """One line of measured figures for the reliability notes (shown by `pytest -rP`)."""
    print("figures:", " ".join(f"{name}={value}" for name, value in figures.items()))


def _wait_for_health(
    client: httpx.Client, done: Callable[[dict[str, object]], bool], what: str
) -> dict[str, object]:
    deadline = time.monotonic() + WAIT_S
    while True:
        health: dict[str, object] = client.get("/api/metrics/health").json()
        if done(health):
            return health
        assert time.monotonic() < deadline, f"{what} not within {WAIT_S}s: {health}"
        time.sleep(0.1)


class _Load(threading.Thread):
    """Posts a batch of `size` calls every `period` seconds until halted or the server goes
    away; keeps the ids of every acknowledged batch (with the time of its answer) and of the
    batch left unanswered."""

    def __init__(self, url: str, prefix: str, *, durable: bool, size: int = 20) -> None:
        super().__init__(name=f"load-{prefix}", daemon=True)
        self.url = url
        self.prefix = prefix
        self.durable = durable
        self.size = size
        self.period = 0.05
        self.halt = threading.Event()
        self.acked: list[tuple[float, list[str]]] = []
        self.unanswered: list[list[str]] = []
        self.refused: list[str] = []

    def run(self) -> None:
        expected = 201 if self.durable else 202
        params = {"durable": "true"} if self.durable else {}
        sent = 0
        next_at = time.monotonic()
        with httpx.Client(base_url=self.url, timeout=WAIT_S) as client:
            while not self.halt.is_set():
                batch = _calls(self.prefix, sent, self.size)
                sent += self.size
                ids = [str(call["request_id"]) for call in batch]
                try:
                    answer = client.post("/api/events", json=batch, params=params)
                except httpx.TransportError:
                    self.unanswered.append(ids)
                    return
                if answer.status_code == expected:
                    self.acked.append((time.monotonic(), ids))
                else:
                    self.refused.append(f"{answer.status_code} {answer.text}")
                next_at += self.period
                self.halt.wait(max(0.0, next_at - time.monotonic()))

    def acked_ids(self) -> set[str]:
        return {rid for _, ids in self.acked for rid in ids}

    def stop(self) -> None:
        self.halt.set()
        self.join(WAIT_S)
        assert not self.is_alive(), f"{self.name} did not stop"


# -- 1. the database refuses writes -------------------------------------------------------------


def test_a_locked_database_spills_reports_degraded_and_replays_each_event_once(
    server_factory: type[Server], tmp_path: Path
) -> None:
    server = server_factory(tmp_path / "m.db", env={"CCO_EXPORTER_FLUSH_INTERVAL": "0.5"}).start()
    accepted: set[str] = set()
    sent = 0

    def post(client: httpx.Client, count: int = 200) -> None:
        nonlocal sent
        batch = _calls("lock", sent, count)
        sent += count
        answer = client.post("/api/events", json=batch)
        assert answer.status_code == 202, answer.text
        accepted.update(str(call["request_id"]) for call in batch)

    durable: list[tuple[str, float]] = []

    def post_durable() -> None:
        # Acknowledged once the events are fsync'd to the spill file: after the flush under way
        # and its own have each waited out the busy timeout.
        sent_at = time.monotonic()
        try:
            answer = httpx.post(
                f"{server.url}/api/events",
                json=_calls("sync", 0, 10),
                params={"durable": "1"},
                timeout=WAIT_S,
            )
            outcome = str(answer.status_code)
        except httpx.TransportError as exc:
            outcome = repr(exc)
        durable.append((outcome, time.monotonic() - sent_at))

    with server.client() as client:
        post(client)
        # Another process takes the write lock and keeps it past the writer's busy_timeout (5 s):
        # every flush meanwhile ends in "database is locked".
        holder = sqlite3.connect(server.db, isolation_level=None)
        holder.execute("BEGIN EXCLUSIVE")
        locked_at = time.monotonic()
        waiter = threading.Thread(target=post_durable)
        waiter.start()
        try:
            deadline = time.monotonic() + WAIT_S
            while True:
                post(client, 50)
                health = client.get("/api/metrics/health").json()
                if health["spill_backlog"]:
                    break
                assert time.monotonic() < deadline, f"nothing spilled within {WAIT_S}s: {health}"
                time.sleep(0.2)
            degraded_after = time.monotonic() - locked_at
            assert health["status"] == "degraded"
            assert health["write_errors"] >= 1
            assert "locked" in health["last_error"]
            assert server.db.with_name("m.db.spill.jsonl").exists()
            assert _metric(client, "cco_exporter_spill_backlog_events") > 0
            assert _metric(client, "cco_exporter_degraded") == 1
            for _ in range(3):  # ingest carries on while degraded
                post(client)
            waiter.join(WAIT_S)
            assert [outcome for outcome, _ in durable] == ["201"]
            accepted.update(f"sync-{i}" for i in range(10))
            spilled = _metric(client, "cco_exporter_spill_backlog_events")
        finally:
            holder.execute("ROLLBACK")
            holder.close()
            released_at = time.monotonic()
        health = _wait_for_health(
            client,
            lambda h: h["status"] == "ok" and h["spill_backlog"] == 0 and h["queue_depth"] == 0,
            "replay of the spill file",
        )
        recovered_after = time.monotonic() - released_at
        assert _metric(client, "cco_exporter_degraded") == 0
    _figures(
        degraded_after_s=round(degraded_after, 2),
        durable_ack_while_locked_s=round(durable[0][1], 2),
        spilled_events=int(spilled),
        recovered_after_s=round(recovered_after, 2),
        accepted=len(accepted),
    )
    _assert_exactly_once(server, accepted)
    assert not server.db.with_name("m.db.spill.jsonl").exists()
    assert server.stop() == 0


@pytest.fixture
def small_disk(tmp_path: Path) -> Iterator[Path]:
    """An 8 MB tmpfs mounted in tmp_path: needs root and a sandbox that permits mount."""
    if not sys.platform.startswith("linux") or os.geteuid() != 0 or not shutil.which("mount"):
        pytest.skip("a size-limited tmpfs needs Linux, root and the mount command")
    mount_point = tmp_path / "disk"
    mount_point.mkdir()
    mounted = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", "size=8m", "tmpfs", str(mount_point)],
        capture_output=True,
        text=True,
        timeout=10,
    )
    if mounted.returncode != 0:
        pytest.skip(f"mount -t tmpfs is not permitted here: {mounted.stderr.strip()}")
    try:
        yield mount_point
    finally:
        # Lazily if a process still holds a file there, so the test never leaves a mount behind.
        if subprocess.run(["umount", str(mount_point)], capture_output=True).returncode:
            subprocess.run(["umount", "-l", str(mount_point)], capture_output=True, timeout=10)


def _fill(path: Path) -> None:
    """Write zeros to `path` until the file system has no room left."""
    chunk = b"\0" * 65536
    with path.open("wb", buffering=0) as out:
        try:
            while True:
                out.write(chunk)
        except OSError:
            pass
        # The last pages may take a smaller write.
        try:
            while True:
                out.write(chunk[:512])
        except OSError:
            pass


def test_a_full_disk_keeps_events_queued_reports_degraded_and_writes_them_once_room_returns(
    server_factory: type[Server], tmp_path: Path, small_disk: Path
) -> None:
    server = server_factory(small_disk / "m.db", env={"CCO_EXPORTER_FLUSH_INTERVAL": "0.5"})
    server.log = tmp_path / "m.log"  # the log must not need the full disk
    server.start()
    accepted: set[str] = set()
    sent = 0

    def post(client: httpx.Client, count: int = 500) -> None:
        nonlocal sent
        batch = _calls("full", sent, count)
        sent += count
        answer = client.post("/api/events", json=batch)
        assert answer.status_code == 202, answer.text
        accepted.update(str(call["request_id"]) for call in batch)

    spill = server.db.with_name("m.db.spill.jsonl")
    try:
        with server.client() as client:
            post(client)
            filler = small_disk / "filler"
            _fill(filler)
            deadline = time.monotonic() + WAIT_S
            while True:
                post(client)
                health = client.get("/api/metrics/health").json()
                if health["write_errors"] >= 2:
                    break
                assert time.monotonic() < deadline, f"no write failed within {WAIT_S}s: {health}"
                time.sleep(0.2)
            for _ in range(3):
                post(client)
            # The spill file lives on the same full disk: the events stay queued in memory.
            health = client.get("/api/metrics/health").json()
            assert health["status"] == "degraded"
            assert health["spill_backlog"] == 0
            assert health["queue_depth"] > 0
            assert health["last_error"] is not None
            assert "full" in health["last_error"] or "No space" in health["last_error"]
            assert _metric(client, "cco_exporter_degraded") == 1
            assert _metric(client, "cco_exporter_db_queue_depth") > 0

            filler.unlink()
            freed_at = time.monotonic()
            _wait_for_health(
                client,
                lambda h: h["status"] == "ok" and h["queue_depth"] == 0,
                "the write of the queued events",
            )
            _figures(
                held_in_memory=health["queue_depth"],
                write_errors=health["write_errors"],
                recovered_after_s=round(time.monotonic() - freed_at, 2),
                accepted=len(accepted),
            )
        _assert_exactly_once(server, accepted)
        # A spill file the full disk cut short must not stay behind to be replayed later.
        assert not spill.exists()
    finally:
        server.stop()


# -- 2. and 3. the process ends under load ----------------------------------------------------


def test_kill_9_under_load_keeps_every_durable_event_and_loses_at_most_a_flush_interval(
    server_factory: type[Server], tmp_path: Path
) -> None:
    env = {"CCO_EXPORTER_FLUSH_INTERVAL": str(FLUSH_INTERVAL_S)}
    server = server_factory(tmp_path / "m.db", env=env).start()
    durable = _Load(server.url, "durable", durable=True)
    queued = _Load(server.url, "queued", durable=False)
    durable.start()
    queued.start()
    time.sleep(LOAD_S)
    assert server.process is not None
    server.process.send_signal(signal.SIGKILL)
    killed_at = time.monotonic()
    assert server.process.wait(WAIT_S) == -signal.SIGKILL
    durable.stop()
    queued.stop()
    assert durable.refused == queued.refused == []

    server = server_factory(tmp_path / "m.db", env=env, port=server.port).start()
    ids, rows, _ = _stored(server)
    durable_acked = durable.acked_ids()
    queued_acked = queued.acked_ids()
    assert durable_acked <= ids
    assert rows == len(ids)
    lost = queued_acked - ids
    # What was lost waited for the next flush: it was all acknowledged in the last interval
    # (the slack covers a flush that had started but not committed when the kill came).
    acked_at = {rid: at for at, batch in queued.acked for rid in batch}
    assert all(killed_at - acked_at[rid] < FLUSH_INTERVAL_S + 1.0 for rid in lost)
    _figures(
        flush_interval_s=FLUSH_INTERVAL_S,
        durable_acked=len(durable_acked),
        queued_acked=len(queued_acked),
        queued_rate_per_s=round(len(queued_acked) / LOAD_S),
        queued_lost=len(lost),
        unanswered_but_stored=len(ids - durable_acked - queued_acked),
    )

    # A client retries what was never answered: each event still counts once.
    with server.client() as client:
        for batch in durable.unanswered:
            answer = client.post("/api/events", json=_calls_for(batch), params={"durable": "true"})
            assert answer.status_code == 201, answer.text
            assert answer.json()["accepted"] + answer.json()["duplicates"] == len(batch)
        resent = {rid for batch in durable.unanswered for rid in batch}
        assert _metric(client, "cco_llm_requests") == len(ids | resent)
    _assert_exactly_once(server, ids | resent)
    assert server.stop() == 0


def _calls_for(request_ids: list[str]) -> list[dict[str, object]]:
    """The calls a `_Load` sent with these ids, rebuilt from them."""
    calls: list[dict[str, object]] = []
    for rid in request_ids:
        prefix, number = rid.rsplit("-", 1)
        calls += _calls(prefix, int(number), 1)
    return calls


def test_sigterm_under_load_commits_every_accepted_event_once(
    server_factory: type[Server], tmp_path: Path
) -> None:
    server = server_factory(tmp_path / "m.db").start()
    load = _Load(server.url, "term", durable=False)
    load.start()
    time.sleep(LOAD_S)
    stopping = time.monotonic()
    assert server.stop(signal.SIGTERM) == 0
    shutdown_s = round(time.monotonic() - stopping, 3)
    load.stop()
    assert load.refused == []
    accepted = load.acked_ids()
    assert len(accepted) > 0

    server = server_factory(tmp_path / "m.db", port=server.port).start()
    ids, _, _ = _stored(server)
    # A batch cut off by the stop may or may not have been taken; everything answered 202 was.
    unanswered = {rid for batch in load.unanswered for rid in batch}
    assert accepted <= ids <= accepted | unanswered
    _assert_exactly_once(server, ids)
    with server.client() as client:
        assert _metric(client, "cco_llm_requests") == len(ids)
    _figures(
        accepted=len(accepted), unanswered_but_stored=len(ids - accepted), shutdown_s=shutdown_s
    )
    assert server.stop() == 0


# -- 4. the OTLP collector is down, slow or failing -------------------------------------------

INGEST_REQUESTS = 400
#: Export outcomes to wait for after the requests, at one export a second.
EXPORTS = 3


@pytest.mark.parametrize("collector", ["healthy", "down", "slow", "500"])
def test_a_broken_otlp_collector_does_not_hold_up_ingest_or_grow_memory(
    server_factory: type[Server],
    tmp_path: Path,
    collector: str,
) -> None:
    receiver = Receiver()
    try:
        if collector == "down":
            receiver.stop()  # nothing listens on its port any more: connection refused
        elif collector == "slow":
            receiver.mode, receiver.delay = "slow", 5.0  # answers long after the 1 s timeout
        elif collector == "500":
            receiver.mode = "500"
        env = {
            "CCO_EXPORTER_OTLP_ENDPOINT": receiver.base,
            "CCO_EXPORTER_OTLP_INTERVAL": "1",
            "CCO_EXPORTER_OTLP_TIMEOUT": "1",
        }
        server = server_factory(tmp_path / "m.db", env=env).start()
        assert server.process is not None
        process = psutil.Process(server.process.pid)
        latencies: list[float] = []
        with server.client() as client:
            for i in range(50):  # warm up: first requests pay for imports and caches
                assert client.post("/api/events", json=_calls("warm", i, 1)).status_code == 202
            rss_before = process.memory_info().rss
            for i in range(INGEST_REQUESTS):
                body = _calls("otlp", i, 1)[0]
                sent = time.perf_counter()
                answer = client.post("/api/events", json=body)
                latencies.append(time.perf_counter() - sent)
                assert answer.status_code == 202, answer.text
                # Spread the requests over several export intervals.
                time.sleep(0.01)
            # A failing export takes the timeout, then waits the interval: one each 2 s.
            deadline = time.monotonic() + WAIT_S
            while True:
                successes = _metric(client, "cco_exporter_otlp_exports", result="success")
                failures = _metric(client, "cco_exporter_otlp_exports", result="failure")
                if successes + failures >= EXPORTS:
                    break
                assert time.monotonic() < deadline, f"not {EXPORTS} exports within {WAIT_S}s"
                time.sleep(0.2)
            rss_after = process.memory_info().rss
            health = client.get("/api/metrics/health").json()
        assert server.stop() == 0
    finally:
        receiver.stop()
    assert health["status"] == "ok"
    # Each failure counted is one the log explains (the last export, at the stop, may add one).
    assert server.logs().count("failed after") >= failures
    if collector == "healthy":
        assert failures == 0
    else:
        assert successes == 0
    assert rss_after - rss_before < 30 * 1024 * 1024
    assert "Traceback" not in server.logs()
    quantiles = statistics.quantiles(latencies, n=100)
    _figures(
        collector=collector,
        p50_ms=round(quantiles[49] * 1000, 2),
        p99_ms=round(quantiles[98] * 1000, 2),
        max_ms=round(max(latencies) * 1000, 2),
        rss_growth_kb=(rss_after - rss_before) // 1024,
        exports_ok=int(successes),
        exports_failed=int(failures),
    )
