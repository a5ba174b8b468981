"""What the end-to-end runbook tests share: `dr` as an engineer types it, a run's evidence, lab probes."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import httpx
import psycopg
import pytest

from dr_orchestrator.lab import Lab, LabConfig

REPO = Path(__file__).resolve().parent.parent
RUNBOOKS = REPO / "runbooks"
SERVICES = ("trading", "contract-signing", "quotation")


def dr(*args: str, db: str, cwd: Path) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "DR_DATABASE_URL": db}
    return subprocess.run([sys.executable, "-m", "dr_orchestrator.cli", *args], cwd=cwd, env=env,
                          capture_output=True, text=True, timeout=600)


def run_runbook(name: str, lab: Lab, db: str, cwd: Path, *extra: str) -> tuple[int, dict[str, Any]]:
    """`dr run` of a lab runbook as an engineer types it; returns its exit code and evidence."""
    result = dr("run", "-q", str(RUNBOOKS / name), "-i", str(lab.config.inventory_path), *extra, db=db, cwd=cwd)
    if "Traceback" in result.stderr or "refused" in result.stderr:
        raise AssertionError(f"dr run {name} exited {result.returncode}:\n{result.stderr}")
    listing = dr("runs", "list", "-o", "json", "--limit", "1", db=db, cwd=cwd)
    assert listing.returncode == 0, listing.stderr
    run_id = json.loads(listing.stdout)[0]["id"]
    shown = dr("runs", "show", run_id, "-o", "json", db=db, cwd=cwd)
    assert shown.returncode == 0, shown.stderr
    return result.returncode, json.loads(shown.stdout)


@pytest.fixture
def evidence_db(tmp_path: Path) -> str:
    url = f"sqlite:///{tmp_path / 'evidence.db'}"
    assert dr("db", "upgrade", db=url, cwd=tmp_path).returncode == 0
    return url


def failures(detail: dict[str, Any]) -> str:
    """What went wrong in a run, for assertion messages."""
    return "; ".join(f"{s['step_id']} {s['state']}: {s['error']}" for s in detail["steps"]
                     if s["state"] not in ("succeeded", "skipped")) or str(detail["run"]["error"])


def steps_by_id(detail: dict[str, Any]) -> dict[tuple[str, str], dict[str, Any]]:
    return {(s["step_id"], s["phase"]): s for s in detail["steps"]}


def wait_for_replicated_heartbeat(config: LabConfig, service: str = "trading", deadline_s: float = 30.0) -> None:
    deadline = time.monotonic() + deadline_s
    while time.monotonic() < deadline:
        try:
            with psycopg.connect(config.dsn("backup", service), connect_timeout=2) as connection:
                if connection.execute("SELECT count(*) FROM dr_heartbeat").fetchone()[0]:  # type: ignore[index]
                    return
        except psycopg.Error:
            pass
        time.sleep(0.1)
    raise AssertionError("no heartbeat reached the standby")


def front_door_site(config: LabConfig, service: str) -> str | None:
    try:
        return str(httpx.get(f"{config.frontend_url(service)}/health", timeout=2).json().get("site"))
    except (httpx.HTTPError, ValueError):
        return None
