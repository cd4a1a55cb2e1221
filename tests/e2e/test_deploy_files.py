"""The files of deploy/: Prometheus rules and configs through promtool and a real Prometheus
scraping a real exporter, and the wiring of the compose stack, the collector and the image."""

from __future__ import annotations

import fnmatch
import os
import re
import shutil
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path, PurePosixPath
from typing import Any

import httpx
import pytest
import yaml

from tests.e2e.conftest import Server, free_port

REPO = Path(__file__).resolve().parents[2]
DEPLOY = REPO / "deploy"
RULES_DIR = DEPLOY / "prometheus" / "rules"
RULE_FILES = sorted(RULES_DIR.glob("*.rules.yml"))
RULE_TESTS = sorted(RULES_DIR.glob("*.test.yml"))
PROMETHEUS_CONFIGS = [DEPLOY / "prometheus.yml", DEPLOY / "prometheus" / "prometheus.local.yml"]
JOB = "cco-exporter"
#: Components of the core OpenTelemetry Collector distribution (otel/opentelemetry-collector)
#: that a configuration here may use.
CORE_COLLECTOR = {
    "receivers": {"otlp"},
    "processors": {"batch", "memory_limiter"},
    "exporters": {"debug", "otlp", "otlphttp", "prometheus"},
}
# A metric read by a rule: a name with no colon (recorded series have one), its matchers if any.
_SELECTOR = re.compile(r"(?<![\w:])(cco_[a-z0-9_]+|up)\b(?!:)(\{[^}]*\})?")


def _tool(name: str) -> str:
    path = shutil.which(name)
    if path is None:
        if os.environ.get("CI"):
            pytest.fail(f"{name} is required under CI (Debian package prometheus)")
        pytest.skip(f"{name} not installed (Debian package prometheus)")
    return path


def _run(*command: str | Path, cwd: Path = REPO) -> str:
    done = subprocess.run(
        [str(part) for part in command], cwd=cwd, capture_output=True, text=True, timeout=60
    )
    assert done.returncode == 0, done.stdout + done.stderr
    return done.stdout + done.stderr


def _load(path: Path) -> Any:
    with path.open() as file:
        return yaml.safe_load(file)


def _rules(kind: str) -> list[dict[str, Any]]:
    """Every rule of the rules files that has `kind` ("alert" or "record")."""
    return [
        rule
        for path in RULE_FILES
        for group in _load(path)["groups"]
        for rule in group["rules"]
        if kind in rule
    ]


def _alert_cases() -> list[dict[str, Any]]:
    return [
        case
        for path in RULE_TESTS
        for test in _load(path)["tests"]
        for case in test.get("alert_rule_test", [])
    ]


# -- promtool -------------------------------------------------------------------------------------


def test_the_rules_come_in_pairs_with_their_unit_tests() -> None:
    assert [path.name for path in RULE_FILES] == ["cco-alerts.rules.yml", "cco-recording.rules.yml"]
    for path in RULE_FILES:
        test = path.with_name(path.name.replace(".rules.yml", ".test.yml"))
        assert test in RULE_TESTS
        assert _load(test)["rule_files"] == [path.name]


@pytest.mark.parametrize("config", PROMETHEUS_CONFIGS, ids=lambda path: path.name)
def test_prometheus_configs_are_valid_and_find_every_rules_file(config: Path) -> None:
    output = _run(_tool("promtool"), "check", "config", config)
    # A rule_files glob that matches nothing is valid too: count what it found.
    assert f"SUCCESS: {len(RULE_FILES)} rule files found" in output
    for path in RULE_FILES:
        assert path.name in output


@pytest.mark.parametrize("rules", RULE_FILES, ids=lambda path: path.name)
def test_rules_files_pass_promtool_check(rules: Path) -> None:
    _run(_tool("promtool"), "check", "rules", rules)


@pytest.mark.parametrize("tests", RULE_TESTS, ids=lambda path: path.name)
def test_rules_unit_tests_pass(tests: Path) -> None:
    _run(_tool("promtool"), "test", "rules", tests.name, cwd=RULES_DIR)


# -- what the rules say ---------------------------------------------------------------------------


def test_every_alert_is_tested_both_firing_and_not_firing() -> None:
    cases = _alert_cases()
    firing = {case["alertname"] for case in cases if case.get("exp_alerts")}
    silent = {case["alertname"] for case in cases if not case.get("exp_alerts")}
    alerts = {rule["alert"] for rule in _rules("alert")}
    assert len(alerts) == len(_rules("alert")), "alert names must be unique"
    assert alerts - firing == set()
    assert alerts - silent == set()
    assert (firing | silent) - alerts == set()


def test_every_recording_rule_is_tested() -> None:
    tested = " ".join(
        case["expr"]
        for path in RULE_TESTS
        for test in _load(path)["tests"]
        for case in test.get("promql_expr_test", [])
    )
    untested = {
        rule["record"]
        for rule in _rules("record")
        if not re.search(rf"(?<![\w:]){re.escape(rule['record'])}(?![\w:])", tested)
    }
    assert untested == set()


def test_recorded_names_follow_level_metric_operations() -> None:
    for rule in _rules("record"):
        level, metric, operation = rule["record"].split(":")
        assert re.fullmatch(r"[a-z]+(_[a-z]+)*", level), rule["record"]
        assert metric.startswith("cco_"), rule["record"]
        assert not metric.endswith("_total"), rule["record"]
        assert re.fullmatch(r"[a-z0-9_]+", operation), rule["record"]


def test_every_alert_has_for_severity_summary_and_description() -> None:
    for rule in _rules("alert"):
        assert re.fullmatch(r"\d+[smh]", rule["for"]), rule["alert"]
        assert rule["labels"]["severity"] in {"critical", "warning", "info"}, rule["alert"]
        assert rule["annotations"]["summary"].strip(), rule["alert"]
        assert rule["annotations"]["description"].strip(), rule["alert"]


def test_alerts_per_exporter_name_the_instance_in_their_description() -> None:
    per_instance = {
        case["alertname"]
        for case in _alert_cases()
        for alert in case.get("exp_alerts") or []
        if "instance" in alert["exp_labels"]
    }
    assert per_instance  # the exporter's own alerts, and the budgets
    for rule in _rules("alert"):
        if rule["alert"] in per_instance:
            assert "{{ $labels.instance }}" in rule["annotations"]["description"], rule["alert"]


def test_rules_read_only_the_exporters_job() -> None:
    # Another job may carry the same names (a collector re-exporting the OTLP push, say).
    for rule in _rules("alert") + _rules("record"):
        selectors = _SELECTOR.findall(rule["expr"])
        assert selectors or ":" in rule["expr"], rule
        for name, matchers in selectors:
            assert f'job="{JOB}"' in matchers, (rule.get("alert") or rule.get("record"), name)


# -- the rules against a real exporter and a real Prometheus --------------------------------------


def _metric_names(exposition: str) -> set[str]:
    """Sample names of every family in a Prometheus text exposition, samples or not."""
    names: set[str] = set()
    for line in exposition.splitlines():
        if line.startswith("# TYPE "):
            _, _, name, kind = line.split()
            suffixes = ("_bucket", "_count", "_sum") if kind == "histogram" else ("",)
            names.update(name + suffix for suffix in suffixes)
    return names


def _read_by_rules() -> set[str]:
    return {
        name
        for rule in _rules("alert") + _rules("record")
        for name, _ in _SELECTOR.findall(rule["expr"])
        if name != "up"
    }


def _feed(server: Server) -> None:
    """Calls of two models, one failed, one with a model that has no price."""
    calls = [
        {"model": "claude-sonnet-4-5", "input_tokens": 1200, "output_tokens": 300,
         "cache_read_tokens": 8000, "latency_ms": 850, "project": "web", "agent": "coder"},
        {"model": "gpt-4o", "input_tokens": 500, "output_tokens": 100, "latency_ms": 2400,
         "project": "api", "status": "error", "error_type": "overloaded"},
        {"model": "made-up-model", "input_tokens": 10, "output_tokens": 10, "latency_ms": 90},
    ]  # fmt: skip
    with server.client() as client:
        assert client.post("/api/events", json=calls).status_code == 202


@pytest.fixture
def budgeted(server_factory: type[Server], tmp_path: Path) -> Server:
    """An exporter with a daily and a monthly budget, fed a few calls."""
    env = {"CCO_EXPORTER_BUDGET_DAILY_USD": "50", "CCO_EXPORTER_BUDGET_MONTHLY_USD": "1000"}
    server = server_factory(tmp_path / "metrics.db", env=env).start()
    _feed(server)
    return server


def test_rules_read_metrics_the_exporter_serves(budgeted: Server) -> None:
    with budgeted.client() as client:
        exposition = client.get("/metrics").text
    assert _read_by_rules() - _metric_names(exposition) == set()
    # The labels the budget alerts match on, for both periods of a configured budget.
    for name in ("cco_budget_usd", "cco_llm_spend_usd"):
        for period in ("day", "month"):
            assert f'{name}{{period="{period}",project="__all__"}}' in exposition


class Prometheus:
    """A real Prometheus on a free 127.0.0.1 port, with its API as `query()` and `get()`."""

    def __init__(self, config: Path, data: Path) -> None:
        self.url = f"http://127.0.0.1:{free_port()}"
        command = [
            _tool("prometheus"),
            f"--config.file={config}",
            f"--storage.tsdb.path={data}",
            f"--web.listen-address={self.url.removeprefix('http://')}",
            "--log.level=warn",
        ]
        self.log = data.with_suffix(".log")
        with self.log.open("wb") as log:
            self.process = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT)

    def get(self, path: str, **params: str) -> Any:
        answer = httpx.get(f"{self.url}{path}", params=params, timeout=10).json()
        assert answer["status"] == "success", answer
        return answer["data"]

    def query(self, promql: str) -> list[dict[str, Any]]:
        result: list[dict[str, Any]] = self.get("/api/v1/query", query=promql)["result"]
        return result

    def wait_ready(self, timeout: float = 30.0) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            assert self.process.poll() is None, self.log.read_text()
            try:
                if httpx.get(f"{self.url}/-/ready", timeout=1).status_code == 200:
                    return
            except httpx.TransportError:
                pass
            time.sleep(0.2)
        raise AssertionError(f"Prometheus not ready in {timeout}s:\n{self.log.read_text()}")

    def stop(self) -> None:
        self.process.terminate()
        try:
            self.process.wait(20)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait(10)


@pytest.fixture
def prometheus(budgeted: Server, tmp_path: Path) -> Iterator[Prometheus]:
    """Prometheus run from prometheus.local.yml, faster, scraping `budgeted`, with the rules."""
    config = _load(DEPLOY / "prometheus" / "prometheus.local.yml")
    config["global"] = {"scrape_interval": "1s", "evaluation_interval": "1s"}
    config["rule_files"] = [str(path) for path in RULE_FILES]
    (job,) = config["scrape_configs"]
    assert job["job_name"] == JOB
    job["static_configs"] = [{"targets": [budgeted.url.removeprefix("http://")]}]
    path = tmp_path / "prometheus.yml"
    path.write_text(yaml.safe_dump(config))
    server = Prometheus(path, tmp_path / "prometheus-data")
    try:
        server.wait_ready()
        yield server
    finally:
        server.stop()


def test_a_real_prometheus_evaluates_every_rule_without_error(
    budgeted: Server, prometheus: Prometheus
) -> None:
    # Rates need two scrapes of a changed counter: keep sending while Prometheus scrapes.
    deadline = time.monotonic() + 30
    while True:
        _feed(budgeted)
        rate = prometheus.query(f'job:cco_llm_cost_usd:rate5m{{job="{JOB}"}}')
        if rate and float(rate[0]["value"][1]) > 0:
            break
        assert time.monotonic() < deadline, prometheus.log.read_text()
        time.sleep(0.5)
    # One more evaluation of every group after the one that saw the rate.
    time.sleep(2)

    rules = [rule for group in prometheus.get("/api/v1/rules")["groups"] for rule in group["rules"]]
    assert len(rules) == len(_rules("alert")) + len(_rules("record"))
    failing = {rule["name"]: rule.get("lastError") for rule in rules if rule["health"] != "ok"}
    assert failing == {}

    p95 = prometheus.query("model:cco_llm_request_duration_seconds:p95_5m")
    assert {sample["metric"]["model"] for sample in p95} >= {"claude-sonnet-4-5", "gpt-4o"}
    errors = prometheus.query("model:cco_llm_request_errors_per_requests:ratio_rate5m")
    assert {s["metric"]["model"]: float(s["value"][1]) for s in errors}["gpt-4o"] == 1.0
    assert prometheus.query(f'up{{job="{JOB}"}} == 1')
    active = {alert["labels"]["alertname"] for alert in prometheus.get("/api/v1/alerts")["alerts"]}
    assert active.isdisjoint({"CcoExporterDown", "CcoExporterAbsent", "CcoExporterDegraded"})


# -- compose, collector, image --------------------------------------------------------------------


def _compose() -> dict[str, Any]:
    compose: dict[str, Any] = _load(DEPLOY / "docker-compose.yml")
    return compose


def _bind_mounts(service: dict[str, Any]) -> dict[str, Path]:
    """Container path -> host path of a service's bind mounts (relative to deploy/)."""
    mounts = {}
    for volume in service.get("volumes", []):
        source, target, *_ = volume.split(":")
        if source.startswith("."):
            mounts[target] = (DEPLOY / source).resolve()
    return mounts


def _port(address: str) -> int:
    return int(address.rsplit(":", 1)[1].split("/")[0])


def test_compose_images_are_pinned_and_the_exporter_is_built_from_the_repository() -> None:
    services = _compose()["services"]
    assert set(services) == {"cco-exporter", "prometheus", "grafana", "otel-collector"}
    for name, service in services.items():
        if name != "cco-exporter":
            _, _, tag = service["image"].partition(":")
            assert re.fullmatch(r"v?\d+(\.\d+)+", tag), (name, service["image"])
    build = services["cco-exporter"]["build"]
    assert (DEPLOY / build["context"]).resolve() == REPO
    assert (REPO / build["dockerfile"]).is_file()
    env = services["cco-exporter"]["environment"]
    assert env["CCO_EXPORTER_HOST"] == "0.0.0.0"
    assert env["CCO_EXPORTER_DB"].startswith("/data/")
    assert "cco-data:/data" in services["cco-exporter"]["volumes"]


def test_compose_mounts_put_the_prometheus_rules_where_the_config_finds_them() -> None:
    service = _compose()["services"]["prometheus"]
    mounts = _bind_mounts(service)
    for target, source in mounts.items():
        assert source.exists(), target
    config_target = PurePosixPath(
        next(arg for arg in service["command"] if arg.startswith("--config.file=")).split("=")[1]
    )
    assert mounts[str(config_target)] == DEPLOY / "prometheus.yml"
    (pattern,) = _load(DEPLOY / "prometheus.yml")["rule_files"]
    rules_target = config_target.parent / PurePosixPath(pattern).parent
    assert mounts[str(rules_target)] == RULES_DIR


def test_prometheus_scrapes_the_compose_services_on_their_ports() -> None:
    services = _compose()["services"]
    collector = _load(DEPLOY / "otel-collector.yaml")
    ports = {
        "cco-exporter": 9469,
        "otel-collector": _port(collector["exporters"]["prometheus"]["endpoint"]),
    }
    jobs = {job["job_name"]: job for job in _load(DEPLOY / "prometheus.yml")["scrape_configs"]}
    assert set(jobs) == {JOB, "otel-collector"}
    assert _load(DEPLOY / "prometheus.yml")["global"]["scrape_interval"] == "15s"
    for job in jobs.values():
        ((target,),) = [group["targets"] for group in job["static_configs"]]
        host, port = target.split(":")
        assert host in services, target
        assert ports[host] == int(port), target
    otlp_http = _port(collector["receivers"]["otlp"]["protocols"]["http"]["endpoint"])
    endpoint = services["cco-exporter"]["environment"]["CCO_EXPORTER_OTLP_ENDPOINT"]
    assert endpoint == f"http://otel-collector:{otlp_http}"


def test_the_collector_uses_core_components_and_its_image_reads_this_file() -> None:
    collector = _load(DEPLOY / "otel-collector.yaml")
    for kind, allowed in CORE_COLLECTOR.items():
        assert {name.split("/")[0] for name in collector[kind]} <= allowed, kind
    for pipeline in collector["service"]["pipelines"].values():
        for kind in CORE_COLLECTOR:
            assert set(pipeline[kind]) <= set(collector[kind]), kind
    assert collector["receivers"]["otlp"]["protocols"]["grpc"]["endpoint"] == "0.0.0.0:4317"
    assert collector["receivers"]["otlp"]["protocols"]["http"]["endpoint"] == "0.0.0.0:4318"
    service = _compose()["services"]["otel-collector"]
    # The core image reads /etc/otelcol/config.yaml (the contrib one, /etc/otelcol-contrib/).
    assert service["image"].startswith("otel/opentelemetry-collector:")
    assert _bind_mounts(service) == {"/etc/otelcol/config.yaml": DEPLOY / "otel-collector.yaml"}


def test_grafana_provisioning_matches_the_compose_mounts() -> None:
    provisioning = REPO / "grafana" / "provisioning"
    service = _compose()["services"]["grafana"]
    mounts = _bind_mounts(service)
    assert mounts["/etc/grafana/provisioning"] == provisioning
    sources = [
        source
        for path in sorted((provisioning / "datasources").glob("*.y*ml"))
        for source in _load(path).get("datasources", [])
    ]
    assert {(source.get("uid"), source.get("url")) for source in sources} >= {
        ("prometheus", "http://prometheus:9090")
    }
    providers = [
        provider
        for path in sorted((provisioning / "dashboards").glob("*.y*ml"))
        for provider in _load(path).get("providers", [])
    ]
    assert providers
    for provider in providers:
        assert mounts[provider["options"]["path"]] == REPO / "grafana" / "dashboards"


def test_the_image_copies_what_dockerignore_lets_through() -> None:
    ignored = [
        line.strip()
        for line in (REPO / ".dockerignore").read_text().splitlines()
        if line.strip() and not line.startswith("#")
    ]
    dockerfile = (REPO / "Dockerfile").read_text()
    copied = [
        source
        for line in dockerfile.splitlines()
        if line.startswith("COPY ")
        for source in line.split()[1:-1]
    ]
    assert copied
    for source in copied:
        assert (REPO / source).exists(), source
        assert not any(fnmatch.fnmatch(source.rstrip("/"), pattern) for pattern in ignored), source
    assert 'CMD ["cco-exporter", "serve"]' in dockerfile
    assert "USER cco" in dockerfile
