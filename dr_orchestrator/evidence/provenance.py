"""Where a plan came from beyond its digests: the git commit of the checkout holding the runbook,
recorded at run start as the action event ``plan.git_commit`` (data: commit, runbook_modified)."""

from __future__ import annotations

import hashlib
import subprocess
from pathlib import Path
from typing import Any

GIT_COMMIT_EVENT = "plan.git_commit"
GIT_TIMEOUT_S = 2.0


def git_commit_of(runbook_path: str, sha256: str) -> dict[str, Any] | None:
    """The HEAD commit of the git work tree holding the file ``runbook_path`` (a drill part's
    ``#part`` is ignored) and whether the runbook the run read (its ``sha256``) differs from that
    commit's version (changed, or not committed at all): the text the run recorded, not the file as it
    is when git is asked, which may be later. None when there is no such file, it is in no work tree, or
    git does not answer within GIT_TIMEOUT_S. Never raises: the run goes on without it."""
    path = Path(runbook_path.split("#", 1)[0])
    if not path.is_file():
        return None
    where = ["git", "-C", str(path.parent)]
    try:
        head = subprocess.run([*where, "rev-parse", "HEAD"], capture_output=True, text=True, timeout=GIT_TIMEOUT_S)
        if head.returncode != 0:
            return None
        committed = subprocess.run([*where, "show", f"HEAD:./{path.name}"], capture_output=True,
                                   timeout=GIT_TIMEOUT_S)
    except (OSError, subprocess.SubprocessError):
        return None
    modified = committed.returncode != 0 or hashlib.sha256(committed.stdout).hexdigest() != sha256
    return {"commit": head.stdout.strip(), "runbook_modified": modified}
