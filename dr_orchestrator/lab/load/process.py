"""Start and stop the detached load generator; its pid lives in ``<root>/load/generator.pid``."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

from dr_orchestrator.lab.config import SERVICES, LabConfig
from dr_orchestrator.lab.load.defaults import DEFAULT_RATE, DEFAULT_TIMEOUT, LoadError
from dr_orchestrator.lab.load.ledger import find_run_by_pid, ledger_path, load_dir, open_ledger

GENERATOR_MODULE = "dr_orchestrator.lab.load.generator"
START_TIMEOUT = 10.0
STOP_TIMEOUT = 10.0


def _pid_file(root: Path) -> Path:
    return load_dir(root) / "generator.pid"


def _log_file(root: Path) -> Path:
    return load_dir(root) / "generator.log"


def _is_generator(pid: int, root: Path) -> bool:
    """True when ``pid`` is alive and is our generator for this ledger (guards against a reused pid)."""
    try:
        _reap_if_child(pid)
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
        cmdline = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
    except (FileNotFoundError, ProcessLookupError, IndexError):
        return False
    return state != "Z" and GENERATOR_MODULE.encode() in cmdline and str(ledger_path(root)).encode() in cmdline


def _reap_if_child(pid: int) -> None:
    try:
        os.waitpid(pid, os.WNOHANG)
    except ChildProcessError:
        pass  # not our child: whoever started it reaps it


def running_pid(root: Path) -> int | None:
    """The pid of the generator running for this lab, or None."""
    try:
        pid = int(_pid_file(root).read_text().strip())
    except (FileNotFoundError, ValueError):
        return None
    return pid if _is_generator(pid, root) else None


def start_generator(config: LabConfig, rate: float = DEFAULT_RATE, timeout: float = DEFAULT_TIMEOUT) -> int:
    """Start the generator detached from the caller; return its pid once it has opened its ledger run."""
    if rate <= 0 or timeout <= 0:
        raise LoadError("The rate and the timeout must be positive numbers.")
    root = config.root
    if (pid := running_pid(root)) is not None:
        raise LoadError(f"The load generator is already running (pid {pid}); stop it first with `dr lab load stop`.")
    load_dir(root).mkdir(parents=True, exist_ok=True)
    # The ledger's path in the command line also lets the lab's `down` find the generator under its root.
    command = [sys.executable, "-m", GENERATOR_MODULE, "--ledger", str(ledger_path(root))]
    command += [f"--url={service}={config.frontend_url(service)}" for service in SERVICES]
    command += ["--rate", str(rate), "--timeout", str(timeout)]
    with _log_file(root).open("ab") as log:
        process = subprocess.Popen(
            command, stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT, start_new_session=True
        )
    _pid_file(root).write_text(f"{process.pid}\n")
    deadline = time.monotonic() + START_TIMEOUT
    while time.monotonic() < deadline:
        if process.poll() is not None:
            _pid_file(root).unlink(missing_ok=True)
            raise LoadError(f"The load generator exited at start (code {process.returncode}); see {_log_file(root)}.")
        with open_ledger(ledger_path(root)) as connection:
            if find_run_by_pid(connection, process.pid) is not None:
                return process.pid
        time.sleep(0.05)
    _stop_pid(process.pid, root)
    raise LoadError(f"The load generator did not start within {START_TIMEOUT:.0f} s; see {_log_file(root)}.")


def stop_generator(root: Path) -> int | None:
    """Stop the generator (SIGTERM, then SIGKILL after a grace period); return its pid, or None if none ran.

    Safe to call at any time, e.g. from the lab's teardown: the ledger is kept for ``report``.
    """
    pid = running_pid(root)
    if pid is not None:
        _stop_pid(pid, root)
    _pid_file(root).unlink(missing_ok=True)
    return pid


def _stop_pid(pid: int, root: Path) -> None:
    for signum, grace in ((signal.SIGTERM, STOP_TIMEOUT), (signal.SIGKILL, STOP_TIMEOUT)):
        try:
            os.kill(pid, signum)
        except ProcessLookupError:
            return
        deadline = time.monotonic() + grace
        while time.monotonic() < deadline:
            if not _is_generator(pid, root):
                return
            time.sleep(0.02)
    raise LoadError(f"The load generator (pid {pid}) did not stop even after SIGKILL.")
