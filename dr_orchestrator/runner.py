"""How a run is composed and executed, the same way for `dr run` and the HTTP API: the actions
registry, the engine, the evidence store as its first observer (nothing happens unrecorded), and
the evidence database as where approval gates read decisions (`dr approve`, the API). Runs go
through ``supervision.execute``: the plan's locks (``LockHeld`` when another run holds one) and
the heartbeat that lets a crashed run be found and resumed. A resident process (the watch) keeps its
runs' SSH connections open between them (``KeptConnections``), so a decided run starts acting at once."""

from __future__ import annotations

import socket
import threading
import uuid
from collections.abc import Callable, Iterable, Sequence

from sqlalchemy.orm import Session, sessionmaker

from dr_orchestrator import supervision
from dr_orchestrator.actions.base import RunResources
from dr_orchestrator.engine import RunOutcome
from dr_orchestrator.evidence.store import EvidenceStore
from dr_orchestrator.model.events import (
    AttemptFinished,
    AttemptStarted,
    Event,
    MarkerReached,
    Observer,
    ProbeResult,
    RunFinished,
    RunResumed,
    RunStarted,
    StepFinished,
    StepStarted,
    utcnow,
)
from dr_orchestrator.model.inventory import Host, Inventory
from dr_orchestrator.model.resume import ResumePoint
from dr_orchestrator.model.run import RunPlan, RunState, StepState
from dr_orchestrator.testhook import wrap_store


def execute(sessions: sessionmaker[Session], plan: RunPlan, *, observers: Sequence[Observer] = (),
            retention_years: int | None = None, run_id: str | None = None,
            stop: threading.Event | None = None, resume: ResumePoint | None = None,
            kept: KeptConnections | None = None, started: threading.Event | None = None) -> RunOutcome:
    """Run ``plan`` to its end (or go on with an interrupted run: ``resume`` and its ``run_id``),
    recording it in the evidence database of ``sessions``. Raises supervision.LockHeld, before
    anything ran, when another live run holds a service or site of the plan."""
    recorder = EvidenceStore(sessions, retention=retention_years)
    store = wrap_store(recorder)
    if started is not None:
        observers = [*observers, _StartRecorded(recorder, started)]
    return supervision.execute(sessions, plan, [store, *observers], run_id=run_id, stop=stop, resume=resume,
                               kept=kept.pool if kept is not None else None)


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
            now = utcnow()
            store = EvidenceStore(rehearsal)
            for event in (RunStarted(run_id, now, rehearsed, host), StepStarted(run_id, step.id, now),
                          AttemptStarted(run_id, step.id, 1, now),
                          ProbeResult(run_id, step.id, 1, now, "rehearsal", True, 0.0),
                          MarkerReached(run_id, step.id, RESTORED_MARKER, service, step.site, now),
                          AttemptFinished(run_id, step.id, 1, now, StepState.SUCCEEDED, 0.0),
                          StepFinished(run_id, step.id, now, StepState.SUCCEEDED),
                          RunFinished(run_id, now, RunState.SUCCEEDED)):
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
