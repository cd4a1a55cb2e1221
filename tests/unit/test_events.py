"""Events: decoding one object, arrays and NDJSON; validation errors that name index and field."""

from __future__ import annotations

import json
import re
import time
from datetime import UTC, datetime
from typing import Any

import msgspec
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from exporter.events import (
    LABEL_PATTERN,
    MAX_COUNT,
    ApiCall,
    CacheHit,
    CacheMiss,
    ErrorEvent,
    Event,
    EventValidationError,
    ModelOverride,
    SystemEvent,
    decode_batch,
    decode_event,
    event_from_dict,
)


def body(value: Any) -> bytes:
    return json.dumps(value).encode()


def ndjson(*items: dict[str, Any]) -> bytes:
    return b"\n".join(body(item) for item in items) + b"\n"


def errors_of(raw: bytes) -> list[tuple[int, str | None]]:
    """(index, field) of every error the decoder reports for `raw`."""
    with pytest.raises(EventValidationError) as caught:
        decode_batch(raw)
    return [(error.index, error.field) for error in caught.value.errors]


def now_ms() -> int:
    return int(time.time() * 1000)


# --- shapes of a request -----------------------------------------------------------------


def test_one_object_decodes_to_one_api_call() -> None:
    events = decode_batch(body({"model": "claude-sonnet-4-5", "input_tokens": 10}))
    assert events == [ApiCall(model="claude-sonnet-4-5", input_tokens=10)]


def test_decode_event_returns_the_event_itself() -> None:
    event = decode_event('{"type": "api_call", "model": "gpt-4o", "output_tokens": 7}')
    assert event == ApiCall(model="gpt-4o", output_tokens=7)


def test_json_array_decodes_every_item_in_order() -> None:
    raw = body(
        [
            {"model": "claude-opus-4-1", "input_tokens": 1},
            {"type": "cache_hit", "savings_usd": 0.5},
            {"model": "gpt-4o", "input_tokens": 3},
        ]
    )
    assert decode_batch(raw) == [
        ApiCall(model="claude-opus-4-1", input_tokens=1),
        CacheHit(savings_usd=0.5),
        ApiCall(model="gpt-4o", input_tokens=3),
    ]


@pytest.mark.parametrize("trailing", [b"", b"\n", b"\n\n"])
def test_ndjson_decodes_one_event_per_line(trailing: bytes) -> None:
    raw = (
        b'{"model": "claude-haiku-4-5", "input_tokens": 1}\n'
        b'{"type": "system", "message": "started"}\n'
        b"\n"
        b'{"type": "api_call", "model": "gpt-4o", "input_tokens": 2}' + trailing
    )
    assert decode_batch(raw) == [
        ApiCall(model="claude-haiku-4-5", input_tokens=1),
        SystemEvent(message="started"),
        ApiCall(model="gpt-4o", input_tokens=2),
    ]


def test_pretty_printed_object_is_one_event() -> None:
    raw = json.dumps(
        {"model": "claude-opus-4-1", "input_tokens": 5, "extra": {"a": 1}, "more": {"b": [1]}},
        indent=2,
    ).encode()
    assert b"\n" in raw
    assert decode_batch(raw) == [ApiCall(model="claude-opus-4-1", input_tokens=5)]


def test_pretty_printed_array_decodes_every_item() -> None:
    raw = json.dumps([{"model": "a"}, {"model": "b"}], indent=2).encode()
    assert decode_batch(raw) == [ApiCall(model="a"), ApiCall(model="b")]


def test_type_defaults_to_api_call() -> None:
    event = decode_event(b'{"model": "claude-sonnet-4-5"}')
    assert isinstance(event, ApiCall)
    assert event_from_dict({"model": "claude-sonnet-4-5"}) == event


@pytest.mark.parametrize(
    ("item", "expected"),
    [
        (
            {
                "type": "cache_hit",
                "model": "claude-opus-4-1",
                "savings_usd": 0.12,
                "cache_key": "k",
            },
            CacheHit(model="claude-opus-4-1", savings_usd=0.12, cache_key="k"),
        ),
        ({"type": "cache_miss", "cache_key": "k"}, CacheMiss(cache_key="k")),
        (
            {"type": "error", "error_type": "rate_limit", "message": "429", "context": "retry"},
            ErrorEvent(error_type="rate_limit", message="429", context="retry"),
        ),
        (
            {
                "type": "model_override",
                "original_model": "claude-opus-4-1",
                "override_model": "claude-sonnet-4-5",
                "reason": "opus_exhausted",
            },
            ModelOverride(
                original_model="claude-opus-4-1",
                override_model="claude-sonnet-4-5",
                reason="opus_exhausted",
            ),
        ),
        (
            {"type": "system", "message": "start", "context": "v1"},
            SystemEvent(message="start", context="v1"),
        ),
    ],
    ids=["cache_hit", "cache_miss", "error", "model_override", "system"],
)
def test_each_event_type_decodes_to_its_class(item: dict[str, Any], expected: Event) -> None:
    assert decode_event(body(item)) == expected
    assert type(event_from_dict(item)) is type(expected)


def test_unknown_fields_are_ignored() -> None:
    item = {"model": "gpt-4o", "input_tokens": 4, "user_agent": "x/1.0", "nested": {"a": [1, 2]}}
    assert decode_event(body(item)) == ApiCall(model="gpt-4o", input_tokens=4)
    assert decode_batch(body([item, item])) == [ApiCall(model="gpt-4o", input_tokens=4)] * 2


# --- timestamps --------------------------------------------------------------------------


def test_integer_timestamp_is_kept_as_epoch_milliseconds() -> None:
    event = decode_event(body({"model": "m", "timestamp": 1_748_772_000_289}))
    assert event.timestamp == 1_748_772_000_289


@pytest.mark.parametrize(
    "text",
    ["2025-06-01T12:00:00.289+02:00", "2025-06-01T10:00:00.289Z", "2025-06-01T05:00:00.289-05:00"],
)
def test_rfc3339_timestamp_with_offset_becomes_epoch_milliseconds(text: str) -> None:
    # 2025-06-01T10:00:00.289Z is 1,748,772,000,289 ms after the epoch.
    assert decode_event(body({"model": "m", "timestamp": text})).timestamp == 1_748_772_000_289
    typed = body({"type": "api_call", "model": "m", "timestamp": text})
    assert decode_event(typed).timestamp == 1_748_772_000_289


def test_rfc3339_timestamp_without_offset_is_rejected() -> None:
    assert errors_of(body({"model": "m", "timestamp": "2025-06-01T10:00:00"})) == [(0, "timestamp")]


@pytest.mark.parametrize("typed", [True, False])
def test_timestamp_more_than_5_minutes_ahead_is_rejected(typed: bool) -> None:
    item: dict[str, Any] = {"model": "m", "timestamp": now_ms() + 10 * 60 * 1000}
    if typed:
        item["type"] = "api_call"
    with pytest.raises(EventValidationError, match="timestamp") as caught:
        decode_batch(body(item))
    assert [(e.index, e.field) for e in caught.value.errors] == [(0, "timestamp")]


def test_rfc3339_timestamp_more_than_5_minutes_ahead_is_rejected() -> None:
    assert errors_of(body({"model": "m", "timestamp": "2999-01-01T00:00:00Z"})) == [
        (0, "timestamp")
    ]


def test_timestamp_a_minute_ahead_is_accepted() -> None:
    ahead = now_ms() + 60 * 1000
    assert decode_event(body({"model": "m", "timestamp": ahead})).timestamp == ahead


# --- rejects -----------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("raw", "field"),
    [
        (body({"model": "m", "input_tokens": -1}), "input_tokens"),
        (body({"model": "m", "output_tokens": 1.5}), "output_tokens"),
        (body({"model": "m", "cache_read_tokens": MAX_COUNT + 1}), "cache_read_tokens"),
        (b'{"model": "m", "latency_ms": 1e999}', "latency_ms"),
        (body({"input_tokens": 3}), "model"),
        (body({"type": "api_call", "input_tokens": 3}), "model"),
        (body({"model": "x" * 201}), "model"),
        (body({"model": "m", "project": "bad\u0007project"}), "project"),
        (body({"model": "m", "project": "two\nlines"}), "project"),
        (body({"type": "quota_exceeded", "model": "m"}), "type"),
        (
            body({"model": "m", "cache_creation_tokens": 10, "cache_creation_1h_tokens": 11}),
            "cache_creation_1h_tokens",
        ),
        (body({"model": "m", "status": "pending"}), "status"),
    ],
    ids=[
        "negative-tokens",
        "fractional-tokens",
        "tokens-above-2**53",
        "latency-infinity",
        "model-missing",
        "model-missing-typed",
        "model-201-chars",
        "control-char-in-project",
        "newline-in-project",
        "unknown-type",
        "1h-part-above-cache-creation",
        "status-not-ok-or-error",
    ],
)
def test_invalid_item_is_rejected_naming_index_and_field(raw: bytes, field: str) -> None:
    assert errors_of(raw) == [(0, field)]
    # The same item inside an array and as an NDJSON line is reported at its own index.
    item = raw.decode()
    assert errors_of(f'[{{"model": "ok"}}, {item}]'.encode()) == [(1, field)]
    assert errors_of(f'{{"model": "ok"}}\n{item}\n'.encode()) == [(1, field)]


def test_error_message_names_index_and_field() -> None:
    with pytest.raises(EventValidationError, match=r"item 0, field `input_tokens`"):
        decode_batch(body({"model": "m", "input_tokens": -5}))


@pytest.mark.parametrize(
    "raw",
    [b'{"model": "m", "latency_ms": NaN}', b'{"model": "m"', b"{model: m}", b"", b"\n\n", b"42"],
    ids=["nan-literal", "truncated", "unquoted", "empty-body", "blank-lines", "not-an-object"],
)
def test_malformed_json_is_rejected_at_index_0(raw: bytes) -> None:
    with pytest.raises(EventValidationError) as caught:
        decode_batch(raw)
    assert [error.index for error in caught.value.errors] == [0]


def test_nan_literal_is_reported_as_malformed_json() -> None:
    with pytest.raises(EventValidationError, match="malformed JSON"):
        decode_batch(b'{"model": "m", "latency_ms": NaN}')


def test_empty_array_is_rejected() -> None:
    assert errors_of(b"[]") == [(0, None)]


def test_limits_themselves_are_accepted() -> None:
    event = decode_event(
        body(
            {
                "model": "x" * 200,
                "input_tokens": MAX_COUNT,
                "cache_creation_tokens": 5,
                "cache_creation_1h_tokens": 5,
                "status": "error",
                "error_type": "overloaded",
            }
        )
    )
    assert event == ApiCall(
        model="x" * 200,
        input_tokens=MAX_COUNT,
        cache_creation_tokens=5,
        cache_creation_1h_tokens=5,
        status="error",
        error_type="overloaded",
    )


@pytest.mark.parametrize("shape", ["array", "ndjson"])
def test_batch_error_lists_exactly_the_bad_items(shape: str) -> None:
    items: list[dict[str, Any]] = [
        {"model": "claude-sonnet-4-5", "input_tokens": 1},
        {"model": "claude-sonnet-4-5", "input_tokens": -1},
        {"type": "system", "message": "fine"},
        {"model": "claude-sonnet-4-5", "status": "maybe"},
    ]
    raw = body(items) if shape == "array" else ndjson(*items)
    assert errors_of(raw) == [(1, "input_tokens"), (3, "status")]


def test_batch_error_lists_every_field_of_typed_items_too() -> None:
    items: list[dict[str, Any]] = [
        {"type": "api_call", "model": "a"},
        {"type": "api_call", "model": "a", "output_tokens": 2.5},
        {"type": "api_call", "model": "a"},
        {"type": "model_override", "original_model": "a"},
    ]
    assert errors_of(body(items)) == [(1, "output_tokens"), (3, "override_model")]


# --- round trip --------------------------------------------------------------------------


@pytest.mark.parametrize(
    "event",
    [
        ApiCall(
            model="claude-opus-4-1-20250805",
            provider="anthropic",
            tier="opus",
            timestamp=1_748_772_000_289,
            project="cco",
            session_id="s-1",
            agent="planner",
            request_id="req-1",
            input_tokens=5_000,
            output_tokens=2_000,
            cache_creation_tokens=300,
            cache_read_tokens=4_000,
            cache_creation_1h_tokens=100,
            latency_ms=1234.5,
            cost_usd=0.225,
            status="error",
            error_type="overloaded",
        ),
        ApiCall(model="gpt-4o"),
        CacheHit(model="claude-sonnet-4-5", savings_usd=0.01, cache_key="abc", timestamp=1),
        CacheMiss(cache_key="abc"),
        ErrorEvent(error_type="rate_limit", message="429 Too Many Requests", context="{}"),
        ModelOverride(original_model="claude-opus-4-1", override_model="claude-sonnet-4-5"),
        SystemEvent(message="started", context="pid 42"),
    ],
    ids=[
        "api_call-full",
        "api_call-bare",
        "cache_hit",
        "cache_miss",
        "error",
        "override",
        "system",
    ],
)
def test_encoded_event_decodes_to_an_equal_event(event: Event) -> None:
    encoded = msgspec.json.encode(event)
    assert decode_event(encoded) == event
    assert decode_batch(b"[" + encoded + b"]") == [event]


# --- control characters in labels ---------------------------------------------------------
# msgspec no longer checks LABEL_PATTERN itself (its regex was half the cost of a decode);
# decode_batch and event_from_dict do, for every field whose schema publishes the pattern.

#: The smallest valid item of each type.
MINIMAL: dict[str, dict[str, Any]] = {
    "api_call": {"type": "api_call", "model": "m"},
    "cache_hit": {"type": "cache_hit"},
    "cache_miss": {"type": "cache_miss"},
    "error": {"type": "error"},
    "model_override": {"type": "model_override", "original_model": "a", "override_model": "b"},
    "system": {"type": "system"},
}
KINDS: dict[str, type[Event]] = {
    "api_call": ApiCall,
    "cache_hit": CacheHit,
    "cache_miss": CacheMiss,
    "error": ErrorEvent,
    "model_override": ModelOverride,
    "system": SystemEvent,
}


def schema_properties(kind: type[Event]) -> dict[str, Any]:
    schema = msgspec.json.schema(kind)
    properties: dict[str, Any] = schema["$defs"][kind.__name__]["properties"]
    return properties


def has_pattern(prop: dict[str, Any]) -> bool:
    return any(part.get("pattern") == LABEL_PATTERN for part in [prop, *prop.get("anyOf", [])])


def pattern_fields(kind: type[Event]) -> list[str]:
    """The fields whose JSON schema promises LABEL_PATTERN: exactly those checked."""
    return [name for name, prop in schema_properties(kind).items() if has_pattern(prop)]


LABEL_CASES = [(tag, name) for tag, kind in KINDS.items() for name in pattern_fields(kind)]
#: How a control character gets into a JSON string: an escape, or a raw DEL byte (raw bytes
#: below 0x20 are not valid JSON at all).
CONTROL_IN_JSON = {
    "nul": b"\\u0000",
    "unit-separator": b"\\u001f",
    "unit-separator-upper": b"\\u001F",
    "bell": b"\\u0007",
    "newline": b"\\n",
    "tab": b"\\t",
    "carriage-return": b"\\r",
    "backspace": b"\\b",
    "form-feed": b"\\f",
    "del-escaped": b"\\u007f",
    "del-escaped-upper": b"\\u007F",
    "del-raw": b"\x7f",
}
CONTROL = "must not contain control characters"


def with_value(tag: str, field: str, raw_value: bytes, **extra: Any) -> bytes:
    """The JSON of a minimal `tag` item whose `field` is `a<raw_value>b`, spliced in as bytes."""
    item = {**MINIMAL[tag], **extra, field: "a@@b"}
    return body(item).replace(b"@@", raw_value)


def errors_with_messages(raw: bytes) -> list[tuple[int, str | None, str]]:
    with pytest.raises(EventValidationError) as caught:
        decode_batch(raw)
    return [(error.index, error.field, error.message) for error in caught.value.errors]


def test_every_label_field_publishes_the_pattern() -> None:
    assert pattern_fields(ApiCall) == [
        "model",
        "provider",
        "tier",
        "error_type",
        "project",
        "session_id",
        "agent",
        "request_id",
    ]
    assert {name for _, name in LABEL_CASES} == {
        "model",
        "provider",
        "tier",
        "error_type",
        "project",
        "session_id",
        "agent",
        "request_id",
        "cache_key",
        "original_model",
        "override_model",
        "reason",
    }
    for kind in KINDS.values():
        properties = schema_properties(kind)
        for text in ("message", "context"):
            if text in properties:
                assert not has_pattern(properties[text])


def test_label_schema_is_the_one_msgspec_generated_with_pattern() -> None:
    """The OpenAPI document is generated from these Structs: same keys, same order."""
    project = schema_properties(ApiCall)["project"]
    assert list(project.items()) == [
        ("type", "string"),
        ("maxLength", 200),
        ("minLength", 1),
        ("pattern", LABEL_PATTERN),
        ("default", "default"),
    ]


@pytest.mark.parametrize("escape", list(CONTROL_IN_JSON.values()), ids=list(CONTROL_IN_JSON))
@pytest.mark.parametrize(("tag", "field"), LABEL_CASES, ids=[f"{t}.{f}" for t, f in LABEL_CASES])
def test_control_character_in_a_label_is_rejected(tag: str, field: str, escape: bytes) -> None:
    raw = with_value(tag, field, escape)
    good = body(MINIMAL[tag])
    [(index, name, message)] = errors_with_messages(b"[" + good + b"," + raw + b"]")
    assert (index, name) == (1, field)
    assert CONTROL in message
    # The same item alone, as an NDJSON line and through decode_event.
    assert errors_of(raw) == [(0, field)]
    assert errors_of(good + b"\n" + raw + b"\n" + good + b"\n") == [(1, field)]
    with pytest.raises(EventValidationError, match=rf"item 0, field `{field}`: {CONTROL}"):
        decode_event(raw)
    # An already-parsed dict (CLI, spill replay) is checked as well.
    with pytest.raises(msgspec.ValidationError, match=rf"{CONTROL}.* - at `\$\.{field}`"):
        event_from_dict(json.loads(raw))


@pytest.mark.parametrize("escape", list(CONTROL_IN_JSON.values()), ids=list(CONTROL_IN_JSON))
@pytest.mark.parametrize("field", pattern_fields(ApiCall))
def test_control_character_in_an_untyped_call_is_rejected(field: str, escape: bytes) -> None:
    """Without `type` the batch decodes as ApiCall only: the check runs there too."""
    item = {"model": "m", field: "a@@b"}
    raw = body(item).replace(b"@@", escape)
    assert b'"type"' not in raw
    assert errors_of(b'[{"model": "ok"}, ' + raw + b"]") == [(1, field)]
    assert errors_of(raw) == [(0, field)]


def test_message_keeps_what_msgspec_said() -> None:
    """Clients matched msgspec's wording (`regex`); it is still in the message."""
    [(_, _, message)] = errors_with_messages(b'{"model": "m", "project": "a\\u0007b"}')
    assert message.startswith("must not contain control characters (U+0000-U+001F, U+007F)")
    assert f"matching regex {LABEL_PATTERN!r}" in message


@pytest.mark.parametrize("shape", ["array", "ndjson"])
def test_every_item_with_a_control_character_is_reported(shape: str) -> None:
    items = [
        body({"model": "m"}),
        body({"model": "m", "project": "a\u0000b"}),
        body({"type": "system", "message": "fine\n"}),
        body({"type": "error", "error_type": "e", "agent": "\tx"}),
        b'{"model": "a\x7f", "provider": "p"}',
        body({"type": "model_override", "original_model": "a", "override_model": "b\u001f"}),
        body({"type": "cache_hit", "cache_key": "k\n"}),
    ]
    raw = b"[" + b",".join(items) + b"]" if shape == "array" else b"\n".join(items)
    assert errors_of(raw) == [
        (1, "project"),
        (3, "agent"),
        (4, "model"),
        (5, "override_model"),
        (6, "cache_key"),
    ]


def test_control_characters_are_reported_with_other_invalid_items() -> None:
    raw = body(
        [
            {"model": "m", "input_tokens": -1},
            {"model": "m", "session_id": "s\n"},
            {"model": "m"},
            {"type": "cache_miss", "request_id": "r\u007f"},
        ]
    )
    assert errors_of(raw) == [(0, "input_tokens"), (1, "session_id"), (3, "request_id")]


@pytest.mark.parametrize(
    ("item", "field"),
    [
        ({"model": "m", "project": "a\n", "agent": "b\n"}, "project"),
        ({"model": "m", "agent": "b\n", "project": "a\n"}, "agent"),
        ({"model": "m", "project": "a\n", "input_tokens": -1}, "project"),
        ({"model": "m", "input_tokens": -1, "project": "a\n"}, "input_tokens"),
        ({"project": "a\n"}, "project"),
        ({"project": "a\n", "model": "m", "cache_creation_1h_tokens": 1}, "project"),
        ({"project": "a\n", "type": "bogus"}, "type"),
        ({"model": "m", "project": "x" * 200 + "\n"}, "project"),
    ],
    ids=[
        "first-of-two-labels",
        "first-of-two-labels-reversed",
        "label-before-a-bad-count",
        "bad-count-before-the-label",
        "label-and-missing-model",
        "label-and-post-init-error",
        "unknown-type-first",
        "length-and-control-in-one-label",
    ],
)
def test_the_field_reported_is_the_first_bad_one_in_the_item(
    item: dict[str, Any], field: str
) -> None:
    """As when msgspec checked the pattern: the type first, then the fields in the item's order,
    then missing fields and the checks across fields."""
    assert errors_of(body(item)) == [(0, field)]
    assert errors_of(body([{"model": "ok"}, item])) == [(1, field)]
    with pytest.raises(msgspec.ValidationError, match=rf"at `\$\.{field}`|`{field}`"):
        event_from_dict(item)


def test_a_label_over_200_characters_with_a_control_character_reports_the_length() -> None:
    [(_, field, message)] = errors_with_messages(body({"model": "m", "agent": "x" * 201 + "\n"}))
    assert field == "agent"
    assert "length" in message


@pytest.mark.parametrize(
    ("escaped", "decoded"),
    [
        (b"\\u00e9", "\u00e9"),
        (b"\\u00E9", "\u00e9"),
        (b'\\"', '"'),
        (b"\\/", "/"),
        (b"\\\\", "\\"),
        (b"\\\\n", "\\n"),
        (b"\\\\u0000", "\\u0000"),
        (b"\\u0080", "\u0080"),
        (b"\\u009f", "\u009f"),
        (b"\\u2028", "\u2028"),
        (b"\\ud83d\\ude00", "\U0001f600"),
        ("\u00e9".encode(), "\u00e9"),
    ],
    ids=[
        "e-acute",
        "e-acute-upper",
        "quote",
        "slash",
        "backslash",
        "backslash-then-n",
        "backslash-then-u0000",
        "c1-0080",
        "c1-009f",
        "line-separator",
        "surrogate-pair",
        "raw-utf-8",
    ],
)
@pytest.mark.parametrize(("tag", "field"), LABEL_CASES, ids=[f"{t}.{f}" for t, f in LABEL_CASES])
def test_legitimate_escapes_in_a_label_are_accepted(
    tag: str, field: str, escaped: bytes, decoded: str
) -> None:
    raw = with_value(tag, field, escaped)
    expected = "a" + decoded + "b"
    [event] = decode_batch(raw)
    assert type(event) is KINDS[tag]
    assert getattr(event, field) == expected
    assert getattr(decode_batch(b"[" + raw + b"," + raw + b"]")[1], field) == expected
    assert getattr(event_from_dict(json.loads(raw)), field) == expected


@pytest.mark.parametrize("tag", ["error", "system"])
@pytest.mark.parametrize("field", ["message", "context"])
@pytest.mark.parametrize(
    "escaped", [b"\\n", b"\\\\", b"\\t", b"\\u0000", b"\\u001f", b"\x7f", b"\\r\\n"]
)
def test_control_characters_in_a_text_field_are_accepted(
    tag: str, field: str, escaped: bytes
) -> None:
    raw = with_value(tag, field, escaped, project="p\u00e9")
    assert b'"p\\u00e9"' in raw  # json.dumps escapes it: labels with escapes are looked at
    expected = "a" + json.loads(b'"' + escaped + b'"') + "b"
    [event] = decode_batch(raw)
    assert getattr(event, field) == expected
    assert event.project == "p\u00e9"
    [_, second] = decode_batch(b'[{"model": "m"}, ' + raw + b"]")
    assert getattr(second, field) == expected
    assert getattr(event_from_dict(json.loads(raw)), field) == expected


def test_control_characters_in_unknown_fields_are_ignored() -> None:
    raw = b'[{"model": "m", "note": "a\\nb\\u0000", "extra": {"k\\t": "\x7f"}}, {"model": "n"}]'
    assert decode_batch(raw) == [ApiCall(model="m"), ApiCall(model="n")]


@settings(max_examples=300, deadline=None)
@given(
    value=st.text(
        alphabet=st.one_of(
            st.characters(codec="utf-8"),
            st.sampled_from('\x00\x01\x07\t\n\r\x1b\x1f\x7f\x80\x9f\u2028\\"/'),
        ),
        min_size=1,
        max_size=12,
    ),
    field=st.sampled_from(pattern_fields(ApiCall)),
    ensure_ascii=st.booleans(),
    typed=st.booleans(),
)
def test_a_label_is_accepted_iff_it_has_no_control_character(
    value: str, field: str, ensure_ascii: bool, typed: bool
) -> None:
    expected_ok = re.search(LABEL_PATTERN, value) is not None
    # LABEL_PATTERN's `(?!\n)` only spells out "no newline at the end", itself a control char.
    assert expected_ok == (not any(c < "\x20" or c == "\x7f" for c in value))
    item: dict[str, Any] = {"model": "m", field: value, "message": value}
    if typed:
        item["type"] = "api_call"
    raw = json.dumps(item, ensure_ascii=ensure_ascii).encode()
    if expected_ok:
        [event] = decode_batch(raw)
        assert getattr(event, field) == value
        assert getattr(event_from_dict(item), field) == value
    else:
        assert errors_of(raw) == [(0, field)]
        with pytest.raises(msgspec.ValidationError, match=CONTROL):
            event_from_dict(item)


# --- __post_init__ -------------------------------------------------------------------------


def test_timestamp_above_2_53_is_rejected_as_not_epoch_milliseconds() -> None:
    [(_, field, message)] = errors_with_messages(body({"model": "m", "timestamp": MAX_COUNT + 1}))
    assert field == "timestamp"
    assert "epoch milliseconds" in message


def test_timestamp_before_1970_in_utc_is_rejected() -> None:
    raw = body({"model": "m", "timestamp": "0001-01-01T00:00:00+14:00"})
    [(_, field, message)] = errors_with_messages(raw)
    assert field == "timestamp"
    assert "1970" in message


@pytest.mark.parametrize("tag", list(MINIMAL))
def test_every_event_type_checks_and_converts_its_timestamp(tag: str) -> None:
    text = {**MINIMAL[tag], "timestamp": "2025-06-01T10:00:00.289Z"}
    assert decode_event(body(text)).timestamp == 1_748_772_000_289
    assert event_from_dict(text).timestamp == 1_748_772_000_289
    assert decode_event(body(MINIMAL[tag])).timestamp is None
    future = {**MINIMAL[tag], "timestamp": now_ms() + 10 * 60 * 1000}
    assert errors_of(body(future)) == [(0, "timestamp")]


def test_hand_built_events_are_checked_too() -> None:
    when = datetime(2025, 6, 1, 10, 0, 0, 289_000, tzinfo=UTC)
    assert ApiCall(model="m", timestamp=when).timestamp == 1_748_772_000_289
    assert SystemEvent(timestamp=when).timestamp == 1_748_772_000_289
    assert ApiCall(model="m", timestamp=5).timestamp == 5
    with pytest.raises(ValueError, match="epoch milliseconds"):
        ApiCall(model="m", timestamp=MAX_COUNT + 1)
    with pytest.raises(ValueError, match="future"):
        CacheMiss(timestamp=now_ms() + 10 * 60 * 1000)
    with pytest.raises(ValueError, match="cache_creation_1h_tokens"):
        ApiCall(model="m", cache_creation_tokens=1, cache_creation_1h_tokens=2)
