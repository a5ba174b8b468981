"""Drill: a rehearsal of a disaster, as written in ``failover_tests/*.yml``.

Fault, failover runbook, expectations, failback runbook, cleanup and schedule. The fault, the
checks and the cleanup are steps like a runbook's: they run on the normal engine with the normal
actions, so the product never needs to know how a fault is made (the lab's faults are `dr lab ...`
commands run by ``shell.run``).
"""

from __future__ import annotations

import enum
from typing import Any, Literal

from pydantic import Field

from dr_orchestrator.model.inventory import Frozen
from dr_orchestrator.model.runbook import Runbook


class ScenarioCategory(enum.StrEnum):
    """The kind of incident a drill rehearses (what the quarterly report counts)."""

    SITE_LOSS = "site_loss"
    SERVICE_FAILURE = "service_failure"
    CYBER_ATTACK = "cyber_attack"
    PLANNED_MAINTENANCE = "planned_maintenance"


class NotifyEvent(enum.StrEnum):
    STARTED = "started"
    EXPECTATION_MISSED = "expectation_missed"
    FAILED = "failed"
    COMPLETED = "completed"
    MISSED = "missed"  # the scheduler could not run a scheduled drill


class RunbookRef(Frozen):
    """A runbook file (path resolved against the drill's directory) and the parameters to pass."""

    path: str
    parameters: dict[str, Any] = Field(default_factory=dict)


class Steps(Frozen):
    """Steps held inside the drill file (fault, cleanup, checks), run as a runbook of their own."""

    description: str = ""
    runbook: Runbook


class ServiceExpectation(Frozen):
    """What must hold for one service after the failover."""

    service: str
    rto: float | None = Field(default=None, description="achieved RTO at most, seconds")
    rpo: float | None = Field(default=None, description="achieved RPO at most, seconds")
    restore_point: float | None = Field(
        default=None, description="a point-in-time restore's distance back from the incident at most, seconds: "
        "judges the restore, while the service's RPO target still judges the service")
    health: tuple[str, ...] = Field(default=(), description="ids of check steps that must pass")
    data: tuple[str, ...] = Field(default=(), description="ids of data check steps that must pass")


class Schedule(Frozen):
    cron: str = Field(description="five crontab fields: minute hour day month weekday")
    timezone: str = "UTC"


class NotifyTarget(Frozen):
    channel: Literal["webhook", "email", "apprise"]
    settings: dict[str, Any] = Field(description="parameters of notify.webhook, notify.email or notify.apprise, "
                                     "without the message")
    events: tuple[NotifyEvent, ...] = tuple(NotifyEvent)


class Drill(Frozen):
    name: str
    description: str = ""
    scenario: ScenarioCategory
    inventory: str  # resolved path
    fault: Steps | None = None  # None: nothing injected (a planned switchover)
    runbook: RunbookRef
    expectations: tuple[ServiceExpectation, ...] = ()
    checks: Steps | None = None  # health and data checks, run after the failover
    restore: Steps | None = None  # undo the fault before the failback (power back at the lost site)
    failback: RunbookRef | None = None
    cleanup: Steps | None = None
    schedule: Schedule | None = None
    pre_approved: bool = False
    notify: tuple[NotifyTarget, ...] = ()
    path: str
    sha256: str
    text: str

    @property
    def fault_description(self) -> str:
        return self.fault.description if self.fault else ""
