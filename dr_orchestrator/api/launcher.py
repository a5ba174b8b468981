"""Runs and drills started over HTTP: files confined to their directories, executed in background
threads (the response carries the run id as soon as the run holds its locks and has started),
stopped when the server stops; on a cluster node's leader, fenced under its term."""

from __future__ import annotations

import logging
import threading
import uuid
from pathlib import Path
from typing import Any

from sqlalchemy.orm import Session, sessionmaker

from dr_orchestrator.api.auth import ApiError
from dr_orchestrator.api.forwarding import ClusterRole
from dr_orchestrator.api.values import HOLDS_NUL, where_nul
from dr_orchestrator.cluster.gateway import ClusterError
from dr_orchestrator.plans import PlanError, build_plan
from dr_orchestrator.runs.execute import LockHeld, execute
from dr_orchestrator.yamlsource import LoadError

log = logging.getLogger(__name__)
JOIN_S = 30.0  # how long a stopping server waits for its runs' rollbacks and cleanups
START_S = 30.0  # how long a request waits for its run to take its locks and start


class _Start:
    """``done`` once the run's start is in the database, or once it was refused its locks (``refused``)."""

    def __init__(self) -> None:
        self.done = threading.Event()
        self.refused: LockHeld | None = None


def confined(root: str | Path, relative: str, what: str) -> Path:
    """``relative`` inside ``root``, an existing file: ApiError 422 for a path leading out (``..``, an
    absolute path, a symlink), 404 for no such file."""
    base = Path(root).resolve()
    try:
        target = (base / relative).resolve()
        inside, found = target.is_relative_to(base), target.is_file()
    except (OSError, RuntimeError):  # a name too long, a symlink loop: nothing can be there
        inside, found = True, False
    if not inside:
        raise ApiError(422, f"body.{what}: must be a path inside {root}/, not {relative!r}")
    if not found:
        raise ApiError(404, f"no {what} {relative!r} in {root}/")
    return target


class Launcher:
    def __init__(self, sessions: sessionmaker[Session], runbooks_dir: str, inventories_dir: str,
                 cluster: ClusterRole | None = None) -> None:
        self.sessions = sessions
        self.runbooks_dir = runbooks_dir
        self.inventories_dir = inventories_dir
        self.cluster = cluster
        self.lock = threading.Lock()
        self.running: dict[str, tuple[threading.Thread, threading.Event]] = {}

    def start_run(self, runbook: str, inventory: str, params: dict[str, Any], actor: str, *,
                  kind: str | None = None, reason: str = "", trigger: str = "manual", scenario: str = "",
                  incident_at: Any = None, incident: str | None = None) -> str:
        """Check the plan here (mistakes come back as 422, files not found as 404), then run it in a
        thread; returns its id once it started, ApiError 409 when another run holds a service or site
        it needs."""
        runbook_path = confined(self.runbooks_dir, runbook, "runbook")
        inventory_path = confined(self.inventories_dir, inventory, "inventory")
        holding_nul = where_nul(params, "body.params")
        if holding_nul:
            raise ApiError(422, f"{holding_nul}: {HOLDS_NUL}")
        try:
            plan = build_plan(str(runbook_path), str(inventory_path), params, kind=kind, incident_at=incident_at,
                              started_by=actor, reason=reason, trigger=trigger)
        except LoadError as exc:
            raise ApiError(422, f"{len(exc.problems)} problem(s) in the runbook or inventory",
                           problems=[p.as_dict() for p in exc.problems]) from None
        except PlanError as exc:
            raise ApiError(422, str(exc)) from None
        plan = plan.model_copy(update={"scenario": scenario, "incident_id": incident})
        run_id = str(uuid.uuid4())
        stop = threading.Event()
        start = _Start()
        thread = threading.Thread(target=self._execute, args=(plan, run_id, stop, start, self.run_options()),
                                  name=f"run-{run_id[:8]}", daemon=True)
        self.track(run_id, thread, stop)
        thread.start()
        start.done.wait(START_S)
        if start.refused is not None:
            raise ApiError(409, str(start.refused))
        return run_id

    def run_options(self) -> dict[str, Any]:
        """What a run or drill started here needs on a cluster's leader: a fence bound to the current term,
        the node's evidence journal and its name (the host its runs record); nothing for `dr serve`.
        ApiError 503 when the node no longer leads."""
        if self.cluster is None:
            return {}
        try:
            fence = self.cluster.fence_check()
        except ClusterError as exc:
            raise ApiError(503, f"node {self.cluster.host} does not lead any more ({exc}); send it again") from None
        return {"fence": fence, "fallback": self.cluster.fallback, "host": self.cluster.host}

    def _execute(self, plan: Any, run_id: str, stop: threading.Event, start: _Start, options: dict[str, Any]) -> None:
        try:
            execute(self.sessions, plan, run_id=run_id, stop=stop, started=start.done, **options)
        except LockHeld as exc:  # nothing ran; the refusal is in the audit chain already
            start.refused = exc
        except Exception:  # noqa: BLE001 - the engine records the run's end; this is the server's log
            log.exception("run %s ended with an error outside the engine", run_id)
        finally:
            start.done.set()
            with self.lock:
                self.running.pop(run_id, None)

    def track(self, key: str, thread: threading.Thread, stop: threading.Event) -> None:
        with self.lock:
            for ended in [k for k, (t, _) in self.running.items() if not t.is_alive() and k != key]:
                del self.running[ended]
            self.running[key] = (thread, stop)

    def stop_all(self, timeout_s: float = JOIN_S) -> None:
        """Ask every run and drill started here to stop (rollbacks and cleanups still run) and wait."""
        with self.lock:
            started = list(self.running.values())
        for _thread, stop in started:
            stop.set()
        for thread, _stop in started:
            thread.join(timeout_s)
