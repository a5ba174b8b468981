"""`dr` as its users run it: a command to its end, or processes started and killed as a crash would."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from pathlib import Path
from typing import Any

from sqlalchemy import create_engine, text

from dr_orchestrator.lab.processes import send, with_descendants

WAIT_S = 60.0  # how long a killed process may take to be reaped

# `dr` processes act as this test's OS account alone, however the tests were started (sudo, ssh).
NOBODY_ELSE = {"SUDO_USER": "", "SSH_CONNECTION": ""}


def dr(*args: str, db: str, cwd: Path, actor: str = "tester", env: dict[str, str] | None = None,
       check: bool = False) -> subprocess.CompletedProcess[str]:
    result = subprocess.run([sys.executable, "-m", "dr_orchestrator.cli", *args], cwd=cwd,
                            env={**os.environ, **NOBODY_ELSE, "DR_DATABASE_URL": db, "DR_ACTOR": actor, **(env or {})},
                            capture_output=True, text=True, timeout=120)
    if check and result.returncode != 0:
        raise AssertionError(f"dr {' '.join(args)} exited {result.returncode}:\n{result.stdout}\n{result.stderr}")
    return result


class Processes:
    """`dr` processes started in their own process group; whatever is left is killed at the end."""

    def __init__(self, cwd: Path) -> None:
        self.cwd = cwd
        self.started: list[subprocess.Popen[str]] = []

    def start(self, *args: str, db: str, actor: str = "tester", env: dict[str, str] | None = None
              ) -> subprocess.Popen[str]:
        process = subprocess.Popen(
            [sys.executable, "-m", "dr_orchestrator.cli", *args], cwd=self.cwd, text=True,
            env={**os.environ, **NOBODY_ELSE, "DR_DATABASE_URL": db, "DR_ACTOR": actor, **(env or {})},
            stdout=subprocess.PIPE, stderr=subprocess.PIPE, start_new_session=True)
        self.started.append(process)
        return process

    def kill(self, process: subprocess.Popen[str]) -> None:
        """SIGKILL the process and everything it started, as a crash of its host would: its process group,
        and the commands of its steps, which run in sessions of their own (a crash of the `dr` process
        alone would orphan them; the test must not leave them running)."""
        descendants = with_descendants({process.pid}) - {process.pid}
        try:
            os.killpg(process.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        send(descendants, signal.SIGKILL)
        process.communicate(timeout=WAIT_S)

    def close(self) -> None:
        for process in self.started:
            if process.poll() is None:
                self.kill(process)


def query(db: str, sql: str, **params: Any) -> list[Any]:
    engine = create_engine(db.replace("postgresql://", "postgresql+psycopg://"))
    try:
        with engine.connect() as connection:
            return list(connection.execute(text(sql), params))
    finally:
        engine.dispose()


def recorded(db: str, run_id: str) -> tuple[dict[str, Any], Any]:
    """The run's record as `dr runs show -o json` gives it, and the audit chain's verdict."""
    from dr_orchestrator.evidence import queries
    from dr_orchestrator.evidence.chain import verify_session
    from dr_orchestrator.evidence.database import make_engine, make_session_factory

    engine = make_engine(db)
    try:
        with make_session_factory(engine)() as session:
            detail = queries.run_detail(session, run_id)
            assert detail is not None
            return detail, verify_session(session)
    finally:
        engine.dispose()
