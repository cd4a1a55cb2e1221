"""The JSON REST API: ingest (`POST /api/events`) and every `/api/metrics/*` read, plus pricing.

Handlers are thin: they validate the request, read the aggregator (or SQLite, for the activity
log and history) and build the answer with the pure builders of `shapes.py`.
"""

from __future__ import annotations

import asyncio
import datetime as dt
import hmac
import logging
import os
import re
import time
import zlib
from typing import Annotated, Any, Final, cast
from urllib.parse import parse_qsl

import msgspec
import psutil
from litestar import Request, Response, asgi, get, put
from litestar.connection import ASGIConnection
from litestar.exceptions import (
    ClientException,
    HTTPException,
    MethodNotAllowedException,
    NotAuthorizedException,
    NotFoundException,
    ValidationException,
)
from litestar.handlers.base import BaseRouteHandler
from litestar.openapi.spec import OpenAPI, PathItem, Schema
from litestar.params import Parameter
from litestar.types import HTTPResponseStartEvent, HTTPScope, Receive, Scope, Send

from exporter.budget import configured_budgets
from exporter.engine import Exporter
from exporter.events import ApiCall, Event, EventValidationError, decode_batch
from exporter.pricing import Price
from exporter.store.db import save_price
from exporter.store.queries import ACTIVITY_TYPES, ActivityQuery, activity, history
from exporter.views.shapes import (
    ActivityPage,
    BudgetResponse,
    CurrentRate,
    CurrentView,
    ErrorBody,
    Health,
    HistoryPoint,
    HistoryResponse,
    HistorySeries,
    IngestResult,
    MachineStats,
    ModelsResponse,
    PricingResponse,
    ProjectsResponse,
    RealtimeResponse,
    RecentCall,
    StatsResponse,
    TierDetail,
    activity_event,
    aggregated,
    budget_response,
    iso,
    model_metrics,
    project_metrics,
    project_summary,
    recent_call,
    tier_metrics,
    tier_models,
)
from exporter.windows import (
    CACHE_CREATION,
    CACHE_READ,
    CALLS,
    COST,
    ERRORS,
    LATENCY_COUNT,
    LATENCY_SUM,
    SAVINGS,
    TOKENS_IN,
    TOKENS_OUT,
)

__all__ = [
    "READ_HANDLERS",
    "WRITE_HANDLERS",
    "accept_events",
    "current_view",
    "document_ingest",
    "error_handlers",
    "token_guard",
]

log = logging.getLogger("exporter.rest")

#: How long a batch may wait for room in the write queue before the client is told to retry.
_ROOM_WAIT_S: Final = 5.0
_JSON_TYPES: Final = frozenset(
    (
        "application/json",
        "application/x-ndjson",
        "application/ndjson",
        "application/jsonl",
        "application/x-jsonlines",
        "application/jsonlines",
        "text/plain",
    )
)
_NDJSON_TYPES: Final = _JSON_TYPES - {"application/json", "text/plain"}
_STEPS: Final = {
    "1m": 60_000,
    "5m": 300_000,
    "15m": 900_000,
    "30m": 1_800_000,
    "1h": 3_600_000,
    "6h": 21_600_000,
    "12h": 43_200_000,
    "1d": 86_400_000,
}
_MAX_HISTORY_STEPS: Final = 10_000
_WINDOW_PATTERN: Final = "^(1m|5m|10m)$"
_TIER_PATTERN: Final = re.compile(r"^[A-Za-z0-9_.:@/+-]{1,200}$")


# -- auth and errors -----------------------------------------------------------------------------


async def token_guard(connection: ASGIConnection[Any, Any, Any, Any], _: BaseRouteHandler) -> None:
    """The bearer token; the app attaches this guard only to the routes that need it (async, so
    Litestar does not hand it to a thread)."""
    token: str = connection.app.state.settings.token
    scheme, _space, given = connection.headers.get("authorization", "").partition(" ")
    # compare_digest takes the same time wherever the first difference is.
    if scheme.lower() != "bearer" or not hmac.compare_digest(given.encode(), token.encode()):
        raise NotAuthorizedException(
            "a valid bearer token is required (Authorization header)",
            headers={"WWW-Authenticate": "Bearer"},
        )


def _http_error(request: Request[Any, Any, Any], exc: HTTPException) -> Response[ErrorBody]:
    errors: list[dict[str, Any]] | None = None
    if isinstance(exc.extra, list):
        errors = [e if isinstance(e, dict) else {"message": str(e)} for e in exc.extra]
    elif isinstance(exc.extra, dict):
        errors = [exc.extra]
    return Response(
        ErrorBody(exc.status_code, exc.detail, errors),
        status_code=exc.status_code,
        headers=exc.headers,
    )


def _internal_error(request: Request[Any, Any, Any], exc: Exception) -> Response[ErrorBody]:
    log.exception("unhandled error on %s %s", request.method, request.url.path)
    return Response(ErrorBody(500, "internal server error"), status_code=500)


def error_handlers() -> dict[type[Exception] | int, Any]:
    """Every error answers `{"status_code", "detail", "errors"?}` as JSON."""
    return {HTTPException: _http_error, Exception: _internal_error}


def _exporter(request: Request[Any, Any, Any]) -> Exporter:
    exporter: Exporter = request.app.state.exporter
    return exporter


# -- ingest --------------------------------------------------------------------------------------


@asgi("/api/events", is_mount=False)
async def ingest(scope: Scope, receive: Receive, send: Send) -> None:
    """`POST /api/events` as a plain ASGI handler: ingest is the hot path, and skipping
    Litestar's parameter parsing and response building takes a single-event POST from about
    6,400 to 10,000 requests/s (bench/bench_http.py). Errors still raise HTTPException, which
    the app's exception handlers turn into the usual JSON bodies. Its OpenAPI entry is added by
    `document_ingest`."""
    if cast("HTTPScope", scope)["method"] != "POST":
        raise MethodNotAllowedException(headers={"Allow": "POST"})
    exporter: Exporter = scope["litestar_app"].state.exporter
    limit = exporter.settings.body_limit
    media, encoding, length = "application/json", "identity", -1
    for name, value in scope["headers"]:
        if name == b"content-type":
            media = value.decode("latin-1").split(";", 1)[0].strip().lower()
        elif name == b"content-encoding":
            encoding = value.decode("latin-1").strip().lower()
        elif name == b"content-length" and value.isdigit():
            length = int(value)
    durable = _flag(scope["query_string"], b"durable")
    if media not in _JSON_TYPES:
        exporter.count_self("events_rejected", ("content_type",))
        raise HTTPException(
            status_code=415,
            detail=f"unsupported content type {media!r}: send application/json or "
            "application/x-ndjson",
        )
    if length > limit:
        exporter.count_self("events_rejected", ("too_large",))
        raise HTTPException(status_code=413, detail=f"the body exceeds {limit} bytes")
    body = await _read_body(receive, limit, exporter)
    if encoding == "gzip":
        body = _gunzip(body, limit, exporter)
    elif encoding not in ("", "identity"):
        exporter.count_self("events_rejected", ("content_encoding",))
        raise HTTPException(
            status_code=415, detail=f"unsupported content encoding {encoding!r}: use gzip"
        )
    result = await accept_events(exporter, body, ndjson=media in _NDJSON_TYPES, durable=durable)
    payload = msgspec.json.encode(result)
    start: HTTPResponseStartEvent = {
        "type": "http.response.start",
        "status": 201 if durable else 202,
        "headers": [
            (b"content-type", b"application/json"),
            (b"content-length", str(len(payload)).encode()),
        ],
    }
    await send(start)
    await send({"type": "http.response.body", "body": payload, "more_body": False})


async def accept_events(
    exporter: Exporter, body: bytes, *, ndjson: bool = False, durable: bool = False
) -> IngestResult:
    """Validate a whole body, then record every event, or none (422 names each bad item)."""
    try:
        events = decode_batch(body, single=False if ndjson else None)
    except EventValidationError as exc:
        exporter.count_self("events_rejected", ("invalid",), max(1, len(exc.errors)))
        raise HTTPException(
            status_code=422,
            detail=str(exc),
            extra=[msgspec.structs.asdict(e) for e in exc.errors],
        ) from None
    if len(events) > exporter.writer.max_queue:
        exporter.count_self("events_rejected", ("too_large",), len(events))
        raise HTTPException(
            status_code=413,
            detail=f"a batch may hold at most {exporter.writer.max_queue} events",
        )
    if not exporter.writer.has_room(len(events)):
        try:
            await asyncio.wait_for(exporter.wait_for_room(len(events)), _ROOM_WAIT_S)
        except TimeoutError:
            exporter.count_self("events_rejected", ("queue_full",), len(events))
            raise HTTPException(
                status_code=503,
                detail="the write queue is full; retry later",
                headers={"Retry-After": "1"},
            ) from None
    accepted = await exporter.record_batch(events)
    exporter.count_self("events_ingested", ("http",), accepted)
    if durable:
        await exporter.writer.barrier()
    return IngestResult(accepted=accepted, duplicates=len(events) - accepted, durable=durable)


async def _read_body(receive: Receive, limit: int, exporter: Exporter) -> bytes:
    """The request body, refused with 413 as soon as it grows past `limit` bytes."""
    chunks: list[bytes] = []
    size = 0
    while True:
        message = await receive()
        if message["type"] != "http.request":
            raise ClientException("the client went away before sending the whole body")
        chunk = message.get("body", b"")
        size += len(chunk)
        if size > limit:
            exporter.count_self("events_rejected", ("too_large",))
            raise HTTPException(status_code=413, detail=f"the body exceeds {limit} bytes")
        chunks.append(chunk)
        if not message.get("more_body", False):
            return chunks[0] if len(chunks) == 1 else b"".join(chunks)


def _flag(query: bytes, name: bytes) -> bool:
    """A boolean query parameter: true/1/yes or false/0/no (absent is false); else 400."""
    if not query:
        return False
    for key, value in parse_qsl(query.decode("latin-1"), keep_blank_values=True):
        if key.encode() == name:
            lowered = value.lower()
            if lowered in ("true", "1", "yes", "on", ""):
                return True
            if lowered in ("false", "0", "no", "off"):
                return False
            raise ValidationException(f"`{name.decode()}` must be true or false, got {value!r}")
    return False


def document_ingest(openapi: OpenAPI) -> None:
    """Add `POST /api/events` to the app's OpenAPI document (an ASGI handler has no entry of its
    own). The request and answer schemas come from the same msgspec Structs that decode and
    encode them, so the document cannot drift from the behaviour. Plain JSON-schema dicts are
    rendered as they are by Litestar's serialiser."""
    body_type = Event | list[Event]
    (body_schema, result_schema, error_schema), components = msgspec.json.schema_components(
        (body_type, IngestResult, ErrorBody), ref_template="#/components/schemas/{name}"
    )
    if openapi.components.schemas is None:
        openapi.components.schemas = {}
    openapi.components.schemas.update(cast("dict[str, Schema]", components))

    def answer(description: str, content: dict[str, Any]) -> dict[str, Any]:
        return {"description": description, "content": {"application/json": {"schema": content}}}

    if openapi.paths is None:
        openapi.paths = {}
    openapi.paths["/api/events"] = cast(
        "PathItem",
        {
            "post": {
                "summary": "Ingest events: one JSON object, a JSON array, or NDJSON",
                "description": "An atomic batch: any invalid item rejects the request (422, naming "
                "every bad item's index and field) and nothing is applied. A repeated `request_id` "
                "is counted once (reported in `duplicates`). Bodies may be gzip-encoded.",
                "operationId": "IngestEvents",
                "parameters": [
                    {
                        "name": "durable",
                        "in": "query",
                        "required": False,
                        "schema": {"type": "boolean", "default": False},
                        "description": "answer 201 only once the events are committed to SQLite",
                    }
                ],
                "requestBody": {
                    "required": True,
                    "content": {
                        "application/json": {"schema": body_schema},
                        "application/x-ndjson": {"schema": {"type": "string"}},
                    },
                },
                "responses": {
                    "201": answer("Committed (with `durable=true`)", result_schema),
                    "202": answer("Accepted: counted and queued for SQLite", result_schema),
                    **{
                        str(code): answer(text, error_schema)
                        for code, text in (
                            (400, "Corrupt gzip body or bad query parameter"),
                            (401, "Missing or wrong bearer token"),
                            (405, "Only POST"),
                            (413, "Body (or decompressed body, or batch) too large"),
                            (415, "Unsupported content type or encoding"),
                            (422, "Invalid events: `errors` lists each item's index and field"),
                            (503, "The write queue is full: retry after `Retry-After` seconds"),
                        )
                    },
                },
            }
        },
    )


def _gunzip(body: bytes, limit: int, exporter: Exporter) -> bytes:
    """Decompress a gzip body, refusing (413) before it grows past the body limit."""
    inflater = zlib.decompressobj(wbits=31)
    try:
        out = inflater.decompress(body, limit + 1)
    except zlib.error as exc:
        exporter.count_self("events_rejected", ("invalid",))
        raise HTTPException(status_code=400, detail=f"the gzip body is corrupt: {exc}") from None
    if len(out) > limit or inflater.unconsumed_tail:
        exporter.count_self("events_rejected", ("too_large",))
        raise HTTPException(status_code=413, detail=f"the decompressed body exceeds {limit} bytes")
    return out


# -- seed 001: windows, tiers, recent, health ---------------------------------------------------


@get("/api/metrics/stats", cache=True, summary="Sums over a window, by tier")
async def stats(
    request: Request[Any, Any, Any],
    window: Annotated[str, Parameter(pattern=_WINDOW_PATTERN, description="1m, 5m or 10m")] = "10m",
) -> StatsResponse:
    snapshot = _exporter(request).aggregator.window(window)
    tiers = [tier_metrics(t, row) for t, row in sorted(snapshot.by_tier.items())]
    return StatsResponse(summary=aggregated(snapshot), tiers=tiers)


@get("/api/metrics/realtime", cache=True, summary="Rates and the 1m window")
async def realtime(request: Request[Any, Any, Any]) -> RealtimeResponse:
    snapshot = _exporter(request).aggregator.window("1m")
    total = snapshot.total
    tokens = total[TOKENS_IN] + total[TOKENS_OUT] + total[CACHE_READ] + total[CACHE_CREATION]
    rate = CurrentRate(
        calls_per_second=total[CALLS] / snapshot.seconds,
        calls_per_minute=snapshot.calls_per_minute,
        cost_per_minute_usd=snapshot.cost_per_minute_usd,
        cost_per_hour_usd=snapshot.cost_per_minute_usd * 60.0,
        tokens_per_second=tokens / snapshot.seconds,
    )
    return RealtimeResponse(current_rate=rate, window_1m=aggregated(snapshot))


@get(
    "/api/metrics/tiers/{tier:str}",
    cache=True,
    summary="One tier over a window, with its models",
    raises=[NotFoundException],
)
async def tier_detail(
    request: Request[Any, Any, Any],
    tier: str,
    window: Annotated[str, Parameter(pattern=_WINDOW_PATTERN, description="1m, 5m or 10m")] = "10m",
) -> TierDetail:
    aggregator = _exporter(request).aggregator
    known = {price.tier for price in aggregator.pricing.prices()}
    known.update(key[2] for key in aggregator.series_keys.values())
    if tier not in known:
        shown = tier if _TIER_PATTERN.match(tier) else repr(tier[:60])
        raise NotFoundException(f"unknown tier {shown}; known tiers: {', '.join(sorted(known))}")
    snapshot = aggregator.window(window)
    row = snapshot.by_tier.get(tier, [0] * len(snapshot.total))
    return TierDetail(
        **msgspec.structs.asdict(tier_metrics(tier, row)),
        window=window,
        models=tier_models(aggregator, tier, snapshot.by_series),
    )


@get("/api/metrics/recent", summary="The latest calls, newest first")
async def recent(
    request: Request[Any, Any, Any],
    limit: Annotated[int, Parameter(ge=1, le=1000, description="1..1000")] = 20,
) -> list[RecentCall]:
    calls: list[RecentCall] = []
    for event in reversed(_exporter(request).aggregator.recent):
        if type(event) is ApiCall:
            calls.append(recent_call(event))
            if len(calls) == limit:
                break
    return calls


@get("/api/metrics/health", summary="Is the exporter well; is SQLite?")
async def health(request: Request[Any, Any, Any]) -> Health:
    exporter = _exporter(request)
    state = exporter.health()
    reachable = await _db_reachable(request)
    return Health(
        status="degraded" if state.degraded or not reachable else "ok",
        version=_version(),
        uptime_seconds=round(time.time() - exporter.started_at, 3),
        db_path=exporter.settings.db_path,
        db_reachable=reachable,
        queue_depth=state.queue_depth,
        queue_capacity=state.max_queue,
        last_flush=iso(None if state.last_flush_at is None else int(state.last_flush_at * 1000)),
        last_flush_seconds=state.last_flush_seconds,
        last_flush_events=state.last_flush_events,
        flushes=state.flushes,
        events_written=state.events_written,
        write_errors=state.write_errors,
        spill_backlog=state.spill_backlog,
        last_error=state.last_error,
        otlp_enabled=bool(getattr(request.app.state, "otlp_enabled", False)),
    )


async def _db_reachable(request: Request[Any, Any, Any]) -> bool:
    try:
        async with request.app.state.reader.execute("SELECT 1") as cursor:
            return await cursor.fetchone() is not None
    except Exception:  # any failure to read means "not reachable", which health reports
        return False


def _version() -> str:
    from exporter import __version__

    return __version__


# -- seed 003: current, projects, models, activity ----------------------------------------------


def current_view(exporter: Exporter, limit: int = 50) -> CurrentView:
    """`/current` and each stream message: the latest project, this machine, recent activity."""
    aggregator = exporter.aggregator
    last = aggregator.last_activity("project")
    recent_events = list(aggregator.recent)
    if recent_events:
        name = recent_events[-1].project
    elif last:
        name = max(last, key=lambda p: last[p])
    else:
        name = "default"
    summary = project_summary(
        aggregator, name, last.get(name), aggregator.window("5m"), aggregator.window("10m")
    )
    grand = aggregator.grand_total()
    activity_items = [activity_event(e) for e in reversed(recent_events[-limit:])]
    return CurrentView(
        project=summary, machine=_machine(exporter, grand, len(last)), activity=activity_items
    )


def _machine(exporter: Exporter, grand: list[int], active_projects: int) -> MachineStats:
    memory = psutil.virtual_memory()
    process = psutil.Process(os.getpid())
    return MachineStats(
        cpu=psutil.cpu_percent(interval=None),
        memory=round((memory.total - memory.available) / 2**20, 1),
        uptime=round(time.time() - psutil.boot_time(), 1),
        process_count=len(psutil.pids()),
        total_cost=grand[COST] / 1e9,
        active_projects=active_projects,
        total_calls=grand[CALLS],
        total_tokens=grand[TOKENS_IN]
        + grand[TOKENS_OUT]
        + grand[CACHE_READ]
        + grand[CACHE_CREATION],
        name=exporter.settings.machine or os.uname().nodename,
        exporter_uptime=round(time.time() - exporter.started_at, 1),
        exporter_memory=round(process.memory_info().rss / 2**20, 1),
    )


@get("/api/metrics/current", cache=True, summary="Project, machine, activity")
async def current(request: Request[Any, Any, Any]) -> CurrentView:
    return current_view(_exporter(request))


@get("/api/metrics/projects", cache=True, summary="Totals per project")
async def projects(request: Request[Any, Any, Any]) -> ProjectsResponse:
    aggregator = _exporter(request).aggregator
    last = aggregator.last_activity("project")
    rows = aggregator.breakdown("project")
    items = [project_metrics(name, row, last.get(name)) for name, row in rows.items()]
    items.sort(key=lambda p: (-p.cost, p.name))
    return ProjectsResponse(projects=items)


@get("/api/metrics/models", cache=True, summary="Totals per model")
async def models(request: Request[Any, Any, Any]) -> ModelsResponse:
    aggregator = _exporter(request).aggregator
    by_model: dict[tuple[str, str, str], list[int]] = {}
    for series_id, (provider, model, tier, _, _) in aggregator.series_keys.items():
        row = aggregator.totals[series_id]
        into = by_model.get((model, provider, tier))
        if into is None:
            by_model[(model, provider, tier)] = list(row)
        else:
            into[:] = [a + b for a, b in zip(into, row, strict=True)]
    items = [model_metrics(m, p, t, row) for (m, p, t), row in by_model.items()]
    items.sort(key=lambda m: (-m.cost, m.model))
    return ModelsResponse(models=items)


def _parse_time(value: str | None, name: str) -> int | None:
    """Epoch milliseconds, or an RFC 3339 / ISO 8601 time (UTC when it has no offset)."""
    if value is None or value == "":
        return None
    if value.isdigit():
        return int(value)
    try:
        moment = dt.datetime.fromisoformat(value.replace("Z", "+00:00"))
    except ValueError:
        raise ValidationException(
            f"`{name}` must be epoch milliseconds or an ISO 8601 time, got {value[:60]!r}"
        ) from None
    if moment.tzinfo is None:
        moment = moment.replace(tzinfo=dt.UTC)
    return int(moment.timestamp() * 1000)


@get(
    "/api/metrics/activity",
    summary="The stored activity log, newest first, filtered and paged",
)
async def activity_log(
    request: Request[Any, Any, Any],
    limit: Annotated[int, Parameter(ge=1, le=1000)] = 100,
    offset: Annotated[int, Parameter(ge=0, le=10_000_000)] = 0,
    event_type: Annotated[
        str | None, Parameter(query="type", description=f"one of {', '.join(ACTIVITY_TYPES)}")
    ] = None,
    project: Annotated[str | None, Parameter(max_length=200)] = None,
    from_: Annotated[str | None, Parameter(query="from", description="ms or ISO time")] = None,
    to: Annotated[str | None, Parameter(description="ms or ISO time")] = None,
) -> ActivityPage:
    if event_type is not None and event_type not in ACTIVITY_TYPES:
        raise ValidationException(
            f"`type` must be one of {', '.join(ACTIVITY_TYPES)}, got {event_type[:60]!r}"
        )
    query = ActivityQuery(
        limit=limit,
        offset=offset,
        type=event_type,
        project=project,
        from_ms=_parse_time(from_, "from"),
        to_ms=_parse_time(to, "to"),
    )
    events, total = await activity(request.app.state.reader, query)
    return ActivityPage(
        events=[activity_event(e) for e in events],
        total=total,
        has_more=offset + len(events) < total,
    )


@get(
    "/api/metrics/history",
    cache=True,
    summary="Time series from the per-minute rollups",
)
async def history_view(
    request: Request[Any, Any, Any],
    from_: Annotated[str | None, Parameter(query="from", description="default: 24 h ago")] = None,
    to: Annotated[str | None, Parameter(description="ms or ISO time; default: now")] = None,
    step: Annotated[str, Parameter(pattern="^(1m|5m|15m|30m|1h|6h|12h|1d)$")] = "1h",
    by: Annotated[str | None, Parameter(pattern="^(provider|model|tier|project|agent)$")] = None,
) -> HistoryResponse:
    now = int(time.time() * 1000)
    to_ms = _parse_time(to, "to") or now
    from_ms = _parse_time(from_, "from")
    if from_ms is None:
        from_ms = to_ms - 86_400_000
    step_ms = _STEPS[step]
    if from_ms > to_ms:
        raise ValidationException("`from` must not be after `to`")
    if (to_ms - from_ms) // step_ms > _MAX_HISTORY_STEPS:
        raise ValidationException(
            f"at most {_MAX_HISTORY_STEPS} steps per series: widen `step` or narrow the range"
        )
    rows = await history(
        request.app.state.reader,
        from_ms=from_ms - from_ms % step_ms,
        to_ms=to_ms,
        step_ms=step_ms,
        by=by,
    )
    series: dict[str, list[HistoryPoint]] = {}
    for row in rows:
        sums = row.sums
        count = sums[LATENCY_COUNT]
        series.setdefault(row.label, []).append(
            HistoryPoint(
                timestamp=iso(row.start_ms) or "",
                timestamp_ms=row.start_ms,
                calls=sums[CALLS],
                errors=sums[ERRORS],
                cost_usd=sums[COST] / 1e9,
                tokens_in=sums[TOKENS_IN],
                tokens_out=sums[TOKENS_OUT],
                cache_read_tokens=sums[CACHE_READ],
                cache_creation_tokens=sums[CACHE_CREATION],
                cache_savings_usd=sums[SAVINGS] / 1e9,
                avg_latency_ms=sums[LATENCY_SUM] / count / 1000.0 if count else 0.0,
            )
        )
    return HistoryResponse(
        from_=iso(from_ms) or "",
        to=iso(to_ms) or "",
        step=step,
        by=by,
        series=[HistorySeries(label, points) for label, points in series.items()],
    )


# -- budgets -------------------------------------------------------------------------------------


@get(
    "/api/metrics/budget",
    cache=True,
    summary="Spend in the current day and month against the budgets",
)
async def budget(request: Request[Any, Any, Any]) -> BudgetResponse:
    exporter = _exporter(request)
    return budget_response(
        exporter.aggregator.spend.snapshot(), configured_budgets(exporter.settings)
    )


# -- pricing -------------------------------------------------------------------------------------


@get("/api/pricing", summary="The price table, USD per million tokens")
async def pricing_list(request: Request[Any, Any, Any]) -> PricingResponse:
    prices = sorted(_exporter(request).aggregator.pricing.prices(), key=lambda p: p.model)
    return PricingResponse(models=prices)


@put(
    "/api/pricing/{model:str}",
    summary="Set one model's prices (admin); applies to calls recorded from now on",
    raises=[NotAuthorizedException, ValidationException],
)
async def pricing_set(request: Request[Any, Any, Any], model: str) -> Price:
    exporter = _exporter(request)
    try:
        # The body is a Price without `model` (it is in the path); provider and tier default to
        # what the table already says of this model, else to what its name says.
        given = msgspec.json.decode(await request.body(), type=dict[str, Any])
        unknown = set(given) - set(Price.__struct_fields__) | ({"model"} & set(given))
        if unknown:
            raise ValueError(f"unknown fields: {', '.join(sorted(unknown))}")
        if not 1 <= len(model) <= 200:
            raise ValueError("the model id must be 1..200 characters")
        provider, tier, _ = exporter.aggregator.pricing.classify(model)
        price = msgspec.convert(
            {"provider": provider, "tier": tier, **given, "model": model}, Price
        )
    except (msgspec.ValidationError, msgspec.DecodeError, ValueError) as exc:
        raise HTTPException(status_code=422, detail=f"invalid price: {exc}") from None
    await exporter.writer.run_exclusive(lambda conn: save_price(conn, price))
    exporter.aggregator.pricing.set(price)
    return price


READ_HANDLERS: Final = [
    stats,
    realtime,
    tier_detail,
    recent,
    health,
    current,
    projects,
    models,
    activity_log,
    history_view,
    budget,
    pricing_list,
]
WRITE_HANDLERS: Final = [ingest, pricing_set]
