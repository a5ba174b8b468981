"""What the engine tells its observers (evidence store, progress display, notifier).

Every event carries the run id and a timezone-aware UTC timestamp taken when the thing happened.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any, Protocol

from dr_orchestrator.model.approval import Decision, DecisionSource
from dr_orchestrator.model.run import Phase, RunPlan, RunState, StepState


def utcnow() -> datetime:
    return datetime.now(UTC)


@dataclass(frozen=True)
class RunStarted:
    run_id: str
    at: datetime
    plan: RunPlan
    host: str  # where the orchestrator runs


@dataclass(frozen=True)
class StepStarted:
    run_id: str
    step_id: str
    at: datetime
    phase: Phase = Phase.FORWARD
    rendered: dict[str, Any] = field(default_factory=dict)  # parameters after templating, redacted


@dataclass(frozen=True)
class AttemptStarted:
    run_id: str
    step_id: str
    attempt: int
    at: datetime
    phase: Phase = Phase.FORWARD
    # Safe to repeat after a crash in the middle of it (the step or its action is idempotent). When
    # False, observers that keep durable records must have this event on disk before they return:
    # the action acts only after that, so a resumed run knows it may have acted.
    repeatable: bool = False


@dataclass(frozen=True)
class AttemptFinished:
    run_id: str
    step_id: str
    attempt: int
    at: datetime
    state: StepState
    duration_s: float  # monotonic clock
    output: dict[str, Any] = field(default_factory=dict)
    error: str | None = None
    phase: Phase = Phase.FORWARD


@dataclass(frozen=True)
class StepFinished:
    run_id: str
    step_id: str
    at: datetime
    state: StepState
    output: dict[str, Any] = field(default_factory=dict)
    error: str | None = None
    phase: Phase = Phase.FORWARD


@dataclass(frozen=True)
class ProbeResult:
    """One health probe. ``ok`` is the probe's verdict; ``at`` is when the probe was sent."""

    run_id: str
    step_id: str
    attempt: int
    at: datetime
    target: str
    ok: bool
    latency_ms: float
    detail: str = ""


@dataclass(frozen=True)
class MarkerReached:
    """A step marked e.g. ``service_restored`` succeeded; ``at`` is the moment the mark stands for
    (for health checks: the first of the consecutive good probes), not when the step ended."""

    run_id: str
    step_id: str
    marker: str
    service: str | None
    site: str | None
    at: datetime


@dataclass(frozen=True)
class Measurement:
    """A figure an action measured (e.g. RPO from the promoted database), with how and from what."""

    run_id: str
    step_id: str
    service: str | None
    metric: str  # rpo_s, replication_lag_bytes, ...
    value: float
    method: str
    raw: dict[str, Any]
    at: datetime


@dataclass(frozen=True)
class ActionEvent:
    """Anything else an action reports as it happens: an Ansible task, an AWS API call, a delivery."""

    run_id: str
    step_id: str
    kind: str
    at: datetime
    data: dict[str, Any]


@dataclass(frozen=True)
class ApprovalRequested:
    """An approval gate opened: the step (and the run) wait for ``dr approve`` or ``dr reject``."""

    run_id: str
    step_id: str
    at: datetime
    message: str
    started_by: str
    two_person: bool
    timeout_s: float
    on_timeout: str


@dataclass(frozen=True)
class ApprovalDecided:
    """A gate got its decision. Engineers' decisions are already recorded by whoever took them;
    timeouts and pre-approvals are recorded from this event."""

    run_id: str
    step_id: str
    at: datetime
    decision: Decision
    actor: str
    reason: str
    source: DecisionSource


@dataclass(frozen=True)
class RunResumed:
    """An interrupted run goes on in a new process (same run id). ``finished`` steps are not run
    again; ``retried`` in-flight steps run again; ``marked_done`` steps were done by the engineer."""

    run_id: str
    at: datetime
    plan: RunPlan
    host: str
    actor: str
    reason: str
    retried: tuple[str, ...] = ()
    marked_done: tuple[str, ...] = ()


@dataclass(frozen=True)
class RunFinished:
    run_id: str
    at: datetime
    state: RunState
    error: str | None = None


Event = (
    RunStarted
    | StepStarted
    | AttemptStarted
    | AttemptFinished
    | StepFinished
    | ProbeResult
    | MarkerReached
    | Measurement
    | ActionEvent
    | ApprovalRequested
    | ApprovalDecided
    | RunResumed
    | RunFinished
)


class Observer(Protocol):
    def __call__(self, event: Event) -> None: ...
