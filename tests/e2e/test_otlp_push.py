"""The server pushes OTLP to a real receiver on 127.0.0.1; a dead receiver never blocks ingest."""

from __future__ import annotations

import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
from opentelemetry.proto.collector.metrics.v1.metrics_service_pb2 import (
    ExportMetricsServiceRequest,
)

from tests.e2e.conftest import Server
from tests.e2e.test_service import CALLS
from tests.otlp_receiver import Receiver

WAIT_S = 15.0


@pytest.fixture
def receiver() -> Iterator[Receiver]:
    running = Receiver()
    try:
        yield running
    finally:
        running.stop()


def _sums(request: ExportMetricsServiceRequest) -> dict[str, float]:
    """Total of every Sum metric and the count of every histogram, by metric name."""
    out: dict[str, float] = {}
    for resource in request.resource_metrics:
        for scope in resource.scope_metrics:
            for metric in scope.metrics:
                if metric.HasField("sum"):
                    value = sum(p.as_double or p.as_int for p in metric.sum.data_points)
                elif metric.HasField("histogram"):
                    value = sum(p.count for p in metric.histogram.data_points)
                else:
                    continue
                out[metric.name] = out.get(metric.name, 0.0) + value
    return out


def _wait_for(receiver: Receiver, calls: int) -> dict[str, float]:
    deadline = time.monotonic() + WAIT_S
    while time.monotonic() < deadline:
        if receiver.requests:
            sums = _sums(receiver.requests[-1])
            if sums.get("cco.llm.requests") == calls:
                return sums
        time.sleep(0.1)
    raise AssertionError(f"no export with {calls} calls within {WAIT_S}s")


def _metric_value(client: httpx.Client, name: str, **labels: str) -> float:
    total = 0.0
    for line in client.get("/metrics").text.splitlines():
        if line.startswith(name + "{") and all(f'{k}="{v}"' in line for k, v in labels.items()):
            total += float(line.rsplit(" ", 1)[1])
    return total


def test_otlp_values_equal_rest_and_a_dead_collector_does_not_block_ingest(
    server_factory: type[Server], tmp_path: Path, receiver: Receiver
) -> None:
    env = {
        "CCO_EXPORTER_OTLP_ENDPOINT": receiver.base,
        "CCO_EXPORTER_OTLP_INTERVAL": "0.3",
        "CCO_EXPORTER_OTLP_TIMEOUT": "1",
        "OTEL_SERVICE_NAME": "cco-e2e",
    }
    server = server_factory(tmp_path / "m.db", env=env).start()
    with server.client() as client:
        assert client.post("/api/events", json=CALLS).status_code == 202
        stats = client.get("/api/metrics/stats").json()["summary"]
        health = client.get("/api/metrics/health").json()
        sums = _wait_for(receiver, 3)
        assert health["otlp_enabled"] is True
        assert sums["cco.llm.cost"] == pytest.approx(stats["total_cost_usd"], abs=1e-9)
        assert sums["gen_ai.client.operation.duration"] == 3
        resource = receiver.requests[-1].resource_metrics[0].resource
        names = {a.key: a.value.string_value for a in resource.attributes}
        assert names["service.name"] == "cco-e2e"

        receiver.stop()
        for _ in range(5):
            answer = client.post("/api/events", json=CALLS)
            assert answer.status_code == 202
        deadline = time.monotonic() + WAIT_S
        while _metric_value(client, "cco_exporter_otlp_exports_total", result="failure") < 1:
            assert time.monotonic() < deadline, "the failed export was never counted"
            time.sleep(0.2)
        # /metrics renders live (REST reads may be up to 1 s old, from their TTL cache).
        # Two of the three calls carry a request_id: each repeat adds only the third.
        assert _metric_value(client, "cco_llm_requests_total") == 3 + 5
        assert client.get("/api/metrics/health").json()["status"] == "ok"
    assert server.stop() == 0
