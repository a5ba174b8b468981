"""Where a plan came from beyond its digests: the git commit of the checkout holding the runbook,
recorded at run start as the action event ``plan.git_commit`` (data: commit, runbook_modified)."""

from __future__ import annotations

import subprocess
from pathlib import Path
from typing import Any

GIT_COMMIT_EVENT = "plan.git_commit"
GIT_TIMEOUT_S = 2.0


def git_commit_of(runbook_path: str) -> dict[str, Any] | None:
    """The HEAD commit of the git work tree holding the file ``runbook_path`` (a drill part's
    ``#part`` is ignored) and whether the file differs from that commit (changed, or not committed
    at all); None when there is no such file, it is in no work tree, or git does not answer within
    GIT_TIMEOUT_S. Never raises: the run goes on without it."""
    path = Path(runbook_path.split("#", 1)[0])
    if not path.is_file():
        return None
    where = ["git", "-C", str(path.parent)]
    try:
        head = subprocess.run([*where, "rev-parse", "HEAD"], capture_output=True, text=True, timeout=GIT_TIMEOUT_S)
        if head.returncode != 0:
            return None
        status = subprocess.run([*where, "status", "--porcelain", "--", path.name], capture_output=True, text=True,
                                timeout=GIT_TIMEOUT_S)
    except (OSError, subprocess.SubprocessError):
        return None
    modified = bool(status.stdout.strip()) if status.returncode == 0 else None
    return {"commit": head.stdout.strip(), "runbook_modified": modified}
