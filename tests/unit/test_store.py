"""The engine on a real SQLite file: persistence, idempotency, spill and replay, restart."""

from __future__ import annotations

import asyncio
import bisect
import random
import sqlite3
from pathlib import Path

import pytest

from exporter import ApiCall, CacheHit, Exporter, ModelOverride, QueueFull, Settings
from exporter.aggregator import HISTOGRAM_BOUNDS_S
from exporter.store.db import MIGRATIONS_DIR, MigrationError, connect, migrate, request_key
from exporter.store.queries import recent_request_ids
from exporter.windows import CALLS, COST, TOKENS_IN
from tests.conftest import FakeClock

MODELS = [
    "claude-opus-4-1-20250805",
    "claude-sonnet-4-5-20250929",
    "claude-haiku-4-5",
    "gpt-4o",
    "gpt-5-mini",
    "llama3.1:8b",
    "some-unpriced-model",
]


def random_call(rng: random.Random, clock: FakeClock, i: int, *, rid: bool = False) -> ApiCall:
    return ApiCall(
        model=rng.choice(MODELS),
        timestamp=clock.ms - rng.randint(0, 900_000),
        project=rng.choice(["web", "api", "cli"]),
        agent=rng.choice([None, "planner", "coder"]),
        session_id=rng.choice([None, "s-1", "s-2"]),
        request_id=f"req-{i}" if rid else None,
        input_tokens=rng.randint(0, 200_000),
        output_tokens=rng.randint(0, 20_000),
        cache_creation_tokens=rng.randint(0, 5_000),
        cache_read_tokens=rng.randint(0, 50_000),
        latency_ms=rng.choice([None, rng.uniform(1, 60_000)]),
        status=rng.choice(["ok", "ok", "ok", "error"]),
    )


def db_totals(path: Path) -> tuple[int, int, int]:
    with sqlite3.connect(path) as conn:
        row = conn.execute(
            "SELECT count(*), coalesce(sum(cost_nanos), 0), coalesce(sum(input_tokens), 0)"
            " FROM api_calls"
        ).fetchone()
    return int(row[0]), int(row[1]), int(row[2])


def settings_for(tmp_path: Path, **overrides: object) -> Settings:
    return Settings(db_path=str(tmp_path / "metrics.db"), **overrides)  # type: ignore[arg-type]


async def test_migrations_are_applied_once_and_recorded(tmp_path: Path) -> None:
    conn = await connect(tmp_path / "m.db")
    try:
        first = await migrate(conn)
        assert first == [
            "001_initial_schema.sql",
            "002_seed_pricing.sql",
            "003_add_indexes.sql",
            "004_compact_calls.sql",
            "005_request_keys.sql",
        ]
        assert await migrate(conn) == []
        async with conn.execute("SELECT version FROM schema_migrations ORDER BY 1") as cur:
            assert [r[0] for r in await cur.fetchall()] == [1, 2, 3, 4, 5]
        async with conn.execute("PRAGMA journal_mode") as cur:
            assert (await cur.fetchone()) == ("wal",)
    finally:
        await conn.close()


async def test_a_broken_migration_leaves_the_previous_version(tmp_path: Path) -> None:
    folder = tmp_path / "migrations"
    folder.mkdir()
    for source in sorted(MIGRATIONS_DIR.glob("*.sql")):
        (folder / source.name).write_text(source.read_text())
    last = len(list(MIGRATIONS_DIR.glob("*.sql")))
    broken = f"{last + 1:03d}_broken.sql"
    (folder / broken).write_text("CREATE TABLE ok_table (x);\nSELECT * FROM nowhere;")
    conn = await connect(tmp_path / "m.db")
    try:
        with pytest.raises(MigrationError, match=broken):
            await migrate(conn, folder)
        async with conn.execute("SELECT max(version) FROM schema_migrations") as cur:
            assert (await cur.fetchone()) == (last,)
        async with conn.execute(
            "SELECT count(*) FROM sqlite_master WHERE name = 'ok_table'"
        ) as cur:
            assert (await cur.fetchone()) == (0,)
    finally:
        await conn.close()


async def test_migration_004_moves_request_ids_into_calls_and_interns_sessions(
    tmp_path: Path,
) -> None:
    """A database written before 004 (request_ids table, session ids as text) keeps every
    call, request id and session through the migration, and dedup still holds after it."""
    folder = tmp_path / "migrations"
    folder.mkdir()
    for source in sorted(MIGRATIONS_DIR.glob("00[123]_*.sql")):
        (folder / source.name).write_text(source.read_text())
    path = tmp_path / "old.db"
    conn = await connect(path)
    try:
        await migrate(conn, folder)
        await conn.executescript(
            """
            INSERT INTO series (id, provider, model, tier, project, agent, calls)
                VALUES (1, 'openai', 'gpt-4o', 'gpt-4o', 'web', '', 3);
            INSERT INTO api_calls (id, timestamp, series_id, session_id, input_tokens,
                output_tokens, cache_creation_tokens, cache_creation_1h_tokens,
                cache_read_tokens, latency_us, cost_nanos, savings_nanos, status, error_type)
            VALUES (1, 1000, 1, 's-a', 10, 1, 0, 0, 0, 5000, 100, 0, 0, NULL),
                   (2, 2000, 1, NULL, 20, 2, 0, 0, 0, NULL, 200, 0, 1, 'api_error'),
                   (3, 3000, 1, 's-a', 30, 3, 0, 0, 0, 7000, 300, 0, 0, NULL);
            INSERT INTO request_ids (request_id, call_id) VALUES ('r1', 1), ('r3', 3);
            INSERT INTO sessions (session_id, project, first_seen, last_seen, calls, cost_nanos)
                VALUES ('s-a', 'web', 1000, 3000, 2, 400);
            """
        )
        assert await migrate(conn) == ["004_compact_calls.sql", "005_request_keys.sql"]
    finally:
        await conn.close()
    with sqlite3.connect(path) as c:
        rows = c.execute(
            "SELECT id, timestamp, session_id, request_id, input_tokens, latency_ms, cost_usd,"
            " status, error_type FROM calls ORDER BY id"
        ).fetchall()
        assert rows == [
            (1, 1000, "s-a", "r1", 10, 5.0, 1e-7, "ok", None),
            (2, 2000, None, None, 20, None, 2e-7, "error", "api_error"),
            (3, 3000, "s-a", "r3", 30, 7.0, 3e-7, "ok", None),
        ]
        tables = {r[0] for r in c.execute("SELECT name FROM sqlite_master WHERE type='table'")}
        assert "request_ids" not in tables
        # 005: every stored id got its key, the unique index on the text is gone.
        keys = c.execute("SELECT request_id, request_key FROM api_calls ORDER BY id").fetchall()
        assert keys == [("r1", request_key("r1")), (None, None), ("r3", request_key("r3"))]
        indexes = {r[0] for r in c.execute("SELECT name FROM sqlite_master WHERE type='index'")}
        assert "idx_api_calls_request" not in indexes
        assert "idx_api_calls_request_key" in indexes
        assert c.execute("SELECT session_id, calls, cost_nanos FROM sessions").fetchall() == [
            ("s-a", 2, 400)
        ]
        assert c.execute("PRAGMA integrity_check").fetchone() == ("ok",)
    exporter = await Exporter.start(Settings(db_path=str(path)))
    try:
        assert not exporter.record(ApiCall(model="gpt-4o", input_tokens=1, request_id="r1"))
        assert exporter.record(ApiCall(model="gpt-4o", input_tokens=1, request_id="r4"))
    finally:
        await exporter.close()
    restarted = await Exporter.start(Settings(db_path=str(path), dedup_memory=1))
    try:
        # r3 is no longer in memory (dedup_memory=1): the stored rows decide.
        restarted.record(ApiCall(model="gpt-4o", input_tokens=1, request_id="r3"))
        restarted.record(ApiCall(model="gpt-4o", input_tokens=1, request_id="s-a-new"))
        await restarted.flush()
        assert restarted.aggregator.duplicates == 1
    finally:
        await restarted.close()
    with sqlite3.connect(path) as c:
        assert c.execute("SELECT count(*), count(request_id) FROM api_calls").fetchone() == (5, 4)


def colliding_ids() -> tuple[str, str]:
    """Two different request ids with the same key (a birthday search over ~2^16 ids)."""
    rng = random.Random(5)
    seen: dict[int, str] = {}
    for _ in range(2_000_000):  # pragma: no branch - a collision comes after ~60,000
        rid = f"req_{rng.getrandbits(80):020x}"
        other = seen.setdefault(request_key(rid), rid)
        if other != rid:
            return other, rid
    raise AssertionError("no collision")


async def test_ids_sharing_a_key_are_told_apart_by_their_text(tmp_path: Path) -> None:
    """The key finds candidates; the ids decide. Two ids with one key are both stored, and each
    is refused when it comes again (from SQLite, not the memory: dedup_memory=1)."""
    first, second = colliding_ids()
    assert first != second
    assert request_key(first) == request_key(second)
    exporter = await Exporter.start(settings_for(tmp_path, dedup_memory=1))
    try:
        assert exporter.record(ApiCall(model="gpt-4o", input_tokens=1, request_id=first))
        await exporter.flush()
        assert exporter.record(ApiCall(model="gpt-4o", input_tokens=2, request_id=second))
        exporter.record(ApiCall(model="gpt-4o", input_tokens=4))
        await exporter.flush()
        assert exporter.aggregator.duplicates == 0
        for index, rid in enumerate((first, second)):
            exporter.record(ApiCall(model="gpt-4o", input_tokens=100, request_id=rid))
            exporter.record(ApiCall(model="gpt-4o", input_tokens=1, request_id=f"other-{index}"))
            await exporter.flush()
        assert exporter.aggregator.duplicates == 2
        assert exporter.aggregator.grand_total()[TOKENS_IN] == 1 + 2 + 4 + 1 + 1
    finally:
        await exporter.close()
    with sqlite3.connect(tmp_path / "metrics.db") as c:
        rows = c.execute(
            "SELECT request_id, input_tokens FROM api_calls WHERE request_key = ? ORDER BY id",
            (request_key(first),),
        ).fetchall()
    assert rows == [(first, 1), (second, 2)]


async def test_sessions_count_their_calls_cost_and_time_span(tmp_path: Path) -> None:
    """`sessions` is kept in each flush's transaction: it equals a recomputation from the calls,
    for sessions new in a flush and for sessions seen in an earlier one."""
    clock = FakeClock()
    rng = random.Random(8)
    exporter = await Exporter.start(settings_for(tmp_path), clock=clock)
    try:
        for i in range(300):
            exporter.record(random_call(rng, clock, i))
        await exporter.flush()
        for i in range(300, 500):
            call = random_call(rng, clock, i)
            call.session_id = call.session_id and f"{call.session_id}-{i % 2}"
            exporter.record(call)
        exporter.record(ApiCall(model="gpt-4o", input_tokens=5, session_id="s-1"))
        await exporter.flush()
    finally:
        await exporter.close()
    with sqlite3.connect(tmp_path / "metrics.db") as c:
        stored = c.execute(
            "SELECT session_id, first_seen, last_seen, calls, cost_nanos FROM sessions"
            " ORDER BY session_id"
        ).fetchall()
        expected = c.execute(
            "SELECT x.session_id, min(c.timestamp), max(c.timestamp), count(*),"
            " sum(c.cost_nanos) FROM api_calls c JOIN sessions x ON x.id = c.session"
            " GROUP BY x.session_id ORDER BY x.session_id"
        ).fetchall()
    assert len(stored) == 6  # s-1, s-2; then s-1-0, s-1-1, s-2-0, s-2-1
    assert stored == expected


_ROLLUP_SUMS = (
    "calls, errors, input_tokens, output_tokens, cache_read_tokens, cache_creation_tokens,"
    " cost_nanos, savings_nanos, latency_us_sum, latency_count"
)
_CALL_SUMS = (
    "count(*), sum(status), sum(input_tokens), sum(output_tokens), sum(cache_read_tokens),"
    " sum(cache_creation_tokens), sum(cost_nanos), sum(savings_nanos),"
    " coalesce(sum(latency_us), 0), count(latency_us)"
)


def assert_rollups_match_calls(path: Path) -> None:
    """metrics_aggregated, series totals and series histograms equal a recomputation from
    api_calls (the bucket of each stored latency found again with bisect)."""
    bounds = [round(b * 1_000_000) for b in HISTOGRAM_BOUNDS_S]
    hist = ", ".join(f"h{i}" for i in range(len(bounds) + 1))
    with sqlite3.connect(path) as c:
        stored = c.execute(
            f"SELECT minute, series_id, {_ROLLUP_SUMS} FROM metrics_aggregated ORDER BY 1, 2"
        ).fetchall()
        expected = c.execute(
            f"SELECT (timestamp / 60000) * 60000, series_id, {_CALL_SUMS} FROM api_calls"
            " GROUP BY 1, 2 ORDER BY 1, 2"
        ).fetchall()
        assert stored == expected
        series = c.execute(
            f"SELECT id, {_ROLLUP_SUMS}, {hist} FROM series WHERE calls > 0 ORDER BY id"
        ).fetchall()
        sums = c.execute(
            f"SELECT series_id, {_CALL_SUMS} FROM api_calls GROUP BY 1 ORDER BY 1"
        ).fetchall()
        counts: dict[int, list[int]] = {}
        for series_id, latency in c.execute("SELECT series_id, latency_us FROM api_calls"):
            row = counts.setdefault(series_id, [0] * (len(bounds) + 1))
            if latency is not None:
                row[bisect.bisect_left(bounds, latency)] += 1
    assert series == [(*row, *counts[row[0]]) for row in sums]


async def test_rollups_and_series_totals_equal_a_recomputation_from_the_calls(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """The aggregator hands the writer each batch's sums per (minute, label set); whatever the
    path a call takes (an open second, a client clock ahead across a minute's end, a late call,
    a repeat only the store recognises, a spilled and replayed batch, a batch with other events,
    a restart), the rollups and series totals equal the stored calls' sums."""
    bounds_ms = [b * 1000 for b in HISTOGRAM_BOUNDS_S]
    clock = FakeClock(1_790_000_039.5)  # 0.5 s before a minute ends
    rng = random.Random(17)
    # The exporter remembers one request id: repeats reach the store, which refuses them.
    settings = settings_for(tmp_path, dedup_memory=1, batch_size=50)
    ids = [f"r{i}" for i in range(40)]

    def call() -> ApiCall:
        shape = rng.random()
        if shape < 0.5:
            ts = clock.ms - rng.randint(0, 5_000)  # an open second
        elif shape < 0.8:
            ts = clock.ms + rng.randint(1, 3_000)  # a clock ahead: often the next minute
        else:
            ts = clock.ms - rng.randint(10_000, 900_000)  # late
        return ApiCall(
            model=rng.choice(MODELS),
            timestamp=ts,
            project=rng.choice(["web", "api"]),
            session_id=rng.choice([None, "s-1"]),
            request_id=rng.choice([None, None, rng.choice(ids)]),
            input_tokens=rng.randint(0, 300_000),
            output_tokens=rng.randint(0, 9_000),
            cache_creation_tokens=rng.randint(0, 4_000),
            cache_read_tokens=rng.randint(0, 9_000),
            # On a bucket's bound, 1 µs past it, or anywhere.
            latency_ms=rng.choice(
                [None, rng.choice(bounds_ms) + rng.choice([0, 0.001]), rng.uniform(1, 90_000)]
            ),
            status=rng.choice(["ok", "ok", "error"]),
        )

    exporter = await Exporter.start(settings, clock=clock)
    for step in range(8):
        for _ in range(60):
            exporter.record(call())
        if step == 3:
            exporter.record(ModelOverride(original_model="gpt-4o", override_model="gpt-5"))
        clock.advance(rng.choice([0.25, 0.5, 1.0, 2.0]))
        await exporter.flush()
    assert exporter.aggregator.duplicates > 0  # the store found repeated ids

    # A full disk: the next batch is spilled (its rows only), and replayed once writes work.
    await exporter.writer.limit_pages()
    for _ in range(300):
        exporter.record(call())
    await exporter.flush()
    assert exporter.health().spill_backlog > 0
    await exporter.writer.limit_pages(1_073_741_823)
    for _ in range(60):
        exporter.record(call())
    await exporter.flush()
    assert exporter.health().spill_backlog == 0
    # Neither the database nor the spill file: the batch stays queued, and is written later.
    await exporter.writer.limit_pages()
    spill_path = exporter.writer._spill_path
    exporter.writer._spill_path = tmp_path / "not-a-file"
    exporter.writer._spill_path.mkdir()
    held = sum(exporter.record(call()) for _ in range(200))
    await exporter.flush()
    assert exporter.health().queue_depth == held > 0
    await exporter.writer.limit_pages(1_073_741_823)
    exporter.writer._spill_path = spill_path
    for _ in range(60):
        exporter.record(call())
    await exporter.flush()
    assert exporter.health().queue_depth == 0
    totals = exporter.aggregator.grand_total()
    await exporter.close()
    assert_rollups_match_calls(tmp_path / "metrics.db")

    exporter = await Exporter.start(settings, clock=clock)
    assert exporter.aggregator.grand_total() == totals
    for _ in range(3):
        for _ in range(60):
            exporter.record(call())
        clock.advance(0.75)
        await exporter.flush()
    totals = exporter.aggregator.grand_total()
    await exporter.close()
    assert_rollups_match_calls(tmp_path / "metrics.db")
    with sqlite3.connect(tmp_path / "metrics.db") as c:
        stored = c.execute(f"SELECT {_ROLLUP_SUMS} FROM series").fetchall()
    assert [sum(column) for column in zip(*stored, strict=True)] == totals[:10]
    # Every batch came with the sums of exactly its calls: SQLite never had to add them up.
    assert "SQLite sums them" not in caplog.text


async def test_the_dedup_memory_is_seeded_with_the_newest_ids_oldest_first(tmp_path: Path) -> None:
    exporter = await Exporter.start(settings_for(tmp_path))
    for i in range(10):
        exporter.record(ApiCall(model="gpt-4o", input_tokens=1, request_id=f"r{i}"))
        exporter.record(ApiCall(model="gpt-4o", input_tokens=1))  # no id: skipped
    await exporter.close()
    conn = await connect(tmp_path / "metrics.db")
    try:
        assert await recent_request_ids(conn, 4) == ["r6", "r7", "r8", "r9"]
        assert await recent_request_ids(conn, 100) == [f"r{i}" for i in range(10)]
    finally:
        await conn.close()


async def test_100k_random_events_totals_equal_sqlite_sums_to_the_nano_dollar(
    tmp_path: Path,
) -> None:
    clock = FakeClock()
    rng = random.Random(7)
    exporter = await Exporter.start(settings_for(tmp_path, max_queue=200_000), clock=clock)
    for i in range(100_000):
        exporter.record(random_call(rng, clock, i))
        if i % 10_000 == 0:
            clock.advance(1)
            await asyncio.sleep(0)
    totals = exporter.aggregator.grand_total()
    await exporter.close()
    count, cost, tokens_in = db_totals(tmp_path / "metrics.db")
    assert count == totals[CALLS] == 100_000
    assert cost == totals[COST]
    assert tokens_in == totals[TOKENS_IN]
    with sqlite3.connect(tmp_path / "metrics.db") as conn:
        rollup = conn.execute(
            "SELECT sum(calls), sum(cost_nanos) FROM metrics_aggregated"
        ).fetchone()
        series = conn.execute("SELECT sum(calls), sum(cost_nanos) FROM series").fetchone()
        by_view = conn.execute("SELECT round(sum(cost_usd), 2) FROM calls").fetchone()[0]
    assert rollup == (100_000, cost)
    assert series == (100_000, cost)
    assert by_view == round(cost / 1e9, 2)


async def test_repeated_request_id_is_counted_once_also_after_restart(tmp_path: Path) -> None:
    clock = FakeClock()
    exporter = await Exporter.start(settings_for(tmp_path), clock=clock)
    call = dict(model="claude-sonnet-4-5", input_tokens=1000, request_id="req_abc")
    assert exporter.record(ApiCall(**call)) is True  # type: ignore[arg-type]
    assert exporter.record(ApiCall(**call)) is False  # type: ignore[arg-type]
    hit = dict(savings_usd=0.1, request_id="req_abc")  # another type may reuse the id
    assert exporter.record(CacheHit(**hit)) is True  # type: ignore[arg-type]
    assert exporter.record(CacheHit(**hit)) is False  # type: ignore[arg-type]
    await exporter.close()

    exporter = await Exporter.start(settings_for(tmp_path), clock=clock)
    assert exporter.record(ApiCall(**call)) is False  # type: ignore[arg-type]
    assert exporter.aggregator.grand_total()[CALLS] == 1
    await exporter.close()

    # With the in-memory memory of ids too small to remember it, the store still refuses it
    # and the count is taken back at the flush.
    exporter = await Exporter.start(settings_for(tmp_path, dedup_memory=1), clock=clock)
    exporter.record(ApiCall(model="gpt-4o", request_id="other"))
    assert exporter.record(ApiCall(**call)) is True  # type: ignore[arg-type]
    await exporter.flush()
    assert exporter.aggregator.grand_total()[CALLS] == 2
    assert exporter.aggregator.duplicates == 1
    # The same for other events: the stored (type, request id) pair decides, per type.
    hits_before = exporter.aggregator.counters[("cache_events", ("hit",))]
    exporter.record(ApiCall(model="gpt-4o", request_id="other-2"))  # pushes req_abc out
    assert exporter.record(CacheHit(**hit)) is True  # type: ignore[arg-type]
    override = ModelOverride(original_model="a", override_model="b", request_id="req_abc")
    assert exporter.record(override) is True
    await exporter.flush()
    assert exporter.aggregator.duplicates == 2
    assert exporter.aggregator.counters[("cache_events", ("hit",))] == hits_before
    await exporter.close()
    assert db_totals(tmp_path / "metrics.db")[0] == 3
    with sqlite3.connect(tmp_path / "metrics.db") as c:
        stored = c.execute(
            "SELECT type, count(*) FROM activity_events WHERE request_id = 'req_abc' GROUP BY 1"
        ).fetchall()
    assert sorted(stored) == [("cache_hit", 1), ("model_override", 1)]


async def test_restart_restores_totals_counters_and_the_ten_minute_window(
    tmp_path: Path,
) -> None:
    clock = FakeClock()
    rng = random.Random(3)
    exporter = await Exporter.start(settings_for(tmp_path), clock=clock)
    for i in range(2_000):
        exporter.record(random_call(rng, clock, i, rid=True))
    # Latencies on a histogram bound and a microsecond past it: the store must bucket them as
    # the aggregator does (a bound belongs to the bucket it closes).
    for bound_ms in (b * 1000 for b in HISTOGRAM_BOUNDS_S):
        for latency_ms in (bound_ms, bound_ms + 0.001):
            exporter.record(ApiCall(model="gpt-4o", input_tokens=1, latency_ms=latency_ms))
    exporter.record(CacheHit(model="claude-sonnet-4-5", savings_usd=0.5))
    exporter.record(ModelOverride(original_model="claude-opus-4-1", override_model="gpt-4o"))
    before_totals = exporter.aggregator.grand_total()
    before_windows = {w: exporter.aggregator.window(w) for w in ("1m", "5m", "10m")}
    before_counters = dict(exporter.aggregator.counters)
    before_models = exporter.aggregator.breakdown("model")
    await exporter.close()

    clock.advance(0.5)
    exporter = await Exporter.start(settings_for(tmp_path), clock=clock)
    try:
        assert exporter.aggregator.grand_total() == before_totals
        assert exporter.aggregator.counters == before_counters
        assert exporter.aggregator.breakdown("model") == before_models
        for name, snap in before_windows.items():
            after = exporter.aggregator.window(name)
            assert after.total == snap.total
            assert after.by_tier == snap.by_tier
            assert after.p95_ms == snap.p95_ms
    finally:
        await exporter.close()


async def test_failing_flush_spills_then_replays_exact_counts_without_duplicates(
    tmp_path: Path,
) -> None:
    clock = FakeClock()
    rng = random.Random(11)
    exporter = await Exporter.start(settings_for(tmp_path), clock=clock)
    for i in range(500):
        exporter.record(random_call(rng, clock, i, rid=i % 2 == 0))
    await exporter.flush()
    assert exporter.health().spill_backlog == 0

    # The disk is "full": SQLite may not grow the file by a single page.
    await exporter.writer.limit_pages()
    for i in range(500, 3_000):
        exporter.record(random_call(rng, clock, i, rid=i % 2 == 0))
    await exporter.flush()
    health = exporter.health()
    assert health.degraded
    assert health.spill_backlog == 2_500
    assert health.write_errors >= 1
    assert health.last_error is not None
    assert "full" in health.last_error
    assert (tmp_path / "metrics.db.spill.jsonl").exists()
    durable = asyncio.create_task(exporter.record_durable(ApiCall(model="gpt-4o", request_id="d1")))
    await durable  # acknowledged once fsync'd in the spill file

    await exporter.writer.limit_pages(1_073_741_823)
    exporter.record(ApiCall(model="gpt-4o", request_id="r-after"))
    await exporter.flush()
    health = exporter.health()
    assert not health.degraded
    assert health.spill_backlog == 0
    assert not (tmp_path / "metrics.db.spill.jsonl").exists()
    totals = exporter.aggregator.grand_total()
    await exporter.close()
    count, cost, _ = db_totals(tmp_path / "metrics.db")
    assert count == totals[CALLS] == 3_002
    assert cost == totals[COST]
    with sqlite3.connect(tmp_path / "metrics.db") as c:
        assert c.execute("SELECT count(request_id) FROM api_calls").fetchone()[0] == 1_502
        assert c.execute("SELECT sum(calls) FROM series").fetchone()[0] == 3_002


async def test_spill_left_by_a_crash_is_counted_and_replayed_on_start(tmp_path: Path) -> None:
    clock = FakeClock()
    exporter = await Exporter.start(settings_for(tmp_path), clock=clock)
    exporter.record(ApiCall(model="gpt-4o", input_tokens=1, request_id="stored"))
    await exporter.flush()
    conn = exporter.writer.connection
    await exporter.writer.limit_pages()
    for i in range(3_000):  # enough rows that SQLite must grow the file
        exporter.record(ApiCall(model="claude-haiku-4-5", input_tokens=100, request_id=f"s{i}"))
    exporter.record(CacheHit(model="gpt-4o", savings_usd=1.0))
    await exporter.flush()
    assert exporter.health().spill_backlog == 3_001
    # Simulate a crash: drop the exporter without close(); the spill file stays.
    exporter.writer._closing = True  # stop its loop
    await conn.close()

    exporter = await Exporter.start(settings_for(tmp_path), clock=clock)
    assert exporter.aggregator.grand_total()[CALLS] == 3_001
    assert exporter.health().spill_backlog == 3_001
    await exporter.flush()
    assert exporter.health().spill_backlog == 0
    await exporter.close()
    assert db_totals(tmp_path / "metrics.db")[0] == 3_001
    exporter = await Exporter.start(settings_for(tmp_path), clock=clock)
    assert exporter.aggregator.grand_total()[CALLS] == 3_001
    assert exporter.aggregator.counters[("cache_events", ("hit",))] == 1
    await exporter.close()


async def test_close_loses_nothing(tmp_path: Path) -> None:
    clock = FakeClock()
    rng = random.Random(5)
    settings = settings_for(
        tmp_path, batch_size=1_000_000, flush_interval=3600.0, max_queue=2_000_000
    )
    exporter = await Exporter.start(settings, clock=clock)
    for i in range(20_000):
        exporter.record(random_call(rng, clock, i))
    assert exporter.health().queue_depth == 20_000
    await exporter.close()
    assert db_totals(tmp_path / "metrics.db")[0] == 20_000
    with pytest.raises(RuntimeError, match="closed"):
        exporter.record(ApiCall(model="gpt-4o"))


async def test_a_durable_record_waits_for_its_commit(tmp_path: Path) -> None:
    settings = settings_for(tmp_path, flush_interval=3600.0)
    exporter = await Exporter.start(settings)
    try:
        await exporter.record_durable(ApiCall(model="gpt-4o", input_tokens=3))
        assert db_totals(tmp_path / "metrics.db")[0] == 1
    finally:
        await exporter.close()


async def test_the_batch_size_triggers_a_flush(tmp_path: Path) -> None:
    exporter = await Exporter.start(settings_for(tmp_path, batch_size=10, flush_interval=3600.0))
    try:
        for _ in range(10):
            exporter.record(ApiCall(model="gpt-4o"))
        for _ in range(100):
            await asyncio.sleep(0.01)
            if exporter.health().flushes:
                break
        assert db_totals(tmp_path / "metrics.db")[0] == 10
    finally:
        await exporter.close()


async def test_a_full_queue_pushes_back_instead_of_dropping(tmp_path: Path) -> None:
    settings = settings_for(tmp_path, batch_size=5, max_queue=5, flush_interval=3600.0)
    exporter = await Exporter.start(settings)
    try:
        for _ in range(5):
            exporter.record(ApiCall(model="gpt-4o"))
        with pytest.raises(QueueFull):
            exporter.record(ApiCall(model="gpt-4o"))
        with pytest.raises(QueueFull):
            exporter.record_many([ApiCall(model="gpt-4o")] * 2)
        assert exporter.aggregator.grand_total()[CALLS] == 5
        await exporter.wait_for_room(5)  # the writer drains; room appears
        assert exporter.record_many([ApiCall(model="gpt-4o") for _ in range(3)]) == 3
    finally:
        await exporter.close()
    assert db_totals(tmp_path / "metrics.db")[0] == 8


async def test_a_batch_is_recorded_whole_while_the_loop_runs_between_chunks(
    tmp_path: Path,
) -> None:
    settings = settings_for(tmp_path, batch_size=1_000, max_queue=1_000, flush_interval=3600.0)
    exporter = await Exporter.start(settings)
    seen_mid_batch: list[int] = []

    async def observe() -> None:
        # Runs only when the batch yields: it sees a part of the batch, never a stalled loop.
        await asyncio.sleep(0)
        seen_mid_batch.append(exporter.aggregator.grand_total()[CALLS])

    try:
        events = [ApiCall(model="gpt-4o", request_id=f"r{i}") for i in range(500)]
        events.append(ApiCall(model="gpt-4o", request_id="r0"))  # a repeat: skipped
        observer = asyncio.create_task(observe())
        assert await exporter.record_batch(events, chunk=100) == 500
        await observer
        assert 0 < seen_mid_batch[0] < 500
        with pytest.raises(QueueFull):
            await exporter.record_batch([ApiCall(model="gpt-4o")] * 501)
        assert exporter.aggregator.grand_total()[CALLS] == 500
    finally:
        await exporter.close()
    assert db_totals(tmp_path / "metrics.db")[0] == 500


async def test_purge_drops_old_raw_calls_and_keeps_totals_and_rollups(tmp_path: Path) -> None:
    clock = FakeClock()
    exporter = await Exporter.start(settings_for(tmp_path, retention_days=30), clock=clock)
    day = 86_400_000
    for age_days, rid in ((40, "old"), (31, "older-than-30"), (1, "new")):
        exporter.record(
            ApiCall(
                model="gpt-4o", input_tokens=10, timestamp=clock.ms - age_days * day, request_id=rid
            )
        )
    exporter.record(CacheHit(timestamp=clock.ms - 45 * day))
    await exporter.flush()
    result = await exporter.purge()
    assert (result.api_calls, result.request_ids, result.activity_events) == (2, 2, 1)
    assert result.metrics_aggregated == 0
    assert exporter.aggregator.grand_total()[CALLS] == 3
    await exporter.close()
    with sqlite3.connect(tmp_path / "metrics.db") as conn:
        assert conn.execute("SELECT count(*) FROM api_calls").fetchone()[0] == 1
        assert conn.execute("SELECT sum(calls) FROM metrics_aggregated").fetchone()[0] == 3
        assert conn.execute("SELECT sum(calls) FROM series").fetchone()[0] == 3
    exporter = await Exporter.start(settings_for(tmp_path), clock=clock)
    assert exporter.aggregator.grand_total()[CALLS] == 3
    await exporter.close()


async def test_when_neither_database_nor_spill_file_can_be_written_events_stay_queued(
    tmp_path: Path,
) -> None:
    clock = FakeClock()
    exporter = await Exporter.start(settings_for(tmp_path), clock=clock)
    await exporter.writer.limit_pages()
    # The spill path is a directory: appending to it fails like a full disk would.
    exporter.writer._spill_path = tmp_path / "not-a-file"
    exporter.writer._spill_path.mkdir()
    for i in range(3_000):
        exporter.record(ApiCall(model="gpt-4o", input_tokens=1, request_id=f"k{i}"))
    await exporter.flush()
    assert exporter.health().queue_depth == 3_000
    assert exporter.health().write_errors == 2
    exporter.record(ApiCall(model="gpt-4o", input_tokens=1, request_id="last"))
    await exporter.writer.limit_pages(1_073_741_823)
    await exporter.close()
    assert db_totals(tmp_path / "metrics.db")[0] == 3_001
    with sqlite3.connect(tmp_path / "metrics.db") as c:
        last = c.execute("SELECT max(id) FROM api_calls WHERE request_id = 'last'")
        assert last.fetchone()[0] == 3_001  # order kept: the requeued batch went first
