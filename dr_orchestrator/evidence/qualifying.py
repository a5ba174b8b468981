"""What counts as a DR test in a period: the one rule that the quarterly report, the exports, the
dashboard and ``/metrics`` all use (``RULE`` is printed in the report as it is applied here).

A test is a top-level failover, switchover or rehearsal run, or a drill. A drill counts once, with
its verdict; its failover run gives the figures and its fault, checks, restore and cleanup runs are
parts of it, never tests. A run or drill that changed nothing (no ``run.first_change`` event in any
of its runs: refused by its checks or a safety rule, rejected at an approval gate, aborted before
its first change) did not test anything: it is listed as not executed, with the reason. Failbacks
(runs of kind failback, a drill's failback stage included) are measured and listed on their own.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from datetime import datetime
from typing import Any

from sqlalchemy import or_, select
from sqlalchemy.orm import Session

from dr_orchestrator.evidence import drills as drill_records
from dr_orchestrator.evidence.models import ActionEventRecord, DrillRun, Run, RunService, ServiceResult, StepRecord
from dr_orchestrator.evidence.values import derive_test_type
from dr_orchestrator.model.run import Phase

FIRST_CHANGE = "run.first_change"  # the engine's action event (engine.executor.FIRST_CHANGE)
FINAL_RUN_STATES = ("succeeded", "failed", "aborted")
FINAL_DRILL_STATES = ("finished", "aborted", "interrupted", "missed")
RULE = (
    "A service's tests in the period are its top-level failovers, switchovers and rehearsals, and its drills. "
    "A drill counts once, with its verdict: its failover run gives the figures; its fault, checks, restore and "
    "cleanup runs are parts of it, never tests. A run or drill that changed nothing (refused by its checks or a "
    "safety rule, rejected at an approval gate or aborted before its first change) is listed as not executed, "
    "with the reason, never as failed. Failbacks are measured and listed on their own. A service met all its "
    "targets when its latest test in the period met both its RTO and its RPO target (the inventory's targets "
    "as they stood when the test ran; a drill's own expectations judge the drill, not the service)."
)


TEST = "test"
DRILL_FAILOVER = "drill's failover (counts with its drill)"
DRILL_PART = "drill part"
FAILBACK = "failback"
NOT_EXECUTED = "not executed"


def counts_as(kind: str, drill_stage: str | None, changed: bool) -> str:
    """What one run is under RULE: a test, a part of a drill (its failover run gives the drill's
    figures), a failback, or not executed (it changed nothing)."""
    if drill_stage == "failback":
        return FAILBACK
    if drill_stage == "failover":
        return DRILL_FAILOVER
    if drill_stage is not None:
        return DRILL_PART
    if not changed:
        return NOT_EXECUTED
    return FAILBACK if kind == "failback" else TEST


@dataclass
class Test:
    """One test of the period: a top-level run, or a drill (``drill`` set) measured by its failover run."""

    id: str  # the run id, or the drill run id
    run_id: str | None  # the run whose figures count (a drill's failover run)
    name: str  # runbook or drill name
    test_type: str
    trigger: str
    outcome: str  # the run's state, or the drill's verdict
    started_at: datetime
    services: list[str]
    results: dict[str, ServiceResult] = field(default_factory=dict)
    drill: DrillRun | None = None

    def met(self, service: str) -> bool:
        result = self.results.get(service)
        return result is not None and bool(result.rto_met) and bool(result.rpo_met)


@dataclass
class NotExecuted:
    id: str
    name: str
    what: str  # "run" or "drill"
    trigger: str
    state: str
    started_at: datetime
    services: list[str]
    reason: str


@dataclass
class Period:
    tests: list[Test]
    not_executed: list[NotExecuted]
    failbacks: list[Test]
    engine_runs: int  # every run recorded in the period, drill stages included

    @property
    def started(self) -> int:
        """What people and schedules started: tests, not-executed ones and failbacks outside drills."""
        return len(self.tests) + len(self.not_executed) + sum(1 for f in self.failbacks if f.drill is None)

    def tests_of(self, service: str) -> list[Test]:
        return [t for t in self.tests if service in t.services]


def period(session: Session, start: datetime | None = None, end: datetime | None = None) -> Period:
    """The tests, not-executed runs and failbacks started in [start, end) (None: unbounded), oldest first."""
    run_query = select(Run).where(Run.state.in_(FINAL_RUN_STATES)).order_by(Run.started_at, Run.id)
    drill_query = select(DrillRun).where(DrillRun.state.in_(FINAL_DRILL_STATES)).order_by(DrillRun.started_at)
    if start is not None:
        run_query = run_query.where(Run.started_at >= start)
        drill_query = drill_query.where(DrillRun.started_at >= start)
    if end is not None:
        run_query = run_query.where(Run.started_at < end)
        drill_query = drill_query.where(DrillRun.started_at < end)
    runs = list(session.scalars(run_query))
    drill_runs = list(session.scalars(drill_query))
    run_ids = [run.id for run in runs]
    stage_columns = [getattr(DrillRun, f"{stage}_run_id") for stage in drill_records.RUN_STAGES]
    # A drill's runs are its parts even when the drill itself started before the period.
    owners = drill_runs + list(session.scalars(select(DrillRun).where(or_(*(c.in_(run_ids) for c in stage_columns)))))
    stage_of: dict[str, tuple[DrillRun, str]] = {}
    for record in owners:
        for stage in drill_records.RUN_STAGES:
            run_id = getattr(record, f"{stage}_run_id")
            if run_id:
                stage_of[run_id] = (record, stage)
    ids = run_ids + [run_id for run_id in stage_of if run_id not in set(run_ids)]
    changed = set(session.scalars(select(ActionEventRecord.run_id).where(
        ActionEventRecord.kind == FIRST_CHANGE, ActionEventRecord.run_id.in_(ids))))
    results: dict[str, dict[str, ServiceResult]] = {}
    for result in session.scalars(select(ServiceResult).where(ServiceResult.run_id.in_(ids))
                                  .order_by(ServiceResult.id)):
        results.setdefault(result.run_id, {})[result.service] = result
    scope: dict[str, list[str]] = {}
    for run_id, service in session.execute(select(RunService.run_id, RunService.service)
                                           .where(RunService.run_id.in_(ids)).order_by(RunService.id)):
        scope.setdefault(run_id, []).append(service)
    by_id = {run.id: run for run in session.scalars(select(Run).where(Run.id.in_(ids)))}

    tests: list[Test] = []
    not_executed: list[NotExecuted] = []
    failbacks: list[Test] = []
    for run in runs:
        part_of = stage_of.get(run.id)
        owner = part_of[0] if part_of is not None else None
        role = counts_as(run.kind, part_of[1] if part_of is not None else None, run.id in changed)
        if role == FAILBACK:
            failbacks.append(_run_test(run, scope, results, drill=owner))
        elif role == NOT_EXECUTED:
            not_executed.append(NotExecuted(run.id, run.runbook_name, "run", run.trigger, run.state, run.started_at,
                                            scope.get(run.id, []), _why_nothing_changed(session, run)))
        elif role == TEST:
            tests.append(_run_test(run, scope, results))
        # a drill's other runs count with their drill, below
    for record in drill_runs:
        stage_runs = [getattr(record, f"{stage}_run_id") for stage in drill_records.RUN_STAGES]
        failover = by_id.get(record.failover_run_id or "")
        services = scope.get(failover.id, []) if failover else []
        if not any(run_id in changed for run_id in stage_runs if run_id):
            reason = record.error or f"drill {record.state}: none of its runs changed anything"
            not_executed.append(NotExecuted(record.id, record.drill_name, "drill", record.trigger, record.state,
                                            record.started_at, services, reason))
            continue
        tests.append(Test(
            id=record.id, run_id=failover.id if failover else None, name=record.drill_name,
            test_type=f"drill: {record.scenario}", trigger=record.trigger, outcome=record.verdict or record.state,
            started_at=record.started_at, services=services,
            results=results.get(failover.id, {}) if failover else {}, drill=record))
    tests.sort(key=lambda t: t.started_at)
    not_executed.sort(key=lambda n: n.started_at)
    failbacks.sort(key=lambda f: f.started_at)
    return Period(tests, not_executed, failbacks, len(runs))


def _run_test(run: Run, scope: dict[str, list[str]], results: dict[str, dict[str, ServiceResult]],
              drill: DrillRun | None = None) -> Test:
    return Test(id=run.id, run_id=run.id, name=run.runbook_name,
                test_type=run.test_type or derive_test_type(run.kind, run.trigger, run.scenario),
                trigger=run.trigger, outcome=run.state, started_at=run.started_at, services=scope.get(run.id, []),
                results=results.get(run.id, {}), drill=drill)


def _why_nothing_changed(session: Session, run: Run) -> str:
    """The run's error, else its first step that failed (a check, a safety rule, an approval gate's rejection)."""
    why = run.error
    if not why:
        step = session.scalars(select(StepRecord).where(
            StepRecord.run_id == run.id, StepRecord.phase == Phase.FORWARD.value,
            StepRecord.state.in_(("failed", "timed_out", "cancelled"))).order_by(StepRecord.id).limit(1)).first()
        why = f"step {step.step_id!r} {step.state}" + (f": {step.error}" if step.error else "") if step else None
    return f"{run.state} before any change" + (f": {why}" if why else "")


@dataclass(frozen=True)
class Standing:
    """Where a service stands in a period under ``RULE``."""

    service: str
    tests: int
    latest: Test | None

    @property
    def all_targets_met(self) -> bool:
        return self.latest is not None and self.latest.met(self.service)

    def as_dict(self) -> dict[str, Any]:
        latest = self.latest
        result = latest.results.get(self.service) if latest else None
        return {"service": self.service, "tests": self.tests, "all_targets_met": self.all_targets_met,
                "latest_test": latest.id if latest else None,
                "latest_rto_s": result.rto_s if result else None, "latest_rpo_s": result.rpo_s if result else None}


def standings(found: Period, services: list[str] | None = None) -> dict[str, Standing]:
    """Per service (those given, else every service a test covered), its standing in the period."""
    names = services if services is not None else sorted({s for t in found.tests for s in t.services})
    out = {}
    for name in names:
        tests = found.tests_of(name)
        out[name] = Standing(name, len(tests), tests[-1] if tests else None)
    return out


def measured(found: Period, kind: str) -> dict[str, list[ServiceResult]]:
    """Per service, the results of its tests (oldest first) that have a measured ``rto`` or ``rpo``."""
    out: dict[str, list[ServiceResult]] = {}
    for test in found.tests:
        for service, result in test.results.items():
            if getattr(result, f"{kind}_s") is not None:
                out.setdefault(service, []).append(result)
    return out
