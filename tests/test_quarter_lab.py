"""The quarterly report after a quarter's real work on the lab: the four shipped drills, one run
rejected at its approval gate and one aborted there (both before any change). Every service met its
targets (its latest test did), the two runs are "not executed", and the count is what was started."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import textwrap
import time
from collections.abc import Callable
from contextlib import AbstractContextManager
from pathlib import Path

import pytest
from sqlalchemy import select

from dr_orchestrator.evidence import migrate, reports
from dr_orchestrator.evidence.database import session_factory_for
from dr_orchestrator.evidence.models import Run
from dr_orchestrator.evidence.pdf import PdfError, find_browser
from dr_orchestrator.lab.lab import Lab
from dr_orchestrator.model.events import utcnow

REPO = Path(__file__).resolve().parent.parent
# The cyber drill first: its point-in-time restore misses trading's RPO target of 0 s (the drill
# judges its restore point), and the site-wide drills after it are trading's latest tests.
DRILLS = ("cyber-attack-trading", "quotation-service-failure", "quarterly-site-failover", "monthly-switchover")
GATED = """\
name: gated-quotation-switch
kind: switchover
scope:
  services: [quotation]
steps:
  - id: go-ahead
    action: approval
    with: {message: move quotation to the backup site?, timeout: "{timeout}", on_timeout: reject}
    timeout: 10m
  - id: switch
    action: haproxy.set_active
    with: {backends: [quotation], site: backup}
    needs: [go-ahead]
    timeout: 10s
    rollback:
      action: haproxy.set_active
      with: {backends: [quotation], site: primary}
"""


def dr_command(*args: str) -> list[str]:
    return [sys.executable, "-m", "dr_orchestrator.cli", *args]


def environment(db: str) -> dict[str, str]:
    """`dr` on PATH: the drills' faults are `dr lab ...`."""
    return {**os.environ, "DR_DATABASE_URL": db, "PATH": f"{Path(sys.executable).parent}:{os.environ['PATH']}"}


def dr(*args: str, db: str, cwd: Path, timeout: float = 600) -> subprocess.CompletedProcess[str]:
    return subprocess.run(dr_command(*args), cwd=cwd, capture_output=True, text=True, timeout=timeout,
                          env=environment(db))


def missed(drill_output: str) -> str:
    """The drill's missed expectations and error, for a failure message that fits on a screen."""
    try:
        outcome = json.loads(drill_output)
    except ValueError:
        return drill_output
    misses = [e for e in outcome.get("expectations", []) if not e.get("met")]
    return json.dumps({"error": outcome.get("error"), "missed": misses}, indent=1)


def wait_for_gate(db: str, runbook_name: str, deadline_s: float = 60) -> str:
    sessions = session_factory_for(db)
    deadline = time.monotonic() + deadline_s
    while time.monotonic() < deadline:
        with sessions() as session:
            waiting = session.scalars(select(Run.id).where(Run.runbook_name == runbook_name,
                                                           Run.state == "waiting_approval")).first()
        if waiting:
            return waiting
        time.sleep(0.1)
    raise AssertionError(f"no run of {runbook_name} waited at its gate within {deadline_s}s")


@pytest.mark.lab
@pytest.mark.slow
@pytest.mark.timeout(1500)
def test_the_quarterly_report_counts_drills_once_and_runs_that_changed_nothing_as_not_executed(
        lab_factory: Callable[..., AbstractContextManager[Lab]], tmp_path: Path) -> None:
    db = f"sqlite:///{tmp_path / 'evidence.db'}"
    migrate.upgrade(db)
    with lab_factory() as lab:
        inventory = str(lab.config.inventory_path)
        drill_runs = {}
        for name in DRILLS:
            result = dr("drill", "run", str(REPO / "failover_tests" / f"{name}.yml"), "--inventory", inventory,
                        "-o", "json", db=db, cwd=tmp_path)
            assert result.returncode == 0, f"{name}: {missed(result.stdout)}{result.stderr}"
            outcome = json.loads(result.stdout)
            assert outcome["verdict"] == "passed", outcome
            drill_runs[name] = outcome["drill_run_id"]

        rejected_book = tmp_path / "gated-rejected.yml"
        rejected_book.write_text(GATED.replace("{timeout}", "1s").replace("gated-quotation-switch",
                                                                          "gated-rejected"))
        rejected = dr("run", str(rejected_book), "-i", inventory, "--reason", "no go", db=db, cwd=tmp_path)
        assert rejected.returncode == 1, rejected.stdout + rejected.stderr

        aborted_book = tmp_path / "gated-aborted.yml"
        aborted_book.write_text(GATED.replace("{timeout}", "5m").replace("gated-quotation-switch", "gated-aborted"))
        waiting = subprocess.Popen(dr_command("run", str(aborted_book), "-i", inventory), cwd=tmp_path,
                                   env=environment(db), stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                   start_new_session=True)
        try:
            aborted_id = wait_for_gate(db, "gated-aborted")
            waiting.send_signal(signal.SIGINT)  # Ctrl-C while it waits: aborted before any change
            waiting.communicate(timeout=60)
        finally:
            if waiting.poll() is None:
                os.killpg(waiting.pid, signal.SIGKILL)
                waiting.wait()
        assert lab.status()["healthy"]

    quarter = reports.quarter_of(utcnow()).label
    # The services and their capability elements as the runs recorded them (the lab is gone).
    as_json = dr("report", "quarter", quarter, "--format", "json", db=db, cwd=tmp_path)
    assert as_json.returncode == 0, as_json.stderr
    data = json.loads(as_json.stdout)
    keep = os.environ.get("DR_QUARTER_LAB_REPORT")  # for a person to read
    if keep:
        Path(keep).write_text(as_json.stdout)
    services = {s["service"]: s for s in data["services"]}
    assert set(services) == {"trading", "contract-signing", "quotation"}
    for name, entry in services.items():
        assert entry["all_targets_met"], (name, entry["tests"])
        assert all(t["drill"] for t in entry["tests"]), name  # the drills only, each once
        # One machine: no backup network or infrastructure of its own, whatever the figures.
        assert entry["capability_level"] == 1, entry
        assert "backup_network meets level 1" in entry["capability_limited_by"]
    assert [t["name"] for t in services["trading"]["tests"]] == [
        "cyber-attack-trading", "quarterly-site-failover", "monthly-switchover"]
    cyber = services["trading"]["tests"][0]
    assert cyber["rpo_met"] is False and cyber["rpo_target_s"] == 0  # the inventory's target judges the service
    assert cyber["drill_expectations"] == {"rto": 60.0, "restore_point": 5.0}
    assert sorted(t["id"] for t in services["quotation"]["tests"]) == sorted(
        drill_runs[n] for n in ("quotation-service-failure", "quarterly-site-failover", "monthly-switchover"))
    assert all(s["failbacks"] for s in services.values())
    not_executed = {n["name"]: n for n in data["not_executed"]}
    assert set(not_executed) == {"gated-rejected", "gated-aborted"}
    assert "rejected" in not_executed["gated-rejected"]["reason"]
    assert (not_executed["gated-aborted"]["id"], not_executed["gated-aborted"]["state"]) == (aborted_id, "aborted")
    assert (data["started"], data["tests_executed"], data["not_executed_count"]) == (6, 4, 2)

    html = dr("report", "quarter", quarter, db=db, cwd=tmp_path)
    assert html.returncode == 0, html.stderr
    assert "Started: 6 (4 test(s) executed, 2 not executed" in html.stdout
    assert html.stdout.count("not executed (") == 2 and "What counts." in html.stdout
    try:
        find_browser()
    except PdfError:
        return  # PDF needs Chromium
    pdf = dr("report", "quarter", quarter, "--format", "pdf", "--out", str(tmp_path / "q.pdf"), db=db, cwd=tmp_path)
    assert pdf.returncode == 0, pdf.stderr
    assert (tmp_path / "q.pdf").read_bytes().startswith(b"%PDF-")


def test_the_gated_runbook_is_valid_for_the_lab(tmp_path: Path) -> None:
    """The runbook the lab test above relies on checks out (fast, without the lab)."""
    book = tmp_path / "gated.yml"
    book.write_text(textwrap.dedent(GATED.replace("{timeout}", "1s")))
    checked = subprocess.run(dr_command("validate", str(book), "-i", str(REPO / "inventories" / "lab.yml")),
                             capture_output=True, text=True, timeout=60)
    assert checked.returncode == 0, checked.stdout + checked.stderr
