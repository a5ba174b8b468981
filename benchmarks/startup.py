"""Figure 6: start-up of the `dr` command: `dr --help` and `dr validate` of a lab runbook, wall time and
peak memory (the child's maximum resident set size, from wait4's rusage)."""

from __future__ import annotations

import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from benchmarks.common import REPO, Figure

NAME = "startup"
TITLE = "6. start-up of the dr command"
DR = Path(sys.executable).with_name("dr")


def lab_inventory(directory: Path) -> Path:
    """The lab's inventory as `dr lab up` writes it (no lab needs to run to validate against it)."""
    from dr_orchestrator.lab.config import LabConfig
    from dr_orchestrator.lab.inventory import render

    path = directory / "lab.yml"
    path.write_text(render(LabConfig(root=directory, port_offset=0)))
    return path


def timed(argv: list[str]) -> tuple[float, float]:
    """Wall seconds and peak RSS in MiB of one run of ``argv``, which must succeed."""
    started = time.monotonic()
    process = subprocess.Popen(argv, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, cwd=REPO)
    _, status, usage = os.wait4(process.pid, 0)
    seconds = time.monotonic() - started
    if os.waitstatus_to_exitcode(status) != 0:
        said = process.stderr.read().decode()[-500:] if process.stderr else ""
        raise RuntimeError(f"{' '.join(argv)} failed: {said}")
    return seconds, usage.ru_maxrss / 1024


def best_of(argv: list[str], times: int) -> tuple[float, float]:
    runs = [timed(argv) for _ in range(times)]
    return min(r[0] for r in runs), max(r[1] for r in runs)


def measure(quick: bool) -> list[Figure]:
    times = 1 if quick else 5
    with tempfile.TemporaryDirectory(prefix="dr-bench-startup-") as tmp:
        inventory = lab_inventory(Path(tmp))
        commands = {
            "dr --help": [str(DR), "--help"],
            "dr validate runbooks/site-failover.yml (lab inventory)":
                [str(DR), "validate", "runbooks/site-failover.yml", "-i", str(inventory)],
        }
        figures = []
        for label, argv in commands.items():
            seconds, peak_mib = best_of(argv, times)
            figures.append(Figure(f"{label}: wall", seconds * 1000, "ms", note=f"best of {times}"))
            figures.append(Figure(f"{label}: peak RSS", peak_mib, "MiB"))
    return figures
