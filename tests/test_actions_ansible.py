"""ansible.playbook through the real engine and the real ansible-runner / ansible-playbook: task events
streamed into evidence while the playbook runs, failures naming host and task, the step's timeout
ending the playbook, a fresh private data dir per run; and over the lab's sshd with pinned host keys."""

from __future__ import annotations

import json
import re
import subprocess
import sys
import textwrap
import threading
import time
import uuid
from collections.abc import Callable, Iterator, Sequence
from contextlib import AbstractContextManager
from pathlib import Path
from typing import Any

import httpx
import pytest
from actionctx import Harness, lab_query
from sqlalchemy import select
from support.waiting import wait_for

from dr_orchestrator.actions import default_registry
from dr_orchestrator.actions.ansible import AnsiblePlaybook, AnsiblePlaybookParams, bound_artifacts
from dr_orchestrator.actions.base import ActionError
from dr_orchestrator.actions.postgres.rebuild import RebuildStandby, RebuildStandbyParams
from dr_orchestrator.engine import Engine, RunOutcome
from dr_orchestrator.evidence import migrate
from dr_orchestrator.evidence.database import make_engine, make_session_factory
from dr_orchestrator.evidence.models import ActionEventRecord, StepRecord
from dr_orchestrator.evidence.store import EvidenceStore
from dr_orchestrator.lab import Lab
from dr_orchestrator.loading import load_inventory
from dr_orchestrator.model.events import ActionEvent, Event, Observer, StepFinished
from dr_orchestrator.model.run import RunState, StepState
from dr_orchestrator.plans import build_plan

REPO = Path(__file__).resolve().parent.parent
VENV_BIN = Path(sys.executable).parent

# A DR inventory that is also an Ansible inventory; its one host is this machine (local connection).
LOCAL_INVENTORY = """\
all:
  vars:
    ansible_connection: local
    ansible_python_interpreter: /usr/bin/python3
    dr:
      name: ansible-test
      sites: {primary: {}, backup: {}}
      services:
        quotation: {rto: 30s, rpo: 60s, sites: [primary, backup]}
  children:
    backup:
      hosts:
        backup-local: {ansible_host: 127.0.0.1}
"""


@pytest.fixture(autouse=True)
def evidence_dir(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    folder = tmp_path / "evidence"
    monkeypatch.setenv("DR_EVIDENCE_DIR", str(folder))
    return folder


class Workspace:
    """A runbook folder of the test's own: runbook files, playbooks/ beside them, one inventory."""

    def __init__(self, root: Path, inventory_text: str = LOCAL_INVENTORY) -> None:
        self.root = root
        (root / "playbooks").mkdir(parents=True, exist_ok=True)
        self.inventory = root / "inventory.yml"
        self.inventory.write_text(inventory_text)

    def playbook(self, name: str, text: str) -> None:
        (self.root / "playbooks" / name).write_text(textwrap.dedent(text))

    def run(self, step_with: dict[str, Any], timeout: str = "60s", observers: Sequence[Observer] = (),
            inventory: Path | None = None, stop: threading.Event | None = None) -> tuple[RunOutcome, list[Event]]:
        runbook = self.root / f"runbook-{uuid.uuid4().hex[:8]}.yml"
        runbook.write_text(json.dumps({
            "name": "ansible-test", "kind": "rehearsal", "scope": {"services": ["quotation"]},
            "steps": [{"id": "play", "action": "ansible.playbook", "with": step_with, "timeout": timeout}],
        }))
        events: list[Event] = []

        def collect(event: Event) -> None:
            events.append(event)

        plan = build_plan(str(runbook), str(inventory or self.inventory))
        outcome = Engine(default_registry(), [collect, *observers]).run(plan, stop=stop)
        return outcome, events


def task_events(events: list[Event]) -> list[dict[str, Any]]:
    return [e.data for e in events if isinstance(e, ActionEvent) and e.kind == "ansible.task"]


def step_result(events: list[Event]) -> StepFinished:
    return next(e for e in events if isinstance(e, StepFinished) and e.step_id == "play")


@pytest.fixture
def workspace(tmp_path: Path) -> Workspace:
    return Workspace(tmp_path / "runbooks")


@pytest.mark.timeout(120)
@pytest.mark.slow
def test_task_events_reach_the_evidence_store_while_the_playbook_runs(
    workspace: Workspace, tmp_path: Path, evidence_dir: Path
) -> None:
    go_on = tmp_path / "go-on"
    # The second task waits for a file that the test creates only on hearing of the first task:
    # the playbook can finish only if its events arrive while it runs.
    workspace.playbook("steps.yml", """\
        - name: Three kinds of task
          hosts: backup
          gather_facts: false
          tasks:
            - name: Report in
              ansible.builtin.command: echo {{ greeting }}
              changed_when: false
            - name: Wait for the orchestrator to have heard
              ansible.builtin.wait_for: {path: "{{ go_on }}", timeout: 30}
            - name: Never on this host
              ansible.builtin.command: "false"
              when: false
    """)
    url = f"sqlite:///{tmp_path / 'evidence.db'}"
    migrate.upgrade(url)
    db = make_engine(url)
    sessions = make_session_factory(db)

    def release(event: Event) -> None:
        if isinstance(event, ActionEvent) and event.data.get("task") == "Report in":
            go_on.touch()

    try:
        outcome, events = workspace.run(
            {"playbook": "steps.yml", "extra_vars": {"greeting": "hello", "go_on": str(go_on)}},
            observers=[EvidenceStore(sessions), release],
        )
        with sessions() as session:
            stored = session.scalars(select(ActionEventRecord).where(ActionEventRecord.kind == "ansible.task")
                                     .order_by(ActionEventRecord.id)).all()
            step = session.scalars(select(StepRecord)).one()
    finally:
        db.dispose()

    assert outcome.state is RunState.SUCCEEDED, step_result(events).error
    assert [(r.kind, r.data["task"], r.data["host"], r.data["status"]) for r in stored] == [
        ("ansible.task", "Report in", "backup-local", "ok"),
        ("ansible.task", "Wait for the orchestrator to have heard", "backup-local", "ok"),
        ("ansible.task", "Never on this host", "backup-local", "skipped"),
    ]
    assert all(r.step_id == "play" and r.data["duration_s"] is not None for r in stored[:2])
    assert stored[0].data["changed"] is False
    output = step.output
    assert output is not None
    assert (output["status"], output["rc"], output["playbook"]) == ("successful", 0, "steps.yml")
    assert output["stats"]["backup-local"]["ok"] == 2
    assert output["stats"]["backup-local"]["skipped"] == 1
    assert output["inventory"] == str(workspace.inventory)
    artifacts = Path(output["artifacts"])
    assert artifacts.parent == evidence_dir / outcome.run_id / "ansible" / "play"
    assert "ok: [backup-local]" in (artifacts / "stdout").read_text()
    assert "TASK [Report in]" in output["stdout"]


@pytest.mark.timeout(120)
@pytest.mark.slow
def test_a_failed_task_fails_the_step_naming_host_task_and_message(workspace: Workspace) -> None:
    workspace.playbook("breaks.yml", """\
        - hosts: backup
          gather_facts: false
          tasks:
            - name: Check the replica
              ansible.builtin.shell: echo "replica is 42 s behind" >&2; exit 3
            - name: Not reached
              ansible.builtin.command: "true"
    """)

    outcome, events = workspace.run({"playbook": "breaks.yml"})

    finished = step_result(events)
    assert outcome.steps["play"] is StepState.FAILED
    assert finished.error == (
        "playbook breaks.yml: task 'Check the replica' failed on host backup-local: "
        "non-zero return code (rc 3): replica is 42 s behind"
    )
    assert [(t["task"], t["status"]) for t in task_events(events)] == [("Check the replica", "failed")]


@pytest.mark.timeout(120)
@pytest.mark.slow
def test_the_step_timeout_ends_a_long_playbook_promptly(workspace: Workspace, tmp_path: Path) -> None:
    marker = tmp_path / "sleeping"
    sleep = f"{37 + uuid.uuid4().int % 1000 / 1000:.3f}"  # a command line no other process has
    workspace.playbook("long.yml", f"""\
        - hosts: backup
          gather_facts: false
          tasks:
            - name: Sleep a long time
              ansible.builtin.shell: touch {marker} && exec sleep {sleep}
    """)

    started = time.monotonic()
    # Long enough for Ansible to reach the task on a busy machine (its start-up alone takes seconds there).
    outcome, events = workspace.run({"playbook": "long.yml"}, timeout="10s")
    elapsed = time.monotonic() - started

    assert outcome.steps["play"] is StepState.TIMED_OUT
    assert elapsed < 10 + 2.5
    assert marker.exists(), "the task never started: the timeout came during Ansible's start-up"
    error = step_result(events).error or ""
    assert "playbook long.yml was stopped after" in error and "during task 'Sleep a long time'" in error
    left = subprocess.run(["pgrep", "-f", f"sleep {sleep}"], capture_output=True, text=True)
    assert left.stdout == "", "the task's process outlived the cancelled playbook"


@pytest.mark.timeout(120)
@pytest.mark.slow
def test_stopping_the_run_ends_the_playbook_and_its_task(workspace: Workspace, tmp_path: Path) -> None:
    marker = tmp_path / "sleeping"
    sleep = f"{38 + uuid.uuid4().int % 1000 / 1000:.3f}"
    workspace.playbook("long.yml", f"""\
        - hosts: backup
          gather_facts: false
          tasks:
            - name: Sleep a long time
              ansible.builtin.shell: touch {marker} && exec sleep {sleep}
    """)
    stop = threading.Event()
    stopped_at: list[float] = []

    def stop_once_sleeping() -> None:
        end = time.monotonic() + 60
        while not marker.exists() and time.monotonic() < end:
            time.sleep(0.02)
        stopped_at.append(time.monotonic())
        stop.set()  # what Ctrl-C or `dr stop` does

    stopper = threading.Thread(target=stop_once_sleeping)
    stopper.start()
    try:
        outcome, events = workspace.run({"playbook": "long.yml"}, timeout="120s", stop=stop)
    finally:
        stop.set()
        stopper.join()
    ended = time.monotonic()

    assert marker.exists()
    assert outcome.state is RunState.ABORTED and outcome.steps["play"] is StepState.CANCELLED
    assert ended - stopped_at[0] < 2.5
    assert subprocess.run(["pgrep", "-f", f"sleep {sleep}"], capture_output=True).stdout == b""


@pytest.mark.timeout(120)
@pytest.mark.slow
def test_each_run_has_a_fresh_private_data_dir(workspace: Workspace, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "not-for-the-artifacts")
    workspace.playbook("show.yml", """\
        - hosts: backup
          gather_facts: false
          tasks:
            - name: Show the word
              ansible.builtin.debug: {msg: "word={{ word | default('unset') }}"}
    """)
    harness = Harness(load_inventory(str(workspace.inventory))[0],
                      {"runbook_path": str(workspace.root / "rb.yml"), "inventory_path": str(workspace.inventory)})
    action = AnsiblePlaybook()

    first = action.run(AnsiblePlaybookParams(playbook="show.yml", extra_vars={"word": "secret"}), harness.ctx(60))
    # Extra vars went through a file of the run's private dir (removed), not the command line.
    command = json.loads((Path(first.output["artifacts"]) / "command").read_text())
    second = action.run(AnsiblePlaybookParams(playbook="show.yml", keep_artifacts=1), harness.ctx(60))

    assert [t["msg"] for t in task_events(harness.events)] == ["word=secret", "word=unset"]
    # Each run's artifacts in a folder of its own, the older ones rotated away (keep_artifacts).
    assert list(Path(second.output["artifacts"]).parent.iterdir()) == [Path(second.output["artifacts"])]
    assert "secret" not in json.dumps(command["command"])
    # ansible-runner records the whole environment there; only the variables set for Ansible stay.
    assert "AWS_SECRET_ACCESS_KEY" not in command["env"] and "ANSIBLE_HOST_KEY_CHECKING" in command["env"]


@pytest.mark.timeout(120)
@pytest.mark.slow
def test_secret_vars_reach_the_playbook_and_nothing_recorded(
    workspace: Workspace, tmp_path: Path, evidence_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    secret = f"tok-{uuid.uuid4().hex}"
    monkeypatch.setenv("DR_TEST_ANSIBLE_TOKEN", secret)
    delivered = tmp_path / "delivered"
    workspace.playbook("secret.yml", f"""\
        - hosts: backup
          gather_facts: false
          tasks:
            - name: Use the token
              ansible.builtin.copy: {{content: "{{{{ token }}}}", dest: {delivered}}}
            - name: Show the token
              ansible.builtin.debug: {{msg: "token={{{{ token }}}}"}}
    """)

    outcome, events = workspace.run({"playbook": "secret.yml", "verbosity": 2,
                                     "secret_vars": {"token": "env:DR_TEST_ANSIBLE_TOKEN"}})

    assert outcome.state is RunState.SUCCEEDED, step_result(events).error
    assert delivered.read_text() == secret
    shown = task_events(events)[1]["msg"]
    assert shown.startswith("token=") and secret not in shown
    assert secret not in json.dumps([getattr(e, "__dict__", str(e)) for e in events], default=str)
    artifacts = Path(step_result(events).output["artifacts"])
    for path in artifacts.rglob("*"):
        if path.is_file():
            assert secret not in path.read_text(errors="replace"), path
    with pytest.raises(ValueError, match="by reference only"):
        AnsiblePlaybookParams(playbook="secret.yml", secret_vars={"token": secret})


@pytest.mark.timeout(120)
@pytest.mark.slow
def test_check_mode_changes_nothing(workspace: Workspace, tmp_path: Path) -> None:
    target = tmp_path / "would-be-created"
    workspace.playbook("touch.yml", f"""\
        - hosts: backup
          gather_facts: false
          tasks:
            - name: Create the flag file
              ansible.builtin.file: {{path: {target}, state: touch}}
    """)

    outcome, events = workspace.run({"playbook": "touch.yml", "check": True})

    assert outcome.state is RunState.SUCCEEDED, step_result(events).error
    assert [(t["task"], t["status"]) for t in task_events(events)] == [("Create the flag file", "changed")]
    assert step_result(events).output["check"] is True
    assert not target.exists()


@pytest.mark.timeout(120)
def test_a_play_that_matches_no_host_fails_the_step(workspace: Workspace) -> None:
    workspace.playbook("typo.yml", """\
        - hosts: bakcup
          gather_facts: false
          tasks:
            - ansible.builtin.command: "true"
    """)

    outcome, events = workspace.run({"playbook": "typo.yml"})

    assert outcome.steps["play"] is StepState.FAILED
    assert "playbook typo.yml ran on no host" in (step_result(events).error or "")


@pytest.mark.timeout(120)
def test_a_mistake_in_the_playbook_is_reported_with_where_it_is(workspace: Workspace) -> None:
    workspace.playbook("undefined.yml", """\
        - name: Start {{ service }}
          hosts: backup
          gather_facts: false
          tasks: []
    """)

    outcome, events = workspace.run({"playbook": "undefined.yml"})

    assert outcome.steps["play"] is StepState.FAILED
    error = step_result(events).error or ""
    assert re.match(r"playbook undefined\.yml ended failed \(ansible-playbook exit \d+\): ", error)
    assert "'service' is undefined" in error and "undefined.yml:1:" in error


def test_playbooks_outside_the_playbooks_folder_are_refused(workspace: Workspace, tmp_path: Path) -> None:
    outside = tmp_path / "outside.yml"
    outside.write_text("- hosts: all\n  tasks: []\n")
    (workspace.root / "playbooks" / "link.yml").symlink_to(outside)
    harness = Harness(load_inventory(str(workspace.inventory))[0],
                      {"runbook_path": str(workspace.root / "rb.yml"), "inventory_path": str(workspace.inventory)})

    with pytest.raises(ValueError, match="'..' is not allowed"):
        AnsiblePlaybookParams(playbook="../outside.yml")
    for playbook in (str(outside), "link.yml"):
        with pytest.raises(ActionError, match="is outside the playbooks folder"):
            AnsiblePlaybook().run(AnsiblePlaybookParams(playbook=playbook), harness.ctx())
    with pytest.raises(ActionError, match="playbook 'missing.yml' not found in"):
        AnsiblePlaybook().run(AnsiblePlaybookParams(playbook="missing.yml"), harness.ctx())


def test_artifacts_are_cut_to_size_and_keep_no_environment(tmp_path: Path) -> None:
    attempt = tmp_path / "attempt-1"
    (attempt / "job_events").mkdir(parents=True)
    (attempt / "stdout").write_text("PLAY [start]\n" + "x" * 20_000 + "\nPLAY RECAP end\n")
    for number, size in enumerate([100, 200, 9_000, 300]):
        (attempt / "job_events" / f"{number}-event.json").write_text("e" * size)
    (attempt / "command").write_text(json.dumps(
        {"command": ["ansible-playbook"], "env": {"PGPASSWORD": "hunter2", "ANSIBLE_NOCOLOR": "1"}}))

    bound_artifacts(attempt, 4096, {"ANSIBLE_NOCOLOR"})

    stdout = (attempt / "stdout").read_text()
    assert stdout.startswith("PLAY [start]") and stdout.endswith("PLAY RECAP end\n") and len(stdout) < 4200
    kept = sorted(p.name for p in (attempt / "job_events").iterdir())
    assert kept == ["0-event.json", "1-event.json", "3-event.json"]
    assert "1 largest job events removed" in (attempt / "job_events.truncated").read_text()
    assert json.loads((attempt / "command").read_text())["env"] == {"ANSIBLE_NOCOLOR": "1"}


@pytest.mark.parametrize("inventory", ["inventories/lab.yml", "inventories/local.yml"])
def test_the_inventories_are_ansible_inventories(inventory: str) -> None:
    listed = subprocess.run([str(VENV_BIN / "ansible-inventory"), "-i", inventory, "--list"], cwd=REPO,
                            capture_output=True, text=True, timeout=60)

    assert listed.returncode == 0, listed.stderr
    assert "WARNING" not in listed.stderr
    found = json.loads(listed.stdout)
    dr_inventory, _ = load_inventory(str(REPO / inventory))
    assert set(found["_meta"]["hostvars"]) == set(dr_inventory.hosts)
    for site in dr_inventory.sites:
        assert set(found[site]["hosts"]) == {h.name for h in dr_inventory.site_hosts(site)}


def test_the_repository_playbooks_pass_ansibles_syntax_check() -> None:
    playbooks = sorted(str(p) for p in (REPO / "runbooks" / "playbooks").glob("*.yml"))
    assert len(playbooks) >= 2

    checked = subprocess.run(
        [str(VENV_BIN / "ansible-playbook"), "--syntax-check", "-i", "inventories/lab.yml",
         "-e", "site=backup", "-e", "service=all", *playbooks],
        cwd=REPO, capture_output=True, text=True, timeout=60,
    )

    assert checked.returncode == 0, checked.stdout + checked.stderr


# --- over the lab's sshd ------------------------------------------------------------------------------


@pytest.fixture
def lab_workspace(lab: Lab, tmp_path: Path) -> Iterator[Workspace]:
    """A runbook folder whose playbooks/ are the repository's, with the running lab's inventory."""
    root = tmp_path / "runbooks"
    root.mkdir()
    (root / "playbooks").symlink_to(REPO / "runbooks" / "playbooks")
    yield Workspace(root, lab.config.inventory_path.read_text())


def health(lab: Lab, service: str, site: str) -> int | None:
    try:
        return httpx.get(lab.config.service_url(service, site) + "/health", timeout=2).status_code
    except httpx.HTTPError:
        return None


@pytest.mark.lab
@pytest.mark.timeout(180)
def test_start_service_starts_a_stopped_backup_service_over_ssh(lab: Lab, lab_workspace: Workspace) -> None:
    lab.kill_service("quotation", "backup")
    try:
        assert health(lab, "quotation", "backup") is None
        step = {"playbook": "start-service.yml", "extra_vars": {"site": "backup", "service": "quotation"}}

        outcome, events = lab_workspace.run(step)

        assert outcome.state is RunState.SUCCEEDED, step_result(events).error
        assert health(lab, "quotation", "backup") == 200
        assert [(t["host"], t["status"]) for t in task_events(events)] == [("backup-app", "changed")]
        assert step_result(events).output["stats"]["backup-app"]["changed"] == 1
        # Its SSH connection master (ControlPersist) did not outlive the run.
        command = json.loads((Path(step_result(events).output["artifacts"]) / "command").read_text())
        control_dir = command["env"]["ANSIBLE_SSH_CONTROL_PATH_DIR"]
        assert subprocess.run(["pgrep", "-f", control_dir], capture_output=True).stdout == b""

        again, events = lab_workspace.run(step)  # idempotent: already running, nothing changed

        assert again.state is RunState.SUCCEEDED, step_result(events).error
        assert [(t["host"], t["status"]) for t in task_events(events)] == [("backup-app", "ok")]
    finally:
        if health(lab, "quotation", "backup") is None:  # leave the shared lab as it was
            subprocess.run(["runuser", "-u", lab.config.os_user, "--", "/usr/bin/python3",
                            str(lab.config.servicectl("backup")), "start", "quotation"], check=True, timeout=30)


@pytest.mark.lab
@pytest.mark.timeout(180)
def test_a_host_whose_key_differs_from_the_pinned_one_is_refused(lab: Lab, lab_workspace: Workspace,
                                                                 tmp_path: Path) -> None:
    wrong = tmp_path / "known_hosts"
    # The primary site's key pinned for the backup's address: what a man in the middle would present.
    pins = lab.config.known_hosts.read_text().splitlines()
    primary_key = next(line for line in pins if line.startswith("[127.0.10.1]")).split(" ", 1)[1]
    wrong.write_text(f"[127.0.20.1]:{lab.config.sshd_port} {primary_key}\n")
    inventory = tmp_path / "wrong-pins.yml"
    inventory.write_text(lab.config.inventory_path.read_text().replace(str(lab.config.known_hosts), str(wrong)))
    assert str(wrong) in inventory.read_text()

    outcome, events = lab_workspace.run(
        {"playbook": "start-service.yml", "extra_vars": {"site": "backup", "service": "quotation"}},
        inventory=inventory,
    )

    error = step_result(events).error or ""
    assert outcome.steps["play"] is StepState.FAILED
    assert "task 'Start quotation unless it runs' could not reach host backup-app" in error
    assert "Host key verification failed" in error
    assert [t["status"] for t in task_events(events)] == ["unreachable"]


@pytest.mark.lab
@pytest.mark.timeout(180)
def test_rebuild_standby_says_which_database_to_name_when_the_inventory_describes_several(
    lab_workspace: Workspace,
) -> None:
    for extra, said in (({}, "say which database (database)"),
                        ({"database": "ledger"}, "database ledger is not in dr.vars.databases")):
        outcome, events = lab_workspace.run(
            {"playbook": "rebuild-standby.yml", "extra_vars": {"site": "backup", **extra}})

        error = step_result(events).error or ""
        assert outcome.steps["play"] is StepState.FAILED
        assert f"{said}: the inventory describes contract-signing, trading" in error, error
        assert [t["status"] for t in task_events(events) if t["status"] != "skipped"] == ["failed"]


@pytest.mark.lab
@pytest.mark.timeout(600)
def test_rebuild_standby_makes_the_old_primary_stream_from_the_new_one(
    lab_factory: Callable[..., AbstractContextManager[Lab]], tmp_path: Path
) -> None:
    with lab_factory() as lab:
        def query(site: str, sql: str) -> Any:
            return lab_query(lab, "trading", site, sql)

        workspace = Workspace(tmp_path / "runbooks", lab.config.inventory_path.read_text())
        (workspace.root / "playbooks").rmdir()
        (workspace.root / "playbooks").symlink_to(REPO / "runbooks" / "playbooks")
        # The primary site is lost, trading's backup promoted; then power comes back at the primary site.
        lab.kill_site("primary")
        assert query("backup", "SELECT pg_promote(true, 30)") is True
        lab.start_site("primary")
        step = {"playbook": "rebuild-standby.yml",
                "extra_vars": {"database": "trading", "site": "primary", "flush": False}}

        outcome, events = workspace.run(step, timeout="300s")

        assert outcome.state is RunState.SUCCEEDED, step_result(events).error
        done = {t["task"]: t["status"] for t in task_events(events)}
        assert done["Stop the server at primary if it runs"] == "changed"  # the crash's postmaster.pid
        assert done["Rewind from the new primary"] == "changed"
        assert done["Copy the new primary with pg_basebackup, pg_rewind having failed"] == "skipped"
        assert query("primary", "SELECT pg_is_in_recovery()") is True
        query("backup", "CREATE TABLE written_at_backup AS SELECT 42 AS answer")
        wait_for(lambda: query("primary", "SELECT to_regclass('written_at_backup') IS NOT NULL") is True,
                 20, "a write at the new primary to reach the rebuilt standby")
        # The configuration postgres.rebuild_standby writes (a test there checks its behaviour).
        auto_conf = (lab.config.pgdata("primary", "trading") / "postgresql.auto.conf").read_text().splitlines()
        assert auto_conf[-3:] == [
            f"primary_conninfo = 'host=127.0.20.1 port={lab.config.postgres_port('trading')} user=drlab "
            "application_name=primary'",
            "primary_slot_name = 'primary'",
            "synchronous_standby_names = ''",
        ]
        # The action takes the playbook's standby for one of its own, and the playbook does nothing again.
        harness = Harness(load_inventory(str(lab.config.inventory_path))[0])
        try:
            params = RebuildStandbyParams(database="trading", site="primary")
            by_action = RebuildStandby().run(params, harness.ctx(30)).output
        finally:
            harness.close()
        assert by_action["already_streaming"] is True

        again, events = workspace.run(step, timeout="120s")

        assert again.state is RunState.SUCCEEDED, step_result(events).error
        assert [t["status"] for t in task_events(events) if t["status"] != "skipped"] == ["ok"]
