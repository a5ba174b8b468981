"""Incidents: one disruption, from its impact start on, linking its runs (attempts, retries, the
failback). A run names its incident (``dr run --incident ID``, created when absent); without one, a
failover or switchover opens a new incident and a failback joins the incident of the run it fails
back.

The impact start is what the RTO of the incident's runs counts from (``rto.impact_start``): a first
failure the orchestrator measured (a ``fault_detected`` mark; what an earlier attempt of the same
incident saw of the service failing: its verifying probes, its blast-radius reading after it ended,
its ``disruption_started`` mark), else the declared time, else a run's start. The incident row keeps
the impact start its newest attempt counted from, and how it was determined.

The lifecycle (``open_or_update_incident``, ``record_incident_event``): an incident the watch or an
alert opens names what it hits (a service or a site, and the services customers see), its severity
level, source and state, and keeps each moment as a chained ``IncidentEvent``: detected, decided,
executing (a run starting on it records this itself), restored, closed, and the status messages
published (``say``). ``incident_timeline`` gives the RTO and its parts from those moments;
``public_status`` gives what the public status page shows, nothing internal.
"""

from __future__ import annotations

import re
import uuid
from collections.abc import Iterable, Mapping, Sequence
from datetime import UTC, datetime, timedelta
from typing import Any

import yaml
from sqlalchemy import or_, select
from sqlalchemy.orm import Session

from dr_orchestrator.evidence import rto
from dr_orchestrator.evidence.chain import lock_chain
from dr_orchestrator.evidence.database import begin_write
from dr_orchestrator.evidence.models import (
    ActionEventRecord,
    Incident,
    IncidentEvent,
    Marker,
    Probe,
    Run,
    ServiceResult,
    StepRecord,
)
from dr_orchestrator.evidence.queries import as_dict, plain
from dr_orchestrator.evidence.values import clean_text, jsonable
from dr_orchestrator.model.approval import Identity
from dr_orchestrator.model.events import utcnow
from dr_orchestrator.model.run import RunKind, RunPlan

# Letters, digits and . _ : - (a ticket number such as INC-2026-0042), at most 64 characters.
INCIDENT_ID = re.compile(r"[A-Za-z0-9][A-Za-z0-9._:-]{0,63}")
OPENING_KINDS = (RunKind.FAILOVER, RunKind.SWITCHOVER)
BLAST_RADIUS_AFTER = "blast_radius.after"
NOTIFICATION = "notification"  # the action event of a notify.* step (actions/notify.py)
RUN_TEXTS = ("runbook_text", "inventory_text", "targets", "parameters")  # left out of the incident's run list

TARGET_KINDS = ("service", "site")
WATCH = "watch"
MANUAL_RUN = "manual run"
OPEN = "open"
EXECUTING = "executing"
CLOSED = "closed"
# An event of these kinds moves the incident to the state of the same name.
STATE_EVENTS = ("detected", "decided", EXECUTING, "restored", CLOSED)
# approved / rejected: a person's answer to a policy that asks for approvals (the watch decides once
# enough distinct people approved, or anyone rejected).
APPROVAL_KINDS = ("approved", "rejected")
EVENT_KINDS = ("suspected", *STATE_EVENTS, "message", "updated", *APPROVAL_KINDS)
ACTIVE_STATES = (OPEN, "detected", "decided", EXECUTING)  # not restored yet: an incident of its target is reused
MESSAGE_MAX_CHARS = 2000


class IncidentError(ValueError):
    """The request names an incident that cannot be used; one sentence."""


class UnknownIncident(IncidentError):
    """No incident has this id."""


def check_incident_id(incident_id: str) -> str:
    """``incident_id`` when it is a usable id, else IncidentError saying what one looks like."""
    if not INCIDENT_ID.fullmatch(incident_id):
        raise IncidentError(f"incident id {incident_id[:80]!r} is not usable: give letters, digits and . _ : - "
                            "(at most 64, starting with a letter or digit), e.g. INC-2026-0042")
    return incident_id


def new_incident_id(at: datetime, run_id: str) -> str:
    return f"INC-{at:%Y%m%d}-{run_id[:8]}"


def new_watch_incident_id(detected_at: datetime) -> str:
    return f"INC-{detected_at:%Y%m%d}-{uuid.uuid4().hex[:8]}"


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
    incident = session.get(Incident, wanted)
    if incident is None:
        declared = plan.incident_at
        session.add(Incident(
            id=wanted, created_at=at, created_by=plan.started_by, declared_at=declared,
            impact_start=declared, impact_start_method=None if declared is None else "declared",
            title=(plan.reason or f"{plan.kind} {plan.runbook.name}").replace("\x00", "\\x00"),
            source=MANUAL_RUN, state=OPEN,
        ))
        session.flush()  # before the run row that refers to it
    elif incident.target_kind is not None and incident.state != CLOSED and not _executing(session, wanted, run_id):
        # opened by the watch or an alert, and whoever started the run did not record it yet
        _add_event(session, incident, EXECUTING, at, plan.started_by,
                   {"run_id": run_id, "runbook": plan.runbook.name, "kind": plan.kind.value})
    return wanted


def _executing(session: Session, incident_id: str, run_id: str) -> bool:
    return any(data.get("run_id") == run_id for data in session.scalars(select(IncidentEvent.data).where(
        IncidentEvent.incident_id == incident_id, IncidentEvent.kind == EXECUTING)))


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
    events = [as_dict(event, exclude=("incident_id", "recorded_at")) for event in _events(session, incident_id)]
    return {"incident": as_dict(incident), "runs": runs, "notifications": notifications, "events": events,
            "timeline": incident_timeline(session, incident_id)}


# -- the lifecycle ------------------------------------------------------------------------------------


def open_or_update_incident(session: Session, *, target_kind: str, target_name: str, impact_start: datetime,
                            detected_at: datetime, source: str, level: str | None, title: str, actor: str,
                            labels: Mapping[str, Any] | None = None, services: Sequence[str] | None = None,
                            impact_start_method: str | None = None, detail: Mapping[str, Any] | None = None,
                            incident_id: str | None = None) -> str:
    """The id of the incident of this target that is not restored yet, else of a new one (state
    ``detected``, with its ``detected`` event). ``services``: those customers see hit (default: the
    target, when it is a service). A reused incident's impact start only moves earlier; its level
    becomes ``level`` (unless None), its labels gain ``labels``, another source is noted: the changes are one
    ``updated`` event. ``detail`` (observers, alert fields, ...) goes into that event. The caller commits.

    ``incident_id``: the id a cluster node gave the incident while the database was away (its journal
    is being delivered): that incident is created, or updated when its run's start created it first."""
    if target_kind not in TARGET_KINDS:
        raise IncidentError(f"target kind {target_kind!r} is not one of {', '.join(TARGET_KINDS)}")
    impact_start, detected_at = _utc(impact_start), _utc(detected_at)
    if impact_start > detected_at:
        raise IncidentError(f"the impact start {impact_start.isoformat()} of {target_kind} {target_name} is after "
                            f"its detection {detected_at.isoformat()}")
    method = impact_start_method or f"first failure seen ({source})"
    _begin_write(session)
    if incident_id is not None:
        incident = session.get(Incident, incident_id)
    else:
        incident = session.scalars(select(Incident).where(
            Incident.target_kind == target_kind, Incident.target_name == target_name,
            Incident.state.in_(ACTIVE_STATES)).order_by(Incident.created_at.desc()).limit(1)).first()
    if incident is None:
        incident = Incident(
            id=incident_id or new_watch_incident_id(detected_at), created_at=detected_at, created_by=clean_text(actor),
            impact_start=impact_start, impact_start_method=clean_text(method), title=clean_text(title),
            target_kind=target_kind, target_name=clean_text(target_name),
            services=[clean_text(name) for name in (services if services is not None else
                                               [target_name] if target_kind == "service" else [])],
            level=level, source=source, state="detected", labels=_json(dict(labels or {})),
        )
        session.add(incident)
        session.flush()  # before its event, which refers to it
        _add_event(session, incident, "detected", detected_at, actor,
                   {**(detail or {}), "source": source, "level": level, "impact_start": impact_start.isoformat()})
        return incident.id
    changes: dict[str, Any] = {}
    if incident.target_kind is None:  # its run's start, delivered first, opened it without its target
        incident.target_kind, incident.target_name = target_kind, clean_text(target_name)
        incident.services = [clean_text(name) for name in (services if services is not None else
                                                            [target_name] if target_kind == "service" else [])]
        changes["target"] = f"{target_kind} {target_name}"
    if incident.impact_start is None or impact_start < incident.impact_start:
        changes["impact_start"] = {"from": plain(incident.impact_start), "to": impact_start.isoformat()}
        incident.impact_start, incident.impact_start_method = impact_start, clean_text(method)
    if level is not None and level != incident.level:
        changes["level"] = {"from": incident.level, "to": level}
        incident.level = level
    merged = {**(incident.labels or {}), **_json(dict(labels or {}))}
    if merged != (incident.labels or {}):
        changes["labels"] = {key: value for key, value in merged.items() if (incident.labels or {}).get(key) != value}
        incident.labels = merged
    if source not in _sources(incident, _events(session, incident.id)):
        changes["source"] = source  # another source sees it too (an alert, then the watch)
    if changes:
        _add_event(session, incident, "updated", detected_at, actor, {**(detail or {}), **changes})
    return incident.id


# -- incident writes a cluster node journals while the database is away (cluster.journal) ---------------

_MOMENTS = ("impact_start", "detected_at", "at")


def incident_operation(call: str, **arguments: Any) -> dict[str, Any]:
    """A journalable write: ``open`` (``open_or_update_incident``'s arguments, ``incident_id`` given)
    or ``event`` (``record_incident_event``'s). Moments as ISO-8601 text."""
    if call not in ("open", "event"):
        raise IncidentError(f"incident write {call!r} is not open or event")
    return {"call": call, "arguments": {name: _utc(value).isoformat() if name in _MOMENTS else value
                                        for name, value in arguments.items()}}


def apply_incident_operation(session: Session, operation: Mapping[str, Any]) -> None:
    """Replay a journaled ``incident_operation``. The caller commits."""
    arguments: dict[str, Any] = {name: datetime.fromisoformat(value) if name in _MOMENTS else value
                                 for name, value in dict(operation["arguments"]).items()}
    if operation["call"] == "open":
        open_or_update_incident(session, **arguments)
    else:
        record_incident_event(session, **arguments)


def record_incident_event(session: Session, incident_id: str, kind: str, at: datetime, actor: str,
                          data: Mapping[str, Any] | None = None) -> None:
    """A moment of the incident, chained; ``detected``, ``decided``, ``executing``, ``restored`` and
    ``closed`` move its state there. A closed incident takes only messages and updates. The caller commits."""
    if kind not in EVENT_KINDS:
        raise IncidentError(f"incident event kind {kind!r} is not one of {', '.join(EVENT_KINDS)}")
    _begin_write(session)
    incident = _incident(session, incident_id)
    if kind in STATE_EVENTS and incident.state == CLOSED:
        raise IncidentError(f"incident {incident_id!r} is closed: it cannot become {kind}")
    _add_event(session, incident, kind, _utc(at), actor, dict(data or {}))


def say(session: Session, incident_id: str, text: str, actor: str, at: datetime) -> None:
    """Publish ``text`` on the public status page as a message of the incident; ``actor`` is recorded
    (the page names only "the DR team"). The caller commits."""
    if len(text) > MESSAGE_MAX_CHARS:
        raise IncidentError(f"the message has {len(text)} characters; at most {MESSAGE_MAX_CHARS} are published")
    if not text.strip():
        raise IncidentError("the message is blank: write what customers should know")
    record_incident_event(session, incident_id, "message", at, actor, {"text": text.strip()})


def answer_incident(session: Session, incident_id: str, answer: str, actor: str, reason: str, at: datetime) -> None:
    """``approved`` or ``rejected`` by ``actor`` for an incident waiting for approvals. The caller commits."""
    if answer not in APPROVAL_KINDS:
        raise IncidentError(f"answer {answer!r} is not one of {', '.join(APPROVAL_KINDS)}")
    incident = _incident(session, incident_id)
    waiting = any(e.kind == "updated" and e.data.get("awaiting_approval") for e in _events(session, incident_id))
    if incident.state != "detected" or not waiting:
        raise IncidentError(f"incident {incident_id!r} is not waiting for approvals (it is {incident.state})")
    if Identity.parse(actor).anonymous:
        raise IncidentError("root without sudo does not say which person you are: approve through sudo or a token")
    record_incident_event(session, incident_id, answer, at, actor, {"reason": reason})


def incident_answers(session: Session, incident_id: str) -> list[tuple[str, str, datetime]]:
    """Every approval answer of the incident in order: (approved|rejected, actor, at)."""
    return [(e.kind, e.actor, e.at) for e in _events(session, incident_id) if e.kind in APPROVAL_KINDS]


def _add_event(session: Session, incident: Incident, kind: str, at: datetime, actor: str,
               data: dict[str, Any]) -> None:
    session.add(IncidentEvent(incident_id=incident.id, at=at, kind=kind, actor=clean_text(actor), data=_json(data)))
    if kind in STATE_EVENTS and incident.state != kind:
        incident.state = kind
    session.flush()


def _incident(session: Session, incident_id: str) -> Incident:
    incident = session.get(Incident, incident_id)
    if incident is None:
        raise UnknownIncident(f"no incident {incident_id!r} in the evidence database (see `dr incidents list`)")
    return incident


def _events(session: Session, incident_id: str) -> list[IncidentEvent]:
    return list(session.scalars(select(IncidentEvent).where(IncidentEvent.incident_id == incident_id)
                                .order_by(IncidentEvent.at, IncidentEvent.id)))


def _sources(incident: Incident, events: Iterable[IncidentEvent]) -> set[str]:
    """Who reported the incident: its source, and those who saw it too later."""
    return {str(incident.source)} | {str(event.data["source"]) for event in events
                                     if event.kind in ("detected", "updated") and "source" in event.data}


def _begin_write(session: Session) -> None:
    """A write transaction holding the chain head: finding the open incident of a target and opening
    one happen together, whoever else (the watch, an alert) asks at the same moment."""
    begin_write(session)
    lock_chain(session.connection())


def _json(data: dict[str, Any]) -> dict[str, Any]:
    return dict(jsonable(data))


def _utc(moment: datetime) -> datetime:
    if moment.tzinfo is None:
        raise IncidentError(f"the moment {moment.isoformat()} has no time zone: incidents are timed in UTC")
    return moment.astimezone(UTC)


# -- RTO from the lifecycle ------------------------------------------------------------------------


def incident_timeline(session: Session, incident_id: str) -> dict[str, Any]:
    """The incident's moments (each the first of its kind; None when not recorded), the runs it
    executed, and the RTO with its parts: detection = detected - impact start, decision = decided -
    detected, execution = restored - decided, RTO = restored - impact start. Seconds to the
    microsecond, so the parts add up to the RTO; a part is None when one of its ends is missing."""
    incident = _incident(session, incident_id)
    first: dict[str, datetime] = {}
    runs = list(session.scalars(select(Run.id).where(Run.incident_id == incident_id)
                                .order_by(Run.started_at, Run.id)))
    for event in _events(session, incident_id):
        first.setdefault(event.kind, event.at)
        run_id = event.data.get("run_id") if event.kind == EXECUTING else None
        if isinstance(run_id, str) and run_id not in runs:
            runs.append(run_id)
    impact = incident.impact_start
    detected, decided, restored = first.get("detected"), first.get("decided"), first.get("restored")
    return {
        "impact_start": plain(impact), "impact_start_method": incident.impact_start_method,
        "detected": plain(detected), "decided": plain(decided), "executing": plain(first.get(EXECUTING)),
        "run_ids": runs, "restored": plain(restored), "closed": plain(first.get(CLOSED)),
        "detection_s": _seconds(impact, detected), "decision_s": _seconds(detected, decided),
        "execution_s": _seconds(decided, restored), "rto_s": _seconds(impact, restored),
    }


def restored_at(session: Session, run_id: str) -> datetime | None:
    """When the run had every service it measured verified healthy again (the latest of their
    ``service_restored`` moments); None when one was not restored or nothing was measured."""
    moments = list(session.scalars(select(ServiceResult.restored_at).where(ServiceResult.run_id == run_id)))
    return None if not moments or None in moments else max(m for m in moments if m is not None)


def _seconds(start: datetime | None, end: datetime | None) -> float | None:
    return None if start is None or end is None else (end - start) / timedelta(microseconds=1) / 1e6


# -- the public status page ---------------------------------------------------------------------------

# What customers read: a state per service and the messages the team published, nothing internal
# (no hosts, runs, labels, levels nor people: every message is the DR team's).
OPERATIONAL, DEGRADED, OUTAGE, RESTORED_RECENTLY = "operational", "degraded", "outage", "restored-recently"
PUBLIC_AUTHOR = "the DR team"
RECENTLY = timedelta(hours=24)  # how long a restored service says so, and its incident's messages stay up
_GRAVITY = {OUTAGE: 3, DEGRADED: 2, RESTORED_RECENTLY: 1, OPERATIONAL: 0}


def public_status(session: Session, services: Sequence[str], *, now: datetime | None = None,
                  recently: timedelta = RECENTLY) -> dict[str, Any]:
    """Per service (``services``, then any other an incident shown hits): ``outage`` while an incident
    the watch confirmed (independent observers agree) is not restored, ``degraded`` while only an
    alert or a person reported one, ``restored-recently`` for ``recently`` after its restoration,
    else ``operational``; with ``since``. And the messages of those incidents, newest first. Two queries."""
    now = now or utcnow()
    restored_lately = select(IncidentEvent.incident_id).where(IncidentEvent.kind == "restored",
                                                              IncidentEvent.at >= now - recently)
    shown = list(session.scalars(select(Incident).where(
        Incident.target_kind.is_not(None),
        or_(Incident.state.in_(ACTIVE_STATES), Incident.id.in_(restored_lately)))))
    events = list(session.scalars(select(IncidentEvent).where(
        IncidentEvent.incident_id.in_([incident.id for incident in shown]),
        IncidentEvent.kind.in_(("detected", "updated", "restored", "message")))
        .order_by(IncidentEvent.at.desc(), IncidentEvent.id.desc()))) if shown else []
    states: dict[str, tuple[str, datetime | None]] = {name: (OPERATIONAL, None) for name in services}
    for incident in shown:
        own = [event for event in events if event.incident_id == incident.id]
        for name in incident.services or []:
            states[name] = _graver(states.get(name, (OPERATIONAL, None)), _public_state(incident, own))
    named = list(dict.fromkeys(services)) + sorted(set(states) - set(services))
    hits = {incident.id: sorted(incident.services or []) for incident in shown}
    return {
        "updated_at": now.isoformat(),
        "services": [{"service": name, "state": states[name][0], "since": plain(states[name][1])} for name in named],
        "messages": [{"at": event.at.isoformat(), "text": str(event.data.get("text", "")),
                      "services": hits[event.incident_id], "by": PUBLIC_AUTHOR}
                     for event in events if event.kind == "message"],
    }


def _public_state(incident: Incident, events: list[IncidentEvent]) -> tuple[str, datetime]:
    """What one incident shown (``events``: its own) says of the services it hits, and since when."""
    if incident.state in ACTIVE_STATES:
        confirmed = WATCH in _sources(incident, events)
        return OUTAGE if confirmed else DEGRADED, incident.impact_start or incident.created_at
    return RESTORED_RECENTLY, max(event.at for event in events if event.kind == "restored")


def _graver(current: tuple[str, datetime | None], candidate: tuple[str, datetime]) -> tuple[str, datetime | None]:
    """The graver of two states; of two alike, the disruption that began first or the latest restoration."""
    (state, since), (other, other_since) = current, candidate
    if _GRAVITY[other] != _GRAVITY[state] or since is None:
        return candidate if _GRAVITY[other] >= _GRAVITY[state] else current
    earlier = other_since < since
    return candidate if earlier != (other == RESTORED_RECENTLY) else current
