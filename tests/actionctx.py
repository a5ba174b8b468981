"""An ActionContext built by hand for the integration actions' tests, keeping what the action emits;
and what those tests read of a running lab's databases."""

from __future__ import annotations

import threading
import time
from typing import Any

import psycopg

from dr_orchestrator.actions.base import ActionContext, RunResources
from dr_orchestrator.loading import load_inventory
from dr_orchestrator.model.events import Event, Measurement
from dr_orchestrator.model.inventory import Inventory


def lab_inventory(lab: Any) -> Inventory:
    """The inventory a running lab wrote for itself."""
    inventory, _ = load_inventory(str(lab.config.inventory_path))
    return inventory


def lab_query(lab: Any, service: str, site: str, sql: str, params: tuple[Any, ...] = ()) -> Any:
    """The first value `sql` returns on `service`'s database at `site` (None when it returns no row)."""
    with psycopg.connect(lab.config.dsn(site, service), autocommit=True) as connection:
        cursor = connection.execute(sql.encode(), params)
        row = cursor.fetchone() if cursor.description else None
    return row[0] if row else None


def wait_for_heartbeats(lab: Any, service: str, count: int = 1, timeout: float = 20.0) -> None:
    """Until `service`'s standby holds `count` heartbeats of its primary: how current it is is then known."""
    deadline = time.monotonic() + timeout
    while True:
        try:
            held = int(lab_query(lab, service, "backup", "SELECT count(*) FROM dr_heartbeat"))
        except psycopg.errors.UndefinedTable:  # the heartbeat's first write has not reached the standby
            held = 0
        if held >= count:
            return
        assert time.monotonic() < deadline, f"{service}'s standby holds {held} heartbeats after {timeout} s"
        time.sleep(0.02)


class Harness:
    """One run's worth of context: shared resources, an event list, a deadline per step."""

    def __init__(self, inventory: Inventory, run_info: dict[str, Any] | None = None) -> None:
        self.inventory = inventory
        self.events: list[Event] = []
        self.resources = RunResources()
        self.cancelled = threading.Event()
        self.run_info: dict[str, Any] = {"forced": [], **(run_info or {})}

    def ctx(self, timeout: float = 30.0, service: str | None = None, step_id: str = "step",
            resumed: bool = False) -> ActionContext:
        return ActionContext(
            run_id="run-1",
            step_id=step_id,
            attempt=1,
            inventory=self.inventory,
            emit=self.events.append,
            cancelled=self.cancelled,
            deadline=time.monotonic() + timeout,
            resources=self.resources,
            service=service,
            resumed=resumed,
            run_info=self.run_info,
        )

    def measurements(self, metric: str) -> list[Measurement]:
        return [e for e in self.events if isinstance(e, Measurement) and e.metric == metric]

    def close(self) -> None:
        self.resources.close()
