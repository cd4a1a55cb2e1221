"""The REST and SSE answers: msgspec Structs with the seeds' field names, built from the aggregate.

Seed 001 shapes (stats, realtime, tiers) are snake_case; seed 003 shapes (current, projects,
models, activity, the stream) are camelCase, as the dashboards that read them expect. Every
builder here is a pure function of the aggregator's state (or of stored rows), so the REST view,
the SSE stream and the tests all read the same numbers.
"""

from __future__ import annotations

import datetime as dt
from typing import Any, Literal

import msgspec

from exporter.aggregator import Aggregator, WindowSnapshot
from exporter.budget import Period, SpendSnapshot, budget_lines, projected_nanos
from exporter.events import (
    ApiCall,
    CacheHit,
    CacheMiss,
    ErrorEvent,
    Event,
    ModelOverride,
    SystemEvent,
    timestamp_ms,
)
from exporter.pricing import Price, nanos_to_usd
from exporter.windows import (
    CACHE_CREATION,
    CACHE_READ,
    CALLS,
    COST,
    ERRORS,
    LATENCY_COUNT,
    LATENCY_SUM,
    ROW_FIELDS,
    SAVINGS,
    TOKENS_IN,
    TOKENS_OUT,
)

__all__ = [
    "ActivityEvent",
    "ActivityPage",
    "AggregatedMetrics",
    "BudgetPeriod",
    "BudgetResponse",
    "BudgetStatus",
    "CurrentRate",
    "CurrentView",
    "ErrorBody",
    "Health",
    "HistoryPoint",
    "HistoryResponse",
    "HistorySeries",
    "IngestResult",
    "MachineStats",
    "ModelMetrics",
    "ModelsResponse",
    "PricingResponse",
    "ProjectMetrics",
    "ProjectSummary",
    "ProjectsResponse",
    "RealtimeResponse",
    "RecentCall",
    "StatsResponse",
    "TierDetail",
    "TierMetrics",
    "TierModel",
    "activity_event",
    "aggregated",
    "budget_response",
    "cache_hit_rate",
    "iso",
    "model_metrics",
    "project_metrics",
    "project_summary",
    "recent_call",
    "tier_metrics",
    "tier_models",
    "trend",
]


def iso(ms: int | None) -> str | None:
    """Epoch milliseconds as RFC 3339 UTC with millisecond precision."""
    if ms is None:
        return None
    moment = dt.datetime.fromtimestamp(ms / 1000, tz=dt.UTC)
    return moment.isoformat(timespec="milliseconds").replace("+00:00", "Z")


class ErrorBody(msgspec.Struct, omit_defaults=True):
    """Every error answer: the HTTP status, what went wrong, and per-item details when useful."""

    status_code: int
    detail: str
    errors: list[dict[str, Any]] | None = None


class IngestResult(msgspec.Struct):
    """What `POST /api/events` took: new events, and repeats of a known request_id (skipped)."""

    accepted: int
    duplicates: int = 0
    durable: bool = False


# -- seed 001: windows and tiers ---------------------------------------------------------------


class AggregatedMetrics(msgspec.Struct):
    """Sums over one window (seed 001), with p50/p99, errors and cache figures added."""

    window: str
    total_calls: int
    total_cost_usd: float
    total_tokens_in: int
    total_tokens_out: int
    avg_latency_ms: float
    p95_latency_ms: float
    calls_per_minute: float
    cost_per_minute_usd: float
    p50_latency_ms: float
    p99_latency_ms: float
    total_errors: int
    total_cache_read_tokens: int
    total_cache_creation_tokens: int
    cache_savings_usd: float


class TierMetrics(msgspec.Struct):
    """One tier's sums over a window (seed 001), plus errors, cache tokens and latency."""

    tier: str
    calls: int
    cost_usd: float
    tokens_in: int
    tokens_out: int
    cache_savings_usd: float
    errors: int
    cache_read_tokens: int
    cache_creation_tokens: int
    avg_latency_ms: float


class StatsResponse(msgspec.Struct):
    summary: AggregatedMetrics
    tiers: list[TierMetrics]


class CurrentRate(msgspec.Struct):
    """Rates over the last minute."""

    calls_per_second: float
    calls_per_minute: float
    cost_per_minute_usd: float
    cost_per_hour_usd: float
    tokens_per_second: float


class RealtimeResponse(msgspec.Struct):
    current_rate: CurrentRate
    window_1m: AggregatedMetrics


class TierModel(msgspec.Struct):
    """A model of the tier: its sums over the window and since the beginning."""

    model: str
    provider: str
    calls: int
    cost_usd: float
    tokens_in: int
    tokens_out: int
    total_calls: int
    total_cost_usd: float


class TierDetail(TierMetrics, kw_only=True):
    """`/tiers/{tier}`: TierMetrics of the window, which window, and the tier's models (their
    window sums at minute resolution, and their totals)."""

    window: str
    models: list[TierModel]


class RecentCall(msgspec.Struct):
    """One call of `/recent` (seed 001's ApiCallEvent, with the rest of what was recorded)."""

    timestamp_ms: int
    timestamp: str
    model: str
    provider: str
    tier: str
    project: str
    input_tokens: int
    output_tokens: int
    cache_read_tokens: int
    cache_creation_tokens: int
    cost_usd: float
    latency_ms: float | None
    status: str
    agent: str | None
    session_id: str | None
    request_id: str | None
    error_type: str | None


class Health(msgspec.Struct):
    """`/health`: ok, or degraded while SQLite refuses writes (events go to the spill file)."""

    status: Literal["ok", "degraded"]
    version: str
    uptime_seconds: float
    db_path: str
    db_reachable: bool
    queue_depth: int
    queue_capacity: int
    last_flush: str | None
    last_flush_seconds: float | None
    last_flush_events: int
    flushes: int
    events_written: int
    write_errors: int
    spill_backlog: int
    last_error: str | None
    otlp_enabled: bool


# -- seed 003: current, projects, models, activity ---------------------------------------------


class ProjectSummary(msgspec.Struct, rename="camel"):
    """The `project` part of `/current` and the stream (seed 003)."""

    name: str
    cost: float
    tokens: int
    calls: int
    last_updated: str | None
    cost_trend: float | None
    tokens_trend: float | None
    calls_trend: float | None
    avg_time: float


class MachineStats(msgspec.Struct, rename="camel"):
    """The `machine` part of `/current`: this host, plus totals over every project."""

    cpu: float
    memory: float
    uptime: float
    process_count: int
    total_cost: float
    active_projects: int
    total_calls: int
    total_tokens: int
    name: str
    exporter_uptime: float
    exporter_memory: float


class ActivityEvent(msgspec.Struct):
    """One activity item (seed 003): type, RFC 3339 time, and the event's data in camelCase."""

    type: str
    timestamp: str
    data: dict[str, Any]


class CurrentView(msgspec.Struct):
    project: ProjectSummary
    machine: MachineStats
    activity: list[ActivityEvent]


class ProjectMetrics(msgspec.Struct, rename="camel"):
    name: str
    cost: float
    tokens: int
    calls: int
    errors: int
    cache_hit_rate: float
    avg_latency: float
    last_activity: str | None
    tokens_in: int
    tokens_out: int
    cache_read_tokens: int
    cache_creation_tokens: int
    cache_savings: float


class ProjectsResponse(msgspec.Struct):
    projects: list[ProjectMetrics]


class ModelMetrics(msgspec.Struct, rename="camel"):
    model: str
    provider: str
    tier: str
    requests: int
    cost: float
    tokens: int
    cache_hit_rate: float
    avg_latency: float
    errors: int
    tokens_in: int
    tokens_out: int
    cache_read_tokens: int
    cache_creation_tokens: int


class ModelsResponse(msgspec.Struct):
    models: list[ModelMetrics]


class ActivityPage(msgspec.Struct, rename="camel"):
    events: list[ActivityEvent]
    total: int
    has_more: bool


class HistoryPoint(msgspec.Struct):
    """Sums over one step starting at `timestamp`."""

    timestamp: str
    timestamp_ms: int
    calls: int
    errors: int
    cost_usd: float
    tokens_in: int
    tokens_out: int
    cache_read_tokens: int
    cache_creation_tokens: int
    cache_savings_usd: float
    avg_latency_ms: float


class HistorySeries(msgspec.Struct):
    label: str
    points: list[HistoryPoint]


class HistoryResponse(msgspec.Struct):
    """Time series from the per-minute rollups, one per value of `by` (or one, "all")."""

    from_: str = msgspec.field(name="from")
    to: str = ""
    step: str = "1h"
    by: str | None = None
    series: list[HistorySeries] = msgspec.field(default_factory=list)


class PricingResponse(msgspec.Struct):
    """The price table, USD per million tokens."""

    models: list[Price]


class BudgetPeriod(msgspec.Struct):
    """The current day or month in the budget time zone: RFC 3339 with the zone's offset, and
    epoch ms; `end` is the start of the next period."""

    start: str
    end: str
    start_ms: int
    end_ms: int


class BudgetStatus(msgspec.Struct):
    """Spend of one project (or `__all__`) in one period, against its budget in US dollars.

    Without a budget for the period, `budget_usd`, `remaining_usd` and `used_percent` are null.
    `projected_usd` is the spend at the period's end if it goes on at the rate so far.
    """

    project: str
    period: Period
    budget_usd: float | None
    spend_usd: float
    remaining_usd: float | None
    used_percent: float | None
    projected_usd: float


class BudgetResponse(msgspec.Struct):
    """`/api/metrics/budget`: the periods, then `__all__` (day, month), then each project with a
    budget (day, month), by name."""

    timezone: str
    day: BudgetPeriod
    month: BudgetPeriod
    budgets: list[BudgetStatus]


# -- builders ------------------------------------------------------------------------------------


def _avg_ms(row: list[int]) -> float:
    count = row[LATENCY_COUNT]
    return row[LATENCY_SUM] / count / 1000.0 if count else 0.0


def cache_hit_rate(row: list[int]) -> float:
    """Percent of prompt tokens served from the cache: reads / (input + writes + reads)."""
    prompt = row[TOKENS_IN] + row[CACHE_CREATION] + row[CACHE_READ]
    return round(row[CACHE_READ] * 100.0 / prompt, 2) if prompt else 0.0


def aggregated(snapshot: WindowSnapshot) -> AggregatedMetrics:
    total = snapshot.total
    return AggregatedMetrics(
        window=snapshot.window,
        total_calls=total[CALLS],
        total_cost_usd=nanos_to_usd(total[COST]),
        total_tokens_in=total[TOKENS_IN],
        total_tokens_out=total[TOKENS_OUT],
        avg_latency_ms=_avg_ms(total),
        p95_latency_ms=snapshot.p95_ms or 0.0,
        calls_per_minute=snapshot.calls_per_minute,
        cost_per_minute_usd=snapshot.cost_per_minute_usd,
        p50_latency_ms=snapshot.p50_ms or 0.0,
        p99_latency_ms=snapshot.p99_ms or 0.0,
        total_errors=total[ERRORS],
        total_cache_read_tokens=total[CACHE_READ],
        total_cache_creation_tokens=total[CACHE_CREATION],
        cache_savings_usd=nanos_to_usd(total[SAVINGS]),
    )


def budget_response(
    snapshot: SpendSnapshot, budgets: dict[str, dict[Period, int]]
) -> BudgetResponse:
    """Spend in the current day and month against `budgets` (see `configured_budgets`)."""
    statuses = []
    for line in budget_lines(snapshot, budgets):
        budget, remaining = line.budget_nanos, line.remaining_nanos
        statuses.append(
            BudgetStatus(
                project=line.project,
                period=line.period,
                budget_usd=None if budget is None else nanos_to_usd(budget),
                spend_usd=nanos_to_usd(line.spend_nanos),
                remaining_usd=None if remaining is None else nanos_to_usd(remaining),
                # From the integers: 3.2 of 10 dollars is 32.0 percent, not 32.000000000000004.
                used_percent=None if budget is None else line.spend_nanos * 100 / budget,
                projected_usd=nanos_to_usd(projected_nanos(line, snapshot)),
            )
        )
    return BudgetResponse(
        timezone=snapshot.timezone,
        day=_budget_period(snapshot, "day"),
        month=_budget_period(snapshot, "month"),
        budgets=statuses,
    )


def _budget_period(snapshot: SpendSnapshot, period: Period) -> BudgetPeriod:
    start, end = snapshot.bounds(period)
    return BudgetPeriod(snapshot.local_iso(start), snapshot.local_iso(end), start, end)


def tier_metrics(tier: str, row: list[int]) -> TierMetrics:
    return TierMetrics(
        tier=tier,
        calls=row[CALLS],
        cost_usd=nanos_to_usd(row[COST]),
        tokens_in=row[TOKENS_IN],
        tokens_out=row[TOKENS_OUT],
        cache_savings_usd=nanos_to_usd(row[SAVINGS]),
        errors=row[ERRORS],
        cache_read_tokens=row[CACHE_READ],
        cache_creation_tokens=row[CACHE_CREATION],
        avg_latency_ms=_avg_ms(row),
    )


def trend(recent: int, earlier: int) -> float | None:
    """Percent change of the last 5 minutes against the 5 before; None when there is no base."""
    if earlier == 0:
        return None
    return round((recent - earlier) * 100.0 / earlier, 2)


def project_summary(
    aggregator: Aggregator,
    name: str,
    last_ms: int | None,
    window_5m: WindowSnapshot,
    window_10m: WindowSnapshot,
) -> ProjectSummary:
    """Cumulative figures of one project with its 5-minute trends."""
    zero = [0] * ROW_FIELDS
    total = aggregator.breakdown("project").get(name, zero)
    recent = aggregator.group(window_5m.by_series, "project").get(name, zero)
    whole = aggregator.group(window_10m.by_series, "project").get(name, zero)
    earlier = [w - r for w, r in zip(whole, recent, strict=True)]

    def tokens(row: list[int]) -> int:
        return row[TOKENS_IN] + row[TOKENS_OUT] + row[CACHE_READ] + row[CACHE_CREATION]

    return ProjectSummary(
        name=name,
        cost=nanos_to_usd(total[COST]),
        tokens=tokens(total),
        calls=total[CALLS],
        last_updated=iso(last_ms),
        cost_trend=trend(recent[COST], earlier[COST]),
        tokens_trend=trend(tokens(recent), tokens(earlier)),
        calls_trend=trend(recent[CALLS], earlier[CALLS]),
        avg_time=round(_avg_ms(total), 3),
    )


def project_metrics(name: str, row: list[int], last_ms: int | None) -> ProjectMetrics:
    return ProjectMetrics(
        name=name,
        cost=nanos_to_usd(row[COST]),
        tokens=row[TOKENS_IN] + row[TOKENS_OUT] + row[CACHE_READ] + row[CACHE_CREATION],
        calls=row[CALLS],
        errors=row[ERRORS],
        cache_hit_rate=cache_hit_rate(row),
        avg_latency=round(_avg_ms(row), 3),
        last_activity=iso(last_ms),
        tokens_in=row[TOKENS_IN],
        tokens_out=row[TOKENS_OUT],
        cache_read_tokens=row[CACHE_READ],
        cache_creation_tokens=row[CACHE_CREATION],
        cache_savings=nanos_to_usd(row[SAVINGS]),
    )


def model_metrics(model: str, provider: str, tier: str, row: list[int]) -> ModelMetrics:
    return ModelMetrics(
        model=model,
        provider=provider,
        tier=tier,
        requests=row[CALLS],
        cost=nanos_to_usd(row[COST]),
        tokens=row[TOKENS_IN] + row[TOKENS_OUT] + row[CACHE_READ] + row[CACHE_CREATION],
        cache_hit_rate=cache_hit_rate(row),
        avg_latency=round(_avg_ms(row), 3),
        errors=row[ERRORS],
        tokens_in=row[TOKENS_IN],
        tokens_out=row[TOKENS_OUT],
        cache_read_tokens=row[CACHE_READ],
        cache_creation_tokens=row[CACHE_CREATION],
    )


def recent_call(event: ApiCall) -> RecentCall:
    ts = timestamp_ms(event)
    return RecentCall(
        timestamp_ms=ts,
        timestamp=iso(ts) or "",
        model=event.model,
        provider=event.provider or "other",
        tier=event.tier or "other",
        project=event.project,
        input_tokens=event.input_tokens,
        output_tokens=event.output_tokens,
        cache_read_tokens=event.cache_read_tokens,
        cache_creation_tokens=event.cache_creation_tokens,
        cost_usd=event.cost_usd or 0.0,
        latency_ms=event.latency_ms,
        status=event.status,
        agent=event.agent,
        session_id=event.session_id,
        request_id=event.request_id,
        error_type=event.error_type,
    )


def activity_event(event: Event) -> ActivityEvent:
    """An event as seed 003's activity item: `{type, timestamp, data}` with camelCase data."""
    data: dict[str, Any] = {"project": event.project}
    match event:
        case ApiCall():
            data.update(
                model=event.model,
                provider=event.provider,
                tier=event.tier,
                inputTokens=event.input_tokens,
                outputTokens=event.output_tokens,
                cacheReadTokens=event.cache_read_tokens,
                cacheCreationTokens=event.cache_creation_tokens,
                latency=event.latency_ms,
                cost=event.cost_usd,
                success=event.status == "ok",
            )
            if event.error_type is not None:
                data["errorType"] = event.error_type
        case CacheHit():
            data.update(model=event.model, savings=event.savings_usd, cacheKey=event.cache_key)
        case CacheMiss():
            data.update(model=event.model, cacheKey=event.cache_key)
        case ErrorEvent():
            data.update(
                error=event.message or event.error_type or "error",
                errorType=event.error_type,
                model=event.model,
                context=event.context,
            )
        case ModelOverride():
            data.update(
                originalModel=event.original_model,
                overrideModel=event.override_model,
                reason=event.reason,
            )
        case SystemEvent():
            data.update(message=event.message, context=event.context)
    for key, value in (
        ("agent", event.agent),
        ("sessionId", event.session_id),
        ("requestId", event.request_id),
    ):
        if value is not None:
            data[key] = value
    tag = type(event).__struct_config__.tag
    return ActivityEvent(type=str(tag), timestamp=iso(timestamp_ms(event)) or "", data=data)


def tier_models(
    aggregator: Aggregator, tier: str, window_rows: dict[int, list[int]]
) -> list[TierModel]:
    """Models of one tier: window sums (from `window_rows` by series) and cumulative totals."""
    # (provider, model) -> [window calls, cost, tokens in, tokens out, total calls, total cost]
    sums: dict[tuple[str, str], list[int]] = {}
    for series_id, (provider, model, series_tier, _, _) in aggregator.series_keys.items():
        if series_tier != tier:
            continue
        into = sums.setdefault((provider, model), [0] * 6)
        total = aggregator.totals[series_id]
        into[4] += total[CALLS]
        into[5] += total[COST]
        window = window_rows.get(series_id)
        if window is not None:
            into[0] += window[CALLS]
            into[1] += window[COST]
            into[2] += window[TOKENS_IN]
            into[3] += window[TOKENS_OUT]
    models = [
        TierModel(
            model=model,
            provider=provider,
            calls=row[0],
            cost_usd=nanos_to_usd(row[1]),
            tokens_in=row[2],
            tokens_out=row[3],
            total_calls=row[4],
            total_cost_usd=nanos_to_usd(row[5]),
        )
        for (provider, model), row in sums.items()
    ]
    return sorted(models, key=lambda m: (-m.total_cost_usd, m.model))
