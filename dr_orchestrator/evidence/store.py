"""The evidence store: an engine observer that writes each event as it happens.

One writer thread per store commits events in arrival order, as many in one transaction as have
arrived meanwhile (group commit): a step's four events then cost one commit, not four. The engine
waits for the commit where a crash must not lose the record (write-ahead): before an action that is
not safe to repeat starts (so a resumed run knows it may have acted), when a run starts, resumes or
finishes, and for approval gates. Other events (a step or attempt ending, probes, action events,
marks, measurements) are committed a few milliseconds later, in order; a crash in between leaves the
step in flight in the evidence, which resume treats as such: repeated when idempotent, else decided
by an engineer. Across processes, writes are serialised by the database (BEGIN IMMEDIATE on SQLite).

With a ``fallback`` (a node's local evidence journal, dr_orchestrator.cluster.journal), the database is
never waited on for more than ``db_wait_s``: a transaction that finds it unreachable (or no answer in
time) journals its events instead, and every later event of those runs goes to the journal too, in
order, until the journal is delivered; then the runs write to the database again. A journaled event
is durable once fsynced there. A run never stops because the evidence database is down.
"""

from __future__ import annotations

import logging
import os
import queue
import threading
from collections.abc import Callable, Mapping, Sequence
from concurrent.futures import Future
from concurrent.futures import TimeoutError as FutureTimeout
from datetime import datetime, timedelta
from typing import Any, Protocol

from sqlalchemy import exc as sa_exc
from sqlalchemy import func, insert, inspect, select
from sqlalchemy.orm import Session, configure_mappers

from dr_orchestrator.evidence import incidents, rto
from dr_orchestrator.evidence.chain import CHAINED_TABLES, HASH_FROM_INSTANCES, append_rows, instance_row
from dr_orchestrator.evidence.database import WRITE_TRANSACTION
from dr_orchestrator.evidence.models import (
    ActionEventRecord,
    Approval,
    Attempt,
    AuditEvent,
    Finding,
    Incident,
    Marker,
    MeasurementRecord,
    Probe,
    Run,
    RunService,
    ServiceResult,
    StepRecord,
)
from dr_orchestrator.evidence.provenance import GIT_COMMIT_EVENT, git_commit_of
from dr_orchestrator.evidence.values import clean_text, derive_test_type, jsonable
from dr_orchestrator.model.approval import DecisionSource
from dr_orchestrator.model.events import (
    ActionEvent,
    ApprovalDecided,
    ApprovalRequested,
    AttemptFinished,
    AttemptStarted,
    Event,
    MarkerReached,
    Measurement,
    ProbeResult,
    RunFinished,
    RunResumed,
    RunStarted,
    StepFinished,
    StepStarted,
)
from dr_orchestrator.model.inventory import Inventory
from dr_orchestrator.model.run import Phase, RunKind, RunPlan, RunState, StepState

log = logging.getLogger(__name__)

# Events committed before the engine goes on (see the module's docstring); AttemptStarted when not repeatable.
DURABLE_BEFORE_RETURN = (RunStarted, RunResumed, RunFinished, ApprovalRequested, ApprovalDecided)
WRITER_IDLE_S = 5.0  # the writer thread ends after this long without events (a new one starts on the next)
RETENTION_ENV = "DR_RETENTION_YEARS"
DEFAULT_RETENTION_YEARS = 6
DB_WAIT_S = 2.0  # with a fallback: how long a transaction may take before its events are journaled


def retention_years(explicit: int | None = None) -> int:
    """``explicit``, else ``$DR_RETENTION_YEARS``, else six years."""
    if explicit is not None:
        return explicit
    configured = os.environ.get(RETENTION_ENV, "").strip()
    if not configured:
        return DEFAULT_RETENTION_YEARS
    if not configured.isdigit() or int(configured) < 1:
        raise ValueError(f"{RETENTION_ENV}={configured!r} is not a whole number of years (1 or more)")
    return int(configured)


def years_after(moment: datetime, years: int) -> datetime:
    try:
        return moment.replace(year=moment.year + years)
    except ValueError:  # 29 February into a common year
        return moment.replace(year=moment.year + years, day=28)


def maybe_text(text: str | None) -> str | None:
    return None if text is None else clean_text(text)


def target_snapshot(plan: RunPlan) -> dict[str, Any]:
    return target_snapshot_of(plan.inventory)


def target_snapshot_of(inventory: Inventory) -> dict[str, Any]:
    """Every service's targets, tier, criticality and sites, as plain data."""
    return {
        name: {
            "rto_s": svc.rto,
            "rpo_s": svc.rpo,
            "tier": svc.tier,
            "criticality": svc.criticality,
            "sites": list(svc.sites),
            "capability": inventory.capability_of(name),
        }
        for name, svc in inventory.services.items()
    }


def run_service_row(run_id: str, service: str, targets: dict[str, Any]) -> RunService:
    target = targets.get(service, {})
    return RunService(
        run_id=run_id,
        service=service,
        rto_target_s=target.get("rto_s"),
        rpo_target_s=target.get("rpo_s"),
        tier=target.get("tier"),
        criticality=target.get("criticality"),
        sites=target.get("sites", []),
    )


class DatabaseTimeout(TimeoutError):
    """The evidence database gave no answer in time; the transaction was abandoned before its commit."""


class EvidenceInDoubt(RuntimeError):
    """A commit was sent and no answer came in time: its events may or may not be in the database."""


def database_unreachable(exc: BaseException) -> bool:
    """Whether ``exc`` says the evidence database cannot be reached or does not answer (connection
    refused or lost, timeouts, a SQLite file that cannot be opened or written), as opposed to a record
    the database refuses or a programming error."""
    if isinstance(exc, (TimeoutError, ConnectionError, sa_exc.TimeoutError, sa_exc.DisconnectionError)):
        return True
    if isinstance(exc, sa_exc.DBAPIError):
        return exc.connection_invalidated or isinstance(exc, (sa_exc.OperationalError, sa_exc.InterfaceError))
    return isinstance(exc, OSError)


class EvidenceFallback(Protocol):
    """Where a store keeps events while the database is unreachable (dr_orchestrator.cluster.journal)."""

    def append(self, events: Sequence[Event], rollbacks: Mapping[str, Mapping[str, str]]) -> None:
        """Keep ``events`` durably, in order, before returning. ``rollbacks``: the rollback actions of
        runs that start journaling here (their delivery needs them when the run's start is not journaled)."""

    def pending(self) -> bool:
        """Whether some record appended is not delivered yet."""


class _Ticket:
    """One bounded transaction: abandoned by the writer before its commit starts, or committed."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._state = "waiting"  # waiting | committing | abandoned

    def committing(self) -> bool:
        with self._lock:
            if self._state == "abandoned":
                return False
            self._state = "committing"
            return True

    def abandon(self) -> bool:
        """True when the transaction will not commit (it had not started to)."""
        with self._lock:
            if self._state == "committing":
                return False
            self._state = "abandoned"
            return True

    @property
    def abandoned(self) -> bool:
        with self._lock:
            return self._state == "abandoned"


class _Abandoned(Exception):
    pass


class EvidenceStore:
    """``store(event)`` (or call the store itself: it is an ``Observer``) for every engine event."""

    def __init__(self, session_factory: Callable[[], Session], retention: int | None = None, *,
                 fallback: EvidenceFallback | None = None, db_wait_s: float = DB_WAIT_S) -> None:
        """``retention``: years to keep each run's record (default: ``retention_years()``). ``fallback``:
        where events go while the database is unreachable; then no transaction is waited on for more
        than ``db_wait_s`` (see the module's docstring)."""
        self._sessions = session_factory
        self._retention_years = retention_years(retention)
        self._fallback = fallback
        self._db_wait_s = db_wait_s
        self._journaling: set[str] = set()  # runs whose events go to the fallback until it is delivered
        self._db_tasks: queue.SimpleQueue[tuple[Callable[[], None], Future[None]]] = queue.SimpleQueue()
        self._db_worker: threading.Thread | None = None
        # Done now, not on the first event: it takes ~80 ms, which would delay the run's start.
        configure_mappers()
        self._lock = threading.Lock()  # one transaction at a time from this store
        self._queued: list[tuple[Event, Future[None]]] = []
        self._wakeup = threading.Condition()
        self._writer: threading.Thread | None = None
        self._newest: Future[None] | None = None  # the last event queued
        # Rollback actions by run and step, for naming the action on rollback step rows.
        self._rollback_actions: dict[str, dict[str, str]] = {}
        self._git_lookups: dict[str, threading.Thread] = {}  # run id -> the lookup of its runbook's git commit
        # The newest step row per (run, step, phase) and attempt row per (run, step row, attempt) this store
        # wrote: the hot path then reads nothing back. Cleared when a transaction fails.
        self._step_rows: dict[tuple[str, str, str], StepRecord] = {}
        self._attempt_rows: dict[tuple[str, int, int], Attempt] = {}
        self._handlers: dict[type[Any], Callable[[Session, Any], None]] = {
            RunStarted: self._run_started,
            StepStarted: self._step_started,
            AttemptStarted: self._attempt_started,
            AttemptFinished: self._attempt_finished,
            StepFinished: self._step_finished,
            ProbeResult: self._probe,
            MarkerReached: self._marker,
            Measurement: self._measurement,
            ActionEvent: self._action_event,
            ApprovalRequested: self._approval_requested,
            ApprovalDecided: self._approval_decided,
            RunResumed: self._run_resumed,
            RunFinished: self._run_finished,
        }

    def __call__(self, event: Event) -> None:
        """The observer: queue ``event``; wait for its commit when a crash must not lose it."""
        wait = self.submit(event)
        if wait is not None:
            wait()

    def submit(self, event: Event) -> Callable[[], None] | None:
        """Queue ``event``; for one a crash must not lose, return the wait for its commit, which the
        caller makes before going on but outside its own locks (the engine's other branches keep
        emitting meanwhile, queued in order behind it)."""
        written = self._queue(event)
        if isinstance(event, DURABLE_BEFORE_RETURN) or (isinstance(event, AttemptStarted) and not event.repeatable):
            return lambda: self._wait_durable(event, written)
        return None

    def _wait_durable(self, event: Event, written: Future[None]) -> None:
        if self._fallback is None:
            written.result()
            return
        try:  # the database is given db_wait_s (twice when its commit was sent), then the journal its fsync
            written.result(timeout=2 * self._db_wait_s + 5.0)
        except FutureTimeout:
            log.error("evidence of %s for run %s not confirmed durable in time; the run goes on",
                      type(event).__name__, event.run_id)

    def store(self, event: Event) -> None:
        """Write ``event`` and return once it is committed; database errors propagate to the caller."""
        self._queue(event).result()

    def flush(self) -> None:
        """Return once every event queued so far is committed (or failed, and was logged)."""
        with self._wakeup:
            newest = self._newest
        if newest is not None:
            newest.exception()  # events are written, or given up, in the order they were queued

    def _queue(self, event: Event) -> Future[None]:
        if type(event) not in self._handlers:
            raise KeyError(f"the evidence store has no record for {type(event).__name__}")
        if isinstance(event, RunFinished):  # the run's provenance is part of its record: queued before its end
            lookup = self._git_lookups.pop(event.run_id, None)
            if lookup is not None:
                lookup.join()
        written: Future[None] = Future()
        with self._wakeup:
            self._queued.append((event, written))
            self._newest = written
            if self._writer is None:
                self._writer = threading.Thread(target=self._write_queued, name="evidence-writer", daemon=True)
                self._writer.start()
            self._wakeup.notify()
        if isinstance(event, RunStarted):
            # Two git commands take 10-20 ms, more on a busy host: not on the run's critical path.
            lookup = threading.Thread(target=self._queue_git_commit, args=(event,), name="git-provenance",
                                      daemon=True)
            self._git_lookups[event.run_id] = lookup
            lookup.start()
        return written

    def _queue_git_commit(self, event: RunStarted) -> None:
        """The checkout the runbook came from, as an action event of the run's start (asked of git
        beside the run, outside any database transaction, bounded by git's own timeout; nothing when
        the runbook is in no git work tree)."""
        source = event.plan.runbook_source
        found = git_commit_of(source.path, source.sha256)
        if found is not None:
            self._queue(ActionEvent(event.run_id, "", GIT_COMMIT_EVENT, event.at, found))

    def _write_queued(self) -> None:
        while True:
            with self._wakeup:
                if not self._queued:
                    self._wakeup.wait(WRITER_IDLE_S)
                if not self._queued:
                    self._writer = None
                    return
                batch, self._queued = self._queued, []
            self._write(batch)

    def _write(self, batch: list[tuple[Event, Future[None]]]) -> None:
        """All of ``batch`` in one transaction; if that fails, each event in its own, so that one bad
        record loses nothing else (its error goes to whoever waits for it, or to the log)."""
        if self._fallback is not None:
            self._write_or_journal(batch, self._fallback)
            return
        try:
            self._transaction(event for event, _written in batch)
        except Exception:  # noqa: BLE001 - retried one by one below, where each error is reported
            self._forget_rows()
        else:
            for _event, written in batch:
                written.set_result(None)
            return
        for event, written in batch:
            try:
                self._transaction([event])
            except Exception as exc:  # noqa: BLE001 - handed to the waiter, or logged
                self._forget_rows()
                log.error("evidence of %s for run %s not written: %s", type(event).__name__,
                          getattr(event, "run_id", "?"), exc)
                written.set_exception(exc)
            else:
                written.set_result(None)

    def _transaction(self, events: Any, also: Callable[[Session], None] | None = None,
                     ticket: _Ticket | None = None) -> None:
        with self._lock:
            if ticket is not None and ticket.abandoned:
                return  # the writer journaled these events meanwhile
            try:
                with self._sessions() as session, session.begin():
                    session.info[HASH_FROM_INSTANCES] = True  # handlers write JSON-ready values and aware datetimes
                    session.connection(execution_options=WRITE_TRANSACTION)
                    for event in events:
                        self._handlers[type(event)](session, event)
                    if also is not None:
                        also(session)
                    if ticket is not None:
                        session.flush()
                        if not ticket.committing():
                            raise _Abandoned()
            except BaseException:
                if ticket is not None:  # forgotten here, under the lock: the writer may have gone on
                    self._forget_rows()
                raise

    # -- with a fallback: bounded transactions, and the journal while the database is unreachable --

    def replay(self, events: Sequence[Event], also: Callable[[Session], None] | None = None) -> None:
        """Write ``events`` in one transaction, as the writer does (a journal's delivery), and call
        ``also(session)`` in that transaction. Raises when it fails; then nothing of it was written."""
        try:
            self._transaction(events, also)
        except BaseException:
            self._forget_rows()
            raise

    def rollback_actions(self, run_id: str) -> dict[str, str]:
        """The rollback action of each step of ``run_id`` that has one, as this store knows them."""
        return dict(self._rollback_actions.get(run_id, {}))

    def remember_rollback_actions(self, run_id: str, actions: Mapping[str, str]) -> None:
        """For a delivery that goes on with a run whose start it did not replay."""
        self._rollback_actions[run_id] = dict(actions)

    def _bounded_transaction(self, events: list[Event]) -> None:
        """A transaction on the database worker thread, waited on for ``db_wait_s``: abandoned
        (DatabaseTimeout) when its commit has not started by then, EvidenceInDoubt when the commit
        was sent and no answer came in twice that time."""
        ticket = _Ticket()
        done: Future[None] = Future()
        with self._wakeup:
            if self._db_worker is None or not self._db_worker.is_alive():
                self._db_worker = threading.Thread(target=self._run_db_tasks, name="evidence-db", daemon=True)
                self._db_worker.start()
            # Under the lock: the worker ends only when it finds no task under it.
            self._db_tasks.put((lambda: self._transaction(events, ticket=ticket), done))
        try:
            done.result(timeout=self._db_wait_s)
            return
        except FutureTimeout:
            if ticket.abandon():
                raise DatabaseTimeout(f"no answer from the evidence database in {self._db_wait_s} s") from None
        try:
            done.result(timeout=self._db_wait_s)
        except FutureTimeout:
            raise EvidenceInDoubt(f"the evidence database did not answer a commit in {2 * self._db_wait_s} s: "
                                  "its events may or may not be recorded") from None

    def _run_db_tasks(self) -> None:
        while True:
            try:
                task, done = self._db_tasks.get(timeout=WRITER_IDLE_S)
            except queue.Empty:
                with self._wakeup:
                    if self._db_tasks.empty():
                        self._db_worker = None
                        return
                continue
            try:
                task()
            except BaseException as exc:  # noqa: BLE001 - handed to the writer
                done.set_exception(exc)
            else:
                done.set_result(None)

    def _write_or_journal(self, batch: list[tuple[Event, Future[None]]], fallback: EvidenceFallback) -> None:
        """``batch`` in order: the events of runs that journal to the fallback, the others to the database
        (all in one transaction, else one by one); a run whose database write finds it unreachable
        journals from that event on. Runs journal until the fallback has delivered everything."""
        if self._journaling and not fallback.pending():
            self._journaling.clear()
            self._forget_rows()  # the delivery changed rows this store may hold
        started: list[str] = []

        def journal_from_now(run_id: str) -> None:
            if run_id not in self._journaling:
                self._journaling.add(run_id)
                started.append(run_id)

        to_db = [(event, written) for event, written in batch if event.run_id not in self._journaling]
        if to_db:
            try:
                self._bounded_transaction([event for event, _written in to_db])
            except Exception as exc:  # noqa: BLE001 - journaled, or retried one by one below
                self._forget_rows()
                if database_unreachable(exc) or isinstance(exc, EvidenceInDoubt):
                    log.warning("evidence database unreachable (%s: %s): journaling", type(exc).__name__, exc)
                    for event, written in to_db:
                        journal_from_now(event.run_id)
                        if isinstance(exc, EvidenceInDoubt):
                            written.set_exception(exc)
                else:
                    self._write_one_by_one(to_db, journal_from_now)
            else:
                for _event, written in to_db:
                    written.set_result(None)
        journaled = [(event, written) for event, written in batch
                     if event.run_id in self._journaling and not written.done()]
        if not journaled:
            return
        rollbacks = {run_id: self.rollback_actions(run_id) for run_id in started}
        try:
            fallback.append([event for event, _written in journaled], rollbacks)
        except Exception as exc:  # noqa: BLE001 - handed to the waiter, or logged
            log.error("evidence of run(s) %s neither written nor journaled: %s",
                      ", ".join(sorted({event.run_id for event, _ in journaled})), exc)
            for _event, written in journaled:
                written.set_exception(exc)
            return
        for event, written in journaled:
            if isinstance(event, RunFinished):
                self._rollback_actions.pop(event.run_id, None)
            written.set_result(None)

    def _write_one_by_one(self, events: list[tuple[Event, Future[None]]],
                          journal_from_now: Callable[[str], None]) -> None:
        for event, written in events:
            if event.run_id in self._journaling:
                continue  # journaled after the loop, in order
            try:
                self._bounded_transaction([event])
            except Exception as exc:  # noqa: BLE001 - journaled, handed to the waiter, or logged
                self._forget_rows()
                if database_unreachable(exc) or isinstance(exc, EvidenceInDoubt):
                    journal_from_now(event.run_id)
                    if isinstance(exc, EvidenceInDoubt):
                        written.set_exception(exc)
                    continue
                log.error("evidence of %s for run %s not written: %s", type(event).__name__, event.run_id, exc)
                written.set_exception(exc)
            else:
                written.set_result(None)

    def _forget_rows(self) -> None:
        self._step_rows.clear()
        self._attempt_rows.clear()

    @staticmethod
    def _attach(session: Session, row: Any) -> Any:
        """``row`` (kept from an earlier transaction) in ``session``: the session's own copy if it has one."""
        state = inspect(row)
        if state.session_id == session.hash_key:
            return row
        key = state.identity_key
        if key is not None and key in session.identity_map:
            return session.identity_map[key]
        session.add(row)
        return row

    # -- runs ---------------------------------------------------------------------------------

    def _run_started(self, session: Session, event: RunStarted) -> None:
        plan = event.plan
        targets = target_snapshot(plan)
        incident_id = incidents.incident_of_run(session, plan, event.run_id, event.at)
        session.add(
            Run(
                id=event.run_id,
                runbook_name=plan.runbook.name,
                kind=plan.kind.value,
                state=RunState.RUNNING.value,
                trigger=plan.trigger,
                started_by=plan.started_by,
                reason=clean_text(plan.reason),
                orchestrator_host=event.host,
                incident_at=plan.incident_at,
                started_at=event.at,
                runbook_path=plan.runbook_source.path,
                runbook_sha256=plan.runbook_source.sha256,
                runbook_text=plan.runbook_source.text,
                inventory_name=plan.inventory.name,
                inventory_path=plan.inventory_source.path,
                inventory_sha256=plan.inventory_source.sha256,
                inventory_text=plan.inventory_source.text,
                parameters=jsonable(plan.parameters),
                parameters_sha256=plan.parameters_sha256,
                sites=plan.sites_in_scope(),
                targets=targets,
                forced=list(plan.forced),
                test_type=plan.test_type or derive_test_type(plan.kind, plan.trigger, plan.scenario),
                scenario=maybe_text(plan.scenario or None),
                failback_of=plan.failback_of,
                retain_until=years_after(event.at, self._retention_years),
                pre_approved_by=plan.pre_approved_by,
                incident_id=incident_id,
            )
        )
        session.flush()  # the run row first: the rows below refer to it
        session.add_all(run_service_row(event.run_id, name, targets) for name in plan.services_in_scope())
        # One multi-row INSERT (the ORM would send one per row, to learn each id), then read back
        # once: the ids for the attempts, and the rows as stored for the audit chain.
        if plan.runbook.steps:
            session.execute(insert(StepRecord), [
                {"run_id": event.run_id, "step_id": step.id, "phase": Phase.FORWARD.value, "action": step.action,
                 "service": plan.service_of(step), "site": step.site, "state": StepState.PENDING.value}
                for step in plan.runbook.steps
            ])
        rows = session.scalars(select(StepRecord).where(StepRecord.run_id == event.run_id).order_by(StepRecord.id))
        chained = []
        for row in rows:
            self._step_rows[(event.run_id, row.step_id, Phase.FORWARD)] = row
            chained.append((CHAINED_TABLES[StepRecord.__tablename__], "insert", instance_row(row)))
        append_rows(session.connection(), chained)
        self._remember_rollbacks(event.run_id, plan)

    def _remember_rollbacks(self, run_id: str, plan: RunPlan) -> None:
        self._rollback_actions[run_id] = {
            step.id: step.rollback.action for step in plan.runbook.steps if step.rollback is not None
        }

    def _run_resumed(self, session: Session, event: RunResumed) -> None:
        """Same run, same record: it goes on; who resumed it, and how, is an audit event."""
        run = session.get_one(Run, event.run_id)
        run.state, run.finished_at, run.error = RunState.RUNNING.value, None, None
        session.add(AuditEvent(
            at=event.at, actor=clean_text(event.actor), action="run.resumed", target=event.run_id,
            data=jsonable({"host": event.host, "reason": event.reason, "retried": event.retried,
                           "marked_done": event.marked_done}),
        ))
        self._remember_rollbacks(event.run_id, event.plan)

    def _run_finished(self, session: Session, event: RunFinished) -> None:
        run = session.get_one(Run, event.run_id)
        run.state = event.state.value
        run.finished_at = event.at
        run.error = maybe_text(event.error)
        self._rollback_actions.pop(event.run_id, None)
        for step_key in [key for key in self._step_rows if key[0] == event.run_id]:
            del self._step_rows[step_key]
        for attempt_key in [key for key in self._attempt_rows if key[0] == event.run_id]:
            del self._attempt_rows[attempt_key]
        self._write_results(session, run)

    def _write_results(self, session: Session, run: Run) -> None:
        markers = [
            rto.MarkerFact(m.service, m.at, m.step_id, m.id)
            for m in session.scalars(
                select(Marker).where(Marker.run_id == run.id, Marker.marker == rto.RESTORED_MARKER).order_by(Marker.id)
            )
        ]
        approvals = [
            rto.Interval(s.started_at, s.finished_at, s.step_id)
            for s in session.scalars(
                select(StepRecord)
                .where(StepRecord.run_id == run.id, StepRecord.action == rto.APPROVAL_ACTION)
                .order_by(StepRecord.id)
            )
            if s.started_at is not None and s.finished_at is not None
        ]
        readings = [
            rto.RpoReading(m.service, m.value, m.method, m.at, m.step_id, m.id)
            for m in session.scalars(
                select(MeasurementRecord)
                .where(MeasurementRecord.run_id == run.id, MeasurementRecord.metric == rto.RPO_METRIC)
                .order_by(MeasurementRecord.id)
            )
        ]
        scope = list(session.scalars(select(RunService).where(RunService.run_id == run.id).order_by(RunService.id)))
        known = {row.service for row in scope}
        named = {m.service for m in markers} | {r.service for r in readings}
        added = [
            run_service_row(run.id, name, run.targets) for name in sorted(n for n in named if n and n not in known)
        ]
        session.add_all(added)
        targets = {row.service: rto.Targets(row.rto_target_s, row.rpo_target_s) for row in scope + added}
        disruption_at = session.scalar(
            select(func.min(Marker.at)).where(Marker.run_id == run.id, Marker.marker == rto.DISRUPTION_MARKER)
        )
        refusals = [
            rto.RpoRefusal(service, str(e.data.get("reason")), e.step_id, e.id)
            for e in session.scalars(select(ActionEventRecord).where(
                ActionEventRecord.run_id == run.id, ActionEventRecord.kind == rto.RPO_NOT_MEASURED
            ).order_by(ActionEventRecord.id))
            for service in e.data.get("services") or [None]
        ]
        impacts, first_attempt = incidents.impact_facts(session, run)
        # The run's own declared time, or its incident's when that is earlier.
        incident = session.get(Incident, run.incident_id) if run.incident_id else None
        declared = min((t for t in (run.incident_at, incident.declared_at if incident else None) if t is not None),
                       default=None)
        figures = rto.service_figures(targets, run.started_at, declared, markers, approvals, readings, disruption_at,
                                      impacts=impacts, first_attempt=first_attempt, refusals=refusals,
                                      failover=run.kind == RunKind.FAILOVER.value)
        incidents.record_impact_start(session, run, figures)
        for fig in figures:
            session.add(
                ServiceResult(
                    run_id=run.id,
                    service=fig.service,
                    incident_at=fig.incident_at,
                    run_started_at=fig.run_started_at,
                    restored_at=fig.restored_at,
                    detection_s=fig.detection_s,
                    decision_s=fig.decision_s,
                    execution_s=fig.execution_s,
                    rto_s=fig.rto_s,
                    rto_target_s=fig.rto_target_s,
                    rto_met=fig.rto_met,
                    rto_method=fig.rto_method,
                    rpo_s=fig.rpo_s,
                    rpo_target_s=fig.rpo_target_s,
                    rpo_met=fig.rpo_met,
                    rpo_method=fig.rpo_method,
                    raw=fig.raw,
                )
            )

    # -- steps and attempts -----------------------------------------------------------------

    def _latest_step(self, session: Session, run_id: str, step_id: str, phase: str) -> StepRecord | None:
        key = (run_id, step_id, phase)
        row = self._step_rows.get(key)
        if row is None:
            row = session.scalars(
                select(StepRecord)
                .where(StepRecord.run_id == run_id, StepRecord.step_id == step_id, StepRecord.phase == phase)
                .order_by(StepRecord.id.desc())
                .limit(1)
            ).first()
            if row is None:
                return None
        row = self._attach(session, row)
        self._step_rows[key] = row
        return row

    def _new_step(self, session: Session, run_id: str, step_id: str, phase: str) -> StepRecord:
        """A step row the run did not announce: a rollback, or a step run again (resume)."""
        forward = self._latest_step(session, run_id, step_id, Phase.FORWARD)
        if phase == Phase.ROLLBACK:
            action = self._rollback_actions.get(run_id, {}).get(step_id)
        else:
            action = forward.action if forward else None
        row = StepRecord(
            run_id=run_id,
            step_id=step_id,
            phase=phase,
            action=action,
            service=forward.service if forward else None,
            site=forward.site if forward else None,
            state=StepState.PENDING.value,
        )
        session.add(row)
        self._step_rows[(run_id, step_id, phase)] = row
        return row

    def _step_for_start(self, session: Session, run_id: str, step_id: str, phase: str) -> StepRecord:
        row = self._latest_step(session, run_id, step_id, phase)
        if row is not None and row.started_at is None and row.state == StepState.PENDING.value:
            return row
        return self._new_step(session, run_id, step_id, phase)

    def _step_started(self, session: Session, event: StepStarted) -> None:
        row = self._step_for_start(session, event.run_id, event.step_id, event.phase)
        row.state = StepState.RUNNING.value
        row.started_at = event.at
        row.rendered = jsonable(event.rendered)

    def _step_finished(self, session: Session, event: StepFinished) -> None:
        row = self._latest_step(session, event.run_id, event.step_id, event.phase)
        if row is None or row.finished_at is not None:  # the latest ended before a resume
            row = self._new_step(session, event.run_id, event.step_id, event.phase)
        row.state = event.state.value
        row.finished_at = event.at
        row.output = jsonable(event.output)
        row.error = maybe_text(event.error)

    def _step_of_attempt(self, session: Session, run_id: str, step_id: str, phase: str) -> StepRecord:
        row = self._latest_step(session, run_id, step_id, phase)
        if row is None:
            row = self._new_step(session, run_id, step_id, phase)
        if row.id is None:
            session.flush()  # its id is needed
        return row

    def _attempt_started(self, session: Session, event: AttemptStarted) -> None:
        step = self._step_of_attempt(session, event.run_id, event.step_id, event.phase)
        row = Attempt(
            run_id=event.run_id,
            step_pk=step.id,
            step_id=event.step_id,
            phase=event.phase,
            attempt=event.attempt,
            state=StepState.RUNNING.value,
            started_at=event.at,
        )
        session.add(row)
        self._attempt_rows[(event.run_id, step.id, event.attempt)] = row

    def _attempt_finished(self, session: Session, event: AttemptFinished) -> None:
        step = self._step_of_attempt(session, event.run_id, event.step_id, event.phase)
        key = (event.run_id, step.id, event.attempt)
        row = self._attempt_rows.pop(key, None)
        if row is not None:
            row = self._attach(session, row)
        else:
            row = session.scalars(
                select(Attempt).where(Attempt.step_pk == step.id, Attempt.attempt == event.attempt)
            ).first()
        if row is None:
            row = Attempt(
                run_id=event.run_id, step_pk=step.id, step_id=event.step_id, phase=event.phase, attempt=event.attempt
            )
            session.add(row)
        row.state = event.state.value
        row.finished_at = event.at
        row.duration_s = event.duration_s
        row.output = jsonable(event.output)
        row.error = maybe_text(event.error)

    # -- what actions report ------------------------------------------------------------------

    def _probe(self, session: Session, event: ProbeResult) -> None:
        session.add(
            Probe(
                run_id=event.run_id,
                step_id=event.step_id,
                attempt=event.attempt,
                at=event.at,
                target=clean_text(event.target),
                ok=event.ok,
                latency_ms=event.latency_ms,
                detail=clean_text(event.detail),
            )
        )

    def _marker(self, session: Session, event: MarkerReached) -> None:
        session.add(
            Marker(
                run_id=event.run_id,
                step_id=event.step_id,
                marker=event.marker,
                service=event.service,
                site=event.site,
                at=event.at,
            )
        )

    def _measurement(self, session: Session, event: Measurement) -> None:
        session.add(
            MeasurementRecord(
                run_id=event.run_id,
                step_id=event.step_id,
                service=event.service,
                metric=event.metric,
                value=event.value,
                method=clean_text(event.method),
                raw=jsonable(event.raw),
                at=event.at,
            )
        )

    def _action_event(self, session: Session, event: ActionEvent) -> None:
        session.add(
            ActionEventRecord(
                run_id=event.run_id, step_id=event.step_id, kind=event.kind, at=event.at, data=jsonable(event.data)
            )
        )
        if event.kind == IMPACT:
            session.add(impact_finding(session.get_one(Run, event.run_id), event))

    # -- approval gates -------------------------------------------------------------------------

    def _approval_requested(self, session: Session, event: ApprovalRequested) -> None:
        step = self._latest_step(session, event.run_id, event.step_id, Phase.FORWARD)
        if step is not None and step.finished_at is None:
            step.state = StepState.WAITING_APPROVAL.value
        run = session.get_one(Run, event.run_id)
        if run.state == RunState.RUNNING.value:
            run.state = RunState.WAITING_APPROVAL.value
        session.add(ActionEventRecord(
            run_id=event.run_id, step_id=event.step_id, kind="approval.requested", at=event.at,
            data=jsonable({"message": event.message, "started_by": event.started_by, "two_person": event.two_person,
                           "timeout_s": event.timeout_s, "on_timeout": event.on_timeout}),
        ))

    def _approval_decided(self, session: Session, event: ApprovalDecided) -> None:
        # An engineer's decision, and a saved plan's approval taken by the run, are recorded already.
        if str(event.source) not in (DecisionSource.ENGINEER.value, DecisionSource.SAVED_PLAN.value):
            session.add(Approval(run_id=event.run_id, step_id=event.step_id, decision=str(event.decision),
                                 actor=clean_text(event.actor), at=event.at,
                                 reason=clean_text(event.reason)))
        step = self._latest_step(session, event.run_id, event.step_id, Phase.FORWARD)
        if step is not None and step.state == StepState.WAITING_APPROVAL.value:
            step.state = StepState.RUNNING.value
        session.flush()
        run = session.get_one(Run, event.run_id)
        still_waiting = session.scalars(
            select(StepRecord.id).where(StepRecord.run_id == event.run_id,
                                        StepRecord.state == StepState.WAITING_APPROVAL.value).limit(1)
        ).first()
        if run.state == RunState.WAITING_APPROVAL.value and still_waiting is None:
            run.state = RunState.RUNNING.value


IMPACT = "blast_radius.impact"  # a service the run found serving and left not serving
# A finding's severity and how many days it may stay open, from the tier of the service that got worse.
IMPACT_SEVERITY = {"critical": ("critical", 1), "important": ("high", 7), "standard": ("medium", 30)}


def impact_finding(run: Run, event: ActionEvent) -> Finding:
    """The finding an impact opens, owned by whoever started the run until someone takes it over."""
    data = event.data
    severity, days = IMPACT_SEVERITY.get(str(data.get("tier")), ("medium", 30))
    return Finding(run_id=run.id, severity=severity, owner=run.started_by, due=(event.at + timedelta(days=days)).date(),
                   text=clean_text(f"blast radius: {data.get('service')} served before the run and did not after it "
                                   f"({data.get('after')})"),
                   created_by="dr-orchestrator", created_at=event.at)
