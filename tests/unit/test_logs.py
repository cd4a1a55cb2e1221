"""Logging: text and JSON lines, the rotating file, uvicorn routed through, secrets redacted."""

from __future__ import annotations

import io
import json
import logging
import logging.handlers
from collections.abc import Iterator
from pathlib import Path

import pytest

from exporter import ApiCall, Exporter, Settings
from exporter.logs import (
    REDACTED,
    RedactingFilter,
    heartbeat_line,
    redact,
    reset_logging,
    setup_logging,
)
from tests.conftest import FakeClock

ANTHROPIC_KEY = "sk-ant-api03-" + "Ab3_x-" * 15 + "AA"
OPENAI_KEY = "sk-proj-" + "Zq9T" * 12
LEGACY_OPENAI_KEY = "sk-" + "a1B2c3D4e5F6g7H8" * 3


@pytest.fixture(autouse=True)
def _restore_logging() -> Iterator[None]:
    yield
    reset_logging()


def configure(**fields: object) -> io.StringIO:
    stream = io.StringIO()
    setup_logging(Settings(**fields), stream=stream)  # type: ignore[arg-type]
    return stream


def test_text_lines_carry_time_level_logger_and_message() -> None:
    stream = configure()
    logging.getLogger("exporter.test").info("flushed %d events", 100)
    line = stream.getvalue().strip()
    stamp, level, name, message = line.split(" ", 3)
    assert stamp[:2] == "20"
    assert "T" in stamp
    assert (level, name, message) == ("INFO", "exporter.test", "flushed 100 events")


def test_json_lines_are_one_object_each_with_extras() -> None:
    stream = configure(log_format="json")
    log = logging.getLogger("exporter.writer")
    log.warning("flush failed", extra={"events": 42, "path": Path("/tmp/x")})
    log.info("second")
    first, second = (json.loads(line) for line in stream.getvalue().splitlines())
    assert first["level"] == "warning"
    assert first["logger"] == "exporter.writer"
    assert first["message"] == "flush failed"
    assert first["events"] == 42
    assert first["path"] == "/tmp/x"
    assert first["ts"].endswith("Z")
    assert len(first["ts"]) == len("2026-01-01T00:00:00.000Z")
    assert second["message"] == "second"


def test_json_lines_carry_the_exception() -> None:
    stream = configure(log_format="json")
    try:
        raise RuntimeError("disk full")
    except RuntimeError:
        logging.getLogger("exporter.writer").exception("flush failed")
    entry = json.loads(stream.getvalue())
    assert "RuntimeError: disk full" in entry["exception"]


def test_the_level_setting_drops_less_severe_records() -> None:
    stream = configure(log_level="warning")
    log = logging.getLogger("exporter.test")
    log.info("quiet")
    log.warning("loud")
    assert "quiet" not in stream.getvalue()
    assert "loud" in stream.getvalue()


def test_debug_level_lets_debug_through() -> None:
    stream = configure(log_level="debug")
    logging.getLogger("exporter.test").debug("detail")
    logging.getLogger("aiosqlite").debug("executing INSERT ...")
    assert "DEBUG exporter.test detail" in stream.getvalue()
    assert "aiosqlite" not in stream.getvalue()


def test_the_log_file_rotates_at_midnight_keeping_ten(tmp_path: Path) -> None:
    path = tmp_path / "logs" / "exporter.log"
    configure(log_file=str(path))
    handlers = [
        h
        for h in logging.getLogger().handlers
        if isinstance(h, logging.handlers.TimedRotatingFileHandler)
    ]
    assert len(handlers) == 1
    assert handlers[0].when == "MIDNIGHT"
    assert handlers[0].backupCount == 10
    assert Path(handlers[0].baseFilename) == path
    logging.getLogger("exporter.test").error("to the file too")
    handlers[0].flush()
    assert "ERROR exporter.test to the file too" in path.read_text(encoding="utf-8")


def test_uvicorn_records_go_through_the_same_handlers() -> None:
    # As uvicorn's own dictConfig leaves them: a handler of its own and propagation off.
    server = logging.getLogger("uvicorn.error")
    stray = logging.StreamHandler(io.StringIO())
    server.addHandler(stray)
    logging.getLogger("uvicorn.access").propagate = False
    stream = configure(log_format="json")
    server.info("Uvicorn running on %s", "http://127.0.0.1:9469", extra={"color_message": "x"})
    logging.getLogger("uvicorn.access").info(
        '%s - "%s %s HTTP/%s" %d', "127.0.0.1:5000", "GET", "/metrics", "1.1", 200
    )
    first, second = (json.loads(line) for line in stream.getvalue().splitlines())
    assert first["logger"] == "uvicorn.error"
    assert first["message"] == "Uvicorn running on http://127.0.0.1:9469"
    assert "color_message" not in first
    assert second["message"] == '127.0.0.1:5000 - "GET /metrics HTTP/1.1" 200'
    assert stray not in server.handlers


def test_setting_up_again_replaces_only_its_own_handlers() -> None:
    root = logging.getLogger()
    theirs = logging.StreamHandler(io.StringIO())
    root.addHandler(theirs)
    before = list(root.handlers)
    try:
        first = configure()
        second = configure()
        logging.getLogger("exporter.test").warning("once")
        assert first.getvalue() == ""
        assert second.getvalue().count("once") == 1
        assert theirs.stream.getvalue() == "once\n"
        reset_logging()
        assert root.handlers == before
    finally:
        root.removeHandler(theirs)


@pytest.mark.parametrize(
    ("message", "secret"),
    [
        ("upstream request headers: Authorization: Bearer abc123xyz", "abc123xyz"),
        ("headers={'authorization': 'Bearer tok.en-value'}", "tok.en-value"),
        ('{"Authorization": "Basic dXNlcjpwYXNz"}', "dXNlcjpwYXNz"),
        ("retrying with bearer qwerty987 after 429", "qwerty987"),
        (f"x-api-key: {ANTHROPIC_KEY}", ANTHROPIC_KEY),
        ("X-Api-Key=plainsecretvalue", "plainsecretvalue"),
        (f"client built with key {ANTHROPIC_KEY} for project web", ANTHROPIC_KEY),
        (f"OPENAI_API_KEY={OPENAI_KEY}", OPENAI_KEY),
        (f"using {LEGACY_OPENAI_KEY}", LEGACY_OPENAI_KEY),
        ("GET /api/events?durable=true&token=hunter22 HTTP/1.1", "hunter22"),
    ],
)
def test_secrets_never_reach_the_log(message: str, secret: str) -> None:
    stream = configure(log_format="json")
    logging.getLogger("exporter.test").info(message)
    written = stream.getvalue()
    assert secret not in written
    assert REDACTED in json.loads(written)["message"]


def test_secrets_in_arguments_extras_and_tracebacks_are_redacted() -> None:
    stream = configure(log_format="json")
    log = logging.getLogger("exporter.test")
    log.info("calling with %s", f"Authorization: Bearer {OPENAI_KEY}")
    log.info("request", extra={"headers": f"x-api-key: {ANTHROPIC_KEY}"})
    try:
        raise ValueError(f"bad key {ANTHROPIC_KEY}")
    except ValueError:
        log.exception("upstream refused")
    written = stream.getvalue()
    assert OPENAI_KEY not in written
    assert ANTHROPIC_KEY not in written
    assert written.count(REDACTED) == 3


def test_the_configured_token_is_redacted_wherever_it_appears() -> None:
    stream = configure(token="my-ingest-token-1")
    logging.getLogger("exporter.test").warning("client sent my-ingest-token-1 twice")
    assert "my-ingest-token-1" not in stream.getvalue()
    assert f"client sent {REDACTED} twice" in stream.getvalue()


@pytest.mark.parametrize(
    "text",
    [
        "cost $0.1234 for claude-sonnet-4-5 (project web-app)",
        "installed sk-learn and task-runner",
        "api_call accepted: 202 {'accepted': 3}",
        "Authorization header missing",
    ],
)
def test_ordinary_text_is_left_alone(text: str) -> None:
    assert redact(text) == text


async def test_the_heartbeat_summarises_the_last_minute(tmp_path: Path, clock: FakeClock) -> None:
    exporter = await Exporter.start(Settings(db_path=str(tmp_path / "m.db")), clock=clock)
    try:
        for latency in (100.0, 200.0, 300.0):
            exporter.record(
                ApiCall(
                    model="claude-sonnet-4-5",
                    timestamp=clock.ms,
                    input_tokens=1000,
                    output_tokens=50,
                    latency_ms=latency,
                    cost_usd=0.25,
                )
            )
        line = heartbeat_line(exporter)
        p95 = exporter.aggregator.window("1m").p95_ms
    finally:
        await exporter.close()
    assert line.startswith("heartbeat 1m: calls=3 cost=$0.7500 tokens_in=3000 tokens_out=150")
    assert p95 is not None
    assert 190 <= p95 <= 310  # the sketch bounds relative error; no exact value is promised
    assert f" p95_ms={p95:.0f} " in line
    assert "queue=3/100000" in line
    assert line.endswith("spill_backlog=0 degraded=no")


async def test_the_heartbeat_of_an_idle_exporter(tmp_path: Path, clock: FakeClock) -> None:
    exporter = await Exporter.start(Settings(db_path=str(tmp_path / "m.db")), clock=clock)
    try:
        line = heartbeat_line(exporter)
    finally:
        await exporter.close()
    assert line == (
        "heartbeat 1m: calls=0 cost=$0.0000 tokens_in=0 tokens_out=0 p95_ms=- queue=0/100000"
        " spill_backlog=0 degraded=no"
    )


def test_a_malformed_logging_call_is_left_for_the_handler_to_report() -> None:
    # The filter must not raise into the code that logged: logging's handleError reports it.
    record = logging.LogRecord("x", logging.INFO, "f.py", 1, f"%d {OPENAI_KEY}", ("many",), None)
    assert RedactingFilter().filter(record) is True
    assert record.msg == f"%d {REDACTED}"
