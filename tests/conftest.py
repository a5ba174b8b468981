"""Shared fixtures."""

from __future__ import annotations

import contextlib
import os
import subprocess
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from sqlalchemy.orm import Session, sessionmaker
from support.aws import MOTO_SERVER, Moto, answers, moto_api
from support.cli import Processes
from support.engine import Bench

from dr_orchestrator.evidence import migrate
from dr_orchestrator.evidence.database import make_engine, make_session_factory
from dr_orchestrator.lab import scratch
from dr_orchestrator.lab.config import LabConfig
from dr_orchestrator.lab.lab import Lab
from dr_orchestrator.lab.scratch import free_port

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


# --- The engine's bench (support/engine.py) ---------------------------------------------------------


@pytest.fixture
def bench() -> Iterator[Bench]:
    """Test actions registered, the events they cause, and the flags and barriers that steer them."""
    made = Bench()
    try:
        yield made
    finally:
        made.flags["release"].set()  # let abandoned actions end


# --- The local AWS endpoint (moto) ------------------------------------------------------------------


@pytest.fixture(scope="session")
def moto_url(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """A moto server process on a free port for the session; always terminated."""
    log_path = tmp_path_factory.mktemp("moto") / "moto.log"
    process: subprocess.Popen[bytes] | None = None
    try:
        for _ in range(5):  # another process may take the port between choosing and binding it
            port = free_port()
            url = f"http://127.0.0.1:{port}"
            with log_path.open("ab") as log:
                process = subprocess.Popen([str(MOTO_SERVER), "-H", "127.0.0.1", "-p", str(port)],
                                           stdout=log, stderr=subprocess.STDOUT)
            deadline = time.monotonic() + 30
            while process.poll() is None and time.monotonic() < deadline and not answers(url):
                time.sleep(0.05)
            if process.poll() is None and answers(url):
                yield url
                return
            process.kill()
            process.wait()
        raise RuntimeError(f"moto_server did not start; see {log_path}")
    finally:
        if process is not None and process.poll() is None:
            process.terminate()
            try:
                process.wait(10)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait()


@pytest.fixture
def aws(moto_url: str, monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> Iterator[Moto]:
    """A clean moto, and an environment whose only AWS credentials and endpoint are the test's fake ones."""
    moto_api(moto_url, "reset")
    for name in list(os.environ):
        if name.startswith("AWS_"):
            monkeypatch.delenv(name)
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "testing")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "testing")
    monkeypatch.setenv("AWS_ENDPOINT_URL", moto_url)
    monkeypatch.setenv("AWS_CONFIG_FILE", str(tmp_path / "no-aws-config"))
    monkeypatch.setenv("AWS_SHARED_CREDENTIALS_FILE", str(tmp_path / "no-aws-credentials"))
    monkeypatch.setenv("AWS_EC2_METADATA_DISABLED", "true")
    yield Moto(moto_url)


# --- The fast set and parallel workers (pytest-xdist, --dist loadgroup; scripts/test.sh) -----------------
# `-m "not slow"` is the fast set: a test that starts a real part (a lab, PostgreSQL, etcd, Redis, moto,
# Chromium) is marked slow here, and a test taking more than about a second is marked slow in its module.
# The suite is bound by the 2-core machine's CPU, and a test starved of it misses its deadlines. So the
# tests that start labs of their own (the heaviest: a lab is a dozen processes, an HA lab twice that)
# run one at a time, in the "own-lab" lane on one worker; a module whose fixtures are module- or
# class-scoped runs on one worker (set up once there); every other test is a unit of its own, handed
# out slowest first, so the suite ends on short ones with every worker busy until then.

OWN_LAB_FIXTURES = frozenset({"lab_factory", "lab_config", "fresh_ha_lab", "ha_lab"})
OWN_LAB_LANE = "own-lab"
REAL_PART_MARKERS = frozenset({"lab", "postgres", "etcd", "redis", "aws", "browser"})
REAL_PART_FIXTURES = OWN_LAB_FIXTURES | {"lab", "postgres_url", "moto_url"}


@pytest.hookimpl(tryfirst=True)  # before `-m` deselects by the markers added here
def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    # Ordered by the slow marks the modules gave: the tests on the shared lab are short ones and come
    # late, so its lab starts late (and idles for less).
    items.sort(key=lambda item: (not _starts_own_lab(item), item.get_closest_marker("slow") is None))
    for item in items:
        if _starts_real_parts(item) and item.get_closest_marker("slow") is None:
            item.add_marker(pytest.mark.slow)
        if _starts_own_lab(item):
            item.add_marker(pytest.mark.xdist_group(OWN_LAB_LANE))
        elif _shares_fixtures(item):
            item.add_marker(pytest.mark.xdist_group(item.nodeid.partition("::")[0]))


def _starts_real_parts(item: pytest.Item) -> bool:
    return bool(REAL_PART_FIXTURES & set(getattr(item, "fixturenames", ()))) or \
        any(item.get_closest_marker(name) is not None for name in REAL_PART_MARKERS)


def _starts_own_lab(item: pytest.Item) -> bool:
    return bool(OWN_LAB_FIXTURES & set(getattr(item, "fixturenames", ()))) or \
        item.get_closest_marker("own_lab") is not None


def _shares_fixtures(item: pytest.Item) -> bool:
    definitions = getattr(item, "_fixtureinfo", None)
    if definitions is None:
        return False
    return any(definition.scope in ("module", "class")
               for chain in definitions.name2fixturedefs.values() for definition in chain)
