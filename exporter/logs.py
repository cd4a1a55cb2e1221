"""Logging: stderr (text or JSON lines), an optional daily-rotated file, secrets redacted.

The HTTP server's loggers (uvicorn) go through the same handlers: `serve` must start uvicorn
with `log_config=None` so that uvicorn leaves this configuration alone.
"""

from __future__ import annotations

import logging
import logging.handlers
import re
import sys
import time
from collections.abc import Iterable
from pathlib import Path
from typing import TYPE_CHECKING, Any, Final, TextIO

import msgspec

from exporter.settings import Settings
from exporter.windows import TOKENS_IN, TOKENS_OUT

if TYPE_CHECKING:
    from exporter.engine import Exporter

__all__ = [
    "REDACTED",
    "JsonFormatter",
    "RedactingFilter",
    "heartbeat_line",
    "redact",
    "reset_logging",
    "setup_logging",
]

REDACTED: Final = "[REDACTED]"
#: Loggers of the HTTP server; their records propagate to the root logger's handlers.
UVICORN_LOGGERS: Final = ("uvicorn", "uvicorn.error", "uvicorn.access")
_TEXT_FORMAT: Final = "%(asctime)s %(levelname)s %(name)s %(message)s"
_DATE_FORMAT: Final = "%Y-%m-%dT%H:%M:%S%z"
_ROTATE_KEEP: Final = 10

# Secrets look like this in messages, header dumps and URLs. The key prefixes (`sk-ant-`,
# `sk-proj-`, plain `sk-`) are long random strings; 16 characters keeps words like `sk-learn`.
_SECRET_PATTERNS: Final = (
    (
        re.compile(
            r"(?i)(\b(?:proxy-)?authorization[\"']?\s*[:=]\s*[\"']?)"
            r"(?:(bearer|basic|token)\s+)?[^\s\"',;}]+"
        ),
        lambda m: f"{m[1]}{m[2] + ' ' if m[2] else ''}{REDACTED}",
    ),
    (re.compile(r"(?i)\b(bearer)\s+[A-Za-z0-9._~+/=-]+"), lambda m: f"{m[1]} {REDACTED}"),
    (
        re.compile(
            r"(?i)(\b(?:x-api-key|x-goog-api-key|api[_-]?key)[\"']?\s*[:=]\s*[\"']?)"
            r"[^\s\"',;}&]+"
        ),
        lambda m: f"{m[1]}{REDACTED}",
    ),
    (
        re.compile(r"(?i)([?&](?:token|access_token|api_key|key)=)[^&\s\"']+"),
        lambda m: f"{m[1]}{REDACTED}",
    ),
    (re.compile(r"\bsk-[A-Za-z0-9][A-Za-z0-9_-]{15,}"), lambda _m: REDACTED),
)
#: LogRecord attributes that are not `extra=` fields (uvicorn's colour copy of the message too).
_RECORD_FIELDS: Final = frozenset(
    {
        *logging.LogRecord("", 0, "", 0, "", None, None).__dict__,
        "message",
        "asctime",
        "color_message",
        "taskName",
    }
)
_installed: list[logging.Handler] = []
_previous_level: list[int] = []


def redact(text: str, literals: Iterable[str] = ()) -> str:
    """`text` with anything that looks like a secret, and each of `literals`, replaced."""
    for literal in literals:
        if literal:
            text = text.replace(literal, REDACTED)
    for pattern, replace in _SECRET_PATTERNS:
        text = pattern.sub(replace, text)
    return text


class RedactingFilter(logging.Filter):
    """Rewrites each record so no handler writes a secret: message, traceback and extras.

    It sits on the handlers, not on a logger, because a logger's filters do not see records
    that propagate up from other loggers (uvicorn's, the libraries').
    """

    def __init__(self, literals: Iterable[str] = ()) -> None:
        super().__init__()
        self.literals = tuple(s for s in literals if s)

    def filter(self, record: logging.LogRecord) -> bool:
        try:
            message = record.getMessage()
        except Exception:
            # A malformed logging call: let the handler report it as logging does, not raise
            # into the code that logged. Its raw format string is still redacted.
            record.msg = redact(str(record.msg), self.literals)
            return True
        record.msg = redact(message, self.literals)
        record.args = None
        if record.exc_info and not record.exc_text:
            record.exc_text = logging.Formatter().formatException(record.exc_info)
        if record.exc_text:
            record.exc_text = redact(record.exc_text, self.literals)
        if record.stack_info:
            record.stack_info = redact(record.stack_info, self.literals)
        for name, value in list(record.__dict__.items()):
            if name not in _RECORD_FIELDS and isinstance(value, str):
                setattr(record, name, redact(value, self.literals))
        return True


class JsonFormatter(logging.Formatter):
    """One JSON object per line: ts (UTC, RFC 3339), level, logger, message, then extras."""

    _encoder: Final = msgspec.json.Encoder(enc_hook=str)

    def format(self, record: logging.LogRecord) -> str:
        entry: dict[str, Any] = {
            "ts": _utc_rfc3339(record.created),
            "level": record.levelname.lower(),
            "logger": record.name,
            "message": record.getMessage(),
        }
        for name, value in record.__dict__.items():
            if name not in _RECORD_FIELDS and name not in entry:
                entry[name] = value
        if record.exc_info and not record.exc_text:
            record.exc_text = self.formatException(record.exc_info)
        if record.exc_text:
            entry["exception"] = record.exc_text
        if record.stack_info:
            entry["stack"] = record.stack_info
        return self._encoder.encode(entry).decode()


def setup_logging(settings: Settings, *, stream: TextIO | None = None) -> None:
    """Send every logger's records (uvicorn's included) to stderr, or `stream`, and to
    `settings.log_file` when set (rotated at midnight, 10 old files kept).

    Calling it again replaces what the previous call installed and nothing else, so handlers
    that others added to the root logger (pytest's, an embedding app's) stay.
    """
    reset_logging()
    formatter: logging.Formatter = (
        JsonFormatter()
        if settings.log_format == "json"
        else logging.Formatter(_TEXT_FORMAT, _DATE_FORMAT)
    )
    redacting = RedactingFilter([settings.token])
    handlers: list[logging.Handler] = [logging.StreamHandler(stream or sys.stderr)]
    if settings.log_file:
        path = Path(settings.log_file)
        path.parent.mkdir(parents=True, exist_ok=True)
        handlers.append(
            logging.handlers.TimedRotatingFileHandler(
                path, when="midnight", backupCount=_ROTATE_KEEP, encoding="utf-8", delay=True
            )
        )
    root = logging.getLogger()
    _previous_level.append(root.level)
    for handler in handlers:
        handler.setFormatter(formatter)
        handler.addFilter(redacting)
        root.addHandler(handler)
        _installed.append(handler)
    root.setLevel(settings.log_level.upper())
    for name in UVICORN_LOGGERS:
        server_logger = logging.getLogger(name)
        server_logger.handlers.clear()
        server_logger.setLevel(logging.NOTSET)
        server_logger.propagate = True
    # aiosqlite logs every statement, with its parameters, at DEBUG: at our debug level that
    # would drown the exporter's own lines and write the stored rows a second time.
    logging.getLogger("aiosqlite").setLevel(logging.INFO)
    # The OTLP SDK logs each retry and each failed export at length; the pusher already logs
    # one line per failure (and counts it), so the SDK's own lines would only repeat it.
    logging.getLogger(_OTLP_SDK_LOGGER).setLevel(logging.CRITICAL)


_OTLP_SDK_LOGGER: Final = "opentelemetry.exporter.otlp"


def reset_logging() -> None:
    """Remove and close the handlers `setup_logging` installed; restore the root level."""
    root = logging.getLogger()
    while _installed:
        handler = _installed.pop()
        root.removeHandler(handler)
        handler.close()
    if _previous_level:
        root.setLevel(_previous_level.pop())
        logging.getLogger("aiosqlite").setLevel(logging.NOTSET)
        logging.getLogger(_OTLP_SDK_LOGGER).setLevel(logging.NOTSET)


def heartbeat_line(exporter: Exporter) -> str:
    """The 1-minute summary the server logs periodically: traffic, cost and writer health."""
    window = exporter.aggregator.window("1m")
    health = exporter.health()
    p95 = "-" if window.p95_ms is None else f"{window.p95_ms:.0f}"
    return (
        f"heartbeat 1m: calls={window.calls} cost=${window.cost_usd:.4f}"
        f" tokens_in={window.total[TOKENS_IN]} tokens_out={window.total[TOKENS_OUT]}"
        f" p95_ms={p95} queue={health.queue_depth}/{health.max_queue}"
        f" spill_backlog={health.spill_backlog} degraded={'yes' if health.degraded else 'no'}"
    )


def _utc_rfc3339(created: float) -> str:
    seconds = int(created)
    millis = int((created - seconds) * 1000)
    return time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(seconds)) + f".{millis:03d}Z"
