"""`GET /api/stream`: Server-Sent Events, one `{project, machine, activity}` message a second."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from typing import Any

import msgspec
from litestar import Request, get
from litestar.response import ServerSentEvent

from exporter.engine import Exporter
from exporter.views.rest import current_view

__all__ = ["stream"]

#: Seconds between messages; the dashboards poll at the same rate.
INTERVAL = 1.0


async def messages(exporter: Exporter, stopping: asyncio.Event) -> AsyncIterator[str]:
    """The stream's messages until the server shuts down (or the client goes away)."""
    while not stopping.is_set():
        yield msgspec.json.encode(current_view(exporter)).decode()
        try:
            await asyncio.wait_for(stopping.wait(), INTERVAL)
        except TimeoutError:
            continue


@get(
    "/api/stream",
    summary="Server-Sent Events: the /current view once a second",
    media_type="text/event-stream",
)
async def stream(request: Request[Any, Any, Any]) -> ServerSentEvent:
    state = request.app.state
    return ServerSentEvent(messages(state.exporter, state.stopping), event_type="metrics")
