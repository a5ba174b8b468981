"""A node's local evidence journal: where the evidence store writes while the database is unreachable,
and its delivery into the database once it is back, as if the store had been up all along.

The journal is one append-only file, a line per record: ``<sha256 of the JSON> <JSON>``. The first line
is a header naming the journal (a random id) and the node that keeps it; each next record has the next
sequence number (1, 2, ...). ``append`` writes its lines with one ``write`` and returns after ``fsync``
(the directory is fsynced when the file is created), so what it acknowledged survives a SIGKILL or a
power cut. A last line cut short by a crash (no newline, a checksum that does not match) is ignored
when reading and cut off before the next append; a bad line before a good one is corruption
(JournalCorrupt), never skipped.

Records are events of the engine (every type, faithfully: datetimes as ISO-8601 UTC, a RunStarted's
plan as the RunPlan's own JSON, free-form data as the store would write it), a run's context (the
rollback actions of a run that journals after its start was written to the database), or a watch's
incident write (the incident it opened and decided while the database was away, and its later
moments), delivered through the incidents' own functions before the runs that refer to it.

``deliver`` replays the undelivered records through the evidence store's own handlers, in order, a
batch per transaction. Each transaction also writes an audit event ``evidence.journal_delivered``
naming the journal, the node that journaled and the node delivering, and the sequence numbers it
covers: the delivery's progress is committed with the evidence itself, so a delivery killed at any
point resumes after the last committed batch and never writes a record twice. A local file
``<journal>.delivered`` caches that progress for status displays (the database is the authority).

``JournalFallback`` joins the two for ``EvidenceStore(sessions, fallback=...)``: it journals what the
store cannot write and delivers from a background thread, retrying while the database is away.
"""

from __future__ import annotations

import dataclasses
import enum
import fcntl
import hashlib
import json
import logging
import os
import socket
import threading
import time
import types
import typing
import uuid
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from sqlalchemy import select
from sqlalchemy.orm import Session

from dr_orchestrator.evidence.incidents import apply_incident_operation
from dr_orchestrator.evidence.models import AuditEvent
from dr_orchestrator.evidence.store import EvidenceStore, database_unreachable
from dr_orchestrator.evidence.values import jsonable
from dr_orchestrator.model import events as event_types
from dr_orchestrator.model.events import Event, RunFinished, RunResumed, RunStarted, utcnow
from dr_orchestrator.model.run import RunPlan

log = logging.getLogger(__name__)

Sessions = Callable[[], Session]
VERSION = 1
DELIVERED_ACTION = "evidence.journal_delivered"
DELIVERY_ACTOR = "dr (journal delivery)"
DELIVERY_BATCH = 200  # records per delivery transaction
RETRY_S = 1.0  # how often a fallback tries to deliver while the database is away
EVENT_TYPES: dict[str, type[Any]] = {cls.__name__: cls for cls in typing.get_args(Event)}


class JournalError(RuntimeError):
    pass


class JournalCorrupt(JournalError):
    """A record before the last one is damaged: the journal is not read past it."""


class JournalBusy(JournalError):
    """Another process appends to this journal."""


# -- events as JSON ---------------------------------------------------------------------------------


def _utc_text(moment: datetime) -> str:
    if moment.tzinfo is None or moment.utcoffset() is None:
        raise ValueError(f"naive datetime {moment.isoformat()} refused: evidence timestamps carry a time zone")
    return moment.astimezone(UTC).isoformat(timespec="microseconds")


def _encode(value: Any, hint: Any) -> Any:
    if value is None:
        return None
    if isinstance(value, datetime):
        return _utc_text(value)
    if isinstance(value, RunPlan):
        return value.model_dump(mode="json")
    if isinstance(value, enum.Enum):
        return value.value
    if isinstance(value, tuple):
        return list(value)
    if isinstance(value, dict):
        return _plain(value)
    return value


def _plain(value: Any) -> Any:
    """Free-form data (outputs, parameters): as is where JSON holds it, else as the store would write
    it (``jsonable``, which the store applies again on delivery with the same result)."""
    if isinstance(value, dict):
        return {key if isinstance(key, str) else str(key): _plain(item) for key, item in value.items()}
    if isinstance(value, (list, tuple)):
        return [_plain(item) for item in value]
    if value is None or isinstance(value, (str, bool, int, float)):
        return value
    return jsonable(value)


def _decode(value: Any, hint: Any) -> Any:
    if value is None:
        return None
    origin = typing.get_origin(hint)
    if origin is types.UnionType or origin is typing.Union:
        (hint,) = [arg for arg in typing.get_args(hint) if arg is not type(None)]
        origin = typing.get_origin(hint)
    if hint is datetime:
        moment = datetime.fromisoformat(value)
        return moment.astimezone(UTC)
    if hint is RunPlan:
        return RunPlan.model_validate(value)
    if isinstance(hint, type) and issubclass(hint, enum.Enum):
        return hint(value)
    if origin is tuple:
        return tuple(value)
    if hint is float:
        return float(value)
    return value


def encode_event(event: Event) -> dict[str, Any]:
    """``event`` as JSON data: ``{"type": "StepStarted", "fields": {...}}``."""
    hints = typing.get_type_hints(type(event), vars(event_types))
    return {
        "type": type(event).__name__,
        "fields": {f.name: _encode(getattr(event, f.name), hints[f.name]) for f in dataclasses.fields(event)},
    }


def decode_event(data: Mapping[str, Any]) -> Event:
    """The event ``encode_event`` made ``data`` of."""
    cls = EVENT_TYPES[data["type"]]
    hints = typing.get_type_hints(cls, vars(event_types))
    fields = data["fields"]
    event: Event = cls(**{f.name: _decode(fields[f.name], hints[f.name]) for f in dataclasses.fields(cls)
                          if f.name in fields})
    return event


# -- records --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class JournalRecord:
    seq: int
    run_id: str
    written_at: datetime
    event: Event | None = None  # an engine event, or
    rollbacks: dict[str, str] | None = None  # a run's context: its steps' rollback actions, or
    incident: dict[str, Any] | None = None  # a watch's incident write (``incident_operation``)


@dataclass(frozen=True)
class JournalHeader:
    journal_id: str
    node: str
    created_at: datetime


@dataclass
class JournalContents:
    header: JournalHeader | None  # None: no journal (or one whose creation never finished)
    records: list[JournalRecord] = field(default_factory=list)
    good_size: int = 0  # bytes of whole, valid lines
    torn: bool = False  # a damaged last line was ignored

    @property
    def last_seq(self) -> int:
        return self.records[-1].seq if self.records else 0


def _line(body: dict[str, Any]) -> bytes:
    text = json.dumps(body, sort_keys=True, separators=(",", ":"), ensure_ascii=False)
    return f"{hashlib.sha256(text.encode()).hexdigest()} {text}\n".encode()


def _parse(line: bytes) -> dict[str, Any] | None:
    """The body of a whole, intact line, else None."""
    if not line.endswith(b"\n"):
        return None
    checksum, _, text = line[:-1].partition(b" ")
    if hashlib.sha256(text).hexdigest().encode() != checksum:
        return None
    try:
        body = json.loads(text)
    except ValueError:
        return None
    return body if isinstance(body, dict) else None


def _record(body: dict[str, Any]) -> JournalRecord:
    written_at = datetime.fromisoformat(body["written_at"]).astimezone(UTC)
    if body["kind"] == "event":
        return JournalRecord(body["seq"], body["run_id"], written_at, event=decode_event(body["event"]))
    if body["kind"] == "incident":
        return JournalRecord(body["seq"], body["run_id"], written_at, incident=dict(body["incident"]))
    return JournalRecord(body["seq"], body["run_id"], written_at, rollbacks=dict(body["rollbacks"]))


def read_journal(path: str | Path) -> JournalContents:
    """Every intact record of the journal at ``path``, in order; a damaged last line is left out
    (``torn``). JournalCorrupt when a damaged line has an intact one after it."""
    try:
        data = Path(path).read_bytes()
    except FileNotFoundError:
        return JournalContents(None)
    lines = data.splitlines(keepends=True)
    contents = JournalContents(None)
    offset = 0
    for index, line in enumerate(lines):
        body = _parse(line)
        expected = contents.last_seq + 1 if contents.header else 0
        if body is None or body.get("seq") != expected or (expected == 0) != (body.get("kind") == "header"):
            if any(_parse(later) is not None for later in lines[index + 1:]):
                raise JournalCorrupt(f"{path}: line {index + 1} (byte {offset}) is damaged and records follow it")
            contents.torn = True
            break
        if expected == 0:
            contents.header = JournalHeader(body["journal_id"], body["node"],
                                            datetime.fromisoformat(body["created_at"]).astimezone(UTC))
        else:
            contents.records.append(_record(body))
        offset += len(line)
        contents.good_size = offset
    return contents


def _fsync_directory(directory: Path) -> None:
    fd = os.open(directory, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _write_durably(path: Path, data: bytes) -> None:
    """``path`` holds ``data`` (replaced whole, by rename) once this returns, even after a power cut."""
    temporary = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    fd = os.open(temporary, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    try:
        os.write(fd, data)
        os.fsync(fd)
    finally:
        os.close(fd)
    os.replace(temporary, path)
    _fsync_directory(path.parent)


class EvidenceJournal:
    """``EvidenceJournal(path)``: the journal at ``path``, created if absent, opened for appending by
    this process alone (JournalBusy otherwise). ``node`` names the node keeping it (default: the host name)."""

    def __init__(self, path: str | Path, node: str | None = None) -> None:
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._lock = threading.Lock()
        self._lock_file = os.open(self.path.with_name(self.path.name + ".lock"), os.O_RDWR | os.O_CREAT, 0o600)
        try:
            fcntl.flock(self._lock_file, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(self._lock_file)
            raise JournalBusy(f"{self.path} is kept by another process") from None
        try:
            contents = read_journal(self.path)
            if contents.header is None:
                header = JournalHeader(str(uuid.uuid4()), node or socket.gethostname(), utcnow())
                _write_durably(self.path, _line({
                    "seq": 0, "kind": "header", "version": VERSION, "journal_id": header.journal_id,
                    "node": header.node, "created_at": _utc_text(header.created_at)}))
                contents = JournalContents(header, good_size=self.path.stat().st_size)
            self.header: JournalHeader = contents.header  # type: ignore[assignment]
            self._fd = os.open(self.path, os.O_WRONLY | os.O_APPEND)
            if contents.torn:  # cut off what a crash left half-written, before anything follows it
                log.warning("evidence journal %s: a damaged last record was dropped (a crash while writing it)",
                            self.path)
                os.ftruncate(self._fd, contents.good_size)
                os.fsync(self._fd)
        except BaseException:
            os.close(self._lock_file)
            raise
        self._size = contents.good_size
        self._last_seq = contents.last_seq

    @property
    def journal_id(self) -> str:
        return self.header.journal_id

    @property
    def node(self) -> str:
        return self.header.node

    @property
    def last_seq(self) -> int:
        with self._lock:
            return self._last_seq

    def append(self, events: Sequence[Event], rollbacks: Mapping[str, Mapping[str, str]] | None = None) -> int:
        """Journal each run's context in ``rollbacks``, then ``events``, in order; returns the last
        sequence number once they are on disk (fsynced)."""
        bodies: list[dict[str, Any]] = [
            {"kind": "context", "run_id": run_id, "rollbacks": dict(actions)}
            for run_id, actions in (rollbacks or {}).items()
        ]
        bodies += [{"kind": "event", "run_id": event.run_id, "event": encode_event(event)} for event in events]
        return self._append(bodies)

    def append_incident(self, operation: Mapping[str, Any]) -> int:
        """Journal a watch's incident write (``evidence.incidents.incident_operation``), fsynced."""
        return self._append([{"kind": "incident", "run_id": "", "incident": jsonable(dict(operation))}])

    def _append(self, bodies: list[dict[str, Any]]) -> int:
        now = _utc_text(utcnow())
        with self._lock:
            seq = self._last_seq
            lines = []
            for body in bodies:
                seq += 1
                lines.append(_line({**body, "seq": seq, "written_at": now}))
            data = b"".join(lines)
            try:
                written = 0
                while written < len(data):
                    written += os.write(self._fd, data[written:])
                os.fsync(self._fd)
            except BaseException:
                try:  # leave no half-written record for the next append to follow
                    os.ftruncate(self._fd, self._size)
                except OSError:
                    pass
                raise
            self._size += len(data)
            self._last_seq = seq
            return seq

    def contents(self) -> JournalContents:
        with self._lock:
            return read_journal(self.path)

    def close(self) -> None:
        with self._lock:
            if self._fd >= 0:
                os.close(self._fd)
                os.close(self._lock_file)  # frees the flock
                self._fd = -1

    def __enter__(self) -> EvidenceJournal:
        return self

    def __exit__(self, *_exc: object) -> None:
        self.close()


def delivered_file(path: str | Path) -> Path:
    path = Path(path)
    return path.with_name(path.name + ".delivered")


def delivered_locally(path: str | Path) -> int:
    """The last sequence number this host knows delivered (0 when none); the database has the final word."""
    try:
        return int(json.loads(delivered_file(path).read_text())["through"])
    except (FileNotFoundError, ValueError, KeyError, TypeError):
        return 0


def backlog(path: str | Path) -> int:
    """How many records of the journal at ``path`` wait for delivery, as far as this host knows."""
    contents = read_journal(path)
    return max(0, contents.last_seq - delivered_locally(path))


# -- delivery ---------------------------------------------------------------------------------------


@dataclass
class Delivery:
    journal_id: str | None
    node: str | None
    delivered: int = 0  # records delivered by this call
    through: int = 0  # the last sequence number delivered (by anyone)
    last_seq: int = 0  # the journal's last record
    failed: list[dict[str, Any]] = field(default_factory=list)  # records the database refused
    seconds: float = 0.0

    @property
    def complete(self) -> bool:
        return self.through >= self.last_seq


def delivered_through(session: Session, journal_id: str) -> int:
    """The last sequence number of the journal the database holds."""
    rows = session.scalars(select(AuditEvent.data).where(AuditEvent.action == DELIVERED_ACTION,
                                                         AuditEvent.target == journal_id))
    return max((int(data.get("last_seq", 0)) for data in rows), default=0)


def _remember(store: EvidenceStore, record: JournalRecord) -> None:
    """What a delivery must know of records delivered before it: the runs' rollback actions."""
    event = record.event
    if record.rollbacks is not None:
        store.remember_rollback_actions(record.run_id, record.rollbacks)
    elif isinstance(event, (RunStarted, RunResumed)):
        store.remember_rollback_actions(event.run_id, {
            step.id: step.rollback.action for step in event.plan.runbook.steps if step.rollback is not None})
    elif isinstance(event, RunFinished):
        store.remember_rollback_actions(event.run_id, {})


def deliver(journal: EvidenceJournal | str | Path, sessions: Sessions, *, retention: int | None = None,
            delivered_by: str | None = None, batch: int = DELIVERY_BATCH, limit: int | None = None,
            lock_timeout_s: float = 30.0) -> Delivery:
    """Write the journal's undelivered records into the evidence database, in order, a batch per
    transaction with its ``evidence.journal_delivered`` audit event; ``limit``: at most that many records.
    Idempotent. Raises the database's error when it is unreachable (what was committed stays
    delivered); a record the database refuses is named in the batch's audit event and skipped."""
    started = time.monotonic()
    path = journal.path if isinstance(journal, EvidenceJournal) else Path(journal)
    with _DeliveryLock(path, lock_timeout_s):
        contents = journal.contents() if isinstance(journal, EvidenceJournal) else read_journal(path)
        header = contents.header
        report = Delivery(header.journal_id if header else None, header.node if header else None,
                          last_seq=contents.last_seq)
        if header is None:
            return report
        with sessions() as session:
            report.through = delivered_through(session, header.journal_id)
        store = EvidenceStore(sessions, retention)
        pending = []
        for record in contents.records:
            if record.seq <= report.through:
                _remember(store, record)
            else:
                pending.append(record)
        if limit is not None:
            pending = pending[:limit]
        audit = {"journal": str(path), "node": header.node, "delivered_by": delivered_by or socket.gethostname()}
        for chunk in _segments(pending, batch):
            try:
                _deliver_chunk(store, header, chunk, audit)
            except Exception as exc:  # noqa: BLE001 - unreachable: raised; else one record at a time
                if database_unreachable(exc):
                    _note_progress(path, report)
                    raise
                for record in chunk:
                    try:
                        _deliver_chunk(store, header, [record], audit)
                    except Exception as refused:  # noqa: BLE001 - named in the evidence, never silently lost
                        if database_unreachable(refused):
                            _note_progress(path, report)
                            raise
                        log.error("journal %s record %d refused by the evidence database: %s",
                                  header.journal_id, record.seq, refused)
                        failure = {"seq": record.seq, "run_id": record.run_id,
                                   "type": type(record.event).__name__, "error": str(refused)}
                        _deliver_chunk(store, header, [], audit, seqs=(record.seq, record.seq), failed=[failure])
                        report.failed.append(failure)
                    report.delivered += 1
                    report.through = record.seq
            else:
                report.delivered += len(chunk)
                report.through = chunk[-1].seq
            for record in chunk:
                _remember(store, record)
        _note_progress(path, report)
        report.seconds = time.monotonic() - started
        return report


def _segments(records: list[JournalRecord], batch: int) -> Iterator[list[JournalRecord]]:
    """``records`` in order, at most ``batch`` at a time, incident writes apart from engine events (a
    transaction replays either through the store's handlers or through the incidents' functions)."""
    segment: list[JournalRecord] = []
    for record in records:
        if segment and (len(segment) >= batch or (record.incident is None) != (segment[-1].incident is None)):
            yield segment
            segment = []
        segment.append(record)
    if segment:
        yield segment


def _deliver_chunk(store: EvidenceStore, header: JournalHeader, chunk: list[JournalRecord], audit: dict[str, Any],
                   seqs: tuple[int, int] | None = None, failed: list[dict[str, Any]] | None = None) -> None:
    events = [record.event for record in chunk if record.event is not None]
    operations = [record.incident for record in chunk if record.incident is not None]
    for record in chunk:
        if record.rollbacks is not None:
            store.remember_rollback_actions(record.run_id, record.rollbacks)
    first, last = seqs or (chunk[0].seq, chunk[-1].seq)
    moments = [record.written_at for record in chunk]
    data = {**audit, "first_seq": first, "last_seq": last, "events": len(events),
            "runs": sorted({record.run_id for record in chunk if record.run_id}),
            "incident_writes": len(operations),
            "journaled_from": _utc_text(min(moments)) if moments else None,
            "journaled_to": _utc_text(max(moments)) if moments else None}
    if failed:
        data["failed"] = failed

    def mark(session: Session) -> None:
        for operation in operations:
            apply_incident_operation(session, operation)
        session.add(AuditEvent(at=utcnow(), actor=DELIVERY_ACTOR, action=DELIVERED_ACTION, target=header.journal_id,
                               data=jsonable(data)))

    store.replay(events, also=mark)


def _note_progress(path: Path, report: Delivery) -> None:
    if report.through and report.through > delivered_locally(path):
        _write_durably(delivered_file(path), json.dumps(
            {"journal_id": report.journal_id, "through": report.through, "at": _utc_text(utcnow())}).encode())


class _DeliveryLock:
    """One delivery of a journal at a time, across processes."""

    def __init__(self, path: Path, timeout_s: float) -> None:
        self.path = path.with_name(path.name + ".deliver.lock")
        self.timeout_s = timeout_s
        self.fd = -1

    def __enter__(self) -> None:
        self.fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o600)
        deadline = time.monotonic() + self.timeout_s
        while True:
            try:
                fcntl.flock(self.fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                return
            except BlockingIOError:
                if time.monotonic() >= deadline:
                    os.close(self.fd)
                    raise JournalBusy(f"another delivery of {self.path.parent} is under way") from None
                time.sleep(0.01)

    def __exit__(self, *_exc: object) -> None:
        os.close(self.fd)


# -- the store's fallback -------------------------------------------------------------------------------


class JournalFallback:
    """``EvidenceStore(sessions, fallback=JournalFallback(journal, sessions))``: what the store cannot
    write goes to ``journal``; a background thread delivers it, retrying every ``retry_s`` while the
    database is away. A backlog left by an earlier process is delivered from the start."""

    def __init__(self, journal: EvidenceJournal, sessions: Sessions, *, retention: int | None = None,
                 retry_s: float = RETRY_S, node: str | None = None) -> None:
        self.journal = journal
        self._sessions = sessions
        self._retention = retention
        self._retry_s = retry_s
        self._node = node or journal.node
        self._delivered = delivered_locally(journal.path)
        self._wake = threading.Event()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._thread_lock = threading.Lock()
        self.last_error: BaseException | None = None
        if self.pending():
            self._start()

    def append(self, events: Sequence[Event], rollbacks: Mapping[str, Mapping[str, str]]) -> None:
        self.journal.append(events, rollbacks)
        self._start()

    def append_incident(self, operation: Mapping[str, Any]) -> None:
        self.journal.append_incident(operation)
        self._start()

    def pending(self) -> bool:
        return self._delivered < self.journal.last_seq

    def deliver_now(self) -> Delivery:
        report = deliver(self.journal, self._sessions, retention=self._retention, delivered_by=self._node)
        self._delivered = max(self._delivered, report.through)
        return report

    def wait_delivered(self, timeout_s: float) -> bool:
        """Whether everything journaled so far got delivered within ``timeout_s``."""
        deadline = time.monotonic() + timeout_s
        while self.pending():
            if time.monotonic() >= deadline:
                return False
            self._wake.set()
            time.sleep(0.01)
        return True

    def close(self, timeout_s: float = 5.0) -> None:
        self._stop.set()
        self._wake.set()
        thread = self._thread
        if thread is not None:
            thread.join(timeout_s)

    def _start(self) -> None:
        with self._thread_lock:
            if self._thread is None or not self._thread.is_alive():
                self._stop.clear()
                self._thread = threading.Thread(target=self._deliver_until_done, name="journal-delivery", daemon=True)
                self._thread.start()
            self._wake.set()

    def _deliver_until_done(self) -> None:
        while not self._stop.is_set():
            if not self.pending():
                self._wake.clear()
                if not self.pending():  # nothing came meanwhile: wait for the next append
                    if not self._wake.wait(self._retry_s * 5):
                        with self._thread_lock:
                            if not self.pending():
                                self._thread = None
                                return
                    continue
            try:
                self.deliver_now()
                self.last_error = None
            except Exception as exc:  # noqa: BLE001 - the database is away (or refuses): try again later
                if not database_unreachable(exc):
                    log.error("evidence journal %s: delivery failed: %s", self.journal.path, exc)
                self.last_error = exc
                self._stop.wait(self._retry_s)


def iter_events(path: str | Path) -> Iterator[Event]:
    """The journal's events, in order (for inspection)."""
    for record in read_journal(path).records:
        if record.event is not None:
            yield record.event
