"""OTLP metrics push: a periodic task renders the aggregate as MetricsData and exports it.

Nothing here runs per event. Every `interval_s` the pusher takes a snapshot of the aggregator's
cumulative totals (on the event loop, where the aggregator lives), folds label values through the
shared `LabelBounds`, builds an `opentelemetry.sdk.metrics.export.MetricsData` and hands it to the
SDK's `OTLPMetricExporter` in a worker thread. Because each export is rebuilt from state, not
drained from a queue of points, a collector that is down or slow cannot make memory grow: the
next export simply carries the newer totals.

Time bounds: the SDK exporters (http 1.45: `otlp.common.http._OTLPHTTPClient.export`; grpc:
`OTLPExporterMixin._export`) compute one deadline of `timeout` seconds per export, give each
attempt only the time left, and retry (exponential backoff 1 s, 2 s, 4 s ... with 20 % jitter)
only while the next backoff still fits before the deadline. So one export ends within about
`timeout` seconds. Two cases escape that deadline (a `requests` read timeout applies per socket
read, so a collector trickling bytes can stretch it; name resolution has no timeout at all), so
the pusher also stops waiting after `timeout + grace` (the result is counted when the thread
ends) and skips ticks while that thread still runs: never more than one export in flight.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import time
from collections.abc import Mapping
from typing import TYPE_CHECKING, Final, Literal, cast
from urllib.parse import unquote, urlsplit

import msgspec
from opentelemetry.sdk.metrics.export import (
    AggregationTemporality,
    Histogram,
    HistogramDataPoint,
    Metric,
    MetricExportResult,
    MetricsData,
    NumberDataPoint,
    ResourceMetrics,
    ScopeMetrics,
    Sum,
)
from opentelemetry.sdk.resources import Resource
from opentelemetry.sdk.util.instrumentation import InstrumentationScope

from exporter import __version__
from exporter.aggregator import HIST_OFFSET, HISTOGRAM_BOUNDS_S
from exporter.engine import Exporter
from exporter.pricing import nanos_to_usd
from exporter.settings import Settings
from exporter.views.labels import LabelBounds
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

if TYPE_CHECKING:
    from opentelemetry.sdk.metrics.export import MetricExporter

__all__ = [
    "METRICS",
    "MetricSpec",
    "OtlpConfig",
    "OtlpPusher",
    "Snapshot",
    "build_metrics_data",
    "delta_points",
    "otlp_config",
    "redact_endpoint",
    "snapshot",
]

_log = logging.getLogger("exporter.otlp")

WireProtocol = Literal["http/protobuf", "grpc"]
Temporality = Literal["cumulative", "delta"]

DEFAULT_SERVICE_NAME: Final = "cco-exporter"
DEFAULT_INTERVAL_S: Final = 60.0
_HTTP_METRICS_PATH: Final = "v1/metrics"
#: How long past its own timeout an export may run before the pusher stops waiting for it.
_GRACE_S: Final = 2.0

#: (metric name, attribute pairs): one data point. Attribute pairs are a tuple so the key hashes.
PointKey = tuple[str, tuple[tuple[str, str], ...]]
#: Integer values per data point: [value] for sums; [count, sum] for token usage;
#: [count, sum µs, bucket counts...] for durations. Integers keep delta arithmetic exact.
Snapshot = dict[PointKey, list[int]]


class OtlpConfig(msgspec.Struct, frozen=True, kw_only=True):
    """Where and how often to push. Headers are deliberately absent: the SDK exporter reads
    OTEL_EXPORTER_OTLP_(METRICS_)HEADERS itself, so secrets never sit in an object we print."""

    endpoint: str
    """Full URL of the collector's metrics endpoint (http: including `/v1/metrics`)."""
    protocol: WireProtocol = "http/protobuf"
    """Wire protocol; grpc needs `grpcio` (installed with opentelemetry-exporter-otlp)."""
    interval_s: float = DEFAULT_INTERVAL_S
    """Seconds between the end of one export and the start of the next."""
    timeout_s: float = 10.0
    """Seconds one export may take, retries included, before it counts as failed."""
    temporality: Temporality = "cumulative"
    """Cumulative sends totals since the start; delta sends what changed since the last export."""
    service_name: str = DEFAULT_SERVICE_NAME
    """`service.name` of the resource."""
    resource_attributes: dict[str, str] = msgspec.field(default_factory=dict)
    """Other resource attributes (from OTEL_RESOURCE_ATTRIBUTES)."""

    def resource(self) -> Resource:
        """The SDK Resource: ours over the SDK's detected attributes (telemetry.sdk.*, ...)."""
        attributes = {"service.version": __version__, **self.resource_attributes}
        attributes["service.name"] = self.service_name
        return Resource.create(attributes)


def otlp_config(settings: Settings, environ: Mapping[str, str] = os.environ) -> OtlpConfig | None:
    """The push configuration from settings, then the standard OTEL_* variables; None = off.

    OTLP is off unless an endpoint is configured: `settings.otlp_endpoint`, else
    OTEL_EXPORTER_OTLP_METRICS_ENDPOINT (used as is), else OTEL_EXPORTER_OTLP_ENDPOINT (for http,
    `/v1/metrics` is appended, as the SDK does). A settings endpoint is treated like the base
    one when it has no path, so both `http://collector:4318` and a full URL work.
    """
    protocol = _protocol(settings, environ)
    endpoint = settings.otlp_endpoint.strip()
    if endpoint:
        if protocol == "http/protobuf" and urlsplit(endpoint).path in ("", "/"):
            endpoint = _append_metrics_path(endpoint)
    elif metrics_endpoint := environ.get("OTEL_EXPORTER_OTLP_METRICS_ENDPOINT", "").strip():
        endpoint = metrics_endpoint
    elif base_endpoint := environ.get("OTEL_EXPORTER_OTLP_ENDPOINT", "").strip():
        endpoint = (
            _append_metrics_path(base_endpoint) if protocol == "http/protobuf" else base_endpoint
        )
    else:
        return None
    if _is_self(endpoint, settings):
        # Claude Code users point OTEL_EXPORTER_OTLP_ENDPOINT at this exporter to send it their
        # telemetry; when the exporter starts from the same shell, pushing there would loop.
        _log.warning(
            "OTLP push is off: %s is this exporter's own address", redact_endpoint(endpoint)
        )
        return None
    attributes = _resource_attributes(environ.get("OTEL_RESOURCE_ATTRIBUTES", ""))
    service_name = (
        environ.get("OTEL_SERVICE_NAME", "").strip()
        or attributes.pop("service.name", "")
        or DEFAULT_SERVICE_NAME
    )
    attributes.pop("service.name", None)
    return OtlpConfig(
        endpoint=endpoint,
        protocol=protocol,
        interval_s=settings.otlp_interval or _interval_from_env(environ),
        timeout_s=settings.otlp_timeout,
        temporality=_temporality(settings, environ),
        service_name=service_name,
        resource_attributes=attributes,
    )


# -- from the aggregate to data points --------------------------------------------------------


class MetricSpec(msgspec.Struct, frozen=True):
    """One exported metric: its name, kind, unit and description."""

    name: str
    kind: Literal["count", "usd", "tokens", "seconds"]
    unit: str
    description: str


GEN_AI_USAGE: Final = "gen_ai.client.token.usage"
GEN_AI_DURATION: Final = "gen_ai.client.operation.duration"
REQUESTS: Final = "cco.llm.requests"
COST_USD: Final = "cco.llm.cost"
CACHE_SAVINGS: Final = "cco.llm.cache_savings"
MODEL_OVERRIDES: Final = "cco.llm.model_overrides"
CACHE_EVENTS: Final = "cco.llm.cache_events"
ERROR_EVENTS: Final = "cco.llm.errors"

#: Every exported metric, in export order.
METRICS: Final = (
    MetricSpec(GEN_AI_USAGE, "tokens", "{token}", "Number of input and output tokens used."),
    MetricSpec(GEN_AI_DURATION, "seconds", "s", "GenAI operation duration."),
    MetricSpec(REQUESTS, "count", "{request}", "LLM API calls, by outcome."),
    MetricSpec(COST_USD, "usd", "USD", "Cost of LLM API calls."),
    MetricSpec(CACHE_SAVINGS, "usd", "USD", "What prompt caching and the response cache saved."),
    MetricSpec(MODEL_OVERRIDES, "count", "{override}", "Requests sent to another model."),
    MetricSpec(CACHE_EVENTS, "count", "{event}", "Response cache lookups, by result."),
    MetricSpec(ERROR_EVENTS, "count", "{error}", "Errors reported outside a priced call."),
)
_TOKEN_FIELDS: Final = (
    ("input", TOKENS_IN),
    ("output", TOKENS_OUT),
    ("cache_read", CACHE_READ),
    ("cache_creation", CACHE_CREATION),
)


def snapshot(exporter: Exporter, bounds: LabelBounds) -> Snapshot:
    """The aggregator's cumulative totals as integer data points, label values folded.

    Runs on the event loop, because the aggregator is not thread-safe: a plain loop over the
    label sets, about 10 ms per thousand (measured); encoding and sending, ~20x that, happen in
    the worker thread. Series that fold into the same attributes are summed.
    """
    aggregator = exporter.aggregator
    fold = bounds.fold
    keys = aggregator.series_keys
    points: Snapshot = {}
    totals = aggregator.totals
    # Series-id order, as /metrics walks them: with one shared LabelBounds, the values admitted
    # under a cap are then the same whichever view asks first, and after a restart.
    for series_id in sorted(totals):
        row = totals[series_id]
        provider, model, tier, project, agent = keys[series_id]
        attributes: tuple[tuple[str, str], ...] = (
            ("gen_ai.operation.name", "chat"),
            ("gen_ai.provider.name", fold("provider", provider)),
            ("gen_ai.request.model", fold("model", model)),
            ("cco.tier", fold("tier", tier)),
            ("cco.project", fold("project", project)),
        )
        if agent:
            attributes += (("cco.agent", fold("agent", agent)),)
        calls, errors = row[CALLS], row[ERRORS]
        for token_type, field in _TOKEN_FIELDS:
            typed = (*attributes, ("gen_ai.token.type", token_type))
            _add(points, GEN_AI_USAGE, typed, [calls, row[field]])
        durations = [row[LATENCY_COUNT], row[LATENCY_SUM], *row[HIST_OFFSET:]]
        _add(points, GEN_AI_DURATION, attributes, durations)
        # The totals count failed calls per label set but not their error types, nor their
        # latencies apart, so failure shows as cco.status here (and error.type only on
        # cco.llm.errors) rather than as error.type on the GenAI histograms.
        _add(points, REQUESTS, (*attributes, ("cco.status", "ok")), [calls - errors])
        _add(points, REQUESTS, (*attributes, ("cco.status", "error")), [errors])
        _add(points, COST_USD, attributes, [row[COST]])
        _add(points, CACHE_SAVINGS, attributes, [row[SAVINGS]])
    for (name, labels), count in aggregator.counters.items():
        if name == "cache_events":
            # The result is hit or miss by construction: nothing to bound.
            _add(points, CACHE_EVENTS, (("cco.cache.result", labels[0]),), [count])
        elif name == "model_overrides":
            from_model, to_model, reason = labels
            override = (
                ("cco.override.from_model", fold("from_model", from_model)),
                ("cco.override.to_model", fold("to_model", to_model)),
                ("cco.override.reason", fold("reason", reason)),
            )
            _add(points, MODEL_OVERRIDES, override, [count])
        elif name == "errors":
            _add(points, ERROR_EVENTS, (("error.type", fold("error_type", labels[0])),), [count])
    return points


def delta_points(current: Snapshot, baseline: Snapshot) -> tuple[Snapshot, Snapshot]:
    """(what changed since `baseline`, the baseline to keep once that has been delivered).

    A point whose totals went down (a call retracted as a duplicate after it was exported) is
    held at its old baseline: sending a negative delta would break a monotonic sum, and holding
    the baseline absorbs the retraction into the next increase, so the exported running total
    converges on the true one.
    """
    changes: Snapshot = {}
    kept: Snapshot = dict(baseline)
    for key, values in current.items():
        before = baseline.get(key)
        if before is None:
            changes[key] = values
            kept[key] = values
            continue
        diff = [now - then for now, then in zip(values, before, strict=True)]
        if min(diff) < 0:
            continue
        changes[key] = diff
        kept[key] = values
    return changes, kept


def build_metrics_data(
    points: Snapshot,
    resource: Resource,
    *,
    temporality: AggregationTemporality,
    start_ns: int,
    now_ns: int,
) -> MetricsData:
    """Render data points as the SDK's MetricsData (pure; safe to run in a worker thread).

    Points whose values are all zero are left out: they say nothing, and since every metric is
    monotonic a cumulative point, once sent, stays non-zero.
    """
    by_metric: dict[str, list[tuple[dict[str, str], list[int]]]] = {}
    for (name, attributes), values in points.items():
        if any(values):
            by_metric.setdefault(name, []).append((dict(attributes), values))
    metrics: list[Metric] = []
    for spec in METRICS:
        found = by_metric.get(spec.name)
        if found:
            data = _render(spec, found, temporality, start_ns, now_ns)
            metrics.append(Metric(spec.name, spec.description, spec.unit, data))
    scope = InstrumentationScope("cco-exporter", __version__)
    return MetricsData([ResourceMetrics(resource, [ScopeMetrics(scope, metrics, "")], "")])


def _render(
    spec: MetricSpec,
    found: list[tuple[dict[str, str], list[int]]],
    temporality: AggregationTemporality,
    start_ns: int,
    now_ns: int,
) -> Sum | Histogram:
    if spec.kind == "count":
        numbers = [NumberDataPoint(a, start_ns, now_ns, v[0]) for a, v in found]
        return Sum(numbers, temporality, is_monotonic=True)
    if spec.kind == "usd":
        money = [NumberDataPoint(a, start_ns, now_ns, nanos_to_usd(v[0])) for a, v in found]
        return Sum(money, temporality, is_monotonic=True)
    # min and max are optional in OTLP and unknown here (the aggregate keeps sums and bucket
    # counts only); None leaves them unset on the wire rather than sending made-up values.
    unknown = cast(float, None)
    if spec.kind == "tokens":
        # There is no per-call token distribution in the aggregate, only per-series sums and call
        # counts, so token usage is a histogram with a single (-inf, +inf) bucket: count and sum
        # are exact (mean tokens per call = sum / count) and no distribution is invented.
        histograms = [
            HistogramDataPoint(a, start_ns, now_ns, v[0], v[1], [v[0]], [], unknown, unknown)
            for a, v in found
        ]
    else:
        # Bucket counts in the aggregate are per bucket (not cumulative), +Inf last: the OTLP
        # layout, len(bounds) + 1 counts.
        histograms = [
            HistogramDataPoint(
                a, start_ns, now_ns, v[0], v[1] / 1e6, v[2:], HISTOGRAM_BOUNDS_S, unknown, unknown
            )
            for a, v in found
        ]
    return Histogram(histograms, temporality)


def _add(
    points: Snapshot, name: str, attributes: tuple[tuple[str, str], ...], values: list[int]
) -> None:
    key = (name, attributes)
    into = points.get(key)
    if into is None:
        points[key] = values
    else:
        into[:] = [a + b for a, b in zip(into, values, strict=True)]


# -- the periodic worker ------------------------------------------------------------------------


class OtlpPusher:
    """A lifespan worker: `async with OtlpPusher(...)` pushes every `interval_s` until exit.

    Use one `LabelBounds` for /metrics and OTLP, so both views fold the same values.
    """

    def __init__(
        self,
        exporter: Exporter,
        config: OtlpConfig,
        bounds: LabelBounds,
        *,
        metric_exporter: MetricExporter | None = None,
    ) -> None:
        self.exporter = exporter
        self.config = config
        self.bounds = bounds
        self.resource = config.resource()
        self._metric_exporter = metric_exporter or _metric_exporter(config)
        self._temporality = (
            AggregationTemporality.DELTA
            if config.temporality == "delta"
            else AggregationTemporality.CUMULATIVE
        )
        self._start_ns = int(exporter.started_at * 1e9)
        # Delta starts from the totals as they are now: they were restored from SQLite, and
        # sending them again after every restart would count the history twice downstream.
        self._baseline: Snapshot = (
            snapshot(exporter, bounds) if config.temporality == "delta" else {}
        )
        self._delta_start_ns = time.time_ns()
        self._in_flight: asyncio.Task[bool] | None = None
        self._task: asyncio.Task[None] | None = None
        self._closed = False

    async def __aenter__(self) -> OtlpPusher:
        self.start()
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.close()

    def start(self) -> None:
        """Start the periodic export task."""
        if self._task is None:
            self._task = asyncio.create_task(self._run(), name="cco-exporter-otlp")

    async def close(self) -> None:
        """Stop the periodic task, export one last time (bounded), shut the SDK exporter down."""
        if self._closed:
            return
        self._closed = True
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
        running = self._in_flight
        if running is not None and not running.done():
            await asyncio.wait({running}, timeout=self.config.timeout_s + _GRACE_S)
        if running is None or running.done():
            await self._export()
        # Shutdown also wakes an export sleeping between retries, so a stuck one ends soon.
        await asyncio.to_thread(self._metric_exporter.shutdown)

    async def export_once(self) -> bool:
        """Export the current totals now; True when the collector took them.

        The result is counted in `otlp_exports` (success|failure). Returns False without
        exporting while the previous export is still running, and True without a request when
        there is nothing to send (delta with no new data).
        """
        if self._closed:
            raise RuntimeError("the OTLP pusher is closed")
        return await self._export()

    async def _export(self) -> bool:
        if self._in_flight is not None and not self._in_flight.done():
            _log.warning("OTLP export skipped: the previous export is still running")
            return False
        now_ns = time.time_ns()
        try:
            current = snapshot(self.exporter, self.bounds)
            if self._temporality is AggregationTemporality.DELTA:
                points, kept = delta_points(current, self._baseline)
                start_ns = self._delta_start_ns
            else:
                points, kept, start_ns = current, {}, self._start_ns
        except Exception:
            # A bug in rendering must not stop the worker: count it, say it, try next tick.
            self.exporter.count_self("otlp_exports", ("failure",))
            _log.exception("OTLP export failed while reading the aggregate")
            return False
        if not any(any(values) for values in points.values()):
            return True
        task = asyncio.create_task(asyncio.to_thread(self._send, points, start_ns, now_ns))
        # Accounting runs when the thread ends, even if nobody waits for it any more (timeout
        # past the grace, or this coroutine cancelled); done callbacks run in the order they
        # were added, so it has run before the `await` below returns.
        started = time.monotonic()
        task.add_done_callback(lambda done: self._finished(done, kept, now_ns, started))
        self._in_flight = task
        try:
            return await asyncio.wait_for(asyncio.shield(task), self.config.timeout_s + _GRACE_S)
        except TimeoutError:
            _log.warning(
                "OTLP export to %s has not ended %.0f s past its timeout; later exports are "
                "skipped until it does",
                redact_endpoint(self.config.endpoint),
                _GRACE_S,
            )
            return False
        except Exception:
            # The thread could not even start (the loop's executor is shutting down); the
            # done callback has counted the failure.
            return False

    def _send(self, points: Snapshot, start_ns: int, now_ns: int) -> bool:
        """Build and export in the worker thread; never raises (the loop must carry on)."""
        try:
            data = build_metrics_data(
                points,
                self.resource,
                temporality=self._temporality,
                start_ns=start_ns,
                now_ns=now_ns,
            )
            result = self._metric_exporter.export(data)
        except Exception:
            # The SDK reports network and collector failures as a result, not an exception:
            # this is a bug, worth its traceback.
            _log.exception("OTLP export raised")
            return False
        return result is MetricExportResult.SUCCESS

    def _finished(
        self, task: asyncio.Task[bool], kept: Snapshot, now_ns: int, started: float
    ) -> None:
        ok = not task.cancelled() and task.exception() is None and task.result()
        if ok:
            self.exporter.count_self("otlp_exports", ("success",))
            if self._temporality is AggregationTemporality.DELTA:
                self._baseline = kept
                self._delta_start_ns = now_ns
            return
        # The baseline stays where it was, so the next delta carries this one's changes too.
        self.exporter.count_self("otlp_exports", ("failure",))
        _log.warning(
            "OTLP export to %s failed after %.2f s; the next export carries on",
            redact_endpoint(self.config.endpoint),
            time.monotonic() - started,
        )

    async def _run(self) -> None:
        while True:
            await asyncio.sleep(self.config.interval_s)
            await self._export()


def _metric_exporter(config: OtlpConfig) -> MetricExporter:
    # Imported here: the exporters pull in requests or grpc, which a process without OTLP
    # should not pay for at start-up.
    if config.protocol == "grpc":
        from opentelemetry.exporter.otlp.proto.grpc.metric_exporter import (
            OTLPMetricExporter as GrpcExporter,
        )

        return GrpcExporter(endpoint=config.endpoint, timeout=config.timeout_s)
    from opentelemetry.exporter.otlp.proto.http.metric_exporter import (
        OTLPMetricExporter as HttpExporter,
    )

    return HttpExporter(endpoint=config.endpoint, timeout=config.timeout_s)


# -- configuration helpers ----------------------------------------------------------------------


def _protocol(settings: Settings, environ: Mapping[str, str]) -> WireProtocol:
    value = (
        settings.otlp_protocol
        or environ.get("OTEL_EXPORTER_OTLP_METRICS_PROTOCOL", "").strip()
        or environ.get("OTEL_EXPORTER_OTLP_PROTOCOL", "").strip()
        or "http/protobuf"
    )
    if value == "grpc":
        return "grpc"
    if value != "http/protobuf":
        # Other tools read the same variables (Claude Code takes http/json); refusing to start
        # over a protocol the Python SDK cannot speak would punish a shared shell setting.
        _log.warning("OTLP protocol %r is not supported; using http/protobuf", value)
    return "http/protobuf"


def _temporality(settings: Settings, environ: Mapping[str, str]) -> Temporality:
    if settings.otlp_temporality == "delta":
        return "delta"
    value = environ.get("OTEL_EXPORTER_OTLP_METRICS_TEMPORALITY_PREFERENCE", "").strip().lower()
    # Every metric here is a monotonic sum or a histogram, which `lowmemory` sends as delta.
    if value in ("delta", "lowmemory"):
        return "delta"
    if value not in ("", "cumulative"):
        _log.warning("OTLP temporality preference %r is not supported; using cumulative", value)
    return "cumulative"


def _interval_from_env(environ: Mapping[str, str]) -> float:
    raw = environ.get("OTEL_METRIC_EXPORT_INTERVAL", "").strip()
    if not raw:
        return DEFAULT_INTERVAL_S
    try:
        millis = float(raw)
    except ValueError:
        millis = 0.0
    if not 0 < millis < float("inf"):
        _log.warning("OTEL_METRIC_EXPORT_INTERVAL=%r is not a positive number of ms", raw)
        return DEFAULT_INTERVAL_S
    return millis / 1000.0


def _resource_attributes(raw: str) -> dict[str, str]:
    """OTEL_RESOURCE_ATTRIBUTES (`k=v,k2=v2`, values percent-encoded), parsed as the SDK does."""
    attributes: dict[str, str] = {}
    for item in raw.split(","):
        key, sep, value = item.partition("=")
        if not sep or not key.strip():
            if item.strip():
                _log.warning("ignoring OTEL_RESOURCE_ATTRIBUTES item %r", item)
            continue
        attributes[key.strip()] = unquote(value.strip())
    return attributes


def _append_metrics_path(base: str) -> str:
    return f"{base.removesuffix('/')}/{_HTTP_METRICS_PATH}"


def _is_self(endpoint: str, settings: Settings) -> bool:
    parts = urlsplit(endpoint if "://" in endpoint else f"//{endpoint}")
    try:
        port = parts.port
    except ValueError:
        return False
    local = {"127.0.0.1", "localhost", "::1", settings.host}
    return port == settings.port and parts.hostname in local


def redact_endpoint(endpoint: str) -> str:
    """The endpoint for a log line: user:password@ taken out."""
    parts = urlsplit(endpoint)
    if parts.username is None and parts.password is None:
        return endpoint
    host = parts.hostname or ""
    netloc = f"{host}:{parts.port}" if parts.port else host
    return parts._replace(netloc=netloc).geturl()
