"""The scheduler's job: run one drill for one fire time. Importable by name, as APScheduler's
SQLAlchemy job store needs (``dr_orchestrator.scheduling.jobs:run_scheduled_drill``).

The job's arguments are stored in the job store: only the drill's path, name and schedule, never
the database URL (it may hold a password); the daemon hands the rest over with ``configure``.
"""

from __future__ import annotations

import hashlib
import logging
import threading
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Any

from dr_orchestrator.evidence import drills as records
from dr_orchestrator.evidence.store import EvidenceFallback
from dr_orchestrator.model.drill import Schedule
from dr_orchestrator.scheduling.triggers import fire_times_between, latest_fire_time

_TICK = timedelta(microseconds=1)

log = logging.getLogger(__name__)
JOB_FUNCTION = "dr_orchestrator.scheduling.jobs:run_scheduled_drill"


@dataclass
class JobContext:
    sessions: records.Sessions
    stop: threading.Event  # set when the scheduler stops: running drills stop, their cleanup runs
    host: str
    misfire_grace: float
    inventory: str | None = None  # replaces every drill's inventory (a lab started elsewhere)
    say: Callable[[str], None] = log.info  # each fire and its verdict, for the scheduler's operator
    # On a cluster node: the leader's fence check for a drill firing now (raises when the node no longer
    # leads), and its local evidence journal. None for `dr scheduler run`.
    fence_for_drill: Callable[[], Callable[[], object]] | None = None
    fallback: EvidenceFallback | None = None


_context: JobContext | None = None
_running = threading.local()  # the fire time the job running in this thread was scheduled for


def executor(max_workers: int) -> Any:
    """APScheduler's thread pool executor, telling each job its scheduled fire time (APScheduler
    itself does not: computed afterwards from the clock, a job that starts late gets the wrong one)."""
    from apscheduler.executors.pool import ThreadPoolExecutor

    pool_executor = ThreadPoolExecutor(max_workers)
    pool_executor._pool = _FireTimePool(pool_executor._pool)
    return pool_executor


class _FireTimePool:
    def __init__(self, pool: Any) -> None:
        self.pool = pool

    def submit(self, run_job: Any, job: Any, jobstore_alias: str, run_times: list[datetime], logger: str) -> Any:
        return self.pool.submit(_run_with_fire_time, run_job, job, jobstore_alias, run_times, logger)

    def shutdown(self, wait: bool = True) -> None:
        self.pool.shutdown(wait)


def _run_with_fire_time(run_job: Any, job: Any, jobstore_alias: str, run_times: list[datetime], logger: str) -> Any:
    _running.fire_time = run_times[-1] if run_times else None  # one with coalesce
    try:
        return run_job(job, jobstore_alias, run_times, logger)
    finally:
        _running.fire_time = None


def configure(context: JobContext | None) -> None:
    global _context
    _context = context


def run_scheduled_drill(drill_path: str, drill_name: str, cron: str, timezone: str) -> None:
    from dr_orchestrator.drills.load import load_drill
    from dr_orchestrator.drills.runner import DrillRunner
    from dr_orchestrator.yamlsource import LoadError

    context = _context
    if context is None:
        raise RuntimeError("the drill scheduler is not configured in this process")
    fire_time: datetime | None = getattr(_running, "fire_time", None)
    if fire_time is None:  # not started by our executor: the newest fire time within the grace
        now = datetime.now(UTC)
        fire_time = latest_fire_time(Schedule(cron=cron, timezone=timezone), now, context.misfire_grace) or now
    fire_time = fire_time.astimezone(UTC)
    schedule = Schedule(cron=cron, timezone=timezone)
    try:
        drill = load_drill(drill_path, inventory=context.inventory)
    except LoadError as exc:
        record_skipped(context, drill_path, drill_name, None, schedule, fire_time)
        record_missed(context, drill_path, drill_name, None, fire_time,
                      f"the drill file no longer loads: {exc.problems[0]}")
        return
    record_skipped(context, drill_path, drill_name, drill.scenario.value, schedule, fire_time, drill.inventory)
    fence = None
    if context.fence_for_drill is not None:
        try:
            fence = context.fence_for_drill()
        except Exception as exc:  # noqa: BLE001 - whatever the reason, this node may not act now
            record_missed(context, drill_path, drill_name, drill.scenario.value, fire_time,
                          f"node {context.host} does not lead any more: {exc}", drill.inventory)
            return
    context.say(f"fired: {drill.name} for {fire_time.isoformat()}")
    try:
        outcome = DrillRunner(context.sessions, host=context.host, fence=fence, fallback=context.fallback).run(
            drill, trigger="scheduled", scheduled_for=fire_time, started_by="scheduler", stop=context.stop)
    except records.FireTimeTaken as exc:
        context.say(f"{exc}; not running it again")
        return
    context.say(f"drill {drill.name} for {fire_time.isoformat()}: {outcome.verdict.upper()} "
                f"(drill run {outcome.drill_run_id})" + (f": {outcome.error}" if outcome.error else ""))


def record_skipped(context: JobContext, drill_path: str, drill_name: str, scenario: str | None, schedule: Schedule,
                   fire_time: datetime, inventory: str = "") -> None:
    """Fire times between the drill's last recorded one and ``fire_time`` that have no record are
    recorded as missed: APScheduler coalesces them into one run without a word (a scheduler that was
    down, or started a job late). Only when the last record is a fire time of this schedule (a
    changed schedule has no gap to speak of)."""
    with context.sessions() as session:
        last = records.last_fire_time_before(session, drill_name, fire_time)
    if last is None or fire_times_between(schedule, last, last) != [last]:
        return
    skipped = fire_times_between(schedule, last + _TICK, fire_time - _TICK)
    for moment in skipped:
        record_missed(context, drill_path, drill_name, scenario, moment,
                      f"coalesced: no scheduler started it in time; the next run was for {fire_time.isoformat()}",
                      inventory)


def record_missed(context: JobContext, drill_path: str, drill_name: str, scenario: str | None,
                  fire_time: datetime, reason: str, inventory: str = "") -> str | None:
    """The id of the missed drill run recorded, or None when the fire time already had a record."""
    from dr_orchestrator.yamlsource import LoadError, read_file

    try:  # bounded, never blocking: the file may have failed to load by being a FIFO or a device
        text = read_file(drill_path).decode("utf-8", errors="replace")
    except LoadError:
        text = ""
    drill_run_id = str(uuid.uuid4())
    recorded = records.record_missed(
        context.sessions, drill_run_id=drill_run_id, drill_name=drill_name, scenario=scenario or "unknown",
        scheduled_for=fire_time, reason=reason, host=context.host, drill_path=drill_path,
        drill_sha256=hashlib.sha256(text.encode()).hexdigest(), drill_text=text, inventory_path=inventory)
    if recorded:
        log.warning("drill %s missed its fire time %s: %s", drill_name, fire_time.isoformat(), reason)
    return drill_run_id if recorded else None
