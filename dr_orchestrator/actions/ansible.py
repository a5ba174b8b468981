"""``ansible.playbook``: run an Ansible playbook through ansible-runner, its task events streamed as evidence.

Where things are:

- Playbooks: ``playbook`` is a path inside the ``playbooks/`` folder beside the run's runbook file
  (``runbooks/playbooks/`` for the runbooks of this repository); without a runbook file (a step run
  outside the engine), ``runbooks/playbooks/`` under the working directory. Paths leaving it are refused.
- Inventory: by default the run's own inventory file (it is a valid Ansible inventory).
- Artifacts (ansible-runner's ``stdout``, ``job_events``, ``rc``, ``status``, ``command``):
  ``$DR_EVIDENCE_DIR/<run id>/ansible/<step id>/<attempt>/``, ``DR_EVIDENCE_DIR`` defaulting to
  ``evidence`` under the working directory. Bounded: the newest ``keep_artifacts`` attempts per step,
  ``stdout`` and ``job_events`` each cut to ``max_artifact_bytes``, and the orchestrator's environment
  (which ansible-runner writes into ``command``) reduced to the variables set here.

Every run gets a fresh private data directory, removed afterwards: ansible-runner writes files under
``env/`` only when they are absent, so one run's variables would leak into the next (ansible-runner#808).
Extra vars go to Ansible in a file there (mode 600), never on the command line.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import ansible_runner
from ansible_runner.exceptions import AnsibleRunnerException
from pydantic import Field, field_validator

from dr_orchestrator.actions.base import Action, ActionCancelled, ActionContext, ActionError, ActionResult, Params
from dr_orchestrator.actions.shell import BoundedOutput, last_line
from dr_orchestrator.model.durations import format_duration
from dr_orchestrator.secrets import is_reference

PLAYBOOKS_FOLDER = "playbooks"
DEFAULT_PLAYBOOKS_DIR = os.path.join("runbooks", PLAYBOOKS_FOLDER)
EVIDENCE_DIR_ENV = "DR_EVIDENCE_DIR"
# How often ansible-runner looks at cancellation and the deadline (its default, 5 s, would make
# the step's timeout late by as much).
RUNNER_SETTINGS = {"pexpect_timeout": 0.2}
MESSAGE_LIMIT = 500  # characters of a task's message kept in an event and in an error

TASK_EVENTS = {
    "runner_on_ok": "ok",
    "runner_on_failed": "failed",
    "runner_on_unreachable": "unreachable",
    "runner_on_skipped": "skipped",
}
# Set in ansible-playbook's environment and inherited by everything it starts: Ansible's workers
# leave its process group (setsid), so only this finds them (and SSH ControlPersist masters) to stop.
RUN_MARKER = "DR_ANSIBLE_RUN"
KILL_WAIT_S = 1.0
CANCELLED = "the run is stopping or the step was cancelled"
TIMED_OUT = "the step's timeout passed"


class AnsiblePlaybookParams(Params):
    playbook: str = Field(min_length=1, description="Playbook file, relative to the runbook's playbooks/ folder.")
    inventory: str | None = Field(
        default=None, description="Ansible inventory file (default: the run's inventory, itself an Ansible inventory)."
    )
    limit: str | None = Field(default=None, min_length=1, description="Ansible host pattern limiting the hosts.")
    extra_vars: dict[str, Any] = Field(default_factory=dict, description="Variables for the playbook (-e).")
    secret_vars: dict[str, str] = Field(
        default_factory=dict,
        description="More variables, each an env:NAME / file:PATH reference, resolved just before the playbook "
        "runs and masked in everything recorded (Ansible's output and artifacts included).",
        json_schema_extra={"secret": True},
    )
    tags: list[str] = Field(default_factory=list, description="Run only tasks with these tags.")
    skip_tags: list[str] = Field(default_factory=list, description="Skip tasks with these tags.")
    forks: int = Field(default=5, ge=1, le=200, description="Hosts Ansible works on at the same time.")
    check: bool = Field(default=False, description="Ansible's check mode (also whenever the run is a dry run).")
    verbosity: int = Field(default=0, ge=0, le=4, description="Ansible's -v count, in the artifacts' stdout.")
    allow_no_hosts: bool = Field(
        default=False, description="Succeed when the plays match no host (by default that fails: a typo in a group)."
    )
    max_output: int = Field(default=16 * 1024, ge=256, description="Bytes of Ansible's output kept in the step output.")
    keep_artifacts: int = Field(default=5, ge=1, le=100, description="Attempts' artifacts kept per step (newest).")
    max_artifact_bytes: int = Field(
        default=4 * 1024 * 1024, ge=4096, description="Bytes kept of each attempt's stdout, and of its job events."
    )

    @field_validator("playbook")
    @classmethod
    def _inside_playbooks(cls, value: str) -> str:
        if not os.path.isabs(value) and ".." in Path(value).parts:
            raise ValueError("the playbook must be inside the playbooks/ folder: '..' is not allowed")
        return value

    @field_validator("secret_vars")
    @classmethod
    def _references_only(cls, value: dict[str, str]) -> dict[str, str]:
        for name, reference in value.items():
            if not is_reference(reference):
                raise ValueError(f"secret_vars.{name}: secrets are given by reference only: env:NAME or file:/path")
        return value

    @field_validator("tags", "skip_tags")
    @classmethod
    def _plain_tags(cls, value: list[str]) -> list[str]:
        for tag in value:
            if not tag or "," in tag:
                raise ValueError(f"tag {tag!r} is empty or has a comma: give one tag per list item")
        return value


@dataclass
class _Watch:
    """What the event handler saw, as it happened."""

    ctx: ActionContext
    current_task: str | None = None
    failures: list[dict[str, Any]] = field(default_factory=list)
    unreachable: list[dict[str, Any]] = field(default_factory=list)
    tasks: int = 0

    def __call__(self, event: dict[str, Any]) -> bool:
        kind = event.get("event")
        data = event.get("event_data") or {}
        if kind == "playbook_on_task_start":
            self.current_task = data.get("task")
        status = TASK_EVENTS.get(str(kind))
        if status is None:
            return True
        res: dict[str, Any] = data["res"] if isinstance(data.get("res"), dict) else {}
        changed = bool(res.get("changed"))
        if status == "ok" and changed:
            status = "changed"
        ignored = status == "failed" and bool(data.get("ignore_errors"))
        record = {
            "task": data.get("task"),
            "host": data.get("host"),
            "status": status,
            "duration_s": _seconds(data.get("duration")),
            "changed": changed,
            "msg": self.ctx.redact(_message(res)),
        }
        if data.get("play"):
            record["play"] = data["play"]
        if data.get("task_action"):
            record["action"] = data["task_action"]
        if ignored:
            record["ignored"] = True
        self.tasks += 1
        self.ctx.report("ansible.task", **record)
        if status == "failed" and not ignored:
            self.failures.append(record)
        elif status == "unreachable":
            self.unreachable.append(record)
        return True


def _seconds(value: Any) -> float | None:
    return round(float(value), 6) if isinstance(value, int | float) else None


def _message(res: dict[str, Any]) -> str:
    """One line on what a task did or why it failed: its msg, exit code and last line of stderr."""
    text = str(res.get("msg") or res.get("skip_reason") or "").strip()
    rc = res.get("rc")
    if isinstance(rc, int) and rc != 0:
        text = f"{text} (rc {rc})".strip()
    tail = last_line(str(res.get("stderr") or "")) or (last_line(str(res.get("stdout") or "")) if rc else "")
    if tail and tail not in text:
        text = f"{text}: {tail}" if text else tail
    text = " ".join(text.split())  # SSH's multi-line warnings on one line
    if len(text) <= MESSAGE_LIMIT:
        return text
    half = MESSAGE_LIMIT // 2  # the end often says why ("Host key verification failed.")
    return f"{text[:half]} ... {text[-half:]}"


def playbooks_dir(ctx: ActionContext) -> Path:
    runbook = ctx.run_info.get("runbook_path")
    if runbook:
        return Path(os.path.abspath(runbook)).parent / PLAYBOOKS_FOLDER
    return Path(os.path.abspath(DEFAULT_PLAYBOOKS_DIR))


def resolve_playbook(ctx: ActionContext, playbook: str) -> tuple[Path, str]:
    """The playbook's real path, and its name relative to the playbooks folder; refuses escapes."""
    base = playbooks_dir(ctx).resolve()
    path = (base / playbook).resolve()
    if not path.is_relative_to(base):
        raise ActionError(f"playbook {playbook!r} is outside the playbooks folder {base}")
    if not path.is_file():
        raise ActionError(f"playbook {playbook!r} not found in {base}")
    return path, str(path.relative_to(base))


def resolve_inventory(ctx: ActionContext, given: str | None) -> str:
    inventory = given or ctx.run_info.get("inventory_path")
    if not inventory:
        raise ActionError("no inventory for the playbook: give `inventory`, or run the step within a run")
    if not os.path.isfile(inventory):
        raise ActionError(f"inventory file {inventory} does not exist")
    return os.path.abspath(inventory)


def artifacts_dir(ctx: ActionContext) -> Path:
    base = os.environ.get(EVIDENCE_DIR_ENV) or os.path.join(os.getcwd(), "evidence")
    return Path(base, _safe(ctx.run_id), "ansible", _safe(ctx.step_id))


def _safe(name: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.-]", "_", name) or "_"


def ansible_environment(private_dir: Path, marker: str) -> dict[str, str]:
    """Variables for ansible-playbook: the venv's tools first on PATH, strict host keys, no colours,
    and SSH connection sharing private to this run (a master shared across runs would skip the host
    key check of later connections)."""
    venv_bin = os.path.dirname(sys.executable)
    return {
        "PATH": os.pathsep.join([venv_bin, os.environ.get("PATH", os.defpath)]),
        "ANSIBLE_HOST_KEY_CHECKING": "True",
        "ANSIBLE_NOCOLOR": "1",
        "ANSIBLE_RETRY_FILES_ENABLED": "False",
        "ANSIBLE_PIPELINING": "True",
        "ANSIBLE_LOCAL_TEMP": str(private_dir / "tmp"),
        "ANSIBLE_SSH_CONTROL_PATH_DIR": str(private_dir / "cp"),
        RUN_MARKER: marker,
    }


class AnsiblePlaybook(Action[AnsiblePlaybookParams]):
    """Runs a playbook; a failed or unreachable host fails the step (naming host, task and message),
    the step's timeout or a stop ends the playbook within a fraction of a second."""

    name = "ansible.playbook"
    Params = AnsiblePlaybookParams

    def run(self, params: AnsiblePlaybookParams, ctx: ActionContext) -> ActionResult:
        playbook, shown = resolve_playbook(ctx, params.playbook)
        inventory = resolve_inventory(ctx, params.inventory)
        binary = os.path.join(os.path.dirname(sys.executable), "ansible-playbook")
        if not os.access(binary, os.X_OK):
            raise ActionError(f"{binary} does not exist: install ansible-core into the orchestrator's venv")
        check = params.check or ctx.check_mode
        ctx.check_cancelled()

        artifacts = artifacts_dir(ctx)
        artifacts.mkdir(mode=0o700, parents=True, exist_ok=True)
        # Unique: a rollback's attempts share the step's folder with the forward ones.
        ident = f"attempt-{ctx.attempt}-{time.strftime('%Y%m%dT%H%M%SZ', time.gmtime())}-{uuid.uuid4().hex[:8]}"
        watch = _Watch(ctx)
        stop: list[str] = []

        private_dir = Path(tempfile.mkdtemp(prefix="dr-ansible-"))
        marker = f"{private_dir.name}-{ident}"
        environment = ansible_environment(private_dir, marker)

        def cancel_callback() -> bool:
            if not stop:
                # The deadline first: at the timeout the engine also sets `cancelled`.
                if time.monotonic() >= ctx.deadline:
                    stop.append(TIMED_OUT)
                elif ctx.cancelled.is_set():
                    stop.append(CANCELLED)
                if stop:  # ansible-runner then kills ansible-playbook's group; its workers left it
                    kill_marked(marker)
            return bool(stop)

        started = time.monotonic()
        try:
            # Settings given only as an argument are dropped when env/settings is absent (ansible-runner 2.4).
            _write_private(private_dir / "env" / "settings", json.dumps(RUNNER_SETTINGS))
            variables = {**params.extra_vars, **params.secret_vars}  # by now the engine resolved the references
            if variables:
                _write_private(private_dir / "env" / "extravars", json.dumps(variables))
            runner = ansible_runner.run(
                private_data_dir=str(private_dir),
                artifact_dir=str(artifacts),
                ident=ident,
                rotate_artifacts=params.keep_artifacts,
                playbook=str(playbook),
                inventory=inventory,
                limit=params.limit,
                forks=params.forks,
                verbosity=params.verbosity or None,
                tags=",".join(params.tags) or None,
                skip_tags=",".join(params.skip_tags) or None,
                cmdline="--check" if check else None,
                envvars=environment,
                suppress_env_files=True,
                quiet=True,
                event_handler=watch,
                cancel_callback=cancel_callback,
            )
            duration = time.monotonic() - started
        except AnsibleRunnerException as exc:
            raise ActionError(f"playbook {shown} could not be started: {exc}") from None
        finally:
            close_ssh_masters(private_dir / "cp")
            kill_marked(marker)  # whatever a cancel left behind
            shutil.rmtree(private_dir, ignore_errors=True)
            attempt_dir = artifacts / ident
            if attempt_dir.is_dir():
                bound_artifacts(attempt_dir, params.max_artifact_bytes, set(environment), ctx.redact)

        attempt_dir = artifacts / ident
        stdout = _stdout(attempt_dir, params.max_output)
        output: dict[str, Any] = {
            "playbook": shown,
            "inventory": inventory,
            "limit": params.limit,
            "check": check,
            "status": runner.status,
            "rc": runner.rc,
            "stats": per_host(runner.stats or {}),
            "changed": any((runner.stats or {}).get("changed", {}).values()),
            "tasks": watch.tasks,
            "duration_s": round(duration, 6),
            "artifacts": str(attempt_dir),
            "stdout": ctx.redact(stdout.text()),
            "stdout_truncated": stdout.truncated,
        }
        where = f"playbook {shown}"
        if stop:
            during = f" during task {watch.current_task!r}" if watch.current_task else ""
            message = f"{where} was stopped after {format_duration(duration)}{during}: {stop[0]}"
            # At the timeout the engine marks the step timed out and keeps this message as the detail.
            raise ActionCancelled(message) if stop[0] == CANCELLED else ActionError(message)
        if watch.failures:
            raise ActionError(f"{where}: {_failure(watch.failures[0], 'failed')}{_more(watch.failures)}")
        if watch.unreachable:
            raise ActionError(f"{where}: {_failure(watch.unreachable[0], 'could not reach')}{_more(watch.unreachable)}")
        if runner.status != "successful":
            why = ansible_error(output["stdout"]) or last_line(output["stdout"]) or "no output"
            raise ActionError(f"{where} ended {runner.status} (ansible-playbook exit {runner.rc}): {why}")
        if not output["stats"] and not params.allow_no_hosts:
            limit = f" and limit {params.limit!r}" if params.limit else ""
            raise ActionError(
                f"{where} ran on no host: its plays' host patterns{limit} match none in {inventory} "
                "(set allow_no_hosts if that is expected)"
            )
        return ActionResult(output=output)

    def hosts(self, params: AnsiblePlaybookParams) -> list[str]:
        if params.limit:
            return [part for part in re.split(r"[,:]", params.limit) if part]
        return [f"hosts of {params.playbook}"]


def ansible_error(stdout: str) -> str | None:
    """Ansible's own error (a YAML or template mistake, before any task), with where it points."""
    lines = stdout.splitlines()
    for number, line in enumerate(lines):
        for prefix in ("[ERROR]:", "ERROR!"):  # ansible-core 2.19, and earlier
            if line.startswith(prefix):
                error = line[len(prefix):].strip()
                origin = next((o for o in lines[number + 1 : number + 3] if o.startswith("Origin:")), None)
                return f"{error} ({origin.removeprefix('Origin:').strip()})" if origin else error
    return None


def _failure(record: dict[str, Any], verb: str) -> str:
    detail = f": {record['msg']}" if record.get("msg") else ""
    if verb == "failed":
        return f"task {record['task']!r} failed on host {record['host']}{detail}"
    return f"task {record['task']!r} could not reach host {record['host']}{detail}"


def _more(records: list[dict[str, Any]]) -> str:
    others = sorted({f"{r['host']}" for r in records[1:]} - {records[0]["host"]})
    return f" (also failed on {', '.join(others)})" if others else ""


_COUNTER_NAMES = {"dark": "unreachable"}


def per_host(stats: dict[str, dict[str, int]]) -> dict[str, dict[str, int]]:
    """ansible-runner's {counter: {host: n}} as {host: {counter: n}}, every host of the play included."""
    counters = ("ok", "changed", "failures", "dark", "skipped", "ignored", "rescued")
    hosts = sorted({host for name in (*counters, "processed") for host in (stats.get(name) or {})})
    return {
        host: {_COUNTER_NAMES.get(name, name): int((stats.get(name) or {}).get(host, 0)) for name in counters}
        for host in hosts
    }


def marked_processes(marker: str) -> set[int]:
    """Processes whose environment holds ``RUN_MARKER=marker`` (Linux /proc; ours are readable)."""
    needle = f"{RUN_MARKER}={marker}".encode()
    found: set[int] = set()
    for entry in os.scandir("/proc"):
        if not entry.name.isdigit() or int(entry.name) == os.getpid():
            continue
        try:
            with open(f"/proc/{entry.name}/environ", "rb") as handle:
                if needle in handle.read().split(b"\0"):
                    found.add(int(entry.name))
        except OSError:
            continue  # gone, or another user's
    return found


def kill_marked(marker: str) -> None:
    """SIGKILL every process of one playbook run, again until none is left (they may fork meanwhile)."""
    end = time.monotonic() + KILL_WAIT_S
    while (pids := marked_processes(marker)) and time.monotonic() < end:
        for pid in pids:
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        time.sleep(0.01)


def close_ssh_masters(control_dir: Path) -> None:
    """Stop the run's SSH connection masters (ControlPersist keeps them 60 s otherwise). They rewrite
    their environment with their process title, so the run's marker does not find them."""
    for control in control_dir.glob("*"):
        if control.is_socket():
            try:
                subprocess.run(
                    ["ssh", "-o", f"ControlPath={control}", "-O", "exit", "dr-orchestrator"],
                    stdin=subprocess.DEVNULL, capture_output=True, timeout=5, check=False,
                )
            except (OSError, subprocess.TimeoutExpired):
                pass  # best effort: an idle master exits on its own after ControlPersist


def _write_private(path: Path, text: str) -> None:
    path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
    descriptor = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(descriptor, "w") as handle:
        handle.write(text)


def _stdout(attempt_dir: Path, limit: int) -> BoundedOutput:
    kept = BoundedOutput(limit)
    try:
        with (attempt_dir / "stdout").open("rb") as handle:
            while chunk := handle.read(65536):
                kept.add(chunk)
    except OSError:
        pass
    return kept


def bound_artifacts(
    attempt_dir: Path, limit: int, own_variables: set[str], redact: Callable[[str], str] = lambda text: text
) -> None:
    """Cut one attempt's artifacts to size, mask the run's secrets in them, and drop the orchestrator's
    environment from ``command``."""
    stdout = attempt_dir / "stdout"
    if stdout.is_file():
        stdout.write_text(redact(_stdout(attempt_dir, limit).text()), encoding="utf-8")
    events = sorted((attempt_dir / "job_events").glob("*.json"), key=lambda p: p.stat().st_size)
    total = sum(p.stat().st_size for p in events)
    dropped = 0
    while events and total > limit:  # the largest go first: most are small, a few hold huge outputs
        biggest = events.pop()
        total -= biggest.stat().st_size
        biggest.unlink()
        dropped += 1
    for event in events:
        text = event.read_text(encoding="utf-8", errors="replace")
        if (masked := redact(text)) != text:
            event.write_text(masked, encoding="utf-8")
    if dropped:
        (attempt_dir / "job_events.truncated").write_text(
            f"{dropped} largest job events removed to keep job_events under {limit} bytes; "
            "every task's result is in the evidence store (ansible.task events)\n"
        )
    command = attempt_dir / "command"
    try:
        recorded = json.loads(command.read_text())
        environment = recorded.get("env") or {}
        recorded["env"] = {name: value for name, value in environment.items() if name in own_variables}
        command.write_text(json.dumps(recorded))
    except (OSError, ValueError, AttributeError):
        command.unlink(missing_ok=True)  # whatever it holds, it must not keep the orchestrator's secrets
