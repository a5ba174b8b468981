"""Approval decisions through the evidence database: taking one (``dr approve``, ``dr reject``, the
API), reading them (the gate waiting in the run's process), and listing gates that wait.

A gate opens with an ``approval.requested`` action event (written by the store), which carries what
the decision must respect: who started the run and whether the two-person rule applies. Who is who
is ``model.approval.Identity``: the OS account (or sudo user on root) or the API token, never the
``$DR_ACTOR`` label alone.

A gate of a saved plan (`dr plan --out`) can be approved before the run (``dr approve --plan FILE
STEP``): an audit event bound to the plan's digest, so an edited plan carries none. A run of exactly
that plan (`dr run --plan FILE`) takes it at the gate, once: the run's approval names the plan, and an
audit event says which run used it; another run of the plan asks again.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from sqlalchemy import select
from sqlalchemy.orm import Session

from dr_orchestrator.evidence.annotations import AnnotationError, record_approval, record_audit_event
from dr_orchestrator.evidence.liveness import writing
from dr_orchestrator.evidence.models import ActionEventRecord, Approval, AuditEvent, Run, StepRecord
from dr_orchestrator.evidence.queries import AmbiguousRunId, as_dict, find_run
from dr_orchestrator.model.approval import (
    SUPERUSER,
    ApprovalDecision,
    Decision,
    Identity,
    same_person,
    second_person_refusal,
)
from dr_orchestrator.model.run import Phase, StepState

Sessions = Callable[[], Session]
REQUESTED = "approval.requested"
PLAN_APPROVED = "plan.approved"
PLAN_APPROVAL_USED = "plan.approval.used"


class ApprovalRefused(ValueError):
    """The decision cannot be taken (no such gate, not waiting, two-person rule); one sentence."""


class DatabaseApprovals:
    """The decision source approval gates poll (``actions.base.ApprovalSource``)."""

    def __init__(self, sessions: Sessions) -> None:
        self.sessions = sessions

    def decision(self, run_id: str, step_id: str, exclude_actor: str | None = None) -> ApprovalDecision | None:
        with self.sessions() as session:
            rows = session.scalars(
                select(Approval).where(Approval.run_id == run_id, Approval.step_id == step_id).order_by(Approval.id)
            )
            for row in rows:
                if exclude_actor is not None and second_person_refusal(run_id, exclude_actor, row.actor) is not None:
                    continue  # the two-person rule: the run's starter cannot decide its gates
                return ApprovalDecision(Decision(row.decision), row.actor, row.reason, row.at)
        return None

    def plan_decision(self, plan_sha256: str, run_id: str, step_id: str,
                      exclude_actor: str | None = None) -> ApprovalDecision | None:
        """Take an approval given in advance to the saved plan for this gate (the oldest no run has used,
        not by ``exclude_actor`` under the two-person rule): recorded as the run's approval; None if none."""
        with writing(self.sessions) as session:
            used = {event.data.get("approval") for event in _plan_events(session, PLAN_APPROVAL_USED, plan_sha256)}
            for given in _plan_events(session, PLAN_APPROVED, plan_sha256):
                if given.data.get("step") != step_id or given.id in used:
                    continue
                if exclude_actor is not None and second_person_refusal(run_id, exclude_actor, given.actor) is not None:
                    continue
                reason = (f"approved in advance for saved plan {plan_sha256[:12]} at {given.at.isoformat()}"
                          + (f": {given.data['reason']}" if given.data.get("reason") else ""))
                row = record_approval(session, run_id, Decision.APPROVED.value, given.actor, step_id=step_id,
                                      reason=reason)
                record_audit_event(session, given.actor, PLAN_APPROVAL_USED, plan_target(plan_sha256),
                                   {"approval": given.id, "run_id": run_id, "step": step_id})
                return ApprovalDecision(Decision.APPROVED, row.actor, row.reason, row.at)
        return None


def plan_target(plan_sha256: str) -> str:
    return f"saved plan {plan_sha256}"


def _plan_events(session: Session, action: str, plan_sha256: str) -> list[AuditEvent]:
    return list(session.scalars(select(AuditEvent).where(AuditEvent.action == action,
                                                         AuditEvent.target == plan_target(plan_sha256))
                                .order_by(AuditEvent.id)))


def approve_plan(session: Session, saved: dict[str, Any], step_id: str, actor: str, reason: str = "") -> AuditEvent:
    """Record ``actor``'s approval of gate ``step_id`` of the saved plan ``saved`` (as `plans.read_saved_plan`
    checked it) before any run; ApprovalRefused says why it cannot be given."""
    described: dict[str, Any] = saved["plan"] if isinstance(saved.get("plan"), dict) else {}
    gates = [step.get("id") for group in described.get("groups", []) for step in group.get("steps", [])
             if step.get("action") == "approval"]
    if step_id not in gates:
        raise ApprovalRefused(f"the saved plan has no approval gate {step_id!r} (its gates: "
                              f"{', '.join(gates) or 'none'})")
    if Identity.parse(actor).anonymous:
        raise ApprovalRefused(f"{SUPERUSER} without sudo does not say which person you are; approve as yourself "
                              "(sudo -u or an account of your own)")
    for given in _plan_events(session, PLAN_APPROVED, saved["sha256"]):
        if given.data.get("step") == step_id and same_person(given.actor, actor):
            raise ApprovalRefused(f"{given.actor} already approved step {step_id!r} of this saved plan at "
                                  f"{given.at.isoformat()}; one person approves a gate once")
    return record_audit_event(session, actor, PLAN_APPROVED, plan_target(saved["sha256"]),
                              {"step": step_id, "reason": reason, "runbook": described.get("runbook"),
                               "saved_at": saved.get("saved_at")})


def _waiting_step(session: Session, run: Run, step_id: str) -> StepRecord:
    row = session.scalars(
        select(StepRecord)
        .where(StepRecord.run_id == run.id, StepRecord.step_id == step_id, StepRecord.phase == Phase.FORWARD.value)
        .order_by(StepRecord.id.desc())
        .limit(1)
    ).first()
    if row is None:
        raise ApprovalRefused(f"run {run.id} has no step {step_id!r}")
    if row.state != StepState.WAITING_APPROVAL.value:
        raise ApprovalRefused(f"step {step_id!r} of run {run.id} is not waiting for approval (it is {row.state})")
    return row


def request_of(session: Session, run_id: str, step_id: str) -> dict[str, Any]:
    """What the newest opening of the gate asked for (message, started_by, two_person, ...) and when
    (``requested_at``); empty when the gate never opened."""
    event = session.scalars(
        select(ActionEventRecord)
        .where(ActionEventRecord.run_id == run_id, ActionEventRecord.step_id == step_id,
               ActionEventRecord.kind == REQUESTED)
        .order_by(ActionEventRecord.id.desc())
        .limit(1)
    ).first()
    return {**event.data, "requested_at": as_dict(event)["at"]} if event is not None else {}


def decide(session: Session, run_id: str, step_id: str, decision: Decision, actor: str, reason: str = "") -> Approval:
    """Record ``actor``'s decision on a waiting gate; ApprovalRefused says why it cannot be taken."""
    if decision is Decision.REJECTED and not reason.strip():
        raise ApprovalRefused("a rejection needs a reason: give --reason")
    try:
        run = find_run(session, run_id)
    except AmbiguousRunId as exc:
        raise ApprovalRefused(str(exc)) from None
    if run is None:
        raise ApprovalRefused(f"no run {run_id!r} in the evidence database (see `dr runs list`)")
    _waiting_step(session, run, step_id)
    request = request_of(session, run.id, step_id)
    refusal = second_person_refusal(run.id, str(request.get("started_by") or run.started_by), actor)
    if request.get("two_person") and refusal is not None:
        raise ApprovalRefused(f"{refusal}; its runbook requires another person to decide step {step_id!r} "
                              f"(two-person rule: a person is the OS account, SUDO_USER on root, or the API "
                              f"token; $DR_ACTOR is only a label)")
    _refuse_a_second_decision(session, run.id, step_id, actor)
    try:
        return record_approval(session, run.id, decision.value, actor, step_id=step_id, reason=reason)
    except AnnotationError as exc:
        raise ApprovalRefused(str(exc)) from None


def _refuse_a_second_decision(session: Session, run_id: str, step_id: str, actor: str) -> None:
    """One person decides a gate once, whatever label they give."""
    for row in session.scalars(select(Approval).where(Approval.run_id == run_id, Approval.step_id == step_id)):
        if same_person(row.actor, actor):
            raise ApprovalRefused(f"{row.actor} already decided step {step_id!r} of run {run_id} "
                                  f"({row.decision} at {row.at.isoformat()}); one person decides a gate once")


def waiting_gates(session: Session, run_id: str | None = None) -> list[dict[str, Any]]:
    """Gates waiting for a decision now, oldest first: run, step, since, and what the gate asked."""
    query = (
        select(StepRecord)
        .where(StepRecord.state == StepState.WAITING_APPROVAL.value, StepRecord.phase == Phase.FORWARD.value)
        .order_by(StepRecord.started_at, StepRecord.id)
    )
    if run_id is not None:
        query = query.where(StepRecord.run_id == run_id)
    gates = []
    for step in session.scalars(query):
        gates.append({"run_id": step.run_id, "step_id": step.step_id, **request_of(session, step.run_id, step.step_id)})
    return gates
