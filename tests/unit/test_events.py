"""Events: decoding one object, arrays and NDJSON; validation errors that name index and field."""

from __future__ import annotations

import json
import time
from typing import Any

import msgspec
import pytest

from exporter.events import (
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
