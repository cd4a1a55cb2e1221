"""The Litestar app: wires the routes to one Exporter and runs its lifespan tasks."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import signal
import sys
import time
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

import aiosqlite
from litestar import Litestar, Request, Response, Router, get
from litestar.config.cors import CORSConfig
from litestar.config.response_cache import ResponseCacheConfig
from litestar.openapi.config import OpenAPIConfig

from exporter import __version__
from exporter.engine import Exporter
from exporter.logs import heartbeat_line
from exporter.maintenance import Maintenance
from exporter.settings import Settings
from exporter.views.labels import LabelBounds
from exporter.views.otlp import OtlpPusher, otlp_config, redact_endpoint
from exporter.views.prometheus import metrics_registry, render
from exporter.views.rest import (
    READ_HANDLERS,
    WRITE_HANDLERS,
    document_api,
    error_handlers,
    token_guard,
)
from exporter.views.sse import stream

__all__ = ["create_app", "serve"]

log = logging.getLogger("exporter.app")


def create_app(settings: Settings, *, clock: Callable[[], float] = time.time) -> Litestar:
    """The app for `settings`; the engine starts with the app's lifespan and closes with it."""

    @contextlib.asynccontextmanager
    async def lifespan(app: Litestar) -> AsyncIterator[None]:
        exporter = await Exporter.start(settings, clock=clock)
        reader = await _open_reader(settings.db_path)
        # One set of label bounds for /metrics and OTLP, so both fold the same values.
        bounds = LabelBounds.from_settings(
            settings, on_overflow=lambda label: exporter.count_self("label_overflow", (label,))
        )
        app.state.exporter = exporter
        app.state.reader = reader
        app.state.registry = metrics_registry(exporter, bounds)
        app.state.stopping = asyncio.Event()
        otlp = otlp_config(settings)
        app.state.otlp_enabled = otlp is not None
        pusher = OtlpPusher(exporter, otlp, bounds) if otlp is not None else None
        heartbeat = asyncio.create_task(_heartbeat(exporter), name="cco-exporter-heartbeat")
        maintenance = Maintenance(exporter, clock=clock) if settings.maintenance else None
        if maintenance is not None:
            maintenance.start()
        log.info(
            "cco-exporter serving on http://%s:%s, database %s, OTLP %s",
            settings.host,
            settings.port,
            settings.db_path,
            "off"
            if otlp is None
            else f"to {redact_endpoint(otlp.endpoint)} every {otlp.interval_s:g}s",
        )
        try:
            if pusher is not None:
                pusher.start()
            yield
        finally:
            app.state.stopping.set()
            heartbeat.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await heartbeat
            # Before the engine: a maintenance step may be using the writer's connection.
            if maintenance is not None:
                await maintenance.close()
            await reader.close()
            # The engine first, so the final OTLP export carries every accepted event.
            await exporter.close()
            if pusher is not None:
                await pusher.close()
            held = exporter.health().queue_depth
            if held:
                log.error("cco-exporter stopped with %d accepted events not written", held)
            else:
                log.info("cco-exporter stopped; every accepted event is committed")

    token = settings.token
    cors = CORSConfig(allow_origins=settings.cors_origins) if settings.cors_origins else None
    app = Litestar(
        route_handlers=[
            # Guards only where a token applies: an unguarded route skips Litestar's guard
            # machinery (a copy of the handler per guard call) on the hot ingest path.
            Router("/", route_handlers=WRITE_HANDLERS, guards=[token_guard] if token else []),
            Router(
                "/",
                route_handlers=[*READ_HANDLERS, stream, metrics],
                guards=[token_guard] if token and settings.auth_reads else [],
            ),
        ],
        lifespan=[lifespan],
        exception_handlers=error_handlers(),
        request_max_body_size=settings.body_limit,
        cors_config=cors,
        # The heavy reads keep their answer `cache_ttl` seconds (dashboards poll every second).
        response_cache_config=ResponseCacheConfig(
            default_expiration=max(1, settings.cache_ttl),
            cache_response_filter=lambda _, status: settings.cache_ttl > 0 and status < 300,
        ),
        openapi_config=OpenAPIConfig(title="cco-exporter", version=__version__, path="/schema"),
        logging_config=None,
    )
    app.state.settings = settings
    document_api(app.openapi_schema, reads_need_token=bool(token and settings.auth_reads))
    return app


@get("/metrics", summary="Prometheus exposition (OpenMetrics on request)", media_type="text/plain")
async def metrics(request: Request[Any, Any, Any]) -> Response[bytes]:
    body, content_type = render(request.app.state.registry, request.headers.get("accept"))
    # As a header, not as `media_type`: Litestar would add a second `charset` to text/plain.
    return Response(body, headers={"content-type": content_type})


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
        log.info("%s", heartbeat_line(exporter))


def serve(settings: Settings) -> None:
    """Run the app under uvicorn until SIGTERM or SIGINT, then drain and commit everything."""
    import uvicorn

    # Process-wide, so only here, in the server's own process (not in the library's start()).
    # Batched HTTP ingest, committed: 69-71k events/s at CPython's 5 ms, 88-94k at 0.5 ms.
    sys.setswitchinterval(settings.switch_interval)

    config = uvicorn.Config(
        create_app(settings),
        host=settings.host,
        port=settings.port,
        log_config=None,
        access_log=False,
        lifespan="on",
        timeout_graceful_shutdown=5,
    )
    # uvicorn shuts down gracefully on SIGTERM/SIGINT, then re-raises the signal to the handler
    # that was installed before it started. A no-op handler there makes a graceful stop exit 0
    # (systemd and container runtimes read anything else as a failure) instead of dying by it.
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, _stopped)
    uvicorn.Server(config).run()


def _stopped(signum: int, frame: object) -> None:
    """Called once uvicorn has finished its graceful shutdown: nothing left to do."""
