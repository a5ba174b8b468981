"""Run safety through the evidence database, on SQLite and PostgreSQL: locks on services and sites
(also across processes, freed when a holder dies), approval gates decided from outside the run,
interrupted runs found by their dead process, and resuming them."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
import threading
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy import select
from sqlalchemy.orm import Session, sessionmaker
from support.plans import make_plan
from support.waiting import wait_for

from dr_orchestrator.engine import RunOutcome
from dr_orchestrator.evidence import queries
from dr_orchestrator.evidence.approvals import ApprovalRefused, decide, waiting_gates
from dr_orchestrator.evidence.liveness import sweep_interrupted
from dr_orchestrator.evidence.locks import LockHeld, Resource, RunLocks, resources_for
from dr_orchestrator.evidence.models import (
    ActionEventRecord,
    Approval,
    Run,
    RunLock,
    RunProcess,
    ServiceResult,
    StepRecord,
)
from dr_orchestrator.evidence.store import EvidenceStore
from dr_orchestrator.model.approval import Decision
from dr_orchestrator.model.events import RunStarted, StepStarted, utcnow
from dr_orchestrator.model.run import RunPlan
from dr_orchestrator.runs.execute import execute
from dr_orchestrator.runs.resume import ResumeRefused, ResumeRequest, prepare_resume

WAIT_S = 20.0
HOST = "test-host"
GATED = """
    name: gated
    scope: {services: [trading], sites: [backup]}
    steps:
      - {id: prepare, action: noop}
      - id: go-ahead
        action: approval
        with: {message: "fail trading over?", timeout: 60}
        timeout: 90s
      - {id: switch, action: noop, marks: [service_restored]}
"""


def dead_pid() -> int:
    process = subprocess.Popen(["true"])
    process.wait()
    return process.pid


# ---------------------------------------------------------------- locks


def test_a_second_run_on_the_same_service_is_refused_naming_the_holder(sessions: sessionmaker[Session]) -> None:
    plan = make_plan(GATED)
    first, second = RunLocks(sessions, HOST), RunLocks(sessions, HOST)
    first.acquire("run-a", resources_for(plan))
    try:
        with pytest.raises(LockHeld) as refused:
            second.acquire("run-b", resources_for(plan))
        assert "service trading is held by run run-a" in str(refused.value)
        assert f"pid {os.getpid()} on {HOST}" in str(refused.value)
        with sessions() as session:
            assert {(r.resource, r.run_id, r.mode) for r in session.scalars(select(RunLock))} == {
                ("service:trading", "run-a", "exclusive"), ("site:backup", "run-a", "shared")}
    finally:
        first.release()
    second.acquire("run-b", resources_for(plan))  # free again once the holder ended
    second.release()
    with sessions() as session:
        assert not list(session.scalars(select(RunLock)))


def test_service_runbooks_share_sites_and_a_site_runbook_excludes_them(sessions: sessionmaker[Session]) -> None:
    trading = make_plan(GATED)
    other_service = make_plan(GATED.replace("services: [trading]", "services: [unknown-to-inventory]"))
    whole_site = make_plan(GATED.replace("services: [trading], ", ""))
    # A site runbook holds the site and every service served there, exclusively.
    assert resources_for(whole_site) == [Resource("service:trading", True), Resource("site:backup", True)]
    assert resources_for(other_service) == [Resource("site:backup", False)]
    a, b, c = RunLocks(sessions, HOST), RunLocks(sessions, HOST), RunLocks(sessions, HOST)
    a.acquire("run-a", resources_for(trading))
    b.acquire("run-b", resources_for(other_service))  # another service at the same site: both go
    with pytest.raises(LockHeld, match="service trading is held by run run-a"):
        c.acquire("run-c", resources_for(whole_site))
    a.release()
    with pytest.raises(LockHeld, match="site backup is held by run run-b"):
        c.acquire("run-c", resources_for(whole_site))
    b.release()
    c.acquire("run-c", resources_for(whole_site))
    c.release()


HOLDER = textwrap.dedent("""
    import sys, time
    from dr_orchestrator.evidence.database import session_factory_for
    from dr_orchestrator.evidence.locks import Resource, RunLocks
    held = RunLocks(session_factory_for(sys.argv[1]), "test-host")
    held.acquire("run-dead", [Resource("service:trading", True)])
    print("held", flush=True)
    time.sleep(120)
""")


@pytest.mark.slow
def test_a_lock_dies_with_its_process(database_url: str, sessions: sessionmaker[Session]) -> None:
    holder = subprocess.Popen([sys.executable, "-c", HOLDER, database_url], stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout is not None and holder.stdout.readline().strip() == "held"
        locks = RunLocks(sessions, HOST)
        with pytest.raises(LockHeld, match="run run-dead"):
            locks.acquire("run-b", [Resource("service:trading", True)])
        holder.kill()
        holder.wait()
        # PostgreSQL notices the dropped connection a moment later: wait for it, never longer.
        wait_for(lambda: _try(locks, "run-b"), WAIT_S, "the dead holder's lock to be freed")
        with sessions() as session:  # the dead holder's row is gone, ours named instead
            assert [r.run_id for r in session.scalars(select(RunLock))] == ["run-b"]
        locks.release()
    finally:
        holder.kill()
        holder.wait()


def _try(locks: RunLocks, run_id: str) -> bool:
    try:
        locks.acquire(run_id, [Resource("service:trading", True)])
    except LockHeld:
        return False
    return True


# ---------------------------------------------------------------- approval gates


def run_in_thread(sessions: sessionmaker[Session], plan: RunPlan) -> tuple[threading.Thread, dict[str, Any]]:
    box: dict[str, Any] = {}

    def call() -> None:
        box["outcome"] = execute(sessions, plan, run_id=box.setdefault(
            "run_id", "7e57a9e0-0000-4000-8000-000000000001"), host=HOST)

    thread = threading.Thread(target=call, daemon=True)
    thread.start()
    return thread, box


def states(sessions: sessionmaker[Session], run_id: str) -> tuple[str, dict[str, str]]:
    with sessions() as session:
        run = session.get(Run, run_id)
        steps = {s.step_id: s.state for s in session.scalars(select(StepRecord).where(StepRecord.run_id == run_id))}
        return (run.state if run else "none"), steps


def test_a_gate_waits_visibly_until_another_person_approves(sessions: sessionmaker[Session]) -> None:
    plan = make_plan(GATED.replace("name: gated", "name: gated\n    approvals: {two_person: true}"))
    plan = plan.model_copy(update={"started_by": "alice"})
    thread, box = run_in_thread(sessions, plan)
    run_id = box["run_id"]
    try:
        wait_for(lambda: states(sessions, run_id) == ("waiting_approval", {
            "prepare": "succeeded", "go-ahead": "waiting_approval", "switch": "pending"}), WAIT_S, "the gate to wait")
        with sessions() as session:
            gates = waiting_gates(session)
        assert [(g["run_id"], g["step_id"], g["message"], g["started_by"], g["two_person"]) for g in gates] == [
            (run_id, "go-ahead", "fail trading over?", "alice", True)]
        with sessions() as session, session.begin():
            with pytest.raises(ApprovalRefused, match="alice started run .*two-person rule"):
                decide(session, run_id, "go-ahead", Decision.APPROVED, "alice", "mine")
            with pytest.raises(ApprovalRefused, match="needs a reason"):
                decide(session, run_id, "go-ahead", Decision.REJECTED, "bob", " ")
            with pytest.raises(ApprovalRefused, match="'prepare' .* is not waiting for approval \\(it is succeeded\\)"):
                decide(session, run_id, "prepare", Decision.APPROVED, "bob")
            decide(session, run_id[:8], "go-ahead", Decision.APPROVED, "bob", "primary confirmed lost")
        thread.join(WAIT_S)
        outcome: RunOutcome = box["outcome"]
        assert outcome.state == "succeeded"
    finally:
        thread.join(WAIT_S)
    with sessions() as session:
        detail = queries.run_detail(session, run_id)
        result = session.scalars(select(ServiceResult).where(ServiceResult.run_id == run_id)).one()
    assert detail is not None
    assert [(a["step_id"], a["decision"], a["actor"], a["reason"]) for a in detail["approvals"]] == [
        ("go-ahead", "approved", "bob", "primary confirmed lost")]
    gate = next(s for s in detail["steps"] if s["step_id"] == "go-ahead")
    assert gate["state"] == "succeeded" and gate["output"]["actor"] == "bob"
    # The time spent at the gate is the decision part of the RTO.
    assert result.decision_s is not None and result.decision_s > 0
    assert result.decision_s <= (result.rto_s or 0)


def test_a_timed_out_gate_is_a_recorded_rejection(sessions: sessionmaker[Session]) -> None:
    plan = make_plan(GATED.replace("timeout: 60", "timeout: 0.3"))
    thread, box = run_in_thread(sessions, plan)
    thread.join(WAIT_S)
    outcome: RunOutcome = box["outcome"]
    assert outcome.state == "failed"
    assert outcome.steps["switch"] == "skipped"
    with sessions() as session:
        rows = [(a.step_id, a.decision, a.actor) for a in session.scalars(select(Approval))]
    assert rows == [("go-ahead", "rejected", "dr (timeout)")]


def test_a_pre_approved_run_records_who_pre_approved(sessions: sessionmaker[Session]) -> None:
    plan = make_plan(GATED).model_copy(update={"pre_approved_by": "drill quarterly-trading"})
    thread, box = run_in_thread(sessions, plan)
    thread.join(WAIT_S)
    assert box["outcome"].state == "succeeded"
    with sessions() as session:
        rows = [(a.decision, a.actor, a.reason) for a in session.scalars(select(Approval))]
        run = session.get_one(Run, box["run_id"])
    assert rows == [("approved", "drill quarterly-trading", "pre-approved by drill quarterly-trading")]
    assert run.pre_approved_by == "drill quarterly-trading"


# ---------------------------------------------------------------- interrupted runs and resume


CRASHABLE = """
    name: crashable
    scope: {services: [trading]}
    steps:
      - {id: fence, action: noop, with: {output: {fenced: p1}}}
      - {id: promote, action: fail, effect: irreversible, with: {message: "would run again"}}
      - {id: check, action: noop, idempotent: true, needs: [promote]}
"""


def crashed_run(sessions: sessionmaker[Session], plan: RunPlan, run_id: str, in_flight: list[str],
                finished: dict[str, dict[str, Any]]) -> None:
    """What a process killed mid-run leaves: the run started, some steps ended, some in flight, and
    a process row naming a pid that is gone."""
    from dr_orchestrator.model.events import StepFinished
    from dr_orchestrator.model.run import StepState

    store = EvidenceStore(sessions)
    store(RunStarted(run_id, utcnow(), plan, HOST))
    for step_id, output in finished.items():
        store(StepStarted(run_id, step_id, utcnow()))
        store(StepFinished(run_id, step_id, utcnow(), StepState.SUCCEEDED, output))
    for step_id in in_flight:
        store(StepStarted(run_id, step_id, utcnow()))
    # What the killed process had committed: its writer thread must not still be writing while the test
    # goes on (SQLite refuses a read transaction's upgrade when another writer committed in between).
    store.flush()
    with sessions() as session, session.begin():
        session.add(RunProcess(run_id=run_id, host=HOST, pid=dead_pid(), process_start=None, started_at=utcnow(),
                               heartbeat_at=utcnow()))


def test_a_run_whose_process_died_is_marked_interrupted_and_resumes_as_the_same_run(
        sessions: sessionmaker[Session]) -> None:
    plan = make_plan(CRASHABLE)
    run_id = "7e57a9e0-0000-4000-8000-00000000c0de"
    crashed_run(sessions, plan, run_id, in_flight=["promote"], finished={"fence": {"fenced": "p1"}})
    assert sweep_interrupted(sessions, HOST) == [run_id]
    assert sweep_interrupted(sessions, HOST) == []  # once
    assert states(sessions, run_id) == ("interrupted", {"fence": "succeeded", "promote": "interrupted",
                                                        "check": "pending"})
    with sessions() as session:
        detail = queries.run_detail(session, run_id)
    assert detail is not None
    assert [e["action"] for e in detail["run_events"]] == ["run.interrupted"]
    assert detail["run_events"][0]["data"]["in_flight"] == [{"step_id": "promote", "phase": "forward"}]

    # `promote` is not idempotent (in this registry): it needs the engineer's word.
    request = ResumeRequest(run_id, "bob", "checked the standby")
    with pytest.raises(ResumeRefused, match="'promote'.*--retry STEP.*e.g. --step-done promote"):
        prepare_resume(sessions, request, registry=_strict_registry())
    with pytest.raises(ResumeRefused, match="'fence' .* was not in flight"):
        prepare_resume(sessions, ResumeRequest(run_id, "bob", step_done=("fence",)))

    the_id, resumed_plan, point = prepare_resume(
        sessions, ResumeRequest(run_id, "bob", "the standby is primary", step_done=("promote",)),
        registry=_strict_registry())
    assert the_id == run_id and resumed_plan.runbook_source.text == plan.runbook_source.text
    outcome = execute(sessions, resumed_plan, run_id=the_id, resume=point,
                                  host=HOST)
    assert outcome.state == "succeeded", outcome.error
    with sessions() as session:
        detail = queries.run_detail(session, run_id)
    assert detail is not None
    assert detail["run"]["state"] == "succeeded"
    rows = [(s["step_id"], s["state"]) for s in detail["steps"]]
    assert rows.count(("fence", "succeeded")) == 1  # not repeated
    assert ("promote", "interrupted") in rows and ("promote", "succeeded") in rows
    promote_done = next(s for s in detail["steps"] if s["step_id"] == "promote" and s["state"] == "succeeded")
    assert promote_done["output"] == {"marked_done_by": "bob", "reason": "the standby is primary"}
    assert promote_done["attempts"] == []  # recorded, not run
    assert [e["action"] for e in detail["run_events"]] == ["run.interrupted", "run.resumed"]
    assert detail["run_events"][1]["actor"] == "bob"
    with pytest.raises(ResumeRefused, match="ended succeeded: only interrupted runs"):
        prepare_resume(sessions, ResumeRequest(run_id, "bob"))


def _strict_registry() -> Any:
    """The built-in actions, with `fail` declared not idempotent (as a promotion would be)."""
    from dr_orchestrator.actions import default_registry
    from dr_orchestrator.actions.wait import Fail

    class StrictFail(Fail):
        idempotent = False

    registry = default_registry()
    registry.register("fail", StrictFail)
    return registry


def test_a_live_run_is_never_marked_interrupted(sessions: sessionmaker[Session], tmp_path: Path) -> None:
    plan = make_plan(CRASHABLE)
    run_id = "7e57a9e0-0000-4000-8000-00000000a11e"
    crashed_run(sessions, plan, run_id, in_flight=["promote"], finished={})
    with sessions() as session, session.begin():
        session.get_one(RunProcess, run_id).pid = os.getppid()  # alive: the process running pytest's parent
    assert sweep_interrupted(sessions, HOST) == []
    assert sweep_interrupted(sessions, "another-host") == []  # its heartbeat is fresh
    assert states(sessions, run_id)[0] == "running"


@pytest.mark.postgres
def test_a_command_that_reads_does_not_hang_behind_a_writer_holding_the_chain(postgres_database_url: str) -> None:
    """A writer cut off in the middle of a transaction holds the chain until the server drops it: `dr runs
    list` (whose start sweeps for interrupted runs) skips the sweep after a bounded wait, and lists."""
    import socket

    from click.testing import CliRunner
    from sqlalchemy import text

    from dr_orchestrator.cli import cli
    from dr_orchestrator.cli.common import SWEEP_LOCK_TIMEOUT_S
    from dr_orchestrator.evidence import migrate
    from dr_orchestrator.evidence.chain import ADVISORY_LOCK_KEY
    from dr_orchestrator.evidence.database import make_engine, make_session_factory

    migrate.upgrade(postgres_database_url)
    engine = make_engine(postgres_database_url)
    sessions = make_session_factory(engine)
    run_id = "7e57a9e0-0000-4000-8000-0000000c4a1d"
    crashed_run(sessions, make_plan(CRASHABLE), run_id, in_flight=["promote"], finished={})
    with sessions() as session, session.begin():
        session.get_one(RunProcess, run_id).host = socket.gethostname()  # a dead pid of this machine
    holder = make_engine(postgres_database_url).connect()
    try:
        holder.execute(text("SELECT pg_advisory_xact_lock(:key)"), {"key": ADVISORY_LOCK_KEY})
        listed = CliRunner().invoke(cli, ["--db", postgres_database_url, "runs", "list", "--output", "json"])
        assert listed.exit_code == 0, listed.output
        assert f"another writer held the evidence chain for {SWEEP_LOCK_TIMEOUT_S:g} s" in listed.stderr
        assert states(sessions, run_id)[0] == "running"  # not swept, and listed
        assert run_id in listed.stdout
    finally:
        holder.rollback()
        holder.close()
    swept = CliRunner().invoke(cli, ["--db", postgres_database_url, "runs", "list"])
    assert swept.exit_code == 0 and f"run {run_id} was interrupted" in swept.stderr
    assert states(sessions, run_id)[0] == "interrupted"
    engine.dispose()


def test_a_run_its_node_may_no_longer_act_on_is_resumed_by_the_leader_without_repeating_a_step(
        sessions: sessionmaker[Session]) -> None:
    """Takeover: the deposed node stops before its next change (the refusal in the evidence); the run is
    interrupted, and the node that leads now resumes it: each step ran once."""
    plan = make_plan("""
        name: takeover
        steps:
          - {id: fence-old, action: noop, effect: reversible}
          - {id: promote, action: noop, effect: irreversible, needs: [fence-old]}
          - {id: switch, action: noop, effect: reversible, needs: [promote], marks: [service_restored]}
    """)
    answers = iter(["41@node-a"])

    def node_a_fence() -> str:
        token = next(answers, None)
        if token is None:
            raise RuntimeError("node-a was deposed: node-b leads (token 42@node-b)")
        return token

    first = execute(sessions, plan, host="node-a", fence=node_a_fence)
    assert first.state == "interrupted"
    with sessions() as session:
        detail = queries.run_detail(session, first.run_id)
    assert detail is not None and detail["run"]["state"] == "interrupted"
    assert "node-b leads" in detail["run"]["error"]
    assert [(s["step_id"], s["state"]) for s in detail["steps"] if s["state"] != "pending"] == [
        ("fence-old", "succeeded")]

    the_id, resumed_plan, point = prepare_resume(sessions, ResumeRequest(
        first.run_id, "node-b", "took over from node-a"))
    second = execute(sessions, resumed_plan, run_id=the_id, resume=point,
                                 host="node-b", fence=lambda: "42@node-b")
    assert second.state == "succeeded", second.error
    with sessions() as session:
        detail = queries.run_detail(session, first.run_id)
        kinds = [(e.kind, e.step_id, e.data.get("token") or e.data.get("error"))
                 for e in session.scalars(select(ActionEventRecord).where(ActionEventRecord.run_id == first.run_id))
                 if e.kind.startswith("fencing.")]
    assert detail is not None
    assert [(s["step_id"], s["state"]) for s in detail["steps"] if s["state"] != "pending"] == [
        ("fence-old", "succeeded"), ("promote", "succeeded"), ("switch", "succeeded")]
    assert kinds == [("fencing.checked", "fence-old", "41@node-a"),
                     ("fencing.refused", "promote", "node-a was deposed: node-b leads (token 42@node-b)"),
                     ("fencing.checked", "promote", "42@node-b"), ("fencing.checked", "switch", "42@node-b")]
