"""Figure 6: start-up of the `dr` command: `dr --help` and `dr validate` of a lab runbook, wall time and
peak memory (maximum resident set size, from /usr/bin/time)."""

from __future__ import annotations

import subprocess
import sys
import tempfile
import time
from pathlib import Path

from benchmarks.common import REPO, Figure

NAME = "startup"
TITLE = "6. start-up of the dr command"
DR = Path(sys.executable).with_name("dr")
TIME = "/usr/bin/time"  # Debian package time


def lab_inventory(directory: Path) -> Path:
    """The lab's inventory as `dr lab up` writes it (no lab needs to run to validate against it)."""
    from dr_orchestrator.lab.config import LabConfig
    from dr_orchestrator.lab.inventory import render

    path = directory / "lab.yml"
    path.write_text(render(LabConfig(root=directory, port_offset=0)))
    return path


def timed(argv: list[str]) -> tuple[float, float]:
    """Wall seconds and peak RSS in MiB of one run of ``argv``, which must succeed. The RSS comes from
    /usr/bin/time: Linux keeps a process's high-water mark across fork and exec, so a child of this
    (large) process would report our own peak."""
    with tempfile.NamedTemporaryFile(prefix="dr-bench-rss-") as report:
        started = time.monotonic()
        result = subprocess.run([TIME, "-f", "%M", "-o", report.name, *argv], stdout=subprocess.DEVNULL,
                                stderr=subprocess.PIPE, cwd=REPO)
        seconds = time.monotonic() - started
        if result.returncode != 0:
            raise RuntimeError(f"{' '.join(argv)} failed: {result.stderr.decode()[-500:]}")
        peak_kib = int(Path(report.name).read_text().split()[-1])
    return seconds, peak_kib / 1024


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
