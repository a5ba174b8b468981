"""What the benchmark modules share: a figure line, a throwaway PostgreSQL, a lab slot, the clock.

Each module under benchmarks/ exposes ``NAME``, ``TITLE`` and ``measure(quick) -> list[Figure]``;
``run.py`` runs them and prints every figure beside its target.
"""

from __future__ import annotations

import contextlib
import fcntl
import os
import shutil
import socket
import subprocess
import tempfile
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from dr_orchestrator.lab.lab import Lab

REPO = Path(__file__).resolve().parent.parent
PG_BIN = Path("/usr/lib/postgresql/15/bin")


@dataclass
class Figure:
    """One measured number; ``target`` is a bound it should stay under (or over, ``at_least``)."""

    label: str
    value: float
    unit: str
    target: float | None = None
    at_least: bool = False
    note: str = ""

    @property
    def met(self) -> bool | None:
        if self.target is None:
            return None
        return self.value >= self.target if self.at_least else self.value <= self.target

    def line(self) -> str:
        text = f"  {self.label:<58} {self.value:>10.3f} {self.unit:<8}"
        if self.target is not None:
            sign = ">=" if self.at_least else "<="
            ratio = self.value / self.target if self.target else float("inf")
            verdict = "met" if self.met else "MISSED"
            text += f" target {sign} {self.target:g} {self.unit} (x{ratio:.2f} of target, {verdict})"
        if self.note:
            text += f"  [{self.note}]"
        return text


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def as_postgres(argv: list[str]) -> list[str]:
    return ["runuser", "-u", "postgres", "--", *argv] if os.geteuid() == 0 else argv


@contextlib.contextmanager
def postgres_server() -> Iterator[str]:
    """$DR_TEST_POSTGRES_URL, or a throwaway cluster (as the postgres user) stopped afterwards."""
    given = os.environ.get("DR_TEST_POSTGRES_URL")
    if given:
        yield given
        return
    work = Path(tempfile.mkdtemp(prefix="dr-bench-pg-"))
    data = work / "data"
    started = False
    try:
        if os.geteuid() == 0:
            work.chmod(0o755)
            shutil.chown(work, "postgres", "postgres")
        subprocess.run(as_postgres([str(PG_BIN / "initdb"), "-D", str(data), "-U", "postgres", "-A", "trust",
                                    "-E", "UTF8", "--no-sync"]), check=True, capture_output=True)
        with (data / "postgresql.conf").open("a") as conf:
            conf.write(f"listen_addresses = '127.0.0.1'\nunix_socket_directories = '{work}'\n")
        for _ in range(5):  # another process may take the free port before the server binds it
            port = free_port()
            start = subprocess.run(as_postgres([str(PG_BIN / "pg_ctl"), "-D", str(data), "-l", str(work / "log"),
                                                "-o", f"-p {port}", "-w", "-t", "60", "start"]), capture_output=True)
            if start.returncode == 0:
                started = True
                break
        if not started:
            raise RuntimeError("PostgreSQL did not start")
        yield f"postgresql+psycopg://postgres@127.0.0.1:{port}/postgres"
    finally:
        if started:
            subprocess.run(as_postgres([str(PG_BIN / "pg_ctl"), "-D", str(data), "-m", "immediate", "-w", "stop"]),
                           capture_output=True)
        shutil.rmtree(work, ignore_errors=True)


@contextlib.contextmanager
def postgres_database(server_url: str) -> Iterator[str]:
    """A fresh database on ``server_url``, dropped afterwards."""
    import psycopg
    from sqlalchemy.engine import make_url

    admin = make_url(server_url)
    name = f"dr_bench_{uuid.uuid4().hex[:12]}"
    conninfo = admin.set(drivername="postgresql").render_as_string(hide_password=False)
    with psycopg.connect(conninfo, autocommit=True) as conn:
        conn.execute(f'CREATE DATABASE "{name}"')
    try:
        yield admin.set(database=name).render_as_string(hide_password=False)
    finally:
        with psycopg.connect(conninfo, autocommit=True) as conn:
            conn.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


@contextlib.contextmanager
def sqlite_database() -> Iterator[str]:
    work = Path(tempfile.mkdtemp(prefix="dr-bench-sqlite-"))
    try:
        yield f"sqlite:///{work / 'evidence.db'}"
    finally:
        shutil.rmtree(work, ignore_errors=True)


# Same offsets and lock directory as the tests' lab fixtures, so a benchmark never shares a lab's ports.
LAB_PORT_OFFSETS = range(1000, 14001, 1000)
LAB_OFFSET_LOCKS = Path(tempfile.gettempdir()) / "dr-lab-port-offsets"


def _port_free(address: str, port: int) -> bool:
    with socket.socket() as probe:
        probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            probe.bind((address, port))
        except OSError:
            return False
    return True


@contextlib.contextmanager
def running_lab(sync: bool = False) -> Iterator[Lab]:
    """A lab of the benchmark's own (claimed port offset, fresh directory), always taken down after."""
    from dr_orchestrator.lab.config import LabConfig
    from dr_orchestrator.lab.lab import Lab

    LAB_OFFSET_LOCKS.mkdir(mode=0o777, exist_ok=True)
    for offset in LAB_PORT_OFFSETS:
        lock = (LAB_OFFSET_LOCKS / f"{offset}.lock").open("w")
        try:
            fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            lock.close()
            continue
        try:
            probe_config = LabConfig(root=LAB_OFFSET_LOCKS, port_offset=offset)
            if not all(_port_free(address, port) for address, port in probe_config.listening_ports()):
                continue
            root = Path(tempfile.mkdtemp(prefix="dr-lab-bench-"))
            root.chmod(0o755)
            lab = Lab(LabConfig(root=root, port_offset=offset))
            try:
                lab.up(sync=sync)
                yield lab
            finally:
                lab.down()
                shutil.rmtree(root, ignore_errors=True)
            return
        finally:
            lock.close()
    raise RuntimeError(f"no free lab port offset among {list(LAB_PORT_OFFSETS)}")


class Stopwatch:
    """``with Stopwatch() as sw: ...`` then ``sw.seconds`` (time.monotonic)."""

    def __enter__(self) -> Stopwatch:
        self.started = time.monotonic()
        self.seconds = 0.0
        return self

    def __exit__(self, *_: object) -> None:
        self.seconds = time.monotonic() - self.started
