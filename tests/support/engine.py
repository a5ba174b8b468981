"""The engine tests' bench: small in-test actions that coordinate with the test through events and
barriers, the events they cause, and what every run's events must satisfy (the bench fixture is in
tests/conftest.py)."""

from __future__ import annotations

import threading
import time
from collections import defaultdict
from datetime import datetime
from typing import Any

from pydantic import Field

from dr_orchestrator.actions.base import (
    Action,
    ActionCancelled,
    ActionContext,
    ActionError,
    ActionRegistry,
    ActionResult,
    Params,
)
from dr_orchestrator.engine import Engine, RunOutcome
from dr_orchestrator.model.events import (
    AttemptFinished,
    AttemptStarted,
    Event,
    RunFinished,
    RunStarted,
    StepFinished,
    StepStarted,
)
from dr_orchestrator.model.run import RunPlan

WAIT_S = 10.0  # deadline for anything a test waits on; never reached when the engine works
GRACE_S = 0.2  # cancel grace used in these tests, to keep abandoned actions cheap


def check_invariants(events: list[Event], plan: RunPlan) -> None:
    """What every observer relies on, whatever happened in the run."""
    assert isinstance(events[0], RunStarted)
    assert isinstance(events[-1], RunFinished)
    assert sum(isinstance(e, RunStarted) for e in events) == 1
    assert sum(isinstance(e, RunFinished) for e in events) == 1
    open_steps: dict[tuple[str, str], int] = defaultdict(int)
    open_attempts: dict[tuple[str, str, int], int] = defaultdict(int)
    finished_forward: dict[str, int] = defaultdict(int)
    for event in events:
        if isinstance(event, StepStarted):
            open_steps[(event.step_id, event.phase)] += 1
        elif isinstance(event, StepFinished):
            if open_steps[(event.step_id, event.phase)]:
                open_steps[(event.step_id, event.phase)] -= 1
            assert event.state.finished
            if event.phase == "forward":
                finished_forward[event.step_id] += 1
        elif isinstance(event, AttemptStarted):
            open_attempts[(event.step_id, event.phase, event.attempt)] += 1
        elif isinstance(event, AttemptFinished):
            open_attempts[(event.step_id, event.phase, event.attempt)] -= 1
    ended: set[str] = set()
    needs = {s.id: s.needs for s in plan.runbook.steps}
    for event in events:  # observers hear of a step's end before anything that needs it starts
        if isinstance(event, StepFinished) and event.phase == "forward":
            ended.add(event.step_id)
        elif isinstance(event, StepStarted) and event.phase == "forward":
            assert set(needs[event.step_id]) <= ended, f"{event.step_id} started before its needs ended"
    assert not any(open_steps.values()), f"steps started but never finished: {dict(open_steps)}"
    assert not any(open_attempts.values()), f"attempts started but never finished: {dict(open_attempts)}"
    assert finished_forward == {s.id: 1 for s in plan.runbook.steps}, "every step ends exactly once"


class Bench:
    """A registry of test actions, the events they cause, and the handles a test steers them with."""

    def __init__(self) -> None:
        self.registry = ActionRegistry({})
        self.events: list[Event] = []
        self.lock = threading.Lock()
        self.flags: dict[str, threading.Event] = defaultdict(threading.Event)
        self.barriers: dict[str, threading.Barrier] = {}
        self.attempt_times: dict[str, list[float]] = defaultdict(list)
        self.rolled_back: list[str] = []
        self.rollback_sites: list[str | None] = []
        self.active = 0
        self.peak = 0
        for name, cls in actions_for(self).items():
            self.registry.register(name, cls)

    def observe(self, event: Event) -> None:
        with self.lock:
            self.events.append(event)
        if isinstance(event, StepFinished):  # lets an action wait until another step has ended
            self.flags[f"finished:{event.step_id}"].set()

    def run(self, plan: RunPlan, stop: threading.Event | None = None, **engine_options: Any) -> RunOutcome:
        engine_options.setdefault("cancel_grace", GRACE_S)
        outcome = Engine(self.registry, [self.observe], **engine_options).run(plan, stop=stop)
        check_invariants(self.events, plan)
        assert all(state.finished for state in outcome.steps.values())
        return outcome

    def of(self, kind: type[Any], step_id: str | None = None, phase: str | None = None) -> list[Any]:
        return [
            e
            for e in self.events
            if isinstance(e, kind)
            and (step_id is None or getattr(e, "step_id", None) == step_id)
            and (phase is None or getattr(e, "phase", None) == phase)
        ]

    def index(self, kind: type[Any], step_id: str, phase: str = "forward") -> int:
        return next(
            i for i, e in enumerate(self.events) if isinstance(e, kind) and e.step_id == step_id and e.phase == phase
        )


class EchoParams(Params):
    value: Any = None
    output: dict[str, Any] = Field(default_factory=dict)
    marked_at: datetime | None = None


class GateParams(Params):
    barrier: str | None = None  # wait at this barrier: proves steps overlap
    hold: str | None = None  # wait for this flag: keeps the step running until the test lets go
    started: str | None = None  # flag to set on start


class FlakyParams(Params):
    succeed_on: int = 3


class BlockParams(Params):
    started: str = "started"


class BoomParams(Params):
    message: str = "boom"


class UndoParams(Params):
    what: str
    fail: bool = False


def actions_for(bench: Bench) -> dict[str, type[Action[Any]]]:
    class Echo(Action[EchoParams]):
        name = "echo"
        Params = EchoParams

        def run(self, params: EchoParams, ctx: ActionContext) -> ActionResult:
            output = {"value": params.value, **params.output, "site": ctx.site}
            return ActionResult(output=output, marked_at=params.marked_at)

    class Gate(Action[GateParams]):
        name = "gate"
        Params = GateParams

        def run(self, params: GateParams, ctx: ActionContext) -> ActionResult:
            with bench.lock:
                bench.active += 1
                bench.peak = max(bench.peak, bench.active)
            try:
                if params.started:
                    bench.flags[params.started].set()
                if params.barrier:
                    bench.barriers[params.barrier].wait(timeout=WAIT_S)
                if params.hold and not bench.flags[params.hold].wait(WAIT_S):
                    raise ActionError(f"flag {params.hold} was never set")
            finally:
                with bench.lock:
                    bench.active -= 1
            return ActionResult(output={"step": ctx.step_id})

    class Flaky(Action[FlakyParams]):
        name = "flaky"
        Params = FlakyParams

        def run(self, params: FlakyParams, ctx: ActionContext) -> ActionResult:
            bench.attempt_times[ctx.step_id].append(time.monotonic())
            if ctx.attempt < params.succeed_on:
                raise ActionError(f"attempt {ctx.attempt} failed")
            return ActionResult(output={"attempt": ctx.attempt})

    class Block(Action[BlockParams]):
        """Runs until cancelled, as a well-behaved long action does."""

        name = "block"
        Params = BlockParams

        def run(self, params: BlockParams, ctx: ActionContext) -> ActionResult:
            bench.flags[params.started].set()
            if not ctx.cancelled.wait(WAIT_S):
                raise ActionError("was never cancelled")
            bench.flags[f"{ctx.step_id}-saw-cancel"].set()
            raise ActionCancelled("stopped as asked")

    class Stubborn(Action[BlockParams]):
        """Ignores cancellation; ends only when the test sets `release`, then tries to report."""

        name = "stubborn"
        Params = BlockParams

        def run(self, params: BlockParams, ctx: ActionContext) -> ActionResult:
            bench.flags[params.started].set()
            bench.flags["release"].wait(WAIT_S)
            ctx.report("late news", detail="from an abandoned action")
            bench.flags["stubborn-exited"].set()
            return ActionResult(output={"late": True})

    class Boom(Action[BoomParams]):
        name = "boom"
        Params = BoomParams

        def run(self, params: BoomParams, ctx: ActionContext) -> ActionResult:
            raise ActionError(params.message)

    class Undo(Action[UndoParams]):
        name = "undo"
        Params = UndoParams

        def run(self, params: UndoParams, ctx: ActionContext) -> ActionResult:
            ctx.check_cancelled()  # as real actions do before changing anything
            with bench.lock:
                bench.rolled_back.append(params.what)
                bench.rollback_sites.append(ctx.site)
            if params.fail:
                raise ActionError(f"could not undo {params.what}")
            return ActionResult(output={"undone": params.what})

    return {cls.name: cls for cls in (Echo, Gate, Flaky, Block, Stubborn, Boom, Undo)}
