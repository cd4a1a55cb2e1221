"""Budgets: spend so far in the current local day and month, per project, against the settings.

Spend is counted by event timestamp in the budget time zone, in integer nano-USD, per local day
and project. The month is the sum of its days, so a call that arrives late (stamped 23:59:59,
received after midnight) still lands in the day it was made, and a new period starts from what is
already recorded in it. Days before the current month (and before yesterday, kept for late
calls) are dropped at each rollover, so memory is bounded by ~32 days x projects.

`SpendTracker.add` is on the per-call path: the current day's [start, end) and its sums are
cached, so a call made today costs two comparisons and a dict add; only a call stamped on another
day asks zoneinfo which local day it belongs to.
"""

from __future__ import annotations

import datetime as dt
import logging
import os
import time
from collections.abc import Callable, Iterator
from typing import Final, Literal
from zoneinfo import ZoneInfo

import msgspec

from exporter.pricing import usd_to_nanos
from exporter.settings import Settings

__all__ = [
    "ALL_PROJECTS",
    "PERIODS",
    "BudgetLine",
    "Period",
    "SpendSnapshot",
    "SpendTracker",
    "budget_lines",
    "configured_budgets",
    "projected_nanos",
    "resolve_zone",
]

log = logging.getLogger(__name__)

#: The `project` of budgets and spend over every project.
ALL_PROJECTS: Final = "__all__"
Period = Literal["day", "month"]
PERIODS: Final[tuple[Period, ...]] = ("day", "month")

_ONE_DAY: Final = dt.timedelta(days=1)
_MIDNIGHT: Final = dt.time()
#: Projections divide by the time elapsed in the period; this floor keeps the first seconds of a
#: day from projecting a single call into an absurd figure.
_MIN_ELAPSED_MS: Final = 60_000


def resolve_zone(name: str) -> tuple[str, dt.tzinfo]:
    """(display name, tzinfo) of the budget time zone; an empty name means this machine's zone.

    The machine's zone is found as an IANA name (from `TZ`, else the `/etc/localtime` link) so
    that DST rules apply; else from the `/etc/localtime` file; else UTC, with a warning. Raises
    ValueError for an unknown name (settings check names before this is called).
    """
    if name:
        try:
            return name, ZoneInfo(name)
        except (KeyError, ValueError, OSError):
            raise ValueError(f"unknown time zone {name!r}") from None
    for key in _local_zone_keys():
        try:
            return key, ZoneInfo(key)
        except (KeyError, ValueError, OSError):
            continue
    try:
        with open("/etc/localtime", "rb") as tzif:
            return "localtime", ZoneInfo.from_file(tzif, key="localtime")
    except (OSError, ValueError):
        pass
    log.warning("cannot tell this machine's time zone: budgets use UTC (set budget_timezone)")
    return "UTC", dt.UTC


def _local_zone_keys() -> Iterator[str]:
    # TZ may be a POSIX rule ("CET-1CEST") rather than a key; ZoneInfo refuses those, and the
    # caller moves on to the next guess.
    tz = os.environ.get("TZ", "").removeprefix(":")
    if tz:
        yield tz
    try:
        target = os.readlink("/etc/localtime")
    except OSError:
        return
    _, found, key = target.rpartition("zoneinfo/")
    if found and key:
        yield key


class SpendSnapshot(msgspec.Struct, frozen=True, kw_only=True):
    """Spend per project (nano-USD) in the current day and month as of `now_ms`, with the
    periods' bounds (epoch ms, end exclusive) in the budget time zone."""

    timezone: str
    zone: dt.tzinfo
    now_ms: int
    day_start_ms: int
    day_end_ms: int
    month_start_ms: int
    month_end_ms: int
    day: dict[str, int]
    month: dict[str, int]

    def bounds(self, period: Period) -> tuple[int, int]:
        if period == "day":
            return self.day_start_ms, self.day_end_ms
        return self.month_start_ms, self.month_end_ms

    def spend(self, period: Period) -> dict[str, int]:
        return self.day if period == "day" else self.month

    def local_iso(self, ms: int) -> str:
        """Epoch ms as RFC 3339 in the budget time zone (`2026-03-29T00:00:00+01:00`)."""
        return dt.datetime.fromtimestamp(ms // 1000, self.zone).isoformat()


class SpendTracker:
    """Nano-USD of calls per local day and project, for the current month and yesterday."""

    __slots__ = (
        "_clock",
        "_days",
        "_floor_ms",
        "_month",
        "day_end_ms",
        "day_start_ms",
        "timezone",
        "today",
        "zone",
    )

    def __init__(self, timezone: str = "", *, clock: Callable[[], float] = time.time) -> None:
        self.timezone, self.zone = resolve_zone(timezone)
        self._clock = clock
        #: Local day -> project -> nano-USD; `today` is the entry of the cached day.
        self._days: dict[dt.date, dict[str, int]] = {}
        self._month = (dt.date.min, dt.date.min)
        #: Start of the oldest day kept: calls before it count in no period that is reported.
        self._floor_ms = 0
        self.day_start_ms = self.day_end_ms = 0
        self.today: dict[str, int] = {}
        self._roll(self._now_ms())

    def days_kept(self) -> list[tuple[int, int]]:
        """[start, end) in epoch ms of each local day from the oldest one kept through
        tomorrow: the days whose stored spend a restart reads back."""
        ranges = []
        day = self._local_date(self._floor_ms)
        last = self._local_date(self.day_start_ms) + _ONE_DAY
        start = self._floor_ms
        while day <= last:
            day += _ONE_DAY
            end = self._start_ms(day)
            ranges.append((start, end))
            start = end
        return ranges

    def add(self, ts_ms: int, project: str, nanos: int) -> None:
        """Count `nanos` of spend at `ts_ms` (negative takes a call back)."""
        if self.day_start_ms <= ts_ms < self.day_end_ms:
            today = self.today
            today[project] = today.get(project, 0) + nanos
        else:
            self.add_other_day(ts_ms, project, nanos)

    def add_other_day(self, ts_ms: int, project: str, nanos: int) -> None:
        """`add` for a timestamp outside the cached day (the aggregator inlines the other case).

        The clock may have crossed midnight since the cache was set: move it first, so the
        first call of a new day makes that day the fast one.
        """
        now_ms = self._now_ms()
        if not self.day_start_ms <= now_ms < self.day_end_ms:
            self._roll(now_ms)
            if self.day_start_ms <= ts_ms < self.day_end_ms:
                self.today[project] = self.today.get(project, 0) + nanos
                return
        if ts_ms < self._floor_ms:
            return
        sums = self._days.setdefault(self._local_date(ts_ms), {})
        sums[project] = sums.get(project, 0) + nanos

    def snapshot(self) -> SpendSnapshot:
        """Spend in the current day and month (by the clock) per project, with their bounds."""
        now_ms = self._now_ms()
        if not self.day_start_ms <= now_ms < self.day_end_ms:
            self._roll(now_ms)
        first, after = self._month
        month: dict[str, int] = {}
        for day, sums in self._days.items():
            if first <= day < after:
                for project, nanos in sums.items():
                    month[project] = month.get(project, 0) + nanos
        return SpendSnapshot(
            timezone=self.timezone,
            zone=self.zone,
            now_ms=now_ms,
            day_start_ms=self.day_start_ms,
            day_end_ms=self.day_end_ms,
            month_start_ms=self._start_ms(first),
            month_end_ms=self._start_ms(after),
            day=dict(self.today),
            month=month,
        )

    def _roll(self, now_ms: int) -> None:
        """Make the clock's local day the cached one and drop days no period needs any more."""
        day = self._local_date(now_ms)
        self.day_start_ms = self._start_ms(day)
        self.day_end_ms = self._start_ms(day + _ONE_DAY)
        self.today = self._days.setdefault(day, {})
        first = day.replace(day=1)
        after = (first + dt.timedelta(days=31)).replace(day=1)
        self._month = (first, after)
        keep_from = min(first, day - _ONE_DAY)
        self._floor_ms = self._start_ms(keep_from)
        for old in [d for d in self._days if d < keep_from]:
            del self._days[old]

    def _local_date(self, ts_ms: int) -> dt.date:
        # Whole seconds are exact: every zone's midnights fall on whole seconds.
        return dt.datetime.fromtimestamp(ts_ms // 1000, self.zone).date()

    def _start_ms(self, day: dt.date) -> int:
        # fold=0 resolves a midnight that DST skips to the instant of the jump (the day's real
        # start) and a midnight that occurs twice to its first occurrence.
        return round(dt.datetime.combine(day, _MIDNIGHT, tzinfo=self.zone).timestamp() * 1000)

    def _now_ms(self) -> int:
        return int(self._clock() * 1000)


class BudgetLine(msgspec.Struct, frozen=True):
    """One (project, period): its budget in nano-USD (None when none is set) and spend so far."""

    project: str
    period: Period
    budget_nanos: int | None
    spend_nanos: int

    @property
    def remaining_nanos(self) -> int | None:
        """Budget minus spend; negative once the budget is exceeded."""
        return None if self.budget_nanos is None else self.budget_nanos - self.spend_nanos


def configured_budgets(settings: Settings) -> dict[str, dict[Period, int]]:
    """The budgets that are set (non-zero), in nano-USD, by project (`ALL_PROJECTS` for the
    overall ones) and period."""
    budgets: dict[str, dict[Period, int]] = {}
    overall = _set_budgets(settings.budget_daily_usd, settings.budget_monthly_usd)
    if overall:
        budgets[ALL_PROJECTS] = overall
    for project, budget in settings.project_budgets.items():
        amounts = _set_budgets(budget.daily_usd, budget.monthly_usd)
        if amounts:
            budgets[project] = amounts
    return budgets


def _set_budgets(daily_usd: float, monthly_usd: float) -> dict[Period, int]:
    amounts: dict[Period, int] = {}
    if daily_usd > 0:
        amounts["day"] = usd_to_nanos(daily_usd)
    if monthly_usd > 0:
        amounts["month"] = usd_to_nanos(monthly_usd)
    return amounts


def budget_lines(
    snapshot: SpendSnapshot, budgets: dict[str, dict[Period, int]]
) -> list[BudgetLine]:
    """`ALL_PROJECTS` for both periods, budget or not, then each project with any budget set,
    both periods (a period without a budget has `budget_nanos` None), projects in name order."""
    lines: list[BudgetLine] = []
    projects = [ALL_PROJECTS, *sorted(p for p in budgets if p != ALL_PROJECTS)]
    for project in projects:
        amounts = budgets.get(project, {})
        for period in PERIODS:
            spend = snapshot.spend(period)
            nanos = sum(spend.values()) if project == ALL_PROJECTS else spend.get(project, 0)
            lines.append(BudgetLine(project, period, amounts.get(period), nanos))
    return lines


def projected_nanos(line: BudgetLine, snapshot: SpendSnapshot) -> int:
    """Spend at the period's end if it goes on at the average rate so far (linear)."""
    start, end = snapshot.bounds(line.period)
    elapsed = max(snapshot.now_ms - start, _MIN_ELAPSED_MS)
    return line.spend_nanos * (end - start) // elapsed
