"""What the benchmark modules share: a figure line, a throwaway PostgreSQL, a lab slot, the clock.

Each module under benchmarks/ exposes ``NAME``, ``TITLE`` and ``measure(quick) -> list[Figure]``;
``run.py`` runs them and prints every figure beside its target.
"""

from __future__ import annotations

import contextlib
import shutil
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from dr_orchestrator.lab import scratch
from dr_orchestrator.lab.lab import Lab

REPO = Path(__file__).resolve().parent.parent


@dataclass
class Figure:
    """One measured number; ``target`` is a bound it should stay under (or over, ``at_least``)."""

    label: str
    value: float
    unit: str
    target: float | None = None
    at_least: bool = False
    note: str = ""

    @property
    def met(self) -> bool | None:
        if self.target is None:
            return None
        return self.value >= self.target if self.at_least else self.value <= self.target

    def line(self) -> str:
        text = f"  {self.label:<58} {self.value:>10.3f} {self.unit:<8}"
        if self.target is not None:
            sign = ">=" if self.at_least else "<="
            ratio = self.value / self.target if self.target else float("inf")
            verdict = "met" if self.met else "MISSED"
            text += f" target {sign} {self.target:g} {self.unit} (x{ratio:.2f} of target, {verdict})"
        if self.note:
            text += f"  [{self.note}]"
        return text


def postgres_server() -> contextlib.AbstractContextManager[str]:
    """$DR_TEST_POSTGRES_URL, or a throwaway cluster (fsync on, as in production) stopped afterwards."""
    return scratch.postgres_server(prefix="dr-bench-pg-")


def postgres_database(server_url: str) -> contextlib.AbstractContextManager[str]:
    """A fresh database on ``server_url``, dropped afterwards."""
    return scratch.postgres_database(server_url, prefix="dr_bench_")


@contextlib.contextmanager
def sqlite_database() -> Iterator[str]:
    work = Path(tempfile.mkdtemp(prefix="dr-bench-sqlite-"))
    try:
        yield f"sqlite:///{work / 'evidence.db'}"
    finally:
        shutil.rmtree(work, ignore_errors=True)


def running_lab() -> contextlib.AbstractContextManager[Lab]:
    """A lab of the benchmark's own (claimed port offset, as the tests' labs), always taken down after."""
    return scratch.running_lab("bench")


class Stopwatch:
    """``with Stopwatch() as sw: ...`` then ``sw.seconds`` (time.monotonic)."""

    def __enter__(self) -> Stopwatch:
        self.started = time.monotonic()
        self.seconds = 0.0
        return self

    def __exit__(self, *_: object) -> None:
        self.seconds = time.monotonic() - self.started
