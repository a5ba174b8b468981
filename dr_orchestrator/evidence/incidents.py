"""Incidents: one disruption, from its impact start on, linking its runs (attempts, retries, the
failback). A run names its incident (``dr run --incident ID``, created when absent); without one, a
failover or switchover opens a new incident and a failback joins the incident of the run it fails
back.

The impact start is what the RTO of the incident's runs counts from (``rto.impact_start``): a first
failure the orchestrator measured (a ``fault_detected`` mark; what an earlier attempt of the same
incident saw of the service failing: its verifying probes, its blast-radius reading after it ended,
its ``disruption_started`` mark), else the declared time, else a run's start. The incident row keeps
the impact start its newest attempt counted from, and how it was determined.
"""

from __future__ import annotations

import re
from collections.abc import Iterable
from datetime import datetime
from typing import Any

import yaml
from sqlalchemy import select
from sqlalchemy.orm import Session

from dr_orchestrator.evidence import rto
from dr_orchestrator.evidence.models import ActionEventRecord, Incident, Marker, Probe, Run, ServiceResult, StepRecord
from dr_orchestrator.evidence.queries import as_dict
from dr_orchestrator.model.run import RunKind, RunPlan

# Letters, digits and . _ : - (a ticket number such as INC-2026-0042), at most 64 characters.
INCIDENT_ID = re.compile(r"[A-Za-z0-9][A-Za-z0-9._:-]{0,63}")
OPENING_KINDS = (RunKind.FAILOVER, RunKind.SWITCHOVER)
BLAST_RADIUS_AFTER = "blast_radius.after"
NOTIFICATION = "notification"  # the action event of a notify.* step (actions/notify.py)
RUN_TEXTS = ("runbook_text", "inventory_text", "targets", "parameters")  # left out of the incident's run list


class IncidentError(ValueError):
    """The request names an incident that cannot be used; one sentence."""


def check_incident_id(incident_id: str) -> str:
    """``incident_id`` when it is a usable id, else IncidentError saying what one looks like."""
    if not INCIDENT_ID.fullmatch(incident_id):
        raise IncidentError(f"incident id {incident_id[:80]!r} is not usable: give letters, digits and . _ : - "
                            "(at most 64, starting with a letter or digit), e.g. INC-2026-0042")
    return incident_id


def new_incident_id(at: datetime, run_id: str) -> str:
    return f"INC-{at:%Y%m%d}-{run_id[:8]}"


def incident_of_run(session: Session, plan: RunPlan, run_id: str, at: datetime) -> str | None:
    """The incident a run starting now belongs to, created when absent (see the module's docstring)."""
    if plan.incident_id is not None:
        wanted = plan.incident_id
    elif plan.failback_of is not None:
        return session.scalar(select(Run.incident_id).where(Run.id == plan.failback_of))
    elif plan.kind in OPENING_KINDS:
        wanted = new_incident_id(at, run_id)
    else:
        return None
    if session.get(Incident, wanted) is None:
        declared = plan.incident_at
        session.add(Incident(
            id=wanted, created_at=at, created_by=plan.started_by, declared_at=declared,
            impact_start=declared, impact_start_method=None if declared is None else "declared",
            title=(plan.reason or f"{plan.kind} {plan.runbook.name}").replace("\x00", "\\x00"),
        ))
        session.flush()  # before the run row that refers to it
    return wanted


# -- what the RTO counts from ----------------------------------------------------------------------


def impact_facts(session: Session, run: Run) -> tuple[list[rto.ImpactFact], tuple[datetime, str] | None]:
    """Measured first failures the run's RTO may count from, and the start of its incident's first
    attempt when that was an earlier run. A failback counts from its own disruption, not the incident's."""
    facts = [rto.ImpactFact(m.service, m.at, f"{rto.DETECTED_MARKER} mark of step {m.step_id!r}")
             for m in _markers(session, [run.id], (rto.DETECTED_MARKER,))]
    if run.incident_id is None or run.kind == RunKind.FAILBACK:
        return facts, None
    earlier = list(session.scalars(
        select(Run).where(Run.incident_id == run.incident_id, Run.id != run.id, Run.kind != RunKind.FAILBACK.value,
                          Run.started_at <= run.started_at).order_by(Run.started_at, Run.id)
    ))
    if not earlier:
        return facts, None
    names = {attempt.id: f"run {attempt.id[:8]} (an earlier attempt)" for attempt in earlier}
    for mark in _markers(session, list(names), (rto.DETECTED_MARKER, rto.DISRUPTION_MARKER)):
        facts.append(rto.ImpactFact(mark.service, mark.at,
                                    f"{mark.marker} mark of step {mark.step_id!r} of {names[mark.run_id]}"))
    for attempt in earlier:
        facts += _failed_verifications(session, attempt, names[attempt.id])
    for event in session.scalars(select(ActionEventRecord).where(ActionEventRecord.run_id.in_(list(names)),
                                                                 ActionEventRecord.kind == BLAST_RADIUS_AFTER)):
        for reading in event.data.get("services") or []:
            if reading.get("serving") is False:
                facts.append(rto.ImpactFact(str(reading.get("service")), event.at,
                                            f"not serving after {names[event.run_id]} ended (blast-radius reading)"))
    return facts, (earlier[0].started_at, earlier[0].id[:8])


def _markers(session: Session, run_ids: list[str], names: Iterable[str]) -> list[Marker]:
    return list(session.scalars(select(Marker).where(Marker.run_id.in_(run_ids), Marker.marker.in_(list(names)))
                                .order_by(Marker.at, Marker.id)))


def _failed_verifications(session: Session, run: Run, name: str) -> list[rto.ImpactFact]:
    """The earliest failed probe of each service by the steps that verify it (marked ``service_restored``):
    they look at the service as its clients do, unlike readiness checks of the site taking over."""
    verifying = verifying_steps(run.runbook_text)
    if not verifying:
        return []
    rows = session.execute(
        select(Probe.at, Probe.step_id, StepRecord.service)
        .join(StepRecord, (StepRecord.run_id == Probe.run_id) & (StepRecord.step_id == Probe.step_id))
        .where(Probe.run_id == run.id, Probe.ok.is_(False), Probe.step_id.in_(verifying))
        .order_by(Probe.at)
    )
    first: dict[str | None, rto.ImpactFact] = {}
    for at, step_id, service in rows:
        first.setdefault(service, rto.ImpactFact(service, at, f"failed probe of step {step_id!r} of {name}"))
    return list(first.values())


def verifying_steps(runbook_text: str) -> list[str]:
    """Ids of the runbook's steps marked ``service_restored`` (none when the text is not a runbook)."""
    try:
        document = yaml.safe_load(runbook_text)
    except yaml.YAMLError:
        return []
    steps = document.get("steps") if isinstance(document, dict) else None
    return [str(step["id"]) for step in steps if isinstance(step, dict) and "id" in step
            and rto.RESTORED_MARKER in _marks(step.get("marks"))] if isinstance(steps, list) else []


def _marks(value: Any) -> list[Any]:
    return value if isinstance(value, list) else [value]


def record_impact_start(session: Session, run: Run, figures: Iterable[rto.ServiceFigures]) -> None:
    """The incident's impact start becomes the earliest its newest attempt counted from (a failback's
    own disruption is not the incident's)."""
    if run.incident_id is None or run.kind == RunKind.FAILBACK:
        return
    earliest = min(figures, key=lambda fig: fig.incident_at, default=None)
    incident = session.get(Incident, run.incident_id)
    if earliest is None or incident is None:
        return
    method = f"{earliest.raw['incident_source']}; counted by run {run.id[:8]} for {earliest.service}"
    if (incident.impact_start, incident.impact_start_method) != (earliest.incident_at, method):
        incident.impact_start, incident.impact_start_method = earliest.incident_at, method


# -- reading ------------------------------------------------------------------------------------------


def list_incidents(session: Session, limit: int | None = None) -> list[dict[str, Any]]:
    """Newest first, each with how many runs it has and the state of its newest run."""
    query = select(Incident).order_by(Incident.created_at.desc(), Incident.id)
    if limit is not None:
        query = query.limit(limit)
    rows = []
    for incident in session.scalars(query):
        states = list(session.scalars(select(Run.state).where(Run.incident_id == incident.id)
                                      .order_by(Run.started_at.desc(), Run.id)))
        rows.append(as_dict(incident) | {"runs": len(states), "latest_state": states[0] if states else None})
    return rows


def incident_detail(session: Session, incident_id: str) -> dict[str, Any] | None:
    """The incident, its runs in the order they started (each with its state and per-service RTO/RPO
    with their methods), and the notifications its runs sent (``notify.*`` steps: who was told
    what, delivered or not). None: no such incident."""
    incident = session.get(Incident, incident_id)
    if incident is None:
        return None
    runs = []
    for run in session.scalars(select(Run).where(Run.incident_id == incident_id).order_by(Run.started_at, Run.id)):
        results = session.scalars(select(ServiceResult).where(ServiceResult.run_id == run.id)
                                  .order_by(ServiceResult.id))
        runs.append(as_dict(run, exclude=RUN_TEXTS) | {"results": [as_dict(result) for result in results]})
    sent = session.scalars(select(ActionEventRecord).where(
        ActionEventRecord.run_id.in_([run["id"] for run in runs]), ActionEventRecord.kind == NOTIFICATION)
        .order_by(ActionEventRecord.at, ActionEventRecord.id))
    notifications = [{"run_id": event.run_id, "step_id": event.step_id, **event.data} for event in sent]
    return {"incident": as_dict(incident), "runs": runs, "notifications": notifications}
