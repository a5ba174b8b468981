"""What the CLI and the HTTP API ask of the scheduler: each drill's next fire times, and a drill
run now (one at a time per drill)."""

from __future__ import annotations

import threading
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from dr_orchestrator.drills.load import load_drill, load_drills
from dr_orchestrator.evidence import drills as records
from dr_orchestrator.evidence.store import EvidenceFallback
from dr_orchestrator.model.drill import Drill
from dr_orchestrator.scheduling.triggers import next_fire_times

DEFAULT_DRILLS_DIR = "failover_tests"
RECORDED_WITHIN_S = 10.0  # how long start_drill waits for the background drill to record itself


class DrillBusy(Exception):
    """The drill is already running (one at a time); one sentence."""


def schedules(drills_dir: str | Path = DEFAULT_DRILLS_DIR, count: int = 3,
              now: datetime | None = None) -> dict[str, Any]:
    """Every drill of ``drills_dir`` with its schedule and next ``count`` fire times (in the
    schedule's zone and in UTC), and the problems of drill files that do not load."""
    drills, problems = load_drills(drills_dir)
    now = now or datetime.now(UTC)
    listed = []
    for drill in sorted(drills, key=lambda d: d.name):
        entry: dict[str, Any] = {"name": drill.name, "path": drill.path, "scenario": drill.scenario.value,
                                 "description": drill.description, "pre_approved": drill.pre_approved,
                                 "schedule": None, "next": []}
        if drill.schedule is not None:
            entry["schedule"] = {"cron": drill.schedule.cron, "timezone": drill.schedule.timezone}
            entry["next"] = [{"local": t.isoformat(), "utc": t.astimezone(UTC).isoformat()}
                             for t in next_fire_times(drill.schedule, count, now)]
        listed.append(entry)
    return {"drills": listed, "problems": [p.as_dict() for p in problems]}


def find_drill(name_or_path: str, drills_dir: str | Path = DEFAULT_DRILLS_DIR,
               inventory: str | None = None) -> Drill:
    """A drill by file path, or by name among ``drills_dir``; LoadError or LookupError when not found."""
    if Path(name_or_path).is_file():
        return load_drill(name_or_path, inventory=inventory)
    drills, _ = load_drills(drills_dir)
    for drill in drills:
        if drill.name == name_or_path:
            return load_drill(drill.path, inventory=inventory) if inventory else drill
    known = ", ".join(sorted(d.name for d in drills)) or "none"
    raise LookupError(f"no drill named {name_or_path!r} in {drills_dir} (drills: {known})")


def ensure_idle(sessions: records.Sessions, drill: Drill) -> None:
    with sessions() as session:
        running = records.running_drill(session, drill.name)
    if running is not None:
        raise DrillBusy(f"drill {drill.name!r} is already running (drill run {running.id}, pid {running.pid} on "
                        f"{running.orchestrator_host}); one at a time")


@dataclass
class Started:
    drill_run_id: str
    thread: threading.Thread
    stop: threading.Event


def start_drill(sessions: records.Sessions, drill: Drill, started_by: str, trigger: str = "api", *,
                host: str | None = None, fence: Callable[[], object] | None = None,
                fallback: EvidenceFallback | None = None) -> Started:
    """Run ``drill`` now in a background thread (for the HTTP API); returns its drill run id as soon as
    the drill run is recorded, so that whoever asks for it next finds it. ``stop.set()`` stops it (its
    cleanup still runs). ``host``, ``fence``, ``fallback``: a cluster leader's (see ``DrillRunner``)."""
    from dr_orchestrator.drills.runner import DrillRunner

    ensure_idle(sessions, drill)
    drill_run_id = str(uuid.uuid4())
    stop = threading.Event()
    recorded = threading.Event()

    def run() -> None:
        try:
            DrillRunner(sessions, host=host, fence=fence, fallback=fallback).run(
                drill, trigger=trigger, started_by=started_by, stop=stop, drill_run_id=drill_run_id, recorded=recorded)
        finally:
            recorded.set()  # also when it failed before recording: nobody waits in vain

    thread = threading.Thread(target=run, name=f"drill-{drill.name}", daemon=True)
    thread.start()
    recorded.wait(RECORDED_WITHIN_S)
    return Started(drill_run_id, thread, stop)
