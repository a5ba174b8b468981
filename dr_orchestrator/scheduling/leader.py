"""Only one scheduler fires jobs: APScheduler's job store must not be shared by running schedulers.

PostgreSQL: the leader holds ``pg_try_advisory_lock`` on a connection of its own for as long as it
leads; the server releases it when that session ends (the process dies, the connection drops), and a
follower, trying every few seconds, takes over. SQLite: one scheduler node only; a file lock next to
the database makes a second scheduler on the same file refuse to start.
"""

from __future__ import annotations

import fcntl
import hashlib
import logging
import os
from pathlib import Path
from typing import IO, Protocol

from sqlalchemy import Connection, text
from sqlalchemy.engine import make_url
from sqlalchemy.exc import SQLAlchemyError

from dr_orchestrator.evidence.database import database_url, make_engine

log = logging.getLogger(__name__)

# One lock per database: every scheduler of one evidence database competes for it.
LOCK_KEY = int.from_bytes(hashlib.sha256(b"dr-orchestrator scheduler leader").digest()[:8], "big") >> 1


class SchedulerRefused(Exception):
    """This scheduler may not run at all (one sentence for the engineer)."""


class LeaderLock(Protocol):
    single_node: bool

    def try_acquire(self) -> bool: ...
    def still_held(self) -> bool: ...
    def release(self) -> None: ...


class PostgresLeaderLock:
    single_node = False

    def __init__(self, url: str) -> None:
        self.engine = make_engine(url)
        self.connection: Connection | None = None

    def try_acquire(self) -> bool:
        try:
            if self.connection is None:
                self.connection = self.engine.connect().execution_options(isolation_level="AUTOCOMMIT")
            got = self.connection.execute(text("SELECT pg_try_advisory_lock(:key)"), {"key": LOCK_KEY}).scalar()
        except SQLAlchemyError as exc:
            log.warning("leader lock: database unreachable: %s", exc)
            self._drop()
            return False
        return bool(got)

    def still_held(self) -> bool:
        if self.connection is None:
            return False
        try:
            held = self.connection.execute(
                text("SELECT count(*) FROM pg_locks WHERE locktype = 'advisory' AND pid = pg_backend_pid() "
                     "AND objsubid = 1 AND ((classid::bigint << 32) | objid::bigint) = :key AND granted"),
                {"key": LOCK_KEY}).scalar()
        except SQLAlchemyError as exc:
            log.warning("leader lock: lost the database connection: %s", exc)
            self._drop()
            return False
        return bool(held)

    def release(self) -> None:
        if self.connection is not None:
            try:
                self.connection.execute(text("SELECT pg_advisory_unlock(:key)"), {"key": LOCK_KEY})
            except SQLAlchemyError:
                pass  # closing the session frees it anyway
        self._drop()
        self.engine.dispose()

    def _drop(self) -> None:
        if self.connection is not None:
            try:
                self.connection.invalidate()
                self.connection.close()
            except SQLAlchemyError:
                pass
            self.connection = None


class SqliteFileLock:
    single_node = True

    def __init__(self, url: str) -> None:
        database = make_url(url).database or ""
        if not database or database == ":memory:":
            raise SchedulerRefused("the scheduler needs a database file or PostgreSQL, not an in-memory SQLite")
        self.path = Path(database + ".scheduler.lock")
        self.handle: IO[str] | None = None

    def try_acquire(self) -> bool:
        handle = self.path.open("a+")
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            handle.close()
            raise SchedulerRefused(
                f"another scheduler already runs against this SQLite database (it holds {self.path}); "
                "with SQLite, one scheduler node only: use PostgreSQL to run several") from None
        self.handle = handle
        return True

    def still_held(self) -> bool:
        return self.handle is not None

    def release(self) -> None:
        if self.handle is not None:
            self.handle.close()  # frees the lock
            self.handle = None


def leader_lock(url: str | None) -> LeaderLock:
    resolved = database_url(url)
    if make_url(resolved).get_backend_name() == "postgresql":
        return PostgresLeaderLock(resolved)
    if make_url(resolved).get_backend_name() == "sqlite":
        return SqliteFileLock(resolved)
    raise SchedulerRefused(f"the scheduler supports PostgreSQL and SQLite evidence databases, not {resolved!r}")


def leader_present(connection: Connection) -> bool | None:
    """Whether some scheduler holds the leader lock of the evidence database behind ``connection``
    (read-only: it never takes the lock); None when that cannot be told (not Linux, another backend).

    PostgreSQL: the advisory lock in ``pg_locks``, held by any session. SQLite: a ``flock`` on the
    lock file next to the database, read from ``/proc/locks`` (trying the lock would make a
    scheduler starting at that moment refuse)."""
    backend = connection.engine.url.get_backend_name()
    if backend == "postgresql":
        held = connection.execute(
            text("SELECT count(*) FROM pg_locks WHERE locktype = 'advisory' AND objsubid = 1 "
                 "AND ((classid::bigint << 32) | objid::bigint) = :key AND granted"), {"key": LOCK_KEY}).scalar()
        return bool(held)
    if backend != "sqlite":
        return None
    database = connection.engine.url.database or ""
    if not database or database == ":memory:":
        return False  # no scheduler runs on an in-memory database
    try:
        status = Path(database + ".scheduler.lock").stat()
    except FileNotFoundError:
        return False  # no scheduler ever ran on this file
    try:
        table = Path("/proc/locks").read_text()
    except OSError:
        return None
    wanted = (os.major(status.st_dev), os.minor(status.st_dev), status.st_ino)
    for line in table.splitlines():
        fields = line.split()  # "1: FLOCK  ADVISORY  WRITE 1234 fd:01:5678 0 EOF"; waiters have "->" second
        if len(fields) < 6 or fields[1] != "FLOCK":
            continue
        major, minor, inode = fields[5].split(":")
        if (int(major, 16), int(minor, 16), int(inode)) == wanted:
            return True
    return False
