"""Ingest schema: the tagged union of event Structs and the one shared Decoder.

Every source of events (HTTP, the Python API, later the proxy and importers) produces these
Structs; validation happens once, here, so the aggregator and the store can trust their input.
"""

from __future__ import annotations

import re
import time
from datetime import datetime
from typing import Annotated, Any, Final, Literal

import msgspec

__all__ = [
    "LABEL_PATTERN",
    "MAX_COST_USD",
    "ApiCall",
    "CacheHit",
    "CacheMiss",
    "ErrorEvent",
    "Event",
    "EventValidationError",
    "ItemError",
    "ModelOverride",
    "SystemEvent",
    "decode_batch",
    "decode_event",
    "event_from_dict",
    "from_openai_usage",
    "timestamp_ms",
]

#: Timestamps further than this in the future are rejected: a clock that far off would put the
#: event into windows it does not belong to.
MAX_FUTURE_MS: Final = 5 * 60 * 1000
#: The most one event may cost (or save), in US dollars; the REST ingest also holds a call's
#: computed cost to it.
MAX_COST_USD: Final = 1e6
#: JSON integers above 2**53 lose precision in most clients; no real token count comes near it.
MAX_COUNT: Final = 2**53
#: What a label value may hold (besides 1..200 characters): no control character. `(?!\n)`
#: because Python's `$` also matches before a final newline, itself a control character.
LABEL_PATTERN: Final = r"^[^\x00-\x1f\x7f]*(?!\n)$"

Count = Annotated[int, msgspec.Meta(ge=0, le=MAX_COUNT)]
Label = Annotated[str, msgspec.Meta(min_length=1, max_length=200, pattern=LABEL_PATTERN)]
ModelName = Annotated[str, msgspec.Meta(min_length=1, max_length=200, pattern=LABEL_PATTERN)]
Text = Annotated[str, msgspec.Meta(max_length=4096)]
# Upper bounds reject absurd values; msgspec itself refuses NaN and 1e999 in JSON.
LatencyMs = Annotated[float, msgspec.Meta(ge=0, le=1e9)]
Usd = Annotated[float, msgspec.Meta(ge=0, le=MAX_COST_USD)]
Timestamp = Annotated[int, msgspec.Meta(ge=0)] | Annotated[datetime, msgspec.Meta(tz=True)]


class _Base(msgspec.Struct, tag_field="type", kw_only=True, omit_defaults=True):
    """Fields every event carries. `timestamp` is epoch milliseconds after validation."""

    timestamp: Timestamp | None = None
    project: Label = "default"
    session_id: Label | None = None
    agent: Label | None = None
    request_id: Label | None = None

    def __post_init__(self) -> None:
        ts = self.timestamp
        if ts is None:
            return
        if isinstance(ts, datetime):
            ts = self.timestamp = int(ts.timestamp() * 1000)
            # Year 1 with a positive offset is before year 1 in UTC: no view could print it.
            if ts < 0:
                raise ValueError("`timestamp` must not be before 1970-01-01T00:00:00Z")
        elif ts > MAX_COUNT:
            raise ValueError("`timestamp` must be epoch milliseconds or an RFC 3339 string")
        if ts > time.time() * 1000 + MAX_FUTURE_MS:
            raise ValueError("`timestamp` is more than 5 minutes in the future")


class ApiCall(_Base, tag="api_call"):
    """One LLM API call. Cache tokens follow Anthropic: not included in `input_tokens`."""

    model: ModelName
    provider: Label | None = None
    tier: Label | None = None
    input_tokens: Count = 0
    output_tokens: Count = 0
    cache_creation_tokens: Count = 0
    cache_read_tokens: Count = 0
    cache_creation_1h_tokens: Count = 0
    latency_ms: LatencyMs | None = None
    cost_usd: Usd | None = None
    status: Literal["ok", "error"] = "ok"
    error_type: Label | None = None

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.cache_creation_1h_tokens > self.cache_creation_tokens:
            raise ValueError(
                "`cache_creation_1h_tokens` is part of `cache_creation_tokens` and cannot exceed it"
            )


class CacheHit(_Base, tag="cache_hit"):
    """A response served from the proxy's own cache; `savings_usd` is what the call would cost."""

    model: ModelName | None = None
    savings_usd: Usd = 0.0
    cache_key: Label | None = None


class CacheMiss(_Base, tag="cache_miss"):
    """A proxy cache lookup that found nothing."""

    model: ModelName | None = None
    cache_key: Label | None = None


class ErrorEvent(_Base, tag="error"):
    """An error outside a priced call (rate limit, upstream down, ...)."""

    model: ModelName | None = None
    error_type: Label | None = None
    message: Text = ""
    context: Text = ""


class ModelOverride(_Base, tag="model_override"):
    """The orchestrator sent a request to another model than asked (e.g. opus exhausted)."""

    original_model: ModelName
    override_model: ModelName
    reason: Label = "unspecified"


class SystemEvent(_Base, tag="system"):
    """A free-form note from the client (start, stop, configuration change)."""

    message: Text = ""
    context: Text = ""


Event = ApiCall | CacheHit | CacheMiss | ErrorEvent | ModelOverride | SystemEvent

_DEFAULT_TYPE: Final = "api_call"
_batch_decoder: Final = msgspec.json.Decoder(list[Event])
_call_batch_decoder: Final = msgspec.json.Decoder(list[ApiCall])
_ERROR_AT = re.compile(r"^(?P<msg>.*) - at `\$(?P<path>[^`]*)`$", re.DOTALL)
_ITEM_PATH = re.compile(r"^\[(?P<index>\d+)\]\.?(?P<field>.*)$")
_FIELDS: Final = frozenset(
    name
    for kind in (ApiCall, CacheHit, CacheMiss, ErrorEvent, ModelOverride, SystemEvent)
    for name in (*kind.__struct_fields__, "type")
)


class ItemError(msgspec.Struct):
    """What is wrong with one item of a request: its index in the batch, the field, why."""

    index: int
    field: str | None
    message: str


class EventValidationError(ValueError):
    """Raised for any invalid input; `errors` names every bad item (index, field, message)."""

    def __init__(self, errors: list[ItemError]) -> None:
        self.errors = errors
        super().__init__("; ".join(_describe(e) for e in errors))


def decode_event(body: bytes | str) -> Event:
    """Decode one JSON object into an event (type defaults to `api_call`)."""
    return decode_batch(body, single=True)[0]


def decode_batch(body: bytes | str, *, single: bool | None = None) -> list[Event]:
    """Decode a JSON object, a JSON array, or NDJSON (one object per line) into events.

    The fast path is one msgspec decode of the whole body: as a list of ApiCall when no item
    names a `type` (the default type; msgspec's tagged unions cannot default one), else as the
    tagged union. Only when that fails does a slower path run, item by item, so that the error
    names every bad item, not only the first.
    """
    if isinstance(body, str):
        body = body.encode()
    stripped = body.strip()
    lines: list[bytes] | None = None
    if single is None:
        single = not stripped.startswith(b"[") and _is_single_object(stripped)
    if single:
        body = b"[" + stripped + b"]"
    elif not stripped.startswith(b"["):
        # NDJSON of valid objects is a JSON array once its lines are joined with commas.
        lines = [line for line in stripped.splitlines() if line.strip()]
        body = b"[" + b",".join(lines) + b"]"
    try:
        try:
            events: list[Event] = (
                _batch_decoder.decode(body)
                if b'"type"' in body
                else list(_call_batch_decoder.decode(body))
            )
        except msgspec.DecodeError as exc:
            return _decode_slow(body, lines, exc)
    except UnicodeDecodeError as exc:
        # msgspec checks UTF-8 inside strings and raises this, not a DecodeError.
        raise EventValidationError([ItemError(0, None, f"invalid UTF-8: {exc.reason}")]) from None
    except RecursionError:
        # Thousands of nested arrays or objects: msgspec stops at its depth limit with this.
        raise EventValidationError(
            [ItemError(0, None, "malformed JSON: nested too deeply")]
        ) from None
    if not events:
        raise EventValidationError([ItemError(0, None, "the request holds no event")])
    return events


def event_from_dict(item: Any) -> Event:
    """Validate one already-parsed JSON value (a dict) into an event; `type` is optional."""
    if isinstance(item, dict) and "type" not in item:
        item = {"type": _DEFAULT_TYPE, **item}
    event: Event = msgspec.convert(item, Event)
    return event


def from_openai_usage(
    model: str,
    prompt_tokens: int,
    completion_tokens: int,
    cached_tokens: int = 0,
    **fields: Any,
) -> ApiCall:
    """An ApiCall from OpenAI's usage block. OpenAI counts cached tokens inside
    `prompt_tokens`; they are taken out so they are charged once, at the cached rate."""
    if not 0 <= cached_tokens <= prompt_tokens:
        raise ValueError("`cached_tokens` must be between 0 and `prompt_tokens`")
    return ApiCall(
        model=model,
        provider=fields.pop("provider", "openai"),
        input_tokens=prompt_tokens - cached_tokens,
        output_tokens=completion_tokens,
        cache_read_tokens=cached_tokens,
        **fields,
    )


def timestamp_ms(event: Event) -> int:
    """The timestamp of an event that has been recorded (always epoch ms by then)."""
    ts = event.timestamp
    if not isinstance(ts, int):
        raise ValueError("event has not been recorded: no timestamp yet")
    return ts


def _is_single_object(body: bytes) -> bool:
    # NDJSON has more than one line that holds an object; a pretty-printed object spans lines
    # too, so look for a top-level '}' followed by a newline and then another '{'.
    if not body.startswith(b"{"):
        return True
    end = body.rstrip()
    return not re.search(rb"}\s*\n\s*{", end)


def _decode_slow(
    body: bytes, lines: list[bytes] | None, typed_error: msgspec.DecodeError
) -> list[Event]:
    try:
        parsed = msgspec.json.decode(body)
    except msgspec.DecodeError as exc:
        if isinstance(typed_error, msgspec.ValidationError):
            # JSON that parses only with types (e.g. a number out of range): the typed error
            # already names the item and the field.
            raise EventValidationError([_item_error(0, str(typed_error))]) from None
        if lines is None:
            raise EventValidationError([ItemError(0, None, f"malformed JSON: {exc}")]) from None
        errors: list[ItemError] = []
        for index, line in enumerate(lines):
            try:
                msgspec.json.decode(line)
            except msgspec.DecodeError as line_exc:
                errors.append(ItemError(index, None, f"malformed JSON: {line_exc}"))
        raise EventValidationError(errors or [ItemError(0, None, str(exc))]) from None
    if not isinstance(parsed, list):
        raise EventValidationError([ItemError(0, None, "expected a JSON object or array")])
    if not parsed:
        raise EventValidationError([ItemError(0, None, "the request holds no event")])
    return _convert_items(parsed)


def _convert_items(items: list[Any]) -> list[Event]:
    events: list[Event] = []
    errors: list[ItemError] = []
    for index, item in enumerate(items):
        try:
            events.append(event_from_dict(item))
        except msgspec.ValidationError as exc:
            errors.append(_item_error(index, str(exc)))
    if errors:
        raise EventValidationError(errors)
    return events


def _item_error(index: int, text: str) -> ItemError:
    """An ItemError from msgspec's message, whose path (`$[3].field`) may give index and field."""
    match = _ERROR_AT.match(text)
    if match is None:
        return ItemError(index, _field_in_message(text), text)
    path = match["path"].lstrip(".")
    item_path = _ITEM_PATH.match(path)
    if item_path is not None:
        index, path = int(item_path["index"]), item_path["field"]
    return ItemError(index, path or _field_in_message(match["msg"]), match["msg"])


def _field_in_message(message: str) -> str | None:
    # Messages raised from __post_init__ and "missing required field" name the field in
    # backticks; surface it so every error names a field where there is one. Type names are in
    # backticks too ("Expected `object`, got `int`"): only an event's field counts.
    for name in re.findall(r"`([a-z_0-9]+)`", message):
        if name in _FIELDS:
            return str(name)
    return None


def _describe(error: ItemError) -> str:
    where = f"item {error.index}" + (f", field `{error.field}`" if error.field else "")
    return f"{where}: {error.message}"
