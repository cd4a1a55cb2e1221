"""The real server over real HTTP: every endpoint's shape and values against the events sent."""

from __future__ import annotations

import gzip
import json
import math
import os
import shutil
import signal
import subprocess
from pathlib import Path

import httpx
import pytest
from prometheus_client.parser import text_string_to_metric_families

from tests.e2e.conftest import Server

# Prices (USD per million tokens) from the shipped table, SPEC section 3.
SONNET_IN, SONNET_OUT, SONNET_CACHE_READ, SONNET_WRITE_5M = 3.0, 15.0, 0.3, 3.75
OPUS_IN, OPUS_OUT = 5.0, 25.0  # claude-opus-4-5
GPT4O_IN, GPT4O_OUT = 2.5, 10.0


def _usd(tokens: int, rate: float) -> float:
    return tokens * rate / 1e6


CALLS = [
    {
        "model": "claude-sonnet-4-5",
        "input_tokens": 1000,
        "output_tokens": 500,
        "cache_read_tokens": 2000,
        "cache_creation_tokens": 400,
        "latency_ms": 250.0,
        "project": "alpha",
        "agent": "planner",
        "session_id": "s-1",
        "request_id": "req-1",
    },
    {
        "model": "claude-opus-4-5-20251101",
        "input_tokens": 3000,
        "output_tokens": 1200,
        "latency_ms": 1800.0,
        "project": "beta",
        "agent": "coder",
        "request_id": "req-2",
    },
    {
        "model": "gpt-4o",
        "input_tokens": 800,
        "output_tokens": 100,
        "latency_ms": 90.0,
        "project": "alpha",
        "status": "error",
        "error_type": "rate_limit",
    },
]
EXPECTED_COST = {
    "sonnet": _usd(1000, SONNET_IN)
    + _usd(500, SONNET_OUT)
    + _usd(2000, SONNET_CACHE_READ)
    + _usd(400, SONNET_WRITE_5M),
    "opus": _usd(3000, OPUS_IN) + _usd(1200, OPUS_OUT),
    "gpt": _usd(800, GPT4O_IN) + _usd(100, GPT4O_OUT),
}
OTHERS = [
    {"type": "cache_hit", "model": "claude-sonnet-4-5", "savings_usd": 0.02, "project": "alpha"},
    {"type": "cache_miss", "model": "claude-sonnet-4-5", "project": "alpha"},
    {
        "type": "model_override",
        "original_model": "claude-opus-4-5",
        "override_model": "claude-sonnet-4-5",
        "reason": "opus_exhausted",
        "project": "beta",
    },
    {"type": "error", "error_type": "overloaded", "message": "529 from upstream"},
    {"type": "system", "message": "proxy restarted"},
]


def _post(client: httpx.Client, body: object, **params: str) -> httpx.Response:
    return client.post("/api/events", json=body, params=params)


@pytest.fixture
def fed(server: Server) -> Server:
    with server.client() as client:
        answer = _post(client, CALLS + OTHERS, durable="true")
        assert answer.status_code == 201, answer.text
        assert answer.json() == {"accepted": 8, "duplicates": 0, "durable": True}
    return server


def test_stats_and_tiers_equal_the_events_sent(fed: Server) -> None:
    with fed.client() as client:
        stats = client.get("/api/metrics/stats", params={"window": "10m"}).json()
        realtime = client.get("/api/metrics/realtime").json()
        sonnet = client.get("/api/metrics/tiers/sonnet").json()
    summary = stats["summary"]
    assert summary["window"] == "10m"
    assert summary["total_calls"] == 3
    assert summary["total_errors"] == 1
    assert summary["total_tokens_in"] == 1000 + 3000 + 800
    assert summary["total_tokens_out"] == 500 + 1200 + 100
    assert summary["total_cache_read_tokens"] == 2000
    assert summary["total_cost_usd"] == pytest.approx(sum(EXPECTED_COST.values()), abs=1e-9)
    assert summary["avg_latency_ms"] == pytest.approx((250 + 1800 + 90) / 3)
    assert summary["p95_latency_ms"] == pytest.approx(1800, rel=0.02)
    assert summary["calls_per_minute"] == pytest.approx(3 / 10)
    tiers = {t["tier"]: t for t in stats["tiers"]}
    assert set(tiers) == {"sonnet", "opus", "gpt"}
    for tier, cost in EXPECTED_COST.items():
        assert tiers[tier]["cost_usd"] == pytest.approx(cost, abs=1e-9)
    assert tiers["sonnet"]["cache_savings_usd"] == pytest.approx(
        _usd(2000, SONNET_IN - SONNET_CACHE_READ), abs=1e-9
    )
    assert realtime["window_1m"]["total_calls"] == 3
    assert realtime["current_rate"]["calls_per_minute"] == 3
    assert sonnet["calls"] == 1
    assert sonnet["models"] == [
        {
            "model": "claude-sonnet-4-5",
            "provider": "anthropic",
            "calls": 1,
            "cost_usd": pytest.approx(EXPECTED_COST["sonnet"], abs=1e-9),
            "tokens_in": 1000,
            "tokens_out": 500,
            "total_calls": 1,
            "total_cost_usd": pytest.approx(EXPECTED_COST["sonnet"], abs=1e-9),
        }
    ]


def test_recent_projects_models_and_current_views(fed: Server) -> None:
    with fed.client() as client:
        recent = client.get("/api/metrics/recent", params={"limit": 2}).json()
        projects = client.get("/api/metrics/projects").json()["projects"]
        models = client.get("/api/metrics/models").json()["models"]
        current = client.get("/api/metrics/current").json()
    assert [r["model"] for r in recent] == ["gpt-4o", "claude-opus-4-5-20251101"]
    assert recent[1]["tier"] == "opus"
    assert recent[1]["request_id"] == "req-2"
    assert recent[0]["status"] == "error"
    assert recent[0]["error_type"] == "rate_limit"
    by_name = {p["name"]: p for p in projects}
    assert by_name["alpha"]["calls"] == 2
    assert by_name["alpha"]["errors"] == 1
    assert by_name["alpha"]["cost"] == pytest.approx(
        EXPECTED_COST["sonnet"] + EXPECTED_COST["gpt"], abs=1e-9
    )
    assert by_name["alpha"]["cacheHitRate"] == pytest.approx(
        round(2000 * 100 / (1000 + 800 + 400 + 2000), 2)
    )
    assert by_name["beta"]["lastActivity"].endswith("Z")
    assert {m["model"]: m["requests"] for m in models} == {
        "claude-sonnet-4-5": 1,
        "claude-opus-4-5-20251101": 1,
        "gpt-4o": 1,
    }
    assert set(current) == {"project", "machine", "activity"}
    assert set(current["project"]) >= {
        "name",
        "cost",
        "tokens",
        "calls",
        "lastUpdated",
        "costTrend",
        "tokensTrend",
        "callsTrend",
        "avgTime",
    }
    # Everything arrived in the last 5 minutes: there is no earlier base to compare with.
    assert current["project"]["costTrend"] is None
    machine = current["machine"]
    assert machine["totalCalls"] == 3
    assert machine["activeProjects"] == 2
    assert machine["processCount"] > 0
    assert machine["memory"] > 0
    assert [a["type"] for a in current["activity"][:5]] == [
        "system",
        "error",
        "model_override",
        "cache_miss",
        "cache_hit",
    ]


def test_activity_log_filters_and_pages_from_sqlite(fed: Server) -> None:
    with fed.client() as client:
        page = client.get("/api/metrics/activity", params={"limit": 3}).json()
        calls = client.get("/api/metrics/activity", params={"type": "api_call"}).json()
        alpha = client.get("/api/metrics/activity", params={"project": "alpha"}).json()
        future = client.get("/api/metrics/activity", params={"from": "2100-01-01T00:00:00Z"}).json()
        bad = client.get("/api/metrics/activity", params={"type": "nope"})
    assert page["total"] == 8
    assert page["hasMore"] is True
    assert len(page["events"]) == 3
    assert calls["total"] == 3
    assert calls["hasMore"] is False
    first = calls["events"][-1]
    assert first["data"]["model"] == "claude-sonnet-4-5"
    assert first["data"]["inputTokens"] == 1000
    assert first["data"]["success"] is True
    assert first["data"]["cost"] == pytest.approx(EXPECTED_COST["sonnet"], abs=1e-9)
    assert alpha["total"] == 4  # two calls, the cache hit and the cache miss
    assert future == {"events": [], "total": 0, "hasMore": False}
    assert bad.status_code == 400
    assert "type" in bad.json()["detail"]


def test_history_from_rollups_by_label(fed: Server) -> None:
    with fed.client() as client:
        by_tier = client.get("/api/metrics/history", params={"step": "1m", "by": "tier"}).json()
        everything = client.get("/api/metrics/history", params={"step": "1d"}).json()
        too_many = client.get(
            "/api/metrics/history", params={"step": "1m", "from": "0", "to": "2000000000000"}
        )
    costs = {s["label"]: sum(p["cost_usd"] for p in s["points"]) for s in by_tier["series"]}
    for tier, cost in EXPECTED_COST.items():
        assert costs[tier] == pytest.approx(cost, abs=1e-9)
    [series] = everything["series"]
    assert series["label"] == "all"
    assert sum(p["calls"] for p in series["points"]) == 3
    assert too_many.status_code == 400


def test_unknown_tier_is_a_json_404(server: Server) -> None:
    with server.client() as client:
        answer = client.get("/api/metrics/tiers/no-such-tier")
        odd = client.get("/api/metrics/tiers/%00%ff%3Cscript%3E")
    assert answer.status_code == 404
    assert answer.json()["status_code"] == 404
    assert "no-such-tier" in answer.json()["detail"]
    assert odd.status_code == 404
    assert odd.headers["content-type"].startswith("application/json")


@pytest.mark.parametrize("limit", ["0", "1001", "x"])
def test_recent_limit_out_of_range_is_400(server: Server, limit: str) -> None:
    with server.client() as client:
        answer = client.get("/api/metrics/recent", params={"limit": limit})
    assert answer.status_code == 400
    assert answer.json()["errors"][0]["key"] == "limit"


def test_metrics_totals_equal_rest(fed: Server) -> None:
    with fed.client() as client:
        text = client.get("/metrics").text
        summary = client.get("/api/metrics/stats").json()["summary"]
    families = {f.name: f for f in text_string_to_metric_families(text)}
    cost = sum(s.value for s in families["cco_llm_cost_usd"].samples)
    assert cost == pytest.approx(summary["total_cost_usd"], abs=1e-9)
    requests: dict[str, float] = {}
    for sample in families["cco_llm_requests"].samples:
        status = sample.labels["status"]
        requests[status] = requests.get(status, 0) + sample.value
    assert requests == {"ok": 2, "error": 1}
    tokens: dict[str, float] = {}
    for sample in families["cco_llm_tokens"].samples:
        kind = sample.labels["type"]
        tokens[kind] = tokens.get(kind, 0) + sample.value
    assert tokens["input"] == summary["total_tokens_in"]
    assert tokens["output"] == summary["total_tokens_out"]
    assert tokens["cache_read"] == summary["total_cache_read_tokens"]
    duration = families["cco_llm_request_duration_seconds"]
    count = sum(s.value for s in duration.samples if s.name.endswith("_count"))
    assert count == 3
    overrides = families["cco_llm_model_overrides"].samples
    assert [s.labels["reason"] for s in overrides if s.name.endswith("_total")] == [
        "opus_exhausted"
    ]


def test_openmetrics_when_asked(fed: Server) -> None:
    with fed.client() as client:
        answer = client.get(
            "/metrics", headers={"Accept": "application/openmetrics-text; version=1.0.0"}
        )
    assert answer.headers["content-type"].startswith("application/openmetrics-text")
    assert answer.text.rstrip().endswith("# EOF")


def test_sse_stream_sends_one_message_a_second(fed: Server) -> None:
    messages: list[dict[str, object]] = []
    with (
        fed.client() as client,
        client.stream("GET", "/api/stream") as answer,
    ):
        assert answer.headers["content-type"].startswith("text/event-stream")
        for line in answer.iter_lines():
            if line.startswith("data:"):
                messages.append(json.loads(line[5:]))
                if len(messages) == 2:
                    break
    for message in messages:
        assert set(message) == {"project", "machine", "activity"}
        machine = message["machine"]
        assert isinstance(machine, dict)
        assert machine["totalCalls"] == 3


def test_openapi_schema_describes_every_route(server: Server) -> None:
    with server.client() as client:
        schema = client.get("/schema/openapi.json").json()
    paths = schema["paths"]
    for path in (
        "/api/events",
        "/api/metrics/stats",
        "/api/metrics/realtime",
        "/api/metrics/tiers/{tier}",
        "/api/metrics/recent",
        "/api/metrics/health",
        "/api/metrics/current",
        "/api/metrics/projects",
        "/api/metrics/models",
        "/api/metrics/activity",
        "/api/metrics/history",
        "/api/pricing",
        "/api/pricing/{model}",
        "/api/stream",
    ):
        assert path in paths, path
    for path, operations in paths.items():
        for method, operation in operations.items():
            ok = [code for code in operation["responses"] if code.startswith("2")]
            assert ok, f"{method} {path} documents no success response"


def test_repeated_request_id_is_counted_once(server: Server) -> None:
    event = {"model": "claude-haiku-4-5", "input_tokens": 10, "request_id": "same"}
    with server.client() as client:
        first = _post(client, event).json()
        again = _post(client, [event, event], durable="true").json()
        stats = client.get("/api/metrics/stats").json()["summary"]
    assert first["accepted"] == 1
    assert again == {"accepted": 0, "duplicates": 2, "durable": True}
    assert stats["total_calls"] == 1
    assert server.query("SELECT count(*) FROM api_calls") == [(1,)]


def test_ndjson_and_gzip_bodies_are_accepted(server: Server) -> None:
    lines = "\n".join(json.dumps({"model": "gpt-4o-mini", "input_tokens": n}) for n in (1, 2, 3))
    with server.client() as client:
        ndjson = client.post(
            "/api/events", content=lines, headers={"Content-Type": "application/x-ndjson"}
        )
        zipped = client.post(
            "/api/events",
            content=gzip.compress(json.dumps(CALLS).encode()),
            headers={"Content-Type": "application/json", "Content-Encoding": "gzip"},
        )
    assert ndjson.status_code == 202
    assert ndjson.json()["accepted"] == 3
    assert zipped.status_code == 202
    assert zipped.json()["accepted"] == 3


BAD_INPUT = [
    pytest.param(b"{not json", "application/json", 422, "malformed", id="malformed-json"),
    pytest.param(b'{"model": 42}', "application/json", 422, "model", id="wrong-type"),
    pytest.param(b'{"input_tokens": 5}', "application/json", 422, "model", id="missing-model"),
    pytest.param(
        b'{"model": "m", "input_tokens": -1}', "application/json", 422, "input_tokens", id="neg"
    ),
    pytest.param(
        b'{"model": "m", "output_tokens": 1.5}', "application/json", 422, "output_tokens", id="frac"
    ),
    pytest.param(
        b'{"model": "m", "input_tokens": 9007199254740993}',
        "application/json",
        422,
        "input_tokens",
        id="over-2^53",
    ),
    pytest.param(
        b'{"model": "m", "latency_ms": NaN}', "application/json", 422, "malformed", id="nan"
    ),
    pytest.param(
        b'{"model": "m", "cost_usd": 1e999}', "application/json", 422, "cost_usd", id="infinity"
    ),
    pytest.param(
        json.dumps({"model": "m" * 10_000}).encode(), "application/json", 422, "model", id="10k"
    ),
    pytest.param(
        b'{"model": "m", "project": "a\\u0007b"}', "application/json", 422, "project", id="ctrl"
    ),
    pytest.param(
        b'{"model": "m", "project": "\xff\xfe"}', "application/json", 422, "utf-8", id="bad-utf8"
    ),
    pytest.param(
        b'{"model": "m", "timestamp": "2100-01-01T00:00:00Z"}',
        "application/json",
        422,
        "timestamp",
        id="future",
    ),
    pytest.param(b"[]", "application/json", 422, "no event", id="empty-batch"),
    pytest.param(b'{"model": "m"}', "text/csv", 415, "content type", id="content-type"),
    pytest.param(b'{"type": "bogus"}', "application/json", 422, "type", id="unknown-type"),
]


@pytest.mark.parametrize(("body", "content_type", "status", "needle"), BAD_INPUT)
def test_bad_input_gets_a_json_4xx_and_nothing_is_applied(
    server: Server, body: bytes, content_type: str, status: int, needle: str
) -> None:
    with server.client() as client:
        good = {"model": "claude-haiku-4-5", "input_tokens": 7}
        # A valid event in front of the bad one: the batch is atomic, so it must not count.
        if content_type == "application/json" and body.startswith(b"{") and needle:
            body = b"[" + json.dumps(good).encode() + b"," + body + b"]"
        answer = client.post("/api/events", content=body, headers={"Content-Type": content_type})
        stats = client.get("/api/metrics/stats").json()["summary"]
        healthy = client.get("/api/metrics/health")
    assert answer.status_code == status, answer.text
    error = answer.json()
    assert error["status_code"] == status
    assert needle.lower() in error["detail"].lower()
    assert stats["total_calls"] == 0
    assert healthy.status_code == 200


def test_body_over_the_limit_is_413(server_factory: type[Server], tmp_path: Path) -> None:
    server = server_factory(tmp_path / "m.db", env={"CCO_EXPORTER_BODY_LIMIT": "4096"}).start()
    big = json.dumps([{"model": "claude-haiku-4-5", "input_tokens": 1}] * 200).encode()
    bomb = gzip.compress(
        b'[{"model": "m", "project": "' + b"x" * 100 + b'"}' + b" " * 50_000 + b"]"
    )
    with server.client() as client:
        plain = client.post(
            "/api/events", content=big, headers={"Content-Type": "application/json"}
        )
        zipped = client.post(
            "/api/events",
            content=bomb,
            headers={"Content-Type": "application/json", "Content-Encoding": "gzip"},
        )
        small = client.post(
            "/api/events",
            content=gzip.compress(b'{"model": "claude-haiku-4-5"}'),
            headers={"Content-Type": "application/json", "Content-Encoding": "gzip"},
        )
    assert len(bomb) < 4096
    assert plain.status_code == 413
    assert plain.json()["status_code"] == 413
    assert zipped.status_code == 413
    assert "decompressed" in zipped.json()["detail"]
    assert small.status_code == 202


def test_token_guards_ingest_and_admin_but_not_reads(
    server_factory: type[Server], tmp_path: Path
) -> None:
    server = server_factory(tmp_path / "m.db", env={"CCO_EXPORTER_TOKEN": "s3cret"}).start()
    event = {"model": "claude-haiku-4-5", "input_tokens": 1}
    price = {"input": 1.0, "output": 2.0}
    with server.client() as anonymous, server.client("s3cret") as admin:
        denied = _post(anonymous, event)
        wrong = anonymous.post("/api/events", json=event, headers={"Authorization": "Bearer s3cre"})
        denied_price = anonymous.put("/api/pricing/my-model", json=price)
        allowed = _post(admin, event)
        priced = admin.put("/api/pricing/my-model", json=price)
        read = anonymous.get("/api/metrics/stats")
        listed = anonymous.get("/api/pricing").json()["models"]
    assert denied.status_code == 401
    assert denied.headers["www-authenticate"] == "Bearer"
    assert denied.json()["status_code"] == 401
    assert wrong.status_code == 401
    assert denied_price.status_code == 401
    assert allowed.status_code == 202
    assert priced.status_code == 200
    assert priced.json()["model"] == "my-model"
    assert read.status_code == 200
    assert any(p["model"] == "my-model" and p["output"] == 2.0 for p in listed)
    assert server.query("SELECT output_cost_per_1m FROM model_tiers WHERE model='my-model'") == [
        (2.0,)
    ]


def test_pricing_put_applies_to_new_calls_and_rejects_bad_prices(server: Server) -> None:
    with server.client() as client:
        bad = client.put("/api/pricing/x-model", json={"input": -1, "output": 1})
        unknown_field = client.put("/api/pricing/x-model", json={"input": 1, "output": 1, "z": 1})
        ok = client.put("/api/pricing/x-model", json={"input": 10.0, "output": 20.0})
        _post(client, {"model": "x-model", "input_tokens": 1_000_000, "output_tokens": 1_000_000})
        stats = client.get("/api/metrics/stats").json()["summary"]
    assert bad.status_code == 422
    assert "input" in bad.json()["detail"]
    assert unknown_field.status_code == 422
    assert ok.status_code == 200
    assert stats["total_cost_usd"] == pytest.approx(30.0)


@pytest.mark.parametrize("stop_signal", [signal.SIGTERM, signal.SIGINT], ids=["TERM", "INT"])
def test_a_stop_signal_commits_every_accepted_event(server: Server, stop_signal: int) -> None:
    sent = 0
    with server.client() as client:
        for batch in range(20):
            events = [
                {"model": "claude-sonnet-4-5", "input_tokens": i, "request_id": f"b{batch}-{i}"}
                for i in range(50)
            ]
            answer = _post(client, events)
            assert answer.status_code == 202
            sent += answer.json()["accepted"]
    assert server.stop(stop_signal) == 0
    assert server.query("SELECT count(*) FROM api_calls") == [(sent,)]
    assert server.query("SELECT sum(calls) FROM series") == [(sent,)]
    assert "every accepted event is committed" in server.logs()


def test_restart_keeps_totals_and_the_1m_window(
    server_factory: type[Server], tmp_path: Path
) -> None:
    db = tmp_path / "m.db"
    first = server_factory(db).start()
    with first.client() as client:
        assert _post(client, CALLS).status_code == 202
        before = client.get("/api/metrics/stats", params={"window": "1m"}).json()["summary"]
        projects_before = client.get("/api/metrics/projects").json()
    first.stop()
    second = server_factory(db, port=first.port).start()
    with second.client() as client:
        after = client.get("/api/metrics/stats", params={"window": "1m"}).json()["summary"]
        projects_after = client.get("/api/metrics/projects").json()
    # The events are seconds old: the restart refills the 1-minute window from SQLite.
    assert after["total_calls"] == before["total_calls"] == 3
    assert after["total_cost_usd"] == pytest.approx(before["total_cost_usd"], abs=1e-12)
    assert [p["cost"] for p in projects_after["projects"]] == pytest.approx(
        [p["cost"] for p in projects_before["projects"]]
    )


def test_health_reports_the_store(server: Server) -> None:
    with server.client() as client:
        _post(client, CALLS[:1], durable="true")
        health = client.get("/api/metrics/health").json()
    assert health["status"] == "ok"
    assert health["db_reachable"] is True
    assert health["events_written"] == 1
    assert health["spill_backlog"] == 0
    assert health["version"]
    assert not math.isnan(health["uptime_seconds"])


def test_promtool_finds_no_problem_in_metrics(fed: Server) -> None:
    promtool = shutil.which("promtool")
    if promtool is None:
        if os.environ.get("CI"):
            pytest.fail("promtool is required under CI (Debian package prometheus)")
        pytest.skip("promtool not installed (Debian package prometheus)")
    with fed.client() as client:
        exposition = client.get("/metrics").content
    checked = subprocess.run(
        [promtool, "check", "metrics"], input=exposition, capture_output=True, timeout=30
    )
    assert checked.returncode == 0, checked.stdout + checked.stderr
    assert checked.stdout.strip() == b""
    assert checked.stderr.strip() == b""


def test_ingest_answers_only_post_and_checks_its_flag(server: Server) -> None:
    with server.client() as client:
        wrong_method = client.get("/api/events")
        bad_flag = client.post("/api/events", json={"model": "m"}, params={"durable": "maybe"})
        stats = client.get("/api/metrics/stats").json()["summary"]
    assert wrong_method.status_code == 405
    assert wrong_method.headers["allow"] == "POST"
    assert wrong_method.json()["status_code"] == 405
    assert bad_flag.status_code == 400
    assert "durable" in bad_flag.json()["detail"]
    assert stats["total_calls"] == 0


@pytest.mark.parametrize(("ttl", "calls_seen"), [("0", 2), ("60", 1)])
def test_heavy_reads_are_cached_for_cache_ttl_seconds(
    server_factory: type[Server], tmp_path: Path, ttl: str, calls_seen: int
) -> None:
    server = server_factory(tmp_path / "m.db", env={"CCO_EXPORTER_CACHE_TTL": ttl}).start()
    event = {"model": "claude-haiku-4-5", "input_tokens": 1}
    with server.client() as client:
        _post(client, event)
        first = client.get("/api/metrics/stats").json()["summary"]["total_calls"]
        _post(client, event)
        second = client.get("/api/metrics/stats").json()["summary"]["total_calls"]
        live = client.get("/api/metrics/recent").json()
    assert first == 1
    assert second == calls_seen
    assert len(live) == 2  # /recent is never cached
