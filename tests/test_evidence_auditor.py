"""The fifteen auditor fields of every test, in the export (JSON nested, CSV flat), packs and the DR
test record; data reconciliation checks (`dr reconcile`, the API); findings on drill runs; overdue
findings flagged; the git commit a runbook came from."""

from __future__ import annotations

import csv
import hashlib
import io
import json
import os
import subprocess
import sys
from dataclasses import fields
from datetime import date, timedelta
from pathlib import Path

import pytest
from evidence_runs import run_small, small_plan
from sqlalchemy import select
from sqlalchemy.orm import Session, sessionmaker

from dr_orchestrator.api import metrics
from dr_orchestrator.evidence import annotations, auditor, drills, migrate, queries, reports
from dr_orchestrator.evidence.database import make_engine, make_session_factory
from dr_orchestrator.evidence.models import AuditEntry
from dr_orchestrator.evidence.provenance import GIT_COMMIT_EVENT
from dr_orchestrator.evidence.store import EvidenceStore
from dr_orchestrator.model.events import RunFinished, RunStarted, utcnow
from dr_orchestrator.model.run import RunKind, RunPlan, RunState, SourceDocument

pytestmark = pytest.mark.timeout(180)
FIFTEEN = [f.name for f in fields(auditor.AuditorFields)]
DRILL_RUN = "dddd0000-0000-4000-8000-00000000000d"


def a_drill_with_its_runs(sessions: sessionmaker[Session]) -> dict[str, str]:
    """A drill whose failover run was approved by bob, failed back, reconciled, notified about and
    given two findings (one overdue); and a plain manual run beside it."""
    failover = run_small(sessions, scenario="primary site lost", trigger="schedule")
    failback = run_small(sessions, kind=RunKind.FAILBACK, failback_of=failover, trigger="manual")
    manual = run_small(sessions, kind=RunKind.SWITCHOVER, trigger="manual")
    drills.start_drill_run(sessions, drills.DrillRunStart(
        drill_run_id=DRILL_RUN, drill_name="quarterly-trading", scenario="site_loss", trigger="schedule",
        scheduled_for=None, started_by="scheduler", host="test-host", drill_path="failover_tests/q.yml",
        drill_sha256="0" * 64, drill_text="name: quarterly-trading\n", inventory_path="inventories/lab.yml"))
    drills.link_run(sessions, DRILL_RUN, "failover", failover)
    drills.link_run(sessions, DRILL_RUN, "failback", failback)
    drills.record_expectations(sessions, DRILL_RUN, [
        drills.ExpectationResult("trading", "rto", True, "restored in time", target=5.0, measured=0.1,
                                 run_id=failover)])
    drills.record_notification(sessions, DRILL_RUN, "completed", {
        "channel": "webhook", "target": "https://chat.example/…", "delivered": True, "attempts": 1,
        "at": utcnow(), "detail": "200", "tries": []})
    drills.finish_drill_run(sessions, DRILL_RUN, state="finished", verdict="passed", cleanup_state="done",
                            cleanup_left=[], error=None)
    with sessions() as session, session.begin():
        annotations.record_approval(session, failover, "approved", "bob", step_id="promote")
        annotations.add_finding(session, failover, "high", "carol", date.today() - timedelta(days=3),
                                "alerts reached nobody", "auditor")
        annotations.add_finding(session, failover, "low", "dave", date.today() + timedelta(days=90),
                                "runbook wording", "auditor")
        annotations.record_check(session, failover, "orders row count", "ok", "10482 rows at both sites", "erin")
    return {"failover": failover, "failback": failback, "manual": manual}


def test_the_export_has_the_fifteen_fields_for_every_test(sessions: sessionmaker[Session]) -> None:
    runs = a_drill_with_its_runs(sessions)
    with sessions() as session:
        rows = json.loads(auditor.export_evidence(session, fmt="json"))
        table = list(csv.DictReader(io.StringIO(auditor.export_evidence(session, fmt="csv"))))
        chain = {(e.table_name, e.record_id, e.seq): e.entry_sha256 for e in session.scalars(select(AuditEntry))}
    assert [row["run_id"] for row in rows] == [runs["failover"], runs["failback"], runs["manual"]]
    for row in rows:
        assert set(FIFTEEN) <= set(row), row["run_id"]
        assert row["started_by"] == "alice" and row["scope"]["service"] == "trading"
        assert row["scope"]["services"] == ["trading"] and row["scope"]["sites"] == ["backup"]
        assert row["plan_versions"]["runbook_sha256"] == hashlib.sha256(
            small_plan().runbook_source.text.encode()).hexdigest()
        assert row["plan_versions"]["git_commit"] is None  # the test's runbook is in no checkout
        assert row["targets"]["rto_s"] is not None and row["measured"]["rto_method"]
        assert row["timeline"][0]["event"] == "incident"
        assert row["retention"]["retain_until"] > row["run_started_at"]
        integrity = row["integrity"]
        assert integrity["anchor"] is None and integrity["entries"] > 5  # no anchor made in this test
        for entry in integrity["run_entries"]:  # each one is the chain's own entry
            assert chain[("runs", row["run_id"], entry["seq"])] == entry["entry_sha256"]
        assert integrity["first_seq"] <= integrity["run_entries"][0]["seq"] <= integrity["last_seq"]

    failover, failback, manual = rows
    assert failover["test"] == {"type": "unplanned failover rehearsal", "trigger": "schedule", "kind": "rehearsal",
                                "counts_as": "drill's failover (counts with its drill)", "drill_run_id": DRILL_RUN,
                                "drill": "quarterly-trading", "drill_stage": "failover",
                                "drill_verdict": "passed"}
    assert failover["scenario"] == "primary site lost"
    assert failover["targets"]["drill_rto_s"] == 5.0 and failover["targets"]["drill_rpo_s"] is None
    assert failover["participants"]["approvers"] == ["bob"]
    assert [(c["check"], c["result"], c["detail"], c["by"]) for c in failover["data_reconciliation"]] == [
        ("orders row count", "ok", "10482 rows at both sites", "erin")]
    assert [(f["owner"], f["open"], f["overdue"]) for f in failover["findings"]] == [
        ("carol", True, True), ("dave", True, False)]
    assert [(n["recipient"], n["delivered"], n["event"]) for n in failover["reported_to"]] == [
        ("https://chat.example/…", True, "completed")]
    assert failover["failback"] == {"of_run": None, "runs": [
        {"id": runs["failback"], "state": "succeeded", "started_at": failback["run_started_at"],
         "finished_at": failover["failback"]["runs"][0]["finished_at"]}]}
    assert failback["failback"]["of_run"] == runs["failover"] and failback["test"]["type"] == "failback"
    assert failback["test"]["drill_stage"] == "failback" and failback["test"]["counts_as"] == "failback"
    assert manual["test"]["counts_as"] == "test"  # the same rule as the quarterly report (qualifying.counts_as)
    assert manual["test"]["drill_run_id"] is None and manual["reported_to"] == [] and manual["findings"] == []
    assert manual["test"]["trigger"] == "manual" and manual["data_reconciliation"] == []

    # CSV: the same rows, the nested fields flattened into named columns, lists as JSON text
    assert [r["run_id"] for r in table] == [row["run_id"] for row in rows]
    header = set(table[0])
    for column in ("test_type", "test_trigger", "scope_service", "scenario", "plan_versions_runbook_sha256",
                   "plan_versions_inventory_sha256", "plan_versions_git_commit", "targets_rto_s",
                   "participants_approvers", "timeline", "measured_rto_s", "measured_rpo_method",
                   "data_reconciliation", "findings", "reported_to", "integrity_last_entry_sha256", "integrity_anchor",
                   "retention_retain_until", "started_by", "failback_runs"):
        assert column in header, column
    assert table[0]["test_type"] == "unplanned failover rehearsal" and table[0]["test_drill_verdict"] == "passed"
    assert json.loads(table[0]["participants_approvers"]) == ["bob"]
    assert json.loads(table[0]["findings"])[0]["overdue"] is True
    assert table[0]["integrity_last_seq"] == str(failover["integrity"]["last_seq"])
    assert table[2]["plan_versions_git_commit"] == "" and table[2]["integrity_anchor"] == ""


def test_integrity_names_the_first_anchor_covering_every_record_of_the_test(
        sessions: sessionmaker[Session], tmp_path: Path) -> None:
    from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

    from dr_orchestrator.evidence.anchors import FileSink, anchor_chain

    first = run_small(sessions)
    with sessions() as session:
        (before,) = auditor.auditor_rows(session)
    assert before["integrity"]["anchor"] is None  # nothing outside the database vouches for it yet
    key = Ed25519PrivateKey.generate()
    outcome = anchor_chain(sessions, key, [FileSink(tmp_path / "anchors.jsonl")], actor="test")
    second = run_small(sessions)
    with sessions() as session:
        rows = {row["run_id"]: row["integrity"] for row in auditor.auditor_rows(session)}
    anchor = rows[first]["anchor"]
    assert (anchor["seq"], anchor["head_sha256"]) == (outcome.anchor.seq, outcome.anchor.head_sha256)
    assert anchor["seq"] >= rows[first]["last_seq"] and anchor["sinks"] == [f"file:{tmp_path / 'anchors.jsonl'}"]
    assert rows[second]["anchor"] is None  # written after the newest anchor


def test_the_run_record_and_the_pack_carry_the_same_fields(sessions: sessionmaker[Session]) -> None:
    from dr_orchestrator.evidence import packs
    from dr_orchestrator.evidence.dr_record import dr_test_record

    runs = a_drill_with_its_runs(sessions)
    with sessions() as session:
        record = dr_test_record(session, DRILL_RUN[:8])  # a drill run's id names its failover run
        files = packs.pack_files(session, run_id=runs["failover"])
        exported = json.loads(auditor.export_evidence(session, fmt="json"))
    assert record is not None and record["run"]["id"] == runs["failover"]
    assert record["auditor_fields"] == exported[:1]
    packed = json.loads(files["records/auditor_fields.json"])
    assert [row["run_id"] for row in packed] == [runs["failover"], runs["failback"]]
    assert packed[0] == exported[0]
    assert "test_type" in files["records/auditor_fields.csv"].decode().splitlines()[0]
    # the drill's verdict and who was told are in the pack too
    assert [d["verdict"] for d in json.loads(files["records/drill_runs.json"])] == ["passed"]
    assert [n["delivered"] for n in json.loads(files["records/notifications.json"])] == [True]
    assert [e["target"] for e in json.loads(files["records/drill_expectations.json"])] == [5.0]


def test_a_runbook_in_a_checkout_records_its_commit(sessions: sessionmaker[Session], tmp_path: Path) -> None:
    checkout = tmp_path / "plans"
    checkout.mkdir()
    runbook = checkout / "failover.yml"
    runbook.write_text("name: small-failover\n")
    git = ["git", "-C", str(checkout), "-c", "user.name=t", "-c", "user.email=t@example.org"]
    for args in (["init", "-q"], ["add", "failover.yml"], ["commit", "-q", "-m", "plan"]):
        subprocess.run([*git, *args], check=True, capture_output=True, timeout=30)
    head = subprocess.run([*git, "rev-parse", "HEAD"], check=True, capture_output=True, text=True, timeout=30)

    def plan_of_the_file_now() -> RunPlan:
        return small_plan().model_copy(update={"runbook_source": SourceDocument(
            path=str(runbook), sha256=hashlib.sha256(runbook.read_bytes()).hexdigest(), text=runbook.read_text())})

    store = EvidenceStore(sessions)
    started = utcnow()
    store(RunStarted("run-in-a-checkout", started, plan_of_the_file_now(), "test-host"))
    # changed after the commit: a run of the changed file says so; the first run, which read the
    # committed text, does not, whenever git is asked
    runbook.write_text("name: small-failover\n# changed after the commit\n")
    store(RunStarted("run-with-changes", started, plan_of_the_file_now(), "test-host"))
    for run_id in ("run-in-a-checkout", "run-with-changes"):
        store(RunFinished(run_id, started + timedelta(seconds=1), RunState.SUCCEEDED, None))
    store.flush()
    with sessions() as session:
        rows = {row["run_id"]: row["plan_versions"] for row in auditor.auditor_rows(session)}
        events = queries.run_detail(session, "run-in-a-checkout")["events"]  # type: ignore[index]
    assert rows["run-in-a-checkout"]["git_commit"] == head.stdout.strip()
    assert rows["run-in-a-checkout"]["git_runbook_modified"] is False
    assert rows["run-with-changes"]["git_runbook_modified"] is True
    assert [e["kind"] for e in events] == [GIT_COMMIT_EVENT]


def test_overdue_findings_are_flagged_and_counted_in_metrics(sessions: sessionmaker[Session]) -> None:
    runs = a_drill_with_its_runs(sessions)
    with sessions() as session:
        overdue = annotations.overdue_findings(session)
        later = annotations.overdue_findings(session, today=date.today() + timedelta(days=365))
        exposition = metrics.render(session, {"drills": [], "problems": []})
        after_action = reports.after_action_html(session, runs["failover"])
        quarter = reports.render_quarter(reports.quarter_data(session, reports.quarter_of(utcnow()).label))
    assert [f["owner"] for f in overdue] == ["carol"]
    assert [f["owner"] for f in later] == ["carol", "dave"]
    assert 'dr_findings_overdue{severity="high"} 1.0' in exposition
    assert 'dr_findings_overdue{severity="low"} 0.0' in exposition
    assert "open, OVERDUE" in after_action
    assert "OVERDUE" in quarter and "1 open finding(s) past their due date" in quarter
    with sessions() as session, session.begin():
        annotations.close_finding(session, overdue[0]["id"], "fixed the alert routing", "carol")
    with sessions() as session:
        assert annotations.overdue_findings(session) == []
        assert 'dr_findings_overdue{severity="high"} 0.0' in metrics.render(session, {"drills": [], "problems": []})


def test_a_check_must_name_what_was_compared_and_a_service_in_scope(sessions: sessionmaker[Session]) -> None:
    run_id = run_small(sessions)
    with sessions() as session:
        for args, message in (
            (("", "ok", "fine"), "needs --check NAME"),
            (("rows", "maybe", "fine"), "'maybe' is not one of ok, mismatch"),
            (("rows", "ok", " "), "needs --detail TEXT"),
        ):
            with pytest.raises(annotations.AnnotationError, match=message):
                annotations.record_check(session, run_id, *args, actor="erin")
            session.rollback()
        with pytest.raises(annotations.AnnotationError, match="'quotation' is not in the scope of run"):
            annotations.record_check(session, run_id, "rows", "ok", "fine", "erin", service="quotation")
        session.rollback()
        with pytest.raises(annotations.UnknownRun, match="no run 'ffffffff'"):
            annotations.record_check(session, "ffffffff", "rows", "ok", "fine", "erin")


# -- the command line ---------------------------------------------------------------------------------


def dr(*args: str, db: str, cwd: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "dr_orchestrator.cli", *args], cwd=cwd,
                          env={**os.environ, "DR_DATABASE_URL": db, "DR_ACTOR": "erin"},
                          capture_output=True, text=True, timeout=120)


@pytest.mark.slow
def test_reconcile_findings_and_reports_take_drill_run_ids(tmp_path: Path) -> None:
    url = f"sqlite:///{tmp_path / 'evidence.db'}"
    migrate.upgrade(url)
    engine = make_engine(url)
    try:
        runs = a_drill_with_its_runs(make_session_factory(engine))
    finally:
        engine.dispose()
    drill_prefix = DRILL_RUN[:8]

    checked = dr("reconcile", drill_prefix, "--check", "ledger vs orders", "--result", "mismatch",
                 "--detail", "3 acknowledged orders missing", "--service", "trading", db=url, cwd=tmp_path)
    assert checked.returncode == 0, checked.stderr
    assert f"on run {runs['failover']}" in checked.stdout
    added = dr("findings", "add", drill_prefix, "three orders lost at failover", "--severity", "critical",
               "--owner", "frank", "--due", "2020-01-31", db=url, cwd=tmp_path)
    assert added.returncode == 0, added.stderr

    report = dr("report", "run", drill_prefix, db=url, cwd=tmp_path)
    assert report.returncode == 0, report.stderr
    integrity = report.stdout.split("Data integrity after recovery", 1)[1].split("<h2>", 1)[0]
    assert "ledger vs orders" in integrity and "3 acknowledged orders missing" in integrity
    assert "mismatch" in integrity and "erin" in integrity and "orders row count" in integrity
    assert "three orders lost at failover" in report.stdout and "drill <b>quarterly-trading</b>" in report.stdout

    listing = dr("findings", "list", db=url, cwd=tmp_path)
    lines = {line.split()[0]: line for line in listing.stdout.splitlines() if line.strip()[:1].isdigit()}
    assert "OVERDUE" in lines["3"] and "frank" in lines["3"] and "OVERDUE" not in lines["2"]
    assert "2 open finding(s) past their due date" in listing.stdout
    as_json = json.loads(dr("findings", "list", "--output", "json", db=url, cwd=tmp_path).stdout)
    assert [(f["owner"], f["overdue"]) for f in as_json] == [("carol", True), ("dave", False), ("frank", True)]

    for args, message in (
        (("reconcile", "ffffffff", "--check", "x", "--result", "ok", "--detail", "y"), "no run 'ffffffff'"),
        (("reconcile", drill_prefix, "--check", "x", "--result", "ok", "--detail", "y", "--service", "billing"),
         "'billing' is not in the scope of run"),
        (("findings", "add", "ffffffff", "t", "--severity", "low", "--owner", "o", "--due", "2030-01-01"),
         "no run 'ffffffff'"),
    ):
        refused = dr(*args, db=url, cwd=tmp_path)
        assert refused.returncode == 2 and message in refused.stderr and "Traceback" not in refused.stderr


def test_a_drill_that_started_no_run_is_named_as_such(sessions: sessionmaker[Session]) -> None:
    drills.record_missed(sessions, drill_run_id="eeee0000-0000-4000-8000-00000000000e", drill_name="q",
                         scenario="site_loss", scheduled_for=utcnow(), reason="scheduler down", host="h",
                         drill_path="q.yml", drill_sha256="0" * 64, drill_text="", inventory_path="i.yml")
    with sessions() as session:
        with pytest.raises(queries.AmbiguousRunId, match="drill run eeee0000-.* started no run"):
            queries.find_run(session, "eeee0000")


@pytest.mark.slow
def test_the_api_records_a_check_for_engineers_only(database_url: str, tmp_path: Path) -> None:
    from api_support import bearer, make_api, prepared, record_run, token

    url = prepared(database_url)
    run_id = record_run(url, "restore-trading.yml", incident_ago_s=2)
    engineer, compliance = token(url, "erin-engineer", "engineer"), token(url, "carol", "compliance")
    body = {"check": "orders row count", "result": "ok", "detail": "10482 rows at both sites"}
    with make_api(url, tmp_path) as client:
        refused = client.post(f"/api/runs/{run_id}/reconciliations", headers=bearer(compliance), json=body)
        made = client.post(f"/api/runs/{run_id[:8]}/reconciliations", headers=bearer(engineer), json=body)
        unknown = client.post("/api/runs/ffffffff/reconciliations", headers=bearer(engineer), json=body)
        bad = client.post(f"/api/runs/{run_id}/reconciliations", headers=bearer(engineer),
                          json=body | {"result": "fine"})
        posing = client.post(f"/api/runs/{run_id}/reconciliations", headers=bearer(engineer),
                             json=body | {"by": "someone-else"})
        report = client.get(f"/api/runs/{run_id}/report", headers=bearer(compliance))
    assert refused.status_code == 403 and unknown.status_code == 404
    assert bad.status_code == 422 and posing.status_code == 422
    assert made.status_code == 201, made.text
    assert (made.json()["run_id"], made.json()["by"], made.json()["result"]) == (run_id, "erin-engineer", "ok")
    integrity = report.text.split("Data integrity after recovery", 1)[1].split("<h2>", 1)[0]
    assert "orders row count" in integrity and "erin-engineer" in integrity
