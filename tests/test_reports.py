"""Reports from real runs: the after-action report tells what ran, who, when, the figures against
targets with their raw timestamps, what failed and was rolled back; the quarterly report gives per
service the runs, figures, capability levels, services not exercised, open findings and a chart."""

from __future__ import annotations

import csv
import io
import json
import os
import subprocess
import sys
from datetime import UTC, date, datetime
from pathlib import Path

import pytest
from evidence_runs import run_small
from markupsafe import escape
from sqlalchemy.orm import Session, sessionmaker

from dr_orchestrator.evidence import annotations, drills, migrate, qualifying, reports
from dr_orchestrator.evidence.database import make_engine, make_session_factory
from dr_orchestrator.evidence.levels import LevelsError, load_levels
from dr_orchestrator.evidence.values import derive_test_type
from dr_orchestrator.model.events import utcnow
from dr_orchestrator.model.inventory import CAPABILITY_ELEMENTS

pytestmark = pytest.mark.timeout(180)


def dr(*args: str, db: str, cwd: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "dr_orchestrator.cli", *args], cwd=cwd,
                          env={**os.environ, "DR_DATABASE_URL": db}, capture_output=True, text=True, timeout=150)


def test_after_action_report_tells_what_happened(sessions: sessionmaker[Session]) -> None:
    run_id = run_small(sessions, fail=True, scenario="<script>alert(1)</script> kill the primary")
    with sessions() as session, session.begin():
        annotations.record_approval(session, run_id, "approved", "dora.duty-manager", step_id="promote")
        annotations.record_reconciliation(session, run_id, acknowledged_writes=4321, missing_writes=0,
                                          service="trading", details={"ledger": "load.sqlite"})
        annotations.add_finding(session, run_id, "high", "bob", date(2027, 1, 31), "backup refused the change", "al")
    with sessions() as session:
        record = reports.after_action_data(session, run_id)
    html = reports.render_after_action(record)

    result = record["results"][0]
    assert record["test_type"] == "unplanned failover rehearsal"
    assert record["participants"] == {"started_by": "alice", "approvers": ["dora.duty-manager"],
                                      "orchestrator_host": "test-host"}
    assert record["cleanup"] == "rolled back (1 step(s))"
    timeline = {e["event"]: e for e in record["timeline"] if not e["service"]}
    assert timeline["switch started"]["source"] == "switch_started mark of step 'promote'"
    assert timeline["incident"]["at"] == timeline["declaration"]["at"] == record["run"]["started_at"]
    for expected in (
        run_id, "alice", "dora.duty-manager", "test-host", "unplanned failover rehearsal",
        "<script>alert(1)</script> kill the primary",  # shown escaped, never run
        record["run"]["runbook_sha256"], "breaks", "the backup refused", "rolled back with noop",
        f"{result['rto_s']:.3f} s", "60.000 s", result["restored_at"], result["incident_at"], result["rto_method"],
        "4321", "backup refused the change", "switch_started mark of step", "http://front-door/trading/health",
        "Retain until", record["run"]["retain_until"],
    ):
        assert str(escape(expected)) in html, expected
    assert "<script>" not in html
    assert "Drill expectations" not in html  # no drill data yet: no section


def test_after_action_report_of_a_drill_stage_shows_expectations_and_verdict(tmp_path: Path) -> None:
    url = f"sqlite:///{tmp_path / 'evidence.db'}"
    migrate.upgrade(url)
    engine = make_engine(url)
    try:
        sessions = make_session_factory(engine)
        run_id = run_small(sessions, scenario="site_loss")
        drills.start_drill_run(sessions, drills.DrillRunStart(
            drill_run_id="d-1", drill_name="quarterly-trading", scenario="site_loss", trigger="schedule",
            scheduled_for=None, started_by="scheduler", host="test-host", drill_path="failover_tests/q.yml",
            drill_sha256="0" * 64, drill_text="name: quarterly-trading\n", inventory_path="inventories/lab.yml"))
        drills.link_run(sessions, "d-1", "failover", run_id)
        drills.record_expectations(sessions, "d-1", [
            drills.ExpectationResult("trading", "rto", True, "restored within target", 60.0, 0.4, run_id=run_id),
            drills.ExpectationResult("trading", "data", False, "3 acknowledged writes missing", check_id="ledger")])
        drills.finish_drill_run(sessions, "d-1", state="finished", verdict="failed", cleanup_state="done",
                                cleanup_left=[], error=None)
        other_run = run_small(sessions)
        with sessions() as session:
            record = reports.after_action_data(session, run_id)
            plain = reports.after_action_data(session, other_run)
    finally:
        engine.dispose()
    assert record["drill"]["stage"] == "failover" and record["drill"]["verdict"] == "failed"
    assert plain["drill"] is None
    html = reports.render_after_action(record)
    for expected in ("Drill expectations and verdict", "quarterly-trading", "3 acknowledged writes missing",
                     "restored within target", "MISSED", "0.400 s"):
        assert expected in html, expected


def test_quarter_report_per_service_with_levels_gaps_findings_and_chart(
    sessions: sessionmaker[Session], tmp_path: Path
) -> None:
    first = run_small(sessions)  # RPO 0
    run_small(sessions, rpo_s=120.0)  # RPO 2 min: misses trading's RPO target 0, and it is the latest test
    with sessions() as session, session.begin():
        annotations.add_finding(session, first, "medium", "bob", date(2027, 1, 31), "RPO drifted", "al")
    quarter = reports.quarter_of(utcnow())
    every_element_at_6 = {name: 6 for name in CAPABILITY_ELEMENTS}
    with sessions() as session:
        data = reports.quarter_data(session, quarter.label)
        only_inventory = reports.quarter_data(
            session, quarter, inventory_services={
                "trading": {"rto_s": 60.0, "rpo_s": 0.0, "tier": "critical", "capability": every_element_at_6},
                "settlement": {"rto_s": 600.0, "rpo_s": 0.0, "tier": "critical"}})

    services = {s["service"]: s for s in data["services"]}
    assert set(services) == {"trading", "quotation", "contract-signing"}  # the inventory the runs used
    trading = services["trading"]
    assert [(r["rpo_s"], r["rpo_met"], r["targets_met"]) for r in trading["tests"]] == [
        (0.0, True, True), (120.0, False, False)]
    assert all(r["rto_met"] and r["rto_s"] < 60 for r in trading["tests"])
    assert trading["all_targets_met"] is False  # the latest test missed the RPO target
    # No capability elements declared in the runs' inventory: no level, and the report says why.
    assert trading["capability_level"] is None and "dr_plan not declared" in trading["capability_limited_by"]
    # With every element at level 6, the period's worst RPO (2 min) still holds the service at level 5.
    declared = {s["service"]: s for s in only_inventory["services"]}["trading"]
    assert (declared["capability_level"], declared["worst_rpo_s"]) == (5, 120.0)
    assert declared["capability_limited_by"] == ["worst RPO 120 s over level 6's 0 s"]
    assert [(s["service"], s["last_exercised_at"], s["no_test_within_a_year"]) for s in data["not_exercised"]] == [
        ("contract-signing", None, True), ("quotation", None, True)]
    assert [f["text"] for f in data["open_findings"]] == ["RPO drifted"]
    assert "GB/T 20988-2007" in data["levels"]["source"]
    assert [(s["service"], s["critical"]) for s in only_inventory["not_exercised"]] == [("settlement", True)]
    assert (data["started"], data["tests_executed"], data["not_executed"]) == (2, 2, [])

    html = reports.render_quarter(data)
    assert html.count('<svg xmlns="http://www.w3.org/2000/svg" class="rto-chart"') == 3
    trading_chart = reports.quarter_charts(data)["trading"]
    assert trading_chart.count('<circle class="run"') == 2 and 'class="target"' in trading_chart
    assert "<script" not in html and "GB/T 20988-2007" in html and "DORA" in html
    assert str(escape(qualifying.RULE)) in html

    rows = list(csv.DictReader(io.StringIO(reports.quarter_csv(data))))
    assert [(r["service"], r["exercised"], r["rpo_met"], r["service_all_targets_met"]) for r in rows] == [
        ("contract-signing", "false", "", ""), ("quotation", "false", "", ""), ("trading", "true", "true", "false"),
        ("trading", "true", "false", "false")]
    assert json.loads(reports.quarter_json(data))["quarter"] == quarter.label

    with sessions() as session:
        earlier = reports.quarter_data(session, "2020Q1")
    assert earlier["runs_in_period"] == 0 and earlier["services"] == []


def test_capability_levels_reached_by_figures(tmp_path: Path) -> None:
    table = load_levels()
    assert [level.level for level in table.levels] == [1, 2, 3, 4, 5, 6]
    reached = {
        (60, 0): 6, (3600, 0): 5, (3600, 1800): 5, (3600, 7200): 4, (3 * 86400, 7200): 3,
        (3 * 86400, 3 * 86400): 2, (3 * 86400, 8 * 86400): None,
    }
    for (rto, rpo), level in reached.items():
        found = table.reached(rto, rpo)
        assert (found.level if found else None) == level, (rto, rpo)
    assert table.reached(None, 0) is None and table.reached(60, None) is None  # not measured: no level

    own = tmp_path / "levels.yml"
    own.write_text("source: our bank's policy 7.2\nlevels:\n  - {level: 1, rto_max_s: 3600, rpo_max_s: null}\n")
    mine = load_levels(own)
    assert mine.source == "our bank's policy 7.2"
    assert mine.reached(60, 10**9) == mine.levels[0] and mine.reached(7200, 0) is None
    own.write_text("levels: []\n")
    with pytest.raises(LevelsError, match="needs 'source'"):
        load_levels(own)


def test_quarters_and_test_types() -> None:
    q = reports.parse_quarter("2026Q3")
    assert (q.start, q.end) == (datetime(2026, 7, 1, tzinfo=UTC), datetime(2026, 10, 1, tzinfo=UTC))
    assert reports.parse_quarter("2026q4").end == datetime(2027, 1, 1, tzinfo=UTC)
    with pytest.raises(reports.ReportError, match="is not like 2026Q3"):
        reports.parse_quarter("2026Q5")
    assert derive_test_type("failback", "manual", "") == "failback"
    assert derive_test_type("failover", "incident", "") == "real failover"
    assert derive_test_type("failover", "automatic", "") == "real failover"
    assert derive_test_type("rehearsal", "scheduled", "kill the primary") == "unplanned failover rehearsal"
    assert derive_test_type("rehearsal", "manual", "") == "planned switchover rehearsal"
    # A switchover run is a switchover in production; only what is run as a rehearsal is one.
    assert derive_test_type("switchover", "manual", "") == "planned switchover (production)"


@pytest.mark.slow
def test_cli_reports_html_csv_pdf(tmp_path: Path) -> None:
    url = f"sqlite:///{tmp_path / 'evidence.db'}"
    migrate.upgrade(url)
    engine = make_engine(url)
    try:
        run_id = run_small(make_session_factory(engine))
    finally:
        engine.dispose()
    quarter = reports.quarter_of(utcnow()).label

    as_csv = dr("report", "quarter", quarter, "--format", "csv", "--service", "trading", db=url, cwd=tmp_path)
    assert as_csv.returncode == 0, as_csv.stderr
    assert as_csv.stdout.splitlines()[1].startswith(f"{quarter},trading,critical,high,true,{run_id}")
    pdf = dr("report", "run", run_id[:8], "--format", "pdf", "--out", str(tmp_path / "r.pdf"), db=url, cwd=tmp_path)
    assert pdf.returncode == 0, pdf.stderr
    assert (tmp_path / "r.pdf").read_bytes().startswith(b"%PDF-")

    no_out = dr("report", "run", run_id, "--format", "pdf", db=url, cwd=tmp_path)
    assert no_out.returncode == 2 and "PDF output is binary: give --out FILE" in no_out.stderr
    missing = dr("report", "run", "nonexistent", db=url, cwd=tmp_path)
    assert missing.returncode == 2 and "no run 'nonexistent'" in missing.stderr
    bad_levels = dr("report", "quarter", quarter, "--levels", str(tmp_path / "none.yml"), db=url, cwd=tmp_path)
    assert bad_levels.returncode == 2 and "cannot read the levels file" in bad_levels.stderr
