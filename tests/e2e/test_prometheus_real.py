"""The Grafana dashboards against a real Prometheus scraping two real exporters (slow: ~20 s).

Two `cco-exporter serve` processes are fed by `cco-exporter simulate`; a real `prometheus`
binary scrapes both every second. Every query of every dashboard panel, with the template
variables filled in as Grafana would, must parse and return data, and the spend Prometheus sums
over both exporters must equal what their REST APIs report.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from tests.e2e.conftest import Server, free_port

DASHBOARDS = Path(__file__).parents[2] / "grafana" / "dashboards"
#: What Grafana puts in place of each variable when every instance, project and model is
#: selected, for a 5-minute range scraped every second (a rate window of 15 scrapes).
VARIABLES = {
    "instance": ".*",
    "project": ".*",
    "model": ".*",
    "__rate_interval": "15s",
    "__interval": "5s",
    "__range": "5m",
}
VARIABLE = re.compile(r"\$\{?(" + "|".join(VARIABLES) + r")\}?\b")
BUDGETS = {"CCO_EXPORTER_BUDGET_DAILY_USD": "10", "CCO_EXPORTER_BUDGET_MONTHLY_USD": "200"}
#: REST answers straight from the aggregate, so they can be compared the moment load stops.
NO_CACHE = {"CCO_EXPORTER_CACHE_TTL": "0"}
#: Bound on each wait for Prometheus (ready, targets up, a scrape after the load).
WAIT_S = 30.0
#: Rate windows need this much scraped history before the panels' queries are sent.
HISTORY_S = 10.0
JOB = "cco-exporter"
SIMULATE = (sys.executable, "-m", "exporter", "simulate", "--rate", "200", "--duration", "5")


def test_slow_real_prometheus_answers_every_dashboard_query_and_sums_spend_exactly(
    server_factory: type[Server], tmp_path: Path
) -> None:
    prometheus = _prometheus_binary()
    # One exporter has the troubles the health dashboard shows: a label cap that folds projects,
    # an OTLP collector that is not there, and below a rejected, an unpriced and a repeated event.
    troubled = server_factory(
        tmp_path / "a" / "metrics.db",
        env={
            **BUDGETS,
            **NO_CACHE,
            "CCO_EXPORTER_MAX_PROJECTS": "3",
            "CCO_EXPORTER_OTLP_ENDPOINT": f"http://127.0.0.1:{free_port()}",
            "CCO_EXPORTER_OTLP_INTERVAL": "1",
            "CCO_EXPORTER_OTLP_TIMEOUT": "1",
        },
    )
    healthy = server_factory(tmp_path / "b" / "metrics.db", env={**BUDGETS, **NO_CACHE})
    servers = (troubled, healthy)
    for server in servers:
        server.db.parent.mkdir()

    port = free_port()
    prometheus_url = f"http://127.0.0.1:{port}"
    config = tmp_path / "prometheus.yml"
    config.write_text(_scrape_config([f"127.0.0.1:{server.port}" for server in servers]))
    log = tmp_path / "prometheus.log"
    with log.open("wb") as out:
        process = subprocess.Popen(
            [
                prometheus,
                f"--config.file={config}",
                f"--storage.tsdb.path={tmp_path / 'tsdb'}",
                f"--web.listen-address=127.0.0.1:{port}",
            ],
            stdout=out,
            stderr=subprocess.STDOUT,
            cwd=tmp_path,
        )
    try:
        for server in servers:
            server.start()
        with httpx.Client(base_url=prometheus_url, timeout=5) as client:
            _wait_until_ready(client, process, log)
            scraping_since = _wait_for_targets(client, len(servers))

            _feed(servers, troubled)
            load_stopped = time.time()
            # Rate windows need history, and the last scrape must have seen every event.
            time.sleep(max(0.0, scraping_since + HISTORY_S - time.time()))
            _wait_for_scrape_after(client, load_stopped, len(servers))

            failures = [
                f"{where}: {problem}\n    {query}"
                for where, query in _dashboard_queries()
                if (problem := _problem(client, query))
            ]
            assert not failures, f"{len(failures)} dashboard queries failed:\n" + "\n".join(
                failures
            )

            reported = _instant(client, f'sum(cco_llm_cost_usd_total{{job="{JOB}"}})')
            [sample] = reported["data"]["result"]
            rest_total = sum(_rest_spend(server) for server in servers)
            assert rest_total > 0
            assert abs(float(sample["value"][1]) - rest_total) <= 1e-6
    finally:
        process.terminate()
        try:
            process.wait(10)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait(10)


def _prometheus_binary() -> str:
    path = shutil.which("prometheus")
    if path is None:
        reason = "the prometheus binary is not installed (Debian package prometheus)"
        if os.environ.get("CI"):
            pytest.fail(f"{reason}; CI must have it")
        pytest.skip(reason)
    return path


def _scrape_config(targets: list[str]) -> str:
    # JSON is YAML: no YAML writer needed.
    return json.dumps(
        {
            "global": {"scrape_interval": "1s", "scrape_timeout": "1s"},
            "scrape_configs": [{"job_name": JOB, "static_configs": [{"targets": targets}]}],
        },
        indent=2,
    )


def _feed(servers: tuple[Server, ...], troubled: Server) -> None:
    """Run a simulation against each server (at once) and send `troubled` its odd events."""
    simulations = [
        subprocess.Popen(
            [*SIMULATE, "--url", server.url, "--seed", str(seed)],
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            env=server.env,
        )
        for seed, server in enumerate(servers, start=1)
    ]
    try:
        with troubled.client() as client:
            unpriced = {"model": "house-model-7b", "input_tokens": 10, "request_id": "r-1"}
            assert client.post("/api/events", json=unpriced).status_code == 202
            assert client.post("/api/events", json=unpriced).json()["duplicates"] == 1
            assert client.post("/api/events", json={"input_tokens": -1}).status_code == 422
        for simulation in simulations:
            output, _ = simulation.communicate(timeout=WAIT_S)
            assert simulation.returncode == 0, output.decode()
            assert b"rejected 0" in output, output.decode()
    finally:
        for simulation in simulations:
            if simulation.poll() is None:
                simulation.kill()
                simulation.wait(10)


def _wait_until_ready(client: httpx.Client, process: subprocess.Popen[bytes], log: Path) -> None:
    deadline = time.monotonic() + WAIT_S
    while time.monotonic() < deadline:
        if process.poll() is not None:
            pytest.fail(f"prometheus exited at start:\n{log.read_text(errors='replace')}")
        try:
            if client.get("/-/ready").status_code == 200:
                return
        except httpx.TransportError:
            pass
        time.sleep(0.1)
    pytest.fail(f"prometheus not ready within {WAIT_S}s:\n{log.read_text(errors='replace')}")


def _wait_for_targets(client: httpx.Client, count: int) -> float:
    """Wait until every target has been scraped successfully; the time that happened."""
    deadline = time.monotonic() + WAIT_S
    while time.monotonic() < deadline:
        result = _instant(client, f'up{{job="{JOB}"}} == 1')["data"]["result"]
        if len(result) == count:
            return time.time()
        time.sleep(0.2)
    pytest.fail(f"prometheus did not scrape {count} exporters within {WAIT_S}s")


def _wait_for_scrape_after(client: httpx.Client, moment: float, count: int) -> None:
    """Wait until every target has been scraped again after `moment` (Unix seconds)."""
    deadline = time.monotonic() + WAIT_S
    query = f'timestamp(up{{job="{JOB}"}} == 1) > {moment:.3f}'
    while time.monotonic() < deadline:
        if len(_instant(client, query)["data"]["result"]) == count:
            return
        time.sleep(0.2)
    pytest.fail(f"no scrape of all {count} exporters within {WAIT_S}s after the load stopped")


def _dashboard_queries() -> Iterator[tuple[str, str]]:
    """(where, PromQL with the variables filled in) of every panel target of every dashboard."""
    for path in sorted(DASHBOARDS.glob("*.json")):
        board = json.loads(path.read_text())
        for panel in _panels(board["panels"]):
            for target in panel.get("targets", []):
                where = f"{path.stem} #{panel['id']} {panel['title']!r} {target['refId']}"
                yield where, VARIABLE.sub(lambda m: VARIABLES[m[1]], target["expr"])


def _panels(panels: list[dict[str, Any]]) -> Iterator[dict[str, Any]]:
    for panel in panels:
        yield panel
        yield from _panels(panel.get("panels", []))


def _problem(client: httpx.Client, query: str) -> str:
    """Why the query is no good for a panel ('' when it parses and returns data)."""
    answer = _instant(client, query)
    if answer.get("status") != "success":
        return f"{answer.get('errorType')}: {answer.get('error')}"
    if not answer["data"]["result"]:
        return "no series"
    return ""


def _instant(client: httpx.Client, query: str) -> dict[str, Any]:
    response = client.get("/api/v1/query", params={"query": query, "time": f"{time.time():.3f}"})
    answer: dict[str, Any] = response.json()
    return answer


def _rest_spend(server: Server) -> float:
    with server.client() as client:
        projects = client.get("/api/metrics/projects").json()["projects"]
    return sum(float(project["cost"]) for project in projects)
