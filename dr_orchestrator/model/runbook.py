"""Runbook: the ordered, dependency-linked steps that fail a service or a site over or back."""

from __future__ import annotations

import enum
from typing import Any, Literal

from pydantic import Field

from dr_orchestrator.model.approval import ApprovalPolicy
from dr_orchestrator.model.inventory import Frozen
from dr_orchestrator.model.names import Name


class OnFailure(enum.StrEnum):
    ABORT = "abort"  # stop scheduling new steps; the run fails
    CONTINUE = "continue"  # record the failure and go on with the steps that do not need it
    ROLLBACK = "rollback"  # stop, then roll back completed steps in reverse order


class Effect(enum.StrEnum):
    """What an action (or a step) does to the world: reading changes nothing; a reversible change has
    an inverse the run can apply (switch traffic back); an irreversible one has none (a promotion)."""

    READ_ONLY = "read-only"
    REVERSIBLE = "reversible"
    IRREVERSIBLE = "irreversible"

    @property
    def changes(self) -> bool:
        return self is not Effect.READ_ONLY


class Retries(Frozen):
    count: int = Field(default=0, ge=0, le=100)
    delay: float = Field(default=1.0, ge=0)
    backoff: float = Field(default=2.0, ge=1.0, le=10.0)
    max_delay: float = Field(default=60.0, ge=0)

    def delay_before(self, attempt: int) -> float:
        """Delay before attempt number ``attempt`` (2, 3, ...)."""
        return min(self.delay * self.backoff ** max(attempt - 2, 0), self.max_delay)


class RollbackSpec(Frozen):
    action: str
    with_: dict[str, Any] = Field(default_factory=dict, alias="with")
    timeout: float | None = None

    model_config = Frozen.model_config | {"populate_by_name": True}


class Step(Frozen):
    """``effect`` overrides the action's own (a command action that only reads says ``read-only``);
    ``before_checks`` is the reason a changing step may start before the runbook's checks end;
    ``no_rollback`` the reason a changing step has no rollback (``rollback: {none: "reason"}``)."""

    id: Name
    action: Name
    with_: dict[str, Any] = Field(default_factory=dict, alias="with")
    needs: tuple[str, ...] = ()
    when: str | None = None
    timeout: float = 300.0
    retries: Retries = Retries()
    on_failure: OnFailure = OnFailure.ABORT
    rollback: RollbackSpec | None = None
    marks: tuple[Name, ...] = ()
    service: Name | None = None
    site: str | None = None
    idempotent: bool | None = None
    effect: Effect | None = None
    before_checks: str | None = None
    no_rollback: str | None = None
    description: str = ""

    model_config = Frozen.model_config | {"populate_by_name": True}


class Parameter(Frozen):
    """``type: site`` or ``type: service``: the value must name one of the inventory's."""

    default: Any = None
    required: bool = False
    description: str = ""
    choices: tuple[Any, ...] | None = None
    type: Literal["site", "service"] | None = None


class Scope(Frozen):
    services: tuple[str, ...] = ()
    sites: tuple[str, ...] = ()


class Runbook(Frozen):
    name: Name
    description: str = ""
    kind: str = "failover"
    scope: Scope = Scope()
    parameters: dict[str, Parameter] = Field(default_factory=dict)
    steps: tuple[Step, ...]
    max_parallel: int = Field(default=8, ge=1, le=256)
    approvals: ApprovalPolicy = ApprovalPolicy()

    def step(self, step_id: str) -> Step:
        for step in self.steps:
            if step.id == step_id:
                return step
        raise KeyError(step_id)

    def service_of(self, step: Step) -> str | None:
        """The service a step acts for: its own, or the runbook's when the runbook is about exactly one."""
        if step.service:
            return step.service
        return self.scope.services[0] if len(self.scope.services) == 1 else None

    def execution_groups(self) -> list[list[str]]:
        """Steps grouped by depth in the DAG: every step of a group may run in parallel."""
        by_id = {step.id: step for step in self.steps}
        depth: dict[str, int] = {}
        for step_id in self.in_need_order():  # loading has refused cycles
            depth[step_id] = 1 + max((depth[n] for n in by_id[step_id].needs), default=-1)
        groups: dict[int, list[str]] = {}
        for step in self.steps:
            groups.setdefault(depth[step.id], []).append(step.id)
        return [groups[d] for d in sorted(groups)]

    def in_need_order(self) -> list[str]:
        """The step ids, each after every step it needs; a duplicated id needs what each of its steps
        needs. Depth first without recursion: a chain of 20,000 steps is deeper than Python's limit.
        A cycle (which loading reports) is cut where the walk entered it."""
        needs: dict[str, list[str]] = {}
        for step in self.steps:
            needs.setdefault(step.id, []).extend(step.needs)
        order: list[str] = []
        placed: set[str] = set()
        opened: set[str] = set()
        for start in needs:
            todo = [start]
            while todo:
                current = todo[-1]
                if current in placed:
                    todo.pop()
                elif current not in opened:
                    opened.add(current)
                    todo.extend(need for need in needs[current] if need in needs and need not in opened)
                else:
                    todo.pop()
                    placed.add(current)
                    order.append(current)
        return order
