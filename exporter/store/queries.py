"""Reads and maintenance on the store: restoring the aggregator at start, retention purge."""

from __future__ import annotations

from typing import Final

import aiosqlite
import msgspec

from exporter.aggregator import HIST_OFFSET, TOTAL_FIELDS, Aggregator, CallRow
from exporter.store.writer import CALL_COLUMNS
from exporter.windows import RING_SECONDS

__all__ = ["PurgeResult", "purge", "recent_request_ids", "restore"]

_TOTAL_COLUMNS: Final = (
    "calls, errors, input_tokens, output_tokens, cache_read_tokens, cache_creation_tokens,"
    " cost_nanos, savings_nanos, latency_us_sum, latency_count, "
    + ", ".join(f"h{i}" for i in range(TOTAL_FIELDS - HIST_OFFSET))
)


class PurgeResult(msgspec.Struct, frozen=True):
    """How many rows a purge removed, per table."""

    api_calls: int
    request_ids: int
    activity_events: int
    metrics_aggregated: int


async def restore(conn: aiosqlite.Connection, aggregator: Aggregator, now_ms: int) -> int:
    """Load cumulative totals and counters, then refill the 10-minute ring and the recent-events
    deque from the last 10 minutes of stored calls. Returns how many calls went into the ring."""
    async with conn.execute(
        f"SELECT id, provider, model, tier, project, agent, {_TOTAL_COLUMNS} FROM series"
    ) as cursor:
        async for row in cursor:
            aggregator.restore_series(int(row[0]), tuple(row[1:6]), row[6:])
    async with conn.execute("SELECT name, labels, value FROM event_counters") as cursor:
        async for name, labels, value in cursor:
            label_values = tuple(msgspec.json.decode(labels, type=list[str]))
            aggregator.count(str(name), label_values, int(value))
    since = now_ms - RING_SECONDS * 1000
    refilled = 0
    async with conn.execute(
        f"SELECT {CALL_COLUMNS} FROM api_calls WHERE timestamp > ? ORDER BY timestamp", (since,)
    ) as cursor:
        async for row in cursor:
            call: CallRow = tuple(row)
            aggregator.restore_window(call)
            refilled += 1
    return refilled


async def recent_request_ids(conn: aiosqlite.Connection, limit: int) -> list[str]:
    """The newest `limit` stored request ids, oldest first (to seed the in-memory dedup set)."""
    async with conn.execute(
        "SELECT request_id FROM (SELECT request_id, call_id FROM request_ids"
        " ORDER BY call_id DESC LIMIT ?) ORDER BY call_id",
        (limit,),
    ) as cursor:
        return [str(row[0]) for row in await cursor.fetchall()]


async def purge(
    conn: aiosqlite.Connection, *, calls_before_ms: int, rollups_before_ms: int
) -> PurgeResult:
    """Delete raw calls and activity older than the retention, and rollups older than theirs.

    Cumulative totals live in `series` and survive; history keeps answering from rollups.
    """
    await conn.execute("BEGIN IMMEDIATE")
    try:
        async with conn.execute(
            "SELECT coalesce(max(id), 0) FROM api_calls WHERE timestamp < ?", (calls_before_ms,)
        ) as cursor:
            row = await cursor.fetchone()
        calls = await conn.execute("DELETE FROM api_calls WHERE timestamp < ?", (calls_before_ms,))
        ids = await conn.execute(
            "DELETE FROM request_ids WHERE call_id NOT IN (SELECT id FROM api_calls)"
            if row and row[0]
            else "DELETE FROM request_ids WHERE 0"
        )
        activity = await conn.execute(
            "DELETE FROM activity_events WHERE timestamp < ?", (calls_before_ms,)
        )
        rollups = await conn.execute(
            "DELETE FROM metrics_aggregated WHERE minute < ?", (rollups_before_ms,)
        )
        await conn.execute("COMMIT")
    except BaseException:
        await conn.execute("ROLLBACK")
        raise
    return PurgeResult(calls.rowcount, ids.rowcount, activity.rowcount, rollups.rowcount)
