"""The ledger: every request the load generator made, stored durably in SQLite as it goes.

WAL mode with synchronous=NORMAL: a commit survives the writer being killed (SIGKILL), so only the
batch not yet committed (at most ``COMMIT_INTERVAL`` seconds of requests) can be lost.
"""

from __future__ import annotations

import queue
import sqlite3
import threading
import time
from collections.abc import Iterator
from contextlib import closing, contextmanager
from dataclasses import astuple, dataclass
from datetime import UTC, datetime
from pathlib import Path

COMMIT_INTERVAL = 0.1  # seconds

_SCHEMA = """
CREATE TABLE IF NOT EXISTS runs (
    run_id TEXT PRIMARY KEY,
    pid INTEGER NOT NULL,
    started_at TEXT NOT NULL,
    stopped_at TEXT,
    rate REAL NOT NULL,
    timeout REAL NOT NULL
);
CREATE TABLE IF NOT EXISTS requests (
    id INTEGER PRIMARY KEY,
    run_id TEXT NOT NULL REFERENCES runs(run_id),
    service TEXT NOT NULL,
    operation TEXT NOT NULL,
    key TEXT NOT NULL,
    sent_at TEXT NOT NULL,
    answered_at TEXT NOT NULL,
    sent_mono REAL NOT NULL,
    answered_mono REAL NOT NULL,
    outcome TEXT NOT NULL,
    http_status INTEGER,
    site TEXT
);
CREATE INDEX IF NOT EXISTS requests_by_run_sent ON requests (run_id, sent_mono);
"""


def load_dir(root: Path) -> Path:
    """The load generator's files in the lab directory: ledger, pid file, log."""
    return root / "load"


def ledger_path(root: Path) -> Path:
    return load_dir(root) / "ledger.db"


def utc_now() -> str:
    """Timestamps in the ledger: ISO 8601, UTC, microseconds (sortable as text)."""
    return datetime.now(UTC).isoformat(timespec="microseconds")


@dataclass(frozen=True)
class LedgerEntry:
    """One request: ``outcome`` is ``ok``, ``http <status>`` or ``error: <text>``; ``site`` is X-DR-Site."""

    run_id: str
    service: str
    operation: str
    key: str
    sent_at: str
    answered_at: str
    sent_mono: float
    answered_mono: float
    outcome: str
    http_status: int | None
    site: str | None

    @property
    def ok(self) -> bool:
        return self.outcome == "ok"


@dataclass(frozen=True)
class RunInfo:
    run_id: str
    pid: int
    started_at: str
    stopped_at: str | None
    rate: float
    timeout: float


def connect(path: Path) -> sqlite3.Connection:
    connection = sqlite3.connect(path, timeout=5.0, check_same_thread=False)
    connection.execute("PRAGMA journal_mode=WAL")
    connection.execute("PRAGMA synchronous=NORMAL")
    connection.executescript(_SCHEMA)
    return connection


@contextmanager
def open_ledger(path: Path) -> Iterator[sqlite3.Connection]:
    with closing(connect(path)) as connection:
        yield connection


def record_run_start(connection: sqlite3.Connection, run: RunInfo) -> None:
    with connection:
        connection.execute(
            "INSERT INTO runs (run_id, pid, started_at, stopped_at, rate, timeout) VALUES (?, ?, ?, ?, ?, ?)",
            astuple(run),
        )


def record_run_stop(connection: sqlite3.Connection, run_id: str) -> None:
    with connection:
        connection.execute("UPDATE runs SET stopped_at = ? WHERE run_id = ?", (utc_now(), run_id))


def insert_entries(connection: sqlite3.Connection, entries: list[LedgerEntry]) -> None:
    with connection:
        connection.executemany(
            "INSERT INTO requests (run_id, service, operation, key, sent_at, answered_at, sent_mono, answered_mono,"
            " outcome, http_status, site) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
            [astuple(entry) for entry in entries],
        )


def latest_run(connection: sqlite3.Connection) -> RunInfo | None:
    row = connection.execute(
        "SELECT run_id, pid, started_at, stopped_at, rate, timeout FROM runs ORDER BY started_at DESC LIMIT 1"
    ).fetchone()
    return RunInfo(*row) if row else None


def find_run_by_pid(connection: sqlite3.Connection, pid: int) -> RunInfo | None:
    row = connection.execute(
        "SELECT run_id, pid, started_at, stopped_at, rate, timeout FROM runs WHERE pid = ?"
        " ORDER BY started_at DESC LIMIT 1",
        (pid,),
    ).fetchone()
    return RunInfo(*row) if row else None


def run_entries(connection: sqlite3.Connection, run_id: str) -> list[LedgerEntry]:
    """The run's requests in the order they were sent."""
    rows = connection.execute(
        "SELECT run_id, service, operation, key, sent_at, answered_at, sent_mono, answered_mono, outcome,"
        " http_status, site FROM requests WHERE run_id = ? ORDER BY sent_mono, id",
        (run_id,),
    ).fetchall()
    return [LedgerEntry(*row) for row in rows]


class LedgerWriter:
    """Collects entries from many threads and commits them in batches from one thread."""

    def __init__(self, connection: sqlite3.Connection) -> None:
        self._connection = connection
        self._queue: queue.Queue[LedgerEntry] = queue.Queue()
        self._closing = threading.Event()
        self._thread = threading.Thread(target=self._run, name="ledger-writer", daemon=True)

    def start(self) -> None:
        self._thread.start()

    def add(self, entry: LedgerEntry) -> None:
        self._queue.put(entry)

    def close(self) -> None:
        """Commit everything added so far and stop the writer thread."""
        self._closing.set()
        self._thread.join()

    def _run(self) -> None:
        while not self._closing.is_set():
            deadline = time.monotonic() + COMMIT_INTERVAL
            batch = self._collect_until(deadline)
            if batch:
                insert_entries(self._connection, batch)
        insert_entries(self._connection, self._drain())

    def _collect_until(self, deadline: float) -> list[LedgerEntry]:
        batch: list[LedgerEntry] = []
        while (remaining := deadline - time.monotonic()) > 0:
            try:
                batch.append(self._queue.get(timeout=remaining))
            except queue.Empty:
                break
        return batch

    def _drain(self) -> list[LedgerEntry]:
        batch: list[LedgerEntry] = []
        while True:
            try:
                batch.append(self._queue.get_nowait())
            except queue.Empty:
                return batch
