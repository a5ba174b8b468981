"""What an interrupted run left in the evidence: its plan's sources and where each step stood."""

from __future__ import annotations

from dataclasses import dataclass, field
from datetime import datetime
from typing import Any

from sqlalchemy import select
from sqlalchemy.orm import Session

from dr_orchestrator.evidence.models import RunProcess, StepRecord
from dr_orchestrator.evidence.queries import AmbiguousRunId, find_run
from dr_orchestrator.model.resume import FinishedStep
from dr_orchestrator.model.run import Phase, RunState, StepState


class NotResumable(ValueError):
    """The run cannot be resumed (unknown, still running, already ended); one sentence."""


@dataclass
class StoredRun:
    """An interrupted run as recorded: enough to rebuild its plan exactly and go on with it."""

    id: str
    started_at: datetime
    runbook_path: str
    runbook_text: str
    inventory_path: str
    inventory_text: str
    fields: dict[str, Any]  # RunPlan fields kept on the run row (kind, parameters, started_by, ...)
    finished: dict[str, FinishedStep] = field(default_factory=dict)  # forward steps, in the order they ended
    rolled_back: set[str] = field(default_factory=set)
    in_flight: dict[str, Phase] = field(default_factory=dict)  # step -> phase it was interrupted in


def interrupted_run(session: Session, run_id: str) -> StoredRun:
    try:
        run = find_run(session, run_id)
    except AmbiguousRunId as exc:
        raise NotResumable(str(exc)) from None
    if run is None:
        raise NotResumable(f"no run {run_id!r} in the evidence database (see `dr runs list`)")
    if run.state != RunState.INTERRUPTED.value:
        if run.state in (RunState.RUNNING.value, RunState.WAITING_APPROVAL.value, RunState.PENDING.value):
            process = session.get(RunProcess, run.id)
            where = f" (pid {process.pid} on {process.host})" if process is not None else ""
            raise NotResumable(f"run {run.id} is still {run.state}{where}: only interrupted runs can be resumed")
        raise NotResumable(f"run {run.id} ended {run.state}: only interrupted runs can be resumed")
    stored = StoredRun(
        id=run.id, started_at=run.started_at, runbook_path=run.runbook_path, runbook_text=run.runbook_text,
        inventory_path=run.inventory_path, inventory_text=run.inventory_text,
        fields={"parameters": run.parameters, "kind": run.kind, "incident_at": run.incident_at,
                "started_by": run.started_by, "reason": run.reason, "trigger": run.trigger,
                "parameters_sha256": run.parameters_sha256, "forced": tuple(run.forced or ()),
                "test_type": run.test_type, "scenario": run.scenario or "", "failback_of": run.failback_of,
                "pre_approved_by": run.pre_approved_by},
    )
    latest: dict[tuple[str, str], StepRecord] = {}
    for row in session.scalars(select(StepRecord).where(StepRecord.run_id == run.id).order_by(StepRecord.id)):
        latest[(row.step_id, row.phase)] = row
    ended = sorted((row for (_, phase), row in latest.items()
                    if phase == Phase.FORWARD and row.finished_at is not None),
                   key=lambda row: (row.finished_at, row.id))
    for row in ended:
        if row.state == StepState.INTERRUPTED.value:
            stored.in_flight[row.step_id] = Phase.FORWARD
        else:
            stored.finished[row.step_id] = FinishedStep(StepState(row.state), dict(row.output or {}), row.error)
    for (step_id, phase), row in latest.items():
        if phase != Phase.ROLLBACK or row.finished_at is None:
            continue
        if row.state == StepState.INTERRUPTED.value:
            stored.in_flight[step_id] = Phase.ROLLBACK
        else:
            stored.rolled_back.add(step_id)
    return stored
