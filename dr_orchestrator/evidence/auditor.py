"""The fifteen things an auditor asks of every DR test, defined once: the export (``dr evidence
export``, JSON nested and CSV flat), the evidence packs and the DR test record of a run all use
``AuditorFields``.

One row is one finished run and one service in its scope (the grain of ``service_results``). The
sixteen columns earlier versions exported come first, unchanged, so scripts reading them keep
working; the fifteen fields follow.
"""

from __future__ import annotations

import csv
import dataclasses
import io
import json
from collections import defaultdict
from collections.abc import Sequence
from dataclasses import dataclass, field
from datetime import date, datetime
from typing import Any, NamedTuple, get_type_hints

from sqlalchemy import String, cast, select
from sqlalchemy.orm import Session

from dr_orchestrator.evidence import chain, drills, qualifying
from dr_orchestrator.evidence.anchors import recorded_anchor_covering
from dr_orchestrator.evidence.annotations import list_findings, reconciliation_entry
from dr_orchestrator.evidence.models import (
    ActionEventRecord,
    Approval,
    AuditEntry,
    DrillExpectation,
    DrillRun,
    Marker,
    Notification,
    Reconciliation,
    Run,
    RunService,
    ServiceResult,
    StepRecord,
)
from dr_orchestrator.evidence.provenance import GIT_COMMIT_EVENT
from dr_orchestrator.evidence.queries import as_dict, plain
from dr_orchestrator.evidence.timeline import timeline
from dr_orchestrator.evidence.values import derive_test_type

# A service's achieved RTO and RPO against its targets, in the order every export of results lists them.
FIGURE_FIELDS = (
    "incident_at",
    "restored_at",
    "rto_s",
    "rto_target_s",
    "rto_met",
    "rpo_s",
    "rpo_target_s",
    "rpo_met",
)
LEGACY_FIELDS = (
    "run_id",
    "runbook",
    "kind",
    "state",
    "service",
    "run_started_at",
    *FIGURE_FIELDS,
    "rto_method",
    "rpo_method",
)


@dataclass(frozen=True)
class TestLabel:
    type: str
    trigger: str
    kind: str
    counts_as: str  # qualifying.counts_as: test, a drill's failover or part, failback, not executed
    drill_run_id: str | None  # the drill this run was a stage of, if any
    drill: str | None
    drill_stage: str | None
    drill_verdict: str | None


@dataclass(frozen=True)
class Scope:
    service: str
    tier: str | None
    criticality: str | None
    services: list[str]  # every service in the run's scope
    sites: list[str]


@dataclass(frozen=True)
class PlanVersions:
    runbook_name: str
    runbook_path: str
    runbook_sha256: str
    inventory_name: str
    inventory_path: str
    inventory_sha256: str
    parameters_sha256: str
    git_commit: str | None  # HEAD of the checkout the runbook was in at run start; None: not in a checkout
    git_runbook_modified: bool | None  # the runbook differed from that commit (uncommitted changes)


@dataclass(frozen=True)
class Targets:
    """Fixed before the test: the inventory's, recorded at run start; a drill's own expectations beside them."""

    rto_s: float | None
    rpo_s: float | None
    drill_rto_s: float | None
    drill_rpo_s: float | None


@dataclass(frozen=True)
class Participants:
    approvers: list[str]
    pre_approved_by: str | None
    orchestrator_host: str


@dataclass(frozen=True)
class Measured:
    incident_at: str | None
    restored_at: str | None
    rto_s: float | None
    rto_met: bool | None
    rto_method: str
    rpo_s: float | None
    rpo_met: bool | None
    rpo_method: str


@dataclass(frozen=True)
class Integrity:
    """Where the test's records sit in the audit hash chain."""

    entries: int  # chain entries of the run's records
    first_seq: int | None
    last_seq: int | None
    last_entry_sha256: str | None
    run_entries: list[dict[str, Any]]  # the run row's own entries: seq, operation, entry_sha256
    # The first signed anchor recorded as covering last_seq (seq, head_sha256, at, key, sinks): every
    # record of the test is then vouched for outside the database. None: no anchor covers it yet.
    anchor: dict[str, Any] | None


@dataclass(frozen=True)
class Retention:
    retain_until: str | None


@dataclass(frozen=True)
class Failback:
    of_run: str | None  # this run fails back that one
    runs: list[dict[str, Any]]  # runs failing this one back: id, state, started_at, finished_at


@dataclass(frozen=True)
class AuditorFields:
    test: TestLabel
    scope: Scope
    scenario: str | None
    plan_versions: PlanVersions
    targets: Targets
    participants: Participants
    timeline: list[dict[str, Any]]
    measured: Measured
    data_reconciliation: list[dict[str, Any]]
    findings: list[dict[str, Any]]  # id, severity, owner, due, open, overdue, text
    reported_to: list[dict[str, Any]]  # recipients and delivery status of the notifications sent
    integrity: Integrity
    retention: Retention
    started_by: str
    failback: Failback


class ChainLink(NamedTuple):
    seq: int
    table_name: str
    record_id: str
    operation: str
    entry_sha256: str


@dataclass
class _Batch:
    """What the rows of many runs need, read once for all of them."""

    drills: dict[str, tuple[DrillRun, str]] = field(default_factory=dict)
    expectations: dict[tuple[str, str, str], float | None] = field(default_factory=dict)
    notifications: dict[str, list[dict[str, Any]]] = field(default_factory=lambda: defaultdict(list))
    approvers: dict[str, set[str]] = field(default_factory=lambda: defaultdict(set))
    reconciliations: dict[str, list[dict[str, Any]]] = field(default_factory=lambda: defaultdict(list))
    findings: dict[str, list[dict[str, Any]]] = field(default_factory=lambda: defaultdict(list))
    failbacks: dict[str, list[dict[str, Any]]] = field(default_factory=lambda: defaultdict(list))
    git: dict[str, dict[str, Any]] = field(default_factory=dict)
    changed: set[str] = field(default_factory=set)  # runs that changed something (their first change)
    chain: dict[str, list[ChainLink]] = field(default_factory=lambda: defaultdict(list))
    markers: dict[str, list[dict[str, Any]]] = field(default_factory=lambda: defaultdict(list))
    steps: dict[str, list[dict[str, Any]]] = field(default_factory=lambda: defaultdict(list))
    scope: dict[tuple[str, str], RunService] = field(default_factory=dict)


# -- building the rows ------------------------------------------------------------------------------


def _read_batch(session: Session, run_ids: Sequence[str], today: date | None) -> _Batch:
    batch = _Batch()
    stage_columns = {stage: getattr(DrillRun, f"{stage}_run_id") for stage in drills.RUN_STAGES}
    for stage, column in stage_columns.items():
        for record in session.scalars(select(DrillRun).where(column.in_(run_ids))):
            batch.drills[getattr(record, f"{stage}_run_id")] = (record, stage)
    drill_ids = {record.id for record, _ in batch.drills.values()}
    for expectation in session.scalars(select(DrillExpectation).where(DrillExpectation.drill_run_id.in_(drill_ids))):
        batch.expectations[(expectation.drill_run_id, expectation.service, expectation.kind)] = expectation.target
    for note in session.scalars(select(Notification).where(Notification.drill_run_id.in_(drill_ids))
                                .order_by(Notification.at, Notification.id)):
        batch.notifications[str(note.drill_run_id)].append(
            {"event": note.event, "channel": note.channel, "recipient": note.target, "delivered": note.delivered,
             "attempts": note.attempts, "at": plain(note.at), "detail": note.detail})
    for run_id, actor in session.execute(select(Approval.run_id, Approval.actor).where(Approval.run_id.in_(run_ids))):
        batch.approvers[run_id].add(actor)
    for reconciliation in session.scalars(select(Reconciliation).where(Reconciliation.run_id.in_(run_ids))
                                          .order_by(Reconciliation.id)):
        batch.reconciliations[reconciliation.run_id].append(reconciliation_entry(as_dict(reconciliation)))
    for finding in list_findings(session, run_ids=list(run_ids), today=today):
        batch.findings[finding["run_id"]].append(
            {key: finding[key] for key in ("id", "severity", "owner", "due", "open", "overdue", "text")})
    for run in session.scalars(select(Run).where(Run.failback_of.in_(run_ids)).order_by(Run.started_at)):
        batch.failbacks[str(run.failback_of)].append(
            {"id": run.id, "state": run.state, "started_at": plain(run.started_at),
             "finished_at": plain(run.finished_at)})
    for event in session.scalars(select(ActionEventRecord).where(ActionEventRecord.run_id.in_(run_ids),
                                                                 ActionEventRecord.kind == GIT_COMMIT_EVENT)):
        batch.git[event.run_id] = event.data
    batch.changed = set(session.scalars(select(ActionEventRecord.run_id).where(
        ActionEventRecord.run_id.in_(run_ids), ActionEventRecord.kind == qualifying.FIRST_CHANGE)))
    for row in session.scalars(select(RunService).where(RunService.run_id.in_(run_ids))):
        batch.scope[(row.run_id, row.service)] = row
    for marker in session.scalars(select(Marker).where(Marker.run_id.in_(run_ids))):
        batch.markers[marker.run_id].append(as_dict(marker))
    for step in session.scalars(select(StepRecord).where(StepRecord.run_id.in_(run_ids))):
        batch.steps[step.run_id].append(as_dict(step))
    _read_chain(session, run_ids, batch)
    return batch


def _read_chain(session: Session, run_ids: Sequence[str], batch: _Batch) -> None:
    columns = (AuditEntry.seq, AuditEntry.table_name, AuditEntry.record_id, AuditEntry.operation,
               AuditEntry.entry_sha256)
    own = select(*columns).where(AuditEntry.table_name == Run.__tablename__, AuditEntry.record_id.in_(run_ids))
    for row in session.execute(own):
        batch.chain[row.record_id].append(ChainLink(*row))
    # Rows of every chained table with a run_id column are the run's records.
    for table in (t for t in chain.CHAINED_TABLES.values() if "run_id" in t.c):
        query = (
            select(table.c.run_id.label("owner"), *columns)
            .join(AuditEntry, (AuditEntry.table_name == table.name)
                  & (AuditEntry.record_id == cast(table.c.id, String)))
            .where(table.c.run_id.in_(run_ids))
        )
        for row in session.execute(query):
            batch.chain[row.owner].append(ChainLink(row.seq, row.table_name, row.record_id, row.operation,
                                                    row.entry_sha256))


def _integrity(session: Session, links: list[ChainLink], run_id: str) -> Integrity:
    links = sorted(links)
    last = links[-1] if links else None
    return Integrity(
        entries=len(links),
        first_seq=links[0].seq if links else None,
        last_seq=last.seq if last else None,
        last_entry_sha256=last.entry_sha256 if last else None,
        run_entries=[{"seq": e.seq, "operation": e.operation, "entry_sha256": e.entry_sha256}
                     for e in links if e.table_name == Run.__tablename__ and e.record_id == run_id],
        anchor=recorded_anchor_covering(session, last.seq) if last else None,
    )


def _timeline_of(run: Run, results: list[ServiceResult], batch: _Batch) -> list[dict[str, Any]]:
    detail = {
        "run": as_dict(run, exclude=("runbook_text", "inventory_text")),
        "markers": batch.markers[run.id],
        "steps": batch.steps[run.id],
        "results": [as_dict(r) for r in results],
    }
    return timeline(detail, batch.failbacks[run.id])


def auditor_rows(session: Session, run_ids: Sequence[str] | None = None, service: str | None = None,
                 since: datetime | None = None, today: date | None = None) -> list[dict[str, Any]]:
    """One row per finished run and service in scope, oldest first: the sixteen LEGACY_FIELDS, then
    the fifteen ``AuditorFields`` nested. ``today``: the day findings are judged overdue against."""
    query = (
        select(Run, ServiceResult)
        .join(ServiceResult, ServiceResult.run_id == Run.id)
        .order_by(Run.started_at, Run.id, ServiceResult.id)
    )
    if run_ids is not None:
        query = query.where(Run.id.in_(run_ids))
    if service is not None:
        query = query.where(ServiceResult.service == service)
    if since is not None:
        query = query.where(Run.started_at >= since)
    pairs = [(run, result) for run, result in session.execute(query)]
    by_run: dict[str, list[ServiceResult]] = defaultdict(list)
    for run, result in pairs:
        by_run[run.id].append(result)
    batch = _read_batch(session, list(by_run), today)
    runs = {run.id: run for run, _ in pairs}
    timelines = {key: _timeline_of(run, by_run[key], batch) for key, run in runs.items()}
    integrity = {key: _integrity(session, batch.chain[key], key) for key in runs}
    rows = []
    for run, result in pairs:
        fields = _fields(run, result, batch, timelines[run.id], integrity[run.id])
        rows.append(_legacy(run, result) | dataclasses.asdict(fields))
    return rows


def _legacy(run: Run, result: ServiceResult) -> dict[str, Any]:
    return {
        "run_id": run.id, "runbook": run.runbook_name, "kind": run.kind, "state": run.state,
        "service": result.service, "run_started_at": plain(result.run_started_at),
        "incident_at": plain(result.incident_at), "restored_at": plain(result.restored_at), "rto_s": result.rto_s,
        "rto_target_s": result.rto_target_s, "rto_met": result.rto_met, "rpo_s": result.rpo_s,
        "rpo_target_s": result.rpo_target_s, "rpo_met": result.rpo_met, "rto_method": result.rto_method,
        "rpo_method": result.rpo_method,
    }


def _fields(run: Run, result: ServiceResult, batch: _Batch, events: list[dict[str, Any]], integrity: Integrity
            ) -> AuditorFields:
    drill, stage = batch.drills.get(run.id, (None, None))
    scope_row = batch.scope.get((run.id, result.service))
    git = batch.git.get(run.id) or {}

    def expected(kind: str) -> float | None:
        return batch.expectations.get((drill.id, result.service, kind)) if drill else None

    return AuditorFields(
        test=TestLabel(
            type=run.test_type or derive_test_type(run.kind, run.trigger, run.scenario), trigger=run.trigger,
            kind=run.kind, counts_as=qualifying.counts_as(run.kind, stage, run.id in batch.changed),
            drill_run_id=drill.id if drill else None, drill=drill.drill_name if drill else None,
            drill_stage=stage, drill_verdict=drill.verdict if drill else None),
        scope=Scope(
            service=result.service, tier=scope_row.tier if scope_row else None,
            criticality=scope_row.criticality if scope_row else None,
            services=sorted(s for r, s in batch.scope if r == run.id), sites=list(run.sites)),
        scenario=run.scenario or (drill.scenario if drill else None),
        plan_versions=PlanVersions(
            runbook_name=run.runbook_name, runbook_path=run.runbook_path, runbook_sha256=run.runbook_sha256,
            inventory_name=run.inventory_name, inventory_path=run.inventory_path,
            inventory_sha256=run.inventory_sha256, parameters_sha256=run.parameters_sha256,
            git_commit=git.get("commit"), git_runbook_modified=git.get("runbook_modified")),
        targets=Targets(
            rto_s=scope_row.rto_target_s if scope_row else result.rto_target_s,
            rpo_s=scope_row.rpo_target_s if scope_row else result.rpo_target_s,
            drill_rto_s=expected("rto"), drill_rpo_s=expected("rpo")),
        participants=Participants(approvers=sorted(batch.approvers[run.id]), pre_approved_by=run.pre_approved_by,
                                  orchestrator_host=run.orchestrator_host),
        timeline=[e for e in events if e["service"] in (None, result.service)],
        measured=Measured(
            incident_at=plain(result.incident_at), restored_at=plain(result.restored_at), rto_s=result.rto_s,
            rto_met=result.rto_met, rto_method=result.rto_method, rpo_s=result.rpo_s, rpo_met=result.rpo_met,
            rpo_method=result.rpo_method),
        data_reconciliation=[r for r in batch.reconciliations[run.id] if r["service"] in (None, result.service)],
        findings=batch.findings[run.id],
        reported_to=batch.notifications[drill.id] if drill else [],
        integrity=integrity,
        retention=Retention(retain_until=plain(run.retain_until)),
        started_by=run.started_by,
        failback=Failback(of_run=run.failback_of, runs=batch.failbacks[run.id]),
    )


# -- CSV: the nested fields flattened ---------------------------------------------------------------


def csv_fields() -> tuple[str, ...]:
    """The CSV header: LEGACY_FIELDS, then each of the fifteen fields, a nested one as
    ``<field>_<part>`` (``test_type``, ``plan_versions_runbook_sha256``, ...); lists as JSON text."""
    columns = list(LEGACY_FIELDS)
    for name, kind in get_type_hints(AuditorFields).items():
        columns += [f"{name}_{part}" for part in get_type_hints(kind)] if dataclasses.is_dataclass(kind) else [name]
    return tuple(columns)


def _flat(row: dict[str, Any]) -> dict[str, Any]:
    flat = {key: row[key] for key in LEGACY_FIELDS}
    for f in dataclasses.fields(AuditorFields):
        value = row[f.name]
        if isinstance(value, dict):
            flat.update({f"{f.name}_{part}": inner for part, inner in value.items()})
        else:
            flat[f.name] = value
    return flat


def _csv_cell(value: Any) -> Any:
    if value is None:
        return ""  # unknown stays empty: never a made-up zero
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, (dict, list)):
        return json.dumps(value, sort_keys=True)
    return value


def rows_as_csv(rows: Sequence[dict[str, Any]]) -> str:
    header = csv_fields()
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=header, lineterminator="\n")
    writer.writeheader()
    for row in rows:
        flat = _flat(row)
        writer.writerow({key: _csv_cell(flat[key]) for key in header})
    return buffer.getvalue()


def rows_as_json(rows: Sequence[dict[str, Any]]) -> str:
    return json.dumps(list(rows), indent=2) + "\n"


def export_evidence(
    session: Session, fmt: str = "json", service: str | None = None, since: datetime | None = None
) -> str:
    """One row per finished run and service in scope (``auditor_rows``: the fifteen auditor fields),
    as ``json`` (a list of objects, the fields nested) or ``csv`` (a header, then one line per row, the
    fields flattened)."""
    if fmt not in ("json", "csv"):
        raise ValueError(f"unknown export format {fmt!r}: use json or csv")
    rows = auditor_rows(session, service=service, since=since)
    return rows_as_csv(rows) if fmt == "csv" else rows_as_json(rows)
