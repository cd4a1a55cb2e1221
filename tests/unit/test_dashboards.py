"""The shipped Grafana dashboards and provisioning files, checked for structure (no Grafana)."""

from __future__ import annotations

import json
import re
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml  # PyYAML, installed with litestar

GRAFANA = Path(__file__).parents[2] / "grafana"
DASHBOARD_FILES = sorted((GRAFANA / "dashboards").glob("*.json"))
DATASOURCE = {"type": "prometheus", "uid": "${datasource}"}
SCHEMA_VERSION = 39
INSTANCE_FILTER = 'instance=~"$instance"'
#: Metrics labelled with project and model: every selector of them honours both variables.
CALL_METRICS = (
    "cco_llm_requests_total",
    "cco_llm_tokens_total",
    "cco_llm_cost_usd_total",
    "cco_llm_cache_savings_usd_total",
)
#: Names in a query that are series selectors (PromQL functions and keywords are not).
SERIES_NAME = re.compile(r"\b(?:cco_\w+|process_\w+|up)\b")
SELECTOR = re.compile(r"\b((?:cco_|process_)\w+|up)\s*\{([^}]*)\}")


def _load(path: Path) -> dict[str, Any]:
    board: dict[str, Any] = json.loads(path.read_text())
    return board


def _panels(panels: list[dict[str, Any]]) -> Iterator[dict[str, Any]]:
    """Every panel, including those nested in (collapsed) rows."""
    for panel in panels:
        yield panel
        yield from _panels(panel.get("panels", []))


def _targets(board: dict[str, Any]) -> Iterator[tuple[str, dict[str, Any]]]:
    for panel in _panels(board["panels"]):
        for target in panel.get("targets", []):
            yield f"{board['uid']} panel {panel['id']} ({panel['title']}) {target['refId']}", target


def _queries(board: dict[str, Any]) -> Iterator[tuple[str, str]]:
    """(where, PromQL) of every panel target and every query variable."""
    for where, target in _targets(board):
        yield where, target["expr"]
    for variable in board["templating"]["list"]:
        if variable["type"] == "query":
            yield f"{board['uid']} variable {variable['name']}", variable["definition"]


def _walk(node: object) -> Iterator[tuple[str, object]]:
    """Every (key, value) pair anywhere in a JSON document."""
    if isinstance(node, dict):
        for key, value in node.items():
            yield key, value
            yield from _walk(value)
    elif isinstance(node, list):
        for item in node:
            yield from _walk(item)


@pytest.fixture(params=DASHBOARD_FILES, ids=[path.stem for path in DASHBOARD_FILES])
def board(request: pytest.FixtureRequest) -> dict[str, Any]:
    path: Path = request.param
    return _load(path)


def test_the_overview_and_health_dashboards_ship() -> None:
    assert [path.name for path in DASHBOARD_FILES] == [
        "cco-exporter-health.json",
        "cco-overview.json",
    ]


def test_dashboard_uids_are_stable_and_unique() -> None:
    uids = [_load(path)["uid"] for path in DASHBOARD_FILES]
    assert sorted(uids) == ["cco-exporter-health", "cco-overview"]


def test_dashboard_is_provisionable_as_is(board: dict[str, Any]) -> None:
    # Provisioned dashboards are not imported: no __inputs, no database id.
    assert "__inputs" not in board
    assert board.get("id") is None
    assert board["schemaVersion"] == SCHEMA_VERSION
    assert board["title"]
    assert board["panels"]


def test_panel_ids_are_unique_within_a_dashboard(board: dict[str, Any]) -> None:
    ids = [panel["id"] for panel in _panels(board["panels"])]
    assert all(isinstance(panel_id, int) for panel_id in ids)
    assert len(ids) == len(set(ids)), sorted(ids)


def test_every_datasource_is_the_datasource_variable(board: dict[str, Any]) -> None:
    datasources = [value for key, value in _walk(board) if key == "datasource"]
    assert datasources
    assert all(value == DATASOURCE for value in datasources), datasources
    # No datasource uid is written anywhere else either (a hard-coded one breaks provisioning).
    uids = [value for key, value in _walk(board) if key == "uid"]
    assert [uid for uid in uids if uid != "${datasource}"] == [board["uid"]]


def test_every_panel_with_queries_names_the_datasource(board: dict[str, Any]) -> None:
    for panel in _panels(board["panels"]):
        if panel["type"] == "row":
            assert not panel.get("targets")
            continue
        assert panel["datasource"] == DATASOURCE, panel["title"]
        assert panel["targets"], panel["title"]
        for target in panel["targets"]:
            assert target["datasource"] == DATASOURCE, panel["title"]


def test_template_variables(board: dict[str, Any]) -> None:
    variables = {variable["name"]: variable for variable in board["templating"]["list"]}
    assert variables["datasource"]["type"] == "datasource"
    assert variables["datasource"]["query"] == "prometheus"
    instance = variables["instance"]
    assert instance["definition"] == "label_values(cco_exporter_build_info, instance)"
    assert instance["multi"] is True
    assert instance["includeAll"] is True
    if board["uid"] == "cco-overview":
        for name in ("project", "model"):
            variable = variables[name]
            assert variable["definition"] == (
                f'label_values(cco_llm_cost_usd_total{{instance=~"$instance"}}, {name})'
            )
            assert variable["multi"] is True
            assert variable["includeAll"] is True
            assert variable["allValue"] == ".*"
    for variable in variables.values():
        if variable["type"] == "query":
            assert variable["query"]["query"] == variable["definition"]


def test_every_query_filters_by_instance(board: dict[str, Any]) -> None:
    unfiltered = []
    for where, expr in _queries(board):
        if where.endswith("variable instance"):
            continue
        selectors = SELECTOR.findall(expr)
        # Every series name is followed by a selector, and every selector names the instance.
        bare = len(SERIES_NAME.findall(expr)) != len(selectors)
        if bare or not selectors or any(INSTANCE_FILTER not in m for _, m in selectors):
            unfiltered.append((where, expr))
    assert not unfiltered


def test_call_metrics_honour_the_project_and_model_variables(board: dict[str, Any]) -> None:
    for where, target in _targets(board):
        for name, matchers in SELECTOR.findall(target["expr"]):
            if name in CALL_METRICS:
                assert 'project=~"$project"' in matchers, where
                assert 'model=~"$model"' in matchers, where
            if name == "cco_llm_request_duration_seconds_bucket":
                assert 'model=~"$model"' in matchers, where


def test_counters_are_rated_before_they_are_summed(board: dict[str, Any]) -> None:
    for where, target in _targets(board):
        expr = target["expr"]
        assert not re.search(r"\b(rate|increase)\(\s*(sum|max|min|avg)\b", expr), where
        for name, _ in SELECTOR.findall(expr):
            if name.endswith(("_total", "_bucket")) and name != "cco_exporter_label_overflow_total":
                assert re.search(rf"\b(rate|increase)\({name}\{{", expr), where


def test_quantiles_come_from_buckets_summed_by_le(board: dict[str, Any]) -> None:
    quantiles = [
        (where, target["expr"])
        for where, target in _targets(board)
        if "histogram_quantile" in target["expr"]
    ]
    for where, expr in quantiles:
        assert re.fullmatch(
            r"histogram_quantile\(0\.\d+, sum by \(le, model\) \(rate\("
            r"cco_llm_request_duration_seconds_bucket\{[^}]*\}\[\$__(rate_interval|range)\]\)\)\)",
            expr,
        ), where
    if board["uid"] == "cco-overview":
        assert {expr.split(",")[0] for _, expr in quantiles} == {
            "histogram_quantile(0.5",
            "histogram_quantile(0.95",
            "histogram_quantile(0.99",
        }


def test_refids_are_unique_within_a_panel(board: dict[str, Any]) -> None:
    for panel in _panels(board["panels"]):
        refs = [target["refId"] for target in panel.get("targets", [])]
        assert len(refs) == len(set(refs)), panel["title"]


def _cells(panel: dict[str, Any]) -> set[tuple[int, int]]:
    pos = panel["gridPos"]
    assert pos["w"] > 0
    assert pos["h"] > 0
    assert pos["x"] >= 0
    assert pos["x"] + pos["w"] <= 24
    return {
        (x, y)
        for x in range(pos["x"], pos["x"] + pos["w"])
        for y in range(pos["y"], pos["y"] + pos["h"])
    }


def _assert_no_overlap(panels: list[dict[str, Any]]) -> None:
    taken: dict[tuple[int, int], str] = {}
    for panel in panels:
        for cell in _cells(panel):
            assert cell not in taken, f"{panel['title']} overlaps {taken[cell]} at {cell}"
            taken[cell] = panel["title"]


def test_panels_do_not_overlap(board: dict[str, Any]) -> None:
    _assert_no_overlap(board["panels"])
    # The panels of a collapsed row are laid out as if it were open.
    for panel in board["panels"]:
        if panel["type"] == "row" and panel.get("collapsed"):
            _assert_no_overlap(panel["panels"])


def test_panels_have_units(board: dict[str, Any]) -> None:
    for panel in _panels(board["panels"]):
        if panel["type"] in ("stat", "timeseries", "bargauge"):
            assert panel["fieldConfig"]["defaults"]["unit"], panel["title"]


def test_overview_covers_the_issue() -> None:
    board = _load(GRAFANA / "dashboards" / "cco-overview.json")
    exprs = "\n".join(target["expr"] for _, target in _targets(board))
    for needle in (
        "sum(rate(cco_llm_cost_usd_total",
        'cco_llm_spend_usd{instance=~"$instance", period="day", project="__all__"}',
        'cco_llm_spend_usd{instance=~"$instance", period="month", project="__all__"}',
        "cco_budget_usd",
        "cco_budget_remaining_usd",
        *(
            f"sum by ({label}) (rate(cco_llm_cost_usd_total"
            for label in ("model", "project", "tier", "agent")
        ),
        "sum by (model) (increase(cco_llm_cost_usd_total",
        "sum by (type) (rate(cco_llm_tokens_total",
        'type="cache_read"',
        "cco_llm_cache_savings_usd_total",
        "sum by (error_type) (rate(cco_llm_errors_total",
        'status="error"',
        "cco_llm_model_overrides_total",
    ):
        assert needle in exprs, needle


def test_health_covers_the_exporter_self_metrics() -> None:
    board = _load(GRAFANA / "dashboards" / "cco-exporter-health.json")
    exprs = "\n".join(target["expr"] for _, target in _targets(board))
    for name in (
        "cco_exporter_events_ingested_total",
        "cco_exporter_events_rejected_total",
        "cco_exporter_db_queue_depth",
        "cco_exporter_db_queue_capacity",
        "cco_exporter_db_flush_duration_seconds",
        "cco_exporter_db_write_errors_total",
        "cco_exporter_spill_backlog_events",
        "cco_exporter_degraded",
        "cco_exporter_unpriced_events_total",
        "cco_exporter_label_overflow_total",
        "cco_exporter_duplicate_events_total",
        'cco_exporter_otlp_exports_total{instance=~"$instance", result="failure"}',
        "process_resident_memory_bytes",
        "process_cpu_seconds_total",
    ):
        assert name in exprs, name


def test_datasource_provisioning() -> None:
    config = yaml.safe_load(
        (GRAFANA / "provisioning" / "datasources" / "prometheus.yml").read_text()
    )
    assert config["apiVersion"] == 1
    [datasource] = config["datasources"]
    assert datasource["name"] == "Prometheus"
    assert datasource["type"] == "prometheus"
    assert datasource["uid"] == "prometheus"
    assert datasource["url"] == "http://prometheus:9090"
    assert datasource["isDefault"] is True


def test_dashboard_provisioning() -> None:
    config = yaml.safe_load((GRAFANA / "provisioning" / "dashboards" / "cco.yml").read_text())
    assert config["apiVersion"] == 1
    [provider] = config["providers"]
    assert provider["type"] == "file"
    assert provider["folder"] == "cco"
    assert provider["options"]["path"] == "/var/lib/grafana/dashboards"
