"""Drill runs in the evidence database: started, linked to their runs, judged, finished; scheduled
fire times that were missed; notifications; and drill runs whose process died, found and closed.

Each function is its own short write transaction, like the store's events: a crash loses nothing
already written.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Any

from sqlalchemy import select
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session

from dr_orchestrator.evidence.database import WRITE_TRANSACTION
from dr_orchestrator.evidence.models import (
    DrillExpectation,
    DrillRun,
    Notification,
    Run,
    ServiceResult,
    StepRecord,
)
from dr_orchestrator.model.events import utcnow
from dr_orchestrator.model.run import Phase

Sessions = Callable[[], Session]
RUN_STAGES = ("fault", "failover", "checks", "restore", "failback", "cleanup")
LIVE_RUN_STATES = ("pending", "running", "waiting_approval")


class FireTimeTaken(Exception):
    """Another scheduler node (or a restarted one) already ran this drill for this fire time."""


@contextmanager
def writing(sessions: Sessions) -> Iterator[Session]:
    with sessions() as session, session.begin():
        session.connection(execution_options=WRITE_TRANSACTION)
        yield session


@dataclass(frozen=True)
class DrillRunStart:
    drill_run_id: str
    drill_name: str
    scenario: str
    trigger: str
    scheduled_for: datetime | None
    started_by: str
    host: str
    drill_path: str
    drill_sha256: str
    drill_text: str
    inventory_path: str


def start_drill_run(sessions: Sessions, start: DrillRunStart) -> None:
    """Record a drill run as running; FireTimeTaken when its fire time already has a run."""
    now = utcnow()
    try:
        with writing(sessions) as session:
            session.add(DrillRun(
                id=start.drill_run_id, drill_name=start.drill_name, scenario=start.scenario, trigger=start.trigger,
                scheduled_for=start.scheduled_for, state="running", started_by=start.started_by,
                orchestrator_host=start.host, pid=os.getpid(), heartbeat_at=now, started_at=now,
                drill_path=start.drill_path, drill_sha256=start.drill_sha256, drill_text=start.drill_text,
                inventory_path=start.inventory_path, cleanup_left=[],
            ))
    except IntegrityError:
        if start.scheduled_for is None:
            raise
        raise FireTimeTaken(f"drill {start.drill_name!r} already ran for {start.scheduled_for.isoformat()}") from None


def link_run(sessions: Sessions, drill_run_id: str, stage: str, run_id: str) -> None:
    """Name the run a stage is about to make (before it starts: a crash then still names it)."""
    if stage not in RUN_STAGES:
        raise ValueError(f"unknown drill stage {stage!r}")
    with writing(sessions) as session:
        setattr(session.get_one(DrillRun, drill_run_id), f"{stage}_run_id", run_id)


def beat(sessions: Sessions, drill_run_id: str) -> None:
    with writing(sessions) as session:
        record = session.get_one(DrillRun, drill_run_id)
        if record.finished_at is None:
            record.heartbeat_at = utcnow()


def set_incident_time(sessions: Sessions, drill_run_id: str, at: datetime) -> None:
    with writing(sessions) as session:
        session.get_one(DrillRun, drill_run_id).incident_at = at


@dataclass(frozen=True)
class ExpectationResult:
    service: str
    kind: str  # rto | rpo | health | data
    met: bool
    detail: str
    target: float | None = None
    measured: float | None = None
    check_id: str | None = None
    run_id: str | None = None

    def as_dict(self) -> dict[str, Any]:
        return {"service": self.service, "kind": self.kind, "met": self.met, "target": self.target,
                "measured": self.measured, "check_id": self.check_id, "run_id": self.run_id, "detail": self.detail}


def record_expectations(sessions: Sessions, drill_run_id: str, results: list[ExpectationResult]) -> None:
    now = utcnow()
    with writing(sessions) as session:
        session.add_all(DrillExpectation(
            drill_run_id=drill_run_id, service=r.service, kind=r.kind, check_id=r.check_id, target=r.target,
            measured=r.measured, met=r.met, detail=r.detail, run_id=r.run_id, at=now) for r in results)


def finish_drill_run(sessions: Sessions, drill_run_id: str, *, state: str, verdict: str, cleanup_state: str,
                     cleanup_left: list[str], error: str | None) -> None:
    with writing(sessions) as session:
        record = session.get_one(DrillRun, drill_run_id)
        record.state = state
        record.verdict = verdict
        record.cleanup_state = cleanup_state
        record.cleanup_left = cleanup_left
        record.error = error
        record.finished_at = utcnow()


def record_missed(sessions: Sessions, *, drill_run_id: str, drill_name: str, scenario: str,
                  scheduled_for: datetime, reason: str, host: str, drill_path: str, drill_sha256: str,
                  drill_text: str, inventory_path: str) -> bool:
    """A fire time the scheduler did not run, as a drill run in state ``missed``; False when the fire
    time already has a record (run or missed), so a missed time is recorded once."""
    now = utcnow()
    try:
        with writing(sessions) as session:
            session.add(DrillRun(
                id=drill_run_id, drill_name=drill_name, scenario=scenario, trigger="scheduled",
                scheduled_for=scheduled_for, state="missed", verdict="failed", started_by="scheduler",
                orchestrator_host=host, pid=os.getpid(), started_at=now, finished_at=now, drill_path=drill_path,
                drill_sha256=drill_sha256, drill_text=drill_text, inventory_path=inventory_path, cleanup_state="none",
                cleanup_left=[], error=reason,
            ))
    except IntegrityError:
        return False
    return True


def record_notification(sessions: Sessions, drill_run_id: str | None, event: str, delivery: dict[str, Any]) -> None:
    """``delivery``: channel, target, delivered, attempts, at (ISO-8601 or datetime), detail, tries."""
    at = delivery["at"]
    at = datetime.fromisoformat(at) if isinstance(at, str) else at
    with writing(sessions) as session:
        session.add(Notification(
            drill_run_id=drill_run_id, event=event, channel=delivery["channel"], target=delivery["target"],
            delivered=delivery["delivered"], attempts=delivery["attempts"], at=at,
            detail=delivery["detail"], tries=delivery["tries"]))


# -- reading ---------------------------------------------------------------------------------------


def service_results(session: Session, run_id: str) -> dict[str, ServiceResult]:
    return {row.service: row for row in session.scalars(select(ServiceResult).where(ServiceResult.run_id == run_id))}


def forward_steps(session: Session, run_id: str) -> dict[str, StepRecord]:
    rows = session.scalars(select(StepRecord)
                           .where(StepRecord.run_id == run_id, StepRecord.phase == Phase.FORWARD.value)
                           .order_by(StepRecord.id))
    return {row.step_id: row for row in rows}


def drill_run_rows(session: Session, drill_name: str | None = None, limit: int = 50) -> list[DrillRun]:
    query = select(DrillRun).order_by(DrillRun.started_at.desc()).limit(limit)
    if drill_name:
        query = query.where(DrillRun.drill_name == drill_name)
    return list(session.scalars(query))


def drill_run_detail(session: Session, drill_run_id: str) -> dict[str, Any] | None:
    record = session.get(DrillRun, drill_run_id)
    if record is None:
        matches = list(session.scalars(select(DrillRun).where(DrillRun.id.startswith(drill_run_id)).limit(2)))
        if len(matches) != 1:
            return None
        record = matches[0]
    expectations = session.scalars(select(DrillExpectation).where(DrillExpectation.drill_run_id == record.id)
                                   .order_by(DrillExpectation.id))
    notifications = session.scalars(select(Notification).where(Notification.drill_run_id == record.id)
                                    .order_by(Notification.id))
    return {
        "drill_run": summary(record),
        "expectations": [{"service": e.service, "kind": e.kind, "check_id": e.check_id, "target": e.target,
                          "measured": e.measured, "met": e.met, "detail": e.detail, "run_id": e.run_id}
                         for e in expectations],
        "notifications": [{"event": n.event, "channel": n.channel, "target": n.target, "delivered": n.delivered,
                           "attempts": n.attempts, "at": n.at.isoformat(), "detail": n.detail}
                          for n in notifications],
    }


def summary(record: DrillRun) -> dict[str, Any]:
    return {
        "id": record.id, "drill": record.drill_name, "scenario": record.scenario, "trigger": record.trigger,
        "scheduled_for": record.scheduled_for.isoformat() if record.scheduled_for else None,
        "state": record.state, "verdict": record.verdict, "started_at": record.started_at.isoformat(),
        "finished_at": record.finished_at.isoformat() if record.finished_at else None,
        "incident_at": record.incident_at.isoformat() if record.incident_at else None,
        "runs": {stage: getattr(record, f"{stage}_run_id") for stage in RUN_STAGES},
        "cleanup_state": record.cleanup_state, "cleanup_left": record.cleanup_left, "error": record.error,
        "host": record.orchestrator_host, "pid": record.pid,
    }


# -- crashed drill runs ----------------------------------------------------------------------------


def pid_alive(pid: int | None) -> bool:
    if pid is None:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def close_interrupted(sessions: Sessions, host: str, stale_after: float = 120.0,
                      alive: Callable[[int | None], bool] = pid_alive) -> list[str]:
    """Drill runs left ``running`` by a process that died: on this host, its pid is gone; on any host,
    its heartbeat is older than ``stale_after`` seconds. Each is marked ``interrupted`` (verdict
    failed), and so is every run it had started that is still open. Returns their ids."""
    now = utcnow()
    closed: list[str] = []
    with writing(sessions) as session:
        for record in session.scalars(select(DrillRun).where(DrillRun.state == "running")):
            same_host_dead = record.orchestrator_host == host and record.pid != os.getpid() and not alive(record.pid)
            stale = record.heartbeat_at is None or record.heartbeat_at < now - timedelta(seconds=stale_after)
            if not (same_host_dead or stale):
                continue
            why = (f"process {record.pid} on {record.orchestrator_host} died" if same_host_dead
                   else f"no heartbeat from {record.orchestrator_host} since {record.heartbeat_at}")
            error = f"interrupted: the orchestrator {why} while the drill ran; closed at restart"
            for stage in RUN_STAGES:
                run_id = getattr(record, f"{stage}_run_id")
                run = session.get(Run, run_id) if run_id else None
                if run is not None and run.state in LIVE_RUN_STATES:
                    run.state, run.finished_at, run.error = "interrupted", now, error
            record.state, record.verdict, record.finished_at, record.error = "interrupted", "failed", now, error
            record.cleanup_state = "incomplete"
            record.cleanup_left = ["the cleanup never ran: check the systems by hand"]
            closed.append(record.id)
    return closed


def last_fire_time_before(session: Session, drill_name: str, moment: datetime) -> datetime | None:
    """The newest fire time of ``drill_name`` with a record (run or missed) before ``moment``."""
    query = select(DrillRun.scheduled_for).where(DrillRun.drill_name == drill_name,
                                                 DrillRun.scheduled_for < moment)
    return session.scalars(query.order_by(DrillRun.scheduled_for.desc()).limit(1)).first()


def running_drill(session: Session, drill_name: str) -> DrillRun | None:
    return session.scalars(select(DrillRun).where(DrillRun.drill_name == drill_name, DrillRun.state == "running")
                           .limit(1)).first()
