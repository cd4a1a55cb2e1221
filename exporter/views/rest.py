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
from litestar.openapi.spec import (
    OpenAPI,
    OpenAPIMediaType,
    OpenAPIResponse,
    Operation,
    PathItem,
    Reference,
    RequestBody,
    Schema,
)
from litestar.openapi.spec import Parameter as OpenAPIParameter
from litestar.params import Parameter
from litestar.types import HTTPResponseStartEvent, HTTPScope, Receive, Scope, Send

from exporter import __version__
from exporter.budget import configured_budgets
from exporter.engine import Exporter
from exporter.events import (
    LABEL_PATTERN,
    MAX_COST_USD,
    ApiCall,
    Event,
    EventValidationError,
    ItemError,
    decode_batch,
)
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
    "document_api",
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
_TIERS_LISTED: Final = 20
#: What one call may cost, also when the price table computes it: nano-dollars are stored as
#: 64-bit integers, and a runaway token count times a price would not fit (the writer could not
#: store the batch that holds it).
_MAX_CALL_NANOS: Final = round(MAX_COST_USD * 1e9)
#: The highest rate `PUT /api/pricing` takes, USD per million tokens (the dearest real model
#: costs a few hundred). With it, a call of at most `_COST_CHECK_TOKENS` tokens stays under
#: `_MAX_CALL_NANOS` at any rate set over HTTP, so ingest prices only the larger calls twice.
_MAX_PRICE_USD: Final = 100_000.0
_COST_CHECK_TOKENS: Final = 1_000_000
_PRICE_RATES: Final = frozenset(Price.__struct_fields__[3:]) - {"long_context_threshold"}
_LABEL: Final = re.compile(LABEL_PATTERN)


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
        _refuse_runaway_costs(exporter, events)
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


def _refuse_runaway_costs(exporter: Exporter, events: list[Event]) -> None:
    """Raise for any call whose computed cost or cache savings exceeds `MAX_COST_USD`, the bound
    an explicit `cost_usd` has: 2**53 output tokens of a priced model is a valid count but not a
    call anyone made, and its nano-dollars would not fit a 64-bit integer column."""
    pricing = exporter.aggregator.pricing
    errors: list[ItemError] = []
    for index, event in enumerate(events):
        if type(event) is not ApiCall:
            continue
        tokens = event.input_tokens + event.output_tokens
        tokens += event.cache_creation_tokens + event.cache_read_tokens
        if tokens <= _COST_CHECK_TOKENS:
            continue
        _, _, cost, savings = pricing.price_call(
            event.model,
            event.input_tokens,
            event.output_tokens,
            event.cache_creation_tokens,
            event.cache_read_tokens,
            event.cache_creation_1h_tokens,
        )
        if event.cost_usd is not None or cost is None:
            cost = 0
        if max(cost, savings) > _MAX_CALL_NANOS:
            errors.append(
                ItemError(
                    index,
                    "cost_usd",
                    f"the token counts price this call above {MAX_COST_USD:,.0f} USD",
                )
            )
    if errors:
        raise EventValidationError(errors)


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


def document_api(openapi: OpenAPI, *, reads_need_token: bool = False) -> None:
    """Complete the app's OpenAPI document with what the handlers' signatures cannot say:
    `POST /api/events` (an ASGI handler has no entry of its own), the raw JSON body of
    `PUT /api/pricing/{model}` and its 422, and the one error shape every 4xx answer has
    (`ErrorBody`, where Litestar would document its own `extra`). `reads_need_token` adds the
    401 that every read answers when `auth_reads` is on. Plain JSON-schema dicts are rendered as
    they are by Litestar's serialiser."""
    error_ref = _document_ingest(openapi)
    paths = openapi.paths or {}
    for path, item in paths.items():
        if isinstance(item, dict):
            continue  # the ingest entry, written whole above
        for operation in (item.get, item.put):
            if operation is None or operation.responses is None:
                continue
            if reads_need_token and operation is item.get and path != "/schema":
                operation.responses.setdefault(
                    "401", OpenAPIResponse(description="Missing or wrong bearer token")
                )
            for code, answer in operation.responses.items():
                if isinstance(answer, OpenAPIResponse) and code.startswith("4"):
                    answer.content = {"application/json": OpenAPIMediaType(schema=error_ref)}
    pricing = paths.get("/api/pricing/{model}")
    if isinstance(pricing, PathItem) and pricing.put is not None:
        _document_pricing_put(pricing.put, error_ref)


def _document_pricing_put(operation: Operation, error_ref: Reference) -> None:
    rate = {"type": "number", "minimum": 0, "maximum": _MAX_PRICE_USD}
    label = {"type": "string", "minLength": 1, "maxLength": 200, "pattern": LABEL_PATTERN}
    properties: dict[str, Any] = {"provider": label, "tier": label}
    for name in Price.__struct_fields__[3:]:
        kind = rate if name in _PRICE_RATES else {"type": "integer", "minimum": 0}
        properties[name] = (
            kind if name in ("input", "output") else {"anyOf": [kind, {"type": "null"}]}
        )
    body = {
        "type": "object",
        "properties": properties,
        "required": ["input", "output"],
        "additionalProperties": False,
    }
    operation.request_body = RequestBody(
        content={"application/json": OpenAPIMediaType(schema=cast("Schema", body))},
        description="USD per million tokens; `provider` and `tier` default to what the table "
        "or the model's name says",
        required=True,
    )
    if operation.responses is not None:
        operation.responses["422"] = OpenAPIResponse(
            description="Invalid price, unknown field, or a model id outside 1..200 characters",
            content={"application/json": OpenAPIMediaType(schema=error_ref)},
        )
    for parameter in operation.parameters or []:
        if isinstance(parameter, OpenAPIParameter) and parameter.name == "model":
            parameter.schema = cast("Schema", label)


def _document_ingest(openapi: OpenAPI) -> Reference:
    """Add `POST /api/events`. Its request and answer schemas come from the same msgspec Structs
    that decode and encode them, so the document cannot drift from the behaviour; returns the
    reference to `ErrorBody`."""
    body_type = Event | list[Event]
    (body_schema, result_schema, error_schema), components = msgspec.json.schema_components(
        (body_type, IngestResult, ErrorBody), ref_template="#/components/schemas/{name}"
    )
    # `type` may be left out (it defaults to api_call), so it is neither required of ApiCall nor
    # a discriminator; an empty batch is refused.
    components["ApiCall"]["required"].remove("type")
    for union in (body_schema["anyOf"][0]["items"], body_schema["anyOf"][1]):
        union.pop("discriminator", None)
    body_schema["anyOf"][0]["minItems"] = 1
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
    return Reference(ref="#/components/schemas/ErrorBody")


def _gunzip(body: bytes, limit: int, exporter: Exporter) -> bytes:
    """Decompress a gzip body, refusing (413) before it grows past the body limit.

    Every member is read (`cat a.gz b.gz` is one valid gzip body), and each must end with its
    trailer: a cut-off stream would otherwise pass as the events that happen to precede the cut.
    """
    out: list[bytes] = []
    size = 0
    rest = body
    while True:
        inflater = zlib.decompressobj(wbits=31)
        try:
            chunk = inflater.decompress(rest, limit + 1 - size)
        except zlib.error as exc:
            exporter.count_self("events_rejected", ("invalid",))
            raise HTTPException(
                status_code=400, detail=f"the gzip body is corrupt: {exc}"
            ) from None
        size += len(chunk)
        out.append(chunk)
        if size > limit or inflater.unconsumed_tail:
            exporter.count_self("events_rejected", ("too_large",))
            raise HTTPException(
                status_code=413, detail=f"the decompressed body exceeds {limit} bytes"
            )
        if not inflater.eof:
            exporter.count_self("events_rejected", ("invalid",))
            raise HTTPException(status_code=400, detail="the gzip body is truncated")
        rest = inflater.unused_data
        # Like gzip(1), ignore the zero bytes some writers pad a stream with.
        if not rest.strip(b"\x00"):
            return b"".join(out)


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
        # Tiers come from events too, so there may be thousands: the answer names a few.
        listed = sorted(known)
        more = f" and {len(listed) - _TIERS_LISTED} more" if len(listed) > _TIERS_LISTED else ""
        raise NotFoundException(
            f"unknown tier {shown}; known tiers: {', '.join(listed[:_TIERS_LISTED])}{more}"
        )
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
        version=__version__,
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
        if not _is_label(model):
            raise ValueError("the model id must be 1..200 characters, none of them a control")
        provider, tier, _ = exporter.aggregator.pricing.classify(model)
        price = msgspec.convert(
            {"provider": provider, "tier": tier, **given, "model": model}, Price
        )
        for name, value in (("provider", price.provider), ("tier", price.tier)):
            # Both become label values of every call of this model: bounded like an event's.
            if not _is_label(value):
                raise ValueError(f"`{name}` must be 1..200 characters, none of them a control")
        too_high = [
            name
            for name, value in msgspec.structs.asdict(price).items()
            if name in _PRICE_RATES and value is not None and value > _MAX_PRICE_USD
        ]
        if too_high:
            raise ValueError(
                f"{', '.join(too_high)}: at most {_MAX_PRICE_USD:,.0f} USD per million tokens"
            )
    except (msgspec.ValidationError, msgspec.DecodeError, ValueError) as exc:
        raise HTTPException(status_code=422, detail=f"invalid price: {exc}") from None
    await exporter.writer.run_exclusive(lambda conn: save_price(conn, price))
    exporter.aggregator.pricing.set(price)
    return price


def _is_label(value: str) -> bool:
    """Whether `value` may be a label value: what an event's labels may be, 1..200 characters."""
    return 1 <= len(value) <= 200 and _LABEL.search(value) is not None


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
