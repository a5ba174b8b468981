"""``dr scheduler run``: APScheduler with its job store in the evidence database, one job per drill.

A node runs the scheduler only while it holds the leader lock (see ``leader``). On taking the lead
it closes drill runs whose process died, brings the jobs in line with the drill files (keeping the
stored next fire time of unchanged ones, so a restart loses nothing) and starts. Fire times that
cannot run (past the misfire grace, while the previous run of the drill still goes, or coalesced
into a later run by APScheduler after downtime) are recorded as missed: never silently dropped.
"""

from __future__ import annotations

import logging
import socket
import threading
from collections.abc import Callable
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

from sqlalchemy import Engine

from dr_orchestrator.drills.load import load_drills
from dr_orchestrator.evidence import drills as records
from dr_orchestrator.evidence.database import database_url, make_engine, make_session_factory
from dr_orchestrator.evidence.liveness import sweep_interrupted
from dr_orchestrator.evidence.store import EvidenceFallback
from dr_orchestrator.model.drill import Drill
from dr_orchestrator.scheduling import jobs
from dr_orchestrator.scheduling.leader import LeaderLock, leader_lock
from dr_orchestrator.scheduling.triggers import trigger_for

log = logging.getLogger(__name__)
JOB_PREFIX = "drill:"


class SchedulerDaemon:
    """``engine``, ``lock``, ``fence_for_drill`` and ``fallback`` are a cluster node's (``node.hosting``): its
    evidence database, leadership as the leader lock, its fence for each drill and its evidence journal.
    Without them (`dr scheduler run`): an engine of ``url`` and the database's own leader lock."""

    def __init__(self, url: str | None, drills_dir: str | Path, *, inventory: str | None = None,
                 misfire_grace: float = 300.0, retry_s: float = 5.0, check_s: float = 2.0,
                 stale_after: float = 120.0, rescan_s: float = 60.0, max_workers: int = 4,
                 host: str | None = None, say: Callable[[str], None] = log.info, engine: Engine | None = None,
                 lock: LeaderLock | None = None, fence_for_drill: Callable[[], Callable[[], object]] | None = None,
                 fallback: EvidenceFallback | None = None) -> None:
        self.url = database_url(url)
        self.drills_dir = Path(drills_dir)
        self.inventory = inventory
        self.misfire_grace = misfire_grace
        self.retry_s = retry_s
        self.check_s = check_s
        self.stale_after = stale_after
        self.rescan_s = rescan_s
        self.max_workers = max_workers
        self.host = host or socket.gethostname()
        self.say = say
        self.owns_engine = engine is None
        self.engine = engine or make_engine(self.url)
        self.sessions = make_session_factory(self.engine)
        self.lock = lock
        self.fence_for_drill = fence_for_drill
        self.fallback = fallback
        self.drills: dict[str, Drill] = {}

    def serve(self, stop: threading.Event) -> None:
        """Lead when the lock can be had, follow (retrying) when not, until ``stop`` is set."""
        lock = self.lock or leader_lock(self.url)  # SchedulerRefused on a SQLite file another scheduler holds
        following = False
        try:
            while not stop.is_set():
                if lock.try_acquire():
                    following = False
                    if lock.single_node:
                        self.say("SQLite evidence database: one scheduler node only (a second one refuses)")
                    self.say(f"leader on {self.host}: scheduling the drills of {self.drills_dir}")
                    self._lead(stop, lock.still_held)
                    lock.release()
                elif not following:
                    following = True
                    self.say(f"follower on {self.host}: another scheduler leads; retrying every {self.retry_s:g}s")
                if not stop.is_set():
                    stop.wait(self.retry_s)
        finally:
            lock.release()
            if self.owns_engine:
                self.engine.dispose()

    # -- leading -----------------------------------------------------------------------------------

    def _lead(self, stop: threading.Event, still_held: Callable[[], bool]) -> None:
        from apscheduler.events import EVENT_JOB_ERROR, EVENT_JOB_MAX_INSTANCES, EVENT_JOB_MISSED
        from apscheduler.jobstores.sqlalchemy import SQLAlchemyJobStore
        from apscheduler.schedulers.background import BackgroundScheduler

        closed = records.close_interrupted(self.sessions, self.host, self.stale_after)
        for drill_run_id in closed:
            self.say(f"drill run {drill_run_id} was left running by a process that died: marked interrupted")
        self._sweep_runs()
        drill_stop = threading.Event()
        jobs.configure(jobs.JobContext(self.sessions, drill_stop, self.host, self.misfire_grace, self.inventory,
                                       self.say, self.fence_for_drill, self.fallback))
        scheduler = BackgroundScheduler(
            jobstores={"default": SQLAlchemyJobStore(engine=self.engine)},
            executors={"default": jobs.executor(self.max_workers)},
            job_defaults={"coalesce": True, "misfire_grace_time": int(self.misfire_grace), "max_instances": 1},
            timezone=UTC,
        )
        scheduler.add_listener(self._on_event, EVENT_JOB_MISSED | EVENT_JOB_MAX_INSTANCES | EVENT_JOB_ERROR)
        scheduler.start(paused=True)
        try:
            self._sync(scheduler)
            scheduler.resume()
            rescan_at = datetime.now(UTC) + timedelta(seconds=self.rescan_s)
            while not stop.wait(self.check_s):
                if not still_held():
                    self.say("lost the leader lock: stopping the scheduler")
                    break
                if datetime.now(UTC) >= rescan_at:
                    self._sweep_runs()
                    self._sync(scheduler)
                    rescan_at = datetime.now(UTC) + timedelta(seconds=self.rescan_s)
        finally:
            drill_stop.set()  # running drills stop; their cleanup still runs before shutdown returns
            scheduler.shutdown(wait=True)
            jobs.configure(None)

    def _sweep_runs(self) -> None:
        """Runs (of any `dr`, not only drills) whose process died are marked interrupted, for `dr resume`."""
        for run_id in sweep_interrupted(self.sessions, self.host):
            self.say(f"run {run_id} was left running by a process that died: marked interrupted (dr resume {run_id})")

    def _sync(self, scheduler: Any) -> None:
        """One job per scheduled drill; an unchanged job keeps its stored next fire time."""
        drills, problems = load_drills(self.drills_dir)
        for problem in problems:
            self.say(f"not scheduled: {problem}")
        wanted = {JOB_PREFIX + d.name: d for d in drills if d.schedule is not None}
        for job in scheduler.get_jobs():
            if job.id.startswith(JOB_PREFIX) and job.id not in wanted:
                scheduler.remove_job(job.id)
                self.say(f"unscheduled {job.id[len(JOB_PREFIX):]} (its drill file is gone or has no schedule)")
        for job_id, drill in wanted.items():
            assert drill.schedule is not None
            trigger = trigger_for(drill.schedule)
            args = [drill.path, drill.name, drill.schedule.cron, drill.schedule.timezone]
            existing = scheduler.get_job(job_id)
            if existing is None or existing.trigger != trigger or list(existing.args) != args:
                scheduler.add_job(jobs.JOB_FUNCTION, trigger=trigger, args=args, id=job_id, name=drill.name,
                                  replace_existing=True)
                self.say(f"scheduled {drill.name}: {trigger}")
        self.drills = wanted

    def _on_event(self, event: Any) -> None:
        from apscheduler.events import EVENT_JOB_ERROR, EVENT_JOB_MAX_INSTANCES, EVENT_JOB_MISSED

        drill = self.drills.get(event.job_id)
        if event.code == EVENT_JOB_ERROR:
            log.error("drill job %s failed: %s", event.job_id, event.exception)
            return
        if drill is None:
            return
        if event.code == EVENT_JOB_MISSED:
            self._missed(drill, event.scheduled_run_time,
                         f"not started within the misfire grace time of {self.misfire_grace:g}s")
        elif event.code == EVENT_JOB_MAX_INSTANCES:
            for fire_time in event.scheduled_run_times:
                self._missed(drill, fire_time, "the previous run of this drill was still going (one at a time)")

    def _missed(self, drill: Drill, fire_time: datetime, reason: str) -> None:
        context = jobs.JobContext(self.sessions, threading.Event(), self.host, self.misfire_grace)
        try:
            if drill.schedule is not None:
                jobs.record_skipped(context, drill.path, drill.name, drill.scenario.value, drill.schedule,
                                    fire_time.astimezone(UTC), drill.inventory)
            drill_run_id = jobs.record_missed(context, drill.path, drill.name, drill.scenario.value, fire_time,
                                              reason, drill.inventory)
            if drill_run_id is not None:
                self.say(f"missed: {drill.name} at {fire_time.isoformat()}: {reason}")
                from dr_orchestrator.drills.notifier import DrillNotifier
                from dr_orchestrator.model.drill import NotifyEvent

                notifier = DrillNotifier(drill.notify, self.sessions)
                subject = f"DR drill {drill.name}: missed its {fire_time.isoformat()} run"
                notifier.send(drill_run_id, NotifyEvent.MISSED, subject, f"{subject}\n{reason}")
                notifier.close()
        except Exception:  # noqa: BLE001 - the scheduler goes on; the log says what was lost
            log.exception("could not record the missed fire time %s of drill %s", fire_time, drill.name)
