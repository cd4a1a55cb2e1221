"""The writer's process: batches of calls committed to SQLite outside the event loop's process.

A thread of the server's own process would need Python's interpreter lock to pick up a batch
and again after every statement it runs, and a busy event loop hands that lock back only when it
is forced to; measured under load, a flush waited up to half a second to start, and both sides ran
slower for sharing the lock. This process has a lock of its own: the event loop encodes a batch
(msgpack, in C), writes it to a pipe and goes on recording while the batch is written.

The protocol is one request, one reply, in order: a 4-byte little-endian length, then msgpack.

- the process starts with `["ready", pid]`, or `["error", kind, message]` and exits;
- `["commit", token, calls, rollup, new_series, progress]` -> `["ok", repeated calls]`: one
  transaction, as `writer._commit_calls` (rollup as `[[minute, series id, sums...], ...]`); the
  token is recorded with the batch's id span in `config`, so that a process that dies after its
  COMMIT but before its reply is known to have committed (see `WriterProcess.commit_calls`);
- `["page_limit", pages]` -> `["ok", previous]`: `PRAGMA max_page_count` on its connection;
- an error -> `["error", kind, message]`, kind one of integrity, operational, database,
  internal; the transaction is rolled back and the process goes on.

End of input (the server closed the pipe) ends the process.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import logging
import os
import sqlite3
import sys
import uuid
from typing import Any, BinaryIO, Final

import aiosqlite
import msgspec

from exporter.aggregator import CallRow

if sys.platform != "win32":
    import fcntl
from exporter.store.db import CONNECTION_PRAGMAS

__all__ = ["WriterProcess", "WriterProcessError", "serve"]

log = logging.getLogger(__name__)

#: The config row holding the last committed batch's token and id span: `token:lo:hi`.
BATCH_MARK_KEY: Final = "writer_batch"
_HEADER: Final = 4
_ERRORS: Final[dict[str, type[Exception]]] = {
    "integrity": sqlite3.IntegrityError,
    "operational": sqlite3.OperationalError,
    "database": sqlite3.DatabaseError,
}


class WriterProcessError(OSError):
    """The writer's process could not be started, or ended before it answered."""


# -- the process ----------------------------------------------------------------------------------


class _SeriesLabels(dict[int, tuple[str, ...]]):
    """Label sets by series id, read from the database when first needed (sessions take their
    project from it); a new label set is inserted in the same transaction before its calls."""

    def __init__(self, db: sqlite3.Connection) -> None:
        super().__init__()
        self._db = db

    def __missing__(self, series_id: int) -> tuple[str, ...]:
        row = self._db.execute(
            "SELECT provider, model, tier, project, agent FROM series WHERE id = ?", (series_id,)
        ).fetchone()
        if row is None:
            raise sqlite3.IntegrityError(f"series {series_id} is not stored")
        self[series_id] = labels = tuple(row)
        return labels


def _read_frame(stream: BinaryIO) -> bytes | None:
    header = stream.read(_HEADER)
    if len(header) < _HEADER:
        return None
    size = int.from_bytes(header, "little")
    body = stream.read(size)
    if len(body) < size:
        return None
    return body


def _write_frame(stream: BinaryIO, body: bytes) -> None:
    stream.write(len(body).to_bytes(_HEADER, "little"))
    stream.write(body)
    stream.flush()


def _error_kind(exc: BaseException) -> str:
    if isinstance(exc, sqlite3.IntegrityError):
        return "integrity"
    if isinstance(exc, sqlite3.OperationalError):
        return "operational"
    if isinstance(exc, sqlite3.Error):
        return "database"
    return "internal"


def serve(db_path: str, stdin: BinaryIO, stdout: BinaryIO) -> int:
    """Answer requests until the input ends; returns the exit status."""
    from exporter.store import writer  # the SQL: imported here, as writer imports this module

    encode = msgspec.msgpack.Encoder().encode
    decode = msgspec.msgpack.Decoder().decode
    try:
        db = sqlite3.connect(db_path, isolation_level=None)
        for pragma in CONNECTION_PRAGMAS:
            db.execute(pragma)
        writer._prepare_connection(db)
    except sqlite3.Error as exc:
        _write_frame(stdout, encode(["error", _error_kind(exc), str(exc)]))
        return 1
    _write_frame(stdout, encode(["ready", os.getpid()]))
    labels = _SeriesLabels(db)
    while (body := _read_frame(stdin)) is not None:
        request = decode(body)
        try:
            if request[0] == "commit":
                _, token, calls, groups, new_series, progress = request
                rollup = None if groups is None else {(g[0], g[1]): g[2:] for g in groups}
                reply: Any = writer._commit_calls(
                    db, calls, labels, rollup, new_series, progress, token
                )
            elif request[0] == "page_limit":
                (previous,) = db.execute("PRAGMA max_page_count").fetchone()
                db.execute(f"PRAGMA max_page_count = {int(request[1])}")
                reply = previous
            else:
                raise ValueError(f"unknown request {request[0]!r}")
        except Exception as exc:
            _write_frame(stdout, encode(["error", _error_kind(exc), str(exc)]))
        else:
            _write_frame(stdout, encode(["ok", reply]))
    db.close()
    return 0


def main() -> int:  # pragma: no cover - runs in the child process
    logging.basicConfig(level=logging.WARNING, format="cco-exporter writer: %(message)s")
    if len(sys.argv) != 2:
        print("usage: writer_process DB_PATH (started by the exporter)", file=sys.stderr)
        return 2
    try:
        return serve(sys.argv[1], sys.stdin.buffer, sys.stdout.buffer)
    except BrokenPipeError:  # the server ended (or gave up on this process) first
        return 1


# -- the server's side ----------------------------------------------------------------------------


class WriterProcess:
    """The server's handle on the writer's process: started on first use, and again after it
    ended."""

    def __init__(self, db_path: str) -> None:
        self._db_path = db_path
        self._proc: asyncio.subprocess.Process | None = None
        self._encode = msgspec.msgpack.Encoder().encode
        self._decode = msgspec.msgpack.Decoder().decode
        self._run = uuid.uuid4().hex[:12]
        self._tokens = itertools.count(1)
        #: One request at a time: a reply answers the request before it.
        self._lock = asyncio.Lock()
        #: Times the process was started (1 on a healthy server).
        self.starts = 0

    @property
    def pid(self) -> int | None:
        proc = self._proc
        return None if proc is None or proc.returncode is not None else proc.pid

    async def start(self) -> None:
        """Start the process (if it is not running) and wait until it has opened the database."""
        if self.pid is not None:
            return
        proc = await asyncio.create_subprocess_exec(
            sys.executable,
            "-c",
            "import sys; from exporter.store.writer_process import main; sys.exit(main())",
            self._db_path,
            stdin=asyncio.subprocess.PIPE,
            stdout=asyncio.subprocess.PIPE,
        )
        self._proc = proc
        self.starts += 1
        _widen_pipe(proc.stdin)
        try:
            kind, *rest = await self._reply()
        except BaseException:
            await self._stop()
            raise
        if kind != "ready":
            await self._stop()
            raise _ERRORS.get(rest[0], WriterProcessError)(
                f"the writer process could not open {self._db_path}: {rest[1]}"
            )

    async def commit_calls(
        self,
        calls: list[CallRow],
        rollup: dict[tuple[int, int], list[int]] | None,
        new_series: bytes | None,
        progress: str | None,
        conn: aiosqlite.Connection,
    ) -> list[CallRow]:
        """Commit a batch of calls (see `writer._commit_calls`); returns the repeated ones.

        If the process ends before it answers, the server's own connection `conn` reads whether
        the batch was committed: when it was, its repeats are found from the rows it stored;
        when not, WriterProcessError (and the batch is spilled).
        """
        token = f"{self._run}-{next(self._tokens)}"
        groups = None if rollup is None else [[*key, *values] for key, values in rollup.items()]
        body = self._encode(("commit", token, calls, groups, new_series, progress))
        try:
            reply = await self._request(body)
        except WriterProcessError:
            span = await _committed_span(conn, token)
            if span is None:
                raise
            log.warning("the writer process ended after committing batch %s", token)
            return await _repeats_outside(conn, calls, *span)
        return [tuple(row) for row in reply]

    async def set_page_limit(self, pages: int) -> int:
        """`PRAGMA max_page_count` on the process's connection; returns the previous limit."""
        return int(await self._request(self._encode(("page_limit", pages))))

    async def close(self) -> None:
        """End the process: it sees the end of its input and exits."""
        proc = self._proc
        if proc is None:
            return
        if proc.stdin is not None and not proc.stdin.is_closing():
            proc.stdin.close()
        try:
            await asyncio.wait_for(proc.wait(), 10)
        except TimeoutError:  # pragma: no cover - a process stuck in SQLite
            await self._stop()
        self._proc = None

    async def _request(self, body: bytes) -> Any:
        async with self._lock:
            await self.start()
            return await self._exchange(body)

    async def _exchange(self, body: bytes) -> Any:
        proc = self._proc
        assert proc is not None
        assert proc.stdin is not None
        try:
            proc.stdin.write(len(body).to_bytes(_HEADER, "little"))
            proc.stdin.write(body)
            await proc.stdin.drain()
            kind, *rest = await self._reply()
        except (ConnectionError, WriterProcessError) as exc:
            await self._stop()
            raise WriterProcessError(f"the writer process ended: {exc}") from exc
        except BaseException:
            # Cancelled mid-request: its answer would be read as the next one's.
            await self._stop()
            raise
        if kind == "ok":
            return rest[0]
        raise _ERRORS.get(rest[0], RuntimeError)(rest[1])

    async def _reply(self) -> list[Any]:
        proc = self._proc
        assert proc is not None
        assert proc.stdout is not None
        try:
            header = await proc.stdout.readexactly(_HEADER)
            body = await proc.stdout.readexactly(int.from_bytes(header, "little"))
        except asyncio.IncompleteReadError as exc:
            code = await proc.wait()
            raise WriterProcessError(f"exit status {code}") from exc
        reply: list[Any] = self._decode(body)
        return reply

    async def _stop(self) -> None:
        proc, self._proc = self._proc, None
        if proc is None:
            return
        with contextlib.suppress(ProcessLookupError):
            proc.kill()
        await proc.wait()


def _widen_pipe(stream: asyncio.StreamWriter | None) -> None:
    """Let the pipe to the process hold 1 MiB (Linux; the default is 64 KiB): the event loop
    moves a batch into it once per turn, and a 100,000-call batch (~4 MB) took a hundred
    turns."""
    if sys.platform == "win32":  # pragma: no cover
        return
    setpipe = getattr(fcntl, "F_SETPIPE_SZ", None)
    pipe = None if stream is None else stream.get_extra_info("pipe")
    if setpipe is None or pipe is None:  # pragma: no cover - not Linux
        return
    with contextlib.suppress(OSError):  # a lower pipe-max-size keeps the default
        fcntl.fcntl(pipe.fileno(), setpipe, 1 << 20)


async def _committed_span(conn: aiosqlite.Connection, token: str) -> tuple[int, int] | None:
    """The id span of the batch `token`, if its transaction was committed."""
    async with conn.execute("SELECT value FROM config WHERE key = ?", (BATCH_MARK_KEY,)) as cur:
        row = await cur.fetchone()
    if row is None:
        return None
    stored_token, _, span = str(row[0]).partition(":")
    if stored_token != token:
        return None
    lo, _, hi = span.partition(":")
    return int(lo), int(hi)


async def _repeats_outside(
    conn: aiosqlite.Connection, calls: list[CallRow], lo: int, hi: int
) -> list[CallRow]:
    """The calls of a committed batch that were not stored with it: the repeats it refused
    (the first call carrying each stored request id was the one stored)."""
    async with conn.execute(
        "SELECT request_id FROM api_calls WHERE id BETWEEN ? AND ? AND request_id IS NOT NULL",
        (lo, hi),
    ) as cur:
        stored = {str(row[0]) for row in await cur.fetchall()}
    repeated: list[CallRow] = []
    seen: set[str] = set()
    for row in calls:
        request_id = row[13]
        if request_id is None:
            continue
        if request_id in stored and request_id not in seen:
            seen.add(request_id)
        else:
            repeated.append(row)
    return repeated
