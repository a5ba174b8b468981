"""The evidence schema, as SQLAlchemy 2 typed ORM classes.

Rows are written once and finished once (a step: pending -> running -> finished); nothing is
deleted. Every table has its own primary key and a ``recorded_at``, so an audit chain, approvals,
drill verdicts, findings and notifications can later refer to any record without reshaping these.
The Alembic migrations in ``alembic/versions`` create this schema; keep the two in step.
"""

from __future__ import annotations

from datetime import date, datetime
from typing import Any

from sqlalchemy import JSON, Boolean, Date, Float, ForeignKey, Index, Integer, MetaData, String, Text, UniqueConstraint
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column

from dr_orchestrator.evidence.types import UTCDateTime
from dr_orchestrator.model.events import utcnow
from dr_orchestrator.model.names import MAX_LABEL, MAX_NAME

# Named constraints: Alembic can then alter and drop them on every backend (SQLite batch mode too).
NAMING_CONVENTION = {
    "ix": "ix_%(table_name)s_%(column_0_N_name)s",
    "uq": "uq_%(table_name)s_%(column_0_N_name)s",
    "ck": "ck_%(table_name)s_%(constraint_name)s",
    "fk": "fk_%(table_name)s_%(column_0_name)s_%(referred_table_name)s",
    "pk": "pk_%(table_name)s",
}

STATE = String(20)
NAME = String(MAX_NAME)  # the model refuses longer names when a file is read
LABEL = String(MAX_LABEL)
SHA256 = String(64)


class Base(DeclarativeBase):
    metadata = MetaData(naming_convention=NAMING_CONVENTION)
    type_annotation_map = {datetime: UTCDateTime(), dict[str, Any]: JSON(), list[Any]: JSON()}


class Recorded:
    """When this database learned of the record (the event's own time is in its other columns)."""

    recorded_at: Mapped[datetime] = mapped_column(default=utcnow)


class Incident(Recorded, Base):
    """One disruption, from its impact start on, linking its runs (attempts, retries, the failback).
    Only the impact start (and how it was determined) changes as earlier failures become known, and
    its state, level and labels as its lifecycle goes on (each change an ``IncidentEvent`` too).
    The lifecycle columns are NULL on incidents recorded before them."""

    __tablename__ = "incidents"

    id: Mapped[str] = mapped_column(String(64), primary_key=True)
    created_at: Mapped[datetime]
    created_by: Mapped[str] = mapped_column(NAME)
    impact_start: Mapped[datetime | None] = mapped_column(comment="the earliest impact known; None: no run yet")
    impact_start_method: Mapped[str | None] = mapped_column(Text, comment="how impact_start was determined")
    declared_at: Mapped[datetime | None] = mapped_column(comment="the incident time declared when it was created")
    title: Mapped[str] = mapped_column(Text)
    target_kind: Mapped[str | None] = mapped_column(String(10), comment="service | site; None: opened by a run")
    target_name: Mapped[str | None] = mapped_column(NAME)
    services: Mapped[list[Any] | None] = mapped_column(comment="the services it hits, as the status page names them")
    level: Mapped[str | None] = mapped_column(NAME, comment="the inventory's severity level")
    source: Mapped[str | None] = mapped_column(
        String(50), comment="watch | alert:alertmanager | alert:webhook | manual run")
    state: Mapped[str | None] = mapped_column(
        STATE, comment="open | detected | decided | executing | restored | closed")
    labels: Mapped[dict[str, Any] | None]

    __table_args__ = (Index(None, "created_at"), Index(None, "target_kind", "target_name", "state"))


class IncidentEvent(Recorded, Base):
    """One moment of an incident's lifecycle (suspected, detected, decided, executing, restored,
    closed), a status message published (``message``) or a change of what is known (``updated``)."""

    __tablename__ = "incident_events"

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    incident_id: Mapped[str] = mapped_column(String(64), ForeignKey("incidents.id"))
    at: Mapped[datetime]
    kind: Mapped[str] = mapped_column(STATE)
    actor: Mapped[str] = mapped_column(NAME)
    data: Mapped[dict[str, Any]]

    __table_args__ = (Index(None, "incident_id", "at"), Index(None, "kind", "at"))


class Run(Recorded, Base):
    __tablename__ = "runs"

    id: Mapped[str] = mapped_column(String(36), primary_key=True)
    runbook_name: Mapped[str] = mapped_column(NAME)
    kind: Mapped[str] = mapped_column(STATE)
    state: Mapped[str] = mapped_column(STATE)
    trigger: Mapped[str] = mapped_column(String(50))
    started_by: Mapped[str] = mapped_column(NAME)
    reason: Mapped[str] = mapped_column(Text)
    orchestrator_host: Mapped[str] = mapped_column(NAME)
    incident_at: Mapped[datetime | None] = mapped_column(comment="declared incident time; None: the run's start")
    started_at: Mapped[datetime]
    finished_at: Mapped[datetime | None]
    error: Mapped[str | None] = mapped_column(Text)
    runbook_path: Mapped[str] = mapped_column(Text)
    runbook_sha256: Mapped[str] = mapped_column(SHA256)
    runbook_text: Mapped[str] = mapped_column(Text)
    inventory_name: Mapped[str] = mapped_column(NAME)
    inventory_path: Mapped[str] = mapped_column(Text)
    inventory_sha256: Mapped[str] = mapped_column(SHA256)
    inventory_text: Mapped[str] = mapped_column(Text)
    parameters: Mapped[dict[str, Any]]
    parameters_sha256: Mapped[str] = mapped_column(SHA256)
    sites: Mapped[list[Any]] = mapped_column(comment="sites in scope")
    targets: Mapped[dict[str, Any]] = mapped_column(comment="every inventory service's targets as they stood")
    forced: Mapped[list[Any]] = mapped_column(comment="safety checks the engineer overrode")
    test_type: Mapped[str | None] = mapped_column(String(50), comment="planned switchover rehearsal, ...")
    scenario: Mapped[str | None] = mapped_column(Text, comment="the fault injected")
    failback_of: Mapped[str | None] = mapped_column(ForeignKey("runs.id"), comment="the run this one fails back")
    retain_until: Mapped[datetime | None] = mapped_column(comment="keep the record at least until then")
    pre_approved_by: Mapped[str | None] = mapped_column(NAME, comment="who pre-approved every gate (a drill)")
    incident_id: Mapped[str | None] = mapped_column(String(64), ForeignKey("incidents.id"),
                                                    comment="the incident this run belongs to")

    __table_args__ = (Index(None, "started_at"), Index(None, "failback_of"), Index(None, "incident_id"))


class RunService(Recorded, Base):
    """A service in the run's scope, with its targets as they stood when the run started. Services
    that only a marker or a measurement named (a templated step ``service``) are added when the run ends."""

    __tablename__ = "run_services"

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    run_id: Mapped[str] = mapped_column(ForeignKey("runs.id"))
    service: Mapped[str] = mapped_column(NAME)
    rto_target_s: Mapped[float | None] = mapped_column(Float)
    rpo_target_s: Mapped[float | None] = mapped_column(Float)
    tier: Mapped[str | None] = mapped_column(LABEL)
    criticality: Mapped[str | None] = mapped_column(LABEL)
    sites: Mapped[list[Any]]

    __table_args__ = (UniqueConstraint("run_id", "service"), Index(None, "service", "run_id"))


class StepRecord(Recorded, Base):
    """One execution of a step in one phase. Forward steps are recorded as pending when the run
    starts, so steps that never ran are in the evidence too."""

    __tablename__ = "steps"

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    run_id: Mapped[str] = mapped_column(ForeignKey("runs.id"))
    step_id: Mapped[str] = mapped_column(NAME)
    phase: Mapped[str] = mapped_column(String(10), comment="forward | rollback")
    action: Mapped[str | None] = mapped_column(NAME)
    service: Mapped[str | None] = mapped_column(NAME)
    site: Mapped[str | None] = mapped_column(NAME)
    state: Mapped[str] = mapped_column(STATE)
    started_at: Mapped[datetime | None]
    finished_at: Mapped[datetime | None]
    rendered: Mapped[dict[str, Any] | None] = mapped_column(comment="parameters after templating, redacted")
    output: Mapped[dict[str, Any] | None]
    error: Mapped[str | None] = mapped_column(Text)

    __table_args__ = (Index(None, "run_id", "step_id", "phase"),)


class Attempt(Recorded, Base):
    __tablename__ = "attempts"

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    run_id: Mapped[str] = mapped_column(ForeignKey("runs.id"))
    step_pk: Mapped[int] = mapped_column(ForeignKey("steps.id"))
    step_id: Mapped[str] = mapped_column(NAME)
    phase: Mapped[str] = mapped_column(String(10))
    attempt: Mapped[int] = mapped_column(Integer)
    state: Mapped[str] = mapped_column(STATE)
    started_at: Mapped[datetime | None]
    finished_at: Mapped[datetime | None]
    duration_s: Mapped[float | None] = mapped_column(Float, comment="monotonic clock")
    output: Mapped[dict[str, Any] | None]
    error: Mapped[str | None] = mapped_column(Text)

    __table_args__ = (UniqueConstraint("step_pk", "attempt"), Index(None, "run_id"))


class Probe(Recorded, Base):
    __tablename__ = "probes"

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    run_id: Mapped[str] = mapped_column(ForeignKey("runs.id"))
    step_id: Mapped[str] = mapped_column(NAME)
    attempt: Mapped[int] = mapped_column(Integer)
    at: Mapped[datetime] = mapped_column(comment="when the probe was sent")
    target: Mapped[str] = mapped_column(Text)
    ok: Mapped[bool] = mapped_column(Boolean)
    latency_ms: Mapped[float] = mapped_column(Float)
    detail: Mapped[str] = mapped_column(Text)

    __table_args__ = (Index(None, "run_id", "at"),)


class Marker(Recorded, Base):
    __tablename__ = "markers"

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    run_id: Mapped[str] = mapped_column(ForeignKey("runs.id"))
    step_id: Mapped[str] = mapped_column(NAME)
    marker: Mapped[str] = mapped_column(NAME)
    service: Mapped[str | None] = mapped_column(NAME, comment="None: every service in the run's scope")
    site: Mapped[str | None] = mapped_column(NAME)
    at: Mapped[datetime] = mapped_column(comment="the moment the mark stands for")

    __table_args__ = (Index(None, "run_id", "marker"),)


class MeasurementRecord(Recorded, Base):
    __tablename__ = "measurements"

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    run_id: Mapped[str] = mapped_column(ForeignKey("runs.id"))
    step_id: Mapped[str] = mapped_column(NAME)
    service: Mapped[str | None] = mapped_column(NAME, comment="None: every service in the run's scope")
    metric: Mapped[str] = mapped_column(NAME)
    value: Mapped[float] = mapped_column(Float)
    method: Mapped[str] = mapped_column(Text)
    raw: Mapped[dict[str, Any]]
    at: Mapped[datetime]

    __table_args__ = (Index(None, "run_id", "metric"), Index(None, "service", "metric"))


class ActionEventRecord(Recorded, Base):
    __tablename__ = "action_events"

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    run_id: Mapped[str] = mapped_column(ForeignKey("runs.id"))
    step_id: Mapped[str] = mapped_column(NAME)
    kind: Mapped[str] = mapped_column(NAME)
    at: Mapped[datetime]
    data: Mapped[dict[str, Any]]

    __table_args__ = (Index(None, "run_id", "at"),)


class ServiceResult(Recorded, Base):
    """Achieved RTO/RPO of one service in one run, with the method and every input behind them."""

    __tablename__ = "service_results"

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    run_id: Mapped[str] = mapped_column(ForeignKey("runs.id"))
    service: Mapped[str] = mapped_column(NAME)
    incident_at: Mapped[datetime]
    run_started_at: Mapped[datetime]
    restored_at: Mapped[datetime | None]
    detection_s: Mapped[float | None] = mapped_column(Float)
    decision_s: Mapped[float | None] = mapped_column(Float)
    execution_s: Mapped[float | None] = mapped_column(Float)
    rto_s: Mapped[float | None] = mapped_column(Float)
    rto_target_s: Mapped[float | None] = mapped_column(Float)
    rto_met: Mapped[bool | None] = mapped_column(Boolean, comment="None: no target to compare with")
    rto_method: Mapped[str] = mapped_column(Text)
    rpo_s: Mapped[float | None] = mapped_column(Float, comment="None: not measured (never assumed)")
    rpo_target_s: Mapped[float | None] = mapped_column(Float)
    rpo_met: Mapped[bool | None] = mapped_column(Boolean, comment="None: not measured or no target")
    rpo_method: Mapped[str] = mapped_column(Text)
    raw: Mapped[dict[str, Any]] = mapped_column(comment="the timestamps and records the figures come from")

    __table_args__ = (UniqueConstraint("run_id", "service"), Index(None, "service", "run_id"))


class Approval(Recorded, Base):
    """A decision on a run or one of its steps (written by the approval action and the API)."""

    __tablename__ = "approvals"

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    run_id: Mapped[str] = mapped_column(ForeignKey("runs.id"))
    step_id: Mapped[str | None] = mapped_column(NAME, comment="None: the run as a whole")
    decision: Mapped[str] = mapped_column(String(20), comment="approved | rejected")
    actor: Mapped[str] = mapped_column(NAME)
    at: Mapped[datetime]
    reason: Mapped[str] = mapped_column(Text, default="")

    __table_args__ = (Index(None, "run_id"),)


class Reconciliation(Recorded, Base):
    """Data integrity after recovery: writes an independent client saw acknowledged, against what
    the recovered site holds."""

    __tablename__ = "reconciliations"

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    run_id: Mapped[str] = mapped_column(ForeignKey("runs.id"))
    service: Mapped[str | None] = mapped_column(NAME, comment="None: every service in the run's scope")
    source: Mapped[str] = mapped_column(Text, comment="e.g. load-generator ledger")
    acknowledged_writes: Mapped[int] = mapped_column(Integer)
    missing_writes: Mapped[int] = mapped_column(Integer)
    window_start: Mapped[datetime | None] = mapped_column(comment="the period reconciled")
    window_end: Mapped[datetime | None]
    details: Mapped[dict[str, Any]]
    at: Mapped[datetime]

    __table_args__ = (Index(None, "run_id"),)


class Finding(Recorded, Base):
    """Something a run showed that must be fixed. Never changed: closing adds a FindingClosure."""

    __tablename__ = "findings"

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    run_id: Mapped[str] = mapped_column(ForeignKey("runs.id"))
    severity: Mapped[str] = mapped_column(String(10), comment="low | medium | high | critical")
    owner: Mapped[str] = mapped_column(NAME)
    due: Mapped[date] = mapped_column(Date)
    text: Mapped[str] = mapped_column(Text)
    created_by: Mapped[str] = mapped_column(NAME)
    created_at: Mapped[datetime]

    __table_args__ = (Index(None, "run_id"),)


class FindingClosure(Recorded, Base):
    __tablename__ = "finding_closures"

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    finding_id: Mapped[int] = mapped_column(ForeignKey("findings.id"), unique=True)
    closed_by: Mapped[str] = mapped_column(NAME)
    closed_at: Mapped[datetime]
    evidence_run_id: Mapped[str | None] = mapped_column(ForeignKey("runs.id"), comment="a run proving the fix")
    evidence_text: Mapped[str] = mapped_column(Text, default="")


class AuditEvent(Recorded, Base):
    """Something a person or a process did to the evidence outside a run (an API request, a pack
    exported, a finding closed), with who did it."""

    __tablename__ = "audit_events"

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    at: Mapped[datetime]
    actor: Mapped[str] = mapped_column(NAME)
    action: Mapped[str] = mapped_column(NAME)
    target: Mapped[str] = mapped_column(Text, default="")
    data: Mapped[dict[str, Any]]

    __table_args__ = (Index(None, "at"),)


class AuditEntry(Base):
    """One link of the audit hash chain: a record's content hash as written, and the hash of the
    entry before. ``seq`` is gapless from 1."""

    __tablename__ = "audit_chain"

    seq: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=False)
    table_name: Mapped[str] = mapped_column(String(64))
    record_id: Mapped[str] = mapped_column(String(64))
    operation: Mapped[str] = mapped_column(String(10), comment="insert | update | adopt")
    content_sha256: Mapped[str] = mapped_column(SHA256)
    prev_sha256: Mapped[str] = mapped_column(SHA256)
    entry_sha256: Mapped[str] = mapped_column(SHA256, unique=True)
    recorded_at: Mapped[datetime] = mapped_column(default=utcnow)

    __table_args__ = (Index(None, "table_name", "record_id"),)


# Every evidence table, in the order verification reads them; each row written is chained.
CHAINED: tuple[type[Base], ...] = (
    Incident,
    IncidentEvent,
    Run,
    RunService,
    StepRecord,
    Attempt,
    Probe,
    Marker,
    MeasurementRecord,
    ActionEventRecord,
    ServiceResult,
    Approval,
    Reconciliation,
    Finding,
    FindingClosure,
    AuditEvent,
)


# -- drills (failover_tests/*.yml) and the notifications sent about them --------------------------


class DrillRun(Recorded, Base):
    """One execution of a drill (or a scheduled one the scheduler could not run: state ``missed``).

    The run ids are written before each run starts, so a crash in the middle still names the run it
    interrupted; that is why they are plain columns, not foreign keys. ``pid``, ``orchestrator_host``
    and ``heartbeat_at`` tell a live drill from one whose process died."""

    __tablename__ = "drill_runs"

    id: Mapped[str] = mapped_column(String(36), primary_key=True)
    drill_name: Mapped[str] = mapped_column(NAME)
    scenario: Mapped[str] = mapped_column(String(50), comment="site_loss | service_failure | cyber_attack | ...")
    trigger: Mapped[str] = mapped_column(String(50), comment="manual | schedule")
    scheduled_for: Mapped[datetime | None] = mapped_column(comment="the fire time a scheduled drill ran for")
    state: Mapped[str] = mapped_column(STATE, comment="running | finished | aborted | interrupted | missed")
    verdict: Mapped[str | None] = mapped_column(STATE, comment="passed | failed; None until finished")
    started_by: Mapped[str] = mapped_column(NAME)
    orchestrator_host: Mapped[str] = mapped_column(NAME)
    pid: Mapped[int | None] = mapped_column(Integer)
    heartbeat_at: Mapped[datetime | None]
    started_at: Mapped[datetime]
    finished_at: Mapped[datetime | None]
    incident_at: Mapped[datetime | None] = mapped_column(comment="when the fault was injected")
    drill_path: Mapped[str] = mapped_column(Text)
    drill_sha256: Mapped[str] = mapped_column(SHA256)
    drill_text: Mapped[str] = mapped_column(Text)
    inventory_path: Mapped[str] = mapped_column(Text)
    fault_run_id: Mapped[str | None] = mapped_column(String(36))
    failover_run_id: Mapped[str | None] = mapped_column(String(36))
    checks_run_id: Mapped[str | None] = mapped_column(String(36))
    restore_run_id: Mapped[str | None] = mapped_column(String(36))
    failback_run_id: Mapped[str | None] = mapped_column(String(36))
    cleanup_run_id: Mapped[str | None] = mapped_column(String(36))
    cleanup_state: Mapped[str | None] = mapped_column(String(20), comment="done | incomplete | none")
    cleanup_left: Mapped[list[Any]] = mapped_column(comment="cleanup steps that did not succeed")
    error: Mapped[str | None] = mapped_column(Text)

    __table_args__ = (
        UniqueConstraint("drill_name", "scheduled_for"),  # a fire time runs once, whatever the nodes
        Index(None, "started_at"),
        Index(None, "state"),
    )


class DrillExpectation(Recorded, Base):
    """One expectation of a drill run: met or missed, with the value measured."""

    __tablename__ = "drill_expectations"

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    drill_run_id: Mapped[str] = mapped_column(ForeignKey("drill_runs.id"))
    service: Mapped[str] = mapped_column(NAME)
    kind: Mapped[str] = mapped_column(String(20), comment="rto | rpo | health | data")
    check_id: Mapped[str | None] = mapped_column(NAME, comment="the check step, for health and data")
    target: Mapped[float | None] = mapped_column(Float, comment="seconds, for rto and rpo")
    measured: Mapped[float | None] = mapped_column(Float, comment="seconds; None: not measured")
    met: Mapped[bool] = mapped_column(Boolean)
    detail: Mapped[str] = mapped_column(Text)
    run_id: Mapped[str | None] = mapped_column(String(36), comment="the run the value comes from")
    at: Mapped[datetime]

    __table_args__ = (Index(None, "drill_run_id"),)


class Notification(Recorded, Base):
    """A notification the orchestrator sent, or failed to send, and when."""

    __tablename__ = "notifications"

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    drill_run_id: Mapped[str | None] = mapped_column(ForeignKey("drill_runs.id"))
    event: Mapped[str] = mapped_column(String(30), comment="started | expectation_missed | failed | completed | missed")
    channel: Mapped[str] = mapped_column(String(20), comment="webhook | email")
    target: Mapped[str] = mapped_column(Text, comment="where to, secrets left out")
    delivered: Mapped[bool] = mapped_column(Boolean)
    attempts: Mapped[int] = mapped_column(Integer)
    at: Mapped[datetime] = mapped_column(comment="delivered, or given up")
    detail: Mapped[str] = mapped_column(Text)
    tries: Mapped[list[Any]]

    __table_args__ = (Index(None, "drill_run_id"), Index(None, "at"))


CHAINED += (DrillRun, DrillExpectation, Notification)


# -- who runs a run now, and what it holds (operational state: not evidence, not chained) ----------


class RunProcess(Base):
    """The process running (or last running) a run, with its heartbeat. A run whose process is gone
    is marked interrupted by the next ``dr`` start (see ``evidence/liveness.py``)."""

    __tablename__ = "run_processes"

    run_id: Mapped[str] = mapped_column(String(36), primary_key=True)
    host: Mapped[str] = mapped_column(NAME)
    pid: Mapped[int] = mapped_column(Integer)
    process_start: Mapped[str | None] = mapped_column(String(40), comment="tells a reused pid apart (Linux)")
    started_at: Mapped[datetime]
    heartbeat_at: Mapped[datetime]


class RunLock(Base):
    """A service or site a live run holds (``service:trading``, ``site:backup``). The lock itself is
    the database's (PostgreSQL advisory lock) or the operating system's (a file lock beside a SQLite
    database); this row only names its holder."""

    __tablename__ = "run_locks"

    resource: Mapped[str] = mapped_column(String(250), primary_key=True)
    run_id: Mapped[str] = mapped_column(String(36), primary_key=True)
    mode: Mapped[str] = mapped_column(String(10), comment="exclusive | shared")
    host: Mapped[str] = mapped_column(NAME)
    pid: Mapped[int] = mapped_column(Integer)
    acquired_at: Mapped[datetime]


# -- API tokens (dr tokens, dr serve) ----------------------------------------------------------------


class ApiToken(Base):
    """A token for the HTTP API. Only the SHA-256 of the token is kept (tokens are 32 random bytes, so
    a plain hash is enough). Not evidence, so not chained; who created or revoked it is, as an
    audit event."""

    __tablename__ = "api_tokens"

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    name: Mapped[str] = mapped_column(NAME, comment="the actor named in the audit chain")
    role: Mapped[str] = mapped_column(String(20), comment="compliance | engineer | admin")
    token_sha256: Mapped[str] = mapped_column(SHA256, unique=True)
    created_at: Mapped[datetime]
    created_by: Mapped[str] = mapped_column(NAME)
    expires_at: Mapped[datetime | None]
    revoked_at: Mapped[datetime | None]
    revoked_by: Mapped[str | None] = mapped_column(NAME)
