"""A run: one immutable plan executed by the engine, and the states it and its steps pass through."""

from __future__ import annotations

import enum
from datetime import datetime
from typing import Any

from pydantic import Field

from dr_orchestrator.model.inventory import Frozen, Inventory
from dr_orchestrator.model.runbook import Runbook, Step


class RunKind(enum.StrEnum):
    FAILOVER = "failover"
    SWITCHOVER = "switchover"
    FAILBACK = "failback"
    REHEARSAL = "rehearsal"


class RunState(enum.StrEnum):
    PENDING = "pending"
    RUNNING = "running"
    WAITING_APPROVAL = "waiting_approval"
    SUCCEEDED = "succeeded"
    FAILED = "failed"
    ABORTED = "aborted"
    INTERRUPTED = "interrupted"

    @property
    def finished(self) -> bool:
        return self in (RunState.SUCCEEDED, RunState.FAILED, RunState.ABORTED)


class StepState(enum.StrEnum):
    PENDING = "pending"
    RUNNING = "running"
    WAITING_APPROVAL = "waiting_approval"
    SUCCEEDED = "succeeded"
    FAILED = "failed"
    TIMED_OUT = "timed_out"
    SKIPPED = "skipped"  # its `when` was false, or a step it needs did not succeed
    CANCELLED = "cancelled"  # the run stopped before it could start or finish
    ROLLED_BACK = "rolled_back"
    ROLLBACK_FAILED = "rollback_failed"
    INTERRUPTED = "interrupted"  # in flight when the orchestrator died; `dr resume` decides what follows

    @property
    def finished(self) -> bool:
        return self not in (StepState.PENDING, StepState.RUNNING, StepState.WAITING_APPROVAL)

    @property
    def ok(self) -> bool:
        return self is StepState.SUCCEEDED


class Phase(enum.StrEnum):
    """Which way a step runs: its action (forward) or its rollback. The values are stored (steps,
    attempts, events), so they never change."""

    FORWARD = "forward"
    ROLLBACK = "rollback"


class SourceDocument(Frozen):
    """A file that shaped the run, kept whole so an auditor can see exactly what ran."""

    path: str
    sha256: str
    text: str


class RunPlan(Frozen):
    """Everything that decides what a run does, fixed before it starts."""

    runbook: Runbook
    inventory: Inventory
    parameters: dict[str, Any] = Field(default_factory=dict)
    kind: RunKind = RunKind.FAILOVER
    incident_at: datetime | None = None
    started_by: str = "unknown"
    reason: str = ""
    trigger: str = "manual"
    runbook_source: SourceDocument
    inventory_source: SourceDocument
    parameters_sha256: str
    forced: tuple[str, ...] = ()
    # For the DR test record: None derives the test type from kind, trigger and scenario.
    test_type: str | None = None
    scenario: str = ""  # the fault injected, in words (a drill sets it)
    failback_of: str | None = None  # the run whose failover this run undoes
    # The incident the run belongs to (created when absent). None: a failover or switchover opens a new
    # one, a failback joins the incident of the run it fails back, other runs belong to none.
    incident_id: str | None = None
    # Who pre-approved every approval gate of the run (e.g. "drill quarterly-trading"); None: nobody.
    pre_approved_by: str | None = None
    # The digest of the saved plan (`dr plan --out`) the run executes: approvals given to that plan
    # before the run stand for its gates (evidence.approvals). None: the run was not started from one.
    saved_plan_sha256: str | None = None
    # Compensation and blast-radius checks apply (False for a drill's fault, checks, restore and cleanup).
    guarded: bool = True

    def services_in_scope(self) -> list[str]:
        """The runbook's declared services and those its steps name; for a runbook scoped by sites alone,
        the services served at those sites. Only names the inventory knows (a templated step ``service``
        is resolved by the engine and reaches the store through markers and measurements). The one scope
        of the safety pre-flight, the locks, the evidence and the blast radius."""
        runbook, inventory = self.runbook, self.inventory
        named = [*runbook.scope.services, *(step.service for step in runbook.steps if step.service)]
        if not named and runbook.scope.sites:
            named = [name for name, svc in inventory.services.items() if set(svc.sites) & set(runbook.scope.sites)]
        return [name for name in dict.fromkeys(named) if name in inventory.services]

    def sites_in_scope(self) -> list[str]:
        """The runbook's declared sites and those its steps name (untemplated), that the inventory knows."""
        runbook = self.runbook
        named = [*runbook.scope.sites, *(step.site for step in runbook.steps if step.site)]
        return [name for name in dict.fromkeys(named) if name in self.inventory.sites]

    def service_of(self, step: Step) -> str | None:
        """The service a step acts for: its own, or the runbook's when the runbook is about exactly one."""
        return self.runbook.service_of(step)
