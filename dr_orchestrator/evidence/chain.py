"""The audit hash chain: every evidence row written is appended to ``audit_chain``, and
``verify`` finds rows or entries changed, removed or inserted behind the store's back.

What is chained, and when: each INSERT of an evidence row, and each UPDATE of one (a step going
from pending to running to finished), is its own entry, written in the same transaction as the row.
An entry holds the row's table and primary key, the SHA-256 of the row's canonical content as the
database returns it after the write, and the SHA-256 of the entry before it. A record's newest entry
must match the row as it stands; older entries are the history of its states.

Rows are hashed as the database returns them after the write, read back in the same transaction,
except from sessions flagged ``HASH_FROM_INSTANCES`` (the evidence store's writer): those write only
values already in that form (JSON-ready data, aware datetimes), so their rows are hashed from the
values just written, which saves a read per table on the engine's path. ``verify`` would name any row
where the two ever differed.

Canonical content: JSON of the row's non-NULL columns, keys sorted, no spaces; timestamps as ISO-8601
UTC with microseconds, dates as ISO dates, floats by ``repr``, JSON columns as their parsed value.
NULL columns are left out so that adding a nullable column later leaves every older hash valid.

Appending takes the chain head under a database lock: SQLite serialises writers already (the store
opens BEGIN IMMEDIATE), PostgreSQL takes a transaction-scoped advisory lock. ``seq`` is the primary
key as well, so two writers can never fork the chain; at worst one of them fails.

A chain proves the records agree with it; someone able to rewrite the whole table could rebuild it.
Anchor it outside the database: ``verify`` reports the head's sequence and hash, and packs carry it.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import UTC, date, datetime
from typing import Any

from sqlalchemy import Boolean, Connection, Float, Integer, Table, event, inspect, select, text
from sqlalchemy.orm import Session, sessionmaker

from dr_orchestrator.evidence.models import CHAINED, AuditEntry
from dr_orchestrator.model.events import utcnow

GENESIS = "0" * 64
CHAINED_TABLES: dict[str, Table] = {
    model.__tablename__: model.__table__ for model in CHAINED  # type: ignore[misc]
}
# Key of the PostgreSQL advisory lock guarding the chain head ("dr-chain" in ASCII).
ADVISORY_LOCK_KEY = int.from_bytes(b"dr-chain", "big")
ENTRIES: Table = AuditEntry.__table__  # type: ignore[assignment]
HASH_FROM_INSTANCES = "chain_hash_from_instances"  # a Session.info key; see the module's docstring


class EvidenceImmutable(RuntimeError):
    """Evidence rows are never deleted."""


# -- canonical content ------------------------------------------------------------------------


def _canonical_value(value: Any, column_type: Any = None) -> Any:
    if isinstance(value, datetime):
        moment = value if value.tzinfo else value.replace(tzinfo=UTC)
        return moment.astimezone(UTC).isoformat(timespec="microseconds")
    if isinstance(value, date):
        return value.isoformat()
    if isinstance(column_type, Boolean) or isinstance(value, bool):
        return bool(value)
    if isinstance(column_type, Float):
        return float(value)
    if isinstance(column_type, Integer):
        return int(value)
    if isinstance(value, dict):
        return {str(key): _canonical_value(item) for key, item in value.items()}
    if isinstance(value, (list, tuple)):
        return [_canonical_value(item) for item in value]
    return value


def canonical_json(data: Any) -> str:
    return json.dumps(data, sort_keys=True, separators=(",", ":"), ensure_ascii=False)


def canonical_content(table: Table, row: Mapping[str, Any]) -> str:
    content = {
        column.name: _canonical_value(row[column.name], column.type)
        for column in table.columns
        if column.name in row and row[column.name] is not None
    }
    return canonical_json(content)


def content_sha256(table: Table, row: Mapping[str, Any]) -> str:
    return hashlib.sha256(canonical_content(table, row).encode()).hexdigest()


def entry_sha256(entry: Mapping[str, Any]) -> str:
    fields = ("seq", "table_name", "record_id", "operation", "content_sha256", "prev_sha256")
    data = {name: entry[name] for name in fields} | {"recorded_at": _canonical_value(entry["recorded_at"])}
    return hashlib.sha256(canonical_json(data).encode()).hexdigest()


def primary_key(table: Table) -> Any:
    (column,) = table.primary_key.columns
    return column


# -- appending ----------------------------------------------------------------------------------


def lock_chain(connection: Connection) -> None:
    """Hold the chain head until the transaction ends (PostgreSQL; SQLite's writer lock does it)."""
    if connection.dialect.name == "postgresql":
        connection.execute(text("SELECT pg_advisory_xact_lock(:key)"), {"key": ADVISORY_LOCK_KEY})


def chain_head(connection: Connection) -> tuple[int, str]:
    """The last entry's sequence number and hash; (0, GENESIS) for an empty chain."""
    head = connection.execute(
        select(ENTRIES.c.seq, ENTRIES.c.entry_sha256).order_by(ENTRIES.c.seq.desc()).limit(1)
    ).first()
    return (0, GENESIS) if head is None else (int(head[0]), str(head[1]))


def read_rows(connection: Connection, table: Table, ids: Iterable[Any]) -> dict[str, Mapping[str, Any]]:
    key = primary_key(table)
    wanted = list(ids)
    if not wanted:
        return {}
    rows = connection.execute(select(table).where(key.in_(wanted))).mappings()
    return {str(row[key.name]): dict(row) for row in rows}


def append_rows(connection: Connection, items: Sequence[tuple[Table, str, Mapping[str, Any]]]) -> list[dict[str, Any]]:
    """Chain ``(table, operation, row)`` items in order; returns the entries written."""
    if not items:
        return []
    lock_chain(connection)
    seq, prev = chain_head(connection)
    entries = []
    for table, operation, row in items:
        seq += 1
        entry: dict[str, Any] = {
            "seq": seq,
            "table_name": table.name,
            "record_id": str(row[primary_key(table).name]),
            "operation": operation,
            "content_sha256": content_sha256(table, row),
            "prev_sha256": prev,
            "recorded_at": utcnow(),
        }
        entry["entry_sha256"] = prev = entry_sha256(entry)
        entries.append(entry)
    connection.execute(ENTRIES.insert(), entries)
    return entries


def append_records(connection: Connection, records: Sequence[tuple[str, Any, str]]) -> list[dict[str, Any]]:
    """Chain ``(table name, primary key, operation)`` records, each read back as the database now holds it."""
    wanted: dict[str, list[Any]] = {}
    for table_name, key, _operation in records:
        wanted.setdefault(table_name, []).append(key)
    rows = {name: read_rows(connection, CHAINED_TABLES[name], keys) for name, keys in wanted.items()}
    return append_rows(
        connection,
        [(CHAINED_TABLES[name], operation, rows[name][str(key)]) for name, key, operation in records],
    )


# -- the session hooks: every ORM write of an evidence row is chained ----------------------------


def _is_chained(instance: object) -> bool:
    return isinstance(instance, CHAINED)


def _changes(session: Session) -> list[tuple[object, str]]:
    changes = [(obj, "insert") for obj in session.new if _is_chained(obj)]
    changes += [(obj, "update") for obj in session.dirty if _is_chained(obj) and session.is_modified(obj)]
    return changes


def _before_flush(session: Session, _context: Any, _instances: Any) -> None:
    if any(_is_chained(obj) for obj in session.deleted):
        raise EvidenceImmutable("evidence records are never deleted")
    if session.get_bind().dialect.name == "postgresql" and _changes(session):
        # Before the flush writes anything: on PostgreSQL, a writer holding row locks while waiting
        # for the chain could deadlock with one holding the chain and wanting those rows.
        lock_chain(session.connection())


def _after_flush(session: Session, _context: Any) -> None:
    order: dict[type, int] = {model: index for index, model in enumerate(CHAINED)}
    records = []
    for obj, operation in _changes(session):
        mapper = inspect(type(obj))
        (key,) = mapper.primary_key_from_instance(obj)
        records.append((order[type(obj)], str(key).zfill(20), mapper.local_table.name, key, operation, obj))
    records.sort(key=lambda record: record[:2])
    if session.info.get(HASH_FROM_INSTANCES):
        append_rows(session.connection(), [(CHAINED_TABLES[name], operation, instance_row(obj))
                                           for _, _, name, _key, operation, obj in records])
    else:
        append_records(session.connection(), [(name, key, operation) for _, _, name, key, operation, _ in records])


def instance_row(instance: object) -> dict[str, Any]:
    """The row ``instance`` was just flushed as: a column never set was written as NULL (no evidence
    column has a server default)."""
    state = inspect(instance)
    values = state.dict
    return {column.name: values.get(prop.key) for prop in state.mapper.column_attrs for column in prop.columns}


def install(factory: sessionmaker[Session]) -> None:
    """Chain every evidence row that sessions of ``factory`` insert or update."""
    event.listen(factory, "before_flush", _before_flush)
    event.listen(factory, "after_flush", _after_flush)


def adopt_unchained(connection: Connection) -> int:
    """Chain rows written before the chain existed (a database migrated from an older schema).
    Reads only the columns the table has now. Returns how many rows were adopted."""
    chained = {(row[0], row[1]) for row in connection.execute(select(ENTRIES.c.table_name, ENTRIES.c.record_id))}
    existing = set(inspect(connection).get_table_names())
    items: list[tuple[Table, str, Mapping[str, Any]]] = []
    for name, table in CHAINED_TABLES.items():
        if name not in existing:
            continue
        present = {column["name"] for column in inspect(connection).get_columns(name)}
        columns = [column for column in table.columns if column.name in present]
        key = primary_key(table)
        for row in connection.execute(select(*columns).order_by(key)).mappings():
            if (name, str(row[key.name])) not in chained:
                items.append((table, "adopt", dict(row)))
    append_rows(connection, items)
    return len(items)


# -- verifying ------------------------------------------------------------------------------------


@dataclass(frozen=True)
class ChainProblem:
    kind: str  # entry removed | entry changed | entry out of place | record changed | record removed | record inserted
    seq: int | None  # the chain entry concerned; None for a record the chain never saw
    table: str | None
    record_id: str | None
    detail: str

    def describe(self) -> str:
        where = f"entry {self.seq}" if self.seq is not None else "no chain entry"
        record = f" {self.table} id {self.record_id}" if self.table else ""
        return f"{self.kind}:{record} ({where}): {self.detail}"

    def as_dict(self) -> dict[str, Any]:
        return {
            "kind": self.kind,
            "seq": self.seq,
            "table": self.table,
            "record_id": self.record_id,
            "detail": self.detail,
            "message": self.describe(),
        }


@dataclass
class ChainReport:
    entries: int = 0
    records: int = 0
    head_seq: int = 0
    head_sha256: str = GENESIS
    problems: list[ChainProblem] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return not self.problems

    @property
    def first(self) -> ChainProblem | None:
        return self.problems[0] if self.problems else None

    def as_dict(self) -> dict[str, Any]:
        return {
            "ok": self.ok,
            "entries": self.entries,
            "records": self.records,
            "head_seq": self.head_seq,
            "head_sha256": self.head_sha256,
            "first_problem": self.first.as_dict() if self.first else None,
            "problems": [problem.as_dict() for problem in self.problems],
        }


def _walk_entries(connection: Connection, report: ChainReport) -> dict[tuple[str, str], tuple[int, str]]:
    """Check the links; return each record's newest entry (sequence, content hash)."""
    newest: dict[tuple[str, str], tuple[int, str]] = {}
    expected, prev = 1, GENESIS
    for entry in connection.execute(select(ENTRIES).order_by(ENTRIES.c.seq)).mappings():
        seq, table, record = int(entry["seq"]), entry["table_name"], entry["record_id"]
        report.entries += 1
        if seq != expected:
            missing = f"entry {expected}" if seq == expected + 1 else f"entries {expected} to {seq - 1}"
            report.problems.append(
                ChainProblem("entry removed", expected, None, None, f"{missing} missing from the chain")
            )
        elif entry_sha256(dict(entry)) != entry["entry_sha256"]:
            report.problems.append(
                ChainProblem("entry changed", seq, table, record, "the entry's hash does not match its content")
            )
        elif entry["prev_sha256"] != prev:
            report.problems.append(
                ChainProblem("entry out of place", seq, table, record, "it does not link to the entry before it")
            )
        newest[(table, record)] = (seq, entry["content_sha256"])
        expected, prev = seq + 1, entry["entry_sha256"]
        report.head_seq, report.head_sha256 = seq, entry["entry_sha256"]
    return newest


def verify(connection: Connection) -> ChainReport:
    """Walk the chain and check every evidence record against its newest entry. Problems come
    sorted by chain position, the first one first; records the chain never saw come last."""
    report = ChainReport()
    newest = _walk_entries(connection, report)
    for name, table in CHAINED_TABLES.items():
        key = primary_key(table)
        for row in connection.execute(select(table).order_by(key)).mappings():
            report.records += 1
            record_id = str(row[key.name])
            found = newest.pop((name, record_id), None)
            if found is None:
                report.problems.append(
                    ChainProblem("record inserted", None, name, record_id, "the row is not in the audit chain")
                )
            elif content_sha256(table, dict(row)) != found[1]:
                report.problems.append(
                    ChainProblem("record changed", found[0], name, record_id, "the row differs from its chained entry")
                )
    for (name, record_id), (seq, _content) in newest.items():
        report.problems.append(
            ChainProblem("record removed", seq, name, record_id, "the chain has it, the table does not")
        )
    report.problems.sort(key=lambda p: (p.seq is None, p.seq or 0, p.table or "", p.record_id or ""))
    return report


def verify_session(session: Session) -> ChainReport:
    return verify(session.connection())
