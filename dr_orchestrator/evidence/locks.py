"""One failover at a time: a run holds each service and site it changes until it ends.

Resources: every service in the run's scope, exclusively; the sites in scope, exclusively for a site
runbook (it names sites and no services), shared otherwise (two service runbooks may use the same
sites; a site runbook waits for neither). Locks are tried, never waited for: a second run is refused
at once, naming the run that holds the lock.

The lock itself dies with its process, whatever the way it ends:
- PostgreSQL: session advisory locks (``pg_try_advisory_lock[_shared]``) on a connection of their
  own, held for the run; the server frees them when the connection drops.
- SQLite: ``flock`` on a file per resource in ``<database>.locks/``, held open for the run; the
  kernel frees it when the process exits, even by SIGKILL.
Rows in ``run_locks`` only name the holders (run, pid, host, since) for the refusal and the API.
"""

from __future__ import annotations

import fcntl
import hashlib
import logging
import os
import re
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

from sqlalchemy import Connection, Engine, create_engine, delete, select, text
from sqlalchemy.exc import SQLAlchemyError
from sqlalchemy.orm import Session
from sqlalchemy.pool import NullPool

from dr_orchestrator.evidence.liveness import process_alive, writing
from dr_orchestrator.evidence.models import RunLock
from dr_orchestrator.model.events import utcnow
from dr_orchestrator.model.run import RunPlan

log = logging.getLogger(__name__)

Sessions = Callable[[], Session]
EXCLUSIVE = "exclusive"
SHARED = "shared"


@dataclass(frozen=True)
class Resource:
    name: str  # service:trading, site:backup
    exclusive: bool

    @property
    def mode(self) -> str:
        return EXCLUSIVE if self.exclusive else SHARED

    def describe(self) -> str:
        kind, _, name = self.name.partition(":")
        return f"{kind} {name}"


@dataclass(frozen=True)
class Holder:
    run_id: str
    host: str
    pid: int
    since: str


class LockHeld(Exception):
    """Another live run holds a service or site this run needs; the message names it."""

    def __init__(self, resource: Resource, holders: list[Holder]) -> None:
        self.resource = resource
        self.holders = holders
        if holders:
            who = ", ".join(f"run {h.run_id} (pid {h.pid} on {h.host}, since {h.since})" for h in holders)
        else:
            who = "another run that is starting"
        super().__init__(f"{resource.describe()} is held by {who}: one failover at a time; "
                         "wait for it to end or stop it")


def resources_for(plan: RunPlan) -> list[Resource]:
    scope = plan.runbook.scope
    site_runbook = bool(scope.sites) and not scope.services
    found = [Resource(f"service:{name}", True) for name in plan.services_in_scope()]
    found += [Resource(f"site:{name}", site_runbook) for name in plan.sites_in_scope()]
    return sorted(found, key=lambda r: r.name)


class _Backend(Protocol):
    def try_lock(self, resource: Resource) -> bool: ...
    def release(self) -> None: ...


class RunLocks:
    """``acquire`` every resource or none (raising LockHeld); ``release`` when the run ends."""

    def __init__(self, sessions: Sessions, host: str) -> None:
        self.sessions = sessions
        self.host = host
        self.run_id: str | None = None
        self.held: list[Resource] = []
        self._backend: _Backend | None = None

    def acquire(self, run_id: str, resources: list[Resource],
                also: Callable[[Session], None] | None = None) -> None:
        """``also(session)`` writes in the transaction that names the holder (one commit fewer)."""
        self.run_id = run_id
        bind = _engine_of(self.sessions)
        self._backend = _AdvisoryLocks(bind) if bind.dialect.name == "postgresql" else _FileLocks(bind)
        try:
            for resource in resources:
                if not self._backend.try_lock(resource):
                    raise LockHeld(resource, self._holders_soon(resource))
                self.held.append(resource)
            self._record(resources, also)
        except BaseException:
            self.release()
            raise

    def release(self) -> None:
        if self._backend is None:
            return
        backend, self._backend = self._backend, None
        try:
            if self.held and self.run_id is not None:
                with writing(self.sessions) as session:
                    session.execute(delete(RunLock).where(RunLock.run_id == self.run_id))
        finally:
            self.held = []
            backend.release()  # after the rows: a newcomer finds no row of ours once it gets the lock

    def _record(self, resources: list[Resource], also: Callable[[Session], None] | None) -> None:
        assert self.run_id is not None
        with writing(self.sessions) as session:
            record_holder(session, self.run_id, self.host, resources)
            if also is not None:
                also(session)

    def _holders_soon(self, resource: Resource, patience_s: float = 2.0) -> list[Holder]:
        """The holders, waiting a moment for a winner that took the lock but has not named itself yet:
        a refusal should say which run holds the service."""
        deadline = time.monotonic() + patience_s
        while not (holders := self._holders(resource)) and time.monotonic() < deadline:
            time.sleep(0.05)
        return holders

    def _holders(self, resource: Resource) -> list[Holder]:
        with self.sessions() as session:
            rows = session.scalars(select(RunLock).where(RunLock.resource == resource.name)
                                   .order_by(RunLock.acquired_at))
            return [Holder(r.run_id, r.host, r.pid, r.acquired_at.isoformat(timespec="seconds"))
                    for r in rows if _holder_alive(r, self.host)]


def record_holder(session: Session, run_id: str, host: str, resources: list[Resource]) -> None:
    """Name ``run_id`` as holder of ``resources`` (whose locks it holds), dropping rows of holders that
    are gone (the lock is ours now). The caller commits."""
    now = utcnow()
    named = {resource.name: resource for resource in resources}
    for row in session.scalars(select(RunLock).where(RunLock.resource.in_(named))):
        if named[row.resource].exclusive or row.run_id == run_id or not _holder_alive(row, host):
            session.delete(row)
    session.flush()  # the rows that go before the new ones (one per resource and run)
    session.add_all(RunLock(resource=resource.name, run_id=run_id, mode=resource.mode, host=host,
                            pid=os.getpid(), acquired_at=now) for resource in resources)


def _holder_alive(row: RunLock, host: str) -> bool:
    return row.host != host or process_alive(row.pid)


def _engine_of(sessions: Sessions) -> Engine:
    bind = getattr(sessions, "kw", {}).get("bind")
    if bind is None:
        with sessions() as session:
            bind = session.get_bind()
    assert isinstance(bind, Engine)
    return bind


class _AdvisoryLocks:
    """PostgreSQL session advisory locks on a connection of their own (no pool: closing frees them)."""

    def __init__(self, bind: Engine) -> None:
        self._engine = create_engine(bind.url, poolclass=NullPool)
        self._connection: Connection | None = None

    def try_lock(self, resource: Resource) -> bool:
        if self._connection is None:
            self._connection = self._engine.connect()
        function = "pg_try_advisory_lock" if resource.exclusive else "pg_try_advisory_lock_shared"
        got = self._connection.execute(text(f"SELECT {function}(:key)"), {"key": advisory_key(resource.name)})
        self._connection.commit()  # session-level locks outlive the transaction
        return bool(got.scalar_one())

    def release(self) -> None:
        if self._connection is not None:
            try:
                # Freed now: closing frees them too, but only once the server has ended the session,
                # which it does after close() returns (a run starting right after found them held).
                self._connection.execute(text("SELECT pg_advisory_unlock_all()"))
                self._connection.commit()
            except SQLAlchemyError:
                log.warning("advisory locks not released explicitly; closing the session frees them", exc_info=True)
            finally:
                try:
                    self._connection.close()
                finally:
                    self._connection = None
        self._engine.dispose()


def advisory_key(name: str) -> int:
    """A signed 64-bit advisory lock key for ``name``, stable across processes."""
    return int.from_bytes(hashlib.sha256(f"dr-run-lock:{name}".encode()).digest()[:8], "big", signed=True)


class _FileLocks:
    """``flock`` on one file per resource beside the SQLite database; the kernel frees them."""

    def __init__(self, bind: Engine) -> None:
        database = bind.url.database
        if database and database != ":memory:":
            self.directory = Path(database + ".locks")
        else:  # an in-memory database lives in one process only
            self.directory = Path(tempfile.gettempdir()) / f"dr-locks-{os.getpid()}"
        self._files: list[Any] = []

    def try_lock(self, resource: Resource) -> bool:
        self.directory.mkdir(parents=True, exist_ok=True)
        handle = open(self.directory / lock_file_name(resource.name), "a+b")  # noqa: SIM115 - held for the run
        try:
            mode = fcntl.LOCK_EX if resource.exclusive else fcntl.LOCK_SH
            fcntl.flock(handle.fileno(), mode | fcntl.LOCK_NB)
        except BlockingIOError:
            handle.close()
            return False
        self._files.append(handle)
        return True

    def release(self) -> None:
        files, self._files = self._files, []
        for handle in files:
            handle.close()  # closing the file releases its flock


def lock_file_name(name: str) -> str:
    readable = re.sub(r"[^A-Za-z0-9._-]", "_", name)[:80]
    return f"{readable}-{hashlib.sha256(name.encode()).hexdigest()[:12]}.lock"
