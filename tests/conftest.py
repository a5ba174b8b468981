"""Shared fixtures."""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import shutil
import socket
import subprocess
import tempfile
import time
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import TYPE_CHECKING

import pytest
from sqlalchemy.engine import make_url

if TYPE_CHECKING:
    from dr_orchestrator.lab.config import LabConfig
    from dr_orchestrator.lab.lab import Lab

# --- PostgreSQL for the evidence tests --------------------------------------------------------------
# `postgres_url`: a server for the session, $DR_TEST_POSTGRES_URL or a throwaway cluster started here.
# `postgres_database_url`: a fresh, empty database on it for one test. `database_url`: each evidence
# test once on SQLite and once on PostgreSQL.

PG_BIN = Path("/usr/lib/postgresql/15/bin")


def _as_postgres(argv: list[str]) -> list[str]:
    # PostgreSQL refuses to run as root.
    return ["runuser", "-u", "postgres", "--", *argv] if os.geteuid() == 0 else argv


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def _wait_ready(port: int, socket_dir: Path, deadline_s: float = 30.0) -> None:
    deadline = time.monotonic() + deadline_s
    while True:
        ready = subprocess.run(
            [str(PG_BIN / "pg_isready"), "-h", "127.0.0.1", "-p", str(port), "-U", "postgres"],
            capture_output=True,
        )
        if ready.returncode == 0:
            return
        if time.monotonic() > deadline:
            raise RuntimeError(f"PostgreSQL on port {port} was not ready within {deadline_s}s (logs in {socket_dir})")
        time.sleep(0.1)


@pytest.fixture(scope="session")
def postgres_url() -> Iterator[str]:
    """URL of a PostgreSQL server's maintenance database (``postgres``), superuser ``postgres``."""
    given = os.environ.get("DR_TEST_POSTGRES_URL")
    if given:
        yield given
        return
    work = Path(tempfile.mkdtemp(prefix="dr-test-pg-"))
    data = work / "data"
    started = False
    try:
        if os.geteuid() == 0:
            work.chmod(0o755)
            shutil.chown(work, "postgres", "postgres")
        subprocess.run(
            _as_postgres(
                [str(PG_BIN / "initdb"), "-D", str(data), "-U", "postgres", "-A", "trust", "-E", "UTF8", "--no-sync"]
            ),
            check=True,
            capture_output=True,
        )
        with (data / "postgresql.conf").open("a") as conf:
            conf.write(f"listen_addresses = '127.0.0.1'\nunix_socket_directories = '{work}'\nfsync = off\n")
        for _ in range(5):  # another process may take the free port before the server binds it
            port = _free_port()
            start = subprocess.run(
                _as_postgres(
                    [
                        str(PG_BIN / "pg_ctl"),
                        "-D",
                        str(data),
                        "-l",
                        str(work / "server.log"),
                        "-o",
                        f"-p {port}",
                        "-w",
                        "-t",
                        "60",
                        "start",
                    ]
                ),
                capture_output=True,
            )
            if start.returncode == 0:
                started = True
                break
        if not started:
            raise RuntimeError(f"PostgreSQL did not start: {(work / 'server.log').read_text()[-2000:]}")
        _wait_ready(port, work)
        yield f"postgresql+psycopg://postgres@127.0.0.1:{port}/postgres"
    finally:
        if started:
            subprocess.run(
                _as_postgres([str(PG_BIN / "pg_ctl"), "-D", str(data), "-m", "immediate", "-w", "stop"]),
                capture_output=True,
            )
        shutil.rmtree(work, ignore_errors=True)


@pytest.fixture
def postgres_database_url(postgres_url: str) -> Iterator[str]:
    """A fresh database for one test, dropped afterwards."""
    import psycopg

    admin = make_url(postgres_url)
    name = f"dr_test_{uuid.uuid4().hex[:12]}"
    conninfo = admin.set(drivername="postgresql").render_as_string(hide_password=False)
    with psycopg.connect(conninfo, autocommit=True) as conn:
        conn.execute(f'CREATE DATABASE "{name}"')
    try:
        yield admin.set(database=name).render_as_string(hide_password=False)
    finally:
        with psycopg.connect(conninfo, autocommit=True) as conn:
            conn.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


@pytest.fixture(params=["sqlite", pytest.param("postgresql", marks=pytest.mark.postgres)])
def database_url(request: pytest.FixtureRequest, tmp_path: Path) -> str:
    """An empty database: a SQLite file, or a fresh PostgreSQL database."""
    if request.param == "sqlite":
        return f"sqlite:///{tmp_path / 'evidence.db'}"
    return str(request.getfixturevalue("postgres_database_url"))


# --- The two-site lab (dr_orchestrator.lab) ----------------------------------------------------------
# `lab`: one running lab shared by the whole session (tests must leave it as they found it).
# `lab_factory`: `with lab_factory() as lab:` a lab of one's own, for tests that break things.
# Each lab gets a directory under /tmp (the postgres OS user must reach it) and a port offset whose
# ports are all free, claimed with a lock so that concurrent test sessions never share one. The
# offsets keep every port below 32768, out of the kernel's ephemeral range used by client sockets.

LAB_PORT_OFFSETS = range(1000, 14001, 1000)
LAB_OFFSET_LOCKS = Path(tempfile.gettempdir()) / "dr-lab-port-offsets"
LAB_KINDS = ("shared", "own")  # directory name prefixes: /tmp/dr-lab-<kind>-XXXX


@contextlib.contextmanager
def _claimed_lab_offset() -> Iterator[int]:
    from dr_orchestrator.lab.config import LabConfig

    LAB_OFFSET_LOCKS.mkdir(mode=0o777, exist_ok=True)
    for offset in LAB_PORT_OFFSETS:
        lock = (LAB_OFFSET_LOCKS / f"{offset}.lock").open("w")
        try:
            fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            lock.close()
            continue
        _take_down_abandoned_labs(offset)
        config = LabConfig(root=LAB_OFFSET_LOCKS, port_offset=offset)
        if all(_port_free(address, port) for address, port in config.listening_ports()):
            try:
                yield offset
            finally:
                lock.close()  # releases the lock
            return
        lock.close()
    raise RuntimeError(f"no free lab port offset among {list(LAB_PORT_OFFSETS)}")


def _take_down_abandoned_labs(offset: int) -> None:
    """Labs of a test session that was killed (no finalizer ran) with this offset: we hold its lock, so
    no live session owns them."""
    from dr_orchestrator.lab.config import MARKER_NAME, LabConfig
    from dr_orchestrator.lab.lab import Lab

    markers = [marker for kind in LAB_KINDS
               for marker in Path(tempfile.gettempdir()).glob(f"dr-lab-{kind}-*/{MARKER_NAME}")]
    for marker in markers:
        try:
            recorded = json.loads(marker.read_text()).get("port_offset")
        except (OSError, ValueError):
            continue
        if recorded == offset:
            Lab(LabConfig(root=marker.parent, port_offset=offset)).down()
            shutil.rmtree(marker.parent, ignore_errors=True)


def _port_free(address: str, port: int) -> bool:
    with socket.socket() as probe:
        probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            probe.bind((address, port))
        except OSError:
            return False
    return True


@contextlib.contextmanager
def lab_slot(name: str) -> Iterator[LabConfig]:
    """A LabConfig with a claimed port offset and a fresh directory; whatever runs there is taken down after."""
    from dr_orchestrator.lab.config import LabConfig
    from dr_orchestrator.lab.lab import Lab

    with _claimed_lab_offset() as offset:
        root = Path(tempfile.mkdtemp(prefix=f"dr-lab-{name}-"))
        root.chmod(0o755)
        config = LabConfig(root=root, port_offset=offset)
        try:
            yield config
        finally:
            Lab(config).down()
            shutil.rmtree(root, ignore_errors=True)


@contextlib.contextmanager
def running_lab(name: str, sync: bool = False) -> Iterator[Lab]:
    """A lab brought up for the duration of the block, and always taken down after it."""
    from dr_orchestrator.lab.lab import Lab

    with lab_slot(name) as config:
        lab = Lab(config)
        lab.up(sync=sync)
        yield lab


@pytest.fixture(scope="session")
def lab() -> Iterator[Lab]:
    """The session's shared, running lab (a dr_orchestrator.lab.Lab); leave it as you found it."""
    with running_lab("shared") as shared:
        yield shared


@pytest.fixture
def lab_factory() -> Callable[..., contextlib.AbstractContextManager[Lab]]:
    """`with lab_factory(sync=False) as lab:` a fresh lab of the test's own, taken down after the block."""
    return lambda sync=False: running_lab("own", sync=sync)


@pytest.fixture
def lab_config() -> Iterator[LabConfig]:
    """A config for a lab of the test's own, not started: free ports, a fresh directory, down afterwards."""
    with lab_slot("own") as config:
        yield config
