"""Achieved RTO and RPO per service, from recorded facts only. Pure functions: no database, no clock.

RTO = restored - impact start, where ``restored`` is the ``service_restored`` marker's time (already
the first good probe of the verifying streak) and the impact start (``incident_at``) is, in this order:
  - the earliest of a measured first failure (a ``fault_detected`` mark; for a run of an incident, what
    its earlier attempts saw of the service failing) and the declared incident time;
  - for a planned run, the ``disruption_started`` marker (the step that began the clients' outage,
    e.g. stopping writes);
  - the start of the incident's first attempt, or the run's own start. A failover counted from a run's
    start says so (``RUN_START_WARNING``): the outage began before anyone started the run.
Its parts add up to it:
  detection = incident -> run start (0 when the incident was declared after the run started),
  decision  = time spent in approval steps between then and ``restored``,
  execution = the rest of the way to ``restored``.
RPO = the ``rpo_s`` measurement recorded for the service (or for the whole run); never assumed. A
method that refused to measure (``rpo.not_measured``: e.g. its newest reading is later than the
incident) leaves no figure, and its reason is the RPO method.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any

RESTORED_MARKER = "service_restored"
# For planned runs (switchover, failback) with no declared incident: the step that starts the
# clients' outage (e.g. stopping writes) carries this mark, so preparation does not count as outage.
DISRUPTION_MARKER = "disruption_started"
RPO_METRIC = "rpo_s"
APPROVAL_ACTION = "approval"
# A step that saw the fault carries this mark: its time is a measured first failure.
DETECTED_MARKER = "fault_detected"
# What an RPO method reports when it refuses to give a figure (data: services, reason).
RPO_NOT_MEASURED = "rpo.not_measured"
# Every report, export and summary shows it with the RTO method of a failover counted from a run's start.
RUN_START_WARNING = "RTO counted from run start: may understate the outage"


@dataclass(frozen=True)
class Targets:
    rto_s: float | None
    rpo_s: float | None


@dataclass(frozen=True)
class MarkerFact:
    """A ``service_restored`` marker; ``service`` None stands for every service in the run's scope."""

    service: str | None
    at: datetime
    step_id: str
    record_id: int | None = None


@dataclass(frozen=True)
class Interval:
    start: datetime
    end: datetime
    step_id: str = ""


@dataclass(frozen=True)
class RpoReading:
    """An ``rpo_s`` measurement; ``service`` None stands for every service in the run's scope."""

    service: str | None
    value: float
    method: str
    at: datetime
    step_id: str
    record_id: int | None = None


@dataclass(frozen=True)
class ImpactFact:
    """A measured failure: ``service`` (None: every service in the run's scope) seen failing at
    ``at``; ``source`` says where it was seen, for the method."""

    service: str | None
    at: datetime
    source: str


@dataclass(frozen=True)
class RpoRefusal:
    """An RPO method that would not give a figure, and why; ``service`` None: every service."""

    service: str | None
    reason: str
    step_id: str
    record_id: int | None = None


@dataclass(frozen=True)
class ImpactStart:
    moment: datetime
    source: str
    from_run_start: bool


@dataclass(frozen=True)
class ServiceFigures:
    service: str
    incident_at: datetime
    run_started_at: datetime
    restored_at: datetime | None
    detection_s: float | None
    decision_s: float | None
    execution_s: float | None
    rto_s: float | None
    rto_target_s: float | None
    rto_met: bool | None
    rto_method: str
    rpo_s: float | None
    rpo_target_s: float | None
    rpo_met: bool | None
    rpo_method: str
    raw: dict[str, Any] = field(default_factory=dict)


def seconds(start: datetime, end: datetime) -> float:
    return (end - start).total_seconds()


def is_met(value: float | None, target: float | None) -> bool | None:
    """Met when ``value <= target``; None when there is no target, or no value to judge."""
    if target is None or value is None:
        return None
    return value <= target


def restored_marker(service: str, markers: Iterable[MarkerFact]) -> MarkerFact | None:
    """The earliest restore of ``service``: its own marker if it has one, else a run-wide one."""
    own = [m for m in markers if m.service == service]
    candidates = own or [m for m in markers if m.service is None]
    return min(candidates, key=lambda m: m.at, default=None)


def overlap_seconds(intervals: Iterable[Interval], start: datetime, end: datetime) -> float:
    """Length of the union of ``intervals`` clipped to [start, end] (parallel approvals count once)."""
    clipped = sorted((max(i.start, start), min(i.end, end)) for i in intervals)
    total = 0.0
    cursor = start
    for lo, hi in clipped:
        lo = max(lo, cursor)
        if hi > lo:
            total += seconds(lo, hi)
            cursor = hi
    return total


def rpo_reading(service: str, readings: Iterable[RpoReading]) -> RpoReading | None:
    """The service's own reading if any, else a run-wide one; of several, the largest (the worst
    data loss measured is the one the run achieved)."""
    own = [r for r in readings if r.service == service]
    candidates = own or [r for r in readings if r.service is None]
    return max(candidates, key=lambda r: (r.value, r.at), default=None)


def impact_start(
    service: str,
    run_started_at: datetime,
    declared_incident_at: datetime | None,
    disruption_at: datetime | None = None,
    impacts: Sequence[ImpactFact] = (),
    first_attempt: tuple[datetime, str] | None = None,
) -> ImpactStart:
    """When the service's outage began, as well as the run knows it (see the module's docstring).
    ``first_attempt``: the start of the incident's first run and its id, when that is not this run."""
    measured = min((fact for fact in impacts if fact.service in (service, None)), key=lambda f: f.at, default=None)
    if measured is not None and (declared_incident_at is None or measured.at < declared_incident_at):
        before = " (before the declared time)" if declared_incident_at is not None else ""
        return ImpactStart(measured.at, f"measured first failure: {measured.source}{before}", False)
    if declared_incident_at is not None:
        return ImpactStart(declared_incident_at, "declared", False)
    if disruption_at is not None:
        return ImpactStart(disruption_at, f"{DISRUPTION_MARKER} marker (planned run)", False)
    if first_attempt is not None and first_attempt[0] < run_started_at:
        return ImpactStart(first_attempt[0], f"start of the incident's first attempt, run {first_attempt[1]} "
                                             "(no failure measured, no incident time declared)", True)
    return ImpactStart(run_started_at, "run start (no incident time declared)", True)


def figures_for(
    service: str,
    targets: Targets,
    run_started_at: datetime,
    declared_incident_at: datetime | None,
    markers: Sequence[MarkerFact],
    approvals: Sequence[Interval],
    readings: Sequence[RpoReading],
    disruption_at: datetime | None = None,
    *,
    impacts: Sequence[ImpactFact] = (),
    first_attempt: tuple[datetime, str] | None = None,
    refusals: Sequence[RpoRefusal] = (),
    failover: bool = False,
) -> ServiceFigures:
    """``failover``: the run is a failover, whose RTO counted from a run's start carries RUN_START_WARNING."""
    start = impact_start(service, run_started_at, declared_incident_at, disruption_at, impacts, first_attempt)
    incident_at, incident_source = start.moment, start.source
    marker = restored_marker(service, markers)
    raw: dict[str, Any] = {
        "incident_at": incident_at.isoformat(),
        "incident_source": incident_source,
        "run_started_at": run_started_at.isoformat(),
    }

    restored_at: datetime | None = None
    detection_s: float | None = None
    decision_s: float | None = None
    execution_s: float | None = None
    rto_s: float | None = None
    if marker is not None:
        restored_at = marker.at
        work_start = max(incident_at, run_started_at)
        detection_s = seconds(incident_at, work_start)
        decision_s = overlap_seconds(approvals, work_start, restored_at)
        rto_s = seconds(incident_at, restored_at)
        execution_s = rto_s - detection_s - decision_s
        rto_method = f"{RESTORED_MARKER} marker of step {marker.step_id!r} minus incident time ({incident_source})"
        if failover and start.from_run_start:
            rto_method += f"; {RUN_START_WARNING}"
            raw["warnings"] = [RUN_START_WARNING]
        raw["restored_at"] = restored_at.isoformat()
        raw["restored_marker"] = {"step_id": marker.step_id, "service": marker.service, "id": marker.record_id}
        raw["approval_intervals"] = [
            {"step_id": i.step_id, "start": i.start.isoformat(), "end": i.end.isoformat()} for i in approvals
        ]
        rto_met = is_met(rto_s, targets.rto_s)
    else:
        rto_method = f"not restored: the run recorded no {RESTORED_MARKER} marker for this service"
        # A service that was never verified back has missed any target it has.
        rto_met = None if targets.rto_s is None else False

    reading = rpo_reading(service, readings)
    if reading is not None:
        rpo_s: float | None = reading.value
        rpo_method = reading.method
        raw["rpo_measurement"] = {
            "step_id": reading.step_id,
            "service": reading.service,
            "value": reading.value,
            "at": reading.at.isoformat(),
            "id": reading.record_id,
        }
    elif (refusal := next((r for r in refusals if r.service in (service, None)), None)) is not None:
        rpo_s = None
        rpo_method = refusal.reason
        raw["rpo_refusal"] = {"step_id": refusal.step_id, "service": refusal.service, "id": refusal.record_id}
    else:
        rpo_s = None
        rpo_method = f"not measured: the run recorded no {RPO_METRIC} measurement for this service"

    return ServiceFigures(
        service=service,
        incident_at=incident_at,
        run_started_at=run_started_at,
        restored_at=restored_at,
        detection_s=detection_s,
        decision_s=decision_s,
        execution_s=execution_s,
        rto_s=rto_s,
        rto_target_s=targets.rto_s,
        rto_met=rto_met,
        rto_method=rto_method,
        rpo_s=rpo_s,
        rpo_target_s=targets.rpo_s,
        rpo_met=is_met(rpo_s, targets.rpo_s),
        rpo_method=rpo_method,
        raw=raw,
    )


def service_figures(
    targets: Mapping[str, Targets],
    run_started_at: datetime,
    declared_incident_at: datetime | None,
    markers: Sequence[MarkerFact],
    approvals: Sequence[Interval],
    readings: Sequence[RpoReading],
    disruption_at: datetime | None = None,
    **incident: Any,
) -> list[ServiceFigures]:
    """Figures for every service in ``targets`` (the run's scope), in its order; ``incident``: the
    keyword arguments of ``figures_for`` (impacts, first_attempt, refusals, failover)."""
    return [
        figures_for(service, target, run_started_at, declared_incident_at, markers, approvals, readings,
                    disruption_at, **incident)
        for service, target in targets.items()
    ]
