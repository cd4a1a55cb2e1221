"""OTLP push against a real receiver on 127.0.0.1: bodies decoded with opentelemetry-proto."""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import AsyncIterator, Iterator
from concurrent import futures
from pathlib import Path
from typing import Any

import grpc  # type: ignore[import-untyped]
import pytest
from opentelemetry.proto.collector.metrics.v1 import metrics_service_pb2_grpc
from opentelemetry.proto.collector.metrics.v1.metrics_service_pb2 import (
    ExportMetricsServiceRequest,
    ExportMetricsServiceResponse,
)
from opentelemetry.proto.metrics.v1 import metrics_pb2

from exporter import ApiCall, CacheHit, CacheMiss, ErrorEvent, Exporter, ModelOverride, Settings
from exporter.aggregator import HIST_OFFSET, HISTOGRAM_BOUNDS_S
from exporter.pricing import nanos_to_usd
from exporter.views.labels import OTHER, LabelBounds
from exporter.views.otlp import OtlpConfig, OtlpPusher, delta_points, otlp_config
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
from tests.otlp_receiver import Receiver

# Every network wait in this file is bounded by these few seconds.
TIMEOUT_S = 2.0
BOUND_S = 8.0


@pytest.fixture
def receiver() -> Iterator[Receiver]:
    running = Receiver()
    try:
        yield running
    finally:
        running.stop()


@pytest.fixture
async def exporter(tmp_path: Path) -> AsyncIterator[Exporter]:
    started = await Exporter.start(Settings(db_path=str(tmp_path / "m.db")))
    try:
        yield started
    finally:
        await started.close()


def bounds_for(exporter: Exporter) -> LabelBounds:
    return LabelBounds.from_settings(
        exporter.settings, on_overflow=lambda label: exporter.count_self("label_overflow", (label,))
    )


def pusher_for(exporter: Exporter, endpoint: str, **config: Any) -> OtlpPusher:
    # A long interval: the tests call export_once themselves.
    options: dict[str, Any] = {"interval_s": 3600.0, "timeout_s": TIMEOUT_S, **config}
    return OtlpPusher(exporter, OtlpConfig(endpoint=endpoint, **options), bounds_for(exporter))


# -- reading decoded requests --------------------------------------------------------------------


def metrics_of(request: ExportMetricsServiceRequest) -> dict[str, metrics_pb2.Metric]:
    (resource_metrics,) = request.resource_metrics
    (scope_metrics,) = resource_metrics.scope_metrics
    return {metric.name: metric for metric in scope_metrics.metrics}


def attrs(point: Any) -> dict[str, str]:
    return {kv.key: kv.value.string_value for kv in point.attributes}


def sum_values(metric: metrics_pb2.Metric, **where: str) -> float:
    total = 0.0
    for point in metric.sum.data_points:
        if all(attrs(point).get(k) == v for k, v in where.items()):
            total += point.as_double if point.HasField("as_double") else point.as_int
    return total


def histogram_totals(metric: metrics_pb2.Metric, **where: str) -> tuple[int, float, list[int]]:
    count, total, buckets = 0, 0.0, [0] * len(metric.histogram.data_points[0].bucket_counts)
    for point in metric.histogram.data_points:
        if all(attrs(point).get(k) == v for k, v in where.items()):
            count += point.count
            total += point.sum
            buckets = [a + b for a, b in zip(buckets, point.bucket_counts, strict=True)]
    return count, total, buckets


def record_mix(exporter: Exporter) -> None:
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
            input_tokens=2000,
            output_tokens=100,
            cache_read_tokens=30_000,
            cache_creation_tokens=4000,
            latency_ms=1500.0,
            project="p1",
            agent="a",
        ),
        ApiCall(model="claude-opus-4-1", input_tokens=5000, output_tokens=2000, project="p2"),
        ApiCall(
            model="gpt-4o",
            input_tokens=700,
            output_tokens=0,
            latency_ms=90_000.0,
            status="error",
            error_type="rate_limit",
            project="p2",
        ),
    ]
    for event in calls:
        assert exporter.record(event)
    exporter.record(CacheHit(model="claude-sonnet-4-5", savings_usd=0.5, project="p1"))
    exporter.record(CacheMiss(project="p1"))
    exporter.record(CacheMiss(project="p1"))
    exporter.record(ModelOverride(original_model="claude-opus-4-1", override_model="gpt-4o"))
    exporter.record(ErrorEvent(error_type="overloaded"))


def exports(exporter: Exporter, result: str) -> int:
    return exporter.self_counters.get(("otlp_exports", (result,)), 0)


# -- tests ----------------------------------------------------------------------------------------


async def test_export_carries_the_aggregate_exactly(exporter: Exporter, receiver: Receiver) -> None:
    record_mix(exporter)
    pusher = pusher_for(exporter, receiver.url)
    try:
        assert await pusher.export_once()
    finally:
        await pusher.close()
    assert exports(exporter, "success") == 2  # export_once, then the final export of close()
    (request, _) = receiver.requests
    total = exporter.aggregator.grand_total()
    metrics = metrics_of(request)
    assert set(metrics) == {
        "gen_ai.client.token.usage",
        "gen_ai.client.operation.duration",
        "cco.llm.requests",
        "cco.llm.cost",
        "cco.llm.cache_savings",
        "cco.llm.model_overrides",
        "cco.llm.cache_events",
        "cco.llm.errors",
    }

    resource = attrs(request.resource_metrics[0].resource)
    assert resource["service.name"] == "cco-exporter"
    assert resource["telemetry.sdk.language"] == "python"

    cost = metrics["cco.llm.cost"]
    assert cost.unit == "USD"
    assert cost.sum.is_monotonic
    assert cost.sum.aggregation_temporality == metrics_pb2.AGGREGATION_TEMPORALITY_CUMULATIVE
    assert sum_values(cost) == pytest.approx(nanos_to_usd(total[COST]), abs=1e-9)
    assert sum_values(metrics["cco.llm.cache_savings"]) == pytest.approx(
        nanos_to_usd(total[SAVINGS]), abs=1e-9
    )
    start_ns = int(exporter.started_at * 1e9)
    assert {p.start_time_unix_nano for p in cost.sum.data_points} == {start_ns}
    assert all(p.time_unix_nano >= start_ns for p in cost.sum.data_points)

    usage = metrics["gen_ai.client.token.usage"]
    assert usage.unit == "{token}"
    for token_type, field in [
        ("input", TOKENS_IN),
        ("output", TOKENS_OUT),
        ("cache_read", CACHE_READ),
        ("cache_creation", CACHE_CREATION),
    ]:
        count, tokens, buckets = histogram_totals(usage, **{"gen_ai.token.type": token_type})
        assert (count, tokens) == (total[CALLS], total[field])
        assert buckets == [total[CALLS]]
    assert all(not p.explicit_bounds and not p.HasField("min") for p in usage.histogram.data_points)

    duration = metrics["gen_ai.client.operation.duration"]
    assert duration.unit == "s"
    count, seconds, buckets = histogram_totals(duration)
    assert count == total[LATENCY_COUNT] == 3
    assert seconds == pytest.approx(total[LATENCY_SUM] / 1e6)
    assert buckets == total[HIST_OFFSET:]
    assert list(duration.histogram.data_points[0].explicit_bounds) == list(HISTOGRAM_BOUNDS_S)

    requests = metrics["cco.llm.requests"]
    assert sum_values(requests, **{"cco.status": "ok"}) == total[CALLS] - total[ERRORS] == 3
    assert sum_values(requests, **{"cco.status": "error"}) == total[ERRORS] == 1
    assert all(isinstance(p.as_int, int) and p.as_int > 0 for p in requests.sum.data_points)

    sonnet = [
        attrs(p)
        for p in cost.sum.data_points
        if attrs(p)["gen_ai.request.model"] == "claude-sonnet-4-5"
    ]
    assert sonnet == [
        {
            "gen_ai.operation.name": "chat",
            "gen_ai.provider.name": "anthropic",
            "gen_ai.request.model": "claude-sonnet-4-5",
            "cco.tier": "sonnet",
            "cco.project": "p1",
            "cco.agent": "a",
        }
    ]
    opus = [attrs(p) for p in cost.sum.data_points if attrs(p)["cco.project"] == "p2"]
    assert all("cco.agent" not in a for a in opus)  # no agent: the attribute is left out

    assert sum_values(metrics["cco.llm.cache_events"], **{"cco.cache.result": "hit"}) == 1
    assert sum_values(metrics["cco.llm.cache_events"], **{"cco.cache.result": "miss"}) == 2
    (override,) = metrics["cco.llm.model_overrides"].sum.data_points
    assert attrs(override) == {
        "cco.override.from_model": "claude-opus-4-1",
        "cco.override.to_model": "gpt-4o",
        "cco.override.reason": "unspecified",
    }
    (error,) = metrics["cco.llm.errors"].sum.data_points
    assert (attrs(error), error.as_int) == ({"error.type": "overloaded"}, 1)


async def test_dead_collector_fails_fast_and_ingest_goes_on(
    exporter: Exporter, receiver: Receiver
) -> None:
    receiver.stop()  # nothing listens on the port any more: connection refused
    record_mix(exporter)
    pusher = pusher_for(exporter, receiver.url, timeout_s=0.5)
    try:
        started = time.monotonic()
        assert not await pusher.export_once()
        assert time.monotonic() - started < BOUND_S
        assert exports(exporter, "failure") == 1
        assert exporter.record(ApiCall(model="claude-haiku-4-5", input_tokens=10))
        assert not await pusher.export_once()
        assert exports(exporter, "failure") == 2
    finally:
        await pusher.close()
    assert exports(exporter, "success") == 0


async def test_slow_collector_fails_within_the_timeout_without_blocking_ingest(
    exporter: Exporter, receiver: Receiver
) -> None:
    receiver.mode, receiver.delay = "slow", BOUND_S
    record_mix(exporter)
    pusher = pusher_for(exporter, receiver.url, timeout_s=0.3)
    try:
        started = time.monotonic()
        export = asyncio.create_task(pusher.export_once())
        await asyncio.sleep(0.05)
        # The export waits in a thread: the event loop, and so ingest, carries on meanwhile.
        assert not export.done()
        assert exporter.record(ApiCall(model="claude-haiku-4-5", input_tokens=10))
        assert not await export
        assert time.monotonic() - started < BOUND_S / 2
        assert exports(exporter, "failure") == 1
    finally:
        receiver.release.set()
        receiver.mode = "ok"
        await pusher.close()


async def test_error_status_is_a_failure_and_the_next_export_carries_on(
    exporter: Exporter, receiver: Receiver, caplog: pytest.LogCaptureFixture
) -> None:
    receiver.mode = "500"
    record_mix(exporter)
    pusher = pusher_for(exporter, receiver.url)
    try:
        with caplog.at_level(logging.WARNING, logger="exporter.otlp"):
            assert not await pusher.export_once()
        assert exports(exporter, "failure") == 1
        warnings = [r for r in caplog.records if r.name == "exporter.otlp"]
        assert len(warnings) == 1
        assert receiver.url in warnings[0].getMessage()

        exporter.record(ApiCall(model="claude-haiku-4-5", input_tokens=10, output_tokens=1))
        receiver.mode = "ok"
        assert await pusher.export_once()
    finally:
        await pusher.close()
    assert exports(exporter, "success") == 2
    requests = metrics_of(receiver.requests[0])["cco.llm.requests"]
    assert sum_values(requests) == exporter.aggregator.grand_total()[CALLS] == 5


async def test_headers_come_from_the_environment_and_stay_out_of_logs(
    exporter: Exporter,
    receiver: Receiver,
    caplog: pytest.LogCaptureFixture,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setenv("OTEL_EXPORTER_OTLP_METRICS_HEADERS", "x-api-key=s3cret-value")
    receiver.mode = "500"
    record_mix(exporter)
    pusher = pusher_for(exporter, receiver.url)
    try:
        with caplog.at_level(logging.DEBUG):
            assert not await pusher.export_once()
    finally:
        receiver.mode = "ok"
        await pusher.close()
    assert receiver.headers[0].get("x-api-key") == "s3cret-value"
    assert "s3cret" not in caplog.text
    assert "s3cret" not in repr(pusher.config)


async def test_delta_sends_only_what_changed_since_the_last_export(
    exporter: Exporter, receiver: Receiver
) -> None:
    # Totals that exist before the pusher starts (restored from SQLite) are not sent again.
    exporter.record(ApiCall(model="claude-opus-4-1", input_tokens=9, project="old"))
    pusher = pusher_for(exporter, receiver.url, temporality="delta")
    try:
        exporter.record(ApiCall(model="claude-sonnet-4-5", input_tokens=1000, latency_ms=20.0))
        exporter.record(ApiCall(model="claude-sonnet-4-5", input_tokens=500, latency_ms=30.0))
        assert await pusher.export_once()
        exporter.record(ApiCall(model="claude-sonnet-4-5", input_tokens=7, latency_ms=3000.0))
        assert await pusher.export_once()
        # Nothing new: nothing to send, no request.
        assert await pusher.export_once()
        assert len(receiver.requests) == 2
    finally:
        await pusher.close()
    assert len(receiver.requests) == 2
    first, second = (metrics_of(r) for r in receiver.requests)

    assert sum_values(first["cco.llm.requests"]) == 2
    usage = first["gen_ai.client.token.usage"]
    assert usage.histogram.aggregation_temporality == metrics_pb2.AGGREGATION_TEMPORALITY_DELTA
    assert histogram_totals(usage, **{"gen_ai.token.type": "input"})[:2] == (2, 1500)
    assert all(attrs(p)["cco.project"] != "old" for p in usage.histogram.data_points)

    assert sum_values(second["cco.llm.requests"]) == 1
    assert histogram_totals(second["gen_ai.client.token.usage"], **{"gen_ai.token.type": "input"})[
        :2
    ] == (1, 7)
    count, _, buckets = histogram_totals(second["gen_ai.client.operation.duration"])
    assert count == 1
    assert buckets[HISTOGRAM_BOUNDS_S.index(5.12)] == 1  # 3 s lands in (2.56, 5.12]
    # Each delta starts where the previous one ended.
    first_end = {p.time_unix_nano for p in first["cco.llm.requests"].sum.data_points}
    second_start = {p.start_time_unix_nano for p in second["cco.llm.requests"].sum.data_points}
    assert first_end == second_start


async def test_delta_after_a_failure_carries_both_intervals(
    exporter: Exporter, receiver: Receiver
) -> None:
    pusher = pusher_for(exporter, receiver.url, temporality="delta")
    try:
        exporter.record(ApiCall(model="claude-sonnet-4-5", input_tokens=1))
        receiver.mode = "500"
        assert not await pusher.export_once()
        exporter.record(ApiCall(model="claude-sonnet-4-5", input_tokens=2))
        receiver.mode = "ok"
        assert await pusher.export_once()
    finally:
        await pusher.close()
    (request,) = receiver.requests
    usage = metrics_of(request)["gen_ai.client.token.usage"]
    assert histogram_totals(usage, **{"gen_ai.token.type": "input"})[:2] == (2, 3)


def test_delta_holds_the_baseline_when_a_total_goes_down() -> None:
    key = ("cco.llm.requests", (("cco.status", "ok"),))
    new = ("cco.llm.requests", (("cco.status", "error"),))
    changes, kept = delta_points({key: [3], new: [1]}, {key: [5]})
    # A retracted duplicate: no negative delta; the old baseline absorbs the next increase.
    assert changes == {new: [1]}
    assert kept == {key: [5], new: [1]}
    changes, kept = delta_points({key: [7], new: [1]}, kept)
    assert changes == {key: [2], new: [0]}
    assert kept == {key: [7], new: [1]}


async def test_label_values_beyond_the_cap_fold_into_other(tmp_path: Path) -> None:
    exporter = await Exporter.start(Settings(db_path=str(tmp_path / "m.db"), max_projects=1))
    receiver = Receiver()
    try:
        for project in ("p1", "p2", "p3", "p3"):
            exporter.record(ApiCall(model="claude-sonnet-4-5", input_tokens=100, project=project))
        pusher = pusher_for(exporter, receiver.url)
        try:
            assert await pusher.export_once()
        finally:
            await pusher.close()
        by_project = exporter.aggregator.breakdown("project")
        cost = metrics_of(receiver.requests[0])["cco.llm.cost"]
        assert {attrs(p)["cco.project"] for p in cost.sum.data_points} == {"p1", OTHER}
        folded = by_project["p2"][COST] + by_project["p3"][COST]
        assert sum_values(cost, **{"cco.project": OTHER}) == pytest.approx(
            nanos_to_usd(folded), abs=1e-9
        )
        requests = metrics_of(receiver.requests[0])["cco.llm.requests"]
        assert sum_values(requests, **{"cco.project": OTHER}) == 3
        assert exporter.self_counters[("label_overflow", ("project",))] == 2
    finally:
        receiver.stop()
        await exporter.close()


async def test_an_overrunning_export_is_never_doubled(
    exporter: Exporter, receiver: Receiver
) -> None:
    # A collector that answers 200 and then sends its body one byte at a time defeats the
    # per-read socket timeout; the pusher stops waiting after timeout + grace and skips ticks
    # until that export ends, so at most one is ever in flight.
    receiver.mode = "trickle"
    record_mix(exporter)
    pusher = pusher_for(exporter, receiver.url, timeout_s=0.2)
    try:
        started = time.monotonic()
        assert not await pusher.export_once()
        assert time.monotonic() - started < BOUND_S
        assert not await pusher.export_once()  # skipped: the first is still running
        assert len(receiver.headers) == 1
        assert exports(exporter, "failure") == 0  # counted once the thread ends
        receiver.release.set()
        deadline = time.monotonic() + BOUND_S
        while exports(exporter, "failure") == 0 and time.monotonic() < deadline:
            await asyncio.sleep(0.02)
        assert exports(exporter, "failure") == 1
    finally:
        receiver.mode = "ok"
        await pusher.close()


async def test_the_pusher_exports_periodically_and_once_more_on_exit(
    exporter: Exporter, receiver: Receiver
) -> None:
    record_mix(exporter)
    config = OtlpConfig(endpoint=receiver.url, interval_s=0.05, timeout_s=TIMEOUT_S)
    async with OtlpPusher(exporter, config, bounds_for(exporter)):
        deadline = time.monotonic() + BOUND_S
        while len(receiver.requests) < 2 and time.monotonic() < deadline:
            await asyncio.sleep(0.02)
        assert len(receiver.requests) >= 2
        sent_while_running = len(receiver.requests)
    assert len(receiver.requests) == sent_while_running + 1
    assert exports(exporter, "success") == len(receiver.requests)
    assert exports(exporter, "failure") == 0


async def test_grpc_export_reaches_a_grpc_collector(exporter: Exporter) -> None:
    received: list[ExportMetricsServiceRequest] = []

    class Service(metrics_service_pb2_grpc.MetricsServiceServicer):
        def Export(
            self, request: ExportMetricsServiceRequest, context: Any
        ) -> ExportMetricsServiceResponse:
            received.append(request)
            return ExportMetricsServiceResponse()

    server = grpc.server(futures.ThreadPoolExecutor(max_workers=2))
    metrics_service_pb2_grpc.add_MetricsServiceServicer_to_server(  # type: ignore[no-untyped-call]
        Service(), server
    )
    port = server.add_insecure_port("127.0.0.1:0")
    server.start()
    try:
        record_mix(exporter)
        pusher = pusher_for(exporter, f"http://127.0.0.1:{port}", protocol="grpc")
        try:
            assert await pusher.export_once()
        finally:
            await pusher.close()
    finally:
        server.stop(None).wait(BOUND_S)
    cost = metrics_of(received[0])["cco.llm.cost"]
    total = exporter.aggregator.grand_total()
    assert sum_values(cost) == pytest.approx(nanos_to_usd(total[COST]), abs=1e-9)


# -- configuration ------------------------------------------------------------------------------


def test_otlp_is_off_without_an_endpoint(tmp_path: Path) -> None:
    assert otlp_config(Settings(db_path=str(tmp_path / "m.db")), {}) is None


@pytest.mark.parametrize(
    ("settings", "environ", "endpoint", "protocol"),
    [
        (
            {},
            {"OTEL_EXPORTER_OTLP_ENDPOINT": "http://c:4318"},
            "http://c:4318/v1/metrics",
            "http/protobuf",
        ),
        (
            {},
            {"OTEL_EXPORTER_OTLP_ENDPOINT": "http://c:4318/"},
            "http://c:4318/v1/metrics",
            "http/protobuf",
        ),
        (
            {},
            {
                "OTEL_EXPORTER_OTLP_ENDPOINT": "http://c:4318",
                "OTEL_EXPORTER_OTLP_METRICS_ENDPOINT": "https://m:443/custom",
            },
            "https://m:443/custom",
            "http/protobuf",
        ),
        (
            {},
            {"OTEL_EXPORTER_OTLP_ENDPOINT": "http://c:4317", "OTEL_EXPORTER_OTLP_PROTOCOL": "grpc"},
            "http://c:4317",
            "grpc",
        ),
        (
            {},
            {
                "OTEL_EXPORTER_OTLP_ENDPOINT": "http://c:4317",
                "OTEL_EXPORTER_OTLP_PROTOCOL": "http/protobuf",
                "OTEL_EXPORTER_OTLP_METRICS_PROTOCOL": "grpc",
            },
            "http://c:4317",
            "grpc",
        ),
        # Settings win over the environment; a settings URL without a path gets the path.
        (
            {"otlp_endpoint": "http://s:4318"},
            {"OTEL_EXPORTER_OTLP_METRICS_ENDPOINT": "http://m:4318/x"},
            "http://s:4318/v1/metrics",
            "http/protobuf",
        ),
        ({"otlp_endpoint": "http://s:4318/in"}, {}, "http://s:4318/in", "http/protobuf"),
        (
            {"otlp_endpoint": "http://s:4317", "otlp_protocol": "grpc"},
            {"OTEL_EXPORTER_OTLP_PROTOCOL": "http/protobuf"},
            "http://s:4317",
            "grpc",
        ),
        # A protocol the Python SDK cannot speak (set for another tool) falls back to http.
        (
            {},
            {
                "OTEL_EXPORTER_OTLP_ENDPOINT": "http://c:4318",
                "OTEL_EXPORTER_OTLP_PROTOCOL": "http/json",
            },
            "http://c:4318/v1/metrics",
            "http/protobuf",
        ),
    ],
)
def test_endpoint_and_protocol_resolution(
    tmp_path: Path,
    settings: dict[str, Any],
    environ: dict[str, str],
    endpoint: str,
    protocol: str,
) -> None:
    config = otlp_config(Settings(db_path=str(tmp_path / "m.db"), **settings), environ)
    assert config is not None
    assert (config.endpoint, config.protocol) == (endpoint, protocol)


def test_interval_temporality_and_resource_from_the_environment(tmp_path: Path) -> None:
    environ = {
        "OTEL_EXPORTER_OTLP_ENDPOINT": "http://c:4318",
        "OTEL_METRIC_EXPORT_INTERVAL": "15000",
        "OTEL_EXPORTER_OTLP_METRICS_TEMPORALITY_PREFERENCE": "Delta",
        "OTEL_RESOURCE_ATTRIBUTES": "deployment.environment=dev,team=a%20b,service.name=ignored",
        "OTEL_SERVICE_NAME": "my-exporter",
    }
    settings = Settings(db_path=str(tmp_path / "m.db"), otlp_timeout=3.0)
    config = otlp_config(settings, environ)
    assert config is not None
    assert (config.interval_s, config.timeout_s, config.temporality) == (15.0, 3.0, "delta")
    assert config.service_name == "my-exporter"
    assert config.resource_attributes == {"deployment.environment": "dev", "team": "a b"}
    resource = dict(config.resource().attributes)
    assert resource["service.name"] == "my-exporter"
    assert resource["team"] == "a b"

    # Settings win; the resource's own service.name is used without OTEL_SERVICE_NAME.
    settings = Settings(db_path=str(tmp_path / "m.db"), otlp_interval=5.0)
    environ = {**environ, "OTEL_SERVICE_NAME": "", "OTEL_METRIC_EXPORT_INTERVAL": "nonsense"}
    config = otlp_config(settings, environ)
    assert config is not None
    assert (config.interval_s, config.service_name) == (5.0, "ignored")

    # Defaults: 60 s, cumulative, cco-exporter; a bad interval falls back to the default.
    environ = {"OTEL_EXPORTER_OTLP_ENDPOINT": "http://c:4318", "OTEL_METRIC_EXPORT_INTERVAL": "-1"}
    config = otlp_config(Settings(db_path=str(tmp_path / "m.db")), environ)
    assert config is not None
    assert (config.interval_s, config.temporality, config.service_name) == (
        60.0,
        "cumulative",
        "cco-exporter",
    )
    delta = Settings(db_path=str(tmp_path / "m.db"), otlp_temporality="delta")
    config = otlp_config(delta, environ)
    assert config is not None
    assert config.temporality == "delta"


def test_pushing_to_this_exporter_itself_is_refused(tmp_path: Path) -> None:
    # Claude Code users export OTEL_EXPORTER_OTLP_ENDPOINT pointing at this exporter.
    settings = Settings(db_path=str(tmp_path / "m.db"), port=9469)
    environ = {"OTEL_EXPORTER_OTLP_ENDPOINT": "http://localhost:9469"}
    assert otlp_config(settings, environ) is None
    environ = {"OTEL_EXPORTER_OTLP_ENDPOINT": "http://localhost:4318"}
    assert otlp_config(settings, environ) is not None
