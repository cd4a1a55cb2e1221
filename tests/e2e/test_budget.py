"""Budgets over real HTTP: `/api/metrics/budget` and `/metrics` agree, also after a restart."""

from __future__ import annotations

import time
from pathlib import Path

import httpx
import pytest
from prometheus_client.parser import text_string_to_metric_families

from tests.e2e.conftest import Server

#: No DST in Kolkata: a call 24 hours ago was made yesterday, local time.
ZONE = "Asia/Kolkata"
DAY_MS = 86_400_000
CONFIG = """
[project_budgets.web]
daily_usd = 5
monthly_usd = 50

[project_budgets.idle]
daily_usd = 1
"""


def budget_env(tmp_path: Path) -> dict[str, str]:
    config = tmp_path / "config.toml"
    config.write_text(CONFIG, encoding="utf-8")
    return {
        "CCO_EXPORTER_BUDGET_DAILY_USD": "10",
        "CCO_EXPORTER_BUDGET_MONTHLY_USD": "200",
        "CCO_EXPORTER_BUDGET_TIMEZONE": ZONE,
        "CCO_EXPORTER_CONFIG": str(config),
    }


def gauges(client: httpx.Client) -> dict[tuple[str, str, str], float]:
    """(family, period, project) -> value of the three budget gauge families."""
    text = client.get("/metrics").text
    names = ("cco_budget_usd", "cco_llm_spend_usd", "cco_budget_remaining_usd")
    return {
        (family.name, sample.labels["period"], sample.labels["project"]): sample.value
        for family in text_string_to_metric_families(text)
        if family.name in names
        for sample in family.samples
    }


def as_gauges(answer: dict[str, object]) -> dict[tuple[str, str, str], float]:
    """The gauges the REST answer implies: spend always, budget and remaining where set."""
    out: dict[tuple[str, str, str], float] = {}
    entries = answer["budgets"]
    assert isinstance(entries, list)
    for entry in entries:
        key = (entry["period"], entry["project"])
        out[("cco_llm_spend_usd", *key)] = entry["spend_usd"]
        if entry["budget_usd"] is not None:
            out[("cco_budget_usd", *key)] = entry["budget_usd"]
            out[("cco_budget_remaining_usd", *key)] = entry["remaining_usd"]
    return out


def test_budget_endpoint_and_metrics_agree_and_survive_a_restart(
    server_factory: type[Server], tmp_path: Path
) -> None:
    now = int(time.time() * 1000)
    calls = [
        (now - 1_000, "web", 1.25),
        (now - 2_000, "web", 2.0),
        (now - 3_000, "api", 0.5),
        (now - DAY_MS, "web", 4.0),  # yesterday: this month's only when yesterday was in it
    ]
    events: list[dict[str, object]] = [
        {"model": "claude-haiku-4-5", "timestamp": ts, "project": project, "cost_usd": cost}
        for ts, project, cost in calls
    ]
    # Savings from a proxy's cache are not spend.
    events.append({"type": "cache_hit", "model": "claude-haiku-4-5", "savings_usd": 3.0})

    db = tmp_path / "m.db"
    env = budget_env(tmp_path)
    first = server_factory(db, env=env).start()
    with first.client() as client:
        answer = client.post("/api/events", json=events, params={"durable": "true"})
        assert answer.status_code == 201, answer.text
        before = client.get("/api/metrics/budget").json()
        assert as_gauges(before) == gauges(client)
    assert first.stop() == 0

    assert before["timezone"] == ZONE
    day, month = before["day"], before["month"]
    assert day["start"].endswith("T00:00:00+05:30")
    assert month["start"].endswith("-01T00:00:00+05:30")
    assert day["end_ms"] - day["start_ms"] == DAY_MS

    def spent(start: int, end: int, project: str | None = None) -> float:
        return sum(
            cost for ts, name, cost in calls if start <= ts < end and project in (None, name)
        )

    day_bounds = (day["start_ms"], day["end_ms"])
    month_bounds = (month["start_ms"], month["end_ms"])
    by_key = {(e["project"], e["period"]): e for e in before["budgets"]}
    assert list(by_key) == [
        ("__all__", "day"),
        ("__all__", "month"),
        ("idle", "day"),
        ("idle", "month"),
        ("web", "day"),
        ("web", "month"),
    ]
    overall_day = by_key["__all__", "day"]
    assert overall_day["budget_usd"] == 10.0
    assert overall_day["spend_usd"] == pytest.approx(spent(*day_bounds))
    assert overall_day["remaining_usd"] == pytest.approx(10.0 - spent(*day_bounds))
    assert overall_day["used_percent"] == pytest.approx(spent(*day_bounds) * 10)
    assert overall_day["projected_usd"] >= overall_day["spend_usd"]
    overall_month = by_key["__all__", "month"]
    assert overall_month["budget_usd"] == 200.0
    assert overall_month["spend_usd"] == pytest.approx(spent(*month_bounds))
    web_day = by_key["web", "day"]
    assert web_day["budget_usd"] == 5.0
    assert web_day["spend_usd"] == pytest.approx(spent(*day_bounds, "web"))
    assert by_key["web", "month"]["spend_usd"] == pytest.approx(spent(*month_bounds, "web"))
    assert by_key["web", "month"]["budget_usd"] == 50.0
    idle_day, idle_month = by_key["idle", "day"], by_key["idle", "month"]
    assert (idle_day["budget_usd"], idle_day["spend_usd"], idle_day["remaining_usd"]) == (1, 0, 1)
    assert idle_day["used_percent"] == 0.0
    assert (idle_month["budget_usd"], idle_month["used_percent"]) == (None, None)

    second = server_factory(db, env=env).start()
    with second.client() as client:
        after = client.get("/api/metrics/budget").json()
        assert as_gauges(after) == gauges(client)
    assert as_gauges(after) == as_gauges(before)


def test_the_budget_endpoint_answers_without_budgets_and_is_documented(server: Server) -> None:
    with server.client() as client:
        answer = client.get("/api/metrics/budget").json()
        schema = client.get("/schema/openapi.json").json()
        metrics = gauges(client)
    assert [(e["project"], e["period"]) for e in answer["budgets"]] == [
        ("__all__", "day"),
        ("__all__", "month"),
    ]
    for entry in answer["budgets"]:
        assert entry["spend_usd"] == 0.0
        assert entry["budget_usd"] is None
        assert entry["remaining_usd"] is None
    assert metrics == {
        ("cco_llm_spend_usd", "day", "__all__"): 0.0,
        ("cco_llm_spend_usd", "month", "__all__"): 0.0,
    }
    assert "/api/metrics/budget" in schema["paths"]
    assert "BudgetResponse" in schema["components"]["schemas"]


def test_an_unknown_budget_timezone_stops_the_server_with_a_clear_error(
    server_factory: type[Server], tmp_path: Path
) -> None:
    server = server_factory(tmp_path / "m.db", env={"CCO_EXPORTER_BUDGET_TIMEZONE": "Mars/Olympus"})
    with pytest.raises(RuntimeError, match="server exited at start") as raised:
        server.start()
    assert "`budget_timezone` must be an IANA time zone name" in str(raised.value)
    assert "Mars/Olympus" in str(raised.value)
