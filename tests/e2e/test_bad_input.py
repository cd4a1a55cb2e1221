"""Bad input over real HTTP: each class is refused whole with a JSON 4xx, and the server goes on.

A valid event with a unique `session_id` goes in front of the bad one wherever the body can hold
two: the batch is atomic, so that event must show up nowhere, neither in `/metrics`, nor in
`/api/metrics/recent` (both uncached), nor in SQLite once a later durable post has flushed
everything before it. tests/e2e/test_service.py checks the status and `detail` of the common
cases against a fresh server; this module adds the per-item errors, the "nothing applied" and
"still healthy" checks, and the cases it does not have.
"""

from __future__ import annotations

import gzip
import json
from collections.abc import Callable, Iterator
from typing import NamedTuple

import httpx
import pytest
from prometheus_client.parser import text_string_to_metric_families

from tests.e2e.conftest import Server

#: Small limits, so that bodies over them stay cheap to build and send.
BODY_LIMIT = 64 * 1024
MAX_QUEUE = 1000
JSON = {"Content-Type": "application/json"}
GZIP = {**JSON, "Content-Encoding": "gzip"}
NDJSON = {"Content-Type": "application/x-ndjson"}
GOOD = "@GOOD@"


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    """One server for the module: every test compares before with after, so they can share it."""
    env = {"CCO_EXPORTER_BODY_LIMIT": str(BODY_LIMIT), "CCO_EXPORTER_MAX_QUEUE": str(MAX_QUEUE)}
    running = Server(tmp_path_factory.mktemp("bad-input") / "m.db", env=env).start()
    yield running
    running.stop()


class Case(NamedTuple):
    """A bad request: its body (built around the marked good event), headers and the answer."""

    body: Callable[[bytes], bytes]
    status: int
    needle: str
    #: (index, field) of each item the answer names, or None for errors about the whole body.
    errors: list[tuple[int, str | None]] | None
    headers: dict[str, str] = JSON


def around(text: str) -> Callable[[bytes], bytes]:
    """A body from `text` with the good event where `@GOOD@` stands."""
    return lambda good: text.encode().replace(GOOD.encode(), good)


def raw(data: bytes) -> Callable[[bytes], bytes]:
    return lambda good: data.replace(GOOD.encode(), good)


def zipped(text: str) -> Callable[[bytes], bytes]:
    return lambda good: gzip.compress(around(text)(good))


TEN_K = "x" * 10_000
CASES = {
    "malformed-json": Case(around("[@GOOD@, {not json]"), 422, "malformed", [(0, None)]),
    "wrong-types": Case(
        around('[@GOOD@, {"model": 42}, {"model": "m", "input_tokens": "12"}]'),
        422,
        "model",
        [(1, "model"), (2, "input_tokens")],
    ),
    "not-an-object": Case(around("[@GOOD@, 42]"), 422, "object", [(1, None)]),
    "missing-model": Case(around('[@GOOD@, {"input_tokens": 5}]'), 422, "model", [(1, "model")]),
    "negative-tokens": Case(
        around('[@GOOD@, {"model": "m", "input_tokens": -1}]'), 422, ">= 0", [(1, "input_tokens")]
    ),
    "fractional-tokens": Case(
        around('[@GOOD@, {"model": "m", "output_tokens": 1.5}]'),
        422,
        "int",
        [(1, "output_tokens")],
    ),
    "tokens-over-2^53": Case(
        around('[@GOOD@, {"model": "m", "input_tokens": 9007199254740993}]'),
        422,
        "input_tokens",
        [(1, "input_tokens")],
    ),
    # 2**53 is a valid count, but 2**53 Opus output tokens cost more than a 64-bit nano-dollar
    # column holds: before the fix the writer failed on the batch forever and dropped it.
    "runaway-computed-cost": Case(
        around('[@GOOD@, {"model": "claude-opus-4-5", "output_tokens": 9007199254740992}]'),
        422,
        "usd",
        [(1, "cost_usd")],
    ),
    "runaway-cache-savings": Case(
        around(
            '[@GOOD@, {"model": "claude-sonnet-4-5", "cost_usd": 1,'
            ' "cache_read_tokens": 9007199254740992}]'
        ),
        422,
        "usd",
        [(1, "cost_usd")],
    ),
    "nan": Case(
        around('[@GOOD@, {"model": "m", "latency_ms": NaN}]'), 422, "malformed", [(0, None)]
    ),
    "infinity-literal": Case(
        around('[@GOOD@, {"model": "m", "latency_ms": Infinity}]'), 422, "malformed", [(0, None)]
    ),
    "infinity-by-overflow": Case(
        around('[@GOOD@, {"model": "m", "cost_usd": 1e999}]'), 422, "cost_usd", [(1, "cost_usd")]
    ),
    "10k-model": Case(around(f'[@GOOD@, {{"model": "{TEN_K}"}}]'), 422, "length", [(1, "model")]),
    "10k-project": Case(
        around(f'[@GOOD@, {{"model": "m", "project": "{TEN_K}"}}]'),
        422,
        "length",
        [(1, "project")],
    ),
    "10k-message": Case(
        around(f'[@GOOD@, {{"type": "system", "message": "{TEN_K}"}}]'),
        422,
        "length",
        [(1, "message")],
    ),
    "control-character-in-label": Case(
        around('[@GOOD@, {"model": "m", "project": "a\\u0007b"}]'),
        422,
        "regex",
        [(1, "project")],
    ),
    "nul-in-label": Case(
        around('[@GOOD@, {"model": "m", "agent": "\\u0000"}]'), 422, "regex", [(1, "agent")]
    ),
    # Python's `$` matches before a final newline: before the fix, "web\n" passed as a label.
    "trailing-newline-in-label": Case(
        around('[@GOOD@, {"model": "m", "project": "web\\n"}]'), 422, "regex", [(1, "project")]
    ),
    "invalid-utf-8-in-label": Case(
        raw(b'[@GOOD@, {"model": "m", "project": "\xff\xfe"}]'), 422, "utf-8", [(0, None)]
    ),
    "encoded-surrogate-in-label": Case(
        raw(b'[@GOOD@, {"model": "m", "project": "\xed\xa0\x80"}]'), 422, "utf-8", [(0, None)]
    ),
    "timestamp-far-in-the-future": Case(
        around('[@GOOD@, {"model": "m", "timestamp": "2100-01-01T00:00:00Z"}]'),
        422,
        "future",
        [(1, "timestamp")],
    ),
    "epoch-ms-far-in-the-future": Case(
        around('[@GOOD@, {"model": "m", "timestamp": 4102444800000}]'),
        422,
        "future",
        [(1, "timestamp")],
    ),
    # Before 1970 in UTC: before the fix it was accepted and /current answered 500 ever after.
    "timestamp-before-1970": Case(
        around('[@GOOD@, {"model": "m", "timestamp": "0001-01-01T00:00:00+14:00"}]'),
        422,
        "1970",
        [(1, "timestamp")],
    ),
    "cache-1h-over-cache-writes": Case(
        around('[@GOOD@, {"model": "m", "cache_creation_1h_tokens": 2}]'),
        422,
        "cache_creation_1h_tokens",
        [(1, "cache_creation_1h_tokens")],
    ),
    "unknown-event-type": Case(
        around('[@GOOD@, {"type": "bogus", "model": "m"}]'), 422, "type", [(1, "type")]
    ),
    "empty-batch": Case(around("[]"), 422, "no event", [(0, None)]),
    "empty-body": Case(around(""), 422, "no event", [(0, None)]),
    "ndjson-of-blank-lines": Case(around("\n\n"), 422, "no event", [(0, None)], NDJSON),
    "ndjson-bad-line": Case(
        around('@GOOD@\n{"model": "m", "input_tokens": -1}\n'),
        422,
        "input_tokens",
        [(1, "input_tokens")],
        NDJSON,
    ),
    # Before the fix msgspec's RecursionError escaped as a 500.
    "nested-too-deeply": Case(
        around("[@GOOD@, " + "[" * 50_000), 422, "nested too deeply", [(0, None)]
    ),
    "body-over-the-limit": Case(around("[@GOOD@" + " " * BODY_LIMIT + "]"), 413, "exceeds", None),
    "batch-over-the-queue": Case(
        around("[@GOOD@" + ', {"model": "m"}' * MAX_QUEUE + "]"), 413, "at most", None
    ),
    "wrong-content-type": Case(
        around("[@GOOD@]"), 415, "content type", None, {"Content-Type": "text/csv"}
    ),
    "form-content-type": Case(
        around("[@GOOD@]"),
        415,
        "content type",
        None,
        {"Content-Type": "application/x-www-form-urlencoded"},
    ),
    "unsupported-content-encoding": Case(
        around("[@GOOD@]"), 415, "encoding", None, {**JSON, "Content-Encoding": "br"}
    ),
    "gzip-over-the-limit-once-decompressed": Case(
        zipped("[@GOOD@" + " " * (2 * BODY_LIMIT) + "]"), 413, "decompressed", None, GZIP
    ),
    "gzip-with-a-wrong-checksum": Case(
        lambda good: bytes(gzip.compress(b"[" + good + b"]")[:-8]) + bytes(8),
        400,
        "corrupt",
        None,
        GZIP,
    ),
    "gzip-header-only": Case(raw(b"\x1f\x8b\x08\x00garbage"), 400, "truncated", None, GZIP),
    "plain-json-called-gzip": Case(around("[@GOOD@]"), 400, "corrupt", None, GZIP),
    # Before the fix a stream cut before its trailer passed as whatever preceded the cut.
    "truncated-gzip": Case(
        lambda good: gzip.compress(b"[" + good + b"]")[:-8], 400, "truncated", None, GZIP
    ),
    "gzip-with-trailing-garbage": Case(
        lambda good: gzip.compress(b"[" + good + b"]") + b"garbage", 400, "corrupt", None, GZIP
    ),
}


def requests_total(client: httpx.Client) -> float:
    """The sum of `cco_llm_requests_total` over every label set (read from /metrics)."""
    text = client.get("/metrics").text
    families = {f.name: f for f in text_string_to_metric_families(text)}
    return sum(s.value for s in families["cco_llm_requests"].samples if s.name.endswith("_total"))


def stored(server: Server, session_id: str) -> int:
    [(count,)] = server.query("SELECT count(*) FROM calls WHERE session_id = ?", session_id)
    assert isinstance(count, int)
    return count


def good_event(session_id: str) -> bytes:
    return json.dumps(
        {"model": "claude-haiku-4-5", "input_tokens": 7, "session_id": session_id}
    ).encode()


@pytest.mark.parametrize("name", list(CASES))
def test_bad_input_is_refused_whole_and_the_server_stays_healthy(server: Server, name: str) -> None:
    case = CASES[name]
    marker = f"bad-{name}"
    with server.client() as client:
        before = requests_total(client)
        answer = client.post(
            "/api/events", content=case.body(good_event(marker)), headers=case.headers
        )
        after = requests_total(client)
        recent = client.get("/api/metrics/recent", params={"limit": 1000}).json()
        health = client.get("/api/metrics/health")
        following = client.post(
            "/api/events", content=good_event(f"{marker}-after"), params={"durable": "true"}
        )
    assert answer.status_code == case.status, answer.text
    assert answer.headers["content-type"].startswith("application/json")
    error = answer.json()
    assert error["status_code"] == case.status
    assert case.needle.lower() in error["detail"].lower()
    if case.errors is None:
        assert "errors" not in error
    else:
        assert [(e["index"], e["field"]) for e in error["errors"]] == case.errors
        assert all(e["message"] for e in error["errors"])
    # Nothing of the request was applied: not counted, not recent, and (once the durable post
    # has committed everything before it) not stored.
    assert after == before
    assert marker not in {call["session_id"] for call in recent}
    assert health.status_code == 200
    assert health.json()["status"] == "ok"
    assert following.status_code == 201, following.text
    assert stored(server, marker) == 0
    assert stored(server, f"{marker}-after") == 1


def test_a_chunked_body_over_the_limit_is_refused_while_it_arrives(server: Server) -> None:
    """Without a Content-Length the limit is enforced on the bytes read so far."""

    def chunks() -> Iterator[bytes]:
        yield b"[" + good_event("bad-chunked")
        for _ in range(2 * BODY_LIMIT // 4096):
            yield b" " * 4096
        yield b"]"

    with server.client() as client:
        before = requests_total(client)
        answer = client.post("/api/events", content=chunks(), headers=JSON)
        after = requests_total(client)
    assert answer.status_code == 413
    assert answer.json()["status_code"] == 413
    assert after == before


def test_gzip_bodies_within_the_limit_are_accepted_whole(server: Server) -> None:
    """Just under the limit once decompressed is fine, and so is a body of two gzip members
    (`cat a.gz b.gz`): before the fix the second member's events were silently dropped."""
    near = b"[" + good_event("gzip-near") + b"]"
    near = near[:-1] + b" " * (BODY_LIMIT - len(near)) + b"]"
    line = good_event("gzip-member") + b"\n"
    members = gzip.compress(line) + gzip.compress(line)
    with server.client() as client:
        whole = client.post(
            "/api/events", content=gzip.compress(near), headers=GZIP, params={"durable": "1"}
        )
        both = client.post(
            "/api/events",
            content=members,
            headers={**GZIP, "Content-Type": "application/x-ndjson"},
            params={"durable": "1"},
        )
    assert len(near) == BODY_LIMIT
    assert whole.status_code == 201, whole.text
    assert whole.json()["accepted"] == 1
    assert both.status_code == 201, both.text
    assert both.json()["accepted"] == 2
    assert stored(server, "gzip-near") == 1
    assert stored(server, "gzip-member") == 2


def test_unknown_fields_are_ignored_and_never_stored(server: Server) -> None:
    """README: unknown fields are ignored. They are accepted, and appear in no view or table."""
    events = [
        {"model": "claude-haiku-4-5", "session_id": "unknown-fields", "zz_unknown": "zz-call"},
        {
            "type": "system",
            "message": "hello",
            "request_id": "unknown-fields-system",
            "zz_unknown": {"nested": "zz-system"},
        },
    ]
    with server.client() as client:
        answer = client.post("/api/events", json=events, params={"durable": "true"})
        activity = client.get("/api/metrics/activity", params={"type": "system"}).json()
        current = client.get("/api/metrics/current").text
    assert answer.status_code == 201
    assert answer.json()["accepted"] == 2
    [(payload,)] = server.query(
        "SELECT payload FROM activity_events WHERE request_id = ?", "unknown-fields-system"
    )
    assert isinstance(payload, str)
    assert json.loads(payload)["message"] == "hello"
    assert "zz_unknown" not in payload
    [stored_event] = [
        e for e in activity["events"] if e["data"].get("requestId") == "unknown-fields-system"
    ]
    assert "zz_unknown" not in json.dumps(stored_event)
    assert "zz-call" not in current
    assert "zz-system" not in current
    assert stored(server, "unknown-fields") == 1


@pytest.mark.parametrize(
    "tier",
    [
        "%00",
        "..%2F..%2Fetc%2Fpasswd",
        "%2e%2e",
        "a" * 1000,
        "a" * 10_000,
        "%E2%98%83",  # a snowman
        "%F0%9F%92%B8",  # money with wings
        "%ff%fe",  # not UTF-8
        "%0d%0aSet-Cookie:%20a=b",
        "%3Cscript%3Ealert(1)%3C%2Fscript%3E",
    ],
    ids=[
        "nul",
        "dot-dot-slash",
        "dot-dot",
        "1000-chars",
        "10k-chars",
        "unicode",
        "emoji",
        "invalid-utf-8",
        "crlf",
        "script",
    ],
)
def test_an_odd_tier_path_is_a_json_4xx_never_a_500(server: Server, tier: str) -> None:
    with server.client() as client:
        answer = client.get(f"/api/metrics/tiers/{tier}")
        health = client.get("/api/metrics/health")
    assert answer.status_code in (400, 404), answer.text
    assert answer.headers["content-type"].startswith("application/json")
    assert answer.json()["status_code"] == answer.status_code
    assert "set-cookie" not in answer.headers
    assert len(answer.content) < 4096
    assert health.status_code == 200


def test_an_unknown_tier_answer_stays_small_however_many_tiers_there_are(server: Server) -> None:
    """Tiers come from events as well as from the price table: the 404 names only a few."""
    events = [{"model": "m", "tier": f"tier-{i:04d}"} for i in range(1000)]
    with server.client() as client:
        posted = client.post("/api/events", json=events)
        answer = client.get("/api/metrics/tiers/no-such-tier")
        known = client.get("/api/metrics/tiers/tier-0999")
    assert posted.status_code == 202
    assert answer.status_code == 404
    assert len(answer.content) < 2048
    assert "more" in answer.json()["detail"]
    assert known.status_code == 200


@pytest.mark.parametrize(
    ("model", "body", "needle"),
    [
        ("odd-tier", {"input": 1, "output": 1, "tier": "a\u0007b"}, "tier"),
        ("odd-provider", {"input": 1, "output": 1, "provider": ""}, "provider"),
        ("%00", {"input": 1, "output": 1}, "model id"),
        ("runaway-rate", {"input": 1, "output": 1e300}, "output"),
        ("nan-rate", {"input": 1, "output": "NaN"}, "output"),
    ],
    ids=["control-in-tier", "empty-provider", "nul-model", "rate-1e300", "rate-as-string"],
)
def test_pricing_put_refuses_odd_labels_and_runaway_rates(
    server: Server, model: str, body: dict[str, object], needle: str
) -> None:
    """Provider and tier of a price become label values of its calls: before the fix control
    characters and empty strings were taken, and a rate of 1e300 priced any call past what
    SQLite can store."""
    with server.client() as client:
        answer = client.put(f"/api/pricing/{model}", json=body)
        listed = client.get("/api/pricing").json()["models"]
    assert answer.status_code == 422, answer.text
    assert needle in answer.json()["detail"]
    assert model not in {p["model"] for p in listed}
