"""Where the evidence lives: the database URL, engines tuned per backend, sessions."""

from __future__ import annotations

import os
import warnings
from typing import Any

from sqlalchemy import Engine, create_engine, event
from sqlalchemy.engine import Connection
from sqlalchemy.exc import SAWarning
from sqlalchemy.orm import Session, sessionmaker

from dr_orchestrator import secrets
from dr_orchestrator.evidence import chain

DEFAULT_URL = "sqlite:///dr-evidence.db"
URL_ENV = "DR_DATABASE_URL"
SQLITE_BUSY_TIMEOUT_MS = 30_000
PG_CONNECT_TIMEOUT_S = 5  # seconds (libpq's smallest connect_timeout is 2), also the bound of unacknowledged sends

# Pass as a connection's execution options to open a write transaction. On SQLite this sends
# BEGIN IMMEDIATE: a deferred transaction that reads, then writes, fails at once with "database is
# locked" when another writer got in between, whatever the busy timeout says.
WRITE_TRANSACTION: dict[str, Any] = {"dr_write": True}


def database_url(explicit: str | None = None) -> str:
    """The URL to use: ``explicit``, else ``$DR_DATABASE_URL``, else a SQLite file in the working directory.

    Plain ``postgresql://`` URLs are sent to psycopg 3, the driver we ship. A URL holding a password
    is best given by reference, ``env:NAME`` or ``file:/path`` (SecretError when it cannot be read)."""
    url = explicit or os.environ.get(URL_ENV) or DEFAULT_URL
    if secrets.is_reference(url):
        url = secrets.resolve(url)
    for prefix in ("postgresql://", "postgres://"):
        if url.startswith(prefix):
            return "postgresql+psycopg://" + url[len(prefix) :]
    return url


def make_engine(url: str | None = None) -> Engine:
    """An engine for ``url`` (see ``database_url``); SQLite gets WAL, foreign keys and a busy timeout."""
    resolved = database_url(url)
    if not resolved.startswith("sqlite"):
        # libpq waits forever for a server that stopped answering (a partition drops packets, it refuses
        # nothing): bound connecting and every unacknowledged send; the URL's own values win.
        bounds = {"connect_timeout": PG_CONNECT_TIMEOUT_S, "tcp_user_timeout": PG_CONNECT_TIMEOUT_S * 1000}
        bounded = {name: value for name, value in bounds.items() if f"{name}=" not in resolved}
        return create_engine(resolved, pool_pre_ping=True, connect_args=bounded)
    engine = create_engine(resolved, connect_args={"timeout": SQLITE_BUSY_TIMEOUT_MS / 1000})
    event.listen(engine, "connect", _configure_sqlite)
    event.listen(engine, "begin", _begin_sqlite)
    return engine


def _configure_sqlite(dbapi_connection: Any, _record: Any) -> None:
    # SQLAlchemy sends BEGIN itself (see _begin_sqlite): the sqlite3 module's own transaction
    # handling skips BEGIN before SELECT and DDL, which breaks transactional migrations.
    dbapi_connection.isolation_level = None
    cursor = dbapi_connection.cursor()
    try:
        cursor.execute(f"PRAGMA busy_timeout = {SQLITE_BUSY_TIMEOUT_MS}")
        cursor.execute("PRAGMA foreign_keys = ON")
        # WAL: readers (the CLI, the API) never block the engine's writes, nor the reverse.
        cursor.execute("PRAGMA journal_mode = WAL")
        # In WAL mode NORMAL skips the fsync per commit (~7 ms here, paid by every engine event)
        # and still loses nothing when a process crashes; only an OS crash or power cut may undo
        # the last commits, never corrupting the file.
        cursor.execute("PRAGMA synchronous = NORMAL")
    finally:
        cursor.close()


def _begin_sqlite(connection: Connection) -> None:
    immediate = connection.get_execution_options().get("dr_write", False)
    connection.exec_driver_sql("BEGIN IMMEDIATE" if immediate else "BEGIN")


def make_session_factory(engine: Engine) -> sessionmaker[Session]:
    """Sessions whose writes of evidence rows are appended to the audit chain."""
    # Evidence rows are read back after commit (queries, results): keep loaded values.
    factory = sessionmaker(bind=engine, expire_on_commit=False)
    chain.install(factory)
    return factory


def rolled_back_sessions(connection: Connection) -> sessionmaker[Session]:
    """Sessions like ``make_session_factory``'s whose commits are savepoints in the transaction of
    ``connection``: all they write goes when its owner rolls that transaction back."""
    factory = sessionmaker(bind=connection, expire_on_commit=False, join_transaction_mode="create_savepoint")
    chain.install(factory)
    return factory


def session_factory_for(url: str | None = None) -> sessionmaker[Session]:
    return make_session_factory(make_engine(url))


def begin_write(session: Session) -> None:
    """Make the session's transaction a write transaction (BEGIN IMMEDIATE on SQLite) unless it
    has already talked to the database: reads and the chain head then happen under the writer lock,
    and a concurrent writer cannot make this one fail half-way."""
    with warnings.catch_warnings():
        # When a connection is already established the options cannot apply; the transaction
        # still works (SQLite upgrades it to a write transaction at its first write).
        warnings.filterwarnings("ignore", "Connection is already established", SAWarning)
        session.connection(execution_options=WRITE_TRANSACTION)
