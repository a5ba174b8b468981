"""Resuming an interrupted run (same run id): its plan rebuilt from the sources recorded with it,
the steps that ended kept, and a step that was in flight repeated only when it may be (idempotent,
resumable: its action checks first whether it took effect, or named by the engineer), so that a
non-idempotent step is never blindly run twice."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from sqlalchemy.orm import Session

from dr_orchestrator.actions import default_registry
from dr_orchestrator.actions.base import ActionRegistry
from dr_orchestrator.engine.executor import may_resume
from dr_orchestrator.evidence.resume import NotResumable, StoredRun, interrupted_run
from dr_orchestrator.loading import load_inventory, load_runbook
from dr_orchestrator.model.resume import ResumePoint
from dr_orchestrator.model.run import RunKind, RunPlan, SourceDocument
from dr_orchestrator.yamlsource import LoadError

Sessions = Callable[[], Session]

__all__ = ["ResumeRefused", "ResumeRequest", "plan_of", "prepare_resume"]


class ResumeRefused(ValueError):
    """The run cannot be resumed as asked; one sentence saying what to do."""


@dataclass(frozen=True)
class ResumeRequest:
    run_id: str
    actor: str
    reason: str = ""
    step_done: tuple[str, ...] = ()  # in-flight steps the engineer says took effect
    retry: tuple[str, ...] = ()  # in-flight steps the engineer wants run again


def plan_of(stored: StoredRun) -> RunPlan:
    """The interrupted run's plan, rebuilt from the sources recorded with it (not today's files)."""
    try:
        runbook, runbook_document = load_runbook(stored.runbook_path, stored.runbook_text)
        inventory, inventory_document = load_inventory(stored.inventory_path, stored.inventory_text)
    except LoadError as exc:
        raise ResumeRefused(f"run {stored.id}'s recorded runbook or inventory no longer loads "
                            f"({exc.problems[0]}): it cannot be resumed by this version") from None
    fields = dict(stored.fields)
    return RunPlan(
        runbook=runbook, inventory=inventory, kind=RunKind(fields.pop("kind")),
        runbook_source=SourceDocument(path=stored.runbook_path, sha256=runbook_document.sha256,
                                      text=stored.runbook_text),
        inventory_source=SourceDocument(path=stored.inventory_path, sha256=inventory_document.sha256,
                                        text=stored.inventory_text),
        **fields,
    )


def prepare_resume(sessions: Sessions, request: ResumeRequest,
                   registry: ActionRegistry | None = None) -> tuple[str, RunPlan, ResumePoint]:
    """The run's id, plan and resume point. ResumeRefused when it cannot go on as asked: a step that
    was in flight is repeated only when idempotent, resumable or named in ``retry``; one named in ``step_done``
    counts as done; any other in-flight step needs the engineer's decision first."""
    registry = registry or default_registry()
    try:
        with sessions() as session:
            stored = interrupted_run(session, request.run_id)
    except NotResumable as exc:
        raise ResumeRefused(str(exc)) from None
    plan = plan_of(stored)
    named = set(request.step_done) | set(request.retry)
    for step_id in sorted(named):
        if step_id not in stored.in_flight:
            state = stored.finished[step_id].state if step_id in stored.finished else "not started"
            raise ResumeRefused(f"step {step_id!r} of run {stored.id} was not in flight when it was interrupted "
                                f"({state}): --step-done and --retry name in-flight steps")
    both = set(request.step_done) & set(request.retry)
    if both:
        raise ResumeRefused(f"step {sorted(both)[0]!r} is given both --step-done and --retry: choose one")
    undecided = [
        step_id for step_id, phase in stored.in_flight.items()
        if step_id not in named and not may_resume(plan.runbook.step(step_id), phase, registry)
    ]
    if undecided:
        listed = ", ".join(repr(s) for s in undecided)
        verb = "is" if len(undecided) == 1 else "are"
        raise ResumeRefused(
            f"run {stored.id} was interrupted while {listed} ran, which may or may not have taken effect and "
            f"{verb} not idempotent: check the systems, then resume naming each of them with --step-done STEP "
            f"(it took effect) or --retry STEP (run it again), e.g. --step-done {undecided[0]}")
    point = ResumePoint(
        started_at=stored.started_at, actor=request.actor, reason=request.reason, finished=stored.finished,
        rolled_back=frozenset(stored.rolled_back),
        marked_done={step_id: (stored.in_flight[step_id], request.reason) for step_id in request.step_done},
        retried=tuple(s for s in stored.in_flight if s not in request.step_done),
    )
    return stored.id, plan, point
