"""Runs one plan: the DAG in parallel (bounded), timeouts, retries with backoff, rollback, events.

Whatever happens (a failure, a bug, Ctrl-C), every step and the run end in a finished state and
observers hear about it: a run is never left running.
"""

from __future__ import annotations

import logging
import socket
import threading
import time
import uuid
from concurrent.futures import FIRST_COMPLETED, Future, ThreadPoolExecutor, wait
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any

from pydantic import ValidationError

from dr_orchestrator import templating
from dr_orchestrator.actions.base import (
    Action,
    ActionCancelled,
    ActionContext,
    ActionError,
    ActionRegistry,
    ActionResult,
    RunResources,
)
from dr_orchestrator.engine.context import step_service, template_context
from dr_orchestrator.model.events import (
    AttemptFinished,
    AttemptStarted,
    Event,
    MarkerReached,
    Observer,
    RunFinished,
    RunStarted,
    StepFinished,
    StepStarted,
    utcnow,
)
from dr_orchestrator.model.run import RunPlan, RunState, StepState
from dr_orchestrator.model.runbook import OnFailure, Retries, Step

log = logging.getLogger(__name__)

# How long a cancelled action gets to stop before the engine moves on without it.
CANCEL_GRACE_S = 2.0
_POLL_S = 0.2  # how often the scheduler looks for Ctrl-C or a stop request while steps run


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
    ) -> None:
        self.registry = registry
        self.observers = list(observers or [])
        self.max_parallel = max_parallel
        self.host = host or socket.gethostname()

    def run(self, plan: RunPlan, run_id: str | None = None, stop: threading.Event | None = None) -> RunOutcome:
        """Execute ``plan``; ``stop`` (set from another thread) ends the run as Ctrl-C would."""
        return _Run(self, plan, run_id or str(uuid.uuid4()), stop or threading.Event()).execute()


class _Run:
    def __init__(self, engine: Engine, plan: RunPlan, run_id: str, stop: threading.Event) -> None:
        self.engine = engine
        self.plan = plan
        self.run_id = run_id
        self.stop = stop
        self.steps = {s.id: s for s in plan.runbook.steps}
        self.states: dict[str, StepState] = {s.id: StepState.PENDING for s in plan.runbook.steps}
        self.results: dict[str, dict[str, Any]] = {}
        self.completed: list[str] = []  # succeeded steps, in the order they finished
        self.skipped_by_condition: set[str] = set()
        self.lock = threading.Lock()
        self.emit_lock = threading.Lock()
        self.active_cancels: set[threading.Event] = set()
        self.resources = RunResources()
        self.interrupted = False
        self.rollback_wanted = False
        self.failed = False
        self.started_at: datetime = utcnow()
        self.run_info: dict[str, Any] = {}

    # ------------------------------------------------------------------ events

    def emit(self, event: Event) -> None:
        with self.emit_lock:
            for observer in self.engine.observers:
                try:
                    observer(event)
                except Exception:  # noqa: BLE001 - one observer's failure must not stop a failover
                    log.exception("observer %r failed on %s", observer, type(event).__name__)

    def finish_step(self, step_id: str, state: StepState, output: dict[str, Any] | None = None,
                    error: str | None = None, phase: str = "forward") -> None:
        with self.lock:
            self.states[step_id] = state
            self.results[step_id] = {"state": str(state), "output": output or {}, "error": error}
            if state is StepState.SUCCEEDED and phase == "forward":
                self.completed.append(step_id)
        self.emit(StepFinished(self.run_id, step_id, utcnow(), state, output or {}, error, phase))

    # ------------------------------------------------------------------ the run

    def execute(self) -> RunOutcome:
        self.started_at = utcnow()
        plan = self.plan
        self.run_info = {
            "id": self.run_id,
            "kind": str(plan.kind),
            "incident_at": (plan.incident_at or self.started_at).isoformat(),
            "started_at": self.started_at.isoformat(),
            "started_by": plan.started_by,
            "forced": list(plan.forced),
        }
        self.emit(RunStarted(self.run_id, self.started_at, plan, self.engine.host))
        error: str | None = None
        try:
            try:
                self.schedule()
            except KeyboardInterrupt:
                self.interrupt()
            if self.rollback_wanted:
                try:
                    self.roll_back()
                except KeyboardInterrupt:  # a second Ctrl-C stops the rollback too
                    self.interrupted = True
                    self.cancel_running()
        except Exception as exc:  # noqa: BLE001 - a bug must still end the run, recorded
            log.exception("run %s failed inside the engine", self.run_id)
            error = f"internal error: {type(exc).__name__}: {exc}"
            self.failed = True
        finally:
            for step_id, step_state in list(self.states.items()):
                if not step_state.finished:
                    self.finish_step(step_id, StepState.CANCELLED, error="the run stopped before this step finished")
            self.resources.close()
            state = self.final_state()
            if state is RunState.ABORTED and error is None:
                error = "interrupted by the operator"
            self.emit(RunFinished(self.run_id, utcnow(), state, error))
        return RunOutcome(self.run_id, state, dict(self.states), error)

    def final_state(self) -> RunState:
        if self.interrupted:
            return RunState.ABORTED
        if self.failed:
            return RunState.FAILED
        return RunState.SUCCEEDED

    def interrupt(self) -> None:
        self.interrupted = True
        self.cancel_running()
        with self.lock:
            in_flight = [self.steps[s] for s, st in self.states.items() if st is StepState.RUNNING]
        # Rollbacks "as configured": an interrupted step that asks for rollback gets it.
        if any(step.on_failure is OnFailure.ROLLBACK for step in in_flight):
            self.rollback_wanted = True

    def cancel_running(self) -> None:
        with self.lock:
            for cancel in self.active_cancels:
                cancel.set()

    def stopping(self) -> bool:
        return self.failed or self.interrupted

    def schedule(self) -> None:
        plan = self.plan
        pending = [s.id for s in plan.runbook.steps]
        running: dict[Future[StepState], str] = {}
        workers = max(1, min(plan.runbook.max_parallel, self.engine.max_parallel))
        pool = ThreadPoolExecutor(max_workers=workers, thread_name_prefix=f"run-{self.run_id[:8]}")
        try:
            while True:
                if not self.stopping():
                    self.start_ready(pending, running, pool)
                if not running:
                    break
                done, _ = wait(running, timeout=_POLL_S, return_when=FIRST_COMPLETED)
                for future in done:
                    step_id = running.pop(future)
                    self.after_step(self.steps[step_id], future)
                if self.stop.is_set() and not self.interrupted:
                    self.interrupt()
        except KeyboardInterrupt:
            self.interrupt()
            self.drain(running)
        finally:
            pool.shutdown(wait=False, cancel_futures=True)

    def drain(self, running: dict[Future[StepState], str]) -> None:
        """After Ctrl-C: give cancelled steps their grace to stop, then move on."""
        deadline = time.monotonic() + CANCEL_GRACE_S + 1.0
        while running and time.monotonic() < deadline:
            done, _ = wait(running, timeout=max(0.0, deadline - time.monotonic()), return_when=FIRST_COMPLETED)
            for future in done:
                running.pop(future)

    def start_ready(self, pending: list[str], running: dict[Future[StepState], str], pool: ThreadPoolExecutor) -> None:
        progressed = True
        while progressed:
            progressed = False
            for step_id in list(pending):
                step = self.steps[step_id]
                need_states = [self.states[n] for n in step.needs]
                if not all(s.finished for s in need_states):
                    continue
                pending.remove(step_id)
                progressed = True
                blocker = next((n for n in step.needs if not self.satisfied(n)), None)
                if blocker is not None:
                    self.finish_step(step_id, StepState.SKIPPED,
                                     error=f"needs {blocker!r}, which ended {self.states[blocker]}")
                    continue
                with self.lock:
                    self.states[step_id] = StepState.RUNNING
                running[pool.submit(self.run_step, step)] = step_id

    def satisfied(self, step_id: str) -> bool:
        state = self.states[step_id]
        if state is StepState.SUCCEEDED:
            return True
        # A step skipped because its `when` was false does not block what follows.
        return state is StepState.SKIPPED and step_id in self.skipped_by_condition

    def after_step(self, step: Step, future: Future[StepState]) -> None:
        try:
            state = future.result()
        except Exception as exc:  # noqa: BLE001 - run_step catches everything; this is a last guard
            log.exception("step %s crashed the engine", step.id)
            state = StepState.FAILED
            self.finish_step(step.id, state, error=f"internal error: {exc}")
        if state in (StepState.FAILED, StepState.TIMED_OUT) and step.on_failure is not OnFailure.CONTINUE:
            self.failed = True
            if step.on_failure is OnFailure.ROLLBACK:
                self.rollback_wanted = True
        elif state is StepState.CANCELLED and step.on_failure is OnFailure.ROLLBACK:
            self.rollback_wanted = True

    # ------------------------------------------------------------------ one step

    def context(self, service: str | None, site: str | None) -> dict[str, Any]:
        with self.lock:
            results = dict(self.results)
        return template_context(self.plan, self.run_info, results, service, site)

    def run_step(self, step: Step) -> StepState:
        service = step_service(self.plan, step.service)
        try:
            site = templating.render_string(step.site, self.context(service, None)) if step.site else None
            if step.when is not None:
                if not templating.evaluate_condition(step.when, self.context(service, site)):
                    self.skipped_by_condition.add(step.id)
                    self.finish_step(step.id, StepState.SKIPPED, error=f"when {step.when!r} was false")
                    return StepState.SKIPPED
        except templating.TemplateError as exc:
            self.emit(StepStarted(self.run_id, step.id, utcnow()))
            self.finish_step(step.id, StepState.FAILED, error=str(exc))
            return StepState.FAILED
        outcome = self.run_action(step.id, "forward", step.action, step.with_, step.timeout, step.retries,
                                  service, site)
        self.finish_step(step.id, outcome.state, outcome.result.output, outcome.error)
        if outcome.state is StepState.SUCCEEDED:
            marked_at = outcome.result.marked_at or utcnow()
            for mark in step.marks:
                self.emit(MarkerReached(self.run_id, step.id, mark, service, site, marked_at))
        return outcome.state

    def run_action(self, step_id: str, phase: str, action_name: str, raw_params: dict[str, Any], timeout: float,
                   retries: Retries, service: str | None, site: str | None) -> _Attempt:
        try:
            action_class = self.engine.registry.get(action_name)
            rendered = templating.render_value(raw_params, self.context(service, site))
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
        deadline = time.monotonic() + timeout
        outcome = _Attempt(StepState.FAILED, error="no attempt was made")
        for attempt in range(1, retries.count + 2):
            if attempt > 1:
                pause = min(retries.delay_before(attempt), max(0.0, deadline - time.monotonic()))
                if self.stop_waiting(pause):
                    break
            self.emit(AttemptStarted(self.run_id, step_id, attempt, utcnow(), phase))
            started = time.monotonic()
            outcome = self.attempt(action, params, step_id, attempt, deadline, timeout, service, site)
            self.emit(AttemptFinished(self.run_id, step_id, attempt, utcnow(), outcome.state,
                                      time.monotonic() - started, outcome.result.output, outcome.error, phase))
            if outcome.state in (StepState.SUCCEEDED, StepState.TIMED_OUT, StepState.CANCELLED):
                break
            if time.monotonic() >= deadline or self.interrupted:
                break
        return outcome

    def refuse(self, step_id: str, phase: str, error: str) -> _Attempt:
        self.emit(StepStarted(self.run_id, step_id, utcnow(), phase, {}))
        return _Attempt(StepState.FAILED, error=error)

    def stop_waiting(self, seconds: float) -> bool:
        """Wait between attempts; True when the run is being interrupted meanwhile."""
        end = time.monotonic() + seconds
        while (left := end - time.monotonic()) > 0:
            if self.interrupted or self.stop.wait(min(left, _POLL_S)):
                return True
        return self.interrupted

    def attempt(self, action: Action[Any], params: Any, step_id: str, attempt: int, deadline: float,
                timeout: float, service: str | None, site: str | None) -> _Attempt:
        cancel = threading.Event()
        closed = threading.Event()

        def emit_while_open(event: Event) -> None:
            if not closed.is_set():  # an abandoned action must not write into a finished step
                self.emit(event)

        ctx = ActionContext(
            run_id=self.run_id, step_id=step_id, attempt=attempt, inventory=self.plan.inventory,
            emit=emit_while_open, cancelled=cancel, deadline=deadline, resources=self.resources,
            service=service, site=site, run_info=self.run_info,
        )
        box: dict[str, Any] = {}

        def call() -> None:
            try:
                box["result"] = action.run(params, ctx)
            except BaseException as exc:  # noqa: BLE001 - reported below, whatever it is
                box["error"] = exc

        with self.lock:
            self.active_cancels.add(cancel)
        if self.interrupted:
            cancel.set()
        worker = threading.Thread(target=call, name=f"{step_id}#{attempt}", daemon=True)
        try:
            worker.start()
            worker.join(max(0.0, deadline - time.monotonic()))
            if worker.is_alive():
                cancel.set()
                worker.join(CANCEL_GRACE_S)
                closed.set()
                if self.interrupted:
                    return _Attempt(StepState.CANCELLED, error="cancelled: the run was interrupted")
                note = "" if not worker.is_alive() else "; the action did not stop when asked and was abandoned"
                return _Attempt(StepState.TIMED_OUT, error=f"timed out after {timeout:g}s{note}")
        finally:
            closed.set()
            with self.lock:
                self.active_cancels.discard(cancel)
        error = box.get("error")
        if error is None:
            result = box.get("result")
            return _Attempt(StepState.SUCCEEDED, result if isinstance(result, ActionResult) else ActionResult())
        if isinstance(error, ActionCancelled) or (self.interrupted and cancel.is_set()):
            return _Attempt(StepState.CANCELLED, error=str(error) or "cancelled")
        if isinstance(error, ActionError):
            return _Attempt(StepState.FAILED, error=str(error))
        return _Attempt(StepState.FAILED, error=f"{type(error).__name__}: {error}")

    # ------------------------------------------------------------------ rollback

    def roll_back(self) -> None:
        """Undo completed steps that declare a rollback, newest first."""
        for step_id in reversed(list(self.completed)):
            step = self.steps[step_id]
            if step.rollback is None:
                continue
            service = step_service(self.plan, step.service)
            rollback = step.rollback
            outcome = self.run_action(step_id, "rollback", rollback.action, rollback.with_,
                                      rollback.timeout or step.timeout, step.retries, service, step.site)
            state = StepState.ROLLED_BACK if outcome.state is StepState.SUCCEEDED else StepState.ROLLBACK_FAILED
            self.finish_step(step_id, state, outcome.result.output, outcome.error, phase="rollback")
