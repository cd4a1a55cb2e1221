"""Budgets: spend per local day and month, across midnights, month ends, DST and restarts."""

from __future__ import annotations

import datetime as dt
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path
from zoneinfo import ZoneInfo

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from prometheus_client.parser import text_string_to_metric_families

from exporter import ApiCall, CacheHit, Exporter, Settings
from exporter.aggregator import Aggregator
from exporter.budget import (
    ALL_PROJECTS,
    BudgetLine,
    SpendTracker,
    budget_lines,
    configured_budgets,
    resolve_zone,
)
from exporter.pricing import PricingTable
from exporter.settings import ProjectBudget
from exporter.views.prometheus import metrics_registry, render
from exporter.views.shapes import budget_response
from tests.conftest import FakeClock

HOUR_MS = 3_600_000
DAY_MS = 24 * HOUR_MS


def local_s(
    zone: str, year: int, month: int, day: int, hour: int = 0, minute: int = 0, second: int = 0
) -> float:
    """Epoch seconds of a wall-clock time in `zone` (the first one, where a time repeats)."""
    return dt.datetime(year, month, day, hour, minute, second, tzinfo=ZoneInfo(zone)).timestamp()


def local_ms(zone: str, *fields: int) -> int:
    return round(local_s(zone, *fields) * 1000)


def local_date(zone: str, ms: int) -> dt.date:
    return dt.datetime.fromtimestamp(ms // 1000, ZoneInfo(zone)).date()


def usd(nanos: int) -> float:
    return nanos / 1e9


def call(ts_ms: int, cost_usd: float, project: str = "web", **fields: object) -> ApiCall:
    return ApiCall(
        model="claude-haiku-4-5",
        timestamp=ts_ms,
        cost_usd=cost_usd,
        project=project,
        **fields,  # type: ignore[arg-type]
    )


def record(aggregator: Aggregator, event: ApiCall) -> None:
    ts = event.timestamp
    assert isinstance(ts, int)
    aggregator.record_call(event, ts)


def spend_usd(aggregator: Aggregator) -> dict[str, dict[str, float]]:
    """{"day": {project: usd}, "month": {...}} with `__all__`, zero entries left out."""
    snapshot = aggregator.spend.snapshot()
    out: dict[str, dict[str, float]] = {}
    for period, sums in (("day", snapshot.day), ("month", snapshot.month)):
        kept = {p: usd(n) for p, n in sums.items() if n}
        kept[ALL_PROJECTS] = usd(sum(sums.values()))
        out[period] = kept
    return out


@asynccontextmanager
async def running(tmp_path: Path, clock: FakeClock, **overrides: object) -> AsyncIterator[Exporter]:
    options: dict[str, object] = {"db_path": str(tmp_path / "m.db"), **overrides}
    exporter = await Exporter.start(Settings(**options), clock=clock)  # type: ignore[arg-type]
    try:
        yield exporter
    finally:
        await exporter.close()


# -- days and months in a time zone -----------------------------------------------------------


def test_a_call_counts_in_the_local_day_it_was_made_even_when_it_arrives_after_midnight(
    pricing: PricingTable,
) -> None:
    zone = "America/New_York"
    clock = FakeClock(local_s(zone, 2025, 3, 14, 23, 0, 0))
    aggregator = Aggregator(pricing, clock=clock, budget_timezone=zone)
    record(aggregator, call(local_ms(zone, 2025, 3, 14, 22, 0, 0), 1.0))
    record(aggregator, call(local_ms(zone, 2025, 3, 14, 23, 59, 59), 2.0))
    record(aggregator, call(local_ms(zone, 2025, 3, 1, 0, 0, 0), 0.25, project="api"))
    # Stamped on Feb 28 local (04:59:59 UTC on March 1): last month's.
    record(aggregator, call(local_ms(zone, 2025, 2, 28, 23, 59, 59), 100.0))
    assert spend_usd(aggregator) == {
        "day": {"web": 3.0, ALL_PROJECTS: 3.0},
        "month": {"web": 3.0, "api": 0.25, ALL_PROJECTS: 3.25},
    }

    clock.now = local_s(zone, 2025, 3, 15, 0, 0, 1)
    # Made at 23:59:59 yesterday, received a second after midnight: yesterday's.
    record(aggregator, call(local_ms(zone, 2025, 3, 14, 23, 59, 59), 4.0))
    record(aggregator, call(local_ms(zone, 2025, 3, 15, 0, 0, 0), 0.5))
    assert spend_usd(aggregator) == {
        "day": {"web": 0.5, ALL_PROJECTS: 0.5},
        "month": {"web": 7.5, "api": 0.25, ALL_PROJECTS: 7.75},
    }
    snapshot = aggregator.spend.snapshot()
    assert snapshot.timezone == zone
    assert snapshot.day_start_ms == local_ms(zone, 2025, 3, 15, 0, 0, 0)
    assert snapshot.day_end_ms == local_ms(zone, 2025, 3, 16, 0, 0, 0)
    assert snapshot.month_start_ms == local_ms(zone, 2025, 3, 1, 0, 0, 0)
    assert snapshot.month_end_ms == local_ms(zone, 2025, 4, 1, 0, 0, 0)


def test_a_new_month_starts_from_the_calls_already_stamped_in_it(pricing: PricingTable) -> None:
    zone = "Asia/Kolkata"
    clock = FakeClock(local_s(zone, 2025, 1, 31, 23, 50, 0))
    aggregator = Aggregator(pricing, clock=clock, budget_timezone=zone)
    record(aggregator, call(local_ms(zone, 2025, 1, 31, 12, 0, 0), 10.0))
    record(aggregator, call(local_ms(zone, 2025, 1, 2, 9, 0, 0), 1.0, project="api"))
    # A client clock a little ahead: stamped in February before February has come.
    record(aggregator, call(local_ms(zone, 2025, 2, 1, 0, 2, 0), 0.75))
    assert spend_usd(aggregator) == {
        "day": {"web": 10.0, ALL_PROJECTS: 10.0},
        "month": {"web": 10.0, "api": 1.0, ALL_PROJECTS: 11.0},
    }

    clock.now = local_s(zone, 2025, 2, 1, 0, 10, 0)
    assert spend_usd(aggregator) == {
        "day": {"web": 0.75, ALL_PROJECTS: 0.75},
        "month": {"web": 0.75, ALL_PROJECTS: 0.75},
    }
    record(aggregator, call(local_ms(zone, 2025, 1, 31, 23, 59, 59), 5.0))  # late: January's
    record(aggregator, call(local_ms(zone, 2025, 2, 1, 0, 9, 0), 0.25, project="api"))
    assert spend_usd(aggregator) == {
        "day": {"web": 0.75, "api": 0.25, ALL_PROJECTS: 1.0},
        "month": {"web": 0.75, "api": 0.25, ALL_PROJECTS: 1.0},
    }
    snapshot = aggregator.spend.snapshot()
    # Kolkata is UTC+05:30 all year: its month starts at 18:30 UTC the day before.
    assert snapshot.month_start_ms == local_ms("UTC", 2025, 1, 31, 18, 30, 0)
    assert snapshot.month_end_ms == local_ms("UTC", 2025, 2, 28, 18, 30, 0)


@pytest.mark.parametrize(
    ("zone", "day", "hours"),
    [
        ("America/New_York", (2025, 3, 9), 23),
        ("America/New_York", (2025, 11, 2), 25),
        ("Europe/Berlin", (2025, 3, 30), 23),
        ("Europe/Berlin", (2025, 10, 26), 25),
        # Cuba moves its clocks at midnight: 00:00 does not exist on this day.
        ("America/Havana", (2025, 3, 9), 23),
    ],
)
def test_a_dst_change_day_is_23_or_25_hours_long(
    pricing: PricingTable, zone: str, day: tuple[int, int, int], hours: int
) -> None:
    noon = local_s(zone, *day, 12, 0, 0)
    clock = FakeClock(noon)
    aggregator = Aggregator(pricing, clock=clock, budget_timezone=zone)
    snapshot = aggregator.spend.snapshot()
    start, end = snapshot.day_start_ms, snapshot.day_end_ms
    assert end - start == hours * HOUR_MS
    one_day = dt.timedelta(days=1)
    assert local_date(zone, start) == dt.date(*day)
    assert local_date(zone, start - 1) == dt.date(*day) - one_day
    assert local_date(zone, end) == dt.date(*day) + one_day
    # The first and the last second of the long or short day are both in it; a second
    # either side is not.
    for ts, cost in ((start, 1.0), (end - 1000, 2.0), (start - 1000, 40.0), (end, 80.0)):
        record(aggregator, call(ts, cost))
    assert spend_usd(aggregator)["day"] == {"web": 3.0, ALL_PROJECTS: 3.0}


@settings(max_examples=200, deadline=None)
@given(
    zone=st.sampled_from(
        ["America/New_York", "Europe/Berlin", "Australia/Lord_Howe", "America/Havana", "UTC"]
    ),
    seconds=st.integers(1_500_000_000, 1_900_000_000),
)
def test_day_bounds_are_the_local_midnights_either_side(zone: str, seconds: int) -> None:
    tracker = SpendTracker(zone, clock=lambda: float(seconds))
    snapshot = tracker.snapshot()
    today = local_date(zone, seconds * 1000)
    one_day = dt.timedelta(days=1)
    assert local_date(zone, snapshot.day_start_ms) == today
    assert local_date(zone, snapshot.day_start_ms - 1) == today - one_day
    assert local_date(zone, snapshot.day_end_ms - 1) == today
    assert local_date(zone, snapshot.day_end_ms) == today + one_day
    assert local_date(zone, snapshot.month_start_ms) == today.replace(day=1)
    assert local_date(zone, snapshot.month_start_ms - 1).month != today.month
    assert local_date(zone, snapshot.month_end_ms - 1).month == today.month
    assert local_date(zone, snapshot.month_end_ms).day == 1


# -- the aggregator's other ways in -------------------------------------------------------------


def test_retracted_and_restored_calls_adjust_spend_but_cache_savings_do_not(
    pricing: PricingTable,
) -> None:
    zone = "Europe/Berlin"
    clock = FakeClock(local_s(zone, 2025, 6, 10, 15, 0, 0))
    aggregator = Aggregator(pricing, clock=clock, budget_timezone=zone)
    kept = aggregator.record_call(call(0, 1.5), local_ms(zone, 2025, 6, 10, 14, 0, 0))
    taken_back = aggregator.record_call(call(0, 2.0), local_ms(zone, 2025, 6, 10, 14, 1, 0))
    earlier = aggregator.record_call(call(0, 4.0), local_ms(zone, 2025, 6, 2, 9, 0, 0))
    aggregator.retract_call(taken_back)
    aggregator.retract_call(earlier)
    aggregator.restore_call(kept)  # as from a spill file
    aggregator.record_other(CacheHit(model="gpt-4o", savings_usd=9.0), clock.ms)
    assert spend_usd(aggregator) == {
        "day": {"web": 3.0, ALL_PROJECTS: 3.0},
        "month": {"web": 3.0, ALL_PROJECTS: 3.0},
    }


async def test_a_repeated_request_id_found_in_sqlite_takes_its_spend_back(tmp_path: Path) -> None:
    zone = "Asia/Kolkata"
    clock = FakeClock(local_s(zone, 2025, 5, 5, 10, 0, 0))
    # Remember one id in memory, so the repeat is only caught by the store.
    async with running(tmp_path, clock, dedup_memory=1, budget_timezone=zone) as exporter:
        exporter.record(call(clock.ms - 60_000, 1.25, request_id="a"))
        exporter.record(call(clock.ms - 30_000, 0.5, request_id="b"))
        await exporter.flush()
        assert exporter.record(call(clock.ms - 60_000, 1.25, request_id="a"))
        assert spend_usd(exporter.aggregator)["day"][ALL_PROJECTS] == 3.0
        await exporter.flush()
        assert exporter.aggregator.duplicates == 1
        assert spend_usd(exporter.aggregator)["day"] == {"web": 1.75, ALL_PROJECTS: 1.75}


# -- restarts -------------------------------------------------------------------------------------


def stored_calls(zone: str) -> list[ApiCall]:
    """Calls around 2025-03-31 18:00 local: today, yesterday, this month, last month, tomorrow,
    and days ahead (a client clock far off)."""
    return [
        call(local_ms(zone, 2025, 3, 31, 0, 0, 0), 1.0),
        call(local_ms(zone, 2025, 3, 31, 17, 59, 59), 2.0, project="api"),
        call(local_ms(zone, 2025, 3, 31, 23, 59, 59), 0.125),
        call(local_ms(zone, 2025, 3, 30, 23, 59, 59), 4.0),
        call(local_ms(zone, 2025, 3, 1, 0, 0, 0), 8.0, project="api"),
        call(local_ms(zone, 2025, 2, 28, 23, 59, 59), 16.0),
        call(local_ms(zone, 2025, 4, 1, 0, 0, 0), 32.0),
        call(local_ms(zone, 2025, 4, 3, 12, 0, 0), 64.0),
    ]


@pytest.mark.parametrize("zone", ["America/New_York", "Asia/Kolkata", "Asia/Kathmandu"])
async def test_a_restart_restores_the_same_spend_from_the_rollups(
    tmp_path: Path, zone: str
) -> None:
    clock = FakeClock(local_s(zone, 2025, 3, 31, 18, 0, 0))
    async with running(tmp_path, clock, budget_timezone=zone) as exporter:
        for event in stored_calls(zone):
            exporter.record(event)
        before = spend_usd(exporter.aggregator)
    assert before == {
        "day": {"web": 1.125, "api": 2.0, ALL_PROJECTS: 3.125},
        "month": {"web": 5.125, "api": 10.0, ALL_PROJECTS: 15.125},
    }
    async with running(tmp_path, clock, budget_timezone=zone) as exporter:
        assert spend_usd(exporter.aggregator) == before
        exporter.record(call(clock.ms, 0.5, project="api"))
        during = spend_usd(exporter.aggregator)

    # Restarted after midnight on the first of the month: April holds only what is stamped in it.
    # April 3 is read back too, though it was days ahead when stored.
    clock.now = local_s(zone, 2025, 4, 1, 0, 30, 0)
    async with running(tmp_path, clock, budget_timezone=zone) as exporter:
        assert spend_usd(exporter.aggregator) == {
            "day": {"web": 32.0, ALL_PROJECTS: 32.0},
            "month": {"web": 96.0, ALL_PROJECTS: 96.0},
        }
    assert during["month"][ALL_PROJECTS] == 15.625


async def test_spend_survives_a_crash_through_the_spill_file(tmp_path: Path) -> None:
    zone = "America/New_York"
    clock = FakeClock(local_s(zone, 2025, 7, 4, 12, 0, 0))
    exporter = await Exporter.start(
        Settings(db_path=str(tmp_path / "m.db"), budget_timezone=zone), clock=clock
    )
    exporter.record(call(clock.ms, 1.0, request_id="stored"))
    await exporter.flush()
    conn = exporter.writer.connection
    # The disk is "full": the next flush goes to the spill file.
    await exporter.writer.limit_pages()
    for i in range(3_000):
        exporter.record(call(clock.ms - i, 0.001, project="api", request_id=f"s{i}"))
    await exporter.flush()
    assert exporter.health().spill_backlog == 3_000
    before = spend_usd(exporter.aggregator)
    exporter.writer._closing = True  # a crash: no close(), the spill file stays
    await conn.close()

    exporter = await Exporter.start(
        Settings(db_path=str(tmp_path / "m.db"), budget_timezone=zone), clock=clock
    )
    try:
        assert spend_usd(exporter.aggregator) == before
        assert before["day"] == {"web": 1.0, "api": 3.0, ALL_PROJECTS: 4.0}
        await exporter.flush()
        assert exporter.health().spill_backlog == 0
        assert spend_usd(exporter.aggregator) == before
    finally:
        await exporter.close()


# -- budgets --------------------------------------------------------------------------------------


def test_only_the_budgets_that_are_set_appear() -> None:
    settings_ = Settings(
        budget_daily_usd=10,
        project_budgets={
            "web": ProjectBudget(daily_usd=5),
            "api": ProjectBudget(monthly_usd=100.5),
            "idle": ProjectBudget(),
        },
    )
    assert configured_budgets(settings_) == {
        ALL_PROJECTS: {"day": 10_000_000_000},
        "web": {"day": 5_000_000_000},
        "api": {"month": 100_500_000_000},
    }
    assert configured_budgets(Settings()) == {}


def test_budget_lines_and_the_rest_answer(pricing: PricingTable) -> None:
    zone = "Europe/Berlin"
    clock = FakeClock(local_s(zone, 2025, 6, 11, 6, 0, 0))  # a quarter into the day
    aggregator = Aggregator(pricing, clock=clock, budget_timezone=zone)
    record(aggregator, call(local_ms(zone, 2025, 6, 11, 1, 0, 0), 3.2))
    record(aggregator, call(local_ms(zone, 2025, 6, 11, 2, 0, 0), 1.0, project="api"))
    record(aggregator, call(local_ms(zone, 2025, 6, 1, 2, 0, 0), 12.0, project="api"))
    record(aggregator, call(local_ms(zone, 2025, 6, 11, 3, 0, 0), 7.0, project="other"))
    budgets = configured_budgets(
        Settings(
            budget_monthly_usd=50,
            project_budgets={"web": ProjectBudget(daily_usd=10), "api": ProjectBudget(daily_usd=1)},
        )
    )
    snapshot = aggregator.spend.snapshot()
    assert budget_lines(snapshot, budgets) == [
        BudgetLine(ALL_PROJECTS, "day", None, 11_200_000_000),
        BudgetLine(ALL_PROJECTS, "month", 50_000_000_000, 23_200_000_000),
        BudgetLine("api", "day", 1_000_000_000, 1_000_000_000),
        BudgetLine("api", "month", None, 13_000_000_000),
        BudgetLine("web", "day", 10_000_000_000, 3_200_000_000),
        BudgetLine("web", "month", None, 3_200_000_000),
    ]

    answer = budget_response(snapshot, budgets)
    assert answer.timezone == zone
    assert answer.day.start == "2025-06-11T00:00:00+02:00"
    assert answer.day.end == "2025-06-12T00:00:00+02:00"
    assert answer.month.start == "2025-06-01T00:00:00+02:00"
    assert answer.month.end == "2025-07-01T00:00:00+02:00"
    web_day = answer.budgets[4]
    assert (web_day.project, web_day.period) == ("web", "day")
    assert web_day.budget_usd == 10.0
    assert web_day.spend_usd == 3.2
    assert web_day.remaining_usd == 6.8
    assert web_day.used_percent == 32.0
    # 3.2 dollars in the first 6 of 24 hours.
    assert web_day.projected_usd == 12.8
    overall_day = answer.budgets[0]
    assert (overall_day.budget_usd, overall_day.remaining_usd, overall_day.used_percent) == (
        None,
        None,
        None,
    )
    assert overall_day.spend_usd == 11.2
    overall_month = answer.budgets[1]
    assert overall_month.remaining_usd == 26.8
    # 23.2 dollars in 10.25 of 30 days.
    assert overall_month.projected_usd == pytest.approx(23.2 * 30 / 10.25, abs=1e-9)
    assert answer.budgets[2].remaining_usd == 0.0


async def test_metrics_show_budget_spend_and_remaining_gauges(tmp_path: Path) -> None:
    zone = "America/New_York"
    clock = FakeClock(local_s(zone, 2025, 3, 31, 18, 0, 0))
    async with running(
        tmp_path,
        clock,
        budget_timezone=zone,
        budget_daily_usd=3.0,
        project_budgets={"web": ProjectBudget(daily_usd=1.0, monthly_usd=20.0)},
    ) as exporter:
        for event in stored_calls(zone):
            exporter.record(event)
        body, _ = render(metrics_registry(exporter), None)
    families = {f.name: f for f in text_string_to_metric_families(body.decode())}
    values = {
        (name, s.labels["period"], s.labels["project"]): s.value
        for name in ("cco_budget_usd", "cco_llm_spend_usd", "cco_budget_remaining_usd")
        for s in families[name].samples
    }
    assert families["cco_llm_spend_usd"].type == "gauge"
    assert values == {
        ("cco_budget_usd", "day", ALL_PROJECTS): 3.0,
        ("cco_budget_usd", "day", "web"): 1.0,
        ("cco_budget_usd", "month", "web"): 20.0,
        ("cco_llm_spend_usd", "day", ALL_PROJECTS): 3.125,
        ("cco_llm_spend_usd", "month", ALL_PROJECTS): 15.125,
        ("cco_llm_spend_usd", "day", "web"): 1.125,
        ("cco_llm_spend_usd", "month", "web"): 5.125,
        ("cco_budget_remaining_usd", "day", ALL_PROJECTS): -0.125,
        ("cco_budget_remaining_usd", "day", "web"): -0.125,
        ("cco_budget_remaining_usd", "month", "web"): 14.875,
    }


async def test_metrics_show_the_local_period_bounds_without_any_budget(tmp_path: Path) -> None:
    zone = "America/New_York"
    # The day clocks spring forward: it is 23 hours long, and March ends in daylight time.
    clock = FakeClock(local_s(zone, 2025, 3, 9, 12, 0, 0))

    def bounds(body: bytes) -> dict[tuple[str, str], float]:
        families = {f.name: f for f in text_string_to_metric_families(body.decode())}
        found: dict[tuple[str, str], float] = {}
        for bound in ("start", "end"):
            family = families[f"cco_budget_period_{bound}_timestamp_seconds"]
            assert family.type == "gauge"
            found.update({(bound, s.labels["period"]): s.value for s in family.samples})
        return found

    async with running(tmp_path, clock, budget_timezone=zone) as exporter:
        registry = metrics_registry(exporter)
        before = bounds(render(registry, None)[0])
        # Past local midnight of March 31st, both periods have turned over.
        clock.now = local_s(zone, 2025, 4, 1, 0, 30, 0)
        after = bounds(render(registry, None)[0])
    assert before == {
        ("start", "day"): local_s(zone, 2025, 3, 9),
        ("end", "day"): local_s(zone, 2025, 3, 10),
        ("start", "month"): local_s(zone, 2025, 3, 1),
        ("end", "month"): local_s(zone, 2025, 4, 1),
    }
    assert before["end", "day"] - before["start", "day"] == 23 * 3600
    # 04:00 UTC (midnight EDT), not the 00:00 UTC that PromQL's date functions would assume.
    assert before["end", "month"] == dt.datetime(2025, 4, 1, 4, tzinfo=dt.UTC).timestamp()
    assert after == {
        ("start", "day"): local_s(zone, 2025, 4, 1),
        ("end", "day"): local_s(zone, 2025, 4, 2),
        ("start", "month"): local_s(zone, 2025, 4, 1),
        ("end", "month"): local_s(zone, 2025, 5, 1),
    }


async def test_budget_projects_fold_like_other_labels_and_all_does_not(tmp_path: Path) -> None:
    clock = FakeClock(local_s("UTC", 2025, 8, 8, 8, 0, 0))
    async with running(
        tmp_path,
        clock,
        budget_timezone="UTC",
        max_projects=1,
        project_budgets={"a": ProjectBudget(daily_usd=1.0), "b": ProjectBudget(daily_usd=2.0)},
    ) as exporter:
        exporter.record(call(clock.ms, 0.5, project="a"))
        exporter.record(call(clock.ms, 0.25, project="b"))
        families = {
            f.name: f
            for f in text_string_to_metric_families(
                render(metrics_registry(exporter), None)[0].decode()
            )
        }
    budget = {
        (s.labels["period"], s.labels["project"]): s.value
        for s in families["cco_budget_usd"].samples
    }
    spend = {
        (s.labels["period"], s.labels["project"]): s.value
        for s in families["cco_llm_spend_usd"].samples
    }
    assert budget == {("day", "a"): 1.0, ("day", "__other__"): 2.0}
    assert spend[("day", ALL_PROJECTS)] == 0.75
    assert spend[("day", "a")] == 0.5
    assert spend[("day", "__other__")] == 0.25


# -- the zone -------------------------------------------------------------------------------------


def test_the_machine_zone_is_found_by_name(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("TZ", "Asia/Kathmandu")
    name, zone = resolve_zone("")
    assert name == "Asia/Kathmandu"
    assert zone.utcoffset(dt.datetime(2025, 1, 1)) == dt.timedelta(hours=5, minutes=45)
    # A POSIX rule is not a zone name: the next guess (/etc/localtime) answers instead.
    monkeypatch.setenv("TZ", "CET-1CEST")
    name, zone = resolve_zone("")
    assert name != "CET-1CEST"
    assert zone.utcoffset(dt.datetime(2025, 1, 1)) is not None


def test_an_unknown_zone_is_refused() -> None:
    with pytest.raises(ValueError, match="unknown time zone 'Mars/Olympus'"):
        resolve_zone("Mars/Olympus")


# -- against a plain recomputation -------------------------------------------------------------

ZONES = ["America/New_York", "Asia/Kolkata", "Europe/Berlin", "Australia/Lord_Howe", "UTC"]
step_strategy = st.tuples(
    st.integers(0, 10 * DAY_MS // 1000),  # seconds the clock moves first
    st.lists(
        st.tuples(
            st.integers(-40 * DAY_MS, 5 * 60_000),  # timestamp relative to now, ms
            st.sampled_from(["web", "api", "cli"]),
            st.integers(0, 5_000_000_000),  # nano-USD
            st.booleans(),  # taken back later as a duplicate
        ),
        max_size=20,
    ),
)


@settings(
    max_examples=80, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(
    zone=st.sampled_from(ZONES),
    start=st.integers(1_700_000_000, 1_760_000_000),
    steps=st.lists(step_strategy, min_size=1, max_size=8),
)
def test_spend_equals_a_plain_recomputation_over_the_events(
    pricing: PricingTable,
    zone: str,
    start: int,
    steps: list,  # type: ignore[type-arg]
) -> None:
    clock = FakeClock(float(start))
    aggregator = Aggregator(pricing, clock=clock, budget_timezone=zone)
    kept: list[tuple[int, str, int]] = []
    for advance, events in steps:
        clock.advance(advance)
        for offset, project, nanos, retract in events:
            ts = clock.ms + offset
            row = aggregator.record_call(call(0, nanos / 1e9, project), ts)
            if retract:
                aggregator.retract_call(row)
            else:
                kept.append((ts, project, row[9]))
    today = local_date(zone, clock.ms)
    day: dict[str, int] = {}
    month: dict[str, int] = {}
    for ts, project, nanos in kept:
        date = local_date(zone, ts)
        if date == today:
            day[project] = day.get(project, 0) + nanos
        if (date.year, date.month) == (today.year, today.month):
            month[project] = month.get(project, 0) + nanos
    snapshot = aggregator.spend.snapshot()
    assert {p: n for p, n in snapshot.day.items() if n} == {p: n for p, n in day.items() if n}
    assert {p: n for p, n in snapshot.month.items() if n} == {p: n for p, n in month.items() if n}
