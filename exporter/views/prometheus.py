"""The /metrics view: the aggregate and the exporter's health as Prometheus metric families.

Nothing here is updated on the per-event path. At scrape time `ExporterCollector.collect()` reads
the aggregator's cumulative rows and counters and the writer's health, folds label values through
`LabelBounds`, sums the series that fold together, and builds fresh metric families. It runs on
the event loop's thread, like `record()`, so the state it reads never changes under it.
"""

from __future__ import annotations

import itertools
import re
from collections.abc import Callable, Iterable, Iterator
from typing import Final

from prometheus_client import CollectorRegistry, PlatformCollector, ProcessCollector
from prometheus_client.exposition import choose_encoder
from prometheus_client.metrics_core import (
    CounterMetricFamily,
    GaugeMetricFamily,
    HistogramMetricFamily,
    Metric,
)
from prometheus_client.registry import Collector
from prometheus_client.utils import floatToGoString

from exporter import __version__
from exporter.aggregator import HIST_OFFSET, HISTOGRAM_BOUNDS_S, SeriesKey
from exporter.budget import ALL_PROJECTS, PERIODS, budget_lines, configured_budgets
from exporter.engine import Exporter
from exporter.pricing import nanos_to_usd
from exporter.views.labels import LabelBounds
from exporter.windows import (
    CACHE_CREATION,
    CACHE_READ,
    CALLS,
    COST,
    ERRORS,
    LATENCY_SUM,
    SAVINGS,
    TOKENS_IN,
    TOKENS_OUT,
    add_row,
)

__all__ = ["NO_AGENT", "ExporterCollector", "metrics_registry", "render"]

#: The `agent` label value of calls made without an agent (an empty label reads as no label).
NO_AGENT = "none"

#: Go's float formatting, as every Prometheus client writes values (typed here: the library's
#: function is not annotated).
_go_float: Final[Callable[[float], str]] = floatToGoString
_SERIES_LABELS = ("provider", "model", "tier", "project", "agent")
_LATENCY_LABELS = ("provider", "model", "tier")
_BUCKET_BOUNDS = (*(_go_float(bound) for bound in HISTOGRAM_BOUNDS_S), "+Inf")
_US_PER_S = 1_000_000


def metrics_registry(exporter: Exporter, bounds: LabelBounds | None = None) -> CollectorRegistry:
    """A registry of its own for one exporter: its collector plus the process and platform ones.

    Without `bounds`, the caps come from the exporter's settings and every folded value is
    counted in the exporter's `label_overflow` self-counter. Pass the same `LabelBounds` to every
    view that publishes labels, so that a value is admitted (or folded) the same way in each.
    """
    if bounds is None:
        bounds = LabelBounds.from_settings(
            exporter.settings,
            on_overflow=lambda label: exporter.count_self("label_overflow", (label,)),
        )
    registry = CollectorRegistry()
    registry.register(ExporterCollector(exporter, bounds))
    ProcessCollector(registry=registry)
    PlatformCollector(registry=registry)
    return registry


def render(registry: CollectorRegistry, accept: str | None) -> tuple[bytes, str]:
    """(body, content type): OpenMetrics when the Accept header asks for it, else text 0.0.4.

    The format is negotiated by prometheus_client; the body is the one its encoder writes, built
    faster by `_encode` whenever the requested name escaping leaves plain names unchanged.
    """
    encoder, content_type = choose_encoder(accept or "")
    media_type, *params = (part.strip() for part in content_type.split(";"))
    escaping = next((p.partition("=")[2] for p in params if p.startswith("escaping=")), "")
    if escaping in _PLAIN_NAME_ESCAPINGS:
        openmetrics = media_type == "application/openmetrics-text"
        return _encode(registry, encoder, openmetrics=openmetrics), content_type
    return encoder(registry), content_type


class ExporterCollector:
    """Builds every `cco_*` metric family from an exporter's state at each scrape."""

    def __init__(self, exporter: Exporter, bounds: LabelBounds) -> None:
        self._exporter = exporter
        self._bounds = bounds

    def describe(self) -> Iterable[Metric]:
        # Nothing to declare up front: registering must not run a scrape.
        return []

    def collect(self) -> Iterator[Metric]:
        # The self-metrics come last: folding the labels of this scrape may count new overflows.
        yield from self._call_families(self._folded_series())
        yield from self._event_families()
        yield from self._budget_families()
        yield from self._self_families()

    # -- API calls --------------------------------------------------------------------------------

    def _folded_series(self) -> dict[SeriesKey, list[int]]:
        """Cumulative rows per published label set, with the rows that fold together summed."""
        aggregator = self._exporter.aggregator
        keys, totals = aggregator.series_keys, aggregator.totals
        fold = self._bounds.fold
        merged: dict[SeriesKey, list[int]] = {}
        # Series ids grow in the order label sets were first seen (and survive restarts), so
        # walking them in order admits the same values under a cap on every run.
        for series_id in sorted(totals):
            provider, model, tier, project, agent = keys[series_id]
            key = (
                fold("provider", provider),
                fold("model", model),
                fold("tier", tier),
                fold("project", project),
                fold("agent", agent) if agent else NO_AGENT,
            )
            row = totals[series_id]
            into = merged.get(key)
            if into is None:
                merged[key] = list(row)
            else:
                add_row(into, row)
        return merged

    def _call_families(self, series: dict[SeriesKey, list[int]]) -> Iterator[Metric]:
        requests = CounterMetricFamily(
            "cco_llm_requests",
            "LLM API calls, by outcome.",
            labels=(*_SERIES_LABELS, "status"),
        )
        tokens = CounterMetricFamily(
            "cco_llm_tokens",
            "Tokens of LLM API calls, by type (cache tokens are not part of input).",
            labels=(*_SERIES_LABELS, "type"),
        )
        cost = CounterMetricFamily(
            "cco_llm_cost_usd", "Cost of LLM API calls in US dollars.", labels=_SERIES_LABELS
        )
        savings = CounterMetricFamily(
            "cco_llm_cache_savings_usd",
            "US dollars saved by prompt caching and by responses served from a proxy cache.",
            labels=_SERIES_LABELS,
        )
        # Latency per (provider, model, tier): [sum in µs, per-bucket counts..., +Inf count].
        latency: dict[tuple[str, str, str], list[int]] = {}
        for key, row in series.items():
            provider, model, tier, project, agent = key
            calls, errors = row[CALLS], row[ERRORS]
            requests.add_metric((provider, model, tier, project, agent, "ok"), calls - errors)
            requests.add_metric((provider, model, tier, project, agent, "error"), errors)
            tokens.add_metric((provider, model, tier, project, agent, "input"), row[TOKENS_IN])
            tokens.add_metric((provider, model, tier, project, agent, "output"), row[TOKENS_OUT])
            tokens.add_metric(
                (provider, model, tier, project, agent, "cache_read"), row[CACHE_READ]
            )
            tokens.add_metric(
                (provider, model, tier, project, agent, "cache_creation"), row[CACHE_CREATION]
            )
            cost.add_metric(key, nanos_to_usd(row[COST]))
            savings.add_metric(key, nanos_to_usd(row[SAVINGS]))
            latency_row = [row[LATENCY_SUM], *row[HIST_OFFSET:]]
            into = latency.get((provider, model, tier))
            if into is None:
                latency[provider, model, tier] = latency_row
            else:
                add_row(into, latency_row)
        duration = HistogramMetricFamily(
            "cco_llm_request_duration_seconds",
            "Latency of LLM API calls that reported one, in seconds.",
            labels=_LATENCY_LABELS,
            unit="seconds",
        )
        for labels, (sum_us, *counts) in latency.items():
            # The aggregator counts per bucket; Prometheus buckets count everything at or below.
            cumulative = zip(_BUCKET_BOUNDS, itertools.accumulate(counts), strict=True)
            duration.add_metric(labels, list(cumulative), sum_us / _US_PER_S)
        yield from (requests, tokens, cost, savings, duration)

    # -- other events -----------------------------------------------------------------------------

    def _event_families(self) -> Iterator[Metric]:
        fold = self._bounds.fold
        overrides: dict[tuple[str, str, str], int] = {}
        errors: dict[str, int] = {}
        cache_events = {"hit": 0, "miss": 0}
        for (name, labels), count in self._exporter.aggregator.counters.items():
            if name == "model_overrides":
                from_model, to_model, reason = labels
                key = (
                    fold("from_model", from_model),
                    fold("to_model", to_model),
                    fold("reason", reason),
                )
                overrides[key] = overrides.get(key, 0) + count
            elif name == "errors":
                error_type = fold("error_type", labels[0])
                errors[error_type] = errors.get(error_type, 0) + count
            elif name == "cache_events":
                cache_events[labels[0]] = cache_events.get(labels[0], 0) + count
        counters = self._exporter.aggregator.counters

        family = CounterMetricFamily(
            "cco_llm_model_overrides",
            "Requests sent to another model than the one asked for.",
            labels=("from_model", "to_model", "reason"),
        )
        for key, count in overrides.items():
            family.add_metric(key, count)
        yield family
        family = CounterMetricFamily(
            "cco_llm_cache_events", "Lookups in a proxy's response cache.", labels=("result",)
        )
        for result, count in cache_events.items():
            family.add_metric((result,), count)
        yield family
        yield CounterMetricFamily(
            "cco_llm_cache_hit_savings_usd",
            "US dollars saved by responses served from a proxy cache, with or without a model.",
            value=nanos_to_usd(counters.get(("cache_hit_savings_nanos", ()), 0)),
        )
        family = CounterMetricFamily(
            "cco_llm_errors",
            "Error events reported outside a priced call (rate limits, upstream down, ...).",
            labels=("error_type",),
        )
        for error_type, count in errors.items():
            family.add_metric((error_type,), count)
        yield family
        yield CounterMetricFamily(
            "cco_llm_system_events",
            "Free-form notes from clients (start, stop, configuration change).",
            value=counters.get(("system_events", ()), 0),
        )

    # -- budgets ----------------------------------------------------------------------------------

    def _budget_families(self) -> Iterator[Metric]:
        exporter = self._exporter
        snapshot = exporter.aggregator.spend.snapshot()
        lines = budget_lines(snapshot, configured_budgets(exporter.settings))
        fold = self._bounds.fold
        # Nano-USD per (period, published project); projects folded into __other__ add up.
        budgets: dict[tuple[str, str], int] = {}
        spends: dict[tuple[str, str], int] = {}
        for line in lines:
            project = line.project
            key = (line.period, project if project == ALL_PROJECTS else fold("project", project))
            spends[key] = spends.get(key, 0) + line.spend_nanos
            if line.budget_nanos is not None:
                budgets[key] = budgets.get(key, 0) + line.budget_nanos
        labels = ("period", "project")
        budget_family = GaugeMetricFamily(
            "cco_budget_usd",
            "Configured spend budget of the current day or calendar month, in US dollars.",
            labels=labels,
        )
        spend_family = GaugeMetricFamily(
            "cco_llm_spend_usd",
            "Cost of LLM API calls stamped in the current day or calendar month (budget time "
            "zone), in US dollars.",
            labels=labels,
        )
        remaining_family = GaugeMetricFamily(
            "cco_budget_remaining_usd",
            "Budget minus spend in the current day or calendar month, in US dollars; negative "
            "once exceeded.",
            labels=labels,
        )
        for values, spend in spends.items():
            spend_family.add_metric(values, nanos_to_usd(spend))
        for values, budget in budgets.items():
            budget_family.add_metric(values, nanos_to_usd(budget))
            remaining_family.add_metric(values, nanos_to_usd(budget - spends[values]))
        yield from (budget_family, spend_family, remaining_family)

        # Budget or not: Prometheus cannot tell where a day ends in the budget time zone (its
        # date functions are UTC only), so rules that project spend to the end of the period
        # read it here, from the exporter whose spend they project.
        start_family = GaugeMetricFamily(
            "cco_budget_period_start_timestamp_seconds",
            "Start of the current day or calendar month in the budget time zone, in seconds "
            "since the Unix epoch.",
            labels=("period",),
            unit="seconds",
        )
        end_family = GaugeMetricFamily(
            "cco_budget_period_end_timestamp_seconds",
            "End (exclusive) of the current day or calendar month in the budget time zone, in "
            "seconds since the Unix epoch.",
            labels=("period",),
            unit="seconds",
        )
        for period in PERIODS:
            start_ms, end_ms = snapshot.bounds(period)
            start_family.add_metric((period,), start_ms / 1000)
            end_family.add_metric((period,), end_ms / 1000)
        yield from (start_family, end_family)

    # -- the exporter itself ----------------------------------------------------------------------

    def _self_families(self) -> Iterator[Metric]:
        exporter = self._exporter
        labelled = {
            "events_ingested": CounterMetricFamily(
                "cco_exporter_events_ingested",
                "Events accepted, by source.",
                labels=("source",),
            ),
            "events_rejected": CounterMetricFamily(
                "cco_exporter_events_rejected",
                "Events refused, by reason.",
                labels=("reason",),
            ),
            "label_overflow": CounterMetricFamily(
                "cco_exporter_label_overflow",
                "Distinct label values folded into __other__ because the label was at its cap.",
                labels=("label",),
            ),
            "otlp_exports": CounterMetricFamily(
                "cco_exporter_otlp_exports",
                "OTLP metric exports, by result.",
                labels=("result",),
            ),
            "maintenance_runs": CounterMetricFamily(
                "cco_exporter_maintenance_runs",
                "Maintenance tasks run (purge, vacuum, checkpoint, archive), by result.",
                labels=("task", "result"),
            ),
        }
        for (name, labels), count in exporter.self_counters.items():
            family = labelled.get(name)
            if family is not None:
                family.add_metric(labels, count)
        yield from labelled.values()

        health = exporter.health()
        yield GaugeMetricFamily(
            "cco_exporter_db_queue_depth",
            "Events waiting for the SQLite writer.",
            value=health.queue_depth,
        )
        yield GaugeMetricFamily(
            "cco_exporter_db_queue_capacity",
            "Events that may wait for the SQLite writer before ingest waits.",
            value=health.max_queue,
        )
        if health.last_flush_seconds is not None:
            yield GaugeMetricFamily(
                "cco_exporter_db_flush_duration_seconds",
                "Duration of the last flush to SQLite, in seconds.",
                value=health.last_flush_seconds,
                unit="seconds",
            )
        yield CounterMetricFamily(
            "cco_exporter_db_flushes", "Flushes to SQLite.", value=health.flushes
        )
        yield CounterMetricFamily(
            "cco_exporter_db_events_written",
            "Events committed to SQLite.",
            value=health.events_written,
        )
        yield CounterMetricFamily(
            "cco_exporter_db_write_errors",
            "Flushes to SQLite that failed (their events went to the spill file).",
            value=health.write_errors,
        )
        yield GaugeMetricFamily(
            "cco_exporter_spill_backlog_events",
            "Events in the spill file waiting to be replayed into SQLite.",
            value=health.spill_backlog,
        )
        yield GaugeMetricFamily(
            "cco_exporter_degraded",
            "1 while SQLite refuses writes (events are spilled to a file, or held in memory when "
            "the spill file cannot be written either), else 0.",
            value=1 if health.degraded else 0,
        )
        yield CounterMetricFamily(
            "cco_exporter_unpriced_events",
            "API calls whose model has no price (counted at zero cost).",
            value=exporter.aggregator.unpriced,
        )
        yield CounterMetricFamily(
            "cco_exporter_duplicate_events",
            "Events dropped because their request_id had been seen.",
            value=exporter.aggregator.duplicates,
        )
        build_info = GaugeMetricFamily(
            "cco_exporter_build_info", "The running cco-exporter version.", labels=("version",)
        )
        build_info.add_metric((__version__,), 1)
        yield build_info
        yield GaugeMetricFamily(
            "cco_exporter_start_time_seconds",
            "Start time of the exporter since the Unix epoch, in seconds.",
            value=exporter.started_at,
            unit="seconds",
        )


# -- exposition -----------------------------------------------------------------------------------

#: Name escaping schemes (of the Accept header) that leave plain names such as ours unchanged;
#: no scheme named means underscores.
_PLAIN_NAME_ESCAPINGS: Final = ("", "underscores", "allow-utf-8")
#: Family type -> (type in the text format's TYPE line, suffixes of its samples) for the types
#: `_encode` writes itself.
_FAST_TYPES: Final = {
    "counter": ("counter", ("_total",)),
    "gauge": ("gauge", ("",)),
    "unknown": ("untyped", ("",)),
    "histogram": ("histogram", ("_bucket", "_count", "_sum")),
}
# Without ':' (which OpenMetrics' underscore escaping rewrites in sample names).
_PLAIN_NAME = re.compile(r"[a-zA-Z_][a-zA-Z0-9_]*")


def _encode(
    registry: Collector, encoder: Callable[[Collector], bytes], *, openmetrics: bool
) -> bytes:
    """The bytes `encoder` (prometheus_client's) writes for `registry`, several times faster.

    The library checks and escapes every label name of every sample, some 10 µs a sample; a
    scrape holds eight samples per label set and runs on the event loop, which it holds up for
    as long. Here names are checked once per scrape and escaped values are remembered. Families
    this does not handle (other types, timestamps, exemplars, `_created` samples, names outside
    the plain character set) are written by `encoder` itself.
    """
    out: list[str] = []
    escaped_values: dict[str, str] = {}
    plain_label_names: set[str] = set()
    for metric in registry.collect():
        lines = _family_lines(metric, openmetrics, escaped_values, plain_label_names)
        if lines is None:
            text = encoder(_OneFamily(metric)).decode()
            # OpenMetrics ends every body with `# EOF`; this family is not the end of ours.
            out.append(text.removesuffix("# EOF\n") if openmetrics else text)
        else:
            out.extend(lines)
    if openmetrics:
        out.append("# EOF\n")
    return "".join(out).encode()


class _OneFamily:
    """A collector of one family already built, to hand that family to the library's encoder."""

    def __init__(self, metric: Metric) -> None:
        self._metric = metric

    def collect(self) -> Iterable[Metric]:
        return [self._metric]


def _family_lines(
    metric: Metric,
    openmetrics: bool,
    escaped_values: dict[str, str],
    plain_label_names: set[str],
) -> list[str] | None:
    """The lines of one family, or None when it is left to the library's encoder."""
    fast_type = _FAST_TYPES.get(metric.type)
    name = metric.name
    if fast_type is None or _PLAIN_NAME.fullmatch(name) is None:
        return None
    type_name, suffixes = fast_type
    sample_names = {name + suffix for suffix in suffixes}
    if openmetrics:
        help_text = _escape_value(metric.documentation)
        header = f"# HELP {name} {help_text}\n# TYPE {name} {metric.type}\n"
        if metric.unit:
            header += f"# UNIT {name} {metric.unit}\n"
    else:
        # The text format names a counter family after its samples and escapes no quote in HELP.
        exposed = name + "_total" if metric.type == "counter" else name
        help_text = metric.documentation.replace("\\", r"\\").replace("\n", r"\n")
        header = f"# HELP {exposed} {help_text}\n# TYPE {exposed} {type_name}\n"
    lines = [header]
    for sample in metric.samples:
        sample_name, labels, value = sample.name, sample.labels, sample.value
        if (
            sample_name not in sample_names
            or sample.timestamp is not None
            or sample.exemplar is not None
            # Read by name: older prometheus-client releases have no native histograms.
            or getattr(sample, "native_histogram", None) is not None
        ):
            return None
        if not labels:
            lines.append(f"{sample_name} {_go_float(value)}\n")
            continue
        pairs = []
        for label in sorted(labels):
            if label not in plain_label_names:
                if _PLAIN_NAME.fullmatch(label) is None:
                    return None
                plain_label_names.add(label)
            raw = labels[label]
            escaped = escaped_values.get(raw)
            if escaped is None:
                escaped = escaped_values[raw] = _escape_value(raw)
            pairs.append(f'{label}="{escaped}"')
        lines.append(f"{sample_name}{{{','.join(pairs)}}} {_go_float(value)}\n")
    return lines


def _escape_value(text: str) -> str:
    return text.replace("\\", r"\\").replace("\n", r"\n").replace('"', r"\"")
