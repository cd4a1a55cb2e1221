"""Reads and maintenance on the store: restoring the aggregator at start, retention purge."""

from __future__ import annotations

from typing import Any, Final

import aiosqlite
import msgspec

from exporter.aggregator import HIST_OFFSET, TOTAL_FIELDS, Aggregator, CallRow
from exporter.events import ApiCall, Event
from exporter.windows import RING_SECONDS

__all__ = [
    "ACTIVITY_TYPES",
    "HISTORY_DIMENSIONS",
    "ActivityQuery",
    "HistoryRow",
    "PurgeResult",
    "activity",
    "history",
    "purge",
    "recent_request_ids",
    "restore",
    "restore_spend",
]

ACTIVITY_TYPES: Final = ("api_call", "cache_hit", "cache_miss", "error", "model_override", "system")
HISTORY_DIMENSIONS: Final = ("provider", "model", "tier", "project", "agent")
_CALL_EVENT_COLUMNS: Final = (
    "s.provider, s.model, s.tier, s.project, NULLIF(s.agent, ''), x.session_id, c.request_id,"
    " c.input_tokens, c.output_tokens, c.cache_creation_tokens, c.cache_creation_1h_tokens,"
    " c.cache_read_tokens, c.latency_us, c.cost_nanos, c.status, c.error_type"
)

#: api_calls columns read back as a CallRow (the session is not needed: NULL).
_CALL_ROW: Final = (
    "timestamp, series_id, NULL, input_tokens, output_tokens, cache_creation_tokens,"
    " cache_creation_1h_tokens, cache_read_tokens, latency_us, cost_nanos, savings_nanos,"
    " status, error_type, request_id"
)
_TOTAL_COLUMNS: Final = (
    "calls, errors, input_tokens, output_tokens, cache_read_tokens, cache_creation_tokens,"
    " cost_nanos, savings_nanos, latency_us_sum, latency_count, "
    + ", ".join(f"h{i}" for i in range(TOTAL_FIELDS - HIST_OFFSET))
)


class PurgeResult(msgspec.Struct, frozen=True):
    """How many rows a purge removed, per table (`request_ids`: removed calls that carried one)."""

    api_calls: int
    request_ids: int
    activity_events: int
    metrics_aggregated: int


async def restore(conn: aiosqlite.Connection, aggregator: Aggregator, now_ms: int) -> int:
    """Load cumulative totals, counters and this month's spend, then refill the 10-minute ring
    and the recent-events deque from the last 10 minutes of stored calls. Returns how many calls
    went into the ring."""
    async with conn.execute(
        f"SELECT id, provider, model, tier, project, agent, {_TOTAL_COLUMNS} FROM series"
    ) as cursor:
        async for row in cursor:
            aggregator.restore_series(int(row[0]), tuple(row[1:6]), row[6:])
    async with conn.execute("SELECT name, labels, value FROM event_counters") as cursor:
        async for name, labels, value in cursor:
            label_values = tuple(msgspec.json.decode(labels, type=list[str]))
            aggregator.count(str(name), label_values, int(value))
    async with conn.execute(
        "SELECT series_id, max(minute) + 59999 FROM metrics_aggregated GROUP BY series_id"
    ) as cursor:
        async for series_id, last in cursor:
            aggregator.last_seen[int(series_id)] = int(last)
    await restore_spend(conn, aggregator)
    since = now_ms - RING_SECONDS * 1000
    refilled = 0
    async with conn.execute(
        f"SELECT {_CALL_ROW} FROM api_calls WHERE timestamp > ? ORDER BY timestamp", (since,)
    ) as cursor:
        async for row in cursor:
            call: CallRow = tuple(row)
            aggregator.restore_window(call)
            refilled += 1
    return refilled


async def restore_spend(conn: aiosqlite.Connection, aggregator: Aggregator) -> int:
    """Count the stored cost of every call the budget periods may need (this month, yesterday,
    and anything stamped later) into the aggregator's spend, from the per-minute rollups.

    One query per local day, grouped by series: every zone's midnights fall on whole minutes,
    so each rollup minute lies in one local day, and grouping a day's rows by series is about
    twice as fast as grouping them by 15-minute slot and series (the grouping is most of the
    cost: ~0.4 µs per rollup row of the month). Rows stamped after tomorrow (a client clock far
    ahead) are read one by one. Returns the rollup groups read.
    """
    spend = aggregator.spend
    projects = {series_id: key[3] for series_id, key in aggregator.series_keys.items()}
    groups = 0
    days = spend.days_kept()
    for start_ms, end_ms in days:
        async with conn.execute(
            "SELECT series_id, sum(cost_nanos) FROM metrics_aggregated"
            " WHERE minute >= ? AND minute < ? GROUP BY series_id",
            (start_ms, end_ms),
        ) as cursor:
            rows = await cursor.fetchall()
        # Summed per project first: the tracker finds a day in zoneinfo once per addition.
        by_project: dict[str, int] = {}
        for series_id, nanos in rows:
            project = projects[int(series_id)]
            by_project[project] = by_project.get(project, 0) + int(nanos)
            groups += 1
        for project, nanos in by_project.items():
            spend.add(start_ms, project, nanos)
    async with conn.execute(
        "SELECT minute, series_id, cost_nanos FROM metrics_aggregated WHERE minute >= ?",
        (days[-1][1],),
    ) as cursor:
        rows = await cursor.fetchall()
    for minute, series_id, nanos in rows:
        spend.add(int(minute), projects[int(series_id)], int(nanos))
        groups += 1
    return groups


async def recent_request_ids(conn: aiosqlite.Connection, limit: int) -> list[str]:
    """The newest `limit` stored request ids, oldest first (to seed the in-memory dedup set)."""
    # A backwards scan of the table (its rows are in arrival order), reversed here: cheaper than
    # SQLite sorting them back, and than the request-id index (sorted by id, not by arrival).
    async with conn.execute(
        "SELECT request_id FROM api_calls WHERE request_id IS NOT NULL ORDER BY id DESC LIMIT ?",
        (limit,),
    ) as cursor:
        newest_first = [str(row[0]) for row in await cursor.fetchall()]
    newest_first.reverse()
    return newest_first


async def purge(
    conn: aiosqlite.Connection, *, calls_before_ms: int, rollups_before_ms: int
) -> PurgeResult:
    """Delete raw calls and activity older than the retention, and rollups older than theirs.

    Cumulative totals live in `series` and survive; history keeps answering from rollups.
    """
    await conn.execute("BEGIN IMMEDIATE")
    try:
        async with conn.execute(
            "SELECT count(request_id) FROM api_calls WHERE timestamp < ?", (calls_before_ms,)
        ) as cursor:
            row = await cursor.fetchone()
        request_ids = int(row[0]) if row else 0
        calls = await conn.execute("DELETE FROM api_calls WHERE timestamp < ?", (calls_before_ms,))
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
    return PurgeResult(calls.rowcount, request_ids, activity.rowcount, rollups.rowcount)


class ActivityQuery(msgspec.Struct, frozen=True, kw_only=True):
    """Filters of the activity log; times are epoch ms, both ends inclusive."""

    limit: int = 100
    offset: int = 0
    type: str | None = None
    project: str | None = None
    from_ms: int | None = None
    to_ms: int | None = None


async def activity(conn: aiosqlite.Connection, query: ActivityQuery) -> tuple[list[Event], int]:
    """Stored events, newest first, and how many match in all.

    Calls come from `api_calls`, the other events from `activity_events`; both are filtered in
    SQL with bound parameters, merged by timestamp, then paged.
    """
    parts: list[str] = []
    params: list[object] = []
    counts: list[tuple[str, list[object]]] = []
    if query.type in (None, "api_call"):
        where, values = _filters("c.timestamp", "s.project", query)
        parts.append(
            "SELECT c.timestamp AS ts, 0 AS src, c.id AS id, NULL AS payload,"
            f" {_CALL_EVENT_COLUMNS} FROM api_calls c JOIN series s ON s.id = c.series_id"
            f" LEFT JOIN sessions x ON x.id = c.session{where}"
        )
        counts.append(
            (f"SELECT count(*) FROM api_calls c JOIN series s ON s.id = c.series_id{where}", values)
        )
        params += values
    if query.type != "api_call":
        where, values = _filters("timestamp", "project", query)
        if query.type is not None:
            where += (" AND" if where else " WHERE") + " type = ?"
            values.append(query.type)
        nulls = ", ".join(["NULL"] * 16)
        parts.append(
            f"SELECT timestamp AS ts, 1 AS src, id, payload, {nulls} FROM activity_events{where}"
        )
        counts.append((f"SELECT count(*) FROM activity_events{where}", values))
        params += values
    sql = " UNION ALL ".join(parts) + " ORDER BY ts DESC, src, id DESC LIMIT ? OFFSET ?"
    async with conn.execute(sql, (*params, query.limit, query.offset)) as cursor:
        rows = await cursor.fetchall()
    total = 0
    for count_sql, values in counts:
        async with conn.execute(count_sql, values) as cursor:
            row = await cursor.fetchone()
        total += int(row[0]) if row else 0
    return [_stored_event(row) for row in rows], total


def _filters(ts: str, project: str, query: ActivityQuery) -> tuple[str, list[object]]:
    clauses: list[str] = []
    values: list[object] = []
    if query.project is not None:
        clauses.append(f"{project} = ?")
        values.append(query.project)
    if query.from_ms is not None:
        clauses.append(f"{ts} >= ?")
        values.append(query.from_ms)
    if query.to_ms is not None:
        clauses.append(f"{ts} <= ?")
        values.append(query.to_ms)
    return (" WHERE " + " AND ".join(clauses) if clauses else ""), values


_EVENT_DECODER: Final = msgspec.json.Decoder(Event)


def _stored_event(row: Any) -> Event:
    if row[1] == 1:
        event: Event = _EVENT_DECODER.decode(row[3])
        return event
    (provider, model, tier, project, agent, session_id, request_id) = row[4:11]
    (tokens_in, tokens_out, cache_creation, cache_1h, cache_read) = row[11:16]
    latency_us, cost_nanos, status, error_type = row[16:20]
    return ApiCall(
        timestamp=int(row[0]),
        model=model,
        provider=provider,
        tier=tier,
        project=project,
        agent=agent,
        session_id=session_id,
        request_id=request_id,
        input_tokens=tokens_in,
        output_tokens=tokens_out,
        cache_creation_tokens=cache_creation,
        cache_creation_1h_tokens=cache_1h,
        cache_read_tokens=cache_read,
        latency_ms=None if latency_us is None else latency_us / 1000.0,
        cost_usd=cost_nanos / 1e9,
        status="error" if status else "ok",
        error_type=error_type,
    )


class HistoryRow(msgspec.Struct, array_like=True):
    """One step of one series: start (ms), label (or "all") and the window-row sums."""

    start_ms: int
    label: str
    sums: list[int]


async def history(
    conn: aiosqlite.Connection, *, from_ms: int, to_ms: int, step_ms: int, by: str | None
) -> list[HistoryRow]:
    """Per-step sums from the per-minute rollups, grouped by one label or over everything."""
    if by is not None and by not in HISTORY_DIMENSIONS:
        raise ValueError(f"cannot group history by {by!r}")
    label = f"s.{by}" if by else "'all'"
    sql = (
        f"SELECT (m.minute / ?) * ? AS start, {label} AS label, sum(m.calls), sum(m.errors),"
        " sum(m.input_tokens), sum(m.output_tokens), sum(m.cache_read_tokens),"
        " sum(m.cache_creation_tokens), sum(m.cost_nanos), sum(m.savings_nanos),"
        " sum(m.latency_us_sum), sum(m.latency_count)"
        " FROM metrics_aggregated m JOIN series s ON s.id = m.series_id"
        " WHERE m.minute >= ? AND m.minute <= ? GROUP BY start, label ORDER BY label, start"
    )
    async with conn.execute(sql, (step_ms, step_ms, from_ms, to_ms)) as cursor:
        rows = await cursor.fetchall()
    return [HistoryRow(int(r[0]), str(r[1]), [int(v) for v in r[2:]]) for r in rows]
