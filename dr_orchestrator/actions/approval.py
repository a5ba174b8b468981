"""``approval``: a gate that pauses the run until an engineer approves or rejects the step.

The decision is taken elsewhere (``dr approve RUN STEP``, ``dr reject RUN STEP --reason``, the API)
and read through ``ctx.approvals``. The gate announces itself (the step and the run show
``waiting_approval``), then polls until a decision, its timeout (decided by ``on_timeout``, reject
unless said otherwise) or cancellation. A pre-approved run (a drill) passes at once, except a gate
under the two-person rule: whoever started the drill chose its pre-approval, so it is not a second
person, and the gate waits for one. A run of a saved plan passes a gate that was approved for that
plan before the run (by another person than the starter under the two-person rule), and takes that
approval for itself. Every outcome is evidence: who, when, why.
"""

from __future__ import annotations

import time

from pydantic import Field

from dr_orchestrator.actions.base import Action, ActionContext, ActionError, ActionResult, Params
from dr_orchestrator.model.approval import ApprovalDecision, ApprovalPolicy, Decision, DecisionSource, OnTimeout
from dr_orchestrator.model.durations import Duration
from dr_orchestrator.model.events import ApprovalDecided, ApprovalRequested, utcnow
from dr_orchestrator.model.runbook import Effect

POLL_S = 0.2  # how often the gate reads the decision source
# The gate decides on timeout this much before the step's own deadline (at most), so that its
# decision is recorded and the step ends by the gate, not by the engine's timeout.
MARGIN_S = 1.0


class ApprovalParams(Params):
    message: str = Field(default="", description="what the approver is asked to decide")
    timeout: Duration | None = Field(
        default=None, gt=0, description="how long to wait (2m, 90s, or seconds); default: the step's timeout"
    )
    on_timeout: OnTimeout | None = Field(default=None, description="reject or approve; default: the runbook's")
    two_person: bool | None = Field(default=None, description="default: the runbook's approvals.two_person")


class ApprovalGate(Action[ApprovalParams]):
    name = "approval"
    effect = Effect.READ_ONLY
    Params = ApprovalParams
    # Waiting again after a crash is harmless, and a decision already taken still stands.
    idempotent = True

    def run(self, params: ApprovalParams, ctx: ActionContext) -> ActionResult:
        policy = ApprovalPolicy.model_validate(ctx.run_info.get("approvals") or {})
        two_person = policy.two_person if params.two_person is None else params.two_person
        on_timeout = params.on_timeout or policy.on_timeout
        started_by = str(ctx.run_info.get("started_by") or "")
        pre_approved_by = ctx.run_info.get("pre_approved_by")
        if pre_approved_by and not two_person:
            pre = ApprovalDecision(Decision.APPROVED, str(pre_approved_by), f"pre-approved by {pre_approved_by}",
                                   utcnow())
            return self.conclude(ctx, pre, DecisionSource.PRE_APPROVED)
        if ctx.approvals is None:
            raise ActionError("this run has no decision source (no evidence database), so nobody could approve")
        exclude = started_by if two_person and started_by else None
        plan_sha256 = ctx.run_info.get("saved_plan_sha256")
        if plan_sha256:
            given = ctx.approvals.plan_decision(str(plan_sha256), ctx.run_id, ctx.step_id, exclude)
            if given is not None:
                return self.conclude(ctx, given, DecisionSource.SAVED_PLAN)
        left = ctx.remaining()
        wait_s = min(params.timeout or left, max(0.0, left - min(MARGIN_S, left * 0.1)))
        ctx.emit(ApprovalRequested(ctx.run_id, ctx.step_id, utcnow(), params.message, started_by, two_person,
                                   wait_s, on_timeout.value))
        until = time.monotonic() + wait_s
        while True:
            decided = ctx.approvals.decision(ctx.run_id, ctx.step_id, exclude)
            if decided is not None:
                return self.conclude(ctx, decided, DecisionSource.ENGINEER)
            if time.monotonic() >= until:
                outcome = Decision.APPROVED if on_timeout is OnTimeout.APPROVE else Decision.REJECTED
                reason = f"no decision within {wait_s:g}s: on_timeout is {on_timeout.value}"
                return self.conclude(ctx, ApprovalDecision(outcome, "dr (timeout)", reason, utcnow()),
                                     DecisionSource.TIMEOUT)
            ctx.sleep(min(POLL_S, max(0.0, until - time.monotonic())))  # raises when the run stops

    def conclude(self, ctx: ActionContext, decided: ApprovalDecision, source: DecisionSource) -> ActionResult:
        ctx.emit(ApprovalDecided(ctx.run_id, ctx.step_id, decided.at, decided.decision, decided.actor, decided.reason,
                                 source))
        output = {"decision": decided.decision.value, "actor": decided.actor, "reason": decided.reason,
                  "at": decided.at.isoformat(), "source": source.value}
        if decided.decision is Decision.REJECTED:
            because = f": {decided.reason}" if decided.reason else ""
            raise ActionError(f"rejected by {decided.actor}{because}")
        return ActionResult(output)
