"""The processes a lab started: found by pidfile and by a command line naming the lab's root.

Each process the lab starts is recorded by a pidfile plus a string its command line must contain, so
a reused pid is never mistaken for ours. Beyond the pidfiles, a scan of /proc finds any process
whose command line names a path under the lab's root (a crash between spawning and writing a
pidfile leaves nothing behind that `down` cannot find). Children (PostgreSQL backends, SSH sessions)
are found through their parents.
"""

from __future__ import annotations

import os
import re
import signal
import subprocess
import time
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Generic, Protocol, TypeVar

# Executables the lab runs; the root-path scan ignores everything else (an editor with a lab file open).
_LAB_EXECUTABLES = re.compile(r"^(postgres|pg_basebackup|pg_ctl|pg_rewind|sshd|haproxy|redis-server|python[0-9.]*)$")


@dataclass(frozen=True)
class ProcessSpec:
    """A process the lab runs: where its pid is written and what its command line must contain."""

    name: str  # e.g. "postgres", "sshd", "trading", "haproxy"
    site: str | None  # None for the site-independent front door
    pidfile: Path
    marker: str

    @property
    def label(self) -> str:
        return f"{self.name}@{self.site}" if self.site else self.name


class SiteMember(Protocol):
    """One member of a lab cluster: the process it runs at its site and the log it writes."""

    @property
    def process(self) -> ProcessSpec: ...

    @property
    def log_path(self) -> Path: ...


MemberT = TypeVar("MemberT", bound=SiteMember)


class SiteMembers(Generic[MemberT]):
    """A lab cluster of one member per site, each started by this process or found by its pidfile."""

    def __init__(self) -> None:
        self.members: dict[str, MemberT] = {}
        self._children: dict[str, subprocess.Popen[bytes]] = {}

    def pid(self, site: str) -> int | None:
        """The member's pid while it runs (a zombie counts as gone)."""
        if site not in self.members:
            return None
        child = self._children.get(site)
        if child is not None and child.poll() is None:
            # Our own running child (just after exec, /proc/PID/cmdline can read empty: trust the exit status)
            return child.pid
        return running_pid(self.members[site].process)  # started by another process (see from_state)

    def running(self, site: str) -> bool:
        return self.pid(site) is not None

    def _reap(self, site: str) -> None:
        child = self._children.pop(site, None)
        if child is not None:
            try:
                child.wait(timeout=5)
            except subprocess.TimeoutExpired:
                self._children[site] = child

    def _log_tail(self, site: str) -> str:
        try:
            return self.members[site].log_path.read_text(errors="replace")[-2000:]
        except (OSError, KeyError):
            return ""


def read_pid(pidfile: Path) -> int | None:
    try:
        first = pidfile.read_text().split("\n", 1)[0].strip()
    except (OSError, UnicodeDecodeError):
        return None
    return int(first) if first.isdigit() else None


def command_line(pid: int) -> str | None:
    """The process's command line joined by spaces; None when it is gone or a zombie."""
    try:
        raw = Path(f"/proc/{pid}/cmdline").read_bytes()
    except OSError:
        return None
    if not raw or _state(pid) in (None, "Z", "X"):
        return None
    return raw.rstrip(b"\0").replace(b"\0", b" ").decode(errors="replace")


def _state(pid: int) -> str | None:
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    return stat.rsplit(")", 1)[1].split()[0]


def _parent(pid: int) -> int | None:
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    return int(stat.rsplit(")", 1)[1].split()[1])


def is_running(pid: int) -> bool:
    """Whether the process exists and has not finished exiting. Not `command_line`: a process that is
    exiting reads an empty command line before it is a zombie, and the first thread of a multithreaded
    one (etcd, Go) reads as a zombie while its other threads still exit and hold its ports."""
    state = _state(pid)
    if state in (None, "X"):
        return False
    if state != "Z":
        return True
    try:
        return len(os.listdir(f"/proc/{pid}/task")) > 1
    except OSError:
        return False


def running_pid(spec: ProcessSpec) -> int | None:
    """The pid in the spec's pidfile, if that process is alive and really the one we started."""
    pid = read_pid(spec.pidfile)
    if pid is None:
        return None
    line = command_line(pid)
    return pid if line is not None and spec.marker in line else None


def _all_pids() -> list[int]:
    return [int(entry) for entry in os.listdir("/proc") if entry.isdigit()]


def _ours() -> set[int]:
    """This process and its ancestors: never targets, whatever their command line says."""
    pids: set[int] = set()
    pid: int | None = os.getpid()
    while pid and pid not in pids:
        pids.add(pid)
        pid = _parent(pid)
    return pids


def descendants(pids: Iterable[int]) -> set[int]:
    children: dict[int, list[int]] = {}
    for pid in _all_pids():
        parent = _parent(pid)
        if parent is not None:
            children.setdefault(parent, []).append(pid)
    found: set[int] = set()
    pending = list(pids)
    while pending:
        for child in children.get(pending.pop(), []):
            if child not in found:
                found.add(child)
                pending.append(child)
    return found


def processes_under(directory: Path) -> set[int]:
    """Live lab-run processes whose command line names a path inside `directory`."""
    pattern = re.compile(r"(^|[\s=:])" + re.escape(str(directory).rstrip("/") + "/"))
    excluded = _ours()
    found: set[int] = set()
    for pid in _all_pids():
        if pid in excluded:
            continue
        line = command_line(pid)
        if line is None or not pattern.search(line):
            continue
        try:
            executable = os.path.basename(os.readlink(f"/proc/{pid}/exe"))
        except OSError:
            continue  # not ours to look at (another user's process, when we are not root)
        if _LAB_EXECUTABLES.match(executable):
            found.add(pid)
    return found


def with_descendants(pids: Iterable[int]) -> set[int]:
    roots = set(pids)
    return (roots | descendants(roots)) - _ours()


def send(pids: Iterable[int], sig: signal.Signals) -> None:
    for pid in pids:
        try:
            os.kill(pid, sig)
        except ProcessLookupError:
            pass


def wait_gone(pids: Iterable[int], timeout: float) -> set[int]:
    """Wait until none of `pids` runs (zombies count as gone); returns the ones still running."""
    remaining = set(pids)
    deadline = time.monotonic() + timeout
    while True:
        remaining = {pid for pid in remaining if is_running(pid)}
        if not remaining or time.monotonic() >= deadline:
            return remaining
        time.sleep(0.02)


def kill_now(pids: Iterable[int], timeout: float = 5.0) -> set[int]:
    """SIGKILL all of `pids` at once, as a power loss would; returns any that survived `timeout`."""
    targets = set(pids)
    send(targets, signal.SIGKILL)
    return wait_gone(targets, timeout)
