"""Drills and approval gates: a pre-approved drill passes its runbook's gates, recorded as the
drill's decision; without pre-approval a gate nobody answers rejects, and the drill fails."""

from __future__ import annotations

import textwrap
from pathlib import Path

import pytest
from sqlalchemy import select

from dr_orchestrator.drills.load import load_drill
from dr_orchestrator.drills.runner import DrillRunner
from dr_orchestrator.evidence import migrate
from dr_orchestrator.evidence.database import session_factory_for
from dr_orchestrator.evidence.models import Approval, Run

REPO = Path(__file__).resolve().parent.parent
LOCAL_INVENTORY = REPO / "inventories" / "local.yml"
GATED = """\
name: gated-quotation
kind: failover
scope: {services: [quotation]}
steps:
  - id: go-ahead
    action: approval
    with: {message: "fail quotation over?", timeout: 0.3}
    timeout: 10s
  - {id: verify, action: noop, marks: [service_restored]}
"""


def drill(tmp_path: Path, pre_approved: bool) -> Path:
    runbook = tmp_path / "gated.yml"
    runbook.write_text(GATED)
    path = tmp_path / "drill.yml"
    path.write_text(textwrap.dedent(f"""\
        name: gated-drill
        scenario: planned_maintenance
        inventory: {LOCAL_INVENTORY}
        runbook: {runbook}
        pre_approved: {str(pre_approved).lower()}
        """))
    return path


def test_a_pre_approved_drill_passes_the_gates_as_the_drill(tmp_path: Path) -> None:
    url = f"sqlite:///{tmp_path / 'evidence.db'}"
    migrate.upgrade(url)
    sessions = session_factory_for(url)
    outcome = DrillRunner(sessions).run(load_drill(drill(tmp_path, pre_approved=True)))
    assert outcome.passed, (outcome.error, outcome.expectations)
    with sessions() as session:
        decisions = [(a.step_id, a.decision, a.actor, a.reason) for a in session.scalars(select(Approval))]
        failover = session.get_one(Run, outcome.runs["failover"])
    assert decisions == [("go-ahead", "approved", "drill gated-drill", "pre-approved by drill gated-drill")]
    assert failover.pre_approved_by == "drill gated-drill"


@pytest.mark.slow
def test_without_pre_approval_an_unanswered_gate_fails_the_drill(tmp_path: Path) -> None:
    url = f"sqlite:///{tmp_path / 'evidence.db'}"
    migrate.upgrade(url)
    sessions = session_factory_for(url)
    outcome = DrillRunner(sessions).run(load_drill(drill(tmp_path, pre_approved=False)))
    assert not outcome.passed
    with sessions() as session:
        decisions = [(a.decision, a.actor) for a in session.scalars(select(Approval))]
    assert decisions == [("rejected", "dr (timeout)")]
