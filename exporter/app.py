"""The Litestar app: wires the routes to one Exporter and runs its lifespan tasks."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import AsyncIterator, Callable
from pathlib import Path

import aiosqlite
from litestar import Litestar, Request, Response, get
from litestar.config.cors import CORSConfig
from litestar.openapi.config import OpenAPIConfig

from exporter.engine import Exporter
from exporter.settings import Settings
from exporter.views.rest import READ_HANDLERS, WRITE_HANDLERS, error_handlers, read_guard
from exporter.views.sse import stream

__all__ = ["create_app", "serve"]

log = logging.getLogger("exporter.app")


def create_app(settings: Settings, *, clock: Callable[[], float] = time.time) -> Litestar:
    """The app for `settings`; the engine starts with the app's lifespan and closes with it."""

    @contextlib.asynccontextmanager
    async def lifespan(app: Litestar) -> AsyncIterator[None]:
        exporter = await Exporter.start(settings, clock=clock)
        reader = await _open_reader(settings.db_path)
        app.state.exporter = exporter
        app.state.reader = reader
        app.state.stopping = asyncio.Event()
        heartbeat = asyncio.create_task(_heartbeat(exporter), name="cco-exporter-heartbeat")
        log.info(
            "cco-exporter serving on %s:%s, database %s",
            settings.host,
            settings.port,
            settings.db_path,
        )
        try:
            yield
        finally:
            app.state.stopping.set()
            heartbeat.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await heartbeat
            await reader.close()
            await exporter.close()
            log.info("cco-exporter stopped; every accepted event is committed")

    cors = CORSConfig(allow_origins=settings.cors_origins) if settings.cors_origins else None
    app = Litestar(
        route_handlers=[*READ_HANDLERS, *WRITE_HANDLERS, stream, metrics],
        lifespan=[lifespan],
        exception_handlers=error_handlers(),
        request_max_body_size=settings.body_limit,
        cors_config=cors,
        openapi_config=OpenAPIConfig(title="cco-exporter", version=_version(), path="/schema"),
        logging_config=None,
    )
    app.state.settings = settings
    return app


@get("/metrics", guards=[read_guard], include_in_schema=False)
async def metrics(request: Request) -> Response[bytes]:  # type: ignore[type-arg]
    """Prometheus exposition (filled in by the Prometheus view)."""
    return Response(b"", media_type="text/plain")


async def _open_reader(path: str) -> aiosqlite.Connection:
    """A second connection for reads (activity, history): WAL lets it read beside the writer."""
    conn = await aiosqlite.connect(f"file:{Path(path).as_posix()}?mode=ro", uri=True)
    await conn.execute("PRAGMA busy_timeout = 5000")
    return conn


async def _heartbeat(exporter: Exporter) -> None:
    interval = exporter.settings.heartbeat_interval
    if interval <= 0:
        return
    while True:
        await asyncio.sleep(interval)
        snapshot = exporter.aggregator.window("1m")
        health = exporter.health()
        log.info(
            "heartbeat: 1m calls=%d cost=$%.4f p95=%sms queue=%d spill=%d%s",
            snapshot.calls,
            snapshot.cost_usd,
            "-" if snapshot.p95_ms is None else f"{snapshot.p95_ms:.0f}",
            health.queue_depth,
            health.spill_backlog,
            " DEGRADED" if health.degraded else "",
        )


def _version() -> str:
    from exporter import __version__

    return __version__


def serve(settings: Settings) -> None:
    """Run the app under uvicorn until SIGTERM or SIGINT, then drain and commit everything."""
    import uvicorn

    config = uvicorn.Config(
        create_app(settings),
        host=settings.host,
        port=settings.port,
        log_config=None,
        access_log=False,
        lifespan="on",
        timeout_graceful_shutdown=5,
    )
    uvicorn.Server(config).run()
