"""The real server as a subprocess on a free 127.0.0.1 port, with its own SQLite file."""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import sqlite3
import subprocess
import sys
import time
from collections.abc import Iterator, Mapping
from pathlib import Path

import httpx
import pytest

#: How long a server may take to answer its first health check.
START_TIMEOUT_S = 20.0


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


class Server:
    """`cco-exporter serve` in a subprocess; `start()` waits until health answers."""

    def __init__(self, db: Path, env: Mapping[str, str] | None = None, port: int = 0) -> None:
        self.db = db
        self.port = port or free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.log = db.with_suffix(".log")
        self.env = {
            **os.environ,
            "CCO_EXPORTER_HEARTBEAT_INTERVAL": "0",
            # No config.toml of the machine leaks into the test.
            "XDG_CONFIG_HOME": str(db.parent / "config"),
            **(env or {}),
        }
        self.process: subprocess.Popen[bytes] | None = None

    def start(self) -> Server:
        command = [sys.executable, "-m", "exporter", "serve", "--host", "127.0.0.1"]
        command += ["--port", str(self.port), "--db", str(self.db)]
        with self.log.open("ab") as log:
            self.process = subprocess.Popen(
                command, stdout=log, stderr=subprocess.STDOUT, env=self.env
            )
        deadline = time.monotonic() + START_TIMEOUT_S
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError(f"server exited at start:\n{self.log.read_text()}")
            try:
                if httpx.get(f"{self.url}/api/metrics/health", timeout=1).status_code == 200:
                    return self
            except httpx.TransportError:
                time.sleep(0.1)
        self.kill()
        raise RuntimeError(f"server did not answer within {START_TIMEOUT_S}s:\n{self.logs()}")

    def client(self, token: str | None = None) -> httpx.Client:
        headers = {"Authorization": f"Bearer {token}"} if token else {}
        return httpx.Client(base_url=self.url, timeout=10, headers=headers)

    def stop(self, sig: int = signal.SIGTERM, timeout: float = 20.0) -> int:
        """Send `sig` and wait for the exit code."""
        assert self.process is not None
        if self.process.poll() is None:
            self.process.send_signal(sig)
        try:
            return self.process.wait(timeout)
        except subprocess.TimeoutExpired:
            self.kill()
            raise

    def kill(self) -> None:
        if self.process is not None and self.process.poll() is None:
            self.process.kill()
            self.process.wait(10)

    def logs(self) -> str:
        return self.log.read_text(errors="replace") if self.log.exists() else ""

    def query(self, sql: str, *args: object) -> list[tuple[object, ...]]:
        """Read the server's database directly (WAL lets us read beside the writer)."""
        conn = sqlite3.connect(self.db)
        try:
            return conn.execute(sql, args).fetchall()
        finally:
            conn.close()


@pytest.fixture
def server_factory(tmp_path: Path) -> Iterator[type[Server]]:
    """Start servers in the test's tmp dir; every one still running is stopped afterwards."""
    started: list[Server] = []

    class _Tracked(Server):
        def start(self) -> Server:
            started.append(self)
            return super().start()

    yield _Tracked
    for server in started:
        # A graceful stop, so the server writes its coverage data; kill only if it hangs.
        with contextlib.suppress(subprocess.TimeoutExpired):
            server.stop(timeout=15)


@pytest.fixture
def server(server_factory: type[Server], tmp_path: Path) -> Server:
    return server_factory(tmp_path / "metrics.db").start()
