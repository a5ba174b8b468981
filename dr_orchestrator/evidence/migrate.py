"""Create and migrate the evidence schema with Alembic, from any working directory.

The migrations live in ``alembic/`` at the top of the source tree, next to this package (it is
installed editable). ``schema_problem`` is what ``dr run`` asks before it writes any evidence.

Alembic is imported only where it is used: a command whose database is at ``SCHEMA_HEAD`` checks so
without loading it (a fifth of the CPU a `dr` command took).
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING

from sqlalchemy import inspect, text
from sqlalchemy.engine import make_url
from sqlalchemy.exc import SQLAlchemyError

from dr_orchestrator.evidence.database import database_url, make_engine

if TYPE_CHECKING:
    from alembic.config import Config

MIGRATIONS_DIR = Path(__file__).resolve().parents[2] / "alembic"
# The newest migration's revision (tests/test_evidence_migrations.py holds it to Alembic's head).
SCHEMA_HEAD = "0007"
# Where Alembic keeps a database's revision (its default; alembic/env.py keeps it).
VERSION_TABLE = "alembic_version"


class MigrationError(RuntimeError):
    """Migrating could not be done; the message is one sentence for the engineer."""


class MigrationsMissing(MigrationError):
    """The alembic/ directory is not next to the package (installed from a wheel, not the source tree)."""


def alembic_config(url: str | None = None) -> Config:
    from alembic.config import Config

    if not (MIGRATIONS_DIR / "env.py").is_file():
        raise MigrationsMissing(
            f"the evidence migrations are missing ({MIGRATIONS_DIR}/env.py not found): "
            "install dr-orchestrator from its source tree with `pip install -e .`"
        )
    config = Config()
    config.set_main_option("script_location", str(MIGRATIONS_DIR))
    # Passed as an attribute, not a main option: ini interpolation would choke on a '%' in a password.
    config.attributes["url"] = database_url(url)
    return config


def upgrade(url: str | None = None, revision: str = "head") -> None:
    """Create or migrate the schema up to ``revision``; MigrationError says why it could not."""
    from alembic import command

    with _explained(url):
        command.upgrade(alembic_config(url), revision)


def downgrade(url: str | None, revision: str) -> None:
    """Migrate down to ``revision`` (``base``: drop every evidence table)."""
    from alembic import command

    with _explained(url):
        command.downgrade(alembic_config(url), revision)


@contextmanager
def _explained(url: str | None) -> Iterator[None]:
    from alembic.util.exc import CommandError

    try:
        yield
    except CommandError as exc:  # e.g. an unknown revision
        raise MigrationError(f"{exc}") from None
    except SQLAlchemyError as exc:
        raise MigrationError(f"cannot migrate the evidence database {display_url(url)}: {_first_line(exc)}") from None


def _first_line(exc: SQLAlchemyError) -> str:
    """The driver's own message, without SQLAlchemy's statement and link lines."""
    return (str(getattr(exc, "orig", None) or exc).strip().splitlines() or ["unknown error"])[0]


def head_revisions() -> set[str]:
    from alembic.script import ScriptDirectory

    return set(ScriptDirectory.from_config(alembic_config()).get_heads())


def current_revisions(url: str | None = None) -> set[str]:
    """The revisions the database is at; empty before the first upgrade."""
    engine = make_engine(url)
    try:
        with engine.connect() as connection:
            if not inspect(connection).has_table(VERSION_TABLE):
                return set()
            return set(connection.execute(text(f"SELECT version_num FROM {VERSION_TABLE}")).scalars())
    finally:
        engine.dispose()


def current_revision(url: str | None = None) -> str:
    """The database's revision for people to read: ``0001``, or ``none`` before the first upgrade."""
    return ", ".join(sorted(current_revisions(url))) or "none"


def display_url(url: str | None = None) -> str:
    return make_url(database_url(url)).render_as_string(hide_password=True)


def _sqlite_file_missing(url: str) -> bool:
    parsed = make_url(url)
    return parsed.get_backend_name() == "sqlite" and bool(parsed.database) and not Path(parsed.database or "").exists()


def schema_problem(url: str | None = None) -> str | None:
    """One sentence saying why the database cannot take evidence yet, or None when its schema is current."""
    resolved = database_url(url)
    where = display_url(resolved)
    if _sqlite_file_missing(resolved):  # checked first: connecting would create an empty file
        return f"the evidence database {where} does not exist yet: run `dr db upgrade`"
    try:
        current = current_revisions(resolved)
    except SQLAlchemyError as exc:
        return f"cannot open the evidence database {where}: {_first_line(exc)}"
    if current == {SCHEMA_HEAD}:
        return None
    if not current:
        return f"the evidence database {where} has no schema yet: run `dr db upgrade`"
    from alembic.script import ScriptDirectory

    heads = head_revisions()
    if current == heads:
        return None
    known = {script.revision for script in ScriptDirectory.from_config(alembic_config()).walk_revisions()}
    if current - known:
        return (
            f"the evidence database {where} is at revision {', '.join(sorted(current))}, "
            "newer than this dr-orchestrator: upgrade dr-orchestrator"
        )
    return (
        f"the evidence database {where} is at revision {', '.join(sorted(current))}, "
        f"not {', '.join(sorted(heads))}: run `dr db upgrade`"
    )


def schema_is_current(url: str | None = None) -> bool:
    return schema_problem(url) is None
