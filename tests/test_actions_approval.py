"""The approval gate on its own: decisions read from a decision source, two-person rule, timeouts,
pre-approval, cancellation. The database-backed source is tested in test_evidence_safety.py."""

from __future__ import annotations

import threading
import time
from datetime import UTC, datetime
from typing import Any

import pytest
from actionctx import Harness

from dr_orchestrator.actions.approval import ApprovalGate, ApprovalParams
from dr_orchestrator.actions.base import ActionCancelled, ActionError
from dr_orchestrator.loading import load_inventory
from dr_orchestrator.model.approval import ApprovalDecision, Decision, DecisionSource
from dr_orchestrator.model.events import ApprovalDecided, ApprovalRequested

INVENTORY, _ = load_inventory("inventory.yml", """\
all:
  vars:
    dr:
      name: test
      sites: {primary: {}, backup: {}}
      services: {trading: {rto: 60s, rpo: 0s, sites: [primary, backup]}}
""")
WAIT_S = 10.0


class Decisions:
    """A decision source a test fills in while the gate waits."""

    def __init__(self) -> None:
        self.decisions: list[ApprovalDecision] = []
        self.asked = threading.Event()
        self.excluded: list[str | None] = []

    def add(self, decision: Decision, actor: str, reason: str = "") -> None:
        self.decisions.append(ApprovalDecision(decision, actor, reason, datetime.now(UTC)))

    def decision(self, run_id: str, step_id: str, exclude_actor: str | None = None) -> ApprovalDecision | None:
        self.excluded.append(exclude_actor)
        self.asked.set()
        return next((d for d in self.decisions if d.actor != exclude_actor), None)


def gate(harness: Harness, source: Decisions | None, step_timeout: float = WAIT_S, **params: Any) -> Any:
    ctx = harness.ctx(timeout=step_timeout, step_id="go-ahead")
    ctx.approvals = source
    return ApprovalGate().run(ApprovalParams.model_validate(params), ctx)


def decided(harness: Harness) -> list[ApprovalDecided]:
    return [e for e in harness.events if isinstance(e, ApprovalDecided)]


def in_thread(target: Any) -> tuple[threading.Thread, dict[str, Any]]:
    box: dict[str, Any] = {}

    def call() -> None:
        try:
            box["result"] = target()
        except BaseException as exc:  # noqa: BLE001 - handed to the test
            box["error"] = exc

    thread = threading.Thread(target=call, daemon=True)
    thread.start()
    return thread, box


def test_waits_for_an_engineer_and_passes_on_approval() -> None:
    harness = Harness(INVENTORY, {"started_by": "alice"})
    source = Decisions()
    thread, box = in_thread(lambda: gate(harness, source, message="fail trading over?"))
    assert source.asked.wait(WAIT_S)
    assert thread.is_alive()  # nobody decided yet: the gate waits
    requested = [e for e in harness.events if isinstance(e, ApprovalRequested)]
    assert [(r.message, r.started_by, r.two_person, r.on_timeout) for r in requested] == [
        ("fail trading over?", "alice", False, "reject")]
    source.add(Decision.APPROVED, "bob", "primary confirmed dead")
    thread.join(WAIT_S)
    assert box["result"].output["decision"] == "approved"
    assert box["result"].output["actor"] == "bob"
    assert [(d.decision, d.actor, d.source) for d in decided(harness)] == [
        (Decision.APPROVED, "bob", DecisionSource.ENGINEER)]


def test_rejection_fails_the_step_with_who_and_why() -> None:
    harness = Harness(INVENTORY, {"started_by": "alice"})
    source = Decisions()
    source.add(Decision.REJECTED, "bob", "the primary is back")
    with pytest.raises(ActionError, match="rejected by bob: the primary is back"):
        gate(harness, source)


def test_two_person_rule_ignores_the_starters_own_decision() -> None:
    harness = Harness(INVENTORY, {"started_by": "alice", "approvals": {"two_person": True}})
    source = Decisions()
    source.add(Decision.APPROVED, "alice", "me myself")
    thread, box = in_thread(lambda: gate(harness, source))
    assert source.asked.wait(WAIT_S)
    assert thread.is_alive()
    source.add(Decision.APPROVED, "carol")
    thread.join(WAIT_S)
    assert box["result"].output["actor"] == "carol"
    assert set(source.excluded) == {"alice"}
    # A step may switch the rule off for itself.
    assert gate(Harness(INVENTORY, {"started_by": "alice", "approvals": {"two_person": True}}),
                source, two_person=False).output["actor"] == "alice"


def test_timeout_rejects_by_default_and_approves_when_told() -> None:
    harness = Harness(INVENTORY, {"started_by": "alice"})
    started = time.monotonic()
    with pytest.raises(ActionError, match=r"rejected by dr \(timeout\): no decision within 0.3s"):
        gate(harness, Decisions(), step_timeout=5, timeout=0.3)
    assert 0.3 <= time.monotonic() - started < 3
    assert [(d.decision, d.source) for d in decided(harness)] == [(Decision.REJECTED, DecisionSource.TIMEOUT)]

    harness = Harness(INVENTORY, {"started_by": "alice", "approvals": {"on_timeout": "approve"}})
    result = gate(harness, Decisions(), step_timeout=5, timeout=0.2)
    assert result.output["decision"] == "approved"
    assert result.output["source"] == "timeout"


def test_without_its_own_timeout_the_gate_decides_before_the_step_times_out() -> None:
    harness = Harness(INVENTORY, {"started_by": "alice"})
    started = time.monotonic()
    with pytest.raises(ActionError, match="on_timeout is reject"):
        gate(harness, Decisions(), step_timeout=1.0)
    assert time.monotonic() - started < 1.0


def test_a_pre_approved_run_passes_at_once_and_says_by_whom() -> None:
    harness = Harness(INVENTORY, {"started_by": "scheduler", "pre_approved_by": "drill quarterly-trading"})
    result = gate(harness, None)
    assert result.output["decision"] == "approved"
    assert result.output["reason"] == "pre-approved by drill quarterly-trading"
    assert not [e for e in harness.events if isinstance(e, ApprovalRequested)]
    assert [(d.actor, d.source) for d in decided(harness)] == [("drill quarterly-trading", DecisionSource.PRE_APPROVED)]


def test_without_a_decision_source_the_gate_fails_instead_of_waiting_for_nobody() -> None:
    with pytest.raises(ActionError, match="no decision source"):
        gate(Harness(INVENTORY, {"started_by": "alice"}), None)


def test_stopping_the_run_ends_the_wait() -> None:
    harness = Harness(INVENTORY, {"started_by": "alice"})
    source = Decisions()
    thread, box = in_thread(lambda: gate(harness, source))
    assert source.asked.wait(WAIT_S)
    harness.cancelled.set()
    thread.join(WAIT_S)
    assert isinstance(box["error"], ActionCancelled)
