"""Where the evidence lives: the database URL, engines tuned per backend, sessions, and the UTC time type."""

from __future__ import annotations

import os
from datetime import UTC, datetime
from typing import Any

from sqlalchemy import DateTime, Engine, String, create_engine, event
from sqlalchemy.engine import Connection, Dialect
from sqlalchemy.orm import Session, sessionmaker
from sqlalchemy.types import TypeDecorator, TypeEngine

from dr_orchestrator import secrets

DEFAULT_URL = "sqlite:///dr-evidence.db"
URL_ENV = "DR_DATABASE_URL"
SQLITE_BUSY_TIMEOUT_MS = 30_000

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
        return create_engine(resolved, pool_pre_ping=True)
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
    from dr_orchestrator.evidence import chain  # imports the models, which import this module

    # Evidence rows are read back after commit (queries, results): keep loaded values.
    factory = sessionmaker(bind=engine, expire_on_commit=False)
    chain.install(factory)
    return factory


def session_factory_for(url: str | None = None) -> sessionmaker[Session]:
    return make_session_factory(make_engine(url))


class UTCDateTime(TypeDecorator[datetime]):
    """Timezone-aware UTC with microseconds on every backend.

    PostgreSQL: ``timestamp with time zone``. SQLite has no such type: fixed-width ISO-8601 text
    (``2026-11-28T03:04:37.123456+00:00``), which sorts in time order. Naive datetimes are refused:
    a timestamp without a zone is not evidence."""

    impl = DateTime
    cache_ok = True

    def load_dialect_impl(self, dialect: Dialect) -> TypeEngine[Any]:
        if dialect.name == "sqlite":
            return dialect.type_descriptor(String(32))
        return dialect.type_descriptor(DateTime(timezone=True))

    def process_bind_param(self, value: datetime | None, dialect: Dialect) -> Any:
        if value is None:
            return None
        if value.tzinfo is None or value.utcoffset() is None:
            raise ValueError(f"naive datetime {value.isoformat()} refused: evidence timestamps carry a time zone")
        utc = value.astimezone(UTC)
        if dialect.name == "sqlite":
            return utc.isoformat(timespec="microseconds")
        return utc

    def process_result_value(self, value: Any, dialect: Dialect) -> datetime | None:
        if value is None:
            return None
        parsed = datetime.fromisoformat(value) if isinstance(value, str) else value
        if parsed.tzinfo is None:  # stored by something other than this type
            return parsed.replace(tzinfo=UTC)
        return parsed.astimezone(UTC)
