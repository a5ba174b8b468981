"""Figure 7: `dr validate` and `dr plan` of a 20,000-step runbook, wall time and peak memory (maximum
resident set size, from /usr/bin/time), as a chain (each step needs the one before) and as a wide
fan-out (every step needs the first). Every step reads a template naming the step it needs, so the
checks of needs, ancestors and templates all work at full size. And `hosts`: 20,000 ssh.run steps,
each on its own host of an inventory of 20,000 hosts (each step's check of its hosts must not cost
the whole inventory).

    .venv/bin/python -m benchmarks.validate_scale 20000 chain /tmp/chain.yml   # just write one
"""

from __future__ import annotations

import resource
import sys
import tempfile
from pathlib import Path

from benchmarks.common import Figure
from benchmarks.startup import DR, lab_inventory, timed

NAME = "validate-scale"
TITLE = "7. validating a 20,000-step runbook"
STEPS = 20_000
TARGET_S = 10.0
TARGET_MIB = 300.0
SHAPES = ("chain", "fan-out", "hosts")


def write_runbook(path: Path, steps: int, shape: str) -> Path:
    """A runbook of ``steps`` http.check steps shaped as a ``chain`` or a ``fan-out``, or of ssh.run
    steps on hosts h0, h1, ... (``hosts``), one line each (20,000 of them stay under the 2 MiB a
    runbook may take)."""
    lines = [f"name: scale-{shape}", "kind: rehearsal", "scope: {services: [quotation]}", "steps:"]
    if shape == "hosts":
        lines += [f"  - {{id: s{n}, action: ssh.run, needs: [], with: {{hosts: [h{n}], argv: [uptime]}}}}"
                  for n in range(steps)]
        path.write_text("\n".join(lines) + "\n")
        return path
    lines.append("  - {id: s0, action: http.check, needs: [], with: {url: \"http://h/\"}}")
    for number in range(1, steps):
        needed = f"s{number - 1}" if shape == "chain" else "s0"
        lines.append(f"  - {{id: s{number}, action: http.check, needs: [{needed}],"
                     f" with: {{url: \"http://h/{{{{ steps.{needed}.output }}}}\"}}}}")
    path.write_text("\n".join(lines) + "\n")
    return path


def with_hosts(inventory: Path, hosts: int) -> Path:
    """A copy of the lab inventory with ``hosts`` more hosts (h0, h1, ...) at the primary site."""
    text = inventory.read_text()
    at = text.index("    primary:\n      hosts:\n") + len("    primary:\n      hosts:\n")
    bigger = inventory.with_name(f"lab-{hosts}-hosts.yml")
    bigger.write_text(text[:at] + "".join(f"        h{n}: {{ansible_host: 127.0.10.1}}\n" for n in range(hosts))
                      + text[at:])
    return bigger


def measure(quick: bool) -> list[Figure]:
    steps = 2_000 if quick else STEPS
    figures = []
    with tempfile.TemporaryDirectory(prefix="dr-bench-validate-") as tmp:
        lab = lab_inventory(Path(tmp))
        for shape in SHAPES:
            inventory = with_hosts(lab, steps) if shape == "hosts" else lab
            runbook = write_runbook(Path(tmp) / f"{shape}.yml", steps, shape)
            for command in ("validate", "plan"):
                before = resource.getrusage(resource.RUSAGE_CHILDREN)
                seconds, peak_mib = timed([str(DR), command, str(runbook), "-i", str(inventory), "-o", "json"])
                after = resource.getrusage(resource.RUSAGE_CHILDREN)
                cpu = after.ru_utime + after.ru_stime - before.ru_utime - before.ru_stime
                label = f"dr {command}, {steps:,} steps, {shape}"
                # The CPU time too: on a busy machine the wall time is a multiple of it.
                figures.append(Figure(f"{label}: wall", seconds, "s", TARGET_S, note=f"{cpu:.1f} s of CPU"))
                figures.append(Figure(f"{label}: peak RSS", peak_mib, "MiB", TARGET_MIB))
    return figures


if __name__ == "__main__":
    write_runbook(Path(sys.argv[3]), int(sys.argv[1]), sys.argv[2])
