"""Is a run's process still alive? Heartbeats while a run runs, and the sweep that marks runs whose
process died ``interrupted`` (never left ``running``), so that ``dr resume`` can go on with them.

The process running a run records its host, pid and the pid's start time (Linux: /proc, so a reused
pid is not taken for the old process) in ``run_processes``, then beats every ``HEARTBEAT_S``. A live
run is interrupted when its process is gone: on this host, when the pid is not alive; on another
host (which this one cannot look at), when no beat came for ``STALE_BEATS`` intervals.
"""

from __future__ import annotations

import logging
import os
import threading
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from datetime import datetime, timedelta
from pathlib import Path
from types import TracebackType

from sqlalchemy import select, text
from sqlalchemy.orm import Session

from dr_orchestrator.evidence.chain import lock_chain
from dr_orchestrator.evidence.database import WRITE_TRANSACTION
from dr_orchestrator.evidence.models import Attempt, AuditEvent, Run, RunProcess, StepRecord
from dr_orchestrator.model.events import utcnow
from dr_orchestrator.model.run import RunState, StepState

log = logging.getLogger(__name__)

Sessions = Callable[[], Session]
HEARTBEAT_S = 2.0
STALE_BEATS = 3  # beats missed before a run on another host counts as gone
LIVE_RUN_STATES = (RunState.PENDING.value, RunState.RUNNING.value, RunState.WAITING_APPROVAL.value)
IN_FLIGHT_STEP_STATES = (StepState.RUNNING.value, StepState.WAITING_APPROVAL.value)
RECOVERY_ACTOR = "dr (recovery)"


@contextmanager
def writing(sessions: Sessions) -> Iterator[Session]:
    with sessions() as session, session.begin():
        session.connection(execution_options=WRITE_TRANSACTION)
        yield session


def _stat(pid: int) -> list[str] | None:
    """Fields of /proc/PID/stat from the state on (Linux), or None when unreadable."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    # The command name may hold spaces and parentheses: fields count from the last ')'.
    return stat[stat.rfind(")") + 2 :].split()


def process_start(pid: int) -> str | None:
    """When process ``pid`` started, in clock ticks since boot (Linux), or None when unknown."""
    fields = _stat(pid)
    return fields[19] if fields and len(fields) > 19 else None


def process_alive(pid: int, started: str | None = None) -> bool:
    """Whether ``pid`` runs on this host, and is the process that started at ``started`` (if known).
    A zombie (dead, not yet reaped by its parent) is not alive."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        pass  # it exists, owned by someone else
    fields = _stat(pid)
    if fields is None:
        return True  # no /proc: the signal said it exists
    if fields[0] in ("Z", "X"):
        return False
    return started is None or len(fields) <= 19 or fields[19] == started


def record_process(session: Session, run_id: str, host: str) -> None:
    """Record this process as the one running ``run_id``, beating from now. The caller commits."""
    pid = os.getpid()
    row = session.get(RunProcess, run_id)
    if row is None:
        row = RunProcess(run_id=run_id)
        session.add(row)
    row.host, row.pid, row.process_start = host, pid, process_start(pid)
    row.started_at = row.heartbeat_at = utcnow()


class Heartbeat:
    """``with Heartbeat(sessions, run_id, host):`` records this process as the run's and beats from a
    thread until the block ends. A missed beat is logged, never fatal: the run goes on."""

    def __init__(self, sessions: Sessions, run_id: str, host: str, interval: float = HEARTBEAT_S) -> None:
        self.sessions = sessions
        self.run_id = run_id
        self.host = host
        self.interval = interval
        self._recorded = False
        self._done = threading.Event()
        self._thread = threading.Thread(target=self._beat, name=f"heartbeat-{run_id[:8]}", daemon=True)

    def record(self, session: Session) -> None:
        """Record this process as the run's in ``session``'s transaction (the caller commits), before
        entering: then entering only starts the beats."""
        record_process(session, self.run_id, self.host)
        self._recorded = True

    def without_process_row(self) -> None:
        """The database is away (a fenced run of a cluster node journals its evidence): enter without the
        process row; the beats update it only if it exists."""
        self._recorded = True

    def __enter__(self) -> Heartbeat:
        if not self._recorded:
            with writing(self.sessions) as session:
                record_process(session, self.run_id, self.host)
        self._thread.start()
        return self

    def __exit__(self, kind: type[BaseException] | None, value: BaseException | None,
                 traceback: TracebackType | None) -> None:
        self._done.set()
        self._thread.join(timeout=self.interval + 5)

    def _beat(self) -> None:
        while not self._done.wait(self.interval):
            try:
                with writing(self.sessions) as session:
                    row = session.get(RunProcess, self.run_id)
                    if row is not None:
                        row.heartbeat_at = utcnow()
            except Exception:  # noqa: BLE001 - a missed beat must not stop a failover
                log.warning("run %s: heartbeat not recorded", self.run_id, exc_info=True)


def _gone(process: RunProcess, host: str, now: datetime, interval: float) -> bool:
    if process.host == host:
        return process.pid != os.getpid() and not process_alive(process.pid, process.process_start)
    return process.heartbeat_at < now - timedelta(seconds=interval * STALE_BEATS)


def sweep_interrupted(sessions: Sessions, host: str, interval: float = HEARTBEAT_S,
                      lock_timeout_s: float | None = None) -> list[str]:
    """Mark every live run whose process is gone ``interrupted``, and its in-flight steps and
    attempts too; each interruption is an audit event. Returns the runs' ids, oldest first.

    Runs without a ``run_processes`` row (started by an engine no heartbeat watches) are left alone.
    ``lock_timeout_s`` (PostgreSQL): give up, with the error, when another writer holds the chain that
    long (a command that only reads must not hang behind a writer cut off mid-transaction)."""
    now = utcnow()
    with sessions() as session:  # a cheap read first: most starts find nothing to do
        candidates = [
            (run_id, process.host, process.pid)
            for run_id, process in session.execute(
                select(Run.id, RunProcess).join(RunProcess, RunProcess.run_id == Run.id)
                .where(Run.state.in_(LIVE_RUN_STATES)).order_by(Run.started_at)
            )
            if _gone(process, host, now, interval)
        ]
    if not candidates:
        return []
    marked: list[str] = []
    with writing(sessions) as session:
        # The chain before the rows: every node sweeps (each judging other hosts' runs its own way), and
        # a sweeper holding a run's row while waiting for the chain deadlocks with one holding the chain.
        connection = session.connection()
        if lock_timeout_s is not None and connection.dialect.name == "postgresql":
            connection.execute(text(f"SET LOCAL lock_timeout = {int(lock_timeout_s * 1000)}"))
        lock_chain(connection)
        for run_id, _host, _pid in candidates:
            run = session.scalars(select(Run).where(Run.id == run_id).with_for_update()).one()
            process = session.get(RunProcess, run_id)
            if run.state not in LIVE_RUN_STATES or process is None or not _gone(process, host, now, interval):
                continue  # another `dr` got there first, or the run was resumed meanwhile
            _mark_interrupted(session, run, process, now)
            marked.append(run.id)
    return marked


def _mark_interrupted(session: Session, run: Run, process: RunProcess, now: datetime) -> None:
    why = (f"the orchestrator process (pid {process.pid} on {process.host}) stopped without finishing the run; "
           f"last heartbeat at {process.heartbeat_at.isoformat()}")
    steps = list(session.scalars(
        select(StepRecord).where(StepRecord.run_id == run.id, StepRecord.state.in_(IN_FLIGHT_STEP_STATES))
    ))
    # The last moment the process was known alive ends what it was doing: the time after it is the
    # outage of the orchestrator, not time spent in a step (an approval gate's decision time).
    last_seen = process.heartbeat_at
    for step in steps:
        step.state, step.finished_at = StepState.INTERRUPTED.value, max(last_seen, step.started_at or last_seen)
        step.error = f"in flight when {why}: it may or may not have taken effect"
    for attempt in session.scalars(
        select(Attempt).where(Attempt.run_id == run.id, Attempt.state.in_(IN_FLIGHT_STEP_STATES))
    ):
        attempt.state = StepState.INTERRUPTED.value
        attempt.finished_at = max(last_seen, attempt.started_at or last_seen)
        attempt.error = "in flight when the orchestrator stopped"
    run.state, run.finished_at, run.error = RunState.INTERRUPTED.value, last_seen, f"interrupted: {why}"
    session.add(AuditEvent(
        at=now, actor=RECOVERY_ACTOR, action="run.interrupted", target=run.id,
        data={"host": process.host, "pid": process.pid, "last_heartbeat_at": process.heartbeat_at.isoformat(),
              "in_flight": [{"step_id": s.step_id, "phase": s.phase} for s in steps]},
    ))
