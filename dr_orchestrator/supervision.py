"""Running a plan safely: the locks of what it changes, a heartbeat, approval gates wired to the
evidence database; and resuming a run that was interrupted.

Shared by the CLI, the scheduler and the API so that every run is guarded alike:

    outcome = supervision.execute(sessions, plan, observers=[store, progress])

raises ``LockHeld`` (nothing ran) when another live run holds a service or site of this plan.
"""

from __future__ import annotations

import socket
import threading
import uuid
from collections.abc import Callable, Sequence
from dataclasses import dataclass

from sqlalchemy.orm import Session

from dr_orchestrator import anchoring
from dr_orchestrator.actions import default_registry
from dr_orchestrator.actions.base import ActionRegistry, RunResources
from dr_orchestrator.engine import Engine, RunOutcome
from dr_orchestrator.engine.executor import may_repeat
from dr_orchestrator.evidence.annotations import record_audit_event
from dr_orchestrator.evidence.approvals import DatabaseApprovals
from dr_orchestrator.evidence.liveness import HEARTBEAT_S, Heartbeat, writing
from dr_orchestrator.evidence.locks import LockHeld, RunLocks, resources_for
from dr_orchestrator.evidence.resume import NotResumable, StoredRun, interrupted_run
from dr_orchestrator.loading import load_inventory, load_runbook
from dr_orchestrator.model.events import Observer
from dr_orchestrator.model.resume import ResumePoint
from dr_orchestrator.model.run import RunKind, RunPlan, SourceDocument
from dr_orchestrator.yamlsource import LoadError

Sessions = Callable[[], Session]

__all__ = ["LockHeld", "ResumeRefused", "execute", "prepare_resume"]


class ResumeRefused(ValueError):
    """The run cannot be resumed as asked; one sentence saying what to do."""


def execute(sessions: Sessions, plan: RunPlan, observers: Sequence[Observer], *,
            registry: ActionRegistry | None = None, run_id: str | None = None, resume: ResumePoint | None = None,
            stop: threading.Event | None = None, host: str | None = None,
            heartbeat_s: float = HEARTBEAT_S, kept: RunResources | None = None,
            fence: Callable[[], object] | None = None) -> RunOutcome:
    """Take the plan's locks, beat, run (or resume) it, free the locks. ``observers`` must include the
    evidence store. LockHeld, before anything ran, when another live run holds a lock; the refusal is
    an audit event."""
    run_id = run_id or str(uuid.uuid4())
    host = host or socket.gethostname()
    locks = RunLocks(sessions, host)
    heartbeat = Heartbeat(sessions, run_id, host, heartbeat_s)
    try:
        locks.acquire(run_id, resources_for(plan), also=heartbeat.record)
    except LockHeld as exc:
        with writing(sessions) as session:
            record_audit_event(session, plan.started_by, "run.refused", run_id, {
                "runbook": plan.runbook.name, "resource": exc.resource.name,
                "held_by": [h.run_id for h in exc.holders], "resume": resume is not None})
        raise
    try:
        with heartbeat:
            engine = Engine(registry or default_registry(), list(observers), host=host,
                            approvals=DatabaseApprovals(sessions), kept=kept, fence=fence)
            return engine.run(plan, run_id, stop, resume)
    finally:
        locks.release()
        # The run's end is recorded and its locks are free: anchor the chain off the run's path.
        anchoring.after_run(sessions, run_id, plan.started_by)


# ---------------------------------------------------------------- resuming


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
    was in flight is repeated only when idempotent or named in ``retry``; one named in ``step_done``
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
        if step_id not in named and not may_repeat(plan.runbook.step(step_id), phase, registry)
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
