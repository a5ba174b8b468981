"""The machine's side: distribution packages the lab needs, and running commands as the lab's OS user."""

from __future__ import annotations

import os
import pwd
import shutil
import subprocess
from collections.abc import Sequence
from pathlib import Path

from dr_orchestrator.lab.config import PG_BIN, SERVICE_PYTHON

# Debian package -> a file whose presence says it is installed (cheaper and surer than dpkg-query).
REQUIRED_PACKAGES: dict[str, str] = {
    "openssh-server": "/usr/sbin/sshd",
    "haproxy": "/usr/sbin/haproxy",
    "postgresql": str(PG_BIN / "postgres"),
    "python3-psycopg2": "/usr/lib/python3/dist-packages/psycopg2/__init__.py",
    "redis-server": "/usr/bin/redis-server",
    "python3-redis": "/usr/lib/python3/dist-packages/redis/__init__.py",
}


class LabSetupError(RuntimeError):
    """The machine lacks something the lab needs (one sentence, says what to do)."""


def missing_packages() -> list[str]:
    return [package for package, path in REQUIRED_PACKAGES.items() if not os.path.exists(path)]


def ensure_packages(install: bool = True) -> list[str]:
    """Install the lab's missing Debian packages when root (apt-get), else name them; returns what was installed."""
    missing = missing_packages()
    if not missing:
        return []
    command = "apt-get install -y " + " ".join(missing)
    if not install or os.geteuid() != 0 or shutil.which("apt-get") is None:
        raise LabSetupError(f"the lab needs these Debian packages: install them with `sudo {command}`")
    env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
    result = subprocess.run(command.split(), env=env, capture_output=True, text=True)
    if result.returncode != 0:  # a stale package list is the usual cause
        subprocess.run(["apt-get", "update"], env=env, capture_output=True)
        result = subprocess.run(command.split(), env=env, capture_output=True, text=True)
    still_missing = missing_packages()
    if still_missing:
        raise LabSetupError(
            f"`{command}` did not install {', '.join(still_missing)}: {result.stderr.strip()[-300:]}"
        )
    if not os.path.exists(SERVICE_PYTHON):
        raise LabSetupError(f"the lab's services need {SERVICE_PYTHON}: install it with `sudo apt-get install python3`")
    return missing


def as_user(user: str, command: Sequence[str]) -> list[str]:
    """`command` run as `user`: through runuser when we are root and someone else is wanted."""
    if os.geteuid() == 0 and user != "root":
        return ["runuser", "-u", user, "--", *command]
    return list(command)


def run(command: Sequence[str], timeout: float = 60, check: bool = True, env: dict[str, str] | None = None,
        ) -> subprocess.CompletedProcess[str]:
    """Run a command; on failure raise with its output's tail, which says why."""
    result = subprocess.run(
        list(command), capture_output=True, text=True, timeout=timeout, stdin=subprocess.DEVNULL,
        env={**os.environ, **(env or {})},
    )
    if check and result.returncode != 0:
        output = (result.stderr.strip() or result.stdout.strip())[-800:]
        raise LabSetupError(f"`{' '.join(command)}` failed (exit {result.returncode}): {output}")
    return result


def chown(path: Path, user: str, recursive: bool = False) -> None:
    """Hand `path` to `user` (only when root; otherwise everything already belongs to us)."""
    if os.geteuid() != 0:
        return
    entry = pwd.getpwnam(user)
    paths = [path]
    if recursive:
        paths += list(path.rglob("*"))
    for item in paths:
        os.chown(item, entry.pw_uid, entry.pw_gid, follow_symlinks=False)


def check_reachable(path: Path, user: str) -> None:
    """Every directory above `path` must let `user` through, or PostgreSQL will not start there."""
    if os.geteuid() != 0 or user == "root":
        return
    entry = pwd.getpwnam(user)
    for directory in [path, *path.parents]:
        if not directory.exists():
            continue
        info = directory.stat()
        if info.st_uid == entry.pw_uid:
            can_pass = bool(info.st_mode & 0o100)
        elif info.st_gid == entry.pw_gid:
            can_pass = bool(info.st_mode & 0o010)
        else:
            can_pass = bool(info.st_mode & 0o001)
        if not can_pass:
            raise LabSetupError(
                f"the {user} user cannot enter {directory}: choose a lab directory under /tmp "
                f"(--root or DR_LAB_DIR) or `chmod o+x {directory}`"
            )
