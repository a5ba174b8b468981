"""The drill scheduler: DST-safe fire times, and the real `dr scheduler run` daemon (APScheduler with
its job store in the evidence database): drills run on time with their evidence, restarts lose and
double nothing, two nodes on one PostgreSQL database run each fire time once, a drill interrupted by
a crash is closed as interrupted, and SQLite allows one scheduler only."""

from __future__ import annotations

import pickle
from datetime import UTC, datetime, timedelta
from pathlib import Path
from zoneinfo import ZoneInfo

import pytest

from dr_orchestrator.model.drill import Schedule
from dr_orchestrator.scheduling.triggers import WallClockCronTrigger, fire_times_between, next_fire_times

REPO = Path(__file__).resolve().parent.parent
DRILL_DATA = REPO / "tests" / "data" / "drills"
LOCAL_INVENTORY = REPO / "inventories" / "local.yml"


# ---------------------------------------------------------------- fire times across DST changes


def scheduler_ticks(trigger: WallClockCronTrigger, start: datetime, end: datetime, tick: timedelta) -> list[datetime]:
    """What APScheduler fires when its clock passes from ``start`` to ``end``: Job._get_run_times
    (``while next <= now: fire; next = trigger.get_next_fire_time(next, now)``) at every tick."""
    fired: list[datetime] = []
    next_time = trigger.get_next_fire_time(None, start)
    now = start
    while now <= end:
        guard = 0
        while next_time is not None and next_time <= now:
            fired.append(next_time)
            next_time = trigger.get_next_fire_time(next_time, now)
            guard += 1
            assert guard < 100, "the trigger keeps answering times in the past"
        now += tick
    return fired


@pytest.mark.parametrize(("zone", "cron", "start", "change_day"), [
    # clocks go back: 01:30 happens twice; once only
    ("America/New_York", "30 1 * * *", datetime(2026, 10, 30, tzinfo=UTC), "2026-11-01"),
    ("Europe/London", "30 1 * * *", datetime(2026, 10, 23, tzinfo=UTC), "2026-10-25"),
    # clocks go forward: 02:30 does not happen; it runs when the clock jumps past it (03:30 local)
    ("America/New_York", "30 2 * * *", datetime(2026, 3, 6, tzinfo=UTC), "2026-03-08"),
    ("Europe/London", "30 1 * * *", datetime(2026, 3, 27, tzinfo=UTC), "2026-03-29"),
])
def test_a_daily_drill_runs_once_a_day_across_a_dst_change(zone: str, cron: str, start: datetime,
                                                           change_day: str) -> None:
    schedule = Schedule(cron=cron, timezone=zone)
    trigger = WallClockCronTrigger(cron, zone)
    times = fire_times_between(schedule, start, start + timedelta(days=5))
    days = [t.astimezone(ZoneInfo(zone)).date().isoformat() for t in times]
    assert days == sorted(set(days)) and len(days) == 5 and change_day in days  # one a day, none skipped
    assert all(b - a >= timedelta(hours=23) for a, b in zip(times, times[1:], strict=False))
    # the scheduler's own loop, its clock passing the change minute by minute, fires the same times
    ticked = scheduler_ticks(trigger, start, start + timedelta(days=5), timedelta(minutes=1))
    assert ticked[: len(times)] == times


def test_frequent_schedules_move_forward_through_the_repeated_hour() -> None:
    zone = ZoneInfo("America/New_York")
    trigger = WallClockCronTrigger("*/30 * * * *", "America/New_York")
    start = datetime(2026, 11, 1, 4, 0, tzinfo=UTC)  # 00:00 EDT; five real hours later it is 04:00 EST
    fired = scheduler_ticks(trigger, start, start + timedelta(hours=5), timedelta(minutes=1))
    assert fired == sorted(set(fired))  # never back in time, never twice
    walls = [t.astimezone(zone).strftime("%H:%M") for t in fired]
    # each wall-clock time once: the repeated 01:00-02:00 (EST) is not run a second time
    assert walls == ["00:00", "00:30", "01:00", "01:30", "02:00", "02:30", "03:00", "03:30", "04:00"]


def test_asking_during_the_repeated_hour_gives_the_next_wall_clock_time_not_a_past_one() -> None:
    trigger = WallClockCronTrigger("30 1 * * *", "America/New_York")
    second_pass = datetime(2026, 11, 1, 6, 15, tzinfo=UTC)  # 01:15 EST, after 01:30 EDT has passed
    assert trigger.get_next_fire_time(None, second_pass) == datetime(2026, 11, 2, 6, 30, tzinfo=UTC)


def test_quarterly_schedule_in_shanghai_and_crontab_weekdays() -> None:
    now = datetime(2026, 11, 28, 3, 0, tzinfo=UTC)
    quarterly = next_fire_times(Schedule(cron="0 2 1 1,4,7,10 *", timezone="Asia/Shanghai"), 3, now)
    assert [t.isoformat() for t in quarterly] == [
        "2027-01-01T02:00:00+08:00", "2027-04-01T02:00:00+08:00", "2027-07-01T02:00:00+08:00"]
    # crontab's 1 is Monday (APScheduler's from_crontab would make it Tuesday)
    mondays = next_fire_times(Schedule(cron="0 9 * * 1", timezone="UTC"), 2, now)
    assert [t.strftime("%a %d") for t in mondays] == ["Mon 30", "Mon 07"]
    weekend = next_fire_times(Schedule(cron="0 9 * * 0,6", timezone="UTC"), 3, now)
    assert [t.strftime("%a") for t in weekend] == ["Sat", "Sun", "Sat"]


def test_the_trigger_survives_the_job_store() -> None:
    trigger = WallClockCronTrigger("*/2 * * * * *", "Europe/London")
    copy = pickle.loads(pickle.dumps(trigger))
    assert copy == trigger
    now = datetime(2026, 11, 28, 3, 0, 1, tzinfo=UTC)
    assert copy.get_next_fire_time(None, now) == datetime(2026, 11, 28, 3, 0, 2, tzinfo=UTC)
