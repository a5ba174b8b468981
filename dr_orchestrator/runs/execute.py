"""Running a plan: the one composition every run goes through (`dr run`, `dr resume`, the HTTP API,
the drills, the watch, the demo), and what a resident process does ahead of its runs.

``execute`` puts a run together in this order: the evidence store first among the observers (nothing
happens unrecorded; wrapped by the crash-test hook when the environment asks), then the plan's locks
(``LockHeld``, before anything ran and recorded as an audit event, when another live run holds a
service or site of it), the heartbeat row in the same commit (a crashed run is found and resumed),
the engine with approval gates answered from the evidence database, and after the run the anchoring
of the evidence chain. A resident process (the watch) prepares and rehearses its runs
(``prepare``, ``rehearse``) and keeps their SSH connections open between them (``KeptConnections``),
so that a decided run starts acting at once."""

from __future__ import annotations

import logging
import socket
import threading
import uuid
from collections.abc import Callable, Iterable, Sequence

from sqlalchemy.orm import Session, sessionmaker

from dr_orchestrator import anchoring
from dr_orchestrator.actions import default_registry
from dr_orchestrator.actions.base import ActionRegistry, RunResources
from dr_orchestrator.engine import Engine, RunOutcome
from dr_orchestrator.evidence.annotations import record_audit_event
from dr_orchestrator.evidence.approvals import DatabaseApprovals
from dr_orchestrator.evidence.liveness import HEARTBEAT_S, Heartbeat, writing
from dr_orchestrator.evidence.locks import LockHeld, RunLocks, resources_for
from dr_orchestrator.evidence.store import EvidenceFallback, EvidenceStore, database_unreachable
from dr_orchestrator.model import events
from dr_orchestrator.model.events import Event, Observer, RunResumed, RunStarted
from dr_orchestrator.model.inventory import Host, Inventory
from dr_orchestrator.model.resume import ResumePoint
from dr_orchestrator.model.run import RunPlan, RunState, StepState
from dr_orchestrator.testhook import wrap_store

__all__ = ["KeptConnections", "LockHeld", "execute", "prepare", "rehearse"]

log = logging.getLogger(__name__)


def execute(sessions: Callable[[], Session], plan: RunPlan, *, observers: Sequence[Observer] = (),
            retention_years: int | None = None, run_id: str | None = None,
            stop: threading.Event | None = None, resume: ResumePoint | None = None,
            kept: KeptConnections | None = None, started: threading.Event | None = None,
            registry: ActionRegistry | None = None, host: str | None = None,
            heartbeat_s: float = HEARTBEAT_S, fence: Callable[[], object] | None = None,
            fallback: EvidenceFallback | None = None) -> RunOutcome:
    """Run ``plan`` to its end (or go on with an interrupted run: ``resume`` and its ``run_id``),
    recorded in the evidence database of ``sessions``, ``observers`` after the evidence store.
    ``started`` is set once the run's start is committed; ``fence`` is called before every changing
    step (a cluster node's leadership); with a ``fallback`` (the node's local journal) the run goes on
    while the evidence database is unreachable, its events journaled in order and delivered later.
    Raises LockHeld, before anything ran, when another live run holds a service or site of the plan."""
    run_id = run_id or str(uuid.uuid4())
    host = host or socket.gethostname()
    recorder = EvidenceStore(sessions, retention=retention_years, fallback=fallback)
    watching: list[Observer] = [wrap_store(recorder), *observers]
    if started is not None:
        watching.append(_StartRecorded(recorder, started))
    locks = RunLocks(sessions, host)
    heartbeat = Heartbeat(sessions, run_id, host, heartbeat_s)
    try:
        locks.acquire(run_id, resources_for(plan), also=heartbeat.record)
    except LockHeld as exc:
        with writing(sessions) as session:
            record_audit_event(session, plan.started_by, "run.refused", run_id, {
                "runbook": plan.runbook.name, "resource": exc.resource.name,
                "held_by": [h.run_id for h in exc.holders], "resume": resume is not None})
        raise
    except Exception as exc:
        # A cluster node whose evidence database is away (a lost site, its failover under way) still
        # fails over: the leader's fencing token excludes every other node, and the journal keeps the
        # run's evidence. Without both, no lock means no run.
        if fence is None or fallback is None or not database_unreachable(exc):
            raise
        log.warning("run %s: evidence database unreachable (%s): no lock rows, the fencing token alone "
                    "excludes other nodes; the evidence is journaled", run_id, f"{type(exc).__name__}: {exc}")
        heartbeat.without_process_row()
    try:
        with heartbeat:
            engine = Engine(registry or default_registry(), watching, host=host,
                            approvals=DatabaseApprovals(sessions), kept=kept.pool if kept is not None else None,
                            fence=fence)
            return engine.run(plan, run_id, stop, resume)
    finally:
        locks.release()
        # The run's end is recorded and its locks are free: anchor the chain off the run's path.
        anchoring.after_run(sessions, run_id, plan.started_by)


class _StartRecorded:
    """Sets ``started`` once the run's start (or resumption) is committed: the engine does not wait for
    that commit before its first checks, and whoever reports the run's id must not be faster than it."""

    def __init__(self, store: EvidenceStore, started: threading.Event) -> None:
        self.store = store
        self.started = started

    def __call__(self, event: Event) -> None:
        if isinstance(event, (RunStarted, RunResumed)):
            def wait() -> None:
                try:
                    self.store.flush()  # what was queued so far, the start included, is committed
                finally:
                    self.started.set()

            threading.Thread(target=wait, name=f"start-recorded-{event.run_id[:8]}", daemon=True).start()


def prepare(plan: RunPlan) -> None:
    """Do now what the first run of a process would otherwise pay at its start (~0.1 s): import the
    plan's actions, set up the evidence models' mappers."""
    from sqlalchemy.orm import configure_mappers

    from dr_orchestrator.actions import default_registry
    from dr_orchestrator.engine import Engine

    Engine(default_registry()).load_actions(plan)
    configure_mappers()


def rehearse(sessions: sessionmaker[Session], plan: RunPlan,
             opening: Callable[[Session], str] | None = None) -> None:
    """Write what deciding on and starting a run of ``plan`` writes first (``opening``: its incident;
    the lock holders, the process row, the run's start, an attempt of its first step, its end) in
    one transaction, then roll it all back. The evidence database keeps nothing of it; this process
    keeps SQLAlchemy's statements compiled, which a resident process's first run would otherwise
    compile between the decision and its first step (30-50 ms measured in the lab)."""
    from dr_orchestrator.evidence.database import WRITE_TRANSACTION, rolled_back_sessions
    from dr_orchestrator.evidence.liveness import record_process
    from dr_orchestrator.evidence.locks import record_holder, resources_for
    from dr_orchestrator.evidence.rto import RESTORED_MARKER

    engine = sessions.kw["bind"]
    host = socket.gethostname()
    run_id = str(uuid.uuid4())
    with engine.connect() as connection:
        connection.execution_options(**WRITE_TRANSACTION)
        transaction = connection.begin()
        try:
            rehearsal = rolled_back_sessions(connection)
            with rehearsal() as session, session.begin():
                incident_id = opening(session) if opening is not None else None
                record_holder(session, run_id, host, resources_for(plan))
                record_process(session, run_id, host)
            rehearsed = plan.model_copy(update={"incident_id": incident_id}) if incident_id else plan
            step = plan.runbook.steps[0]
            service = plan.service_of(step)
            now = events.utcnow()
            store = EvidenceStore(rehearsal)
            for event in (events.RunStarted(run_id, now, rehearsed, host), events.StepStarted(run_id, step.id, now),
                          events.AttemptStarted(run_id, step.id, 1, now),
                          events.ProbeResult(run_id, step.id, 1, now, "rehearsal", True, 0.0),
                          events.MarkerReached(run_id, step.id, RESTORED_MARKER, service, step.site, now),
                          events.AttemptFinished(run_id, step.id, 1, now, StepState.SUCCEEDED, 0.0),
                          events.StepFinished(run_id, step.id, now, StepState.SUCCEEDED),
                          events.RunFinished(run_id, now, RunState.SUCCEEDED)):
                store.store(event)
        finally:
            transaction.rollback()


class KeptConnections:
    """The SSH connections of an inventory's hosts, opened ahead of need and kept open across runs.
    ``refresh`` (re)opens any that is closed or died, each bounded by ``timeout``; a host that does not
    answer stays closed until the next refresh (a run then connects itself, as it always did)."""

    def __init__(self) -> None:
        self.pool = RunResources()

    def refresh(self, inventory: Inventory, timeout: float = 2.0) -> dict[str, str]:
        """Open what is not open; returns the hosts that could not be reached, with why."""
        from dr_orchestrator.actions import ssh
        from dr_orchestrator.actions.base import ActionError

        failed: dict[str, str] = {}
        for host in inventory.hosts.values():
            if not (host.key_file and host.known_hosts):
                continue  # not an SSH host of ours (the runs would refuse it too)
            try:
                ssh.keep_open(self.pool, host, timeout)
            except ActionError as exc:
                failed[host.name] = str(exc)
        return failed

    def forget(self, hosts: Iterable[Host]) -> None:
        """Drop the connections to ``hosts`` (a site declared down): a run reconnects, or finds them
        unreachable, instead of trusting a connection that may be half dead."""
        from dr_orchestrator.actions import ssh

        for host in hosts:
            ssh.forget(self.pool, host)

    def close(self) -> None:
        self.pool.close()
