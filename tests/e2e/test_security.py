"""Auth, secrets in logs and CORS, against the real server over HTTP.

The token guards ingest and admin always and reads only with `auth_reads`; `/schema` stays open
either way (it describes the routes, it holds no data). No log line, on stderr or in the log
file, at debug level and in either format, carries a token, an API key or a password, whether it
came in a header, an event or the OTLP settings. CORS answers only the configured origins.
"""

from __future__ import annotations

import base64
import contextlib
import json
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from tests.e2e.conftest import START_TIMEOUT_S, Server, free_port

TOKEN = "sk-ant-api03-" + "Tk9xQ2v7Lw3Rz8Yb1Nc6Md4Pf0Hg5Js2" + "-AAAA"
WRONG = "sk-ant-api03-" + "Wr0ngW1thTheSamePrefixAndLength000" + "-BBBB"
EVENT = {"model": "claude-haiku-4-5", "input_tokens": 10, "output_tokens": 2}
PRICE = {"input": 1.0, "output": 2.0}


def _basic(user: str, password: str) -> str:
    return "Basic " + base64.b64encode(f"{user}:{password}".encode()).decode()


#: Authorization headers that must not pass, by what is wrong with them.
REFUSED = {
    "none": None,
    "wrong-token": f"Bearer {WRONG}",
    "token-prefix": f"Bearer {TOKEN[:-1]}",
    "token-with-suffix": f"Bearer {TOKEN}x",
    "scheme-only": "Bearer",
    "basic-scheme": _basic("cco", TOKEN),
    "token-scheme": f"Token {TOKEN}",
    "no-scheme": TOKEN,
    "two-spaces": f"Bearer  {TOKEN}",
}


@pytest.fixture(scope="module")
def guarded(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    """A server with a token; reads are open (the default)."""
    db = tmp_path_factory.mktemp("guarded") / "m.db"
    running = Server(db, env={"CCO_EXPORTER_TOKEN": TOKEN}).start()
    yield running
    running.stop()


def _headers(authorization: str | None) -> dict[str, str]:
    return {} if authorization is None else {"Authorization": authorization}


def _assert_401(answer: httpx.Response) -> None:
    assert answer.status_code == 401, answer.text
    assert answer.headers["www-authenticate"] == "Bearer"
    assert answer.headers["content-type"].startswith("application/json")
    body = answer.json()
    assert body["status_code"] == 401
    assert "bearer token" in body["detail"]


@pytest.mark.parametrize("authorization", list(REFUSED.values()), ids=list(REFUSED))
def test_ingest_and_admin_refuse_a_missing_or_wrong_token(
    guarded: Server, authorization: str | None
) -> None:
    with httpx.Client(base_url=guarded.url, timeout=10) as client:
        ingest = client.post("/api/events", json=EVENT, headers=_headers(authorization))
        admin = client.put("/api/pricing/my-model", json=PRICE, headers=_headers(authorization))
        in_query = client.post("/api/events", json=EVENT, params={"token": TOKEN})
        recent = client.get("/api/metrics/recent").json()
        listed = client.get("/api/pricing").json()["models"]
    _assert_401(ingest)
    _assert_401(admin)
    _assert_401(in_query)
    # Refused means not applied.
    assert recent == []
    assert "my-model" not in {price["model"] for price in listed}


@pytest.mark.parametrize("scheme", ["Bearer", "bearer", "BEARER"])
def test_the_right_token_works_and_the_scheme_is_case_insensitive(
    server_factory: type[Server], tmp_path: Path, scheme: str
) -> None:
    """RFC 7235: the auth scheme is case-insensitive; the token is compared exactly."""
    server = server_factory(tmp_path / "m.db", env={"CCO_EXPORTER_TOKEN": TOKEN}).start()
    headers = {"Authorization": f"{scheme} {TOKEN}"}
    with httpx.Client(base_url=server.url, timeout=10, headers=headers) as client:
        ingest = client.post("/api/events", json=EVENT, params={"durable": "true"})
        admin = client.put("/api/pricing/my-model", json=PRICE)
    assert ingest.status_code == 201, ingest.text
    assert ingest.json()["accepted"] == 1
    assert admin.status_code == 200, admin.text
    assert admin.json()["model"] == "my-model"
    assert server.query("SELECT count(*) FROM api_calls") == [(1,)]


READS = [
    "/api/metrics/stats",
    "/api/metrics/realtime",
    "/api/metrics/tiers/sonnet",
    "/api/metrics/recent",
    "/api/metrics/health",
    "/api/metrics/current",
    "/api/metrics/projects",
    "/api/metrics/models",
    "/api/metrics/activity",
    "/api/metrics/history",
    "/api/metrics/budget",
    "/api/pricing",
    "/metrics",
]


def _first_stream_line(client: httpx.Client) -> tuple[int, str]:
    """The stream's status and first line (it never ends: read one line, then hang up)."""
    with client.stream("GET", "/api/stream") as answer:
        if answer.status_code != 200:
            answer.read()
            return answer.status_code, answer.text
        for line in answer.iter_lines():
            if line:
                return 200, line
    return answer.status_code, ""


def test_reads_are_open_by_default(guarded: Server) -> None:
    with httpx.Client(base_url=guarded.url, timeout=10) as client:
        statuses = {path: client.get(path).status_code for path in READS}
        stream_status, _ = _first_stream_line(client)
        schema = client.get("/schema/openapi.json")
    assert statuses == dict.fromkeys(READS, 200)
    assert stream_status == 200
    assert schema.status_code == 200


class ReadsGuarded(Server):
    """A server with `auth_reads`: conftest's `start()` waits for an anonymous 200 from health,
    which this one refuses, so it waits for an answer with the token instead."""

    def start(self) -> Server:
        command = [sys.executable, "-m", "exporter", "serve", "--host", "127.0.0.1"]
        command += ["--port", str(self.port), "--db", str(self.db)]
        with self.log.open("ab") as log:
            self.process = subprocess.Popen(
                command, stdout=log, stderr=subprocess.STDOUT, env=self.env
            )
        deadline = time.monotonic() + START_TIMEOUT_S
        while time.monotonic() < deadline:
            assert self.process.poll() is None, f"server exited at start:\n{self.logs()}"
            with contextlib.suppress(httpx.TransportError), self.client(TOKEN) as client:
                if client.get("/api/metrics/health", timeout=1).status_code == 200:
                    return self
            time.sleep(0.1)
        self.kill()
        raise RuntimeError(f"server did not answer within {START_TIMEOUT_S}s:\n{self.logs()}")


@pytest.fixture
def reads_guarded(tmp_path: Path) -> Iterator[Server]:
    env = {"CCO_EXPORTER_TOKEN": TOKEN, "CCO_EXPORTER_AUTH_READS": "true"}
    server = ReadsGuarded(tmp_path / "m.db", env=env)
    try:
        yield server.start()
    finally:
        server.stop()


def test_auth_reads_guards_every_read_but_the_schema(reads_guarded: Server) -> None:
    server = reads_guarded
    refused: dict[str, httpx.Response] = {}
    with httpx.Client(base_url=server.url, timeout=10) as anonymous:
        for path in READS:
            refused[path] = anonymous.get(path, headers={"Authorization": f"Bearer {WRONG}"})
        stream_refused = _first_stream_line(anonymous)
        schema = anonymous.get("/schema/openapi.json")
    with server.client(TOKEN) as reader:
        allowed = {path: reader.get(path).status_code for path in READS}
        stream_allowed = _first_stream_line(reader)
    for answer in refused.values():
        _assert_401(answer)
    assert stream_refused[0] == 401
    assert allowed == dict.fromkeys(READS, 200)
    assert stream_allowed[0] == 200
    assert stream_allowed[1].startswith("event:") or stream_allowed[1].startswith("data:")
    # The document stays open, and says which reads answer 401.
    assert schema.status_code == 200
    stats = schema.json()["paths"]["/api/metrics/stats"]["get"]
    assert "401" in stats["responses"]


# -- secrets never reach a log line --------------------------------------------------------------

OTLP_PASSWORD = "sk-proj-" + "OtlpUrlPassw0rdThatMustNotLeak42"
OTLP_HEADER_KEY = "sk-ant-api03-" + "OtlpHeaderKeyThatMustNotLeak4242"
EVENT_KEY = "sk-proj-" + "abc123EventMessageKeyMustNotLeak9"
CONTEXT_KEY = "sk-ant-api03-" + "ContextHeaderKeyMustNotLeak77777"
QUERY_KEY = "sk-" + "QueryStringKeyThatMustNotLeak555"
OTLP_FAILURE = 'cco_exporter_otlp_exports_total{result="failure"}'
SECRETS = [TOKEN, WRONG, OTLP_PASSWORD, OTLP_HEADER_KEY, EVENT_KEY, CONTEXT_KEY, QUERY_KEY]


@pytest.mark.parametrize("log_format", ["text", "json"])
def test_no_secret_reaches_any_log_line(
    server_factory: type[Server], tmp_path: Path, log_format: str
) -> None:
    """Debug logging to stderr and a file while secrets travel in every place they can: the
    configured token, wrong tokens, API keys inside events and a query string, and the OTLP
    endpoint's password and headers (with the collector down, so its failures are logged)."""
    log_file = tmp_path / "logs" / "exporter.log"
    closed_port = free_port()
    env = {
        "CCO_EXPORTER_TOKEN": TOKEN,
        "CCO_EXPORTER_LOG_LEVEL": "debug",
        "CCO_EXPORTER_LOG_FORMAT": log_format,
        "CCO_EXPORTER_LOG_FILE": str(log_file),
        "CCO_EXPORTER_HEARTBEAT_INTERVAL": "0.5",
        "CCO_EXPORTER_OTLP_ENDPOINT": f"http://cco:{OTLP_PASSWORD}@127.0.0.1:{closed_port}",
        "CCO_EXPORTER_OTLP_INTERVAL": "0.3",
        "CCO_EXPORTER_OTLP_TIMEOUT": "1",
        "OTEL_EXPORTER_OTLP_HEADERS": f"x-api-key={OTLP_HEADER_KEY},authorization=Bearer%20{TOKEN}",
    }
    server = server_factory(tmp_path / "m.db", env=env).start()
    events = [
        {**EVENT, "request_id": "with-secrets"},
        {"type": "system", "message": f"key {EVENT_KEY}", "context": f"Bearer {TOKEN}"},
        {
            "type": "error",
            "error_type": "auth",
            "message": f"401 from upstream for {EVENT_KEY}",
            "context": f"x-api-key: {CONTEXT_KEY}",
        },
    ]
    with server.client(TOKEN) as client:
        accepted = client.post("/api/events", json=events, params={"durable": "true"})
        client.get("/api/metrics/stats", params={"api_key": QUERY_KEY})
        client.get(f"/api/metrics/tiers/{QUERY_KEY}")
        client.get("/api/metrics/activity", params={"from": QUERY_KEY})
        with_wrong = client.post(
            "/api/events", json=events, headers={"Authorization": f"Bearer {WRONG}"}
        )
        client.post("/api/events", content=f'{{"model": "{EVENT_KEY}", "x": ', headers={})
        # A request uvicorn cannot parse is logged as a warning: the bytes it held are not.
        with socket.create_connection(("127.0.0.1", server.port), timeout=5) as raw:
            raw.sendall(
                f"GET /metrics?key={QUERY_KEY} HTTP/1.1\r\nHost: x\r\n"
                f"Authorization: Bearer {WRONG}\x00\r\n\r\n".encode()
            )
            assert raw.recv(4096).startswith(b"HTTP/1.1 400")
        # An export has to fail (and be logged) before the logs are read.
        deadline = time.monotonic() + 15
        while OTLP_FAILURE not in client.get("/metrics").text:
            assert time.monotonic() < deadline, "no OTLP export failed within 15 s"
            time.sleep(0.1)
    assert server.stop() == 0
    assert accepted.status_code == 201
    assert with_wrong.status_code == 401
    # The secrets did travel through the server: the events holding them are stored.
    [(payload,)] = server.query("SELECT payload FROM activity_events WHERE type = 'system'")
    assert EVENT_KEY in str(payload)
    logs = {"stderr": server.logs()}
    logs.update({path.name: path.read_text() for path in log_file.parent.glob("exporter.log*")})
    assert logs[log_file.name].strip(), "the log file is empty"
    for name, text in logs.items():
        lines = text.splitlines()
        assert any("OTLP export to" in line and "failed" in line for line in lines), name
        assert any("Invalid HTTP request" in line for line in lines), name
        assert any("DEBUG" in line or '"level":"debug"' in line for line in lines), name
        if log_format == "json":
            assert all(json.loads(line)["message"] for line in lines if line.startswith("{"))
        leaked = [(secret, line) for line in lines for secret in SECRETS if secret in line]
        assert leaked == [], f"{name}: {leaked}"
        # The redaction leaves a marker, and does not mangle the endpoint's host and port.
        assert f"127.0.0.1:{closed_port}" in text


# -- CORS ----------------------------------------------------------------------------------------

DASH = "https://dash.example"
EVIL = "https://evil.example"


def _preflight(client: httpx.Client, origin: str, method: str, path: str) -> httpx.Response:
    return client.options(
        path,
        headers={
            "Origin": origin,
            "Access-Control-Request-Method": method,
            "Access-Control-Request-Headers": "authorization, content-type",
        },
    )


def test_cors_is_off_by_default(guarded: Server) -> None:
    with httpx.Client(base_url=guarded.url, timeout=10) as client:
        preflight = _preflight(client, DASH, "GET", "/api/metrics/stats")
        ingest_preflight = _preflight(client, DASH, "POST", "/api/events")
        read = client.get("/api/metrics/stats", headers={"Origin": DASH})
    for answer in (preflight, ingest_preflight, read):
        assert "access-control-allow-origin" not in answer.headers
        assert "access-control-allow-credentials" not in answer.headers
    assert read.status_code == 200


def test_cors_answers_only_the_configured_origin(
    server_factory: type[Server], tmp_path: Path
) -> None:
    env = {"CCO_EXPORTER_CORS_ORIGINS": DASH, "CCO_EXPORTER_TOKEN": TOKEN}
    server = server_factory(tmp_path / "m.db", env=env).start()
    with httpx.Client(base_url=server.url, timeout=10) as client:
        preflight = _preflight(client, DASH, "GET", "/api/metrics/stats")
        ingest_preflight = _preflight(client, DASH, "POST", "/api/events")
        read = client.get("/api/metrics/stats", headers={"Origin": DASH})
        ingest = client.post(
            "/api/events",
            json=EVENT,
            headers={"Origin": DASH, "Authorization": f"Bearer {TOKEN}"},
        )
        evil_preflight = _preflight(client, EVIL, "GET", "/api/metrics/stats")
        evil_read = client.get("/api/metrics/stats", headers={"Origin": EVIL})
    for answer in (preflight, ingest_preflight, read, ingest):
        assert answer.headers.get("access-control-allow-origin") == DASH, answer.headers
        assert answer.status_code < 300, answer.text
    assert ingest.status_code == 202
    # Another origin is never named, nor `*`: with one origin configured Litestar names that one
    # in every answer, and the browser, which compares, lets the other page read nothing.
    for answer in (evil_preflight, evil_read):
        assert answer.headers.get("access-control-allow-origin") in (None, DASH), answer.headers
    assert evil_preflight.status_code == 400
    assert evil_read.status_code == 200
