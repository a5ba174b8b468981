"""Where an interrupted run stood, as the engine needs it to go on (built from the evidence)."""

from __future__ import annotations

from dataclasses import dataclass, field
from datetime import datetime
from typing import Any

from dr_orchestrator.model.run import Phase, StepState


@dataclass(frozen=True)
class FinishedStep:
    state: StepState
    output: dict[str, Any] = field(default_factory=dict)
    error: str | None = None


@dataclass(frozen=True)
class ResumePoint:
    """``finished``: forward steps that ended before the crash, in the order they ended (they are
    not run again; their outputs feed templates). ``rolled_back``: steps whose rollback ended.
    ``marked_done``: in-flight steps the engineer recorded as done, by phase,
    with the reason. ``retried``: in-flight steps run again (idempotent, or the engineer said so)."""

    started_at: datetime
    actor: str
    reason: str = ""
    finished: dict[str, FinishedStep] = field(default_factory=dict)
    rolled_back: frozenset[str] = frozenset()
    marked_done: dict[str, tuple[Phase, str]] = field(default_factory=dict)  # step -> (phase, reason)
    retried: tuple[str, ...] = ()
