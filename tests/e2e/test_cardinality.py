"""Label cardinality: 100,000 distinct projects and models, each its own label set.

`/metrics` must stay bounded (values past the caps folded into `__other__`, each folded value
counted once in `cco_exporter_label_overflow_total{label}`) and still add up to the REST totals,
while REST and SQLite keep every real name. The figures (ingest rate, RSS, scrape time) are
printed; run with `-s` to see them, and with `CCO_CARDINALITY_LABELS=N` for another size.
"""

from __future__ import annotations

import json
import os
import time
from pathlib import Path

import httpx
import psutil
import pytest
from prometheus_client.parser import text_string_to_metric_families

from tests.e2e.conftest import Server

LABELS = int(os.environ.get("CCO_CARDINALITY_LABELS", "100000"))
BATCH = 1000
#: The shipped caps (README: 200 models, 500 projects).
MAX_MODELS, MAX_PROJECTS = 200, 500


def _batch(start: int) -> bytes:
    """Events `start`.. of the run: event i is the only call of project-i and model-i."""
    return json.dumps(
        [
            {
                "model": f"model-{i:06d}",
                "project": f"project-{i:06d}",
                "input_tokens": i % 1000,
                "output_tokens": 1,
                "cost_usd": (i % 7 + 1) / 1000,
            }
            for i in range(start, min(start + BATCH, LABELS))
        ]
    ).encode()


def _rss_mib(server: Server) -> float:
    assert server.process is not None
    return psutil.Process(server.process.pid).memory_info().rss / 2**20


def _samples(text: str, family: str) -> list[tuple[dict[str, str], float]]:
    for metric in text_string_to_metric_families(text):
        if metric.name == family:
            return [(s.labels, s.value) for s in metric.samples if s.name.endswith("_total")]
    raise AssertionError(f"no {family} in /metrics")


def test_label_sets_past_the_caps_fold_in_metrics_and_keep_their_names_in_rest(
    server_factory: type[Server], tmp_path: Path
) -> None:
    server = server_factory(tmp_path / "m.db", env={"CCO_EXPORTER_CACHE_TTL": "0"}).start()
    figures: dict[str, float] = {"labels": LABELS, "rss_start_mib": _rss_mib(server)}
    with server.client() as client:
        client.timeout = httpx.Timeout(60)
        started = time.perf_counter()
        for start in range(0, LABELS, BATCH):
            answer = client.post(
                "/api/events", content=_batch(start), headers={"Content-Type": "application/json"}
            )
            assert answer.status_code == 202, answer.text
        figures["ingest_s"] = time.perf_counter() - started
        # One more call of label set 0, durable: it returns once everything before is committed.
        last = {"model": "model-000000", "project": "project-000000", "cost_usd": 0.001}
        durable = client.post("/api/events", json=last, params={"durable": "true"})
        assert durable.status_code == 201, durable.text
        figures["ingest_and_commit_s"] = time.perf_counter() - started
        figures["rss_after_ingest_mib"] = _rss_mib(server)
        scrapes = []
        for _ in range(3):
            started = time.perf_counter()
            exposition = client.get("/metrics").text
            scrapes.append(time.perf_counter() - started)
        figures["scrape_first_s"], figures["scrape_best_s"] = scrapes[0], min(scrapes[1:])
        figures["scrape_bytes"] = len(exposition)
        started = time.perf_counter()
        projects = client.get("/api/metrics/projects").json()["projects"]
        figures["rest_projects_s"] = time.perf_counter() - started
        models = client.get("/api/metrics/models").json()["models"]
        figures["rss_after_reads_mib"] = _rss_mib(server)
    figures["db_mib"] = sum(f.stat().st_size for f in tmp_path.glob("m.db*")) / 2**20
    print("\ncardinality figures:", json.dumps({k: round(v, 3) for k, v in figures.items()}))

    calls = LABELS + 1
    requests = _samples(exposition, "cco_llm_requests")
    model_values = {labels["model"] for labels, _ in requests}
    project_values = {labels["project"] for labels, _ in requests}
    # The first MAX_* values keep their names; every later one is summed into __other__.
    assert len(model_values) == MAX_MODELS + 1
    assert len(project_values) == MAX_PROJECTS + 1
    assert "__other__" in model_values
    assert "__other__" in project_values
    assert {f"model-{i:06d}" for i in range(MAX_MODELS)} < model_values
    overflow = {
        labels["label"]: value
        for labels, value in _samples(exposition, "cco_exporter_label_overflow")
    }
    assert overflow["model"] == LABELS - MAX_MODELS
    assert overflow["project"] == LABELS - MAX_PROJECTS
    # Folding moves sums, it loses none: /metrics adds up to what REST says.
    assert sum(value for _, value in requests) == calls
    cost = sum(value for _, value in _samples(exposition, "cco_llm_cost_usd"))
    rest_cost = sum(p["cost"] for p in projects)
    assert cost == pytest.approx(rest_cost, rel=1e-9)
    tokens_in = sum(
        value
        for labels, value in _samples(exposition, "cco_llm_tokens")
        if labels["type"] == "input"
    )
    assert tokens_in == sum(p["tokensIn"] for p in projects)
    # REST and SQLite keep every real name.
    assert len(projects) == LABELS
    assert {p["name"] for p in projects} == {f"project-{i:06d}" for i in range(LABELS)}
    assert sum(p["calls"] for p in projects) == calls
    assert len(models) == LABELS
    assert server.query("SELECT count(DISTINCT project), count(DISTINCT model) FROM series") == [
        (LABELS, LABELS)
    ]
    assert server.query("SELECT sum(calls) FROM series") == [(calls,)]
