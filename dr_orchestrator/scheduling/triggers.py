"""Drill schedules: cron in a time zone, with one run per wall-clock fire time across DST changes.

APScheduler 3.11's CronTrigger gets daylight-saving changes wrong (measured, America/New_York,
2026-11-01): ``30 1 * * *`` fires at 01:30 EDT and again at 01:30 EST, and after that it keeps
answering 01:30 EST for any later ``now``; ``*/30 * * * *`` goes back in time (01:30 EST -> 01:00 EST
-> 01:30 EDT). ``WallClockCronTrigger`` matches the cron fields against the local wall clock instead
and turns each matching wall-clock time into one instant:

- a time that happens twice (the hour repeated when clocks go back) runs once, at its first occurrence;
- a time that does not happen (the hour skipped when clocks go forward) runs once, when the clock
  jumps past it (02:30 on a spring-forward night runs at 03:30 local, the same instant).

Cron has five fields (minute hour day month weekday); six fields put seconds first, for tests and
drills that must start within seconds.
"""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from typing import Any
from zoneinfo import ZoneInfo

from apscheduler.triggers.base import BaseTrigger
from apscheduler.triggers.cron import CronTrigger

from dr_orchestrator.model.drill import Schedule

_TICK = timedelta(microseconds=1)
_FIELDS6 = ("second", "minute", "hour", "day", "month", "day_of_week")


def wall_cron(expression: str) -> CronTrigger:
    """The cron fields as a trigger over naive wall-clock times (computed as if they were UTC)."""
    fields = expression.split()
    if len(fields) == 5:
        fields = ["0", *fields]
    if len(fields) != 6:
        raise ValueError(f"{expression!r} has {len(fields)} fields; cron has 5 (minute hour day month weekday) "
                         "or 6 with seconds first")
    values = dict(zip(_FIELDS6, fields, strict=True))
    values["day_of_week"] = crontab_weekdays(values["day_of_week"])
    return CronTrigger(timezone=UTC, **values)


_WEEKDAYS = ("sun", "mon", "tue", "wed", "thu", "fri", "sat")


def crontab_weekdays(value: str) -> str:
    """Crontab weekdays (0 or 7 Sunday, 1 Monday ...) as APScheduler's names. APScheduler 3 counts
    from Monday, and its from_crontab does not translate: "1" would mean Tuesday (measured, 3.11)."""
    if value == "*" or not any(c.isdigit() for c in value):
        return value
    days: set[int] = set()
    for part in value.split(","):
        span, _, step_text = part.partition("/")
        step = int(step_text) if step_text else 1
        if span == "*":
            first, last = 0, 6
        elif "-" in span:
            first_text, last_text = span.split("-", 1)
            first, last = _weekday(first_text), _weekday(last_text)
            last = 7 if last == 0 and first > 0 else last
        else:
            first = last = _weekday(span)
            if step_text:
                last = 6
        if first > last or step < 1:
            raise ValueError(f"weekday field {value!r}: {part!r} is not a valid range")
        days.update(day % 7 for day in range(first, last + 1, step))
    return ",".join(_WEEKDAYS[day] for day in sorted(days))


def _weekday(text: str) -> int:
    if text.isdigit() and int(text) <= 7:
        return int(text) % 7 if int(text) != 7 else 7
    lowered = text.lower()[:3]
    if lowered in _WEEKDAYS:
        return _WEEKDAYS.index(lowered)
    raise ValueError(f"{text!r} is not a weekday (0-7 or sun-sat)")


class WallClockCronTrigger(BaseTrigger):
    """An APScheduler trigger (picklable, for the SQLAlchemy job store) with DST-safe cron."""

    def __init__(self, cron: str, timezone: str = "UTC") -> None:
        self.cron = cron
        self.timezone = timezone
        self._zone = ZoneInfo(timezone)
        self._cron = wall_cron(cron)

    def get_next_fire_time(self, previous_fire_time: datetime | None, now: datetime) -> datetime | None:
        floor = now.astimezone(UTC)
        start = self._wall(now)
        if previous_fire_time is not None:  # each wall-clock time once, whatever the offsets
            start = max(start, self._wall(previous_fire_time) + _TICK)
            floor = max(floor, previous_fire_time.astimezone(UTC) + _TICK)
        while True:
            wall = self._cron.get_next_fire_time(None, start.replace(tzinfo=UTC))
            if wall is None:
                return None
            naive = wall.replace(tzinfo=None)
            # fold=0: the first occurrence of a repeated time; a skipped time gets the offset from
            # before the change, which is the instant the clock jumped past it.
            instant = naive.replace(tzinfo=self._zone, fold=0).astimezone(UTC)
            if instant >= floor:
                return instant.astimezone(self._zone)
            # Its one occurrence has passed (asked during the repeated hour), or it is the same
            # instant as the previous fire time (two skipped wall-clock times): the next one.
            start = naive + _TICK

    def _wall(self, moment: datetime) -> datetime:
        return moment.astimezone(self._zone).replace(tzinfo=None)

    def __getstate__(self) -> dict[str, Any]:
        return {"version": 1, "cron": self.cron, "timezone": self.timezone}

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__init__(state["cron"], state["timezone"])  # type: ignore[misc]

    def __eq__(self, other: object) -> bool:
        return isinstance(other, WallClockCronTrigger) and (other.cron, other.timezone) == (self.cron, self.timezone)

    def __hash__(self) -> int:
        return hash((self.cron, self.timezone))

    def __str__(self) -> str:
        return f"cron[{self.cron}] {self.timezone}"

    def __repr__(self) -> str:
        return f"<WallClockCronTrigger cron={self.cron!r} timezone={self.timezone!r}>"


def trigger_for(schedule: Schedule) -> WallClockCronTrigger:
    return WallClockCronTrigger(schedule.cron, schedule.timezone)


def next_fire_times(schedule: Schedule, count: int = 3, now: datetime | None = None) -> list[datetime]:
    trigger = trigger_for(schedule)
    now = now or datetime.now(UTC)
    times: list[datetime] = []
    previous: datetime | None = None
    while len(times) < count:
        moment = trigger.get_next_fire_time(previous, now)
        if moment is None:
            break
        times.append(moment)
        previous, now = moment, moment + _TICK
    return times


def fire_times_between(schedule: Schedule, after: datetime, until: datetime) -> list[datetime]:
    """Fire times ``t`` with ``after <= t <= until``."""
    trigger = trigger_for(schedule)
    times: list[datetime] = []
    moment = trigger.get_next_fire_time(None, after)
    while moment is not None and moment <= until:
        times.append(moment)
        moment = trigger.get_next_fire_time(moment, moment + _TICK)
    return times


def latest_fire_time(schedule: Schedule, now: datetime, within: float) -> datetime | None:
    """The newest fire time at or before ``now`` and not older than ``within`` seconds."""
    times = fire_times_between(schedule, now - timedelta(seconds=within), now)
    return times[-1] if times else None
