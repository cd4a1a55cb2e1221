"""The /metrics view on a real engine: values equal the aggregate, labels fold, formats agree."""

from __future__ import annotations

import os
import shutil
import subprocess
from collections.abc import AsyncIterator, Callable, Iterable
from contextlib import asynccontextmanager
from pathlib import Path

import pytest
from prometheus_client import REGISTRY, CollectorRegistry
from prometheus_client.exposition import choose_encoder
from prometheus_client.metrics_core import (
    CounterMetricFamily,
    GaugeMetricFamily,
    InfoMetricFamily,
    Metric,
)
from prometheus_client.openmetrics import parser as openmetrics_parser
from prometheus_client.parser import text_string_to_metric_families as parse_text
from prometheus_client.samples import Sample

from exporter import (
    ApiCall,
    CacheHit,
    CacheMiss,
    ErrorEvent,
    Event,
    Exporter,
    ModelOverride,
    Settings,
    SystemEvent,
    __version__,
)
from exporter.aggregator import HIST_OFFSET, HISTOGRAM_BOUNDS_S
from exporter.pricing import nanos_to_usd
from exporter.views.labels import OTHER, LabelBounds
from exporter.views.prometheus import NO_AGENT, ExporterCollector, metrics_registry, render
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

#: The strict OpenMetrics parser (typed here: the library's function is not annotated).
parse_openmetrics: Callable[[str], Iterable[Metric]] = (
    openmetrics_parser.text_string_to_metric_families
)
TEXT_0_0_4 = "text/plain; version=0.0.4; charset=utf-8"
OPENMETRICS = "application/openmetrics-text; version=1.0.0"
#: What Prometheus 2.x sends when it scrapes.
PROMETHEUS_ACCEPT = (
    "application/openmetrics-text;version=1.0.0,application/openmetrics-text;version=0.0.1;"
    "q=0.75,text/plain;version=0.0.4;q=0.5,*/*;q=0.1"
)


@asynccontextmanager
async def running(tmp_path: Path, **overrides: object) -> AsyncIterator[Exporter]:
    settings = Settings(db_path=str(tmp_path / "m.db"), **overrides)  # type: ignore[arg-type]
    exporter = await Exporter.start(settings)
    try:
        yield exporter
    finally:
        await exporter.close()


def record_calls(exporter: Exporter) -> None:
    """A mix: several models, projects and agents, cache tokens, failures, no latency, unpriced."""
    calls = [
        ApiCall(
            model="claude-sonnet-4-5",
            input_tokens=1000,
            output_tokens=500,
            latency_ms=250.0,
            project="p1",
            agent="a",
        ),
        ApiCall(
            model="claude-sonnet-4-5",
            input_tokens=200,
            output_tokens=50,
            cache_read_tokens=3000,
            cache_creation_tokens=400,
            latency_ms=1_500.0,
            project="p1",
        ),
        ApiCall(
            model="claude-opus-4-1",
            input_tokens=10,
            output_tokens=7,
            latency_ms=90_000.0,
            project="p2",
            agent="b",
            status="error",
            error_type="overloaded",
        ),
        ApiCall(model="claude-haiku-4-5", input_tokens=123, output_tokens=45, project="p2"),
        ApiCall(model="gpt-4o", input_tokens=5000, cache_read_tokens=800, latency_ms=5.0),
        ApiCall(model="some-unpriced-model", input_tokens=42, latency_ms=40.0, agent="a"),
    ]
    for call in calls:
        assert exporter.record(call)


def scrape(registry: CollectorRegistry, accept: str | None = None) -> dict[str, Metric]:
    body, content_type = render(registry, accept)
    text = body.decode()
    if content_type.startswith("application/openmetrics-text"):
        return {family.name: family for family in parse_openmetrics(text)}
    return {family.name: family for family in parse_text(text)}


def samples(family: Metric, suffix: str = "", **labels: str) -> list[Sample]:
    """The family's samples named `<family><suffix>` whose labels include `labels`."""
    return [
        s
        for s in family.samples
        if s.name == family.name + suffix and labels.items() <= s.labels.items()
    ]


def total(family: Metric, suffix: str = "", **labels: str) -> float:
    return sum(s.value for s in samples(family, suffix, **labels))


def label_values(family: Metric, label: str) -> set[str]:
    return {s.labels[label] for s in family.samples}


def series_lines(body: bytes) -> list[str]:
    return [line for line in body.decode().splitlines() if line.startswith("cco_")]


async def test_call_counters_equal_the_aggregate(tmp_path: Path) -> None:
    async with running(tmp_path) as exporter:
        record_calls(exporter)
        families = scrape(metrics_registry(exporter))
        grand = exporter.aggregator.grand_total()

        requests = families["cco_llm_requests"]
        assert total(requests, "_total") == grand[CALLS] == 6
        assert total(requests, "_total", status="error") == grand[ERRORS] == 1
        assert total(requests, "_total", status="ok") == grand[CALLS] - grand[ERRORS]
        tokens = families["cco_llm_tokens"]
        for token_type, field in [
            ("input", TOKENS_IN),
            ("output", TOKENS_OUT),
            ("cache_read", CACHE_READ),
            ("cache_creation", CACHE_CREATION),
        ]:
            assert total(tokens, "_total", type=token_type) == grand[field] > 0
        cost = families["cco_llm_cost_usd"]
        assert total(cost, "_total") == pytest.approx(nanos_to_usd(grand[COST]), rel=1e-12)
        assert grand[COST] > 0
        savings = families["cco_llm_cache_savings_usd"]
        assert total(savings, "_total") == pytest.approx(nanos_to_usd(grand[SAVINGS]), rel=1e-12)
        assert grand[SAVINGS] > 0

        for model, row in exporter.aggregator.breakdown("model").items():
            assert total(requests, "_total", model=model) == row[CALLS]
            assert total(tokens, "_total", model=model, type="input") == row[TOKENS_IN]
            assert total(cost, "_total", model=model) == pytest.approx(nanos_to_usd(row[COST]))
        for project, row in exporter.aggregator.breakdown("project").items():
            assert total(requests, "_total", project=project) == row[CALLS]


async def test_latency_histogram_is_cumulative_and_its_inf_bucket_counts_every_timed_call(
    tmp_path: Path,
) -> None:
    async with running(tmp_path) as exporter:
        record_calls(exporter)
        duration = scrape(metrics_registry(exporter))["cco_llm_request_duration_seconds"]
        by_model = exporter.aggregator.breakdown("model")

        # Summed over projects and agents: only provider, model and tier (and le) remain.
        assert {frozenset(s.labels) - {"le"} for s in duration.samples} == {
            frozenset({"provider", "model", "tier"})
        }
        for model, row in by_model.items():
            buckets = samples(duration, "_bucket", model=model)
            bounds = [s.labels["le"] for s in buckets]
            assert bounds == [*(str(b) for b in HISTOGRAM_BOUNDS_S), "+Inf"]
            counts = [s.value for s in buckets]
            assert counts == sorted(counts)
            assert counts == [sum(row[HIST_OFFSET : HIST_OFFSET + i + 1]) for i in range(15)]
            assert counts[-1] == total(duration, "_count", model=model) == row[LATENCY_COUNT]
            assert total(duration, "_sum", model=model) == pytest.approx(row[LATENCY_SUM] / 1e6)

        # Two sonnet calls, 0.25 s and 1.5 s; a call without latency is not in the histogram.
        sonnet = {s.labels["le"]: s.value for s in samples(duration, "_bucket", tier="sonnet")}
        assert (sonnet["0.16"], sonnet["0.32"], sonnet["1.28"], sonnet["2.56"]) == (0, 1, 1, 2)
        assert total(duration, "_count", model="claude-haiku-4-5") == 0
        # 90 s is beyond the last bound: only +Inf holds it.
        opus = {s.labels["le"]: s.value for s in samples(duration, "_bucket", tier="opus")}
        assert (opus["81.92"], opus["+Inf"]) == (0, 1)


async def test_calls_without_an_agent_are_labelled_none(tmp_path: Path) -> None:
    async with running(tmp_path) as exporter:
        record_calls(exporter)
        requests = scrape(metrics_registry(exporter))["cco_llm_requests"]

        assert label_values(requests, "agent") == {"a", "b", NO_AGENT}
        assert NO_AGENT == "none"
        assert total(requests, "_total", agent="none") == 3


async def test_non_call_events_are_counted_by_their_labels(tmp_path: Path) -> None:
    async with running(tmp_path) as exporter:
        events: list[Event] = [
            CacheHit(model="claude-sonnet-4-5", savings_usd=0.5, project="p1"),
            CacheHit(savings_usd=0.25),
            CacheMiss(),
            CacheMiss(model="gpt-4o"),
            ErrorEvent(error_type="rate_limit"),
            ErrorEvent(error_type="rate_limit"),
            ErrorEvent(message="no type"),
            ModelOverride(original_model="claude-opus-4-1", override_model="claude-sonnet-4-5"),
            ModelOverride(
                original_model="claude-opus-4-1",
                override_model="claude-sonnet-4-5",
                reason="quota",
            ),
            SystemEvent(message="started"),
        ]
        for event in events:
            assert exporter.record(event)
        families = scrape(metrics_registry(exporter))

        cache_events = families["cco_llm_cache_events"]
        assert {s.labels["result"]: s.value for s in cache_events.samples} == {"hit": 2, "miss": 2}
        assert total(families["cco_llm_cache_hit_savings_usd"], "_total") == 0.75
        # The hit that names a model is credited to that model's series as well.
        savings = families["cco_llm_cache_savings_usd"]
        assert total(savings, "_total", model="claude-sonnet-4-5", project="p1") == 0.5
        errors = families["cco_llm_errors"]
        assert {s.labels["error_type"]: s.value for s in errors.samples} == {
            "rate_limit": 2,
            "unknown": 1,
        }
        overrides = families["cco_llm_model_overrides"]
        assert {
            (s.labels["from_model"], s.labels["to_model"], s.labels["reason"]): s.value
            for s in overrides.samples
        } == {
            ("claude-opus-4-1", "claude-sonnet-4-5", "unspecified"): 1,
            ("claude-opus-4-1", "claude-sonnet-4-5", "quota"): 1,
        }
        assert total(families["cco_llm_system_events"], "_total") == 1


async def test_self_metrics_report_the_writer_and_the_exporters_own_counters(
    tmp_path: Path,
) -> None:
    async with running(tmp_path) as exporter:
        record_calls(exporter)
        assert exporter.record(ApiCall(model="gpt-4o", request_id="r-1"))
        assert not exporter.record(ApiCall(model="gpt-4o", request_id="r-1"))
        exporter.count_self("events_ingested", ("http",), 8)
        exporter.count_self("events_rejected", ("invalid",))
        exporter.count_self("otlp_exports", ("failure",), 2)
        exporter.count_self("maintenance_runs", ("purge", "success"), 3)
        await exporter.flush()
        families = scrape(metrics_registry(exporter))
        health = exporter.health()

        def value(name: str, suffix: str = "", **labels: str) -> float:
            return total(families[name], suffix, **labels)

        assert health.flushes >= 1
        assert value("cco_exporter_db_flushes", "_total") == health.flushes
        assert value("cco_exporter_db_events_written", "_total") == health.events_written == 7
        assert value("cco_exporter_db_write_errors", "_total") == 0
        assert value("cco_exporter_db_queue_depth") == 0
        assert value("cco_exporter_db_queue_capacity") == exporter.settings.max_queue
        flush_seconds = value("cco_exporter_db_flush_duration_seconds")
        assert flush_seconds == health.last_flush_seconds
        assert flush_seconds > 0
        assert value("cco_exporter_spill_backlog_events") == 0
        assert value("cco_exporter_degraded") == 0
        assert value("cco_exporter_unpriced_events", "_total") == 1
        assert value("cco_exporter_duplicate_events", "_total") == 1
        assert value("cco_exporter_events_ingested", "_total", source="http") == 8
        assert value("cco_exporter_events_rejected", "_total", reason="invalid") == 1
        assert value("cco_exporter_otlp_exports", "_total", result="failure") == 2
        assert value("cco_exporter_maintenance_runs", "_total", task="purge", result="success") == 3
        assert value("cco_exporter_label_overflow", "_total") == 0
        build_info = families["cco_exporter_build_info"]
        assert [(s.labels, s.value) for s in build_info.samples] == [({"version": __version__}, 1)]
        assert value("cco_exporter_start_time_seconds") == exporter.started_at
        # The process collector rides along on the same registry.
        assert value("process_cpu_seconds", "_total") > 0


async def test_labels_beyond_their_cap_fold_into_other_and_keep_the_totals(
    tmp_path: Path,
) -> None:
    async with running(tmp_path, max_projects=2, max_models=1) as exporter:
        for project in ["p1", "p2", "p3", "p4", "p5"]:
            for model, latency_ms in [("claude-sonnet-4-5", 30.0), ("claude-haiku-4-5", 700.0)]:
                exporter.record(
                    ApiCall(
                        model=model,
                        input_tokens=len(project) * 1000,
                        output_tokens=77,
                        latency_ms=latency_ms,
                        project=project,
                    )
                )
        registry = metrics_registry(exporter)
        families = scrape(registry)
        by_project = exporter.aggregator.breakdown("project")
        grand = exporter.aggregator.grand_total()

        cost = families["cco_llm_cost_usd"]
        assert label_values(cost, "project") == {"p1", "p2", OTHER}
        assert label_values(cost, "model") == {"claude-sonnet-4-5", OTHER}
        folded_nanos = sum(by_project[p][COST] for p in ["p3", "p4", "p5"])
        assert total(cost, "_total", project=OTHER) == pytest.approx(nanos_to_usd(folded_nanos))
        assert total(cost, "_total") == pytest.approx(nanos_to_usd(grand[COST]))
        requests = families["cco_llm_requests"]
        assert total(requests, "_total", project=OTHER) == 6
        assert total(requests, "_total") == grand[CALLS] == 10
        # No label set is written twice: the folded series are summed, not repeated.
        keys = [tuple(sorted(s.labels.items())) for s in requests.samples]
        assert len(keys) == len(set(keys)) == 2 * 2 * 3
        duration = families["cco_llm_request_duration_seconds"]
        other = {s.labels["le"]: s.value for s in samples(duration, "_bucket", model=OTHER)}
        assert (other["0.64"], other["1.28"], other["+Inf"]) == (0, 5, 5)
        assert total(duration, "_count") == grand[LATENCY_COUNT] == 10

        overflow = families["cco_exporter_label_overflow"]
        assert {s.labels["label"]: s.value for s in overflow.samples} == {"project": 3, "model": 1}

        # A folded value is counted once, however many scrapes see it; a new one adds one.
        scrape(registry)
        exporter.record(ApiCall(model="claude-sonnet-4-5", project="p6"))
        overflow = scrape(registry)["cco_exporter_label_overflow"]
        assert {s.labels["label"]: s.value for s in overflow.samples} == {"project": 4, "model": 1}


async def test_folding_gives_the_same_series_on_every_scrape(tmp_path: Path) -> None:
    async with running(tmp_path, max_projects=3, max_agents=1) as exporter:
        for i in range(12):
            exporter.record(
                ApiCall(model="gpt-4o", input_tokens=i, project=f"p{i % 6}", agent=f"a{i % 4}")
            )
        registry = metrics_registry(exporter)
        first = series_lines(render(registry, None)[0])
        assert series_lines(render(registry, None)[0]) == first

        # More calls of admitted values change values, not which label sets exist.
        exporter.record(ApiCall(model="gpt-4o", input_tokens=5, project="p9", agent="a9"))
        exporter.record(ApiCall(model="gpt-4o", input_tokens=5, project="p0", agent="a0"))
        again = scrape(registry)["cco_llm_tokens"]
        assert label_values(again, "project") == {"p0", "p1", "p2", OTHER}
        assert label_values(again, "agent") == {"a0", OTHER}


async def test_openmetrics_is_served_when_the_accept_header_asks_for_it(tmp_path: Path) -> None:
    async with running(tmp_path) as exporter:
        record_calls(exporter)
        registry = metrics_registry(exporter)
        for accept in [OPENMETRICS, PROMETHEUS_ACCEPT]:
            body, content_type = render(registry, accept)
            assert content_type.startswith("application/openmetrics-text; version=1.0.0")
            assert body.endswith(b"# EOF\n")
            assert body.count(b"# EOF") == 1
            # The strict OpenMetrics parser accepts the whole body.
            families = {f.name: f for f in parse_openmetrics(body.decode())}
            requests = families["cco_llm_requests"]
            assert total(requests, "_total") == exporter.aggregator.grand_total()[CALLS]
            assert families["cco_llm_request_duration_seconds"].unit == "seconds"


async def test_text_format_0_0_4_is_served_otherwise(tmp_path: Path) -> None:
    async with running(tmp_path) as exporter:
        registry = metrics_registry(exporter)
        for accept in [None, "", "text/plain", "*/*", "application/json"]:
            body, content_type = render(registry, accept)
            assert content_type == TEXT_0_0_4
            assert b"# TYPE cco_llm_requests_total counter\n" in body
            assert b"# EOF" not in body


async def test_body_is_byte_for_byte_what_prometheus_client_writes(tmp_path: Path) -> None:
    async with running(tmp_path) as exporter:
        record_calls(exporter)
        # Values that need escaping, and one beyond ASCII.
        exporter.record(
            ApiCall(model='we"ird\\model', project="line\nbreak", agent="agënt", latency_ms=3.0)
        )
        exporter.record(ModelOverride(original_model="a\\b", override_model='c"d', reason="x"))
        registry = CollectorRegistry()
        registry.register(ExporterCollector(exporter, LabelBounds.from_settings(exporter.settings)))
        for accept in [
            None,
            OPENMETRICS,
            PROMETHEUS_ACCEPT,
            "text/plain; version=1.0.0; escaping=allow-utf-8",
            "application/openmetrics-text; version=1.0.0; escaping=underscores",
            "application/openmetrics-text; version=1.0.0; escaping=dots",
        ]:
            encoder, content_type = choose_encoder(accept or "")
            assert render(registry, accept) == (encoder(registry), content_type)


class _UnusualFamilies:
    """Families of shapes the view never builds: an info metric, a timestamp, a `_created`."""

    def describe(self) -> Iterable[Metric]:
        return []

    def collect(self) -> Iterable[Metric]:
        info = InfoMetricFamily("unusual_build", "An info family.", value={"commit": "abc"})
        stamped = GaugeMetricFamily("unusual_stamped", "A sample with a timestamp.", labels=["k"])
        stamped.add_metric(["v"], 1.5, timestamp=1_700_000_000.25)
        created = CounterMetricFamily("unusual_created", "A counter with _created.", labels=["k"])
        created.add_metric(["v"], 3, created=1_700_000_000.0)
        return [info, stamped, created]


async def test_families_of_other_shapes_are_written_by_prometheus_client(tmp_path: Path) -> None:
    async with running(tmp_path) as exporter:
        record_calls(exporter)
        registry = CollectorRegistry()
        registry.register(ExporterCollector(exporter, LabelBounds.from_settings(exporter.settings)))
        registry.register(_UnusualFamilies())
        for accept in [None, OPENMETRICS]:
            encoder, _ = choose_encoder(accept or "")
            body, _ = render(registry, accept)
            assert body == encoder(registry)
            assert b"unusual_created_created" in body
            assert b"unusual_build_info" in body


async def test_promtool_check_metrics_reports_nothing(tmp_path: Path) -> None:
    promtool = shutil.which("promtool")
    if promtool is None:
        if not os.environ.get("CI"):
            pytest.skip("promtool not installed (Debian package prometheus)")
        pytest.fail("promtool is required under CI (Debian package prometheus)")
    async with running(tmp_path, max_projects=1) as exporter:
        record_calls(exporter)
        events: list[Event] = [
            CacheHit(model="gpt-4o", savings_usd=0.1),
            CacheMiss(),
            ErrorEvent(error_type="rate_limit"),
            ModelOverride(original_model="claude-opus-4-1", override_model="claude-sonnet-4-5"),
            SystemEvent(),
        ]
        for event in events:
            exporter.record(event)
        exporter.count_self("events_ingested", ("http",))
        exporter.count_self("events_rejected", ("invalid",))
        exporter.count_self("otlp_exports", ("success",))
        await exporter.flush()
        body, _ = render(metrics_registry(exporter), None)

    result = subprocess.run(
        [promtool, "check", "metrics"], input=body, capture_output=True, timeout=60, check=False
    )
    assert (result.returncode, result.stdout, result.stderr) == (0, b"", b"")


async def test_registries_are_separate_and_the_global_one_is_untouched(tmp_path: Path) -> None:
    async with (
        running(tmp_path / "one") as one,
        running(tmp_path / "two") as two,
    ):
        one.record(ApiCall(model="gpt-4o", input_tokens=1))
        first, second = metrics_registry(one), metrics_registry(two)

        assert total(scrape(first)["cco_llm_requests"], "_total") == 1
        assert total(scrape(second)["cco_llm_requests"], "_total") == 0
        assert not [m for m in REGISTRY.collect() if m.name.startswith("cco_")]


async def test_a_thousand_label_sets_are_each_written_once(tmp_path: Path) -> None:
    async with running(tmp_path) as exporter:
        for i in range(1000):
            exporter.record(
                ApiCall(
                    model=["claude-sonnet-4-5", "claude-haiku-4-5", "gpt-4o", "mystery"][i % 4],
                    project=f"project-{i // 4 % 50}",
                    agent=f"agent-{i // 200}",
                    input_tokens=i,
                    latency_ms=float(i),
                )
            )
        assert len(exporter.aggregator.totals) == 1000
        families = scrape(metrics_registry(exporter))

        cost = families["cco_llm_cost_usd"]
        keys = {tuple(sorted(s.labels.items())) for s in cost.samples}
        assert len(cost.samples) == len(keys) == 1000
        assert len(families["cco_llm_requests"].samples) == 2000
        assert total(families["cco_llm_tokens"], "_total", type="input") == sum(range(1000))
        assert total(families["cco_llm_request_duration_seconds"], "_count") == 1000
