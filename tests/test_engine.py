"""The engine: DAG order, parallelism, retries, timeouts, failure policies, rollback, cancellation, events.

Steps run small in-test actions that coordinate with the test through events and barriers, so
every assertion about timing waits on a condition with a deadline instead of sleeping.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from support.engine import GRACE_S, WAIT_S, Bench, check_invariants
from support.plans import make_plan

from dr_orchestrator import templating
from dr_orchestrator.engine import Engine, RunOutcome, template_context
from dr_orchestrator.model.events import (
    ActionEvent,
    AttemptFinished,
    AttemptStarted,
    Event,
    MarkerReached,
    RunFinished,
    RunStarted,
    StepFinished,
    StepStarted,
)
from dr_orchestrator.model.run import RunState, StepState
from dr_orchestrator.model.runbook import Retries

# ---------------------------------------------------------------- order and parallelism


def test_steps_without_needs_run_one_after_another(bench: Bench) -> None:
    plan = make_plan("""
        name: sequential
        steps:
          - {id: a, action: echo}
          - {id: b, action: echo}
          - {id: c, action: echo}
    """)
    outcome = bench.run(plan)
    assert outcome.state is RunState.SUCCEEDED
    assert outcome.steps == {"a": StepState.SUCCEEDED, "b": StepState.SUCCEEDED, "c": StepState.SUCCEEDED}
    assert bench.index(StepFinished, "a") < bench.index(StepStarted, "b")
    assert bench.index(StepFinished, "b") < bench.index(StepStarted, "c")


def test_parallel_branches_overlap_and_join(bench: Bench) -> None:
    bench.barriers["both"] = threading.Barrier(2)
    plan = make_plan("""
        name: branches
        steps:
          - {id: start, action: echo}
          - {id: left, action: gate, with: {barrier: both}, needs: [start]}
          - {id: right, action: gate, with: {barrier: both}, needs: [start]}
          - {id: join, action: echo, needs: [left, right]}
    """)
    outcome = bench.run(plan)
    # Each branch waits at a two-party barrier: it only passes when the other runs at the same time.
    assert outcome.state is RunState.SUCCEEDED, outcome
    assert bench.index(StepFinished, "left") < bench.index(StepStarted, "join")
    assert bench.index(StepFinished, "right") < bench.index(StepStarted, "join")


def test_empty_needs_starts_at_once_beside_earlier_steps(bench: Bench) -> None:
    bench.barriers["pair"] = threading.Barrier(2)
    plan = make_plan("""
        name: at-once
        steps:
          - {id: first, action: gate, with: {barrier: pair}}
          - {id: second, action: gate, with: {barrier: pair}, needs: []}
    """)
    assert bench.run(plan).state is RunState.SUCCEEDED


def test_max_parallel_bounds_running_steps(bench: Bench) -> None:
    plan = make_plan("""
        name: bounded
        steps:
          - {id: s1, action: gate, with: {hold: go}, needs: []}
          - {id: s2, action: gate, with: {hold: go}, needs: []}
          - {id: s3, action: gate, with: {hold: go}, needs: []}
          - {id: s4, action: gate, with: {hold: go}, needs: []}
    """)
    result: list[RunOutcome] = []
    runner = threading.Thread(target=lambda: result.append(bench.run(plan, max_parallel=2)))
    runner.start()
    try:
        deadline = time.monotonic() + WAIT_S
        while bench.active < 2 and time.monotonic() < deadline:
            bench.flags["never"].wait(0.01)
        assert bench.active == 2
        # Two run; the others wait for a worker and must not start meanwhile.
        assert not bench.flags["never"].wait(0.3)
        assert bench.active == 2
        assert len(bench.of(StepStarted)) == 2
    finally:
        bench.flags["go"].set()
        runner.join(WAIT_S)
    assert result and result[0].state is RunState.SUCCEEDED
    assert bench.peak == 2


# ---------------------------------------------------------------- retries and timeouts


def test_retried_step_succeeds_on_third_attempt_after_backoff(bench: Bench) -> None:
    plan = make_plan("""
        name: retry
        steps:
          - id: flaky
            action: flaky
            with: {succeed_on: 3}
            retries: {count: 4, delay: 50ms, backoff: 3}
    """)
    outcome = bench.run(plan)
    assert outcome.steps["flaky"] is StepState.SUCCEEDED
    attempts = bench.of(AttemptFinished, "flaky")
    assert [(a.attempt, a.state) for a in attempts] == [
        (1, StepState.FAILED),
        (2, StepState.FAILED),
        (3, StepState.SUCCEEDED),
    ]
    assert attempts[0].error == "attempt 1 failed"
    assert bench.of(StepFinished, "flaky")[0].output == {"attempt": 3}
    times = bench.attempt_times["flaky"]
    assert times[1] - times[0] >= 0.05  # delay
    assert times[2] - times[1] >= 0.15  # delay * backoff


def test_retry_delay_is_capped_by_max_delay() -> None:
    retries = Retries(count=5, delay=1, backoff=2, max_delay=5)
    assert [retries.delay_before(n) for n in range(2, 7)] == [1, 2, 4, 5, 5]


def test_retries_exhausted_fail_the_step_with_the_last_error(bench: Bench) -> None:
    plan = make_plan("""
        name: exhausted
        steps:
          - {id: flaky, action: flaky, with: {succeed_on: 9}, retries: {count: 2, delay: 0}}
    """)
    outcome = bench.run(plan)
    assert outcome.state is RunState.FAILED
    assert outcome.steps["flaky"] is StepState.FAILED
    assert len(bench.of(AttemptStarted, "flaky")) == 3
    assert bench.of(StepFinished, "flaky")[0].error == "attempt 3 failed"


def test_timeout_bounds_all_attempts_together(bench: Bench) -> None:
    plan = make_plan("""
        name: bounded-retries
        steps:
          - {id: slow, action: block, timeout: 300ms, retries: {count: 5, delay: 0}}
    """)
    started = time.monotonic()
    outcome = bench.run(plan)
    assert outcome.steps["slow"] is StepState.TIMED_OUT
    assert len(bench.of(AttemptStarted, "slow")) == 1  # no time left for another attempt
    assert time.monotonic() - started < 300e-3 + GRACE_S + 1.0


def test_no_retry_when_its_delay_would_pass_the_timeout(bench: Bench) -> None:
    plan = make_plan("""
        name: no-time-left
        steps:
          - {id: flaky, action: flaky, with: {succeed_on: 9}, timeout: 1s, retries: {count: 3, delay: 5s}}
    """)
    started = time.monotonic()
    outcome = bench.run(plan)
    assert outcome.steps["flaky"] is StepState.FAILED
    assert len(bench.of(AttemptStarted, "flaky")) == 1
    assert "no time left" in (bench.of(StepFinished, "flaky")[0].error or "")
    assert time.monotonic() - started < 1.0  # it did not sleep towards a retry it could not make


def test_timed_out_step_with_continue_skips_dependents_and_run_succeeds(bench: Bench) -> None:
    plan = make_plan("""
        name: timeout-continue
        steps:
          - {id: slow, action: block, timeout: 200ms, on_failure: continue}
          - {id: after-slow, action: echo}
          - {id: after-that, action: echo}
          - {id: independent, action: echo, needs: []}
    """)
    outcome = bench.run(plan)
    assert outcome.state is RunState.SUCCEEDED
    assert outcome.steps == {
        "slow": StepState.TIMED_OUT,
        "after-slow": StepState.SKIPPED,
        "after-that": StepState.SKIPPED,
        "independent": StepState.SUCCEEDED,
    }
    assert bench.flags["slow-saw-cancel"].is_set()  # the action was told to stop
    finished = bench.of(StepFinished, "slow")[0]
    assert finished.error == "timed out after 0.2s"
    assert "slow" in (bench.of(StepFinished, "after-slow")[0].error or "")
    assert not bench.of(StepStarted, "after-slow")


def test_generic_wait_action_past_its_timeout_is_timed_out(bench: Bench) -> None:
    bench.registry.register("wait", "dr_orchestrator.actions.wait:Wait")
    plan = make_plan("""
        name: wait-too-long
        steps:
          - {id: pause, action: wait, with: {duration: 30s}, timeout: 200ms}
    """)
    outcome = bench.run(plan)
    assert outcome.steps["pause"] is StepState.TIMED_OUT
    assert outcome.state is RunState.FAILED


def test_action_ignoring_cancellation_is_abandoned_after_the_grace(bench: Bench) -> None:
    plan = make_plan("""
        name: stubborn
        steps:
          - {id: stuck, action: stubborn, timeout: 200ms, on_failure: continue}
          - {id: other, action: echo, needs: []}
    """)
    started = time.monotonic()
    outcome = bench.run(plan)
    assert time.monotonic() - started < 200e-3 + GRACE_S + 1.0
    assert outcome.state is RunState.SUCCEEDED
    assert outcome.steps == {"stuck": StepState.TIMED_OUT, "other": StepState.SUCCEEDED}
    assert "abandoned" in (bench.of(StepFinished, "stuck")[0].error or "")
    # When the abandoned action finally ends, nothing it says reaches the finished run.
    count = len(bench.events)
    bench.flags["release"].set()
    assert bench.flags["stubborn-exited"].wait(WAIT_S)
    assert len(bench.events) == count
    assert not [e for e in bench.of(ActionEvent) if e.kind == "late news"]


# ---------------------------------------------------------------- failure policies


def test_abort_stops_new_steps_lets_in_flight_finish_and_fails_the_run(bench: Bench) -> None:
    plan = make_plan("""
        name: abort
        steps:
          - {id: bad, action: boom, with: {message: disk on fire}}
          - {id: in-flight, action: gate, with: {hold: "finished:bad"}, needs: []}
          - {id: later, action: echo, needs: [in-flight]}
          - {id: after-bad, action: echo, needs: [bad]}
    """)
    outcome = bench.run(plan)
    assert outcome.state is RunState.FAILED
    assert outcome.steps == {
        "bad": StepState.FAILED,
        "in-flight": StepState.SUCCEEDED,
        "later": StepState.CANCELLED,  # could have run: the abort stopped it
        "after-bad": StepState.SKIPPED,  # could never run
    }
    assert bench.of(StepFinished, "bad")[0].error == "disk on fire"
    assert not bench.of(StepStarted, "later")


def test_failing_step_with_rollback_undoes_completed_steps_newest_first(bench: Bench) -> None:
    plan = make_plan("""
        name: rollback
        steps:
          - id: stop-primary
            action: echo
            with: {output: {pid: 41}}
            rollback: {action: undo, with: {what: "start {{ steps['stop-primary'].output.pid }}"}}
          - id: promote
            action: echo
            rollback: {action: undo, with: {what: demote}}
          - id: note
            action: echo
          - id: switch
            action: boom
            on_failure: rollback
          - id: never
            action: echo
    """)
    outcome = bench.run(plan)
    assert outcome.state is RunState.FAILED
    assert bench.rolled_back == ["demote", "start 41"]
    assert outcome.steps == {
        "stop-primary": StepState.ROLLED_BACK,
        "promote": StepState.ROLLED_BACK,
        "note": StepState.SUCCEEDED,  # nothing to undo
        "switch": StepState.FAILED,
        "never": StepState.SKIPPED,  # its need failed
    }
    rollback_finishes = bench.of(StepFinished, phase="rollback")
    assert [(e.step_id, e.state) for e in rollback_finishes] == [
        ("promote", StepState.ROLLED_BACK),
        ("stop-primary", StepState.ROLLED_BACK),
    ]
    assert [e.step_id for e in bench.of(StepStarted, phase="rollback")] == ["promote", "stop-primary"]
    assert bench.index(StepFinished, "switch") < bench.index(StepStarted, "promote", "rollback")


def test_a_failed_rollback_is_recorded_and_the_others_still_run(bench: Bench) -> None:
    plan = make_plan("""
        name: rollback-fails
        steps:
          - {id: one, action: echo, rollback: {action: undo, with: {what: one}}}
          - {id: two, action: echo, rollback: {action: undo, with: {what: two, fail: true}}}
          - {id: three, action: boom, on_failure: rollback}
    """)
    outcome = bench.run(plan)
    assert outcome.state is RunState.FAILED
    assert bench.rolled_back == ["two", "one", "two"]  # a failed rollback is tried once more at the end
    assert outcome.steps["two"] is StepState.ROLLBACK_FAILED
    assert outcome.steps["one"] is StepState.ROLLED_BACK
    assert bench.of(StepFinished, "two", "rollback")[0].error == "could not undo two"


def test_continue_records_the_failure_and_the_run_succeeds(bench: Bench) -> None:
    plan = make_plan("""
        name: continue
        steps:
          - {id: optional, action: boom, on_failure: continue}
          - {id: needs-it, action: echo}
          - {id: free, action: echo, needs: []}
    """)
    outcome = bench.run(plan)
    assert outcome.state is RunState.SUCCEEDED
    assert outcome.steps == {"optional": StepState.FAILED, "needs-it": StepState.SKIPPED, "free": StepState.SUCCEEDED}


# ---------------------------------------------------------------- conditions and templates


def test_false_when_skips_the_step_but_not_its_dependents(bench: Bench) -> None:
    plan = make_plan(
        """
        name: when
        parameters: {drill: true}
        steps:
          - {id: page-oncall, action: echo, when: "not params.drill"}
          - {id: after, action: echo}
          - {id: literal-false, action: echo, when: false, needs: []}
        """
    )
    outcome = bench.run(plan)
    assert outcome.state is RunState.SUCCEEDED
    assert outcome.steps == {
        "page-oncall": StepState.SKIPPED,
        "after": StepState.SUCCEEDED,
        "literal-false": StepState.SKIPPED,
    }
    assert not bench.of(StepStarted, "page-oncall")


def test_templates_render_step_outputs_and_parameters_natively(bench: Bench) -> None:
    plan = make_plan(
        """
        name: templates
        parameters:
          target: {default: backup}
          replicas: {default: 2}
        scope: {services: trading}
        steps:
          - {id: find, action: echo, with: {output: {port: 5433, hosts: [b1, b2]}}}
          - id: use
            action: echo
            with:
              value:
                port: "{{ steps.find.output.port }}"
                hosts: "{{ steps.find.output.hosts }}"
                url: "http://{{ params.target }}:{{ steps.find.output.port }}/"
                replicas: "{{ params.replicas + 1 }}"
                rto: "{{ service.rto }}"
                run_kind: "{{ run.kind }}"
        """,
        parameters={"target": "dr-site"},
    )
    outcome = bench.run(plan)
    assert outcome.state is RunState.SUCCEEDED
    value = bench.of(StepFinished, "use")[0].output["value"]
    assert value == {
        "port": 5433,
        "hosts": ["b1", "b2"],
        "url": "http://dr-site:5433/",
        "replicas": 3,
        "rto": 60.0,
        "run_kind": "failover",
    }
    assert bench.of(StepStarted, "use")[0].rendered["value"]["url"] == "http://dr-site:5433/"


def test_templates_see_exactly_the_names_the_loader_checks_against(bench: Bench) -> None:
    plan = make_plan("""
        name: names
        steps:
          - {id: a, action: echo, with: {value: "{{ run }}"}}
    """)
    bench.run(plan)
    assert set(bench.of(StepFinished, "a")[0].output["value"]) == set(templating.RUN_KEYS)
    assert set(template_context(plan, {}, {})) == set(templating.CONTEXT_NAMES)


def test_step_site_is_rendered_once_and_its_rollback_acts_on_the_same_site(bench: Bench) -> None:
    plan = make_plan(
        """
        name: sites
        parameters: {target: backup}
        steps:
          - id: promote
            action: echo
            site: "{{ params.target }}"
            rollback: {action: undo, with: {what: "demote at {{ site }}"}}
          - {id: fail, action: boom, on_failure: rollback}
        """
    )
    bench.run(plan)
    assert bench.of(StepFinished, "promote")[0].output["site"] == "backup"
    assert bench.rolled_back == ["demote at backup"]
    assert bench.rollback_sites == ["backup"]


def test_bad_condition_fails_the_step(bench: Bench) -> None:
    plan = make_plan("""
        name: bad-when
        steps:
          - {id: a, action: echo, when: "params.missing"}
    """)
    outcome = bench.run(plan)
    assert outcome.steps["a"] is StepState.FAILED
    assert "missing" in (bench.of(StepFinished, "a")[0].error or "")


def test_bad_template_at_run_time_fails_the_step_with_a_clear_error(bench: Bench) -> None:
    plan = make_plan("""
        name: bad-template
        steps:
          - {id: find, action: echo, with: {output: {port: 5433}}}
          - {id: use, action: echo, with: {value: "{{ steps.find.output.prot }}"}}
          - {id: never, action: echo}
    """)
    outcome = bench.run(plan)
    assert outcome.state is RunState.FAILED
    assert outcome.steps["use"] is StepState.FAILED
    assert outcome.steps["never"] is StepState.SKIPPED
    error = bench.of(StepFinished, "use")[0].error or ""
    assert error.startswith("with.value: undefined variable")
    assert "prot" in error
    assert not bench.of(AttemptStarted, "use")  # the action never ran


def test_parameters_that_do_not_fit_the_action_fail_the_step(bench: Bench) -> None:
    plan = make_plan("""
        name: bad-params
        steps:
          - {id: flaky, action: flaky, with: {succeed_on: "{{ 'three' }}"}}
    """)
    outcome = bench.run(plan)
    assert outcome.steps["flaky"] is StepState.FAILED
    assert (bench.of(StepFinished, "flaky")[0].error or "").startswith("bad parameters for flaky: succeed_on:")


# ---------------------------------------------------------------- markers and observers


def test_marker_carries_the_moment_the_action_reports(bench: Bench) -> None:
    plan = make_plan("""
        name: markers
        scope: {services: [trading]}
        steps:
          - id: verify
            action: echo
            with: {marked_at: "2026-11-28T03:00:00.123456+00:00"}
            marks: [service_restored]
          - {id: plain, action: echo, marks: [done]}
    """)
    before = datetime.now(UTC)
    bench.run(plan)
    verify, plain = bench.of(MarkerReached)
    assert (verify.step_id, verify.marker, verify.service) == ("verify", "service_restored", "trading")
    assert verify.at == datetime(2026, 11, 28, 3, 0, 0, 123456, tzinfo=UTC)
    assert plain.marker == "done"
    assert plain.at >= before and plain.at.tzinfo is not None


def test_failed_step_reaches_no_marker(bench: Bench) -> None:
    plan = make_plan("""
        name: no-marker
        steps:
          - {id: verify, action: boom, marks: [service_restored]}
    """)
    bench.run(plan)
    assert not bench.of(MarkerReached)


def test_an_observer_that_raises_does_not_break_the_run(bench: Bench) -> None:
    def broken(event: Event) -> None:
        raise RuntimeError("the display crashed")

    plan = make_plan("""
        name: observers
        steps:
          - {id: a, action: echo}
          - {id: b, action: echo}
    """)
    outcome = Engine(bench.registry, [broken, bench.observe]).run(plan)
    assert outcome.state is RunState.SUCCEEDED
    check_invariants(bench.events, plan)


# ---------------------------------------------------------------- stopping


def test_stop_event_cancels_running_steps_and_aborts_the_run(bench: Bench) -> None:
    plan = make_plan("""
        name: stop
        steps:
          - {id: long, action: block}
          - {id: stuck, action: stubborn, with: {started: stuck-started}, needs: []}
          - {id: later, action: echo, needs: [long]}
    """)
    stop = threading.Event()
    result: list[RunOutcome] = []
    runner = threading.Thread(target=lambda: result.append(bench.run(plan, stop=stop)))
    runner.start()
    assert bench.flags["started"].wait(WAIT_S) and bench.flags["stuck-started"].wait(WAIT_S)
    stop.set()
    runner.join(WAIT_S)
    assert not runner.is_alive()
    outcome = result[0]
    assert outcome.state is RunState.ABORTED
    assert outcome.error == "interrupted by the operator"
    assert outcome.steps == {"long": StepState.CANCELLED, "stuck": StepState.CANCELLED, "later": StepState.CANCELLED}
    assert bench.flags["long-saw-cancel"].is_set()
    assert "abandoned" in (bench.of(StepFinished, "stuck")[0].error or "")
    assert bench.of(RunFinished)[0].state is RunState.ABORTED


def test_stop_during_retry_delay_cancels_the_step(bench: Bench) -> None:
    plan = make_plan("""
        name: stop-retry
        steps:
          - {id: flaky, action: flaky, with: {succeed_on: 9}, retries: {count: 3, delay: 30s}, timeout: 60s}
    """)
    stop = threading.Event()
    result: list[RunOutcome] = []
    runner = threading.Thread(target=lambda: result.append(bench.run(plan, stop=stop)))
    runner.start()
    deadline = time.monotonic() + WAIT_S
    while not bench.of(AttemptFinished, "flaky") and time.monotonic() < deadline:
        bench.flags["never"].wait(0.01)
    stop.set()
    runner.join(WAIT_S)
    assert result and result[0].state is RunState.ABORTED
    assert result[0].steps["flaky"] is StepState.CANCELLED


def test_stop_before_anything_runs_cancels_every_step(bench: Bench) -> None:
    plan = make_plan("""
        name: stopped-early
        steps:
          - {id: a, action: echo}
          - {id: b, action: echo, needs: []}
    """)
    stop = threading.Event()
    stop.set()
    outcome = bench.run(plan, stop=stop)
    assert outcome.state is RunState.ABORTED
    assert outcome.steps == {"a": StepState.CANCELLED, "b": StepState.CANCELLED}
    assert not bench.of(StepStarted)


def test_ctrl_c_while_the_start_is_recorded_still_ends_the_run_as_aborted(bench: Bench) -> None:
    """The evidence store commits the start, then Ctrl-C lands before the engine returns from it:
    the run, already shown as running, must still end (aborted), and no step may start."""
    plan = make_plan("""
        name: interrupted-at-start
        steps:
          - {id: a, action: echo}
    """)

    def interrupt_after_the_start(event: Event) -> None:
        if isinstance(event, RunStarted):
            raise KeyboardInterrupt

    outcome = Engine(bench.registry, [bench.observe, interrupt_after_the_start]).run(plan)
    check_invariants(bench.events, plan)
    assert outcome.state is RunState.ABORTED
    assert outcome.steps == {"a": StepState.CANCELLED}
    assert not bench.of(StepStarted)


def test_stop_with_rollback_step_in_flight_rolls_back_completed_steps(bench: Bench) -> None:
    plan = make_plan("""
        name: stop-rollback
        steps:
          - {id: done, action: echo, rollback: {action: undo, with: {what: done}}}
          - {id: long, action: block, on_failure: rollback}
    """)
    stop = threading.Event()
    result: list[RunOutcome] = []
    runner = threading.Thread(target=lambda: result.append(bench.run(plan, stop=stop)))
    runner.start()
    assert bench.flags["started"].wait(WAIT_S)
    stop.set()
    runner.join(WAIT_S)
    assert result[0].state is RunState.ABORTED
    assert result[0].steps == {"done": StepState.ROLLED_BACK, "long": StepState.CANCELLED}
    assert bench.rolled_back == ["done"]


SIGINT_SCRIPT = """
import json, sys
from dr_orchestrator.actions.base import Action, ActionCancelled, ActionRegistry, ActionResult, Params
from dr_orchestrator.engine import Engine
from support.plans import make_plan

class Hold(Action[Params]):
    name = "hold"
    Params = Params
    def run(self, params, ctx):
        print("READY", ctx.step_id, flush=True)
        ctx.cancelled.wait(30)
        raise ActionCancelled("stopped as asked")

class Note(Action[Params]):
    name = "note"
    Params = Params
    def run(self, params, ctx):
        ctx.check_cancelled()
        print("ROLLBACK", ctx.step_id, flush=True)
        return ActionResult()

registry = ActionRegistry({})
registry.register("hold", Hold)
registry.register("note", Note)
plan = make_plan('''
    name: sigint
    steps:
      - {id: prepared, action: note, rollback: {action: %s}}
      - {id: switch, action: hold, on_failure: rollback}
      - {id: verify, action: note}
''')
events = []
outcome = Engine(registry, [events.append], cancel_grace=0.5).run(plan)
print("OUTCOME", json.dumps({"state": outcome.state, "steps": outcome.steps,
                             "last": type(events[-1]).__name__}), flush=True)
"""


def run_interrupted(rollback_action: str, interrupt_when: tuple[str, ...]) -> tuple[str, dict[str, Any]]:
    """Run the script above, sending SIGINT each time a line starts with the next of ``interrupt_when``."""
    root = Path(__file__).resolve().parent.parent
    process = subprocess.Popen(
        [sys.executable, "-c", SIGINT_SCRIPT % rollback_action],
        cwd=root,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env={**os.environ, "PYTHONPATH": str(root / "tests")},
    )
    try:
        assert process.stdout is not None
        lines: list[str] = []
        waiting_for = list(interrupt_when)
        for line in process.stdout:  # the pipe closes when the process exits
            lines.append(line)
            if waiting_for and line.startswith(waiting_for[0]):
                waiting_for.pop(0)
                process.send_signal(signal.SIGINT)
                if not waiting_for:
                    break
        rest, errors = process.communicate(timeout=WAIT_S)
    finally:
        if process.poll() is None:
            process.kill()
            process.wait()
    assert process.returncode == 0, errors
    output = "".join(lines) + rest
    return output, json.loads(output.split("OUTCOME ", 1)[1])


def test_ctrl_c_aborts_the_run_rolls_back_and_leaves_nothing_running() -> None:
    output, outcome = run_interrupted("note", ("READY switch",))
    assert "ROLLBACK prepared" in output
    assert outcome == {
        "state": "aborted",
        "steps": {"prepared": "rolled_back", "switch": "cancelled", "verify": "cancelled"},
        "last": "RunFinished",
    }


def test_second_ctrl_c_stops_the_rollback_and_the_run_still_ends() -> None:
    output, outcome = run_interrupted("hold", ("READY switch", "READY prepared"))
    assert outcome == {
        "state": "aborted",
        "steps": {"prepared": "rollback_failed", "switch": "cancelled", "verify": "cancelled"},
        "last": "RunFinished",
    }


def test_a_branch_waiting_for_its_start_to_be_durable_does_not_hold_the_others_back(bench: Bench) -> None:
    """The evidence store makes a changing step's start durable before it acts (``submit`` hands the
    engine that wait); meanwhile a parallel branch goes on and is heard of, in order."""
    plan = make_plan("""
        name: durable-starts
        steps:
          - {id: left, action: echo}
          - {id: right, action: echo, needs: []}
    """)
    right_ended = threading.Event()
    waited: list[bool] = []

    class SlowCommits:
        def __call__(self, event: Event) -> None:
            raise AssertionError("an observer with submit() is not called directly")

        def submit(self, event: Event) -> Any:
            if isinstance(event, StepFinished) and event.step_id == "right":
                right_ended.set()
            if isinstance(event, AttemptStarted) and event.step_id == "left":
                return lambda: waited.append(right_ended.wait(10))
            return None

    outcome = Engine(bench.registry, [SlowCommits(), bench.observe]).run(plan)
    check_invariants(bench.events, plan)
    assert outcome.state is RunState.SUCCEEDED, outcome
    assert waited == [True], "the right branch was held back while the left one waited for its commit"
    assert bench.index(StepFinished, "right") < bench.index(StepFinished, "left")


def test_first_checks_run_while_the_start_is_committed_and_nothing_changes_before_it_is(bench: Bench) -> None:
    """A run's start is not waited for before its first checks (a failover's critical path), but a
    change never begins before it is durable: a crash must not leave a change with no run recorded."""
    plan = make_plan("""
        name: start-commit
        steps:
          - {id: check, action: echo, effect: read-only}
          - {id: change, action: echo, needs: [check], idempotent: true}
    """)
    check_ended, start_recorded = threading.Event(), threading.Event()
    waited: list[bool] = []
    change_began_after_start: list[bool] = []

    def until_recorded() -> None:
        waited.append(check_ended.wait(10))
        start_recorded.set()

    class SlowStartCommit:
        def __call__(self, event: Event) -> None:
            raise AssertionError("an observer with submit() is not called directly")

        def submit(self, event: Event) -> Any:
            if isinstance(event, StepFinished) and event.step_id == "check":
                check_ended.set()
            if isinstance(event, AttemptStarted) and event.step_id == "change":
                change_began_after_start.append(start_recorded.is_set())
            return until_recorded if isinstance(event, RunStarted) else None

    outcome = Engine(bench.registry, [SlowStartCommit(), bench.observe]).run(plan)
    check_invariants(bench.events, plan)
    assert outcome.state is RunState.SUCCEEDED, outcome
    assert waited == [True], "the check waited for the run's start to be committed"
    assert change_began_after_start == [True], "the change began before the run's start was committed"


def test_a_check_may_be_repeated_after_a_crash_so_its_start_is_not_waited_for(bench: Bench) -> None:
    """Write-ahead is for attempts that may have changed something: a read-only step is repeatable
    (resume runs it again) unless it says otherwise; a changing one is not unless it says so."""
    plan = make_plan("""
        name: repeatable
        steps:
          - {id: check, action: echo, effect: read-only}
          - {id: strict-check, action: echo, effect: read-only, idempotent: false}
          - {id: change, action: echo}
          - {id: safe-change, action: echo, idempotent: true}
    """)
    bench.run(plan)
    repeatable = {e.step_id: e.repeatable for e in bench.of(AttemptStarted)}
    assert repeatable == {"check": True, "strict-check": False, "change": False, "safe-change": True}


def test_a_refused_fence_stops_the_run_where_it_is_and_leaves_the_rest_to_resume(bench: Bench) -> None:
    """A cluster node that lost its leadership must not touch anything more: the changing step it was
    about to start does not start, nothing is rolled back, the run ends interrupted (resumable)."""
    plan = make_plan("""
        name: fenced
        steps:
          - {id: check, action: echo, effect: read-only}
          - id: fence-old
            action: echo
            needs: [check]
            rollback: {action: echo}
          - {id: promote, action: echo, needs: [fence-old]}
          - {id: switch, action: echo, needs: [promote]}
    """)
    tokens = iter(["7@node-a"])

    def fence() -> str:
        try:
            return next(tokens)
        except StopIteration:
            raise RuntimeError("node-a no longer leads (token 7@node-a); node-b leads now") from None

    outcome = Engine(bench.registry, [bench.observe], fence=fence).run(plan)
    assert outcome.state is RunState.INTERRUPTED, outcome
    assert "node-b leads now" in (outcome.error or "")
    ended = {e.step_id: e.state for e in bench.of(StepFinished)}
    assert ended == {"check": StepState.SUCCEEDED, "fence-old": StepState.SUCCEEDED}  # the rest is left to do
    assert not bench.of(StepStarted, "promote") and not bench.of(StepStarted, phase="rollback")
    recorded = [(e.kind, e.step_id, e.data) for e in bench.of(ActionEvent) if e.kind.startswith("fencing.")]
    assert recorded == [
        ("fencing.checked", "fence-old", {"phase": "forward", "token": "7@node-a"}),
        ("fencing.refused", "promote",
         {"phase": "forward", "error": "node-a no longer leads (token 7@node-a); node-b leads now"}),
    ]
