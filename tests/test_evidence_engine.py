"""The store as an observer of the real engine: a runbook with two parallel branches, a retried
step, a timed-out step that may fail, and a failing step with rollback leaves exactly the evidence a
reader of the runbook expects."""

from __future__ import annotations

import hashlib
import threading
from datetime import timedelta

import pytest
from sqlalchemy import select
from support.evidence import INVENTORY

from dr_orchestrator.actions import default_registry
from dr_orchestrator.actions.base import Action, ActionContext, ActionError, ActionResult, Params
from dr_orchestrator.engine import Engine
from dr_orchestrator.evidence import migrate, queries
from dr_orchestrator.evidence.database import make_engine, make_session_factory
from dr_orchestrator.evidence.models import Attempt, MeasurementRecord, Probe, ServiceResult, StepRecord
from dr_orchestrator.evidence.store import EvidenceStore
from dr_orchestrator.model.events import utcnow
from dr_orchestrator.model.run import RunKind, RunPlan, SourceDocument
from dr_orchestrator.model.runbook import OnFailure, Retries, RollbackSpec, Runbook, Scope, Step


class FailsFirstParams(Params):
    key: str


class FailsFirst(Action[FailsFirstParams]):
    """Fails its first attempt in a run, succeeds on the next."""

    name = "test.fails_first"
    Params = FailsFirstParams
    seen: set[str] = set()
    lock = threading.Lock()

    def run(self, params: FailsFirstParams, ctx: ActionContext) -> ActionResult:
        with self.lock:
            seen_key = f"{ctx.run_id}/{params.key}"
            first = seen_key not in self.seen
            self.seen.add(seen_key)
        if first:
            raise ActionError("not yet")
        return ActionResult(output={"attempt": ctx.attempt})


class VerifyAndMeasure(Action[Params]):
    """Three good probes (the first counts as the restore moment) and a measured RPO."""

    name = "test.verify"
    Params = Params

    def run(self, params: Params, ctx: ActionContext) -> ActionResult:
        first = utcnow()
        for i in range(3):
            ctx.probe("http://front-door/trading/health", True, first + timedelta(milliseconds=10 * i), 1.0)
        ctx.measure("rpo_s", 0.0, "standby replay LSN equals primary LSN at promotion", {"lsn": "0/3000060"})
        return ActionResult(output={"probes": 3}, marked_at=first)


def plan() -> RunPlan:
    text = "name: engine-evidence\n"
    runbook = Runbook(
        name="engine-evidence",
        scope=Scope(services=("trading",)),
        steps=(
            Step(id="promote", action="noop", rollback=RollbackSpec(action="noop", with_={"message": "demoted"})),
            Step(id="flaky", action="test.fails_first", with_={"key": "flaky"}, retries=Retries(count=2, delay=0)),
            Step(id="slow", action="wait", with_={"duration": 30}, timeout=0.3, on_failure=OnFailure.CONTINUE),
            Step(id="verify", action="test.verify", needs=("promote", "flaky"), marks=("service_restored",)),
            Step(
                id="breaks", action="fail", with_={"message": "boom"}, needs=("verify",), on_failure=OnFailure.ROLLBACK
            ),
            Step(id="never", action="noop", needs=("breaks",)),
        ),
    )
    return RunPlan(
        runbook=runbook,
        inventory=INVENTORY,
        kind=RunKind.REHEARSAL,
        runbook_source=SourceDocument(path="rb.yml", sha256=hashlib.sha256(text.encode()).hexdigest(), text=text),
        inventory_source=SourceDocument(path="inv.yml", sha256="0" * 64, text=""),
        parameters_sha256="0" * 64,
    )


@pytest.mark.timeout(120)
def test_engine_run_leaves_the_expected_evidence(database_url: str) -> None:
    migrate.upgrade(database_url)
    db = make_engine(database_url)
    sessions = make_session_factory(db)
    registry = default_registry()
    registry.register("test.fails_first", f"{__name__}:FailsFirst")
    registry.register("test.verify", f"{__name__}:VerifyAndMeasure")
    try:
        outcome = Engine(registry, [EvidenceStore(sessions)], host="test-host", cancel_grace=1.0).run(plan())
        with sessions() as s:
            steps = {(r.step_id, r.phase): r for r in s.scalars(select(StepRecord))}
            attempts = s.scalars(select(Attempt).order_by(Attempt.id)).all()
            probes = s.scalars(select(Probe).order_by(Probe.at)).all()
            result = s.scalars(select(ServiceResult)).one()
            measurement = s.scalars(select(MeasurementRecord)).one()
            detail = queries.run_detail(s, outcome.run_id)
    finally:
        db.dispose()

    assert outcome.state == "failed"
    assert detail is not None
    assert (detail["run"]["state"], detail["run"]["orchestrator_host"]) == ("failed", "test-host")
    assert {key: row.state for key, row in steps.items()} == {
        ("promote", "forward"): "succeeded",
        ("promote", "rollback"): "rolled_back",
        ("flaky", "forward"): "succeeded",
        ("slow", "forward"): "timed_out",
        ("verify", "forward"): "succeeded",
        ("breaks", "forward"): "failed",
        ("never", "forward"): "skipped",
    }
    assert steps[("promote", "rollback")].action == "noop"
    assert steps[("breaks", "forward")].error == "boom"
    assert steps[("never", "forward")].started_at is None
    assert all(row.finished_at is not None for row in steps.values())  # nothing left running
    assert [(a.attempt, a.state) for a in attempts if a.step_id == "flaky"] == [(1, "failed"), (2, "succeeded")]
    assert all(a.finished_at is not None and a.duration_s is not None for a in attempts)
    assert len(probes) == 3

    assert result.service == "trading"
    assert result.restored_at == probes[0].at  # the first good probe of the verifying streak
    assert result.rto_s == pytest.approx((probes[0].at - result.run_started_at).total_seconds())
    assert (result.rto_target_s, result.rto_met) == (60.0, True)
    assert (result.rpo_s, result.rpo_target_s, result.rpo_met) == (0.0, 0.0, True)
    assert result.rpo_method == measurement.method
    assert result.raw["rpo_measurement"]["id"] == measurement.id
