"""What the watch tests feed the watch: scripted rounds of observations on the lab's inventory, from a
fixed clock, and an `execute` that records the runbooks it was asked to run instead of running them."""

from __future__ import annotations

import threading
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

from dr_orchestrator.watch.observations import Observation, Target
from dr_orchestrator.watch.service import Watch

REPO = Path(__file__).resolve().parent.parent.parent
LAB_INVENTORY = str(REPO / "inventories" / "lab.yml")
T0 = datetime(2026, 12, 7, 4, 0, tzinfo=UTC)
SERVICES = ("trading", "contract-signing", "quotation")


@dataclass
class Script:
    """Rounds of observations the watch will see, one list per round."""

    rounds: list[list[Observation]] = field(default_factory=list)

    def __call__(self) -> list[Observation]:
        return self.rounds.pop(0) if self.rounds else []


@dataclass
class Executed:
    calls: list[dict[str, Any]] = field(default_factory=list)

    def __call__(self, watch: Watch, incident_id: str, runbook: str, parameters: dict[str, Any],
                 impact_start: datetime, reason: str, holder: dict[str, str], ready: threading.Event) -> None:
        holder["run_id"] = f"run-{len(self.calls)}"
        self.calls.append({"incident": incident_id, "runbook": Path(runbook).name, "parameters": parameters,
                           "impact_start": impact_start})
        ready.set()


def seen(observer: str, kind: str, name: str, ok: bool, at_s: float, detail: str = "") -> Observation:
    return Observation(observer=observer, target=Target(kind, name), ok=ok,  # type: ignore[arg-type]
                       at=T0 + timedelta(seconds=at_s), latency_s=0.001,
                       detail=detail or ("HTTP 200 site=primary" if ok else "connection refused"))


def healthy_round(at_s: float) -> list[Observation]:
    observations = [seen("front-door", "service", s, True, at_s) for s in SERVICES]
    observations += [seen("direct:primary", "service", s, True, at_s) for s in SERVICES]
    observations += [seen(o, "site", "primary", True, at_s) for o in ("direct:primary", "store-host:primary")]
    return observations


def site_lost_round(at_s: float) -> list[Observation]:
    """Everything at the primary site refuses connections."""
    observations = [seen("front-door", "service", s, False, at_s) for s in SERVICES]
    observations += [seen("direct:primary", "service", s, False, at_s) for s in SERVICES]
    observations += [seen(o, "site", "primary", False, at_s) for o in ("direct:primary", "store-host:primary")]
    return observations


def trading_lost_round(at_s: float) -> list[Observation]:
    """Only trading's process at the primary site is gone; the site itself answers."""
    observations = healthy_round(at_s)
    return [seen(o.observer, "service", "trading", False, at_s)
            if o.target == Target("service", "trading") else o for o in observations]


def steps(start_s: float, end_s: float, every_s: float = 0.1) -> list[float]:
    count = round((end_s - start_s) / every_s)
    return [round(start_s + i * every_s, 3) for i in range(count + 1)]
