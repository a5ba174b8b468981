"""The approval gate on its own: decisions read from a decision source, two-person rule, timeouts,
pre-approval, cancellation; and who a person is (``Identity``, ``plans.default_actor``). The
database-backed source is tested in test_evidence_safety.py, `dr approve` in test_cli_safety.py."""

from __future__ import annotations

import os
import pwd
import threading
import time
from datetime import UTC, datetime
from typing import Any

import pytest
from actionctx import Harness

from dr_orchestrator.actions.approval import ApprovalGate, ApprovalParams
from dr_orchestrator.actions.base import ActionCancelled, ActionError
from dr_orchestrator.loading import load_inventory
from dr_orchestrator.model.approval import ApprovalDecision, Decision, DecisionSource, Identity, second_person_refusal
from dr_orchestrator.model.events import ApprovalDecided, ApprovalRequested
from dr_orchestrator.plans import default_actor

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
        # The same rule as the database's source (evidence.approvals.DatabaseApprovals).
        return next((d for d in self.decisions
                     if exclude_actor is None or second_person_refusal(run_id, exclude_actor, d.actor) is None), None)

    def plan_decision(self, plan_sha256: str, run_id: str, step_id: str,
                      exclude_actor: str | None = None) -> ApprovalDecision | None:
        return None  # these runs were not started from a saved plan


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


def test_a_label_does_not_make_the_starter_a_second_person() -> None:
    alice = "alice (os root, sudo alice)"
    harness = Harness(INVENTORY, {"started_by": alice, "approvals": {"two_person": True}})
    source = Decisions()
    source.add(Decision.APPROVED, "bob (os root, sudo alice)", "DR_ACTOR=bob from alice's shell")
    source.add(Decision.APPROVED, "bob (os root)", "root without sudo")
    thread, box = in_thread(lambda: gate(harness, source))
    assert source.asked.wait(WAIT_S)
    assert thread.is_alive()
    source.add(Decision.APPROVED, "alice (os root, sudo bob, ssh 10.0.0.7)", "bob, whatever his label")
    thread.join(WAIT_S)
    assert box["result"].output["actor"] == "alice (os root, sudo bob, ssh 10.0.0.7)"
    assert set(source.excluded) == {alice}


def test_a_pre_approval_does_not_pass_a_two_person_gate() -> None:
    # Whoever started the drill chose its pre-approval: it is not a second person.
    harness = Harness(INVENTORY, {"started_by": "alice (os alice)", "approvals": {"two_person": True},
                                  "pre_approved_by": "drill quarterly-trading"})
    source = Decisions()
    thread, box = in_thread(lambda: gate(harness, source))
    assert source.asked.wait(WAIT_S)
    assert thread.is_alive()
    assert [e.two_person for e in harness.events if isinstance(e, ApprovalRequested)] == [True]
    source.add(Decision.APPROVED, "bob (os bob)")
    thread.join(WAIT_S)
    assert (box["result"].output["actor"], box["result"].output["source"]) == ("bob (os bob)", "engineer")


@pytest.mark.parametrize(("starter", "decider", "refusal"), [
    ("alice (os alice)", "bob (os alice)", "alice started run r1"),  # DR_ACTOR is a label
    ("alice (os root, sudo alice)", "bob (os root, sudo bob)", None),  # root shared, sudo says who
    ("alice (os root, sudo alice)", "alice (os root, sudo alice, ssh 10.0.0.7)", "alice started run r1"),
    ("alice (os root, sudo alice)", "bob (os root)", "root without sudo does not say which person you are"),
    ("alice (os alice)", "bob (os bob, sudo alice)", "alice started run r1"),  # `sudo -u bob` by alice
    ("alice (os bob, sudo alice)", "alice (os alice)", "alice started run r1"),
    ("alice (os alice)", "alice", "alice started run r1"),  # an API token of the same name
    ("erin", "frank", None),  # API tokens
    ("mallory (os bob) (os alice)", "bob (os bob)", None),  # a label cannot claim an account
])
def test_who_is_the_same_person(starter: str, decider: str, refusal: str | None) -> None:
    assert second_person_refusal("r1", starter, decider) == refusal


def test_the_recorded_identity_reads_back() -> None:
    for text in ("bob (os root, sudo bob, ssh 10.0.0.7)", "alice (os alice)", "erin", "dr (timeout)"):
        assert str(Identity.parse(text)) == text
    assert Identity.parse("bob (os root, sudo bob, ssh fe80::1)") == Identity("bob", "root", "bob", "fe80::1")


def test_the_actor_is_the_real_uids_account_whatever_the_environment_says(monkeypatch: pytest.MonkeyPatch) -> None:
    account = pwd.getpwuid(os.getuid()).pw_name
    for name, value in {"DR_ACTOR": "bob", "USER": "bob", "LOGNAME": "bob", "SUDO_USER": "carol",
                        "SSH_CONNECTION": "10.0.0.7 51234 10.0.0.1 22"}.items():
        monkeypatch.setenv(name, value)
    assert default_actor() == f"bob (os {account}, sudo carol, ssh 10.0.0.7)"
    for name in ("DR_ACTOR", "SUDO_USER", "SSH_CONNECTION"):
        monkeypatch.delenv(name)
    assert default_actor() == f"{account} (os {account})"
    # Whatever the environment holds, the record fits the evidence's name columns and reads back.
    monkeypatch.setenv("DR_ACTOR", "x" * 500 + " (os nobody)")
    monkeypatch.setenv("SUDO_USER", "carol (os root), " * 20)
    monkeypatch.setenv("SSH_CONNECTION", "f" * 300 + " 1 2 3")
    long = default_actor()
    assert len(long) <= 200
    assert Identity.parse(long).os_account == account and str(Identity.parse(long).sudo_user).startswith("carol_")


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
