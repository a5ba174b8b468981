"""The engine going on with an interrupted run: what ended is not run again, its outputs still feed
templates, the engineer's decisions are recorded, rollbacks already done are not done twice."""

from __future__ import annotations

from datetime import UTC, datetime

from support.engine import Bench
from support.plans import make_plan

from dr_orchestrator.engine import Engine
from dr_orchestrator.model.events import RunResumed, RunStarted, StepFinished, StepStarted
from dr_orchestrator.model.resume import FinishedStep, ResumePoint
from dr_orchestrator.model.run import RunState, StepState

STARTED = datetime(2026, 11, 28, 3, 0, tzinfo=UTC)

RUNBOOK = """
    name: resumable
    approvals: {two_person: true}
    steps:
      - id: detect
        action: echo
        with: {output: {primary: p1}}
      - id: fence
        action: echo
        with: {value: "fenced {{ steps.detect.output.primary }}"}
        rollback: {action: undo, with: {what: fence}}
      - id: promote
        action: echo
        with: {value: promoted}
        rollback: {action: undo, with: {what: promote}}
      - id: verify
        action: echo
        with: {value: "{{ steps.promote.output.value }} after {{ steps.fence.output.value }}"}
"""


def started_steps(bench: Bench) -> list[str]:
    return [e.step_id for e in bench.of(StepStarted, phase="forward")]


def test_resume_runs_only_what_had_not_ended_with_the_recorded_outputs(bench: Bench) -> None:
    plan = make_plan(RUNBOOK)
    point = ResumePoint(
        started_at=STARTED, actor="bob", reason="host crashed",
        finished={"detect": FinishedStep(StepState.SUCCEEDED, {"primary": "p1"}),
                  "fence": FinishedStep(StepState.SUCCEEDED, {"value": "fenced p1"})},
        retried=("promote",),
    )
    outcome = Engine(bench.registry, [bench.observe], approvals=None).run(plan, "run-1", resume=point)
    assert outcome.state is RunState.SUCCEEDED
    assert started_steps(bench) == ["promote", "verify"]
    assert not bench.of(RunStarted)
    resumed = bench.of(RunResumed)
    assert [(r.run_id, r.actor, r.retried) for r in resumed] == [("run-1", "bob", ("promote",))]
    verify = bench.of(StepFinished, "verify")[0]
    assert verify.output["value"] == "promoted after fenced p1"  # a recorded output fed the template
    assert [e.step_id for e in bench.of(StepFinished)] == ["promote", "verify"]  # ended steps are not re-announced


def test_a_step_the_engineer_marked_done_is_recorded_done_and_not_run(bench: Bench) -> None:
    plan = make_plan("""
        name: marked
        approvals: {two_person: true}
        steps:
          - {id: promote, action: boom, with: {message: running it again would fail}}
          - {id: verify, action: echo, with: {value: "promote {{ steps.promote.state }}"}}
    """)
    point = ResumePoint(started_at=STARTED, actor="bob",
                        marked_done={"promote": ("forward", "checked: the standby is primary")})
    outcome = Engine(bench.registry, [bench.observe]).run(plan, "run-1", resume=point)
    assert outcome.state is RunState.SUCCEEDED, outcome.error
    assert started_steps(bench) == ["verify"]
    done = bench.of(StepFinished, "promote")[0]
    assert done.state is StepState.SUCCEEDED
    assert done.output == {"marked_done_by": "bob", "reason": "checked: the standby is primary"}
    assert bench.of(StepFinished, "verify")[0].output["value"] == "promote succeeded"
    assert plan.runbook.approvals.two_person  # the policy is typed, read from YAML


def test_a_failure_recorded_before_the_crash_still_rolls_back_only_what_was_not_rolled_back(bench: Bench) -> None:
    plan = make_plan(RUNBOOK.replace(
        'with: {value: "{{ steps.promote.output.value }} after {{ steps.fence.output.value }}"}',
        'with: {value: x}\n        on_failure: rollback'))
    point = ResumePoint(
        started_at=STARTED, actor="bob",
        finished={"detect": FinishedStep(StepState.SUCCEEDED, {"primary": "p1"}),
                  "fence": FinishedStep(StepState.SUCCEEDED, {"value": "fenced p1"}),
                  "promote": FinishedStep(StepState.SUCCEEDED, {"value": "promoted"}),
                  "verify": FinishedStep(StepState.FAILED, {}, "the service did not answer")},
        rolled_back=frozenset({"promote"}),  # its rollback ended before the crash
    )
    outcome = Engine(bench.registry, [bench.observe]).run(plan, "run-1", resume=point)
    assert outcome.state is RunState.FAILED
    assert started_steps(bench) == []
    assert bench.rolled_back == ["fence"]


def test_a_step_skipped_by_its_condition_still_does_not_block_what_follows(bench: Bench) -> None:
    plan = make_plan("""
        name: conditional
        steps:
          - {id: maybe, action: echo, when: "false"}
          - {id: after, action: echo, needs: [maybe]}
    """)
    point = ResumePoint(started_at=STARTED, actor="bob",
                        finished={"maybe": FinishedStep(StepState.SKIPPED, {}, "when 'false' was false")})
    outcome = Engine(bench.registry, [bench.observe]).run(plan, "run-1", resume=point)
    assert outcome.steps["after"] is StepState.SUCCEEDED


def test_a_resumable_action_left_in_flight_is_told_so_and_only_it() -> None:
    """A promotion is not idempotent, but resumable: it may run again on resuming (no engineer needed),
    because it is told it was in flight and checks first whether it took effect. Its first attempt is
    still made durable before it starts, as any non-idempotent one's."""
    from dr_orchestrator.actions.base import Action, ActionContext, ActionRegistry, ActionResult
    from dr_orchestrator.actions.base import Params as NoParams
    from dr_orchestrator.engine.executor import may_repeat, may_resume
    from dr_orchestrator.model.events import AttemptStarted
    from dr_orchestrator.model.run import Phase

    class Told(Action[NoParams]):
        name = "told"
        Params = NoParams
        resumable = True

        def run(self, params: NoParams, ctx: ActionContext) -> ActionResult:
            return ActionResult(output={"resumed": ctx.resumed})

    registry = ActionRegistry({})
    registry.register("told", Told)
    plan = make_plan("""
        name: promotion
        steps:
          - {id: promote, action: told}
          - {id: verify, action: told, needs: [promote]}
          - {id: by-hand, action: told, idempotent: false}
    """)
    promote, _verify, by_hand = plan.runbook.steps
    assert not may_repeat(promote, Phase.FORWARD, registry) and may_resume(promote, Phase.FORWARD, registry)
    assert not may_resume(by_hand, Phase.FORWARD, registry)  # the runbook's word wins
    assert not may_resume(promote, Phase.ROLLBACK, registry)
    events: list[object] = []
    point = ResumePoint(started_at=STARTED, actor="node-b", retried=("promote",),
                        finished={"by-hand": FinishedStep(StepState.SUCCEEDED, {})})
    outcome = Engine(registry, [events.append], approvals=None).run(plan, "run-1", resume=point)
    assert outcome.state is RunState.SUCCEEDED, outcome.error
    told = {e.step_id: e.output["resumed"] for e in events if isinstance(e, StepFinished)}
    assert told == {"promote": True, "verify": False}
    assert [e.repeatable for e in events if isinstance(e, AttemptStarted) and e.step_id == "promote"] == [False]
