"""Anchors: signed checkpoints of the audit chain's head, kept outside the database.

The chain (``chain.py``) shows that records agree with it; someone able to rewrite the database can
recompute every hash and the chain agrees again. An anchor says, signed with an Ed25519 key that is
not in the database: "at time T the chain had SEQ entries and entry SEQ hashed to H". Written to
sinks the database's owner cannot rewrite (a file on another machine, an S3 bucket under Object Lock,
a webhook receiver), anchors let ``check_anchors`` find a rewrite or a truncation of anything up to the
newest anchor: entry SEQ's hash covers every entry before it through the links.

An anchor is one JSON object: the signed statement (``format``, ``seq``, ``head_sha256``, ``at``,
``key`` (the public key's fingerprint), ``run_id`` (the run whose end made it, or null), ``host``)
plus ``signature``, base64 of the Ed25519 signature of the statement's canonical JSON.

This module makes, signs, writes (the local file sink) and checks anchors; the sinks that reach out
through actions (S3, webhook) and the run-end hook are composed in ``dr_orchestrator/anchoring.py``.
"""

from __future__ import annotations

import base64
import binascii
import json
import os
import socket
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Any, Protocol

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey
from sqlalchemy import Connection, select
from sqlalchemy.exc import SQLAlchemyError
from sqlalchemy.orm import Session

from dr_orchestrator.evidence.annotations import record_audit_event
from dr_orchestrator.evidence.chain import ENTRIES, canonical_json, chain_head
from dr_orchestrator.evidence.models import AuditEvent, Run
from dr_orchestrator.evidence.signing import fingerprint, signature_valid
from dr_orchestrator.model.events import utcnow

FORMAT = "dr-orchestrator/chain-anchor/v1"
AUDIT_ACTION = "evidence.anchor"
_NAMED_RECORDS = 5  # records named for a rewritten range; the rest are counted


class AnchorUnreadable(ValueError):
    """An anchor that is not one: one sentence saying what is wrong with it."""


@dataclass(frozen=True)
class Anchor:
    seq: int
    head_sha256: str
    at: datetime
    key: str  # fingerprint of the public key that checks the signature
    signature: str  # base64
    run_id: str | None = None
    host: str = ""

    def statement(self) -> dict[str, Any]:
        return {"format": FORMAT, "seq": self.seq, "head_sha256": self.head_sha256, "at": self.at.isoformat(),
                "key": self.key, "run_id": self.run_id, "host": self.host}

    def message(self) -> bytes:
        return canonical_json(self.statement()).encode()

    def as_dict(self) -> dict[str, Any]:
        return self.statement() | {"signature": self.signature}

    def line(self) -> bytes:
        """One line of a JSONL sink."""
        return canonical_json(self.as_dict()).encode() + b"\n"

    @classmethod
    def from_dict(cls, data: Any) -> Anchor:
        if not isinstance(data, dict):
            raise AnchorUnreadable("not a JSON object")
        if data.get("format") != FORMAT:
            raise AnchorUnreadable(f"format is {data.get('format')!r}, not {FORMAT!r}")
        try:
            seq, head, at = data["seq"], data["head_sha256"], datetime.fromisoformat(data["at"])
            key, signature = data["key"], data["signature"]
        except KeyError as exc:
            raise AnchorUnreadable(f"field {exc.args[0]!r} is missing") from None
        except (TypeError, ValueError):
            raise AnchorUnreadable(f"time {data.get('at')!r} is not ISO-8601") from None
        if not isinstance(seq, int) or isinstance(seq, bool) or seq < 0:
            raise AnchorUnreadable(f"seq {seq!r} is not a whole number")
        if not all(isinstance(value, str) for value in (head, key, signature)) or at.tzinfo is None:
            raise AnchorUnreadable("head_sha256, key and signature must be text and at must have a time zone")
        run_id, host = data.get("run_id"), data.get("host", "")
        if not (run_id is None or isinstance(run_id, str)) or not isinstance(host, str):
            raise AnchorUnreadable("run_id and host must be text")
        return cls(seq=seq, head_sha256=head, at=at, key=key, signature=signature, run_id=run_id, host=host)

    def signed_by(self, key: Ed25519PublicKey) -> bool:
        try:
            raw = base64.b64decode(self.signature, validate=True)
        except (binascii.Error, ValueError):
            return False
        return signature_valid(key, raw, self.message())


def make_anchor(connection: Connection, key: Ed25519PrivateKey, run_id: str | None = None) -> Anchor:
    """Sign the chain's head as ``connection`` sees it now."""
    seq, head = chain_head(connection)
    unsigned = Anchor(seq=seq, head_sha256=head, at=utcnow(), key=fingerprint(key.public_key()), signature="",
                      run_id=run_id, host=socket.gethostname())
    signature = base64.b64encode(key.sign(unsigned.message())).decode()
    return Anchor(**{**unsigned.__dict__, "signature": signature})


# -- sinks ------------------------------------------------------------------------------------------


class Sink(Protocol):
    @property
    def name(self) -> str:
        """Where, for people (no secrets)."""

    def write(self, anchor: Anchor) -> str:
        """Store the anchor; return what was stored where. Raise on failure."""


@dataclass(frozen=True)
class FileSink:
    """A local append-only file: one JSON line per anchor, appended (O_APPEND) and fsynced. Worth most
    on another machine's file system, or with the append-only attribute (chattr +a)."""

    path: Path

    @property
    def name(self) -> str:
        return f"file:{self.path}"

    def write(self, anchor: Anchor) -> str:
        created = not self.path.exists()
        descriptor = os.open(self.path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
        try:
            os.write(descriptor, anchor.line())  # one write: concurrent writers never interleave a line
            os.fsync(descriptor)
        finally:
            os.close(descriptor)
        if created:  # the new file's name must survive a crash too
            directory = os.open(self.path.parent, os.O_RDONLY)
            try:
                os.fsync(directory)
            finally:
                os.close(directory)
        return f"appended to {self.path}"


@dataclass(frozen=True)
class SinkResult:
    sink: str
    ok: bool
    detail: str

    def as_dict(self) -> dict[str, Any]:
        return {"sink": self.sink, "ok": self.ok, "detail": self.detail}


@dataclass(frozen=True)
class AnchorOutcome:
    anchor: Anchor
    results: list[SinkResult]
    recorded: str  # how the anchor was recorded in the database, or why it was not

    @property
    def ok(self) -> bool:
        return all(result.ok for result in self.results)

    def as_dict(self) -> dict[str, Any]:
        return {"ok": self.ok, "anchor": self.anchor.as_dict(), "sinks": [r.as_dict() for r in self.results],
                "recorded": self.recorded}


def write_to_sinks(anchor: Anchor, sinks: Sequence[Sink]) -> list[SinkResult]:
    """Each sink on its own: one failing never keeps the anchor from the others."""
    results = []
    for sink in sinks:
        try:
            results.append(SinkResult(sink.name, True, sink.write(anchor)))
        except Exception as exc:  # noqa: BLE001 - any sink's failure is reported, never raised
            results.append(SinkResult(sink.name, False, f"{type(exc).__name__}: {exc}"))
    return results


def anchor_chain(sessions: Callable[[], Session], key: Ed25519PrivateKey, sinks: Sequence[Sink], *,
                 actor: str, run_id: str | None = None) -> AnchorOutcome:
    """Sign the head, write it to every sink, record what happened as an audit event (the event is
    itself the next chain entry, covered by the next anchor). The database refusing the event (a
    read-only role on a separate anchoring host) is said in ``recorded``, not raised."""
    with sessions() as session:
        anchor = make_anchor(session.connection(), key, run_id)
    results = write_to_sinks(anchor, sinks)
    data = {"seq": anchor.seq, "head_sha256": anchor.head_sha256, "key": anchor.key, "run_id": run_id,
            "sinks": [result.as_dict() for result in results]}
    return AnchorOutcome(anchor, results, record_anchoring(sessions, actor, f"chain entry {anchor.seq}", data))


def record_anchoring(sessions: Callable[[], Session], actor: str, target: str, data: dict[str, Any]) -> str:
    """Record an anchoring (or its failure) as an audit event; say how, or why the database refused."""
    try:
        with sessions() as session, session.begin():
            event = record_audit_event(session, actor, AUDIT_ACTION, target, data)
            return f"recorded as audit event {event.id}"
    except SQLAlchemyError as exc:
        return f"not recorded in the database ({type(exc).__name__}: {str(exc).splitlines()[0]})"


def recorded_anchor_covering(session: Session, seq: int) -> dict[str, Any] | None:
    """The first anchor recorded in the database (an ``evidence.anchor`` audit event) that covers chain
    entry ``seq`` and reached at least one sink: what a record's integrity field names. None when no
    anchor covers it yet. What the database says is checked only by ``check_anchors``."""
    events = session.scalars(select(AuditEvent).where(AuditEvent.action == AUDIT_ACTION).order_by(AuditEvent.id))
    for event in events:
        data = event.data or {}
        stored = [sink["sink"] for sink in data.get("sinks", []) if sink.get("ok")]
        if isinstance(data.get("seq"), int) and data["seq"] >= seq and stored:
            return {"seq": data["seq"], "head_sha256": data["head_sha256"], "at": event.at.isoformat(),
                    "key": data["key"], "sinks": stored}
    return None


# -- reading and checking ---------------------------------------------------------------------------


@dataclass(frozen=True)
class Found:
    """One anchor as read from a source, or why it could not be read."""

    origin: str  # e.g. "anchors.jsonl line 3", "s3://bucket/key version V"
    anchor: Anchor | None
    error: str = ""


def parse_anchor(origin: str, text: str | bytes) -> Found:
    try:
        return Found(origin, Anchor.from_dict(json.loads(text)))
    except json.JSONDecodeError as exc:
        return Found(origin, None, f"not JSON ({exc.msg})")
    except AnchorUnreadable as exc:
        return Found(origin, None, str(exc))


def read_file(path: Path) -> list[Found]:
    """Anchors of a JSONL file (blank lines skipped). OSError when the file cannot be read."""
    with path.open("rb") as handle:
        lines = handle.read().split(b"\n")
    return [parse_anchor(f"{path} line {number}", line) for number, line in enumerate(lines, 1) if line.strip()]


@dataclass(frozen=True)
class AnchorProblem:
    kind: str  # unreadable | forged | untrusted key | truncated | rewritten | no anchors
    origin: str
    seq: int | None
    detail: str

    def describe(self) -> str:
        where = f" (chain entry {self.seq})" if self.seq is not None else ""
        return f"{self.kind}: {self.origin}{where}: {self.detail}"

    def as_dict(self) -> dict[str, Any]:
        return {"kind": self.kind, "origin": self.origin, "seq": self.seq, "detail": self.detail,
                "message": self.describe()}


@dataclass
class AnchorReport:
    source: str
    anchors: int = 0  # signed by the trusted key
    head_seq: int = 0
    newest: Anchor | None = None
    problems: list[AnchorProblem] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return not self.problems

    @property
    def uncovered(self) -> int:
        """Entries after the newest anchor: nothing outside the database vouches for them yet."""
        return max(0, self.head_seq - (self.newest.seq if self.newest else 0))

    def as_dict(self) -> dict[str, Any]:
        return {"ok": self.ok, "source": self.source, "anchors": self.anchors, "head_seq": self.head_seq,
                "newest": self.newest.as_dict() if self.newest else None, "uncovered_entries": self.uncovered,
                "problems": [problem.as_dict() for problem in self.problems]}


def _records_between(connection: Connection, first: int, last: int) -> str:
    rows = connection.execute(
        select(ENTRIES.c.table_name, ENTRIES.c.record_id).where(ENTRIES.c.seq.between(first, last))
        .order_by(ENTRIES.c.seq)
    ).all()
    records = list(dict.fromkeys(f"{table} id {record}" for table, record in rows))
    named = ", ".join(records[:_NAMED_RECORDS])
    more = f" and {len(records) - _NAMED_RECORDS} more" if len(records) > _NAMED_RECORDS else ""
    return f"{named}{more}" if records else "none"


def _run_note(connection: Connection, anchor: Anchor) -> str:
    if anchor.run_id is None:
        return ""
    present = connection.execute(select(Run.id).where(Run.id == anchor.run_id)).first() is not None
    return f"; made at the end of run {anchor.run_id}" + ("" if present else ", which is no longer in the database")


def check_anchors(connection: Connection, source: str, found: Sequence[Found],
                  trusted: Ed25519PublicKey) -> AnchorReport:
    """Check each anchor's signature with the ``trusted`` key, then that the chain has, at the anchor's
    seq, the anchored hash. A rewrite is placed between the newest anchor that still matches and the
    first that does not; a truncation names the entries gone."""
    report = AnchorReport(source=source, head_seq=chain_head(connection)[0])
    trusted_print = fingerprint(trusted)
    valid: list[tuple[str, Anchor]] = []
    for item in found:
        anchor = item.anchor
        if anchor is None:
            report.problems.append(AnchorProblem("unreadable", item.origin, None, item.error))
        elif anchor.key != trusted_print:
            report.problems.append(AnchorProblem(
                "untrusted key", item.origin, anchor.seq, f"signed by {anchor.key}, not the trusted {trusted_print}"))
        elif not anchor.signed_by(trusted):
            report.problems.append(AnchorProblem(
                "forged", item.origin, anchor.seq, "its signature does not match its content (made or changed "
                                                   "without the signing key)"))
        else:
            valid.append((item.origin, anchor))
    report.anchors = len(valid)
    if not valid:
        report.problems.append(AnchorProblem(
            "no anchors", source, None, "no anchor signed by the trusted key: nothing outside the database "
                                        "vouches for the chain"))
        return report
    valid.sort(key=lambda pair: (pair[1].seq, pair[1].at))
    report.newest = valid[-1][1]
    wanted = {anchor.seq for _, anchor in valid}
    hashes = {int(seq): str(digest) for seq, digest in connection.execute(
        select(ENTRIES.c.seq, ENTRIES.c.entry_sha256).where(ENTRIES.c.seq.in_(wanted)))}
    matched = 0  # the newest seq, so far, whose anchor still matches
    for origin, anchor in valid:
        if anchor.seq == 0:
            continue  # an empty chain: nothing to compare
        note = _run_note(connection, anchor)
        stamp = f"anchored {anchor.at.isoformat()}"
        if anchor.seq > report.head_seq:
            gone = f"entry {anchor.seq}" if anchor.seq == report.head_seq + 1 else \
                f"entries {report.head_seq + 1} to {anchor.seq}"
            report.problems.append(AnchorProblem(
                "truncated", origin, anchor.seq, f"{stamp} with {anchor.seq} entries; the chain ends at "
                                                 f"{report.head_seq}: {gone} removed{note}"))
        elif hashes.get(anchor.seq) != anchor.head_sha256:
            report.problems.append(AnchorProblem(
                "rewritten", origin, anchor.seq,
                f"{stamp}: entry {anchor.seq} hashed to {anchor.head_sha256}, now {hashes.get(anchor.seq)}; the "
                f"change lies in entries {matched + 1} to {anchor.seq}, which now chain "
                f"{_records_between(connection, matched + 1, anchor.seq)}{note}"))
        else:
            matched = anchor.seq
    return report
