"""Real (small) runs through the engine and the evidence store, for the audit, pack and report tests."""

from __future__ import annotations

import hashlib
from datetime import timedelta

from sqlalchemy.orm import Session, sessionmaker
from support.evidence import INVENTORY

from dr_orchestrator.actions import default_registry
from dr_orchestrator.actions.base import Action, ActionContext, ActionResult, Params
from dr_orchestrator.engine import Engine
from dr_orchestrator.evidence.store import EvidenceStore
from dr_orchestrator.model.events import utcnow
from dr_orchestrator.model.run import RunKind, RunPlan, SourceDocument
from dr_orchestrator.model.runbook import OnFailure, RollbackSpec, Runbook, Scope, Step

RUNBOOK_TEXT = "name: small-failover\nsteps: []  # the test builds the steps in Python\n"


class RestoreParams(Params):
    rpo_s: float = 0.0


class Restore(Action[RestoreParams]):
    """Three good probes (the first is the restore moment) and a measured RPO."""

    name = "test.restore"
    Params = RestoreParams

    def run(self, params: RestoreParams, ctx: ActionContext) -> ActionResult:
        first = utcnow()
        for i in range(3):
            ctx.probe("http://front-door/trading/health", True, first + timedelta(milliseconds=10 * i), 1.5)
        ctx.measure("rpo_s", params.rpo_s, "standby replay LSN against the primary's at promotion", {"lsn": "0/3"})
        return ActionResult(output={"probes": 3}, marked_at=first)


def small_plan(
    *, fail: bool = False, kind: RunKind = RunKind.REHEARSAL, trigger: str = "schedule", scenario: str = "",
    failback_of: str | None = None, rpo_s: float = 0.0,
) -> RunPlan:
    steps = [
        Step(id="promote", action="noop", marks=("switch_started",),
             rollback=RollbackSpec(action="noop", with_={"message": "demoted"})),
        Step(id="verify", action="test.restore", with_={"rpo_s": rpo_s}, needs=("promote",),
             marks=("service_restored", "switch_finished")),
    ]
    if fail:
        steps += [
            Step(id="breaks", action="fail", with_={"message": "the backup refused"}, needs=("verify",),
                 on_failure=OnFailure.ROLLBACK),
            Step(id="never", action="noop", needs=("breaks",)),
        ]
    return RunPlan(
        runbook=Runbook(name="small-failover", scope=Scope(services=("trading",), sites=("backup",)),
                        steps=tuple(steps)),
        inventory=INVENTORY,
        kind=kind,
        trigger=trigger,
        scenario=scenario,
        failback_of=failback_of,
        started_by="alice",
        reason="test",
        runbook_source=SourceDocument(path="runbooks/small.yml", text=RUNBOOK_TEXT,
                                      sha256=hashlib.sha256(RUNBOOK_TEXT.encode()).hexdigest()),
        inventory_source=SourceDocument(path="inventories/lab.yml", sha256=hashlib.sha256(b"all: {}\n").hexdigest(),
                                        text="all: {}\n"),
        parameters_sha256="0" * 64,
    )


def run_small(sessions: sessionmaker[Session], store: EvidenceStore | None = None, **options: object) -> str:
    """Run a small runbook (see ``small_plan``) and return its run id."""
    registry = default_registry()
    registry.register("test.restore", f"{__name__}:Restore")
    engine = Engine(registry, [store or EvidenceStore(sessions)], host="test-host", cancel_grace=1.0)
    return engine.run(small_plan(**options)).run_id  # type: ignore[arg-type]
