"""Evidence added to a run from outside the engine: findings and their closing, data-integrity
reconciliations, approvals, and audit events (who did what to the evidence).

Every function takes a session and adds rows (chained like every evidence row, see ``chain``); the
caller commits. Nothing here updates or deletes: closing a finding adds a closure row.
"""

from __future__ import annotations

from datetime import date, datetime
from typing import Any

from sqlalchemy import select
from sqlalchemy.orm import Session

from dr_orchestrator.evidence.database import begin_write
from dr_orchestrator.evidence.models import (
    Approval,
    AuditEvent,
    Finding,
    FindingClosure,
    Reconciliation,
    Run,
    RunService,
)
from dr_orchestrator.evidence.queries import as_dict, find_run
from dr_orchestrator.evidence.values import clean_text, jsonable
from dr_orchestrator.model.events import utcnow

SEVERITIES = ("low", "medium", "high", "critical")
DECISIONS = ("approved", "rejected")


class AnnotationError(ValueError):
    """The request names something that does not exist or is not allowed; one sentence."""


class UnknownRun(AnnotationError):
    """No run (nor drill run) has this id."""


def _run(session: Session, run_id: str) -> Run:
    run = find_run(session, run_id)
    if run is None:
        raise UnknownRun(f"no run {run_id!r} in the evidence database")
    return run


# -- findings -------------------------------------------------------------------------------------


def add_finding(
    session: Session, run_id: str, severity: str, owner: str, due: date, text: str, actor: str
) -> Finding:
    """A finding on the run ``run_id`` (a unique prefix is enough)."""
    begin_write(session)
    if severity not in SEVERITIES:
        raise AnnotationError(f"severity {severity!r} is not one of {', '.join(SEVERITIES)}")
    if not text.strip():
        raise AnnotationError("a finding needs a text saying what is wrong")
    if not owner.strip():
        raise AnnotationError("a finding needs an owner")
    run = _run(session, run_id)
    finding = Finding(
        run_id=run.id,
        severity=severity,
        owner=clean_text(owner),
        due=due,
        text=clean_text(text),
        created_by=clean_text(actor),
        created_at=utcnow(),
    )
    session.add(finding)
    session.flush()
    return finding


def close_finding(session: Session, finding_id: int, evidence: str, actor: str) -> FindingClosure:
    """Close a finding with its evidence: a run id (or unique prefix) proving the fix, else free text."""
    begin_write(session)
    finding = session.get(Finding, finding_id)
    if finding is None:
        raise AnnotationError(f"no finding {finding_id} (see `dr findings list`)")
    if session.scalars(select(FindingClosure).where(FindingClosure.finding_id == finding_id)).first():
        raise AnnotationError(f"finding {finding_id} is already closed")
    if not evidence.strip():
        raise AnnotationError("closing a finding needs evidence: a run id or a text")
    run = find_run(session, evidence.strip())
    closure = FindingClosure(
        finding_id=finding_id,
        closed_by=clean_text(actor),
        closed_at=utcnow(),
        evidence_run_id=run.id if run else None,
        evidence_text="" if run else clean_text(evidence),
    )
    session.add(closure)
    session.flush()
    return closure


def list_findings(
    session: Session,
    open_only: bool = False,
    run_ids: list[str] | None = None,
    as_of: datetime | None = None,
    today: date | None = None,
) -> list[dict[str, Any]]:
    """Findings, oldest first, each with ``closed`` (the closure as a dict, or None), ``open`` and
    ``overdue`` (open and due before ``today``: the day of ``as_of``, else today in UTC).
    ``as_of``: only findings created by then, judged open or closed as they stood then."""
    query = select(Finding).order_by(Finding.id)
    if run_ids is not None:
        query = query.where(Finding.run_id.in_(run_ids))
    if as_of is not None:
        query = query.where(Finding.created_at <= as_of)
    judged_on = today or (as_of or utcnow()).date()
    closures = {c.finding_id: c for c in session.scalars(select(FindingClosure))}
    rows = []
    for finding in session.scalars(query):
        closure = closures.get(finding.id)
        if closure is not None and as_of is not None and closure.closed_at > as_of:
            closure = None
        row = as_dict(finding) | {"closed": as_dict(closure) if closure else None, "open": closure is None,
                                  "overdue": closure is None and finding.due < judged_on}
        if not open_only or row["open"]:
            rows.append(row)
    return rows


def overdue_findings(session: Session, today: date | None = None) -> list[dict[str, Any]]:
    """Open findings whose due date has passed (before ``today``, default today in UTC), oldest first."""
    return [row for row in list_findings(session, open_only=True, today=today) if row["overdue"]]


# -- what else a run's record holds -----------------------------------------------------------------


def record_reconciliation(
    session: Session,
    run_id: str,
    *,
    acknowledged_writes: int,
    missing_writes: int,
    service: str | None = None,
    source: str = "load-generator ledger",
    window_start: datetime | None = None,
    window_end: datetime | None = None,
    details: dict[str, Any] | None = None,
) -> Reconciliation:
    """The data-integrity check after recovery: writes an independent client saw acknowledged,
    and how many of them the recovered site lacks."""
    begin_write(session)
    if acknowledged_writes < 0 or missing_writes < 0:
        raise AnnotationError("write counts cannot be negative")
    run = _run(session, run_id)
    row = Reconciliation(
        run_id=run.id,
        service=service,
        source=clean_text(source),
        acknowledged_writes=acknowledged_writes,
        missing_writes=missing_writes,
        window_start=window_start,
        window_end=window_end,
        details=jsonable(details or {}),
        at=utcnow(),
    )
    session.add(row)
    session.flush()
    return row


RECONCILE_RESULTS = ("ok", "mismatch")


def record_check(
    session: Session, run_id: str, check: str, result: str, detail: str, actor: str, service: str | None = None
) -> Reconciliation:
    """A named data-integrity check after recovery (``dr reconcile``): what was compared, ok or
    mismatch, and what was found. Kept as a reconciliation whose ``details`` hold check, result,
    detail and by; it counts no writes (both counts 0)."""
    begin_write(session)
    if not check.strip():
        raise AnnotationError("a reconciliation needs --check NAME: what was compared")
    if result not in RECONCILE_RESULTS:
        raise AnnotationError(f"result {result!r} is not one of {', '.join(RECONCILE_RESULTS)}")
    if not detail.strip():
        raise AnnotationError("a reconciliation needs --detail TEXT: what was found")
    run = _run(session, run_id)
    if service is not None:
        scope = list(session.scalars(select(RunService.service).where(RunService.run_id == run.id)))
        if service not in scope:
            raise AnnotationError(f"service {service!r} is not in the scope of run {run.id} "
                                  f"({', '.join(scope) or 'no services'})")
    return record_reconciliation(
        session, run.id, acknowledged_writes=0, missing_writes=0, service=service, source=f"check by {actor}",
        details={"check": clean_text(check.strip()), "result": result, "detail": clean_text(detail.strip()),
                 "by": clean_text(actor)},
    )


def reconciliation_entry(row: dict[str, Any]) -> dict[str, Any]:
    """One reconciliation as auditors read it, in one shape: a named check (``dr reconcile``: check,
    result, detail, by; no write counts) or a count of acknowledged writes against those the
    recovered site lacks (result ok when none is missing)."""
    details = row["details"] or {}
    entry = {"at": row["at"], "service": row["service"], "source": row["source"],
             "window_start": row["window_start"], "window_end": row["window_end"]}
    if "check" in details:
        return entry | {"check": details["check"], "result": details["result"], "detail": details.get("detail", ""),
                        "by": details.get("by"), "acknowledged_writes": None, "missing_writes": None}
    result = "ok" if row["missing_writes"] == 0 else "mismatch"
    return entry | {"check": "acknowledged writes present", "result": result,
                    "detail": f"{row['missing_writes']} of {row['acknowledged_writes']} acknowledged writes missing",
                    "by": None, "acknowledged_writes": row["acknowledged_writes"],
                    "missing_writes": row["missing_writes"]}


def record_approval(
    session: Session,
    run_id: str,
    decision: str,
    actor: str,
    step_id: str | None = None,
    reason: str = "",
    at: datetime | None = None,
) -> Approval:
    begin_write(session)
    if decision not in DECISIONS:
        raise AnnotationError(f"decision {decision!r} is not one of {', '.join(DECISIONS)}")
    run = _run(session, run_id)
    row = Approval(
        run_id=run.id,
        step_id=step_id,
        decision=decision,
        actor=clean_text(actor),
        at=at or utcnow(),
        reason=clean_text(reason),
    )
    session.add(row)
    session.flush()
    return row


def record_audit_event(
    session: Session, actor: str, action: str, target: str = "", data: dict[str, Any] | None = None
) -> AuditEvent:
    """Who did what to the evidence outside a run (an API request, a pack exported, a refusal)."""
    begin_write(session)
    row = AuditEvent(
        at=utcnow(), actor=clean_text(actor), action=clean_text(action), target=clean_text(target),
        data=jsonable(data or {}),
    )
    session.add(row)
    session.flush()
    return row
