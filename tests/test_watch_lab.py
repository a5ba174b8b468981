"""`dr watch run` against the lab: a killed site fails over with no other command, and the incident
records its lifecycle. The figures (detection, RTO against an outside prober) are printed here and
measured in benchmarks, not asserted as timings."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from contextlib import AbstractContextManager
from pathlib import Path
from typing import Any

import httpx
import pytest
from support.waiting import wait_for

from dr_orchestrator.lab import Lab

pytestmark = [pytest.mark.lab, pytest.mark.slow]
SERVICES = ("trading", "contract-signing", "quotation")


def dr(*args: str, db: str, cwd: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "dr_orchestrator.cli", *args], cwd=cwd, capture_output=True,
                          text=True, timeout=120, env={**os.environ, "DR_DATABASE_URL": db})


def site_of(lab: Lab, service: str) -> str | None:
    try:
        response = httpx.get(f"{lab.config.frontend_url(service)}/health", timeout=1)
    except httpx.HTTPError:
        return None
    return str(response.json().get("site")) if response.status_code == 200 else None


def test_the_watch_fails_a_killed_site_over_by_itself_and_records_the_incident(
        lab_factory: Callable[..., AbstractContextManager[Lab]], tmp_path: Path) -> None:
    db = f"sqlite:///{tmp_path / 'evidence.db'}"
    assert dr("db", "upgrade", db=db, cwd=tmp_path).returncode == 0
    with lab_factory() as lab:
        log = (tmp_path / "watch.log").open("w")
        watcher = subprocess.Popen(
            [sys.executable, "-m", "dr_orchestrator.cli", "watch", "run", "-i", str(lab.config.inventory_path)],
            cwd=tmp_path, env={**os.environ, "DR_DATABASE_URL": db}, stdout=log, stderr=subprocess.STDOUT,
            start_new_session=True)
        try:
            wait_for(lambda: "first round" in (tmp_path / "watch.log").read_text(), 30, "the watch's first round")
            assert {site_of(lab, s) for s in SERVICES} == {"primary"}
            lab.kill_site("primary")
            killed = time.monotonic()
            try:
                wait_for(lambda: all(site_of(lab, s) == "backup" for s in SERVICES), 60,
                         "every service to answer from the backup site")
            except AssertionError as late:
                raise AssertionError(f"{late}; the watch said:\n{(tmp_path / 'watch.log').read_text()[-6000:]}"
                                     f"\nthe services answer from {[site_of(lab, s) for s in SERVICES]}") from None
            print(f"all services answered from the backup site {time.monotonic() - killed:.2f} s after the kill")
        finally:
            watcher.send_signal(signal.SIGTERM)
            try:
                watcher.wait(timeout=120)
            except subprocess.TimeoutExpired:
                os.killpg(watcher.pid, signal.SIGKILL)
                watcher.wait()
            log.close()
        output = (tmp_path / "watch.log").read_text()
        assert watcher.returncode == 0, output
    listed = dr("incidents", "list", "-o", "json", db=db, cwd=tmp_path)
    assert listed.returncode == 0, listed.stderr
    (incident,) = [i for i in json.loads(listed.stdout) if i.get("source") == "watch"]
    shown = dr("incidents", "show", incident["id"], "-o", "json", db=db, cwd=tmp_path)
    assert shown.returncode == 0, shown.stderr
    detail: dict[str, Any] = json.loads(shown.stdout)
    kinds = [event["kind"] for event in detail["events"]]
    assert kinds[:3] == ["detected", "decided", "executing"], kinds
    assert "restored" in kinds, (kinds, output)
    timeline = detail["timeline"]
    assert timeline["impact_start"] <= timeline["detected"] <= timeline["decided"] <= timeline["restored"]
    assert lab.killed_at is not None
    print(f"impact start {timeline['impact_start']} (kill at {lab.killed_at.isoformat()}), "
          f"detection {timeline['detection_s']:.3f} s, decision {timeline['decision_s']:.3f} s, "
          f"execution {timeline['execution_s']:.3f} s, RTO {timeline['rto_s']:.3f} s")
    (run,) = detail["runs"]
    assert run["runbook_name"] == "site-failover" and run["state"] == "succeeded" and run["trigger"] == "automatic"
