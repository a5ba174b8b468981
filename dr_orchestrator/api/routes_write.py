"""Requests that change something: start a run or a drill, approve or reject a waiting step
(engineer), manage tokens (admin). Each success is an audit event naming the token's holder; each
refusal is audited by the app's error handlers."""

from __future__ import annotations

from typing import Any, Literal

from fastapi import APIRouter, Body, Depends, Path, Request
from pydantic import BaseModel, ConfigDict, Field, model_validator

from dr_orchestrator.api.auditing import audit
from dr_orchestrator.api.auth import ApiError, Principal, admin, engineer
from dr_orchestrator.api.responses import Timestamp, refusals
from dr_orchestrator.api.values import NOT_BLANK, FileName, Instant, Lifetime, NonBlank, RelativePath, Segment, Text
from dr_orchestrator.evidence.annotations import record_audit_event
from dr_orchestrator.evidence.database import begin_write
from dr_orchestrator.evidence.incidents import INCIDENT_ID
from dr_orchestrator.model.approval import Decision

router = APIRouter()
REASON_REQUIRED = "reason is required to reject"


class RunRequest(BaseModel):
    runbook: RelativePath = Field(description="path inside the server's runbooks/ directory, e.g. example-local.yml")
    inventory: RelativePath = Field(description="path inside the server's inventories/ directory, e.g. local.yml")
    params: dict[str, Any] = Field(default_factory=dict, description="runbook parameters")
    kind: Literal["failover", "switchover", "failback", "rehearsal"] | None = None
    reason: Text = ""
    scenario: Text = Field("", description="the fault injected, in words (the DR test record)")
    incident_at: Instant | None = Field(None, description="when the disruption began (ISO-8601 with zone)")
    incident: str | None = Field(None, pattern=f"^{INCIDENT_ID.pattern}$",
                                 description="the incident the run belongs to, created when absent, e.g. "
                                             "INC-2026-0042 (default: a failover or switchover opens a new one)")


class Started(BaseModel):
    run_id: str
    url: str


class DrillStarted(BaseModel):
    drill_run_id: str
    url: str


class DecisionRequest(BaseModel):
    # The decider is the token's holder: a body naming anyone else (actor, started_by, ...) is refused.
    model_config = ConfigDict(extra="forbid")

    reason: Text = Field("", description="why")


class RejectRequest(DecisionRequest):
    reason: Text = Field(description="why the step is rejected", json_schema_extra={"pattern": NOT_BLANK})

    @model_validator(mode="before")
    @classmethod
    def _has_a_reason(cls, data: Any) -> Any:
        if isinstance(data, dict) and not (isinstance(data.get("reason"), str) and data["reason"].strip()):
            raise ValueError(REASON_REQUIRED)
        return data


class Decided(BaseModel):
    run_id: str
    step_id: str
    decision: Literal["approved", "rejected"]
    actor: str = Field(description="the token's name")
    at: Timestamp
    reason: str


class TokenView(BaseModel):
    """A token as people may see it: never the token, never its hash."""

    id: int
    name: str
    role: Literal["compliance", "engineer", "admin", "alerts"]
    created_at: Timestamp
    created_by: str
    expires_at: Timestamp | None
    revoked_at: Timestamp | None
    revoked_by: str | None
    state: Literal["active", "expired", "revoked"]


class NewToken(TokenView):
    token: str = Field(description="the token itself, shown this once")


class TokenRequest(BaseModel):
    name: NonBlank
    role: Literal["compliance", "engineer", "admin", "alerts"]
    expires: Lifetime | None = Field(None, description="lifetime such as 30d or 12h, or never (until revoked); "
                                     "default: 90d for engineer and admin, never for compliance and alerts")


@router.post("/api/runs", status_code=202, tags=["runs"], summary="Start a runbook (engineer)",
             response_model=Started, responses=refusals(401, 403, 404, 409, 422))
def start_run(body: RunRequest, request: Request, principal: Principal = Depends(engineer)) -> Started:
    """Checks the runbook against the inventory, then runs it in the background: the answer carries the
    run id at once; follow it at ``url``. The run's ``started_by`` is the token's name."""
    launcher = request.app.state.launcher
    run_id = launcher.start_run(body.runbook, body.inventory, body.params, principal.name, kind=body.kind,
                                reason=body.reason, trigger="api", scenario=body.scenario,
                                incident_at=body.incident_at, incident=body.incident)
    audit(request.app.state.sessions, principal.name, "run.start", run_id,
          {"runbook": body.runbook, "inventory": body.inventory, "params": body.params, "kind": body.kind,
           "reason": body.reason, "trigger": "api", "incident": body.incident})
    return Started(run_id=run_id, url=f"/api/runs/{run_id}")


@router.post("/api/drills/{name}/runs", status_code=202, tags=["drills"], summary="Run a drill now (engineer)",
             response_model=DrillStarted, responses=refusals(401, 403, 404, 409, 422))
def start_drill(name: FileName, request: Request, principal: Principal = Depends(engineer)) -> DrillStarted:
    """Runs the drill named ``name`` (from the server's drills directory) in the background; one at a time."""
    from dr_orchestrator.scheduling.service import DrillBusy, find_drill
    from dr_orchestrator.scheduling.service import start_drill as start
    from dr_orchestrator.yamlsource import LoadError

    settings, sessions = request.app.state.settings, request.app.state.sessions
    try:
        drill = find_drill(name, settings.drills_dir)
        started = start(sessions, drill, started_by=principal.name, **request.app.state.launcher.run_options())
    except LookupError as exc:
        raise ApiError(404, str(exc.args[0])) from None
    except LoadError as exc:
        raise ApiError(422, f"the drill {name!r} does not load", problems=[p.as_dict() for p in exc.problems]) from None
    except DrillBusy as exc:
        raise ApiError(409, str(exc)) from None
    request.app.state.launcher.track(started.drill_run_id, started.thread, started.stop)
    audit(sessions, principal.name, "drill.start", started.drill_run_id, {"drill": name})
    return DrillStarted(drill_run_id=started.drill_run_id, url=f"/api/drill-runs/{started.drill_run_id}")


def _decide(request: Request, principal: Principal, run_id: str, step_id: str, decision: Decision,
            reason: str) -> dict[str, Any]:
    from dr_orchestrator.evidence.approvals import ApprovalRefused, decide
    from dr_orchestrator.evidence.queries import AmbiguousRunId, find_run

    with request.app.state.sessions() as session:
        try:
            if find_run(session, run_id) is None:
                raise ApiError(404, f"no run {run_id!r} in the evidence database")
        except AmbiguousRunId as exc:
            raise ApiError(409, str(exc)) from None
        begin_write(session)
        try:
            row = decide(session, run_id, step_id, decision, principal.name, reason)
        except ApprovalRefused as exc:
            session.rollback()
            raise ApiError(409, str(exc)) from None
        record_audit_event(session, principal.name, f"approval.{decision.value}", f"{row.run_id} {step_id}",
                           {"reason": reason})
        answer = {"run_id": row.run_id, "step_id": step_id, "decision": row.decision, "actor": row.actor,
                  "at": row.at.isoformat(), "reason": row.reason}
        session.commit()
    return answer


@router.post("/api/runs/{run_id}/steps/{step_id}/approve", tags=["approvals"], summary="Approve a waiting step",
             response_model=Decided, responses=refusals(401, 403, 404, 409, 422))
def approve(run_id: Segment, step_id: Segment, request: Request, body: DecisionRequest | None = None,
            principal: Principal = Depends(engineer)) -> dict[str, Any]:
    """Same rules as `dr approve`: the step must be waiting; under the two-person rule, not by the run's
    starter (the same name counts as the same person, token or OS account); one decision per person."""
    return _decide(request, principal, run_id, step_id, Decision.APPROVED, body.reason if body else "")


# The body is required (the spec says so); without one the answer is the same sentence as for a blank reason.
@router.post("/api/runs/{run_id}/steps/{step_id}/reject", tags=["approvals"], summary="Reject a waiting step",
             response_model=Decided, responses=refusals(401, 403, 404, 409, 422),
             openapi_extra={"requestBody": {"required": True}})
def reject(run_id: Segment, step_id: Segment, request: Request, body: RejectRequest = Body(None),
           principal: Principal = Depends(engineer)) -> dict[str, Any]:
    if body is None:
        raise ApiError(422, f"body: {REASON_REQUIRED}", problems=[{"where": "body", "message": REASON_REQUIRED}])
    return _decide(request, principal, run_id, step_id, Decision.REJECTED, body.reason)


class ReconciliationRequest(BaseModel):
    # The one who checked is the token's holder: a body naming anyone else is refused.
    model_config = ConfigDict(extra="forbid")

    check: NonBlank = Field(description="what was compared, e.g. orders row count")
    result: Literal["ok", "mismatch"]
    detail: NonBlank = Field(description="what was found")
    service: Text | None = Field(None, description="the service checked; default: the run's whole scope")


@router.post("/api/runs/{run_id}/reconciliations", status_code=201, tags=["runs"],
             summary="Record a data-integrity check after recovery (engineer)",
             responses=refusals(401, 403, 404, 409, 422))
def reconcile(run_id: Segment, body: ReconciliationRequest, request: Request,
              principal: Principal = Depends(engineer)) -> dict[str, Any]:
    """Same as `dr reconcile`: ``run_id`` is a run or drill run id, or a unique prefix; the check shows
    in the run's after-action report and in the evidence export."""
    from dr_orchestrator.evidence.annotations import AnnotationError, UnknownRun, reconciliation_entry, record_check
    from dr_orchestrator.evidence.queries import AmbiguousRunId, as_dict

    with request.app.state.sessions() as session:
        try:
            row = record_check(session, run_id, body.check, body.result, body.detail, principal.name, body.service)
        except (AnnotationError, AmbiguousRunId) as exc:
            session.rollback()
            status = 404 if isinstance(exc, UnknownRun) else 409 if isinstance(exc, AmbiguousRunId) else 422
            raise ApiError(status, str(exc)) from None
        record_audit_event(session, principal.name, "reconciliation.add", row.run_id,
                           {"check": body.check, "result": body.result})
        answer = {"id": row.id, "run_id": row.run_id} | reconciliation_entry(as_dict(row))
        session.commit()
    return answer


# -- tokens ----------------------------------------------------------------------------------------
# -- tokens ----------------------------------------------------------------------------------------


@router.get("/api/tokens", tags=["tokens"], summary="Tokens (admin); never the token itself",
            response_model=list[TokenView], responses=refusals(401, 403))
def list_tokens(request: Request, _: Principal = Depends(admin)) -> list[dict[str, Any]]:
    from dr_orchestrator.api.tokens import list_tokens as listing

    with request.app.state.sessions() as session:
        return listing(session)


@router.post("/api/tokens", status_code=201, tags=["tokens"], summary="Create a token (admin); shown once",
             response_model=NewToken, responses=refusals(401, 403, 422))
def create_token(body: TokenRequest, request: Request, principal: Principal = Depends(admin)) -> dict[str, Any]:
    from dr_orchestrator.api.tokens import TokenError, create_token, describe, token_lifetime

    lifetime = token_lifetime(body.role, body.expires)
    with request.app.state.sessions() as session:
        try:
            row, token = create_token(session, body.name, body.role, principal.name, lifetime)
        except TokenError as exc:
            raise ApiError(422, str(exc)) from None
        answer = describe(row) | {"token": token}
        session.commit()
    return answer


@router.delete("/api/tokens/{token_id}", tags=["tokens"], summary="Revoke a token (admin)",
               response_model=TokenView, responses=refusals(401, 403, 404, 409, 422))
def revoke_token(request: Request, token_id: int = Path(ge=1, le=2**31 - 1),
                 principal: Principal = Depends(admin)) -> dict[str, Any]:
    from dr_orchestrator.api.tokens import TokenError, UnknownToken, describe, revoke_token

    with request.app.state.sessions() as session:
        try:
            row = revoke_token(session, token_id, principal.name)
        except TokenError as exc:
            raise ApiError(404 if isinstance(exc, UnknownToken) else 409, str(exc)) from None
        answer = describe(row)
        session.commit()
    return answer
