"""Ingest schema: the tagged union of event Structs and the one shared Decoder.

Every source of events (HTTP, the Python API, later the proxy and importers) produces these
Structs; validation happens once, here, so the aggregator and the store can trust their input.
"""

from __future__ import annotations

import operator
import re
import time
from datetime import datetime
from typing import Annotated, Any, Final, Literal, get_args, get_type_hints

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
#: Published in the JSON schema; enforced by `_CONTROL` below, not by msgspec's `pattern=`,
#: whose regex match cost more than the rest of a decode (see `decode_batch`).
LABEL_PATTERN: Final = r"^[^\x00-\x1f\x7f]*(?!\n)$"

#: `pattern` for the JSON schema. The other keys only fix the order msgspec gives them with
#: `pattern=`, so the OpenAPI document stays byte for byte the same; their values are msgspec's
#: own (from `min_length`/`max_length`, which win over these).
_LABEL_SCHEMA: Final = {
    "type": "string",
    "maxLength": 200,
    "minLength": 1,
    "pattern": LABEL_PATTERN,
}

Count = Annotated[int, msgspec.Meta(ge=0, le=MAX_COUNT)]
Label = Annotated[
    str, msgspec.Meta(min_length=1, max_length=200, extra_json_schema=dict(_LABEL_SCHEMA))
]
ModelName = Annotated[
    str, msgspec.Meta(min_length=1, max_length=200, extra_json_schema=dict(_LABEL_SCHEMA))
]
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
        if ts is not None and (type(ts) is not int or ts > time.time() * 1000 + MAX_FUTURE_MS):
            _check_timestamp(self)


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
        # Runs for every decoded call: no super() chain, and the common timestamp (epoch ms,
        # not in the future, hence below 2**53) passes inline; `_check_timestamp` does the rest.
        ts = self.timestamp
        if ts is not None and (type(ts) is not int or ts > time.time() * 1000 + MAX_FUTURE_MS):
            _check_timestamp(self)
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


def _check_timestamp(event: _Base) -> None:
    """Normalise the timestamp to epoch ms; refuse one before 1970, above 2**53 or in the future.

    Called directly from `__post_init__` (no `super()` chain), which lets the common case, an
    `int` not in the future, through without the call. Decoded ints are exactly `int`."""
    ts = event.timestamp
    if type(ts) is int:
        if ts > MAX_COUNT:
            raise ValueError("`timestamp` must be epoch milliseconds or an RFC 3339 string")
    elif isinstance(ts, datetime):
        ts = event.timestamp = int(ts.timestamp() * 1000)
        # Year 1 with a positive offset is before year 1 in UTC: no view could print it.
        if ts < 0:
            raise ValueError("`timestamp` must not be before 1970-01-01T00:00:00Z")
    elif ts is None:
        return
    elif ts > MAX_COUNT:  # an int subclass (e.g. bool), only from a hand-built event
        raise ValueError("`timestamp` must be epoch milliseconds or an RFC 3339 string")
    if ts > time.time() * 1000 + MAX_FUTURE_MS:
        raise ValueError("`timestamp` is more than 5 minutes in the future")


_DEFAULT_TYPE: Final = "api_call"
_batch_decoder: Final = msgspec.json.Decoder(list[Event])
_call_batch_decoder: Final = msgspec.json.Decoder(list[ApiCall])
_ERROR_AT = re.compile(r"^(?P<msg>.*) - at `\$(?P<path>[^`]*)`$", re.DOTALL)
_ITEM_PATH = re.compile(r"^\[(?P<index>\d+)\]\.?(?P<field>.*)$")
_KINDS: Final[dict[str, type[Event]]] = {
    str(kind.__struct_config__.tag): kind
    for kind in (ApiCall, CacheHit, CacheMiss, ErrorEvent, ModelOverride, SystemEvent)
}
_FIELDS: Final = frozenset(
    name for kind in _KINDS.values() for name in (*kind.__struct_fields__, "type")
)


def _label_fields(kind: type[Event]) -> tuple[str, ...]:
    """The fields of `kind` typed `Label` or `ModelName`, or either `| None`."""
    labels = (Label, ModelName)
    hints = get_type_hints(kind, include_extras=True)
    return tuple(
        name
        for name in kind.__struct_fields__
        if hints[name] in labels or any(arg in labels for arg in get_args(hints[name]))
    )


#: Per event class, the fields that must hold no control character (all of them labels).
_LABELS: Final = {kind: _label_fields(kind) for kind in _KINDS.values()}
#: Each returns a tuple: every kind has at least the four labels of `_Base`.
_LABEL_GETTERS: Final = {kind: operator.attrgetter(*names) for kind, names in _LABELS.items()}
#: A control character: what LABEL_PATTERN refuses. (Its `(?!\n)` only keeps `$` from matching
#: before a final newline; that newline is a control character, so a search for one suffices.)
_CONTROL: Final = re.compile(r"[\x00-\x1f\x7f]")
#: How a JSON string can hold a control character: raw bytes below 0x20 are invalid JSON, so only
#: through an escape (`\n`, `\u001f`, ...), matched here, or a raw DEL byte. It may also match
#: harmless text (an escaped backslash before an `n`); that only costs a look at the labels.
_CONTROL_ESCAPE: Final = re.compile(rb"\\(?:[bfnrt]|u00[01]|u007[fF])")
_CONTROL_MESSAGE: Final = (
    "must not contain control characters (U+0000-U+001F, U+007F): expected `str` matching"
    f" regex {LABEL_PATTERN!r}"
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
    tagged union; then, only if the body holds an escape or a DEL byte, a scan of the labels for
    control characters. Only when either fails does a slower path run, item by item, so that
    the error names every bad item, not only the first.
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
        # Labels are checked for control characters here, not by msgspec (see LABEL_PATTERN),
        # and only when the body could hold one at all; the `in` tests are a memchr each.
        if (
            (b"\\" in body and _CONTROL_ESCAPE.search(body)) or b"\x7f" in body
        ) and _control_in_labels(events):
            _refuse_control(body, events)
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
    """Validate one already-parsed JSON value (a dict) into an event; `type` is optional.

    Raises msgspec.ValidationError, naming the field (`- at `$.field``) as msgspec does."""
    if isinstance(item, dict) and "type" not in item:
        item = {"type": _DEFAULT_TYPE, **item}
    try:
        event: Event = msgspec.convert(item, Event)
    except msgspec.ValidationError as exc:
        bad = _control_field(item)
        if bad is None or not _reported_first(item, bad, str(exc)):
            raise
        raise _control_error(bad) from None
    bad = _control_field(item)
    if bad is not None:
        raise _control_error(bad)
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


def _control_in_labels(events: list[Event]) -> bool:
    """Whether any label of `events` holds a control character: one search over them all."""
    getters = _LABEL_GETTERS
    values: list[str | None] = []
    for event in events:
        values.extend(getters[type(event)](event))
    joined = "".join(filter(None, values))
    # isprintable() is False for every control character and much faster than the regex.
    return not joined.isprintable() and _CONTROL.search(joined) is not None


def _refuse_control(body: bytes, events: list[Event]) -> None:
    """Raise an EventValidationError naming every item with a control character in a label.

    The slow path validates the items one by one, as for any other invalid item, so each is
    reported as msgspec's `pattern=` did: at its first bad field in the document's order."""
    _convert_items(msgspec.json.decode(body))
    # Not reached: both decodes see the same strings. Never accept the batch, though.
    errors = [  # pragma: no cover
        ItemError(index, name, _CONTROL_MESSAGE)
        for index, event in enumerate(events)
        for name in _LABELS[type(event)]
        if _CONTROL.search(getattr(event, name) or "")
    ]
    raise EventValidationError(errors)  # pragma: no cover


def _control_field(item: Any) -> str | None:
    """The first label of a dict (in its own order) holding a control character, if any."""
    if not isinstance(item, dict):
        return None
    tag = item.get("type", _DEFAULT_TYPE)
    kind = _KINDS.get(tag) if isinstance(tag, str) else None
    if kind is None:
        return None
    labels = _LABELS[kind]
    for name, value in item.items():
        if name in labels and isinstance(value, str) and _CONTROL.search(value):
            return str(name)
    return None


def _reported_first(item: dict[Any, Any], bad: str, text: str) -> bool:
    """Whether msgspec's `pattern=` would have reported `bad` before the error `text`.

    msgspec checks the tag first, then each field in the order of the dict (for one field its
    length before its pattern), then missing fields and `__post_init__`."""
    match = _ERROR_AT.match(text)
    field = match["path"].lstrip(".") if match is not None else ""
    if field == "type" or field == bad:
        return False
    keys = list(item)
    return field not in keys or keys.index(bad) < keys.index(field)


def _control_error(field: str) -> msgspec.ValidationError:
    return msgspec.ValidationError(f"{_CONTROL_MESSAGE} - at `$.{field}`")


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
