"""Blast radius: every service of the inventory, not only the run's scope, is looked at through the
front door (its ``health`` URL, as clients see it) before a run changes anything and again after
its last step and compensation. A service that served before and does not after got worse because
of the run (or during it): an impact, recorded with the verdict under the step id ``blast-radius``.

Probes run as the registered ``http.check`` action (the engine imports no concrete action), with a
generous timeout and a short window of retries, so that a slow answer on a busy machine or one
dropped probe is not taken for an outage.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from dr_orchestrator.model.inventory import Inventory, Service
from dr_orchestrator.model.run import RunPlan

PROBE_ACTION = "http.check"
BLAST_RADIUS = "blast-radius"  # the step id under which the checks, impacts and the verdict are recorded
PROBE_TIMEOUT_S = 2.0  # one answer; a busy machine answers slowly, which is not an outage
# Before: a service that answers well within this window from the run's start serves; the run's first
# change waits for the readings no longer than that. After: a service gets this long to answer well.
BEFORE_WINDOW_S = 0.5
AFTER_WINDOW_S = 3.0
GUARDED_KINDS = ("failover", "switchover", "failback")

# (service, url, window seconds) -> (serving, what was seen)
Probe = Callable[[str, str, float], tuple[bool, str]]


@dataclass(frozen=True)
class Reading:
    service: str
    serving: bool | None  # None: the inventory gives no health URL for it
    detail: str

    def as_dict(self) -> dict[str, Any]:
        return {"service": self.service, "serving": self.serving, "detail": self.detail}


def guarded(plan: RunPlan) -> bool:
    """Runs that change what clients see are guarded (blast radius, compensation); a drill's own fault,
    checks, restore and cleanup stages are not: their fault degrades services on purpose."""
    return plan.guarded and plan.runbook.kind in GUARDED_KINDS


def observable(plan: RunPlan) -> bool:
    """The inventory says how to look at at least one service (``services.<name>.health``)."""
    return any(service.health for service in plan.inventory.services.values())


def read_one(inventory: Inventory, service: Service, probe: Probe, window: float) -> Reading:
    if not service.health:
        return Reading(service.name, None, f"no health URL in inventory {inventory.name!r} (services.{service.name}"
                                           ".health)")
    serving, detail = probe(service.name, service.health, window)
    return Reading(service.name, serving, detail)


def impacts(before: list[Reading], after: list[Reading]) -> list[tuple[Reading, Reading]]:
    """Services that served before and do not after."""
    was = {reading.service: reading for reading in before}
    return [(was[now.service], now) for now in after
            if now.service in was and was[now.service].serving and now.serving is False]


def verdict(before: list[Reading], after: list[Reading]) -> dict[str, Any]:
    """What the run left: "clients left as found" (or better), or exactly which services it left worse."""
    worse = impacts(before, after)
    not_serving = sorted(reading.service for reading in after if reading.serving is False)
    unobserved = sorted(reading.service for reading in after if reading.serving is None)
    if worse:
        text = "left degraded: " + "; ".join(f"{now.service} served before the run and does not now ({now.detail})"
                                             for _, now in worse)
    else:
        text = "clients left as found" + (f" or better; not serving now, as before the run: {', '.join(not_serving)}"
                                          if not_serving else "")
    return {"left_as_found": not worse, "worse": [now.service for _, now in worse], "not_serving": not_serving,
            "unobserved": unobserved, "text": text}
