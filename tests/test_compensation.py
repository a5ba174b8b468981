"""No harm: a failed failover restores the serving state it found (compensation), never past a step
that bars the way back (a promotion), and every run checks every service before and after it
(blast radius): a service it left worse is an impact and a finding."""

from __future__ import annotations

import http.server
import textwrap
import threading
from collections.abc import Iterator
from typing import Any

import pytest
from sqlalchemy import select
from sqlalchemy.orm import Session, sessionmaker
from support.plans import make_plan

from dr_orchestrator.actions import default_registry
from dr_orchestrator.actions.base import Action, ActionContext, ActionError, ActionRegistry, ActionResult, Params
from dr_orchestrator.engine import Engine
from dr_orchestrator.evidence.models import ActionEventRecord, Finding
from dr_orchestrator.evidence.reports import after_action_html
from dr_orchestrator.evidence.store import EvidenceStore
from dr_orchestrator.model.events import ActionEvent, Event, StepFinished
from dr_orchestrator.model.run import RunPlan, RunState, StepState
from dr_orchestrator.model.runbook import Effect


class Health:
    """A service's health endpoint whose answer the test sets (200 serving, 503 not)."""

    def __init__(self) -> None:
        self.status = 200
        health = self

        class Handler(http.server.BaseHTTPRequestHandler):
            def do_GET(self) -> None:  # noqa: N802 - the http.server API
                self.send_response(health.status)
                self.send_header("Content-Length", "0")
                self.end_headers()

            def log_message(self, *args: Any) -> None:
                pass

        self.server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}/health"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()


@pytest.fixture
def health() -> Iterator[tuple[Health, Health]]:
    """Health endpoints of trading and quotation."""
    trading, quotation = Health(), Health()
    yield trading, quotation
    trading.close()
    quotation.close()


def inventory_text(trading_health: str = "", quotation_health: str = "") -> str:
    def health(url: str) -> str:
        return f", health: '{url}'" if url else ""

    return textwrap.dedent(f"""\
        all:
          vars:
            dr:
              name: test
              sites: {{primary: {{}}, backup: {{}}}}
              services:
                trading: {{rto: 60s, rpo: 0s, tier: critical, sites: [primary, backup]{health(trading_health)}}}
                quotation: {{rto: 60s, rpo: 60s, tier: standard, sites: [primary, backup]{health(quotation_health)}}}
          children:
            primary: {{hosts: {{p1: {{ansible_host: 127.0.0.1}}}}}}
            backup: {{hosts: {{b1: {{ansible_host: 127.0.0.1}}}}}}
        """)


class ChangeParams(Params):
    what: str
    fail: bool = False
    set_status: int | None = None  # makes the test's trading health answer this


class World:
    """What the test actions did, in order, and the health endpoint they may break."""

    def __init__(self, trading: Health | None = None) -> None:
        self.done: list[str] = []
        self.trading = trading


def registry_for(world: World) -> Any:
    class Change(Action[ChangeParams]):
        name = "test.change"
        effect = Effect.REVERSIBLE
        Params = ChangeParams

        def run(self, params: ChangeParams, ctx: ActionContext) -> ActionResult:
            world.done.append(params.what)
            if params.set_status is not None and world.trading is not None:
                world.trading.status = params.set_status
            if params.fail:
                raise ActionError(f"{params.what} failed")
            return ActionResult()

    class Promote(Action[ChangeParams]):
        name = "test.promote"
        effect = Effect.IRREVERSIBLE
        bars_rollback = True
        Params = ChangeParams

        def run(self, params: ChangeParams, ctx: ActionContext) -> ActionResult:
            world.done.append(params.what)
            if params.fail:
                raise ActionError(f"{params.what} failed half-way")
            return ActionResult()

    registry = default_registry()
    registry.register("test.change", Change)
    registry.register("test.promote", Promote)
    return registry


def run(plan: RunPlan, world: World, observers: list[Any] | None = None) -> tuple[Any, list[Event]]:
    events: list[Event] = []
    outcome = Engine(registry_for(world), [events.append, *(observers or [])]).run(plan)
    return outcome, events


FENCE_THEN_FAILED_SWITCH = """
    name: failover-quotation
    kind: failover
    scope: {services: [quotation]}
    steps:
      - {id: check, action: noop}
      - id: fence
        action: test.change
        with: {what: fence}
        rollback: {action: test.change, with: {what: unfence}}
      - id: start-backup
        action: test.change
        with: {what: start-backup}
        rollback: {none: "a started service at the backup site serves nobody until the switch"}
      - id: switch
        action: test.change
        with: {what: switch, fail: true}
        rollback: {action: test.change, with: {what: switch-back}}
"""


def test_a_failed_failover_restores_what_it_changed_newest_first_without_being_asked() -> None:
    world = World()
    outcome, _ = run(make_plan(FENCE_THEN_FAILED_SWITCH, inventory_text()), world)

    assert outcome.state is RunState.FAILED
    # The switch failed (on_failure: abort): the fence is undone anyway; the failed switch itself is not
    # "completed", and start-backup says why it needs no rollback.
    assert world.done == ["fence", "start-backup", "switch", "unfence"]
    assert outcome.steps["fence"] is StepState.ROLLED_BACK


def test_a_drill_stage_that_is_not_guarded_is_not_compensated() -> None:
    world = World()
    outcome, _ = run(make_plan(FENCE_THEN_FAILED_SWITCH, inventory_text(), guarded=False), world)

    assert outcome.state is RunState.FAILED
    assert world.done == ["fence", "start-backup", "switch"]  # a fault stage degrades on purpose


@pytest.mark.parametrize("promote_fails", [False, True], ids=["promoted", "promotion-failed-half-way"])
def test_compensation_never_undoes_the_fencing_once_a_promotion_ran_or_may_have(promote_fails: bool) -> None:
    world = World()
    plan = make_plan(f"""
        name: failover-trading
        kind: failover
        scope: {{services: [trading]}}
        steps:
          - id: fence-old-primary
            action: test.change
            with: {{what: fence}}
            rollback: {{action: test.change, with: {{what: unfence}}}}
          - {{id: promote, action: test.promote, with: {{what: promote, fail: {str(promote_fails).lower()}}}}}
          - id: switch
            action: test.change
            with: {{what: switch}}
            rollback: {{action: test.change, with: {{what: switch-back}}}}
          - {{id: verify, action: fail, with: {{message: the backup does not answer}}}}
    """, inventory_text())
    outcome, events = run(plan, world)

    assert outcome.state is RunState.FAILED
    assert "unfence" not in world.done  # restarting the old primary after a promotion: split brain
    if not promote_fails:
        assert world.done == ["fence", "promote", "switch", "switch-back"]
    stopped = [e for e in events if isinstance(e, ActionEvent) and e.kind == "rollback.stopped"]
    assert [e.step_id for e in stopped] == ["promote"]
    assert stopped[0].data["not_undone"] == ["fence-old-primary"]


def test_a_refused_rollback_is_tried_again_after_the_older_ones() -> None:
    """Newest first, a switch back is refused while the service there is still fenced; once the fence
    is undone, the second try of the switch back succeeds."""
    world = World()
    fenced = {"yes": True}

    class SwitchBack(Action[ChangeParams]):
        name = "test.switch_back"
        Params = ChangeParams

        def run(self, params: ChangeParams, ctx: ActionContext) -> ActionResult:
            world.done.append("switch-back" if not fenced["yes"] else "switch-back refused")
            if fenced["yes"]:
                raise ActionError("not switching back: the service there does not serve")
            return ActionResult()

    class Unfence(Action[ChangeParams]):
        name = "test.unfence"
        Params = ChangeParams

        def run(self, params: ChangeParams, ctx: ActionContext) -> ActionResult:
            world.done.append("unfence")
            fenced["yes"] = False
            return ActionResult()

    registry = registry_for(world)
    registry.register("test.switch_back", SwitchBack)
    registry.register("test.unfence", Unfence)
    plan = make_plan("""
        name: failover-quotation
        kind: failover
        steps:
          - id: fence
            action: test.change
            with: {what: fence}
            rollback: {action: test.unfence, with: {what: unfence}}
          - id: switch
            action: test.change
            with: {what: switch}
            rollback: {action: test.switch_back, with: {what: switch-back}}
          - {id: verify, action: fail, with: {message: no answer}}
    """, inventory_text())
    events: list[Event] = []
    outcome = Engine(registry, [events.append]).run(plan)

    assert world.done == ["fence", "switch", "switch-back refused", "unfence", "switch-back"]
    assert outcome.steps["switch"] is StepState.ROLLED_BACK
    rollbacks = [e.state for e in events if isinstance(e, StepFinished) and e.step_id == "switch"
                 and e.phase == "rollback"]
    assert rollbacks == [StepState.ROLLBACK_FAILED, StepState.ROLLED_BACK]  # both tries are on record


@pytest.mark.slow
def test_a_service_outside_the_scope_made_worse_is_an_impact_and_a_finding(
    health: tuple[Health, Health], sessions: sessionmaker[Session]
) -> None:
    trading, quotation = health
    world = World(trading)
    plan = make_plan("""
        name: failover-quotation
        kind: failover
        scope: {services: [quotation]}
        steps:
          - {id: check, action: noop}
          - id: fence-shared-database
            action: test.change
            with: {what: read-only, set_status: 503}
            rollback: {none: "the shared database stays read-only; quotation only reads"}
    """, inventory_text(trading.url, quotation.url))
    store = EvidenceStore(sessions)
    outcome, events = run(plan, world, [store])
    store.flush()

    assert outcome.state is RunState.SUCCEEDED  # the run did what it said; what it broke is on record
    verdict = next(e.data for e in events if isinstance(e, ActionEvent) and e.kind == "blast_radius.verdict")
    assert verdict["left_as_found"] is False
    assert verdict["worse"] == ["trading"]
    assert "trading served before the run and does not now" in verdict["text"]
    with sessions() as session:
        findings = session.scalars(select(Finding).where(Finding.run_id == outcome.run_id)).all()
        kinds = set(session.scalars(select(ActionEventRecord.kind).where(ActionEventRecord.run_id == outcome.run_id)))
        report = after_action_html(session, outcome.run_id)
    assert [(f.severity, f.owner) for f in findings] == [("critical", plan.started_by)]  # trading's tier: critical
    assert "left degraded: trading served before the run and does not now" in report
    assert "outside the run&#39;s scope" in report or "outside the run's scope" in report
    assert "trading" in findings[0].text
    assert {"blast_radius.before", "blast_radius.after", "blast_radius.impact", "blast_radius.verdict"} <= kinds


@pytest.mark.slow
def test_a_run_that_changes_nothing_for_the_worse_says_clients_were_left_as_found(
    health: tuple[Health, Health]
) -> None:
    trading, quotation = health
    quotation.status = 503  # quotation is down before the run: the run is not to blame for it
    plan = make_plan("""
        name: failover-quotation
        kind: failover
        scope: {services: [quotation]}
        steps:
          - {id: check, action: noop}
          - {id: switch, action: test.change, with: {what: switch}, rollback: {action: noop}}
    """, inventory_text(trading.url, quotation.url))
    outcome, events = run(plan, World(trading))

    assert outcome.state is RunState.SUCCEEDED
    verdict = next(e.data for e in events if isinstance(e, ActionEvent) and e.kind == "blast_radius.verdict")
    assert verdict["left_as_found"] is True
    assert verdict["not_serving"] == ["quotation"]
    assert verdict["text"].startswith("clients left as found")
    assert not [e for e in events if isinstance(e, ActionEvent) and e.kind == "blast_radius.impact"]


def test_the_first_change_is_recorded_once_and_a_run_stopped_by_its_checks_has_none() -> None:
    changed, events = run(make_plan(FENCE_THEN_FAILED_SWITCH, inventory_text()), World())
    firsts = [e for e in events if isinstance(e, ActionEvent) and e.kind == "run.first_change"]
    assert [(e.step_id, e.data["effect"]) for e in firsts] == [("fence", "reversible")]

    failing = FENCE_THEN_FAILED_SWITCH.replace(
        "      - {id: check, action: noop}", "      - {id: check, action: fail, with: {message: standby gone}}")
    stopped, events = run(make_plan(failing, inventory_text()), World())
    assert stopped.state is RunState.FAILED
    assert not [e for e in events if isinstance(e, ActionEvent) and e.kind == "run.first_change"]


def test_an_engine_that_cannot_probe_runs_without_a_blast_radius_reading(health: tuple[Health, Health]) -> None:
    """A registry without http.check (an embedding of the engine with actions of its own) still runs."""
    trading, quotation = health
    registry = ActionRegistry({})
    registry.register("noop", registry_for(World()).get("noop"))
    plan = make_plan("""
        name: failover-quotation
        kind: failover
        steps:
          - {id: check, action: noop}
    """, inventory_text(trading.url, quotation.url))
    events: list[Event] = []
    outcome = Engine(registry, [events.append]).run(plan)

    assert outcome.state is RunState.SUCCEEDED
    assert not [e for e in events if isinstance(e, ActionEvent) and e.kind.startswith("blast_radius")]
