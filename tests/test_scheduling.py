"""The drill scheduler: DST-safe fire times, and the real `dr scheduler run` daemon (APScheduler with
its job store in the evidence database): drills run on time with their evidence, restarts lose and
double nothing, two nodes on one PostgreSQL database run each fire time once, a drill interrupted by
a crash is closed as interrupted, and SQLite allows one scheduler only."""

from __future__ import annotations

import json
import os
import pickle
import signal
import subprocess
import sys
import textwrap
from collections.abc import Callable, Iterator
from contextlib import AbstractContextManager
from datetime import UTC, datetime, timedelta
from pathlib import Path
from zoneinfo import ZoneInfo

import pytest
from sqlalchemy import select
from support.waiting import wait_for

from dr_orchestrator.evidence import migrate
from dr_orchestrator.evidence.database import session_factory_for
from dr_orchestrator.evidence.models import ActionEventRecord, DrillRun, Run, ServiceResult
from dr_orchestrator.lab.lab import Lab
from dr_orchestrator.model.drill import Schedule
from dr_orchestrator.scheduling.triggers import WallClockCronTrigger, fire_times_between, next_fire_times

REPO = Path(__file__).resolve().parent.parent
DRILL_DATA = REPO / "tests" / "data" / "drills"
LOCAL_INVENTORY = REPO / "inventories" / "local.yml"
POLL_S = 0.2  # each poll of the evidence database opens an engine of its own


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


# ---------------------------------------------------------------- the real scheduler


def quick_drill(directory: Path, name: str = "quick-drill", cron: str = "*/3 * * * * *", hold: str = "0s") -> Path:
    directory.mkdir(parents=True, exist_ok=True)
    path = directory / f"{name}.yml"
    path.write_text(textwrap.dedent(f"""\
        name: {name}
        scenario: planned_maintenance
        inventory: {LOCAL_INVENTORY}
        runbook:
          path: {DRILL_DATA / 'quick-failover.yml'}
          parameters: {{hold: {hold}}}
        expectations:
          quotation: {{rto: 30s}}
        failback: {DRILL_DATA / 'quick-failback.yml'}
        cleanup:
          - {{id: tidy, action: noop}}
        schedule: {{cron: "{cron}", timezone: UTC}}
        """))
    return path


class Scheduler:
    """`dr scheduler run` as a process of its own, its output in a file."""

    def __init__(self, db: str, drills: Path, log: Path, grace: str = "30s") -> None:
        self.log = log
        self.process = subprocess.Popen(
            [sys.executable, "-m", "dr_orchestrator.cli", "scheduler", "run", "--drills", str(drills),
             "--misfire-grace", grace, "--retry", "0.3s"],
            env={**os.environ, "DR_DATABASE_URL": db}, stdout=log.open("w"), stderr=subprocess.STDOUT)

    def output(self) -> str:
        return self.log.read_text()

    def stop(self) -> int:
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
        return self.process.wait(timeout=60)

    def kill(self) -> None:
        if self.process.poll() is None:
            self.process.kill()
        self.process.wait(timeout=30)


@pytest.fixture
def schedulers() -> Iterator[list[Scheduler]]:
    started: list[Scheduler] = []
    try:
        yield started
    finally:
        for scheduler in started:
            scheduler.kill()


def drill_runs(db: str) -> list[DrillRun]:
    with session_factory_for(db)() as session:
        return list(session.scalars(select(DrillRun).order_by(DrillRun.scheduled_for)))


def finished_runs(db: str, at_least: int) -> list[DrillRun] | None:
    rows = drill_runs(db)
    done = [r for r in rows if r.state != "running"]
    return rows if len(done) >= at_least and len(done) == len(rows) else None


def assert_each_fire_time_once(rows: list[DrillRun], cron: str) -> None:
    """Every fire time from the first to the last has exactly one record: run, or missed with a reason."""
    times = [r.scheduled_for for r in rows]
    assert all(t is not None for t in times)
    assert len(times) == len(set(times)), "a fire time ran twice"
    expected = fire_times_between(Schedule(cron=cron, timezone="UTC"), min(times), max(times))  # type: ignore[type-var]
    assert sorted(times) == expected, "a fire time was lost"  # type: ignore[type-var]
    for row in rows:
        assert row.state in ("finished", "missed", "interrupted"), row.state
        if row.state == "missed":
            assert row.error


def migrated(url: str) -> str:
    migrate.upgrade(url)
    return url


@pytest.mark.slow
def test_the_scheduler_runs_a_drill_seconds_away_and_writes_its_evidence(
        tmp_path: Path, schedulers: list[Scheduler]) -> None:
    db = migrated(f"sqlite:///{tmp_path / 'evidence.db'}")
    quick_drill(tmp_path / "drills")
    listing = subprocess.run([sys.executable, "-m", "dr_orchestrator.cli", "scheduler", "list", "--drills",
                              str(tmp_path / "drills"), "-o", "json"], capture_output=True, text=True, timeout=60)
    (entry,) = json.loads(listing.stdout)["drills"]
    assert entry["name"] == "quick-drill" and len(entry["next"]) == 3
    scheduler = Scheduler(db, tmp_path / "drills", tmp_path / "scheduler.log")
    schedulers.append(scheduler)
    rows = wait_for(lambda: finished_runs(db, 2), 60, "two scheduled drill runs", interval=POLL_S)
    assert scheduler.stop() == 0
    assert "leader on" in scheduler.output() and "scheduler stopped" in scheduler.output()
    rows = drill_runs(db)
    ran = [r for r in rows if r.state == "finished"]
    assert ran and all(r.verdict == "passed" and r.trigger == "scheduled" for r in ran)
    with session_factory_for(db)() as session:
        for row in ran:
            failover = session.get_one(Run, row.failover_run_id)
            assert failover.trigger == "scheduled" and failover.state == "succeeded"
            assert row.scheduled_for is not None and row.started_at >= row.scheduled_for
    assert_each_fire_time_once(rows, "*/3 * * * * *")


@pytest.mark.slow
def test_a_restart_between_fire_times_loses_and_doubles_nothing(tmp_path: Path, schedulers: list[Scheduler]) -> None:
    db = migrated(f"sqlite:///{tmp_path / 'evidence.db'}")
    quick_drill(tmp_path / "drills")
    first = Scheduler(db, tmp_path / "drills", tmp_path / "first.log")
    schedulers.append(first)
    before = wait_for(lambda: finished_runs(db, 2), 60, "two scheduled drill runs", interval=POLL_S)
    assert first.stop() == 0
    last_before = max(r.scheduled_for for r in before if r.scheduled_for)
    # down across at least one fire time
    wait_for(lambda: datetime.now(UTC) > last_before + timedelta(seconds=4), 30, "a fire time to pass", interval=POLL_S)
    second = Scheduler(db, tmp_path / "drills", tmp_path / "second.log")
    schedulers.append(second)
    wait_for(lambda: finished_runs(db, len(before) + 3), 60, "three more drill runs after the restart", interval=POLL_S)
    assert second.stop() == 0
    rows = drill_runs(db)
    assert_each_fire_time_once(rows, "*/3 * * * * *")
    # the fire time(s) passed while down were run late (within the grace) or recorded missed: present
    assert any(r.scheduled_for and last_before < r.scheduled_for < last_before + timedelta(seconds=4)
               for r in rows)
    assert "scheduled quick-drill" not in second.output()  # the stored job was kept, not replaced


@pytest.mark.slow
def test_a_second_scheduler_on_one_sqlite_file_refuses(tmp_path: Path, schedulers: list[Scheduler]) -> None:
    db = migrated(f"sqlite:///{tmp_path / 'evidence.db'}")
    quick_drill(tmp_path / "drills", cron="0 0 1 1 *")
    first = Scheduler(db, tmp_path / "drills", tmp_path / "first.log")
    schedulers.append(first)
    wait_for(lambda: "leader on" in first.output(), 60, "the first scheduler to lead", interval=POLL_S)
    second = subprocess.run([sys.executable, "-m", "dr_orchestrator.cli", "scheduler", "run", "--drills",
                             str(tmp_path / "drills")], env={**os.environ, "DR_DATABASE_URL": db},
                            capture_output=True, text=True, timeout=60)
    assert second.returncode == 2
    assert "one scheduler node only" in second.stderr and "Traceback" not in second.stderr
    assert first.stop() == 0


@pytest.mark.postgres
@pytest.mark.slow
def test_two_schedulers_on_one_postgresql_database_run_each_fire_time_once_and_take_over(
        tmp_path: Path, postgres_database_url: str, schedulers: list[Scheduler]) -> None:
    db = migrated(postgres_database_url)
    quick_drill(tmp_path / "drills")
    one = Scheduler(db, tmp_path / "drills", tmp_path / "one.log")
    two = Scheduler(db, tmp_path / "drills", tmp_path / "two.log")
    schedulers.extend([one, two])
    rows = wait_for(lambda: finished_runs(db, 3), 90, "three scheduled drill runs", interval=POLL_S)
    leaders = [s for s in (one, two) if "leader on" in s.output()]
    (leader,) = leaders
    follower = two if leader is one else one
    assert "follower on" in follower.output()
    leader.kill()  # the leader dies (SIGKILL): its session ends, the follower takes the lock
    wait_for(lambda: "leader on" in follower.output(), 60, "the follower to take over", interval=POLL_S)
    wait_for(lambda: finished_runs(db, len(rows) + 3), 90, "three more drill runs under the new leader",
             interval=POLL_S)
    assert follower.stop() == 0
    assert_each_fire_time_once(drill_runs(db), "*/3 * * * * *")


@pytest.mark.slow
def test_a_drill_interrupted_by_a_crash_is_marked_interrupted_on_restart(
        tmp_path: Path, schedulers: list[Scheduler]) -> None:
    db = migrated(f"sqlite:///{tmp_path / 'evidence.db'}")
    soon = datetime.now(UTC) + timedelta(seconds=12)  # the scheduler must be up before it
    cron = f"{soon.second} {soon.minute} {soon.hour} * * *"
    quick_drill(tmp_path / "drills", cron=cron, hold="120s")
    first = Scheduler(db, tmp_path / "drills", tmp_path / "first.log")
    schedulers.append(first)

    def failover_running() -> bool:
        rows = drill_runs(db)
        if not rows or rows[0].failover_run_id is None:
            return False
        with session_factory_for(db)() as session:
            run = session.get(Run, rows[0].failover_run_id)
            return run is not None and run.state == "running"

    wait_for(failover_running, 60, "the scheduled drill's failover to be running", interval=POLL_S)
    first.kill()  # a crash: nothing gets to clean up
    (row,) = drill_runs(db)
    assert row.state == "running"
    second = Scheduler(db, tmp_path / "drills", tmp_path / "second.log")
    schedulers.append(second)
    wait_for(lambda: drill_runs(db)[0].state == "interrupted", 60, "the crashed drill run to be closed",
             interval=POLL_S)
    assert second.stop() == 0
    (row,) = drill_runs(db)
    assert row.verdict == "failed" and "died" in (row.error or "")
    with session_factory_for(db)() as session:
        failover = session.get_one(Run, row.failover_run_id)
        assert failover.state == "interrupted" and failover.finished_at is not None
    assert "marked interrupted" in second.output()


@pytest.mark.slow
def test_trigger_runs_a_drill_now_by_name_and_refuses_an_unknown_one(tmp_path: Path) -> None:
    db = migrated(f"sqlite:///{tmp_path / 'evidence.db'}")
    quick_drill(tmp_path / "drills", cron="0 0 1 1 *")
    env = {**os.environ, "DR_DATABASE_URL": db}
    command = [sys.executable, "-m", "dr_orchestrator.cli", "scheduler", "trigger"]
    ran = subprocess.run([*command, "quick-drill", "--drills", str(tmp_path / "drills"), "-q"], env=env,
                         capture_output=True, text=True, timeout=120)
    assert ran.returncode == 0, ran.stdout + ran.stderr
    (row,) = drill_runs(db)
    assert (row.trigger, row.verdict, row.scheduled_for) == ("manual", "passed", None)
    unknown = subprocess.run([*command, "no-such-drill", "--drills", str(tmp_path / "drills")], env=env,
                             capture_output=True, text=True, timeout=60)
    assert unknown.returncode == 2
    assert "no drill named 'no-such-drill'" in unknown.stderr and "quick-drill" in unknown.stderr


# ---------------------------------------------------------------- the real scheduler against the lab


def lab_drill(directory: Path, inventory: Path, cron: str) -> Path:
    """The shipped quotation-service-failure drill, on the given lab's inventory (its fault and cleanup
    name the lab through the inventory's vars.lab_root) and on the given schedule."""
    import yaml

    shipped = REPO / "failover_tests" / "quotation-service-failure.yml"
    drill = yaml.safe_load(shipped.read_text())
    drill["inventory"] = str(inventory)
    for part in ("runbook", "failback"):  # relative to the shipped file, which this copy is not next to
        drill[part]["path"] = str((shipped.parent / drill[part]["path"]).resolve())
    drill["schedule"] = {"cron": cron, "timezone": "UTC"}
    drill.pop("notify")  # its webhook is an environment reference this test does not set
    directory.mkdir(parents=True, exist_ok=True)
    path = directory / shipped.name
    path.write_text(yaml.safe_dump(drill, sort_keys=False))
    return path


@pytest.mark.lab
@pytest.mark.slow
def test_the_scheduler_runs_a_lab_drill_seconds_away_and_writes_its_evidence(
        tmp_path: Path, schedulers: list[Scheduler], monkeypatch: pytest.MonkeyPatch,
        lab_factory: Callable[..., AbstractContextManager[Lab]]) -> None:
    db = migrated(f"sqlite:///{tmp_path / 'evidence.db'}")
    # the drill's fault and cleanup are `dr lab ...` commands: the scheduler's children find `dr` on PATH
    monkeypatch.setenv("PATH", f"{Path(sys.executable).parent}:{os.environ.get('PATH', '')}")
    with lab_factory() as lab:
        soon = datetime.now(UTC) + timedelta(seconds=12)  # the scheduler must be up before it
        cron = f"{soon.second} {soon.minute} {soon.hour} * * *"
        lab_drill(tmp_path / "drills", lab.config.inventory_path, cron)
        scheduler = Scheduler(db, tmp_path / "drills", tmp_path / "scheduler.log")
        schedulers.append(scheduler)
        try:
            (row,) = wait_for(lambda: finished_runs(db, 1), 300, "the scheduled lab drill to finish", interval=POLL_S)
        finally:
            stopped = scheduler.stop()  # before the lab goes down, whatever happened
        assert stopped == 0, scheduler.output()
        assert lab.status()["healthy"], "the drill did not leave the lab as it found it"
    assert (row.state, row.verdict, row.trigger) == ("finished", "passed", "scheduled"), scheduler.output()
    assert row.scheduled_for is not None and row.started_at >= row.scheduled_for
    # the operator's terminal says when it fired and how it ended
    fired_at = row.scheduled_for.isoformat()
    assert f"fired: quotation-service-failure for {fired_at}" in scheduler.output()
    assert f"drill quotation-service-failure for {fired_at}: PASSED (drill run {row.id})" in scheduler.output()
    with session_factory_for(db)() as session:
        failover = session.get_one(Run, row.failover_run_id)
        assert (failover.trigger, failover.state) == ("scheduled", "succeeded")
        (quotation,) = session.scalars(select(ServiceResult).where(
            ServiceResult.run_id == failover.id, ServiceResult.service == "quotation"))
        assert quotation.rto_s is not None and 0 < quotation.rto_s <= 30 and quotation.rto_met
        # The service was started at the backup site through Ansible, task by task in the evidence.
        tasks = session.scalars(select(ActionEventRecord).where(
            ActionEventRecord.run_id == failover.id, ActionEventRecord.kind == "ansible.task")).all()
        assert any(t.step_id == "converge-backup" and t.data["host"] == "backup-app" for t in tasks), tasks
