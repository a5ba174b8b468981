"""The local evidence journal (issue 15, item 4): every event type kept faithfully, a torn last record
ignored, a run whose evidence database goes away midway finishing with its evidence journaled and then
delivered (same rows as if the database had stayed, chain intact, delivery idempotent and resumable),
and nothing acknowledged lost to a SIGKILL."""

from __future__ import annotations

import contextlib
import os
import select as select_module
import signal
import socket
import sqlite3
import struct
import subprocess
import sys
import textwrap
import threading
import time
from collections.abc import Callable, Iterator
from datetime import UTC, datetime, timedelta, timezone
from pathlib import Path
from typing import Any

import pytest
from evidence_runs import small_plan
from sqlalchemy import Integer, select
from sqlalchemy.orm import Session, sessionmaker

from dr_orchestrator.actions import default_registry
from dr_orchestrator.actions.base import Action, ActionContext, ActionResult, Params
from dr_orchestrator.cluster.journal import (
    DELIVERED_ACTION,
    EVENT_TYPES,
    EvidenceJournal,
    JournalCorrupt,
    JournalFallback,
    backlog,
    deliver,
    read_journal,
)
from dr_orchestrator.engine import Engine
from dr_orchestrator.evidence import migrate
from dr_orchestrator.evidence.chain import CHAINED_TABLES, verify_session
from dr_orchestrator.evidence.database import make_engine, make_session_factory
from dr_orchestrator.evidence.models import AuditEvent, StepRecord
from dr_orchestrator.evidence.store import EvidenceStore
from dr_orchestrator.model.approval import Decision, DecisionSource
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
from dr_orchestrator.model.run import RunState, StepState
from dr_orchestrator.model.runbook import OnFailure, Step
from dr_orchestrator.plans import build_plan

REPO = Path(__file__).resolve().parents[1]
AT = datetime(2026, 12, 7, 9, 30, 1, 123456, tzinfo=UTC)


def every_event(run_id: str = "run-1") -> list[Event]:
    plan = small_plan(fail=True)
    paris = timezone(timedelta(hours=1))
    return [
        RunStarted(run_id, AT, plan, "node-a"),
        StepStarted(run_id, "promote", AT, rendered={"message": "x\x00y", "n": 1.5, "list": [1, None]}),
        AttemptStarted(run_id, "promote", 1, AT.astimezone(paris), repeatable=False),
        AttemptFinished(run_id, "promote", 1, AT, StepState.SUCCEEDED, 0.25, {"ok": True}, None),
        StepFinished(run_id, "promote", AT, StepState.FAILED, {}, "it broke: ünïcode", phase="rollback"),
        ProbeResult(run_id, "verify", 2, AT, "http://front-door/trading/health", False, 12.0, "timeout"),
        MarkerReached(run_id, "verify", "service_restored", "trading", None, AT),
        Measurement(run_id, "verify", None, "rpo_s", 0.5, "replay LSN", {"lsn": "0/3", "nested": {"a": [1]}}, AT),
        ActionEvent(run_id, "", "git.commit", AT, {"commit": "abc"}),
        ApprovalRequested(run_id, "gate", AT, "go?", "alice", True, 600.0, "reject"),
        ApprovalDecided(run_id, "gate", AT, Decision.APPROVED, "bob", "fine", DecisionSource.TIMEOUT),
        RunResumed(run_id, AT, plan, "node-b", "carol", "takeover", ("verify",), ("promote",)),
        RunFinished(run_id, AT, RunState.SUCCEEDED, None),
    ]


def test_every_event_type_comes_back_from_the_journal_as_it_went_in(tmp_path: Path) -> None:
    events = every_event()
    assert {type(e).__name__ for e in events} == set(EVENT_TYPES)  # a new event type needs a case here
    loaded = build_plan(str(REPO / "runbooks/site-failover.yml"), str(REPO / "inventories/lab.yml"),
                        started_by="alice")
    events.append(RunStarted("run-2", AT, loaded, "node-a"))
    with EvidenceJournal(tmp_path / "journal", node="node-a") as journal:
        assert journal.append(events[:3], {"run-0": {"promote": "noop"}}) == 4
        assert journal.append(events[3:]) == 4 + len(events) - 3
    contents = read_journal(tmp_path / "journal")
    assert contents.header is not None and contents.header.node == "node-a" and not contents.torn
    assert contents.records[0].rollbacks == {"promote": "noop"} and contents.records[0].run_id == "run-0"
    back = [record.event for record in contents.records[1:]]
    assert back == events
    for before, after in zip(events, back, strict=True):
        assert after is not None and after.at.tzinfo is not None and after.at.utcoffset() == timedelta(0)
        assert after.at == before.at
    assert [r.seq for r in contents.records] == list(range(1, len(events) + 2))
    assert (tmp_path / "journal").stat().st_mode & 0o777 == 0o600


def test_a_torn_last_record_is_ignored_and_cut_off_before_the_next_append(tmp_path: Path) -> None:
    path = tmp_path / "journal"
    events = every_event()
    with EvidenceJournal(path) as journal:
        journal.append(events[:3])
    whole = path.read_bytes()
    with EvidenceJournal(path) as journal:
        journal.append(events[3:4])
    fourth = path.read_bytes()[len(whole):]
    path.write_bytes(whole + fourth[: len(fourth) // 2])  # killed in the middle of writing the fourth
    contents = read_journal(path)
    assert contents.torn and [r.event for r in contents.records] == events[:3]
    path.write_bytes(whole + fourth[:-1])  # all but its newline
    assert read_journal(path).torn and read_journal(path).last_seq == 3
    path.write_bytes(whole + fourth.replace(b"promote", b"promotE"))  # whole, but not what was written
    assert read_journal(path).torn and read_journal(path).last_seq == 3
    with EvidenceJournal(path) as journal:
        assert journal.last_seq == 3
        assert journal.append(events[4:6]) == 5
    contents = read_journal(path)
    assert not contents.torn and [r.event for r in contents.records] == events[:3] + events[4:6]
    # A damaged record with good ones after it is corruption, never skipped.
    lines = path.read_bytes().splitlines(keepends=True)
    lines[2] = lines[2].replace(b"promote", b"promotE")
    path.write_bytes(b"".join(lines))
    with pytest.raises(JournalCorrupt, match="line 3"):
        read_journal(path)


# -- a run whose evidence database goes away ------------------------------------------------------------

CUT: list[Callable[[], None]] = []  # what the `test.cut_evidence` step does


class CutParams(Params):
    pass


class CutEvidence(Action[CutParams]):
    """The evidence database goes away while the run runs."""

    name = "test.cut_evidence"
    Params = CutParams
    idempotent = True

    def run(self, params: CutParams, ctx: ActionContext) -> ActionResult:
        for cut in CUT:
            cut()
        return ActionResult(output={"cut": True})


class Capture:
    def __init__(self) -> None:
        self.events: list[Event] = []

    def __call__(self, event: Event) -> None:
        self.events.append(event)


def plan_with_cut() -> Any:
    """Promote, cut the evidence database, restore (probes, marks, a measurement), fail, roll back."""
    plan = small_plan(fail=True)
    steps = list(plan.runbook.steps)
    steps.insert(1, Step(id="cut", action="test.cut_evidence", needs=("promote",)))
    steps[2] = steps[2].model_copy(update={"needs": ("cut",)})
    steps[3] = steps[3].model_copy(update={"on_failure": OnFailure.ROLLBACK})
    return plan.model_copy(update={"runbook": plan.runbook.model_copy(update={"steps": tuple(steps)})})


def run_plan(store: EvidenceStore, capture: Capture | None = None) -> Any:
    registry = default_registry()
    registry.register("test.restore", "evidence_runs:Restore")
    registry.register("test.cut_evidence", CutEvidence)
    observers: list[Any] = [store] + ([capture] if capture else [])
    return Engine(registry, observers, host="node-a", cancel_grace=1.0).run(plan_with_cut())


def evidence_rows(sessions: sessionmaker[Session]) -> dict[str, list[dict[str, Any]]]:
    """Every evidence row but when it was recorded (and the deliveries' own audit events).

    Integer row ids, and the references to them, become the row's position in its table: PostgreSQL
    spends a sequence value on an insert whose transaction the cut rolled back, so a delivered row may
    get a later id than it would have; the order and the links are what must be the same."""
    with sessions() as session:
        rows = {}
        positions: dict[str, dict[int, int]] = {}
        for name, table in CHAINED_TABLES.items():
            found = [
                {k: v for k, v in row.items() if k != "recorded_at"}
                for row in session.execute(select(table).order_by(*table.primary_key.columns)).mappings()
            ]
            if name == AuditEvent.__tablename__:
                found = [row for row in found if row["action"] != DELIVERED_ACTION]
            if "id" in table.c and isinstance(table.c.id.type, Integer):
                positions[name] = {row["id"]: position for position, row in enumerate(found, 1)}
            rows[name] = found
        for name, table in CHAINED_TABLES.items():
            for column in table.c:
                targets = [fk.column.table.name for fk in column.foreign_keys if fk.column.table.name in positions]
                if column.name == "id" and name in positions:
                    targets = [name]
                for target in targets:
                    for row in rows[name]:
                        if row[column.name] is not None:
                            row[column.name] = positions[target].get(row[column.name], row[column.name])
        # A service result's figures name the rows they came from (rto.py): those ids become positions too.
        for row in rows["service_results"]:
            for key, table_name in (("restored_marker", "markers"), ("rpo_measurement", "measurements"),
                                    ("rpo_refusal", "action_events")):
                source = (row["raw"] or {}).get(key)
                if isinstance(source, dict) and source.get("id") is not None:
                    source["id"] = positions[table_name].get(source["id"], source["id"])
        return rows


def chain_ok(sessions: sessionmaker[Session]) -> tuple[int, str]:
    with sessions() as session:
        report = verify_session(session)
    assert report.ok, report.first and report.first.describe()
    return report.head_seq, report.head_sha256


def reference_rows(tmp_path: Path, events: list[Event]) -> dict[str, list[dict[str, Any]]]:
    """The rows a store that never lost its database writes for ``events``."""
    url = f"sqlite:///{tmp_path / 'reference.db'}"
    migrate.upgrade(url)
    engine = make_engine(url)
    try:
        sessions = make_session_factory(engine)
        store = EvidenceStore(sessions)
        for event in events:
            store.store(event)
        chain_ok(sessions)
        return evidence_rows(sessions)
    finally:
        engine.dispose()


class SqliteGoesAway:
    """The database's directory moves away (new connections fail: 'unable to open database file')."""

    def __init__(self, tmp_path: Path) -> None:
        self.directory = tmp_path / "db"
        self.directory.mkdir()
        self.url = f"sqlite:///{self.directory / 'evidence.db'}"
        migrate.upgrade(self.url)
        self.engine = make_engine(self.url)
        self.sessions = make_session_factory(self.engine)

    def cut(self) -> None:
        self.directory.rename(self.directory.with_name("db.away"))
        self.engine.dispose()

    def restore(self) -> None:
        self.directory.with_name("db.away").rename(self.directory)

    def close(self) -> None:
        self.engine.dispose()


class Proxy:
    """A TCP proxy in front of PostgreSQL that can be cut: open connections are reset, new ones are
    accepted and closed at once. The listener stays bound throughout: a port given back while cut could
    be taken by another socket before the restore (the test would then fail, not the product)."""

    def __init__(self, target: tuple[str, int]) -> None:
        self.target = target
        self.listener = socket.create_server(("127.0.0.1", 0))
        self.port = self.listener.getsockname()[1]
        self.sockets: list[socket.socket] = []
        self.lock = threading.Lock()
        self.up = True
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self) -> None:
        while True:
            try:
                client, _ = self.listener.accept()
            except OSError:
                return
            with self.lock:
                up = self.up
            if not up:
                _reset(client)
                continue
            try:
                server = socket.create_connection(self.target)
            except OSError:
                client.close()
                continue
            with self.lock:
                if not self.up:
                    _reset(client)
                    server.close()
                    continue
                self.sockets += [client, server]
            for a, b in ((client, server), (server, client)):
                threading.Thread(target=self._pump, args=(a, b), daemon=True).start()

    @staticmethod
    def _pump(source: socket.socket, sink: socket.socket) -> None:
        with contextlib.suppress(OSError):
            while data := source.recv(65536):
                sink.sendall(data)
        with contextlib.suppress(OSError):
            sink.shutdown(socket.SHUT_RDWR)

    def cut(self) -> None:
        with self.lock:
            self.up = False
            for sock in self.sockets:
                with contextlib.suppress(OSError):
                    sock.shutdown(socket.SHUT_RDWR)
                sock.close()
            self.sockets = []

    def restore(self) -> None:
        with self.lock:
            self.up = True

    def close(self) -> None:
        self.cut()
        self.listener.close()


def _reset(connection: socket.socket) -> None:
    """Close with a reset (SO_LINGER 0), as a host that refuses would answer."""
    with contextlib.suppress(OSError):
        connection.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    connection.close()


class PostgresGoesAway:
    def __init__(self, url: str) -> None:
        from sqlalchemy.engine import make_url

        migrate.upgrade(url)
        parsed = make_url(url)
        self.proxy = Proxy((parsed.host or "127.0.0.1", parsed.port or 5432))
        self.engine = make_engine(parsed.set(host="127.0.0.1", port=self.proxy.port).render_as_string(False))
        self.sessions = make_session_factory(self.engine)

    def cut(self) -> None:
        self.proxy.cut()

    def restore(self) -> None:
        self.proxy.restore()

    def close(self) -> None:
        self.proxy.close()
        self.engine.dispose()


@pytest.fixture(params=["sqlite", pytest.param("postgresql", marks=pytest.mark.postgres)])
def evidence_db(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[Any]:
    if request.param == "sqlite":
        db: Any = SqliteGoesAway(tmp_path)
    else:
        db = PostgresGoesAway(str(request.getfixturevalue("postgres_database_url")))
    try:
        yield db
    finally:
        CUT.clear()
        db.close()


def test_a_run_whose_evidence_database_goes_away_finishes_and_its_evidence_is_delivered_whole(
        evidence_db: Any, tmp_path: Path) -> None:
    journal = EvidenceJournal(tmp_path / "node-a.journal", node="node-a")
    fallback = JournalFallback(journal, evidence_db.sessions, retry_s=0.05)
    store = EvidenceStore(evidence_db.sessions, fallback=fallback, db_wait_s=2.0)
    capture = Capture()
    CUT.append(evidence_db.cut)
    try:
        started = time.monotonic()
        outcome = run_plan(store, capture)
        store.flush()
        took = time.monotonic() - started
        assert outcome.state == RunState.FAILED, outcome
        assert outcome.steps["verify"] == StepState.SUCCEEDED and outcome.steps["never"] == StepState.SKIPPED
        assert took < 5.0  # the run never waited on the missing database (bounded, and refused at once here)
        journaled = [r.event for r in read_journal(journal.path).records if r.event is not None]
        assert journaled, "nothing was journaled"
        # From the cut on, every event of the run is journaled, in order; the ones before it are in the database.
        first = capture.events.index(journaled[0])
        assert journaled == capture.events[first:]
        assert isinstance(journaled[-1], RunFinished)
        assert any(isinstance(e, StepFinished) and e.phase == "rollback" for e in journaled)
        assert fallback.pending()
        evidence_db.restore()
        assert fallback.wait_delivered(10.0), fallback.last_error
    finally:
        fallback.close()
        journal.close()
    head = chain_ok(evidence_db.sessions)
    rows = evidence_rows(evidence_db.sessions)
    assert rows == reference_rows(tmp_path, capture.events)
    with evidence_db.sessions() as session:
        rollback = session.scalars(select(StepRecord).where(StepRecord.phase == "rollback")).one()
        assert rollback.action == "noop"  # known from the run's context record: its start was not journaled
        audit = session.scalars(select(AuditEvent).where(AuditEvent.action == DELIVERED_ACTION)).all()
    assert audit and audit[0].data["node"] == "node-a" and audit[-1].data["last_seq"] == read_journal(
        journal.path).last_seq
    again = deliver(journal.path, evidence_db.sessions)
    assert again.delivered == 0 and again.complete
    assert chain_ok(evidence_db.sessions) == head and evidence_rows(evidence_db.sessions) == rows
    assert backlog(journal.path) == 0


def test_the_store_waits_no_longer_than_its_bound_for_a_database_that_hangs(tmp_path: Path) -> None:
    """A database that never answers (SQLite held by another writer: 30 s busy timeout) costs a run
    ``db_wait_s`` once; its events are journaled and delivered when the database frees up."""
    db = SqliteGoesAway(tmp_path)
    journal = EvidenceJournal(tmp_path / "journal")
    fallback = JournalFallback(journal, db.sessions, retry_s=0.05)
    store = EvidenceStore(db.sessions, fallback=fallback, db_wait_s=0.3)
    holder = sqlite3.connect(db.directory / "evidence.db", timeout=10, isolation_level=None,
                             check_same_thread=False)
    capture = Capture()
    CUT.append(lambda: holder.execute("BEGIN EXCLUSIVE"))
    try:
        started = time.monotonic()
        outcome = run_plan(store, capture)
        store.flush()
        assert outcome.state == RunState.FAILED and time.monotonic() - started < 3.0
        assert holder.in_transaction  # the database was held from the cut on
        assert read_journal(journal.path).records and fallback.pending()
        holder.execute("ROLLBACK")
        assert fallback.wait_delivered(10.0), fallback.last_error
    finally:
        CUT.clear()
        holder.close()
        fallback.close()
        journal.close()
        db.close()
    chain_ok(db.sessions)
    assert evidence_rows(db.sessions) == reference_rows(tmp_path, capture.events)


@pytest.mark.slow
def test_a_delivery_stopped_midway_goes_on_without_writing_anything_twice(tmp_path: Path) -> None:
    db = SqliteGoesAway(tmp_path)
    try:
        events = [e for e in every_event("run-9") if not isinstance(e, (RunResumed, ApprovalRequested,
                                                                          ApprovalDecided))]
        with EvidenceJournal(tmp_path / "journal", node="node-b") as journal:
            for event in events:
                journal.append([event])
        first = deliver(tmp_path / "journal", db.sessions, batch=2, limit=5)
        assert (first.delivered, first.through, first.complete) == (5, 5, False)
        assert backlog(tmp_path / "journal") == len(events) - 5
        # Killed after its last commit, before noting it locally: the database knows where it stands.
        (tmp_path / "journal.delivered").unlink()
        rest = deliver(tmp_path / "journal", db.sessions, batch=2)
        assert (rest.delivered, rest.through, rest.complete) == (len(events) - 5, len(events), True)
        head = chain_ok(db.sessions)
        rows = evidence_rows(db.sessions)
        assert rows == reference_rows(tmp_path, events)
        assert deliver(tmp_path / "journal", db.sessions).delivered == 0
        assert chain_ok(db.sessions) == head and evidence_rows(db.sessions) == rows
    finally:
        db.close()


WRITER = textwrap.dedent("""
    import sys
    from datetime import UTC, datetime
    from dr_orchestrator.cluster.journal import EvidenceJournal
    from dr_orchestrator.model.events import ProbeResult
    journal = EvidenceJournal(sys.argv[1], node="node-k")
    n = 0
    while True:
        n += 1
        at = datetime.now(UTC)
        seq = journal.append([ProbeResult("run-k", "verify", 1, at, "t" * (n % 3000), True, 1.0, str(n))])
        print(seq, flush=True)
""")


def test_sigkill_while_journaling_loses_nothing_acknowledged(tmp_path: Path) -> None:
    path = tmp_path / "journal"
    process = subprocess.Popen([sys.executable, "-c", WRITER, str(path)], stdout=subprocess.PIPE, cwd=REPO)
    acknowledged = 0
    try:
        assert process.stdout is not None
        buffered = b""
        deadline = time.monotonic() + 20.0
        while acknowledged < 200:
            assert time.monotonic() < deadline, f"only {acknowledged} records acknowledged"
            ready, _, _ = select_module.select([process.stdout], [], [], max(0.0, deadline - time.monotonic()))
            if ready:
                chunk = os.read(process.stdout.fileno(), 65536)
                assert chunk, f"the writer ended: {process.wait()}"
                buffered += chunk
                *lines, buffered = buffered.split(b"\n")
                if lines:
                    acknowledged = int(lines[-1])
        os.kill(process.pid, signal.SIGKILL)
    finally:
        if process.poll() is None:
            process.kill()
        process.wait(10)
        if process.stdout is not None:
            process.stdout.close()
    contents = read_journal(path)
    assert contents.last_seq >= acknowledged
    assert [r.seq for r in contents.records] == list(range(1, contents.last_seq + 1))
    assert [r.event.detail for r in contents.records if isinstance(r.event, ProbeResult)] == [
        str(n) for n in range(1, contents.last_seq + 1)]
    with EvidenceJournal(path) as journal:  # opens after the crash, and goes on
        assert journal.append(every_event()[:1]) == contents.last_seq + 1
