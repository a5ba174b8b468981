"""A pause point for crash tests, set by environment: ``DR_TEST_PAUSE_AT=STEP:PHASE`` makes ``dr run``
and ``dr resume`` stop there, write ``$DR_TEST_PAUSE_DIR/paused`` and wait for the test (which kills
the process, or writes ``release`` to let it go on). Without the variable nothing is installed.

PHASE, around the evidence store: ``before`` (STEP's start not yet recorded), ``started`` (recorded;
its action has not begun), ``ending`` (its action done and its marks recorded, its end not yet),
``finished`` (its end recorded; nothing that needs it has started).
STEP ``run`` with ``started`` (the run recorded, no step begun) or ``finishing`` (every step ended,
the run's end not yet recorded).
"""

from __future__ import annotations

import os
import time
from pathlib import Path

from dr_orchestrator.model.events import Event, Observer, RunFinished, RunResumed, RunStarted, StepFinished, StepStarted
from dr_orchestrator.model.run import Phase

PAUSE_AT_ENV = "DR_TEST_PAUSE_AT"
PAUSE_DIR_ENV = "DR_TEST_PAUSE_DIR"
WAIT_S = 120.0  # a test that forgot us does not leave a process behind for ever


class PauseHook:
    """Wraps the evidence store; pauses before or after it records the chosen event."""

    def __init__(self, store: Observer, step: str, phase: str, directory: Path) -> None:
        self.store = store
        self.step = step
        self.phase = phase
        self.directory = directory

    def __call__(self, event: Event) -> None:
        if self._matches(event, "before") or self._matches(event, "ending") or self._matches(event, "finishing"):
            self._pause(event)
        self.store(event)
        if self._matches(event, "started") or self._matches(event, "finished"):
            self._pause(event)

    def _matches(self, event: Event, phase: str) -> bool:
        if phase != self.phase:
            return False
        if self.step == "run":
            return (phase == "started" and isinstance(event, (RunStarted, RunResumed))) or (
                phase == "finishing" and isinstance(event, RunFinished))
        if getattr(event, "step_id", None) != self.step or getattr(event, "phase", Phase.FORWARD) != Phase.FORWARD:
            return False
        ends = phase in ("ending", "finished")
        return isinstance(event, StepFinished) if ends else isinstance(event, StepStarted)

    def _pause(self, event: Event) -> None:
        flush = getattr(self.store, "flush", None)
        if flush is not None:  # "recorded" means committed: the store commits most events a moment later
            flush()
        self.directory.mkdir(parents=True, exist_ok=True)
        (self.directory / "paused").write_text(f"{self.step}:{self.phase} {type(event).__name__} pid {os.getpid()}\n")
        deadline = time.monotonic() + WAIT_S
        while not (self.directory / "release").exists() and time.monotonic() < deadline:
            time.sleep(0.02)


def wrap_store(store: Observer) -> Observer:
    """``store`` itself, or wrapped in a PauseHook when the environment asks for one."""
    where = os.environ.get(PAUSE_AT_ENV, "")
    if not where:
        return store
    step, _, phase = where.rpartition(":")
    return PauseHook(store, step, phase, Path(os.environ.get(PAUSE_DIR_ENV) or "."))
