"""Reading the evidence back: run lists, one run's whole record, and the RTO/RPO export.

Everything returned is plain JSON-ready data (timestamps as ISO-8601 UTC text), for the CLI's
tables and its ``--output json`` alike.
"""

from __future__ import annotations

from collections.abc import Sequence
from datetime import date, datetime
from typing import Any

from sqlalchemy import Select, select
from sqlalchemy.orm import DeclarativeBase, Session

from dr_orchestrator.evidence.drills import RUN_STAGES
from dr_orchestrator.evidence.models import (
    ActionEventRecord,
    Approval,
    Attempt,
    AuditEvent,
    DrillRun,
    Marker,
    MeasurementRecord,
    Probe,
    Run,
    RunService,
    ServiceResult,
    StepRecord,
)


class AmbiguousRunId(LookupError):
    """A run id that names no single run: a shortened id more than one run (or drill run) starts
    with, or a drill run that started no run."""


def plain(value: Any) -> Any:
    """Times and dates as ISO-8601 text, anything else as it is."""
    return value.isoformat() if isinstance(value, date) else value


def as_dict(row: DeclarativeBase, exclude: Sequence[str] = ()) -> dict[str, Any]:
    return {c.key: plain(getattr(row, c.key)) for c in row.__table__.columns if c.key not in exclude}


def _services_by_run(session: Session, run_ids: Sequence[str]) -> dict[str, list[str]]:
    services: dict[str, list[str]] = {run_id: [] for run_id in run_ids}
    rows = session.execute(
        select(RunService.run_id, RunService.service).where(RunService.run_id.in_(run_ids)).order_by(RunService.id)
    )
    for run_id, service in rows:
        services[run_id].append(service)
    return services


def list_runs(
    session: Session,
    service: str | None = None,
    kind: str | None = None,
    state: str | None = None,
    since: datetime | None = None,
    limit: int | None = None,
) -> list[dict[str, Any]]:
    """Runs, newest first: id, runbook_name, kind, state, trigger, started_by, reason, started_at,
    finished_at, incident_at, error, services (in scope)."""
    query = select(Run).order_by(Run.started_at.desc(), Run.id)
    if service is not None:
        query = query.where(Run.id.in_(select(RunService.run_id).where(RunService.service == service)))
    if kind is not None:
        query = query.where(Run.kind == kind)
    if state is not None:
        query = query.where(Run.state == state)
    if since is not None:
        query = query.where(Run.started_at >= since)
    if limit is not None:
        query = query.limit(limit)
    runs = list(session.scalars(query))
    services = _services_by_run(session, [run.id for run in runs])
    summary_fields = ("runbook_text", "inventory_text", "targets", "parameters")
    return [as_dict(run, exclude=summary_fields) | {"services": services[run.id]} for run in runs]


def find_run(session: Session, run_id: str) -> Run | None:
    """The run with this id, or the only run whose id starts with it (as ``git`` takes short hashes).
    A drill run's id (or a unique prefix of it) stands for the drill's failover run, else the first
    of its runs that exists (``drills.RUN_STAGES`` order)."""
    run = session.get(Run, run_id)
    if run is not None:
        return run
    drill = session.get(DrillRun, run_id)
    if drill is not None:
        return _run_of_drill(session, drill)
    if len(run_id) < 4:
        return None
    pattern = run_id.replace("\\", "\\\\").replace("%", "\\%").replace("_", "\\_") + "%"
    runs = list(session.scalars(select(Run).where(Run.id.like(pattern, escape="\\")).limit(2)))
    drill_runs = list(session.scalars(select(DrillRun).where(DrillRun.id.like(pattern, escape="\\")).limit(2)))
    if len(runs) + len(drill_runs) > 1:
        raise AmbiguousRunId(f"several runs have ids starting with {run_id!r}: give more of the id")
    if drill_runs:
        return _run_of_drill(session, drill_runs[0])
    return runs[0] if runs else None


def _run_of_drill(session: Session, drill: DrillRun) -> Run:
    stages = ("failover", *(stage for stage in RUN_STAGES if stage != "failover"))
    for stage in stages:
        run_id = getattr(drill, f"{stage}_run_id")
        run = session.get(Run, run_id) if run_id else None
        if run is not None:
            return run
    raise AmbiguousRunId(f"drill run {drill.id} ({drill.drill_name}, {drill.state}) started no run: "
                         "there is no run to name")


def _rows(session: Session, query: Select[Any]) -> list[dict[str, Any]]:
    return [as_dict(row) for row in session.scalars(query)]


def run_detail(session: Session, run_id: str) -> dict[str, Any] | None:
    """Everything recorded about one run, or None when there is no such run.

    Keys: run (every column), services (scope and targets), steps (time order, each with its
    attempts), probes, markers, measurements, events, approvals (decisions on its gates),
    run_events (interrupted, resumed, refused: audit events naming the run), results (per-service
    RTO/RPO)."""
    run = find_run(session, run_id)
    if run is None:
        return None
    attempts: dict[int, list[dict[str, Any]]] = {}
    for attempt in _rows(session, select(Attempt).where(Attempt.run_id == run.id).order_by(Attempt.id)):
        attempts.setdefault(attempt["step_pk"], []).append(attempt)
    steps = _rows(session, select(StepRecord).where(StepRecord.run_id == run.id).order_by(StepRecord.id))
    for step in steps:
        step["attempts"] = attempts.get(step["id"], [])
    # Time order; steps that never started (skipped, cancelled) where they ended, never-run ones last.
    steps.sort(key=lambda s: (s["started_at"] or s["finished_at"] or "~", s["id"]))
    by_run = run.id
    return {
        "run": as_dict(run),
        "services": _rows(session, select(RunService).where(RunService.run_id == by_run).order_by(RunService.id)),
        "steps": steps,
        "probes": _rows(session, select(Probe).where(Probe.run_id == by_run).order_by(Probe.at, Probe.id)),
        "markers": _rows(session, select(Marker).where(Marker.run_id == by_run).order_by(Marker.at, Marker.id)),
        "measurements": _rows(
            session,
            select(MeasurementRecord)
            .where(MeasurementRecord.run_id == by_run)
            .order_by(MeasurementRecord.at, MeasurementRecord.id),
        ),
        "events": _rows(
            session,
            select(ActionEventRecord)
            .where(ActionEventRecord.run_id == by_run)
            .order_by(ActionEventRecord.at, ActionEventRecord.id),
        ),
        "approvals": _rows(session, select(Approval).where(Approval.run_id == by_run).order_by(Approval.id)),
        "run_events": _rows(session, select(AuditEvent).where(AuditEvent.target == by_run).order_by(AuditEvent.id)),
        "results": _rows(
            session, select(ServiceResult).where(ServiceResult.run_id == by_run).order_by(ServiceResult.id)
        ),
    }
