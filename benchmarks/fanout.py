"""Figure 4: fan-out. One command over SSH to 200 inventory host entries (all pointing at the lab's
sshd, which stands in for 200 hosts) with bounded parallelism: the ssh.run action through the engine,
against Ansible's ad-hoc run of the same command on the same inventory, with the same forks."""

from __future__ import annotations

import copy
import os
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import yaml

from benchmarks.common import Figure, running_lab

NAME = "fanout"
TITLE = "4. fan-out: one command to 200 hosts, ssh.run vs ansible ad-hoc"
TARGET_RATIO = 10.0
PARALLEL = 20
COMMAND = "echo fanout; id -un"
FLEET = "fleet-*"  # an Ansible host pattern


def fleet_inventory(lab: Any, hosts: int, path: Path) -> list[str]:
    """The lab's inventory plus ``hosts`` entries named fleet-NNN at the primary site."""
    from dr_orchestrator.lab.inventory import inventory

    data = inventory(lab.config)
    primary = data["all"]["children"]["primary"]
    template = next(iter(primary["hosts"].values()))
    names = [f"fleet-{index:03d}" for index in range(hosts)]
    # Deep copies: PyYAML would write shared lists as anchors, which our loader refuses.
    primary["hosts"].update({name: copy.deepcopy(template) for name in names})
    path.write_text(yaml.safe_dump(data, sort_keys=False))
    return names


def with_ssh_run(inventory: Path, names: list[str], work: Path) -> tuple[float, dict[str, tuple[int, str]]]:
    from dr_orchestrator.actions import default_registry
    from dr_orchestrator.engine import Engine
    from dr_orchestrator.model.events import Event, StepFinished
    from dr_orchestrator.plans import build_plan

    runbook = work / "fanout.yml"
    runbook.write_text(yaml.safe_dump({
        "name": "bench-fanout", "kind": "rehearsal", "scope": {"services": ["trading"], "sites": ["primary"]},
        "steps": [{"id": "fan-out", "action": "ssh.run", "timeout": "300s",
                   "with": {"hosts": names, "command": COMMAND, "max_parallel": PARALLEL}}],
    }, sort_keys=False))
    plan = build_plan(str(runbook), str(inventory), kind="rehearsal")
    finished: list[StepFinished] = []

    def collect(event: Event) -> None:
        if isinstance(event, StepFinished):
            finished.append(event)

    engine = Engine(default_registry(), [collect])
    started = time.monotonic()
    outcome = engine.run(plan)
    seconds = time.monotonic() - started
    if outcome.state.value != "succeeded":
        raise RuntimeError(f"the ssh.run fan-out ended {outcome.state.value}: {finished[-1].error if finished else ''}")
    hosts = finished[-1].output["hosts"]
    return seconds, {name: (r["exit_status"], r["stdout"].strip()) for name, r in hosts.items()}


def with_ansible(inventory: Path) -> tuple[float, dict[str, tuple[int, str]]]:
    ansible = Path(sys.executable).with_name("ansible")
    env = {**os.environ, "ANSIBLE_HOST_KEY_CHECKING": "True", "ANSIBLE_NOCOLOR": "1",
           "PATH": f"{ansible.parent}:{os.environ.get('PATH', '')}"}
    started = time.monotonic()
    result = subprocess.run([str(ansible), FLEET, "-i", str(inventory), "-m", "command", "-a", COMMAND.replace(
        ";", " &&").join(["sh -c '", "'"]), "-f", str(PARALLEL), "-o"], capture_output=True, text=True, env=env)
    seconds = time.monotonic() - started
    # One line per host: "NAME | CHANGED | rc=0 | (stdout) fanout\npostgres"
    found: dict[str, tuple[int, str]] = {}
    for line in result.stdout.splitlines():
        match = re.match(r"^(\S+) \| \w+ \| rc=(\d+) \| \(stdout\) (.*)$", line)
        if match:
            found[match.group(1)] = (int(match.group(2)), match.group(3).replace("\\n", "\n").strip())
    if not found:
        raise RuntimeError(f"ansible answered nothing usable (rc {result.returncode}): {result.stdout[-300:]}"
                           f"{result.stderr[-500:]}")
    return seconds, found


def measure(quick: bool) -> list[Figure]:
    hosts = 10 if quick else 200
    with running_lab() as lab, tempfile.TemporaryDirectory(prefix="dr-bench-fanout-") as tmp:
        work = Path(tmp)
        inventory = work / "fleet.yml"
        names = fleet_inventory(lab, hosts, inventory)
        ours_s, ours = with_ssh_run(inventory, names, work)
        theirs_s, theirs = with_ansible(inventory)
    same = ours == theirs
    if not same:
        differing = sorted(name for name in set(ours) | set(theirs) if ours.get(name) != theirs.get(name))
        raise RuntimeError(f"different results on {len(differing)} hosts, e.g. {differing[:3]}: "
                           f"{[ours.get(n) for n in differing[:1]]} vs {[theirs.get(n) for n in differing[:1]]}")
    detail = f"{hosts} hosts, {PARALLEL} at a time, same exit codes and output on every host"
    return [
        Figure(f"ssh.run through the engine, {hosts} hosts", ours_s, "s", note=detail),
        Figure(f"ansible ad-hoc (-m command -f {PARALLEL}), {hosts} hosts", theirs_s, "s"),
        Figure("speed-up (ansible / ssh.run)", theirs_s / ours_s, "x", TARGET_RATIO, at_least=True),
    ]
