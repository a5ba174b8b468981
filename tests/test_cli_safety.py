"""Safety as users meet it, with real `dr` processes: approval gates decided from another process,
two runs on one service at once (exactly one runs), and the orchestrator killed with SIGKILL at
every step boundary and inside steps, then resumed: nothing lost, nothing run twice that must not."""

from __future__ import annotations

import json
import os
import pwd
import socket
import subprocess
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from support.cli import Processes, dr, query, recorded
from support.waiting import wait_for

REPO = Path(__file__).resolve().parent.parent
LOCAL_INVENTORY = str(REPO / "inventories" / "local.yml")
WAIT_S = 60.0

GATED = """\
name: gated-local
kind: switchover
approvals: {two_person: true}
scope: {services: [quotation]}
steps:
  - {id: prepare, action: noop}
  - id: go-ahead
    action: approval
    with: {message: "switch quotation over?", timeout: 60}
    timeout: 90s
  - {id: switch, action: noop, marks: [service_restored]}
"""

CRASH = """\
name: crash-local
kind: failover
scope: {services: [quotation]}
parameters:
  ledger: {required: true}
  port: {required: true}
  pause_inside: {default: ""}
steps:
  - id: fence
    action: shell.run
    with: {command: "echo fence >> {{ params.ledger | shquote }}", shell: true}
  - id: promote
    action: shell.run
    with:
      shell: true
      command: >-
        echo promote-start >> {{ params.ledger | shquote }} &&
        if [ -n {{ params.pause_inside | shquote }} ]; then
        touch {{ params.pause_inside | shquote }} && while :; do sleep 1; done; fi &&
        echo promote-end >> {{ params.ledger | shquote }}
  - id: check
    action: tcp.check
    with: {host: 127.0.0.1, port: "{{ params.port }}", consecutive: 2, interval: 50ms, deadline: 5s}
    timeout: 10s
  - id: switch
    action: shell.run
    with: {command: "echo switch >> {{ params.ledger | shquote }}", shell: true}
    marks: [service_restored]
"""
LEDGER = ["fence", "promote-start", "promote-end", "switch"]
ACCOUNT = pwd.getpwuid(os.getuid()).pw_name


def waiting_gate(db: str) -> str | None:
    rows = query(db, "SELECT run_id FROM steps WHERE state = 'waiting_approval'")
    return str(rows[0][0]) if rows else None


@pytest.fixture
def migrated(database_url: str, tmp_path: Path) -> str:
    dr("db", "upgrade", db=database_url, cwd=tmp_path, check=True)
    return database_url


# ---------------------------------------------------------------- approval gates


def person(name: str, **more: str) -> dict[str, str]:
    """The environment of `name` on a shared root account: `sudo` from their own account sets
    SUDO_USER, which the two-person rule reads on root (another OS account would need root too)."""
    if os.geteuid() != 0:
        pytest.skip("acting as two people on one machine needs root (SUDO_USER is read on root only)")
    return {"SUDO_USER": name, **more}


@pytest.mark.slow
def test_a_gate_waits_for_another_person_from_another_process(migrated: str, tmp_path: Path,
                                                              processes: Processes) -> None:
    runbook = tmp_path / "gated.yml"
    runbook.write_text(GATED)
    run = processes.start("run", str(runbook), "-i", LOCAL_INVENTORY, "-q", db=migrated, actor="alice",
                          env=person("alice"))
    run_id = wait_for(lambda: waiting_gate(migrated), WAIT_S, "the gate to wait")
    shown = json.loads(dr("runs", "show", run_id, "-o", "json", db=migrated, cwd=tmp_path, check=True).stdout)
    assert (shown["run"]["state"], shown["run"]["started_by"]) == ("waiting_approval", "alice (os root, sudo alice)")
    listed = json.loads(dr("approvals", "-o", "json", db=migrated, cwd=tmp_path, check=True).stdout)
    assert [(g["run_id"], g["step_id"], g["two_person"]) for g in listed] == [(run_id, "go-ahead", True)]

    # The starter's own account is refused whatever $DR_ACTOR says, and so is root that names nobody.
    starter = f"alice started run {run_id}; its runbook requires another person to decide step 'go-ahead'"
    for actor, env, why in (("alice", person("alice"), starter), ("bob", person("alice"), starter),
                            ("bob", person(""), "root without sudo does not say which person you are;")):
        own = dr("approve", run_id, "go-ahead", db=migrated, cwd=tmp_path, actor=actor, env=env)
        assert own.returncode == 2, (actor, env, own.stdout)
        assert why in own.stderr and "$DR_ACTOR is only a label" in own.stderr, own.stderr
        assert "Traceback" not in own.stderr
    no_reason = dr("reject", run_id, "go-ahead", db=migrated, cwd=tmp_path, actor="bob", env=person("bob"))
    assert no_reason.returncode == 2
    approved = dr("approve", run_id[:8], "go-ahead", "--reason", "primary confirmed lost", db=migrated, cwd=tmp_path,
                  actor="bob", env=person("bob", SSH_CONNECTION="10.9.8.7 51234 127.0.0.1 22"))
    assert approved.returncode == 0, approved.stderr
    out, err = run.communicate(timeout=WAIT_S)
    assert run.returncode == 0, err
    shown = json.loads(dr("runs", "show", run_id, "-o", "json", db=migrated, cwd=tmp_path, check=True).stdout)
    assert shown["run"]["state"] == "succeeded"
    assert [(a["decision"], a["actor"], a["reason"]) for a in shown["approvals"]] == [
        ("approved", "bob (os root, sudo bob, ssh 10.9.8.7)", "primary confirmed lost")]
    assert shown["results"][0]["decision_s"] > 0


@pytest.mark.slow
def test_one_person_decides_a_gate_once_whatever_label_they_give(migrated: str, tmp_path: Path,
                                                                 processes: Processes) -> None:
    from dr_orchestrator.evidence.approvals import ApprovalRefused, decide
    from dr_orchestrator.evidence.database import make_engine, make_session_factory
    from dr_orchestrator.model.approval import Decision

    runbook = tmp_path / "gated.yml"
    runbook.write_text(GATED)
    run = processes.start("run", str(runbook), "-i", LOCAL_INVENTORY, "-q", db=migrated, env=person("alice"))
    run_id = wait_for(lambda: waiting_gate(migrated), WAIT_S, "the gate to wait")
    engine = make_engine(migrated)
    try:
        # Both decisions in one transaction: the gate cannot take the first before the second is tried.
        with make_session_factory(engine)() as session, session.begin():
            decide(session, run_id, "go-ahead", Decision.APPROVED, "bob (os root, sudo bob)", "checked")
            with pytest.raises(ApprovalRefused, match=r"^bob \(os root, sudo bob\) already decided step 'go-ahead' "
                                                      r"of run .* \(approved at .*\); one person decides a gate once$"):
                decide(session, run_id, "go-ahead", Decision.APPROVED, "carol (os root, sudo bob)")
    finally:
        engine.dispose()
    run.communicate(timeout=WAIT_S)
    assert run.returncode == 0
    assert [tuple(row) for row in query(migrated, "SELECT actor FROM approvals")] == [("bob (os root, sudo bob)",)]


@pytest.mark.slow
def test_a_rejected_gate_fails_the_run(migrated: str, tmp_path: Path, processes: Processes) -> None:
    runbook = tmp_path / "gated.yml"
    runbook.write_text(GATED)
    run = processes.start("run", str(runbook), "-i", LOCAL_INVENTORY, "-q", db=migrated, actor="alice",
                          env=person("alice"))
    run_id = wait_for(lambda: waiting_gate(migrated), WAIT_S, "the gate to wait")
    dr("reject", run_id, "go-ahead", "--reason", "the primary is back", db=migrated, cwd=tmp_path, actor="bob",
       env=person("bob"), check=True)
    run.communicate(timeout=WAIT_S)
    assert run.returncode == 1
    shown = json.loads(dr("runs", "show", run_id, "-o", "json", db=migrated, cwd=tmp_path, check=True).stdout)
    states = {s["step_id"]: (s["state"], s["error"]) for s in shown["steps"]}
    assert states["go-ahead"] == ("failed", "rejected by bob (os root, sudo bob): the primary is back")
    assert states["switch"][0] == "skipped"


@pytest.mark.slow
def test_a_saved_plans_gate_approved_before_the_run_is_taken_once_and_never_from_the_starter(
        tmp_path: Path, processes: Processes) -> None:
    db = f"sqlite:///{tmp_path / 'evidence.db'}"
    dr("db", "upgrade", db=db, cwd=tmp_path, check=True)
    runbook = tmp_path / "gated.yml"
    runbook.write_text(GATED)
    saved = tmp_path / "reviewed-plan.json"
    dr("plan", str(runbook), "-i", LOCAL_INVENTORY, "--out", str(saved), db=db, cwd=tmp_path, actor="alice",
       env=person("alice"), check=True)
    approved = dr("approve", "--plan", str(saved), "go-ahead", "--reason", "CAB-4711", db=db, cwd=tmp_path,
                  actor="bob", env=person("bob"))
    assert approved.returncode == 0, approved.stderr
    for args, env, why in ((["go-ahead"], person("bob"), "bob (os root, sudo bob) already approved step 'go-ahead'"),
                           (["prepare"], person("bob"), "the saved plan has no approval gate 'prepare' (its gates: "
                                                       "go-ahead)"),
                           (["go-ahead"], person(""), "root without sudo does not say which person you are")):
        refused = dr("approve", "--plan", str(saved), *args, db=db, cwd=tmp_path, actor="bob", env=env)
        assert refused.returncode == 2 and why in refused.stderr, refused.stderr

    # Alice runs exactly the reviewed plan: bob's approval stands for the gate, which does not wait.
    first = dr("run", "--plan", str(saved), "-q", db=db, cwd=tmp_path, actor="alice", env=person("alice"))
    assert first.returncode == 0, first.stdout + first.stderr
    (run_id,) = [row[0] for row in query(db, "SELECT id FROM runs")]
    shown = json.loads(dr("runs", "show", run_id, "-o", "json", db=db, cwd=tmp_path, check=True).stdout)
    (approval,) = shown["approvals"]
    assert (approval["step_id"], approval["actor"]) == ("go-ahead", "bob (os root, sudo bob)")
    assert approval["reason"].startswith("approved in advance for saved plan ") and approval["reason"].endswith(
        ": CAB-4711")
    used = query(db, "SELECT data FROM audit_events WHERE action = 'plan.approval.used'")
    assert len(used) == 1 and run_id in str(used[0][0])

    # The approval was used: the next run of the plan asks again, and Alice's own approval of the plan
    # does not count under the two-person rule.
    dr("approve", "--plan", str(saved), "go-ahead", db=db, cwd=tmp_path, actor="alice", env=person("alice"),
       check=True)
    second = processes.start("run", "--plan", str(saved), "-q", db=db, actor="alice", env=person("alice"))
    second_id = wait_for(lambda: waiting_gate(db), WAIT_S, "the second run's gate to wait")
    dr("reject", second_id, "go-ahead", "--reason", "one switch a day", db=db, cwd=tmp_path, actor="bob",
       env=person("bob"), check=True)
    second.communicate(timeout=WAIT_S)
    assert second.returncode == 1


# ---------------------------------------------------------------- one failover at a time


@pytest.mark.slow
def test_two_runs_on_one_service_at_once_exactly_one_runs(migrated: str, tmp_path: Path,
                                                          processes: Processes) -> None:
    runbook = tmp_path / "gated.yml"
    runbook.write_text(GATED.replace("approvals: {two_person: true}\n", ""))
    both = [processes.start("run", str(runbook), "-i", LOCAL_INVENTORY, "-q", db=migrated) for _ in range(2)]
    loser = wait_for(lambda: next((p for p in both if p.poll() is not None), None), WAIT_S,
                     "one of the runs to be refused")
    winner = next(p for p in both if p is not loser)
    _, refusal = loser.communicate(timeout=WAIT_S)
    assert loser.returncode == 3, refusal
    run_id = wait_for(lambda: waiting_gate(migrated), WAIT_S, "the other run to reach its gate")
    assert winner.poll() is None
    assert f"refused: service quotation is held by run {run_id}" in refusal
    assert "Traceback" not in refusal
    assert [row[0] for row in query(migrated, "SELECT id FROM runs")] == [run_id]  # the refused run did nothing
    refused = query(migrated, "SELECT action, data FROM audit_events WHERE action = 'run.refused'")
    assert len(refused) == 1
    dr("approve", run_id, "go-ahead", db=migrated, cwd=tmp_path, actor="bob", check=True)
    winner.communicate(timeout=WAIT_S)
    assert winner.returncode == 0
    assert query(migrated, "SELECT * FROM run_locks") == []  # freed when the run ended


# ---------------------------------------------------------------- crash and resume


@pytest.fixture(scope="module")
def crash_db(tmp_path_factory: pytest.TempPathFactory) -> str:
    where = tmp_path_factory.mktemp("crash-db")
    url = f"sqlite:///{where / 'evidence.db'}"
    dr("db", "upgrade", db=url, cwd=where, check=True)
    return url


@pytest.fixture(scope="module")
def listening_port() -> Iterator[int]:
    """A port that accepts connections: the service the idempotent check verifies."""
    with socket.socket() as server:
        server.bind(("127.0.0.1", 0))
        server.listen(64)
        yield int(server.getsockname()[1])


KILL_POINTS = ["run:started", "run:finishing", "inside:promote", "switch:ending"] + [
    f"{step}:{phase}" for step in ("fence", "promote", "check", "switch") for phase in ("before", "started", "finished")
]


@pytest.mark.parametrize("kill_at", KILL_POINTS)
@pytest.mark.slow
def test_killed_at_any_point_and_resumed_every_step_ran_once(kill_at: str, crash_db: str, listening_port: int,
                                                             tmp_path: Path, processes: Processes) -> None:
    runbook = tmp_path / "crash.yml"
    runbook.write_text(CRASH)
    ledger = tmp_path / "ledger"
    pause_dir = tmp_path / "pause"
    pause_dir.mkdir()
    params = ["-p", f"ledger={ledger}", "-p", f"port={listening_port}"]
    env = {}
    if kill_at == "inside:promote":
        params += ["-p", f"pause_inside={pause_dir / 'paused'}"]
    else:
        env = {"DR_TEST_PAUSE_AT": kill_at, "DR_TEST_PAUSE_DIR": str(pause_dir)}
    run = processes.start("run", str(runbook), "-i", LOCAL_INVENTORY, "-q", *params, db=crash_db, env=env)
    wait_for(lambda: (pause_dir / "paused").exists() or run.poll() is not None, WAIT_S, f"the run to reach {kill_at}")
    assert run.poll() is None, run.communicate()
    processes.kill(run)
    run_id = str(query(crash_db, "SELECT id FROM runs ORDER BY started_at DESC LIMIT 1")[0][0])

    resumed = dr("resume", run_id, "-q", db=crash_db, cwd=tmp_path, actor="bob")
    step, _, phase = kill_at.partition(":")
    in_flight_shell = (phase in ("started", "ending") and step not in ("check", "run")) or step == "inside"
    if in_flight_shell:
        # The engineer must decide: the step may or may not have taken effect.
        assert resumed.returncode == 2, resumed.stdout + resumed.stderr
        assert f"--step-done {'promote' if step == 'inside' else step}" in resumed.stderr
        assert query(crash_db, "SELECT state FROM runs WHERE id = :id", id=run_id)[0][0] == "interrupted"
        if phase == "ending":  # it ran: its effect is there
            assert ledger.read_text().split() == LEDGER
            decision = ["--step-done", step, "--reason", "the ledger shows it ran"]
        elif kill_at == "inside:promote":
            assert ledger.read_text().split() == ["fence", "promote-start"]
            with ledger.open("a") as handle:  # the engineer finishes the promotion by hand
                handle.write("promote-end\n")
            decision = ["--step-done", "promote", "--reason", "finished the promotion by hand"]
        else:
            assert step not in (ledger.read_text().split() if ledger.exists() else [])  # it never began
            decision = ["--retry", step]
        resumed = dr("resume", run_id, "-q", *decision, db=crash_db, cwd=tmp_path, actor="bob")
    assert resumed.returncode == 0, resumed.stdout + resumed.stderr

    assert ledger.read_text().split() == LEDGER  # every step's effect exactly once
    detail, chain = recorded(crash_db, run_id)
    assert detail["run"]["state"] == "succeeded"
    forward = [s for s in detail["steps"] if s["phase"] == "forward"]
    assert sorted(s["step_id"] for s in forward if s["state"] == "succeeded") == ["check", "fence", "promote", "switch"]
    interrupted = [s["step_id"] for s in forward if s["state"] == "interrupted"]
    in_flight = [step] if phase in ("started", "ending") else []
    expected_interrupted = {"inside": ["promote"], "run": []}.get(step, in_flight)
    assert interrupted == expected_interrupted
    assert not [s for s in forward if s["state"] not in ("succeeded", "interrupted")]
    assert [e["action"] for e in detail["run_events"]] == ["run.interrupted", "run.resumed"]
    assert detail["run_events"][1]["actor"] == f"bob (os {ACCOUNT})"  # the label, then who resumed
    result = detail["results"][0]
    assert result["service"] == "quotation" and result["rto_s"] is not None and result["rto_s"] > 0
    assert chain.ok, chain.first  # the audit chain holds every write, before and after the crash


@pytest.mark.slow
def test_a_run_that_is_alive_cannot_be_resumed(crash_db: str, tmp_path: Path, processes: Processes) -> None:
    runbook = tmp_path / "gated.yml"
    runbook.write_text(GATED)
    run = processes.start("run", str(runbook), "-i", LOCAL_INVENTORY, "-q", db=crash_db, actor="alice")
    run_id = wait_for(lambda: waiting_gate(crash_db), WAIT_S, "the gate to wait")
    refused = dr("resume", run_id, db=crash_db, cwd=tmp_path)
    assert refused.returncode == 2
    assert f"run {run_id} is still waiting_approval (pid {run.pid}" in refused.stderr
    processes.kill(run)


# ---------------------------------------------------------------- the lab's site failover, killed mid-promotion


@pytest.mark.lab
@pytest.mark.slow
def test_lab_site_failover_killed_inside_the_promotion_resumes_and_finds_it_done(
        lab_factory: Any, tmp_path: Path, processes: Processes) -> None:
    from actionctx import wait_for_heartbeats

    from dr_orchestrator.lab.config import POSTGRES_SERVICES
    from dr_orchestrator.model.events import utcnow

    db = f"sqlite:///{tmp_path / 'evidence.db'}"
    dr("db", "upgrade", db=db, cwd=tmp_path, check=True)
    pause_dir = tmp_path / "pause"
    with lab_factory() as lab:
        for service in POSTGRES_SERVICES:  # each standby's data is known fresh: the prechecks pass
            wait_for_heartbeats(lab, service)
        incident = utcnow().isoformat()
        lab.kill_site("primary")
        # Paused once trading's standby is promoted and the step's marks are recorded, before its end is.
        # The other stores' promotions run beside it: each may or may not have happened by the kill.
        run = processes.start("run", "-q", str(REPO / "runbooks" / "site-failover.yml"), "-i",
                              str(lab.config.inventory_path), "--incident-at", incident, db=db,
                              env={"DR_TEST_PAUSE_AT": "promote-trading:ending", "DR_TEST_PAUSE_DIR": str(pause_dir)})
        wait_for(lambda: (pause_dir / "paused").exists() or run.poll() is not None, WAIT_S, "the promotion to happen")
        assert run.poll() is None, run.communicate()
        processes.kill(run)
        run_id = str(query(db, "SELECT id FROM runs")[0][0])

        # The promotions are resumable: run again, each finds its database promoted (trading's always
        # is, it was paused after promoting) or promotes it. No engineer's word is needed, none is repeated.
        resumed = dr("resume", run_id, "-q", "--reason", "the orchestrator host was lost", db=db, cwd=tmp_path,
                     actor="bob")
        detail, chain = recorded(db, run_id)
        failed = [(s["step_id"], s["state"], s["error"]) for s in detail["steps"]
                  if s["state"] not in ("succeeded", "interrupted", "skipped")]
        assert resumed.returncode == 0, (resumed.stderr, failed)
        promotions = [s for s in detail["steps"] if s["step_id"] == "promote-trading"]
        assert [s["state"] for s in promotions] == ["interrupted", "succeeded"]
        assert "not promoted again" in promotions[1]["output"]["found_promoted"]
        assert promotions[1]["output"]["timeline"] == 2  # promoted once: a second promotion would make it 3
        assert {r["service"] for r in detail["results"] if r["rto_s"] is not None} == {
            "trading", "contract-signing", "quotation"}
        assert chain.ok, chain.first
        for service in ("trading", "contract-signing", "quotation"):
            health = json.loads(subprocess.run(
                ["curl", "-s", "--max-time", "5", f"{lab.config.frontend_url(service)}/health"],
                capture_output=True, text=True).stdout or "{}")
            assert health.get("site") == "backup", (service, health)
