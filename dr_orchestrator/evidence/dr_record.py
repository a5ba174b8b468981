"""The DR test record of one run: what auditors ask for, assembled from the stored evidence.

Plain JSON-ready data (timestamps as ISO-8601 UTC text) for reports, packs, the API and the CLI.
"""

from __future__ import annotations

from typing import Any

from sqlalchemy import or_, select
from sqlalchemy.orm import Session

from dr_orchestrator.evidence import auditor, drills, queries
from dr_orchestrator.evidence.annotations import list_findings, reconciliation_entry
from dr_orchestrator.evidence.models import Approval, DrillRun, Reconciliation, Run
from dr_orchestrator.evidence.timeline import timeline
from dr_orchestrator.evidence.values import derive_test_type
from dr_orchestrator.model.run import Phase

FINAL_STATES = ("succeeded", "failed", "aborted")


def dr_test_record(session: Session, run_id: str) -> dict[str, Any] | None:
    """Everything recorded about a run (``queries.run_detail``) plus the DR test record: test type,
    scope with criticality, scenario, sources, participants, approvals, timeline, figures against
    targets, reconciliations, findings, rollbacks, failbacks, retention; ``auditor_fields``: the
    fifteen auditor fields per service (``auditor.AuditorFields``). None: no such run."""
    detail = queries.run_detail(session, run_id)
    if detail is None:
        return None
    run = detail["run"]
    the_id = run["id"]
    approvals = [queries.as_dict(a) for a in session.scalars(
        select(Approval).where(Approval.run_id == the_id).order_by(Approval.at, Approval.id))]
    reconciliations = [queries.as_dict(r) for r in session.scalars(
        select(Reconciliation).where(Reconciliation.run_id == the_id).order_by(Reconciliation.id))]
    failbacks = [queries.as_dict(r, exclude=("runbook_text", "inventory_text")) for r in session.scalars(
        select(Run).where(Run.failback_of == the_id).order_by(Run.started_at))]
    rollbacks = [s for s in detail["steps"] if s["phase"] == Phase.ROLLBACK]
    failed = [s for s in detail["steps"] if s["state"] in ("failed", "timed_out", "rollback_failed")]
    detail.update(
        {
            "test_type": run["test_type"] or derive_test_type(run["kind"], run["trigger"], run["scenario"]),
            "scenario": run["scenario"],
            "participants": {
                "started_by": run["started_by"],
                "approvers": sorted({a["actor"] for a in approvals}),
                "orchestrator_host": run["orchestrator_host"],
            },
            "sources": {
                "runbook": {"name": run["runbook_name"], "path": run["runbook_path"], "sha256": run["runbook_sha256"]},
                "inventory": {
                    "name": run["inventory_name"],
                    "path": run["inventory_path"],
                    "sha256": run["inventory_sha256"],
                },
                "parameters_sha256": run["parameters_sha256"],
            },
            "approvals": approvals,
            "timeline": timeline(detail, failbacks),
            "reconciliations": reconciliations,
            "data_reconciliation": [reconciliation_entry(r) for r in reconciliations],
            "findings": list_findings(session, run_ids=[the_id]),
            "failed_steps": failed,
            "rollbacks": rollbacks,
            # What the run left clients with (blast radius) and where a rollback had to stop.
            "clients": next((e["data"] for e in detail["events"] if e["kind"] == "blast_radius.verdict"), None),
            "rollback_stops": [e for e in detail["events"] if e["kind"] == "rollback.stopped"],
            "impacts": [e["data"] for e in detail["events"] if e["kind"] == "blast_radius.impact"],
            "failbacks": failbacks,
            "cleanup": _cleanup_state(detail, rollbacks, failbacks),
            "retain_until": run["retain_until"],
            "drill": drill_of_run(session, the_id),
            "auditor_fields": auditor.auditor_rows(session, run_ids=[the_id]),
        }
    )
    return detail


def drill_of_run(session: Session, run_id: str) -> dict[str, Any] | None:
    """The drill this run was a stage of (fault, failover, checks, failback, cleanup): its
    expectations met or missed, its verdict and cleanup state. None: the run was not part of a drill."""
    stages = {stage: getattr(DrillRun, f"{stage}_run_id") for stage in drills.RUN_STAGES}
    record = session.scalars(
        select(DrillRun).where(or_(*(column == run_id for column in stages.values()))).limit(1)
    ).first()
    if record is None:
        return None
    detail = drills.drill_run_detail(session, record.id)
    if detail is None:
        return None
    summary = detail["drill_run"]
    stage = next(name for name in stages if summary["runs"][name] == run_id)
    return summary | {"stage": stage, "expectations": detail["expectations"]}


def _cleanup_state(detail: dict[str, Any], rollbacks: list[dict[str, Any]], failbacks: list[dict[str, Any]]) -> str:
    run = detail["run"]
    if run["state"] not in FINAL_STATES:
        return f"run {run['state']}: not finished"
    if any(s["state"] == "rollback_failed" for s in rollbacks):
        return "rollback failed: the sites may be left half switched"
    left = [s["step_id"] for s in detail["steps"] if not s["finished_at"]]
    if left:
        return f"steps never finished: {', '.join(left)}"
    if rollbacks:
        return f"rolled back ({len(rollbacks)} step(s))"
    if failbacks:
        return f"failed back by run {failbacks[-1]['id']} ({failbacks[-1]['state']})"
    return "every step finished; no rollback needed"
