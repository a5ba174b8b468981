"""Runs one plan: the DAG in parallel (bounded), timeouts, retries with backoff, rollback, events.

Whatever happens (a failure, a bug, Ctrl-C), every step and the run end in a finished state and
observers hear about it: a run is never left running.
"""

from __future__ import annotations

import dataclasses
import heapq
import logging
import queue
import socket
import threading
import time
import uuid
from collections.abc import Callable
from concurrent.futures import FIRST_COMPLETED, Future, ThreadPoolExecutor, wait
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any

from pydantic import ValidationError

from dr_orchestrator import secrets, templating
from dr_orchestrator.actions.base import (
    Action,
    ActionCancelled,
    ActionContext,
    ActionError,
    ActionRegistry,
    ActionResult,
    ApprovalSource,
    RunResources,
)
from dr_orchestrator.engine import blast_radius, preflight
from dr_orchestrator.engine.context import template_context
from dr_orchestrator.model.events import (
    ActionEvent,
    AttemptFinished,
    AttemptStarted,
    Event,
    MarkerReached,
    Observer,
    RunFinished,
    RunResumed,
    RunStarted,
    StepFinished,
    StepStarted,
    utcnow,
)
from dr_orchestrator.model.inventory import Service
from dr_orchestrator.model.resume import ResumePoint
from dr_orchestrator.model.run import Phase, RunPlan, RunState, StepState
from dr_orchestrator.model.runbook import Effect, OnFailure, Retries, Step
from dr_orchestrator.model.safety import PREFLIGHT, ReadinessCheck

log = logging.getLogger(__name__)

# How long a cancelled action gets to stop before the engine moves on without it.
CANCEL_GRACE_S = 2.0
_POLL_S = 0.05  # how often waiting threads look for Ctrl-C, a stop request or a cancellation
FIRST_CHANGE = "run.first_change"  # action event: the run's first changing step is about to start
FENCING_CHECKED = "fencing.checked"  # action event: the fencing token a changing step acted under
FENCING_REFUSED = "fencing.refused"  # action event: this process may no longer act; the run is left to resume
CONDITION_SKIP = "when "  # how the error of a step skipped by its `when` begins (resume tells them apart)


class ActionThreads:
    """Daemon threads that run actions, kept for reuse: starting a thread per attempt costs more than
    a quick action does. An action that never returns keeps its thread; the next attempt gets another.
    Daemon threads, so that an abandoned action never keeps the process from exiting."""

    IDLE_S = 30.0  # an idle thread ends after this long

    def __init__(self) -> None:
        self._idle: list[queue.SimpleQueue[Callable[[], None]]] = []
        self._lock = threading.Lock()

    def run(self, work: Callable[[], None]) -> None:
        with self._lock:
            inbox = self._idle.pop() if self._idle else None
        if inbox is None:
            inbox = queue.SimpleQueue()
            threading.Thread(target=self._serve, args=(inbox,), name="dr-action", daemon=True).start()
        inbox.put(work)

    def _serve(self, inbox: queue.SimpleQueue[Callable[[], None]]) -> None:
        while True:
            try:
                work = inbox.get(timeout=self.IDLE_S)
            except queue.Empty:
                with self._lock:
                    if inbox in self._idle:
                        self._idle.remove(inbox)
                        return
                continue  # handed out just now: the work is on its way
            work()
            with self._lock:
                self._idle.append(inbox)


ACTION_THREADS = ActionThreads()


@dataclass
class RunOutcome:
    run_id: str
    state: RunState
    steps: dict[str, StepState]
    error: str | None = None


@dataclass
class _Attempt:
    state: StepState
    result: ActionResult = field(default_factory=ActionResult)
    error: str | None = None


class Engine:
    def __init__(
        self,
        registry: ActionRegistry,
        observers: list[Observer] | None = None,
        *,
        max_parallel: int = 16,
        host: str | None = None,
        cancel_grace: float = CANCEL_GRACE_S,
        approvals: ApprovalSource | None = None,
        kept: RunResources | None = None,
        fence: Callable[[], object] | None = None,
    ) -> None:
        self.registry = registry
        self.observers = list(observers or [])
        self.max_parallel = max_parallel
        self.host = host or socket.gethostname()
        self.cancel_grace = cancel_grace
        self.approvals = approvals  # where approval gates read decisions; None: gates cannot be decided
        self.kept = kept  # connections a resident process keeps open across its runs (RunResources)
        # Called before every changing step; it returns the token the step acts under (recorded) or
        # raises when this process may no longer act (a cluster node that lost its leadership): the run
        # then stops where it is, changes nothing more, and ends interrupted for the leader to resume.
        self.fence = fence
        secrets.install_log_redaction()

    def run(self, plan: RunPlan, run_id: str | None = None, stop: threading.Event | None = None,
            resume: ResumePoint | None = None) -> RunOutcome:
        """Execute ``plan``; ``stop`` (set from another thread) ends the run as Ctrl-C would.

        With ``resume`` (and the interrupted run's id), go on where that run stood: steps that ended
        are not run again and their outputs feed templates; the rest run as usual."""
        self.load_actions(plan)
        return _Run(self, plan, run_id or str(uuid.uuid4()), stop or threading.Event(), resume).execute()

    def load_actions(self, plan: RunPlan) -> None:
        """Import every action the plan uses before the run starts: an import in the middle of a
        failover (httpx, paramiko, psycopg: up to a second on a busy host) would count towards RTO."""
        for step in plan.runbook.steps:
            for name in (step.action, step.rollback.action if step.rollback else None):
                if name is not None and name in self.registry:
                    self.registry.get(name)
        if blast_radius.guarded(plan) and blast_radius.observable(plan) and blast_radius.PROBE_ACTION in self.registry:
            self.registry.get(blast_radius.PROBE_ACTION)


def may_repeat(step: Step, phase: Phase, registry: ActionRegistry) -> bool:
    """Whether an attempt of ``step`` that a crash left in flight may simply run again: the step's own
    ``idempotent`` when it says; else a check (read-only) may; else its action's word (the rollback's,
    for a rollback). An attempt that may not is made durable before it starts (write-ahead)."""
    if step.idempotent is not None:
        return step.idempotent
    if phase == Phase.ROLLBACK and step.rollback is not None:
        action = step.rollback.action
    elif (step.effect or registry.effect(step.action)) is Effect.READ_ONLY:
        return True
    else:
        action = step.action
    return action in registry and registry.get(action).idempotent


def may_resume(step: Step, phase: Phase, registry: ActionRegistry) -> bool:
    """Whether an attempt of ``step`` left in flight may run again when its run is resumed: it may be
    repeated (``may_repeat``), or its action finds out itself whether it took effect (``resumable``)
    and the step does not say it is not idempotent."""
    if may_repeat(step, phase, registry):
        return True
    return (phase == Phase.FORWARD and step.idempotent is None and step.action in registry
            and registry.get(step.action).resumable)


class _Run:
    def __init__(self, engine: Engine, plan: RunPlan, run_id: str, stop: threading.Event,
                 resume: ResumePoint | None = None) -> None:
        self.engine = engine
        self.plan = plan
        self.run_id = run_id
        self.stop = stop
        self.resume = resume
        self.steps = {s.id: s for s in plan.runbook.steps}
        self.order = {step_id: index for index, step_id in enumerate(self.steps)}
        self.dependents: dict[str, list[str]] = {step_id: [] for step_id in self.steps}
        for step in plan.runbook.steps:
            for need in step.needs:
                self.dependents[need].append(step.id)
        self.states: dict[str, StepState] = {s.id: StepState.PENDING for s in plan.runbook.steps}
        # Steps that ended since the scheduler last looked: only their dependents can have become ready
        # (a full scan per step would make a long chain quadratic).
        self.newly_finished: list[str] = []
        self.results: dict[str, dict[str, Any]] = {}
        self.sites: dict[str, str | None] = {}  # each step's rendered site, reused by its rollback
        self.completed: list[str] = []  # succeeded steps, in the order they finished
        self.ended: list[str] = []  # steps that acted or may have (succeeded, failed, interrupted), in order
        self.skipped_by_condition: set[str] = set()
        self.lock = threading.Lock()
        self.emit_lock = threading.Lock()
        self.active_cancels: set[threading.Event] = set()
        self.resources = RunResources(engine.kept)
        self.start_lock = threading.Lock()
        self.deposed: str | None = None  # why this process may no longer act (fencing refused)
        self.start_waits: list[tuple[Observer, Callable[[], None], Event]] = []  # see settle_start
        self.interrupted = False  # the operator stopped the run (Ctrl-C or `stop`): it ends aborted
        # Cancel what runs and start nothing new; cleared while rollbacks run, set again by another Ctrl-C.
        self.halt = threading.Event()
        self.closed = False  # RunFinished was sent: news from abandoned actions is dropped
        self.rollback_wanted = False
        self.refused = False  # the safety pre-flight refused the run: no step started
        self.failed = False
        self.started_at: datetime = resume.started_at if resume else utcnow()
        self.run_info: dict[str, Any] = {}
        self.rolled_back: set[str] = set(resume.rolled_back) if resume else set()
        self.guarded = blast_radius.guarded(plan)
        self.watch_blast_radius = self.guarded and blast_radius.observable(plan) and \
            blast_radius.PROBE_ACTION in engine.registry
        # The services as the run found them: readings started with the run, fixed at its first change.
        self.before_reading: dict[str, Future[blast_radius.Reading]] = {}
        self.before_reading_started = 0.0
        self.before_lock = threading.Lock()
        self.changed = bool(resume and resume.finished)  # a resumed run may have changed things already
        self.before: list[blast_radius.Reading] | None = None
        # Secrets this run resolves; masked in every event before observers see it (and in logs).
        self.redactor = secrets.Redactor(parent=secrets.PROCESS)

    # ------------------------------------------------------------------ events

    def emit(self, event: Event, *, defer_wait: bool = False) -> None:
        """Every observer sees the events in one order (under the lock). One that must make an event
        durable before the run goes on (the evidence store's ``submit``) hands back its wait, made
        here after the lock: the emitting branch waits, the other branches go on emitting. With
        ``defer_wait`` (the run's start) the wait is made by ``settle_start`` instead."""
        event = self.redact_event(event)
        waits: list[tuple[Observer, Callable[[], None]]] = []
        with self.emit_lock:
            if self.closed:
                return
            self.closed = isinstance(event, RunFinished)
            for observer in self.engine.observers:
                try:
                    submit = getattr(observer, "submit", None)
                    if submit is None:
                        observer(event)
                    elif (until_durable := submit(event)) is not None:
                        waits.append((observer, until_durable))
                except Exception:  # noqa: BLE001 - one observer's failure must not stop a failover
                    log.exception("observer %r failed on %s", observer, type(event).__name__)
        self.log_milestone(event)
        if defer_wait:
            with self.start_lock:
                self.start_waits += [(observer, until_durable, event) for observer, until_durable in waits]
            return
        self.wait_for(waits, event)

    def log_milestone(self, event: Event) -> None:
        """A run's or a step's start and end as a log record with the run, incident and step ids (for
        the services' structured logs), made from the event as redacted for the observers. INFO even
        for failures: `dr run` configures no logging, and Python would print a warning on its own."""
        step_id = None
        if isinstance(event, RunStarted | RunResumed):
            verb = "started" if isinstance(event, RunStarted) else f"resumed by {event.actor}"
            message = f"run {self.run_id} {verb}: {self.plan.runbook.name} ({self.plan.kind})"
        elif isinstance(event, RunFinished):
            message = f"run {self.run_id} {event.state}" + (f": {event.error}" if event.error else "")
        elif isinstance(event, StepStarted | StepFinished):
            step_id = event.step_id
            rollback = " (rollback)" if event.phase is Phase.ROLLBACK else ""
            if isinstance(event, StepStarted):
                message = f"step {event.step_id}{rollback} started"
            else:
                message = f"step {event.step_id}{rollback} {event.state}" + (f": {event.error}" if event.error else "")
        else:
            return
        log.info("%s", message, extra=self.log_ids(step_id))

    def log_ids(self, step_id: str | None = None) -> dict[str, str | None]:
        """What a log record about this run (and ``step_id``) carries as ``extra`` (dr_orchestrator.logs)."""
        return {"run_id": self.run_id, "incident_id": self.plan.incident_id, "step_id": step_id}

    def wait_for(self, waits: list[tuple[Observer, Callable[[], None]]], event: Event) -> None:
        for observer, until_durable in waits:
            try:
                until_durable()
            except Exception:  # noqa: BLE001 - one observer's failure must not stop a failover
                log.exception("observer %r failed on %s", observer, type(event).__name__)

    def settle_start(self) -> None:
        """Wait until the run's start is durable: before anything changes (a crash must not leave a
        change behind with no run recorded) and before the run ends. Its first checks run meanwhile:
        that commit is tens of milliseconds of a failover's critical path otherwise."""
        with self.start_lock:  # a second changing branch waits here until the first one's wait is over
            waits, self.start_waits = self.start_waits, []
            for observer, until_durable, event in waits:
                self.wait_for([(observer, until_durable)], event)

    def redact_event(self, event: Event) -> Event:
        """``event`` with every secret the process knows masked (the plan holds only references)."""
        if not self.redactor.active:
            return event
        changes = {f.name: self.redactor.redact_data(getattr(event, f.name)) for f in dataclasses.fields(event)
                   if f.name != "plan"}
        changed = {name: value for name, value in changes.items() if value is not getattr(event, name)}
        return dataclasses.replace(event, **changed) if changed else event

    def finish_step(self, step_id: str, state: StepState, output: dict[str, Any] | None = None,
                    error: str | None = None, phase: Phase = Phase.FORWARD, markers: list[MarkerReached] | None = None
                    ) -> None:
        """Record how a step ended and tell the observers. Under the lock, so that no step that needs
        this one can start, and be heard of, before this one's end is."""
        with self.lock:
            previous = self.states[step_id]
            if phase == Phase.FORWARD and previous.finished:
                return  # an abandoned action reporting after the run already ended its step
            self.states[step_id] = state
            if state.finished and not previous.finished:
                self.newly_finished.append(step_id)
            # Templates of later steps read this: never a secret an action let slip into its output.
            shown = self.redactor.redact_data(output or {})
            self.results[step_id] = {"state": str(state), "output": shown, "error": error}
            if phase == Phase.FORWARD:
                self.apply_policy(self.steps[step_id], state, previous)
            # Markers first: a crash between the two leaves the mark recorded and the step in flight
            # (repeated or decided on resume), never a finished step whose mark was lost.
            for marker in markers or ():
                self.emit(marker)
            self.emit(StepFinished(self.run_id, step_id, utcnow(), state, output or {}, error, phase))

    def apply_policy(self, step: Step, state: StepState, previous: StepState) -> None:
        """The step's `on_failure`, decided with its state (under the lock), so that no step is
        scheduled in between by a run that is about to stop."""
        if state is StepState.SUCCEEDED or state in (StepState.FAILED, StepState.TIMED_OUT) or \
                (state is StepState.CANCELLED and previous is StepState.RUNNING):
            self.ended.append(step.id)  # it acted, or may have: rollback looks at it
        if state is StepState.SUCCEEDED:
            self.completed.append(step.id)
        elif state in (StepState.FAILED, StepState.TIMED_OUT) and step.on_failure is not OnFailure.CONTINUE:
            self.failed = True
            self.rollback_wanted |= step.on_failure is OnFailure.ROLLBACK
        elif state is StepState.CANCELLED and previous is StepState.RUNNING:
            self.rollback_wanted |= step.on_failure is OnFailure.ROLLBACK

    # ------------------------------------------------------------------ the run

    def execute(self) -> RunOutcome:
        if self.resume is None:
            self.started_at = utcnow()
        plan = self.plan
        self.run_info = {
            "id": self.run_id,
            "kind": str(plan.kind),
            "incident_at": (plan.incident_at or self.started_at).isoformat(),
            "started_at": self.started_at.isoformat(),
            "started_by": plan.started_by,
            "forced": list(plan.forced),
            # Files of the plan, for actions that hand them to other tools (ansible.playbook).
            "runbook_path": plan.runbook_source.path,
            "inventory_path": plan.inventory_source.path,
            "approvals": plan.runbook.approvals.model_dump(mode="json"),
            "pre_approved_by": plan.pre_approved_by,
            "saved_plan_sha256": plan.saved_plan_sha256,
        }
        try:
            if self.resume is None:
                self.emit(RunStarted(self.run_id, self.started_at, plan, self.engine.host), defer_wait=True)
            else:
                resume = self.resume
                self.emit(RunResumed(self.run_id, utcnow(), plan, self.engine.host, resume.actor, resume.reason,
                                     resume.retried, tuple(resume.marked_done)))
        except KeyboardInterrupt:
            # The start may already be committed (the run shows "running"): end it as aborted below.
            self.interrupt()
        error: str | None = None
        try:
            if not self.interrupted:  # else stopped while its start was being recorded: nothing runs
                error = self.carry_out()
        except KeyboardInterrupt:  # a Ctrl-C outside the places that expect one: stop where we are
            self.interrupt()
        except Exception as exc:  # noqa: BLE001 - a bug must still end the run, recorded
            log.exception("run %s failed inside the engine", self.run_id, extra=self.log_ids())
            error = f"internal error: {type(exc).__name__}: {exc}"
            self.failed = True
        finally:
            for step_id, step_state in list(self.states.items()):  # file order: needs come first
                if step_state.finished or self.deposed is not None:  # a deposed run's rest stays to do
                    continue
                blocker = self.blocking_need(self.steps[step_id])
                if step_state is StepState.PENDING and blocker is not None and \
                        self.states[blocker] is not StepState.CANCELLED:
                    # Same verdict whether or not the scheduler got to it before the run stopped.
                    self.finish_step(step_id, StepState.SKIPPED,
                                     error=f"needs {blocker!r}, which ended {self.states[blocker]}")
                else:
                    why = "a safety rule refused the run" if self.refused else \
                        "the run stopped before this step finished"
                    self.finish_step(step_id, StepState.CANCELLED, error=why)
            self.resources.close()
            state = self.final_state()
            if state is RunState.ABORTED and error is None:
                error = "interrupted by the operator"
            if self.deposed is not None:
                error = (f"stopped: this orchestrator may no longer act ({self.deposed}); "
                         "the node that leads now resumes the run")
            self.settle_start()
            self.emit(RunFinished(self.run_id, utcnow(), state, error))
        shown_error = None if error is None else self.redactor.redact(error)
        return RunOutcome(self.run_id, state, dict(self.states), shown_error)

    def carry_out(self) -> str | None:
        """Check, run the steps, compensate, judge the blast radius; a safety refusal's reason."""
        error = None
        if self.watch_blast_radius and self.resume is None:
            self.read_services_before()
        if self.resume is not None:
            self.restore(self.resume)
        else:
            error = self.check_safety()  # a refusal fails the run before its first step
        self.schedule()
        if self.deposed is not None:
            return None  # the node that leads now resumes the run: nothing more happens here
        if self.rollback_wanted or (self.failed and self.guarded and not self.refused):
            self.roll_back()  # compensation: a failed run restores the serving state it found
        if self.watch_blast_radius and not self.refused:
            try:
                self.judge_blast_radius()
            except Exception as exc:  # noqa: BLE001 - a reading that fails is recorded; it never fails the run
                log.exception("run %s: the blast-radius reading failed", self.run_id, extra=self.log_ids())
                self.emit(ActionEvent(self.run_id, blast_radius.BLAST_RADIUS, "blast_radius.unknown", utcnow(),
                                      {"error": f"{type(exc).__name__}: {exc}"}))
        return error

    def restore(self, resume: ResumePoint) -> None:
        """Take up the states the interrupted run reached, and record the engineer's decisions."""
        with self.lock:
            for step_id, done in resume.finished.items():
                previous = self.states[step_id]
                self.states[step_id] = done.state
                self.results[step_id] = {"state": str(done.state), "output": dict(done.output), "error": done.error}
                if done.state is StepState.SKIPPED and (done.error or "").startswith(CONDITION_SKIP):
                    self.skipped_by_condition.add(step_id)
                self.apply_policy(self.steps[step_id], done.state, previous)
        for step_id, (phase, reason) in resume.marked_done.items():
            output = {"marked_done_by": resume.actor, "reason": reason}
            if phase == Phase.ROLLBACK:
                self.rolled_back.add(step_id)
                self.finish_step(step_id, StepState.ROLLED_BACK, output, phase=Phase.ROLLBACK)
            else:
                self.finish_step(step_id, StepState.SUCCEEDED, output)

    def final_state(self) -> RunState:
        if self.deposed is not None:
            return RunState.INTERRUPTED
        if self.interrupted:
            return RunState.ABORTED
        if self.failed:
            return RunState.FAILED
        return RunState.SUCCEEDED

    def interrupt(self) -> None:
        """Ctrl-C or ``stop``: cancel running actions; roll back if an interrupted step asks for it."""
        self.interrupted = True
        self.halt.set()
        with self.lock:
            for cancel in self.active_cancels:
                cancel.set()
            in_flight = [self.steps[s] for s, st in self.states.items() if st is StepState.RUNNING]
            self.rollback_wanted |= any(step.on_failure is OnFailure.ROLLBACK for step in in_flight)

    def stopping(self) -> bool:
        return self.failed or self.halt.is_set()

    def schedule(self) -> None:
        pending = {s.id for s in self.plan.runbook.steps if not self.states[s.id].finished}
        first_look = set(pending)
        ready: list[tuple[int, str]] = []  # (file position, step) whose needs are met, waiting for a worker
        running: dict[Future[StepState], str] = {}
        workers = max(1, min(self.plan.runbook.max_parallel, self.engine.max_parallel))
        pool = ThreadPoolExecutor(max_workers=workers, thread_name_prefix=f"run-{self.run_id[:8]}")
        try:
            while True:
                try:
                    if self.stop.is_set() and not self.interrupted:
                        self.interrupt()
                    self.start_ready(pending, ready, running, pool, workers, first_look)
                    first_look = set()
                    if not running:
                        return
                    done, _ = wait(running, timeout=_POLL_S, return_when=FIRST_COMPLETED)
                    for future in done:
                        self.after_step(self.steps[running[future]], future)
                        del running[future]
                except KeyboardInterrupt:
                    if self.interrupted:
                        return  # a second Ctrl-C: stop waiting for the cancelled steps
                    self.interrupt()  # cancelled steps end within the grace; the loop waits for them
        finally:
            pool.shutdown(wait=False, cancel_futures=True)

    def start_ready(self, pending: set[str], ready: list[tuple[int, str]], running: dict[Future[StepState], str],
                    pool: ThreadPoolExecutor, workers: int, look_at: set[str]) -> None:
        """Move ``look_at`` and the pending dependents of steps ended since the last look to ``ready``
        (a heap in file order) when their needs are met, or skip them when a need failed; start ready
        steps while workers are free."""
        skipped_any = True
        while skipped_any:  # a skip may decide the steps that need the skipped one: look again
            skipped_any = False
            starting: list[str] = []
            with self.lock:  # decided against states that finishing steps cannot change meanwhile
                if self.stopping():
                    return
                touched = {d for f in self.newly_finished for d in self.dependents[f] if d in pending}
                touched.update(step_id for step_id in look_at if step_id in pending)
                look_at = set()
                self.newly_finished.clear()
                for step_id in sorted(touched, key=self.order.__getitem__):
                    step = self.steps[step_id]
                    if not all(self.states[n].finished for n in step.needs):
                        continue
                    pending.discard(step_id)
                    blocker = self.blocking_need(step)
                    if blocker is None:
                        heapq.heappush(ready, (self.order[step_id], step_id))
                        continue
                    error = f"needs {blocker!r}, which ended {self.states[blocker]}"
                    self.states[step_id] = StepState.SKIPPED
                    self.newly_finished.append(step_id)
                    self.results[step_id] = {"state": str(StepState.SKIPPED), "output": {}, "error": error}
                    self.emit(StepFinished(self.run_id, step_id, utcnow(), StepState.SKIPPED, {}, error))
                    skipped_any = True
                while ready and len(running) + len(starting) < workers:  # RUNNING only once a worker has it
                    _, step_id = heapq.heappop(ready)
                    self.states[step_id] = StepState.RUNNING
                    starting.append(step_id)
            for step_id in starting:
                running[pool.submit(self.run_step, self.steps[step_id])] = step_id

    def blocking_need(self, step: Step) -> str | None:
        """A need that ended without success, which keeps ``step`` from ever running."""
        return next((n for n in step.needs if self.states[n].finished and not self.satisfied(n)), None)

    def satisfied(self, step_id: str) -> bool:
        state = self.states[step_id]
        # A step skipped because its `when` was false does not block what follows.
        return state is StepState.SUCCEEDED or (state is StepState.SKIPPED and step_id in self.skipped_by_condition)

    def after_step(self, step: Step, future: Future[StepState]) -> None:
        try:
            future.result()
        except Exception as exc:  # noqa: BLE001 - run_step catches everything; this is a last guard
            log.exception("step %s crashed the engine", step.id, extra=self.log_ids(step.id))
            self.finish_step(step.id, StepState.FAILED, error=f"internal error: {exc}")

    # ------------------------------------------------------------------ one step

    # ------------------------------------------------------------------ safety pre-flight

    def check_safety(self) -> str | None:
        def render(source: str) -> Any:
            return templating.render_string(source, self.context(None, None))

        def report(kind: str, data: dict[str, Any]) -> None:
            self.emit(ActionEvent(self.run_id, PREFLIGHT, kind, utcnow(), data))

        refusal = preflight.check(self.plan, render, self.run_readiness, report)
        self.refused = refusal is not None
        self.failed |= self.refused
        return refusal

    def run_readiness(self, site: str, check: ReadinessCheck) -> tuple[bool, str]:
        """One readiness check, run as the matching health-check action, bounded by its timeout."""
        probing = {"consecutive": 1, "deadline": check.timeout, "probe_timeout": min(1.0, check.timeout)}
        if check.http is not None:
            name, raw = "http.check", {"url": check.http, "expect_status": list(check.expect_status), **probing}
        else:
            host, _, port = (check.tcp or "").rpartition(":")
            name, raw = "tcp.check", {"host": host, "port": int(port), **probing}
        action_class = self.engine.registry.get(name)
        params = action_class.Params.model_validate(raw)
        timeout = check.timeout + 1.0  # the check's own deadline ends it first, with its reason
        outcome = self.attempt(action_class(), params, PREFLIGHT, 1, time.monotonic() + timeout, timeout, None, site)
        if outcome.state is StepState.SUCCEEDED:
            return True, "ready"
        return False, outcome.error or str(outcome.state)

    def context(self, service: str | None, site: str | None) -> dict[str, Any]:
        with self.lock:
            results = dict(self.results)
        return template_context(self.plan, self.run_info, results, service, site)

    def run_step(self, step: Step) -> StepState:
        if self.deposed is not None:
            return StepState.PENDING  # never started: left for the node that leads now
        if self.halt.is_set():  # stopped between scheduling and a worker picking the step up
            self.finish_step(step.id, StepState.CANCELLED, error="the run was stopped before this step started")
            return StepState.CANCELLED
        service = self.plan.service_of(step)
        try:
            site = templating.render_string(step.site, self.context(service, None)) if step.site else None
            with self.lock:
                self.sites[step.id] = site
            if step.when is not None:
                if not templating.evaluate_condition(step.when, self.context(service, site)):
                    with self.lock:
                        self.skipped_by_condition.add(step.id)
                    self.finish_step(step.id, StepState.SKIPPED, error=f"{CONDITION_SKIP}{step.when!r} was false")
                    return StepState.SKIPPED
        except templating.TemplateError as exc:
            self.emit(StepStarted(self.run_id, step.id, utcnow()))
            self.finish_step(step.id, StepState.FAILED, error=str(exc))
            return StepState.FAILED
        effect = self.effect(step)
        if effect.changes:
            if not self.fence_allows(step.id, Phase.FORWARD):
                return StepState.PENDING
            self.settle_start()
            self.first_change(step, effect)
        outcome = self.run_action(step.id, Phase.FORWARD, step.action, step.with_, step.timeout, step.retries,
                                  service, site)
        markers = []
        if outcome.state is StepState.SUCCEEDED:
            marked_at = outcome.result.marked_at or utcnow()
            markers = [MarkerReached(self.run_id, step.id, mark, service, site, marked_at) for mark in step.marks]
        self.finish_step(step.id, outcome.state, outcome.result.output, outcome.error, markers=markers)
        return outcome.state

    def run_action(self, step_id: str, phase: Phase, action_name: str, raw_params: dict[str, Any], timeout: float,
                   retries: Retries, service: str | None, site: str | None) -> _Attempt:
        try:
            action_class = self.engine.registry.get(action_name)
            rendered = templating.render_value(raw_params, self.context(service, site), "with")
            params = action_class.Params.model_validate(rendered)
        except KeyError:
            return self.refuse(step_id, phase, f"unknown action {action_name!r}")
        except templating.TemplateError as exc:
            return self.refuse(step_id, phase, str(exc))
        except ValidationError as exc:
            problems = "; ".join(f"{'.'.join(map(str, e['loc'])) or 'with'}: {e['msg']}" for e in exc.errors())
            return self.refuse(step_id, phase, f"bad parameters for {action_name}: {problems}")
        self.emit(StepStarted(self.run_id, step_id, utcnow(), phase, params.model_dump(mode="json")))
        action = action_class()
        step = self.steps.get(step_id)
        repeatable = action_class.idempotent if step is None else may_repeat(step, phase, self.engine.registry)
        # left in flight by the interrupted run this one resumes: a resumable action checks before it acts
        resumed = phase == Phase.FORWARD and self.resume is not None and step_id in self.resume.retried
        deadline = time.monotonic() + timeout  # bounds all attempts together
        outcome = _Attempt(StepState.FAILED, error="no attempt was made")
        for attempt in range(1, retries.count + 2):
            if attempt > 1:
                pause = retries.delay_before(attempt)
                if time.monotonic() + pause >= deadline:
                    outcome.error = (f"{outcome.error} (attempt {attempt - 1}; no time left for another "
                                     f"within the step's timeout of {timeout:g}s)")
                    break
                if self.halt.wait(pause):
                    outcome = _Attempt(StepState.CANCELLED, error="cancelled between attempts: the run was stopped")
                    break
            self.emit(AttemptStarted(self.run_id, step_id, attempt, utcnow(), phase, repeatable))
            started = time.monotonic()
            outcome = self.attempt(action, params, step_id, attempt, deadline, timeout, service, site, resumed)
            self.emit(AttemptFinished(self.run_id, step_id, attempt, utcnow(), outcome.state,
                                      time.monotonic() - started, outcome.result.output, outcome.error, phase))
            if outcome.state is not StepState.FAILED or self.halt.is_set():
                break
        return outcome

    def refuse(self, step_id: str, phase: Phase, error: str) -> _Attempt:
        self.emit(StepStarted(self.run_id, step_id, utcnow(), phase, {}))
        return _Attempt(StepState.FAILED, error=error)

    def attempt(self, action: Action[Any], params: Any, step_id: str, attempt: int, deadline: float,
                timeout: float, service: str | None, site: str | None, resumed: bool = False) -> _Attempt:
        cancel = threading.Event()
        closed = threading.Event()
        finished = threading.Event()

        def emit_while_open(event: Event) -> None:
            if not closed.is_set():  # an abandoned action must not write into a finished step
                self.emit(event)

        ctx = ActionContext(
            run_id=self.run_id, step_id=step_id, attempt=attempt, inventory=self.plan.inventory,
            emit=emit_while_open, cancelled=cancel, deadline=deadline, resources=self.resources,
            service=service, site=site, resumed=resumed, run_info=self.run_info, approvals=self.engine.approvals,
            redact=self.redactor.redact, resolve_secret=self.redactor.resolve,
        )
        try:  # at the last moment, and only for the action: the evidence keeps the references
            params = secrets.with_secrets(params, self.redactor)
        except secrets.SecretError as exc:
            return _Attempt(StepState.FAILED, error=str(exc))
        box: dict[str, Any] = {}

        def call() -> None:
            try:
                box["result"] = action.run(params, ctx)
            except BaseException as exc:  # noqa: BLE001 - reported below, whatever it is
                box["error"] = exc
            finally:
                box["ended"] = time.monotonic()
                finished.set()

        with self.lock:
            self.active_cancels.add(cancel)
        if self.halt.is_set():
            cancel.set()
        try:
            ACTION_THREADS.run(call)
            try:
                # The action runs in its own thread so that a timeout or Ctrl-C never waits on it.
                while not finished.is_set() and not cancel.is_set() and (left := deadline - time.monotonic()) > 0:
                    finished.wait(min(left, _POLL_S))
            except KeyboardInterrupt:  # only the thread running rollbacks sees Ctrl-C here
                self.interrupt()
            if not finished.is_set():
                cancel.set()
                finished.wait(self.engine.cancel_grace)
        finally:
            closed.set()
            with self.lock:
                self.active_cancels.discard(cancel)
        return self.classify(box, finished.is_set(), cancel.is_set(), deadline, timeout)

    def classify(self, box: dict[str, Any], finished: bool, cancelled: bool, deadline: float,
                 timeout: float) -> _Attempt:
        note = "" if finished else "; the action did not stop when asked and was abandoned"
        stopped = cancelled and self.halt.is_set()
        if finished and "result" in box and (box["ended"] <= deadline or stopped):
            result = box["result"]
            return _Attempt(StepState.SUCCEEDED, result if isinstance(result, ActionResult) else ActionResult())
        error = box.get("error")
        if stopped:
            return _Attempt(StepState.CANCELLED, error=f"cancelled: the run was stopped{note}")
        if box.get("ended", time.monotonic()) >= deadline:
            detail = f" ({error})" if error is not None and not isinstance(error, ActionCancelled) else ""
            return _Attempt(StepState.TIMED_OUT, error=f"timed out after {timeout:g}s{detail}{note}")
        if isinstance(error, ActionError):
            return _Attempt(StepState.FAILED, error=str(error))
        return _Attempt(StepState.FAILED, error=f"{type(error).__name__}: {error}")

    # ------------------------------------------------------------------ blast radius

    def read_services_before(self) -> None:
        """Start reading every service of the inventory; the run does not wait for it here."""
        self.before_reading_started = time.monotonic()
        for service in self.plan.inventory.services.values():
            reading: Future[blast_radius.Reading] = Future()

            def read(service: Service = service, reading: Future[blast_radius.Reading] = reading) -> None:
                try:
                    reading.set_result(blast_radius.read_one(self.plan.inventory, service, self.probe_health,
                                                             blast_radius.BEFORE_WINDOW_S))
                except BaseException as exc:  # noqa: BLE001 - handed to whoever waits for the reading
                    reading.set_exception(exc)

            threading.Thread(target=read, name=f"blast-radius-{service.name}", daemon=True).start()
            self.before_reading[service.name] = reading

    def fence_allows(self, step_id: str, phase: Phase) -> bool:
        """Whether this process may still change the world (the engine's ``fence``); the token a step
        acts under, or the refusal, is recorded. A refusal stops the run where it is (``deposed``)."""
        fence = self.engine.fence
        if fence is None:
            return True
        if self.deposed is not None:
            return False
        try:
            token = fence()
        except Exception as exc:  # noqa: BLE001 - whatever the fence says, this process must not act
            why = str(exc) or type(exc).__name__
            with self.lock:
                first, self.deposed = self.deposed is None, self.deposed or why
            if first:
                self.emit(ActionEvent(self.run_id, step_id, FENCING_REFUSED, utcnow(),
                                      {"phase": phase.value, "error": why}))
            self.halt.set()
            return False
        self.emit(ActionEvent(self.run_id, step_id, FENCING_CHECKED, utcnow(),
                              {"phase": phase.value, "token": str(token)}))
        return True

    def first_change(self, step: Step, effect: Effect) -> None:
        """Before the run's first changing step: fix the blast-radius reading, and record the moment
        (a run that ends before it changed nothing: reports list it as not executed, not as failed)."""
        with self.before_lock:
            if self.changed:
                return
            self.changed = True
        self.fix_services_before()
        self.emit(ActionEvent(self.run_id, step.id, FIRST_CHANGE, utcnow(), {"effect": str(effect)}))

    def fix_services_before(self) -> None:
        """The reading before the run, taken at its first change at the latest: what has answered by then,
        waiting for the rest no longer than the window from the run's start (a service at a dead site
        may take seconds to say so, which must not delay the recovery much)."""
        with self.before_lock:  # not self.lock: the probes being waited for take that one
            if self.before is not None or not self.before_reading:
                return
            # Only the services outside the run's scope are waited for: what the run may do to them is the
            # question; those in scope are meant to change (and at a dead site would hold the first change up).
            scope = self.scope()
            outside = [reading for name, reading in self.before_reading.items() if name not in scope]
            window_left = self.before_reading_started + blast_radius.BEFORE_WINDOW_S - time.monotonic()
            wait(outside, timeout=max(0.0, window_left))
            before = []
            for name, reading in self.before_reading.items():
                try:
                    before.append(reading.result(timeout=0) if reading.done() else
                                  blast_radius.Reading(name, None, "no answer before the run's first change"))
                except Exception as exc:  # noqa: BLE001 - a reading that failed is unknown, never fatal
                    before.append(blast_radius.Reading(name, None, f"the reading failed: {exc}"))
            self.before = before

    def read_services(self, window: float) -> list[blast_radius.Reading]:
        services = list(self.plan.inventory.services.values())
        if not services:
            return []
        with ThreadPoolExecutor(max_workers=min(16, len(services)),
                                thread_name_prefix=f"blast-radius-{self.run_id[:8]}") as pool:
            return list(pool.map(lambda service: blast_radius.read_one(self.plan.inventory, service,
                                                                        self.probe_health, window), services))

    def probe_health(self, service: str, url: str, window: float) -> tuple[bool, str]:
        action_class = self.engine.registry.get(blast_radius.PROBE_ACTION)
        params = action_class.Params.model_validate({
            "url": url, "consecutive": 1, "interval": 0.1, "probe_timeout": blast_radius.PROBE_TIMEOUT_S,
            "deadline": window})
        timeout = window + blast_radius.PROBE_TIMEOUT_S + 1.0  # the check's own deadline ends it first
        outcome = self.attempt(action_class(), params, blast_radius.BLAST_RADIUS, 1, time.monotonic() + timeout,
                               timeout, service, None)
        if outcome.state is StepState.SUCCEEDED:
            return True, "serving"
        return False, outcome.error or str(outcome.state)

    def judge_blast_radius(self) -> None:
        """Compare every service with how the run found it, and record the verdict (and each impact)."""
        def report(kind: str, data: dict[str, Any]) -> None:
            self.emit(ActionEvent(self.run_id, blast_radius.BLAST_RADIUS, kind, utcnow(), data))

        self.fix_services_before()  # a run that changed nothing: its reading is fixed now
        before = self.before
        after = self.read_services(blast_radius.AFTER_WINDOW_S)
        if before is not None:
            report("blast_radius.before", {"services": [reading.as_dict() for reading in before]})
        report("blast_radius.after", {"services": [reading.as_dict() for reading in after]})
        if before is None:  # a resumed run: how the first process found the services is in its evidence
            return
        for was, now in blast_radius.impacts(before, after):
            service = self.plan.inventory.services[now.service]
            report("blast_radius.impact", {"service": now.service, "tier": service.tier, "before": was.detail,
                                           "after": now.detail, "in_scope": now.service in self.scope()})
        report("blast_radius.verdict", blast_radius.verdict(before, after))

    def scope(self) -> set[str]:
        return set(self.plan.services_in_scope())

    # ------------------------------------------------------------------ rollback

    def effect(self, step: Step) -> Effect:
        return step.effect or self.engine.registry.effect(step.action) or Effect.IRREVERSIBLE

    def bars_rollback(self, step: Step) -> bool:
        """The step ran one way (or may have) and says so: its action bars rollback (a promotion), or the
        runbook declares it irreversible with no rollback (``rollback: {none: reason}``)."""
        if step.rollback is not None:
            return False
        if step.action in self.engine.registry and self.engine.registry.get(step.action).bars_rollback:
            return True
        return step.no_rollback is not None and self.effect(step) is Effect.IRREVERSIBLE

    def roll_back(self) -> None:
        """Undo completed steps that declare a rollback, newest first. Runs even after Ctrl-C;
        another Ctrl-C stops it. It stops at a step that bars rollback (a promotion that ran, or may
        have): undoing what came before it (the fencing of the old primary) would make things worse.
        A rollback that failed is tried once more at the end: a switch back to a site is refused
        until the service fenced there has been restarted by an older step's rollback."""
        self.halt.clear()
        ended = list(self.ended)
        failed: list[str] = []
        for position in range(len(ended) - 1, -1, -1):
            if self.halt.is_set():
                return
            step_id = ended[position]
            step = self.steps[step_id]
            if self.bars_rollback(step):
                self.emit(ActionEvent(self.run_id, step_id, "rollback.stopped", utcnow(), {
                    "reason": step.no_rollback or "it changes the world for good and has no rollback",
                    "state": str(self.states[step_id]),
                    "not_undone": [s for s in ended[:position] if s in self.completed
                                   and self.steps[s].rollback is not None and s not in self.rolled_back]}))
                break
            if step_id not in self.completed or step.rollback is None or step_id in self.rolled_back:
                continue
            if self.roll_back_step(step) is StepState.ROLLBACK_FAILED:
                failed.append(step_id)
        for step_id in failed:
            if self.halt.is_set():
                return
            self.roll_back_step(self.steps[step_id])

    def roll_back_step(self, step: Step) -> StepState:
        assert step.rollback is not None
        service = self.plan.service_of(step)
        if step.id not in self.sites and step.site:  # completed before a resume: render it again
            self.sites[step.id] = templating.render_string(step.site, self.context(service, None))
        rollback = step.rollback
        timeout = rollback.timeout if rollback.timeout is not None else step.timeout
        if not self.fence_allows(step.id, Phase.ROLLBACK):
            return StepState.PENDING
        try:
            outcome = self.run_action(step.id, Phase.ROLLBACK, rollback.action, rollback.with_, timeout,
                                      step.retries, service, self.sites.get(step.id))
        except KeyboardInterrupt:
            self.interrupt()
            outcome = _Attempt(StepState.CANCELLED, error="the rollback was interrupted by the operator")
        state = StepState.ROLLED_BACK if outcome.state is StepState.SUCCEEDED else StepState.ROLLBACK_FAILED
        self.finish_step(step.id, state, outcome.result.output, outcome.error, phase=Phase.ROLLBACK)
        return state
