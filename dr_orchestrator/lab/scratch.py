"""Throwaway parts for the test suite and the benchmarks: a PostgreSQL server and databases on it, and
lab slots (a claimed port offset and a fresh directory) for labs of their own.

Port offsets are claimed with a lock file per offset, so that concurrent test sessions and benchmark
runs never share one; the offsets keep every port below 32768, out of the kernel's ephemeral range
used by client sockets.
"""

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
from collections.abc import Iterator
from pathlib import Path

from dr_orchestrator.lab.config import MARKER_NAME, PG_BIN, LabConfig
from dr_orchestrator.lab.lab import Lab
from dr_orchestrator.lab.system import as_user

POSTGRES_URL_ENV = "DR_TEST_POSTGRES_URL"  # a server to use instead of a throwaway one
LAB_PORT_OFFSETS = range(1000, 14001, 1000)
LAB_OFFSET_LOCKS = Path(tempfile.gettempdir()) / "dr-lab-port-offsets"
LAB_KINDS = ("shared", "own", "bench")  # directory name prefixes: <scratch base>/dr-lab-<kind>-XXXX
RAM_DIRECTORY = Path("/dev/shm")
RAM_NEEDED_BYTES = 4 << 30  # a lab takes about 200 MB; room for a session's labs with a wide margin


def scratch_base() -> Path:
    """Where scratch labs live: memory (/dev/shm) when it has room, since creating the clusters' files
    is most of a lab's start and several times faster there; else the temporary directory."""
    try:
        if RAM_DIRECTORY.is_dir() and os.access(RAM_DIRECTORY, os.W_OK) and \
                shutil.disk_usage(RAM_DIRECTORY).free >= RAM_NEEDED_BYTES:
            return RAM_DIRECTORY
    except OSError:
        pass
    return Path(tempfile.gettempdir())


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def port_free(address: str, port: int) -> bool:
    with socket.socket() as probe:
        probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            probe.bind((address, port))
        except OSError:
            return False
    return True


# --- PostgreSQL ----------------------------------------------------------------------------------------


@contextlib.contextmanager
def postgres_server(prefix: str = "dr-scratch-pg-", fsync: bool = True) -> Iterator[str]:
    """URL of a server's maintenance database (``postgres``, superuser ``postgres``): ``$DR_TEST_POSTGRES_URL``,
    or a throwaway cluster started as the postgres OS user (it refuses root), stopped and removed after.
    ``fsync=False`` for tests, whose data need not survive a power cut; benchmarks keep it on."""
    given = os.environ.get(POSTGRES_URL_ENV)
    if given:
        yield given
        return
    work = Path(tempfile.mkdtemp(prefix=prefix))
    data = work / "data"
    started = False
    try:
        if os.geteuid() == 0:
            work.chmod(0o755)
            shutil.chown(work, "postgres", "postgres")
        subprocess.run(as_user("postgres", [str(PG_BIN / "initdb"), "-D", str(data), "-U", "postgres", "-A", "trust",
                                            "-E", "UTF8", "--no-sync"]), check=True, capture_output=True)
        with (data / "postgresql.conf").open("a") as conf:
            conf.write(f"listen_addresses = '127.0.0.1'\nunix_socket_directories = '{work}'\n")
            conf.write("" if fsync else "fsync = off\n")
        for _ in range(5):  # another process may take the free port before the server binds it
            port = free_port()
            start = subprocess.run(as_user("postgres", [
                str(PG_BIN / "pg_ctl"), "-D", str(data), "-l", str(work / "server.log"), "-o", f"-p {port}",
                "-w", "-t", "60", "start"]), capture_output=True)
            if start.returncode == 0:
                started = True
                break
        if not started:
            raise RuntimeError(f"PostgreSQL did not start: {(work / 'server.log').read_text()[-2000:]}")
        _wait_ready(port, work)
        yield f"postgresql+psycopg://postgres@127.0.0.1:{port}/postgres"
    finally:
        if started:
            subprocess.run(as_user("postgres", [str(PG_BIN / "pg_ctl"), "-D", str(data), "-m", "immediate", "-w",
                                                "stop"]), capture_output=True)
        shutil.rmtree(work, ignore_errors=True)


def _wait_ready(port: int, work: Path, deadline_s: float = 30.0) -> None:
    deadline = time.monotonic() + deadline_s
    while subprocess.run([str(PG_BIN / "pg_isready"), "-h", "127.0.0.1", "-p", str(port), "-U", "postgres"],
                         capture_output=True).returncode != 0:
        if time.monotonic() > deadline:
            raise RuntimeError(f"PostgreSQL on port {port} was not ready within {deadline_s:.0f} s (logs in {work})")
        time.sleep(0.1)


@contextlib.contextmanager
def postgres_database(server_url: str, prefix: str = "dr_scratch_") -> Iterator[str]:
    """A fresh database on ``server_url``, dropped afterwards."""
    import psycopg
    from sqlalchemy.engine import make_url

    admin = make_url(server_url)
    name = f"{prefix}{uuid.uuid4().hex[:12]}"
    conninfo = admin.set(drivername="postgresql").render_as_string(hide_password=False)
    with psycopg.connect(conninfo, autocommit=True) as conn:
        conn.execute(f'CREATE DATABASE "{name}"')
    try:
        yield admin.set(database=name).render_as_string(hide_password=False)
    finally:
        with psycopg.connect(conninfo, autocommit=True) as conn:
            conn.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


# --- labs ----------------------------------------------------------------------------------------------


@contextlib.contextmanager
def claimed_lab_offset() -> Iterator[int]:
    """A port offset whose lab ports are all free, held (by a lock file) until the block ends."""
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
        if all(port_free(address, port) for address, port in config.listening_ports()):
            try:
                yield offset
            finally:
                lock.close()  # releases the lock
            return
        lock.close()
    raise RuntimeError(f"no free lab port offset among {list(LAB_PORT_OFFSETS)}")


def _take_down_abandoned_labs(offset: int) -> None:
    """Labs of a session that was killed (no finalizer ran) with this offset: we hold its lock, so
    nothing alive owns them."""
    markers = [marker for base in {scratch_base(), Path(tempfile.gettempdir())} for kind in LAB_KINDS
               for marker in base.glob(f"dr-lab-{kind}-*/{MARKER_NAME}")]
    for marker in markers:
        try:
            recorded = json.loads(marker.read_text()).get("port_offset")
        except (OSError, ValueError):
            continue
        if recorded == offset:
            Lab(LabConfig(root=marker.parent, port_offset=offset)).down()
            shutil.rmtree(marker.parent, ignore_errors=True)


@contextlib.contextmanager
def lab_slot(kind: str) -> Iterator[LabConfig]:
    """A LabConfig with a claimed port offset and a fresh directory (``<scratch base>/dr-lab-<kind>-*``,
    which the postgres OS user can reach); whatever runs there is taken down after."""
    with claimed_lab_offset() as offset:
        root = Path(tempfile.mkdtemp(prefix=f"dr-lab-{kind}-", dir=scratch_base()))
        root.chmod(0o755)
        config = LabConfig(root=root, port_offset=offset)
        try:
            yield config
        finally:
            Lab(config).down()
            shutil.rmtree(root, ignore_errors=True)


@contextlib.contextmanager
def running_lab(kind: str) -> Iterator[Lab]:
    """A lab brought up for the duration of the block, and always taken down after it."""
    with lab_slot(kind) as config:
        lab = Lab(config)
        lab.up()
        yield lab
