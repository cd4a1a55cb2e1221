"""Maintenance of the real server's database, and `db backup` while that server writes."""

from __future__ import annotations

import contextlib
import datetime as dt
import json
import sqlite3
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

import httpx

from tests.e2e.conftest import Server

DAY_MS = 86_400_000
#: Bounded waits: the first maintenance pass, the backup command, the load thread.
WAIT_S = 20.0


def calls(ts_ms: int, count: int, prefix: str) -> list[dict[str, Any]]:
    return [
        {
            "type": "api_call",
            "timestamp": ts_ms + i,
            "model": "claude-sonnet-4-5",
            "project": "alpha",
            "input_tokens": 1000,
            "output_tokens": 100,
            "request_id": f"{prefix}-{i}",
        }
        for i in range(count)
    ]


def wait_for(condition: Any, what: str, timeout: float = WAIT_S) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout} s waiting for {what}")
        time.sleep(0.05)


def utc_month(ms: int) -> str:
    return dt.datetime.fromtimestamp(ms / 1000, dt.UTC).strftime("%Y-%m")


def test_the_server_purges_old_calls_archives_past_months_and_history_still_answers(
    server_factory: type[Server], tmp_path: Path
) -> None:
    db = tmp_path / "m.db"
    now = int(time.time() * 1000)
    old = {"d40": now - 40 * DAY_MS, "d35": now - 35 * DAY_MS, "d1": now - DAY_MS}
    first = server_factory(db, env={"CCO_EXPORTER_MAINTENANCE": "false"}).start()
    with first.client() as client:
        for prefix, ts in old.items():
            answer = client.post("/api/events?durable=true", json=calls(ts, 10, prefix))
            assert answer.status_code == 201, answer.text
    assert first.stop() == 0

    env = {"CCO_EXPORTER_MAINTENANCE_DELAY": "0", "CCO_EXPORTER_BUDGET_TIMEZONE": "UTC"}
    server = server_factory(db, env=env).start()

    def stamped() -> bool:
        rows = server.query("SELECT count(*) FROM config WHERE key LIKE 'maintenance.%'")
        return rows == [(4,)]

    wait_for(stamped, "the first maintenance pass")
    # Raw calls older than 30 days are gone; the rollups of their days are not.
    assert server.query("SELECT count(*), min(timestamp) FROM api_calls") == [(10, old["d1"])]
    with server.client() as client:
        answer = client.get(
            "/api/metrics/history",
            params={"from": str(now - 41 * DAY_MS), "to": str(now), "step": "1d"},
        )
    assert answer.status_code == 200, answer.text
    (series,) = answer.json()["series"]
    by_day = {point["timestamp_ms"] // DAY_MS: point["calls"] for point in series["points"]}
    assert by_day == {ts // DAY_MS: 10 for ts in old.values()}

    # The months of the purged calls are over: each is archived beside the database.
    archive = db.parent / "archive"
    expected: dict[str, int] = {}
    for ts in (old["d40"], old["d35"]):
        expected[utc_month(ts)] = expected.get(utc_month(ts), 0) + 10
    for month, count in expected.items():
        summary = json.loads((archive / f"{month}.json").read_text())
        assert summary["total"]["calls"] == count
        assert summary["by_project"][0]["project"] == "alpha"
        assert summary["timezone"] == "UTC"
    assert "maintenance: purge" in server.logs()


class DurableLoad(threading.Thread):
    """Posts batches of 100 calls with ?durable=true until stopped (at least `minimum`),
    recording the request ids of each batch once the server said it is committed."""

    def __init__(self, url: str, minimum: int = 50) -> None:
        super().__init__(daemon=True)
        self.url = url
        self.minimum = minimum
        self.acknowledged: list[str] = []
        self.batches = 0
        self.error: BaseException | None = None
        self._halt = threading.Event()
        self._lock = threading.Lock()

    def committed(self) -> list[str]:
        with self._lock:
            return list(self.acknowledged)

    def stop(self) -> None:
        self._halt.set()

    def run(self) -> None:
        try:
            with httpx.Client(base_url=self.url, timeout=30) as client:
                while self.batches < self.minimum or not self._halt.is_set():
                    batch = calls(int(time.time() * 1000), 100, f"b{self.batches}")
                    answer = client.post("/api/events?durable=true", json=batch)
                    assert answer.status_code == 201, answer.text
                    with self._lock:
                        self.acknowledged += [event["request_id"] for event in batch]
                    self.batches += 1
        except BaseException as exc:  # reported by the test, not lost in the thread
            self.error = exc


def test_db_backup_while_the_server_writes_has_every_event_committed_before_it(
    server_factory: type[Server], tmp_path: Path
) -> None:
    server = server_factory(tmp_path / "m.db").start()
    dest = tmp_path / "backup" / "copy.db"
    load = DurableLoad(server.url)
    load.start()
    try:
        wait_for(lambda: load.batches >= 10 or load.error is not None, "10 committed batches")
        committed_before = load.committed()
        batches_before = load.batches
        backup = subprocess.run(
            [sys.executable, "-m", "exporter", "--db", str(server.db), "db", "backup", str(dest)],
            capture_output=True,
            text=True,
            timeout=WAIT_S,
            env=server.env,
            check=False,
        )
        batches_during = load.batches - batches_before
    finally:
        load.stop()
        load.join(WAIT_S)
    assert load.error is None, load.error
    assert backup.returncode == 0, backup.stderr
    # The server kept committing while the backup ran: the copy was made under load.
    assert batches_during > 0
    assert load.batches >= 50

    with contextlib.closing(sqlite3.connect(f"file:{dest}?mode=ro", uri=True)) as copy:
        assert copy.execute("PRAGMA integrity_check").fetchall() == [("ok",)]
        assert copy.execute("PRAGMA journal_mode").fetchone() == ("delete",)
        stored = {
            row[0]
            for row in copy.execute("SELECT request_id FROM api_calls WHERE request_id IS NOT NULL")
        }
        (rollup_calls,) = copy.execute("SELECT coalesce(sum(calls), 0) FROM series").fetchone()
        (rows,) = copy.execute("SELECT count(*) FROM api_calls").fetchone()
    assert len(committed_before) >= 1000
    assert set(committed_before) <= stored
    # One consistent snapshot: every stored call is counted in the totals, and no more.
    assert rollup_calls == rows == len(stored)
    assert not (dest.parent / f"{dest.name}-wal").exists()
