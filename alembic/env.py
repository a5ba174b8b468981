"""Alembic environment for the evidence schema.

The URL: ``config.attributes["url"]`` (set by ``dr_orchestrator.evidence.migrate``), else
``$DR_DATABASE_URL``, else ``sqlalchemy.url`` from alembic.ini. Tables of APScheduler's job store
(``apscheduler_*``) share the database but are not ours: autogenerate leaves them alone.
"""

from __future__ import annotations

import os
from logging.config import fileConfig

from alembic import context
from sqlalchemy import Connection

from dr_orchestrator.evidence.database import URL_ENV, database_url, make_engine
from dr_orchestrator.evidence.models import Base

config = context.config
if config.config_file_name is not None:  # the alembic command; `dr db` configures no logging
    fileConfig(config.config_file_name)

target_metadata = Base.metadata


def resolved_url() -> str:
    return database_url(
        config.attributes.get("url") or os.environ.get(URL_ENV) or config.get_main_option("sqlalchemy.url")
    )


def include_name(name: str | None, type_: str, parent_names: object) -> bool:
    if type_ == "table":
        return not (name or "").startswith("apscheduler_")
    return True


def configure(**kwargs: object) -> None:
    context.configure(
        target_metadata=target_metadata,
        include_name=include_name,
        compare_type=True,
        **kwargs,  # type: ignore[arg-type]
    )


def run_offline() -> None:
    url = resolved_url()
    configure(url=url, literal_binds=True, render_as_batch=url.startswith("sqlite"))
    with context.begin_transaction():
        context.run_migrations()


def run_with(connection: Connection) -> None:
    sqlite = connection.dialect.name == "sqlite"
    if sqlite:
        # Batch migrations copy and drop tables; with foreign keys enforced, dropping a referenced
        # table fails. They are checked below instead, before the migration commits.
        connection.connection.driver_connection.execute("PRAGMA foreign_keys = OFF")  # type: ignore[union-attr]
    # SQLAlchemy sends BEGIN on SQLite too (see evidence.database), so its DDL is transactional:
    # a migration that fails leaves the schema as it was.
    configure(connection=connection, render_as_batch=sqlite, transactional_ddl=True)
    with context.begin_transaction():
        context.run_migrations()
        if sqlite:
            broken = connection.exec_driver_sql("PRAGMA foreign_key_check").fetchall()
            if broken:
                raise RuntimeError(f"the migration left rows with broken foreign keys: {broken[:5]}")


def run_online() -> None:
    engine = make_engine(resolved_url())
    try:
        with engine.connect() as connection:
            run_with(connection)
    finally:
        engine.dispose()


if context.is_offline_mode():
    run_offline()
else:
    run_online()
