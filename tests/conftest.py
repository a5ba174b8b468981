"""Shared fixtures."""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from sqlalchemy.orm import Session, sessionmaker
from support.cli import Processes

from dr_orchestrator.evidence import migrate
from dr_orchestrator.evidence.database import make_engine, make_session_factory
from dr_orchestrator.lab import scratch
from dr_orchestrator.lab.config import LabConfig
from dr_orchestrator.lab.lab import Lab

# --- PostgreSQL for the evidence tests --------------------------------------------------------------
# `postgres_url`: a server for the session, $DR_TEST_POSTGRES_URL or a throwaway cluster started here.
# `postgres_database_url`: a fresh, empty database on it for one test. `database_url`: each evidence
# test once on SQLite and once on PostgreSQL.


@pytest.fixture(scope="session")
def postgres_url() -> Iterator[str]:
    """URL of a PostgreSQL server's maintenance database (``postgres``), superuser ``postgres``."""
    with scratch.postgres_server(prefix="dr-test-pg-", fsync=False) as url:
        yield url


@pytest.fixture
def postgres_database_url(postgres_url: str) -> Iterator[str]:
    """A fresh database for one test, dropped afterwards."""
    with scratch.postgres_database(postgres_url, prefix="dr_test_") as url:
        yield url


@pytest.fixture(params=["sqlite", pytest.param("postgresql", marks=pytest.mark.postgres)])
def database_url(request: pytest.FixtureRequest, tmp_path: Path) -> str:
    """An empty database: a SQLite file, or a fresh PostgreSQL database."""
    if request.param == "sqlite":
        return f"sqlite:///{tmp_path / 'evidence.db'}"
    return str(request.getfixturevalue("postgres_database_url"))


def migrated_sessions(url: str) -> Iterator[sessionmaker[Session]]:
    """Sessions (with the audit chain) on the migrated database ``url``; its engine disposed after."""
    migrate.upgrade(url)
    engine = make_engine(url)
    try:
        yield make_session_factory(engine)
    finally:
        engine.dispose()


@pytest.fixture
def sqlite_sessions(tmp_path: Path) -> Iterator[sessionmaker[Session]]:
    """Sessions on a migrated SQLite file, for tests that need not run on both databases."""
    yield from migrated_sessions(f"sqlite:///{tmp_path / 'evidence.db'}")


@pytest.fixture
def sessions(database_url: str) -> Iterator[sessionmaker[Session]]:
    """Sessions on a migrated ``database_url``: each evidence test once per database."""
    yield from migrated_sessions(database_url)


# --- The two-site lab (dr_orchestrator.lab) ----------------------------------------------------------
# `lab`: one running lab shared by the whole session (tests must leave it as they found it).
# `lab_factory`: `with lab_factory() as lab:` a lab of one's own, for tests that break things.
# Each lab gets a directory under /tmp and a claimed port offset (dr_orchestrator.lab.scratch).


@pytest.fixture(scope="session")
def lab() -> Iterator[Lab]:
    """The session's shared, running lab (a dr_orchestrator.lab.Lab); leave it as you found it."""
    with scratch.running_lab("shared") as shared:
        yield shared


@pytest.fixture
def lab_factory() -> Callable[..., contextlib.AbstractContextManager[Lab]]:
    """`with lab_factory() as lab:` a fresh lab of the test's own, taken down after the block."""
    return lambda: scratch.running_lab("own")


@pytest.fixture
def lab_config() -> Iterator[LabConfig]:
    """A config for a lab of the test's own, not started: free ports, a fresh directory, down afterwards."""
    with scratch.lab_slot("own") as config:
        yield config


# --- `dr` processes ----------------------------------------------------------------------------------


@pytest.fixture
def processes(tmp_path: Path) -> Iterator[Processes]:
    """`dr` processes started in the test's directory; whatever is left is killed at the end."""
    made = Processes(tmp_path)
    try:
        yield made
    finally:
        made.close()
