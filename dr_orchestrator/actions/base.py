"""What every action is: a name, a typed parameter model, and ``run(params, ctx)``.

Actions never import the engine or the evidence store; they talk back through ``ActionContext``.
"""

from __future__ import annotations

import importlib
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any, ClassVar, Generic, Protocol, TypeVar

from pydantic import BaseModel, ConfigDict

from dr_orchestrator import secrets
from dr_orchestrator.model.approval import ApprovalDecision
from dr_orchestrator.model.events import ActionEvent, Event, Measurement, ProbeResult, utcnow
from dr_orchestrator.model.inventory import Host, Inventory
from dr_orchestrator.model.runbook import Effect
from dr_orchestrator.model.safety import override_text, policy_of


class ActionError(Exception):
    """The action failed in a way it can explain in one sentence (shown to the engineer as is)."""


class ActionCancelled(ActionError):
    """The step's timeout passed or the run is stopping; the action gave up cleanly."""


class Params(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


P = TypeVar("P", bound=Params)


@dataclass
class ActionResult:
    output: dict[str, Any] = field(default_factory=dict)
    # The moment a mark on this step stands for, when earlier than the step's end
    # (a health check's first good probe of the streak that verified the service).
    marked_at: datetime | None = None


class RunResources:
    """Per-run shared things (SSH transports, HTTP clients), closed when the run ends. With ``kept``,
    the pool of a resident process (the watch), what an action asks to keep (``keep=True``: its SSH
    connections) comes from that pool and outlives the run, so a decided run does not wait for it."""

    def __init__(self, kept: RunResources | None = None) -> None:
        self._lock = threading.Lock()
        self._items: dict[str, Any] = {}
        self._closers: list[Callable[[], None]] = []
        self._kept = kept

    def get_or_create(self, key: str, factory: Callable[[], Any], close: Callable[[Any], None] | None = None,
                      *, keep: bool = False) -> Any:
        if keep and self._kept is not None:
            return self._kept.get_or_create(key, factory, close)
        with self._lock:
            if key not in self._items:
                item = factory()
                self._items[key] = item
                if close is not None:
                    self._closers.append(lambda: close(item))
            return self._items[key]

    def discard(self, key: str) -> Any:
        """Forget ``key``; returns what it held (None if nothing), for the caller to close."""
        with self._lock:
            return self._items.pop(key, None)

    def close(self) -> None:
        with self._lock:
            closers, self._closers, self._items = self._closers, [], {}
        for closer in reversed(closers):
            try:
                closer()
            except Exception:  # noqa: BLE001 - closing is best effort at the end of a run
                pass


class ApprovalSource(Protocol):
    """Where approval gates read decisions taken elsewhere (another process, the API). Implemented
    over the evidence database and handed to the engine by whoever builds it."""

    def decision(self, run_id: str, step_id: str, exclude_actor: str | None = None) -> ApprovalDecision | None:
        """The first decision on the step, ignoring those by ``exclude_actor``; None while undecided."""
        ...

    def plan_decision(self, plan_sha256: str, run_id: str, step_id: str,
                      exclude_actor: str | None = None) -> ApprovalDecision | None:
        """An approval given before the run to the saved plan ``plan_sha256`` for this step, taken for
        this run (once), ignoring those by ``exclude_actor``; None when there is none."""
        ...


@dataclass
class ActionContext:
    run_id: str
    step_id: str
    attempt: int
    inventory: Inventory
    emit: Callable[[Event], None]
    cancelled: threading.Event
    deadline: float  # time.monotonic() value
    resources: RunResources
    service: str | None = None
    site: str | None = None
    check_mode: bool = False
    resumed: bool = False  # the step was in flight when its run was interrupted: see Action.resumable
    run_info: dict[str, Any] = field(default_factory=dict)
    approvals: ApprovalSource | None = None  # None: nothing can decide (an engine without a database)
    redact: Callable[[str], str] = secrets.redact
    # Resolves an env:/file: reference and registers the value for redaction (the run's redactor).
    resolve_secret: Callable[[str], str] = secrets.resolve

    def remaining(self) -> float:
        return max(0.0, self.deadline - time.monotonic())

    def check_cancelled(self) -> None:
        if self.cancelled.is_set():
            raise ActionCancelled("cancelled: the step's timeout passed or the run is stopping")

    def sleep(self, seconds: float) -> None:
        """Sleep that wakes at once when the step is cancelled."""
        if self.cancelled.wait(min(seconds, self.remaining())):
            self.check_cancelled()

    def probe(self, target: str, ok: bool, at: datetime, latency_ms: float, detail: str = "") -> None:
        self.emit(ProbeResult(self.run_id, self.step_id, self.attempt, at, target, ok, latency_ms, self.redact(detail)))

    def measure(self, metric: str, value: float, method: str, raw: dict[str, Any], service: str | None = None) -> None:
        self.emit(Measurement(self.run_id, self.step_id, service or self.service, metric, value, method, raw, utcnow()))

    def report(self, kind: str, **data: Any) -> None:
        self.emit(ActionEvent(self.run_id, self.step_id, kind, utcnow(), data))

    def secret(self, reference: str) -> str:
        """The secret ``reference`` (``env:NAME``, ``file:PATH``) points at, masked from then on in
        everything the run records; ActionError naming the reference when it cannot be read."""
        try:
            return self.resolve_secret(reference)
        except secrets.SecretError as exc:
            raise ActionError(str(exc)) from None

    def enforce(self, rule: str, problem: str) -> list[str]:
        """A safety rule of the inventory (``dr.safety``) is broken: raise ActionError naming the rule and
        how to override it, unless the inventory turns the rule off or the run is forced. Returns the
        reasons given with ``--force``; the override is recorded (rule, actor, reason, problem)."""
        forced = [str(reason) for reason in self.run_info.get("forced") or []]
        if not policy_of(self.inventory).enabled(rule):
            self.report("safety.rule", rule=rule, enabled=False, problem=problem)
            return forced
        if not forced:
            raise ActionError(f"{problem} (safety rule {rule}); {override_text(rule)}")
        self.report("safety.override", rule=rule, problem=problem, actor=self.run_info.get("started_by"),
                    reason="; ".join(forced))
        return forced

    def host(self, name: str) -> Host:
        try:
            return self.inventory.hosts[name]
        except KeyError:
            raise ActionError(f"host {name!r} is not in inventory {self.inventory.name!r}") from None


class Action(Generic[P]):
    """Subclasses set ``name`` and ``Params``, and implement ``run``."""

    name: ClassVar[str]
    Params: ClassVar[type[Params]]
    # Safe to repeat after a crash in the middle of it (reads, checks, idempotent switches).
    idempotent: ClassVar[bool] = False
    # Not idempotent, but safe to run again when told ``ctx.resumed``: the attempt left in flight by an
    # interrupted run may or may not have taken effect, and the action first finds out which (a promotion
    # finds its database already promoted) and finishes, or does it, never doing it twice. Its first
    # attempt is still made durable before it starts (write-ahead), as any non-idempotent one.
    resumable: ClassVar[bool] = False
    # What it does to the world; an action that does not say is taken to change it for good.
    effect: ClassVar[Effect] = Effect.IRREVERSIBLE
    # Once it ran (or may have, before it failed), undoing the steps before it would do harm: after a
    # promotion, restarting the fenced old primary makes a split brain. Rollback stops there.
    bars_rollback: ClassVar[bool] = False

    def run(self, params: P, ctx: ActionContext) -> ActionResult:
        raise NotImplementedError

    def hosts(self, params: P) -> list[str]:
        """Inventory hosts (or endpoints) the step touches, for ``dr plan``."""
        return []


class ActionRegistry:
    """Action names to ``module:Class`` paths, imported on first use so ``dr --help`` stays fast."""

    def __init__(self, paths: dict[str, str]) -> None:
        self._paths = dict(paths)
        self._loaded: dict[str, type[Action[Any]]] = {}

    def names(self) -> list[str]:
        return sorted(self._paths)

    def __contains__(self, name: object) -> bool:
        return name in self._paths

    def get(self, name: str) -> type[Action[Any]]:
        if name not in self._loaded:
            module_name, _, class_name = self._paths[name].partition(":")
            self._loaded[name] = getattr(importlib.import_module(module_name), class_name)
        return self._loaded[name]

    def params_model(self, name: str) -> type[Params] | None:
        return self.get(name).Params if name in self._paths else None

    def effect(self, name: str) -> Effect | None:
        return self.get(name).effect if name in self._paths else None

    def register(self, name: str, action: str | type[Action[Any]]) -> None:
        """Add an action by ``module:Class`` path, or by the class itself."""
        if isinstance(action, str):
            self._paths[name] = action
            self._loaded.pop(name, None)
        else:
            self._paths[name] = f"{action.__module__}:{action.__qualname__}"
            self._loaded[name] = action
