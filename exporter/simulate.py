"""Synthetic, realistic load for demos and dashboards, and the client that posts events.

`synthetic_events` is pure (a seeded Random in, plain dicts out) so the mix can be tested;
`run_simulation` paces batches with a monotonic clock and posts them to a running exporter.
"""

from __future__ import annotations

import ipaddress
import math
import random
import time
import uuid
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Final

import httpx
import msgspec

__all__ = [
    "ERROR_SHARE",
    "MODELS",
    "SimulationStats",
    "auto_batch",
    "events_url",
    "local_url",
    "plan_batches",
    "post_events",
    "run_simulation",
    "synthetic_events",
]


@dataclass(frozen=True, slots=True)
class _Model:
    """A model the simulation calls, with the shape of its traffic."""

    id: str
    provider: str
    weight: float
    #: Typical latency before the first token, and per output token, in milliseconds.
    base_ms: float
    per_token_ms: float


#: Ids from the shipped price table (some with the date or tag suffix clients really send),
#: weighted the way a coding-agent workload looks: mostly sonnet, haiku for small jobs.
MODELS: Final = (
    _Model("claude-sonnet-4-5-20250929", "anthropic", 22, 1800, 18),
    _Model("claude-sonnet-4-6", "anthropic", 18, 1600, 16),
    _Model("claude-opus-4-1-20250805", "anthropic", 3, 4000, 35),
    _Model("claude-opus-4-6", "anthropic", 7, 3000, 28),
    _Model("claude-haiku-4-5-20251001", "anthropic", 12, 500, 6),
    _Model("gpt-4o", "openai", 7, 900, 12),
    _Model("gpt-4o-mini", "openai", 8, 450, 7),
    _Model("gpt-4.1", "openai", 3, 900, 11),
    _Model("gpt-5", "openai", 3, 2500, 14),
    _Model("o3", "openai", 2, 6000, 20),
    _Model("llama3.1:8b", "ollama", 3, 300, 25),
    _Model("qwen2.5-coder:14b", "ollama", 2, 400, 35),
)
_MODEL_WEIGHTS: Final = [m.weight for m in MODELS]
_PROJECTS: Final = ("web-app", "api-server", "data-pipeline", "mobile-app", "docs-site", "infra")
_PROJECT_WEIGHTS: Final = (30, 25, 15, 12, 10, 8)
_AGENTS: Final = (None, "main", "planner", "code-reviewer", "test-runner", "explorer")
_AGENT_WEIGHTS: Final = (20, 35, 10, 15, 12, 8)
_CALL_ERRORS: Final = ("rate_limit", "overloaded", "timeout", "api_error")
_OVERRIDE_REASONS: Final = ("quota_exhausted", "rate_limited", "cost_policy")
_SYSTEM_NOTES: Final = ("session started", "session ended", "configuration reloaded")
#: Share of each non-call event; the rest are api_call events, of which ERROR_SHARE fail.
_OTHER_EVENTS: Final = (
    ("cache_hit", 0.020),
    ("cache_miss", 0.015),
    ("model_override", 0.007),
    ("error", 0.005),
    ("system", 0.003),
)
ERROR_SHARE: Final = 0.02
#: Sessions last about this long; ids are derived from it so batches share sessions.
_SESSION_MS: Final = 10 * 60 * 1000
_SESSIONS_PER_PROJECT: Final = 3


def synthetic_events(rng: random.Random, now_ms: int, count: int) -> list[dict[str, Any]]:
    """`count` event dicts as a client would post them, timestamped within the second before
    `now_ms`. The same seed and arguments give the same events."""
    events = []
    for _ in range(count):
        roll = rng.random()
        kind = "api_call"
        for name, share in _OTHER_EVENTS:
            if roll < share:
                kind = name
                break
            roll -= share
        event = _common(rng, now_ms)
        if kind == "api_call":
            event.update(_api_call(rng))
        else:
            event.update(_other(rng, kind))
        events.append(event)
    return events


def auto_batch(rate: float) -> int:
    """Events per request for a rate: about ten requests a second, 1 to 1000 events each."""
    return max(1, min(1000, round(rate / 10)))


def plan_batches(rate: float, duration: float, batch: int) -> Iterator[tuple[float, int]]:
    """(seconds after the start when due, events) for each request: event n is due at
    n / rate, so a batch is due when its first event is. Endless when `duration` is 0."""
    if rate <= 0 or batch < 1 or duration < 0:
        raise ValueError("rate must be positive, batch at least 1, duration not negative")
    total = round(rate * duration) if duration else math.inf
    sent = 0
    while sent < total:
        size = int(min(batch, total - sent))
        yield sent / rate, size
        sent += size


@dataclass(slots=True)
class SimulationStats:
    """What a simulation did so far; kept up to date while it runs so Ctrl-C can report it."""

    sent: int = 0
    rejected: int = 0
    requests: int = 0
    elapsed_s: float = 0.0
    last_error: str | None = None
    statuses: dict[int, int] = field(default_factory=dict)

    @property
    def rate(self) -> float:
        """Events accepted per second of wall time."""
        return self.sent / self.elapsed_s if self.elapsed_s > 0 else 0.0

    def summary(self) -> str:
        line = (
            f"sent {self.sent} events in {self.requests} requests over {self.elapsed_s:.1f} s"
            f" ({self.rate:.1f}/s); rejected {self.rejected}"
        )
        if self.last_error:
            line += f"; last error: {self.last_error}"
        return line


def events_url(base_url: str, *, durable: bool = False) -> str:
    """The ingest endpoint of the exporter at `base_url`."""
    return base_url.rstrip("/") + "/api/events" + ("?durable=true" if durable else "")


def local_url(host: str, port: int) -> str:
    """The base URL of an exporter bound to `host`; one bound to every interface is reached
    on loopback."""
    try:
        address = ipaddress.ip_address(host)
    except ValueError:
        return f"http://{host}:{port}"
    if address.is_unspecified:
        address = ipaddress.ip_address("::1" if address.version == 6 else "127.0.0.1")
    return f"http://[{address}]:{port}" if address.version == 6 else f"http://{address}:{port}"


def post_events(
    client: httpx.Client,
    base_url: str,
    payload: Mapping[str, Any] | Sequence[Mapping[str, Any]],
    *,
    token: str = "",
    durable: bool = False,
) -> httpx.Response:
    """POST one event (a dict) or a batch (a list) as JSON, with the bearer token when set."""
    headers = {"content-type": "application/json"}
    if token:
        headers["authorization"] = f"Bearer {token}"
    return client.post(
        events_url(base_url, durable=durable), content=msgspec.json.encode(payload), headers=headers
    )


def run_simulation(
    client: httpx.Client,
    base_url: str,
    *,
    rate: float,
    duration: float,
    batch: int,
    rng: random.Random,
    stats: SimulationStats,
    token: str = "",
    monotonic: Callable[[], float] = time.monotonic,
    sleep: Callable[[float], None] = time.sleep,
    wall_ms: Callable[[], int] = lambda: time.time_ns() // 1_000_000,
) -> SimulationStats:
    """Post synthetic batches on schedule until `duration` is over (never when it is 0).

    A late batch goes at once instead of being skipped, so a slow server lowers the achieved
    rate rather than the event count. Transport errors (server gone) propagate; a non-2xx
    answer counts its events as rejected and the run goes on.
    """
    start = monotonic()
    for due, size in plan_batches(rate, duration, batch):
        wait = start + due - monotonic()
        if wait > 0:
            sleep(wait)
        events = synthetic_events(rng, wall_ms(), size)
        try:
            response = post_events(client, base_url, events, token=token)
        finally:
            stats.elapsed_s = monotonic() - start
        stats.requests += 1
        stats.statuses[response.status_code] = stats.statuses.get(response.status_code, 0) + 1
        if response.is_success:
            stats.sent += size
        else:
            stats.rejected += size
            stats.last_error = f"HTTP {response.status_code}: {response.text[:200]}"
    stats.elapsed_s = monotonic() - start
    return stats


def _common(rng: random.Random, now_ms: int) -> dict[str, Any]:
    project = rng.choices(_PROJECTS, _PROJECT_WEIGHTS)[0]
    event: dict[str, Any] = {
        "timestamp": max(0, now_ms - rng.randrange(1000)),
        "project": project,
        "session_id": _session_id(project, now_ms, rng.randrange(_SESSIONS_PER_PROJECT)),
    }
    agent = rng.choices(_AGENTS, _AGENT_WEIGHTS)[0]
    if agent is not None:
        event["agent"] = agent
    return event


def _session_id(project: str, now_ms: int, slot: int) -> str:
    # Derived, not drawn: every batch in the same 10 minutes reuses the same few sessions.
    return str(
        uuid.uuid5(uuid.NAMESPACE_URL, f"cco-simulate:{project}/{now_ms // _SESSION_MS}/{slot}")
    )


def _api_call(rng: random.Random) -> dict[str, Any]:
    model = rng.choices(MODELS, _MODEL_WEIGHTS)[0]
    call: dict[str, Any] = {
        "type": "api_call",
        "model": model.id,
        "provider": model.provider,
        "request_id": f"req_{rng.getrandbits(96):024x}",
    }
    if rng.random() < ERROR_SHARE:
        call.update(
            input_tokens=0,
            output_tokens=0,
            latency_ms=round(rng.uniform(50, 30_000), 1),
            status="error",
            error_type=rng.choice(_CALL_ERRORS),
        )
        return call
    input_tokens = _lognormal(rng, 2_000, 1.1, 180_000)
    output_tokens = _lognormal(rng, 350, 1.0, 32_000)
    call.update(input_tokens=input_tokens, output_tokens=output_tokens)
    if model.provider == "anthropic":
        if rng.random() < 0.75:
            call["cache_read_tokens"] = _lognormal(rng, 25_000, 0.9, 190_000)
        if rng.random() < 0.35:
            created = _lognormal(rng, 4_000, 1.0, 100_000)
            call["cache_creation_tokens"] = created
            if rng.random() < 0.2:
                call["cache_creation_1h_tokens"] = created
    elif model.provider == "openai" and rng.random() < 0.4:
        call["cache_read_tokens"] = _lognormal(rng, 3_000, 0.8, 100_000)
    jitter = rng.lognormvariate(0, 0.35)
    call["latency_ms"] = round((model.base_ms + output_tokens * model.per_token_ms) * jitter, 1)
    return call


def _other(rng: random.Random, kind: str) -> dict[str, Any]:
    model = rng.choices(MODELS, _MODEL_WEIGHTS)[0].id
    cache_key = f"ck_{rng.getrandbits(64):016x}"
    if kind == "cache_hit":
        return {
            "type": kind,
            "model": model,
            "savings_usd": round(rng.uniform(0.0005, 0.25), 6),
            "cache_key": cache_key,
        }
    if kind == "cache_miss":
        return {"type": kind, "model": model, "cache_key": cache_key}
    if kind == "model_override":
        return {
            "type": kind,
            "original_model": "claude-opus-4-6",
            "override_model": "claude-sonnet-4-6",
            "reason": rng.choice(_OVERRIDE_REASONS),
        }
    if kind == "error":
        error_type = rng.choice(_CALL_ERRORS)
        return {
            "type": kind,
            "model": model,
            "error_type": error_type,
            "message": f"upstream answered {error_type} after retries",
            "context": "proxy",
        }
    return {"type": "system", "message": rng.choice(_SYSTEM_NOTES), "context": "simulate"}


def _lognormal(rng: random.Random, median: float, sigma: float, cap: int) -> int:
    """A heavy-tailed count around `median`, as token counts are, at least 1 and at most `cap`."""
    return max(1, min(cap, int(rng.lognormvariate(math.log(median), sigma))))
