"""/metrics through prometheus_client: the families and values of a seeded evidence database (read
back with prometheus_client's own parser), failbacks kept apart from the services' RTO/RPO, a registry
per app, the scheduler's leader lock and the audit chain as gauges; and the shipped alerting rules
(deploy/prometheus/dr-rules.yml) checked and unit-tested by promtool, on metric names /metrics exports."""

from __future__ import annotations

import re
import shutil
import subprocess
from datetime import UTC, date, timedelta
from pathlib import Path
from typing import Any

import pytest
import yaml
from api_support import token
from evidence_runs import run_small
from fastapi.testclient import TestClient
from prometheus_client.parser import text_string_to_metric_families
from sqlalchemy import select
from sqlalchemy.orm import Session, sessionmaker
from support.evidence import tamper

from dr_orchestrator.api.app import ApiSettings, create_app
from dr_orchestrator.api.metrics import ChainCheck
from dr_orchestrator.evidence import annotations
from dr_orchestrator.evidence.incidents import open_or_update_incident
from dr_orchestrator.evidence.models import ServiceResult
from dr_orchestrator.model.events import utcnow
from dr_orchestrator.model.run import RunKind
from dr_orchestrator.scheduling.leader import leader_lock
from dr_orchestrator.watch.warnings import UNTESTED_AFTER, EarlyWarning, record_changes

REPO = Path(__file__).resolve().parents[1]
RULES = REPO / "deploy" / "prometheus" / "dr-rules.yml"
RULES_TEST = REPO / "deploy" / "prometheus" / "dr-rules.test.yml"
Samples = dict[tuple[str, tuple[tuple[str, str], ...]], float]


def scrape(client: TestClient, secret: str) -> tuple[dict[str, str], Samples]:
    """Family name -> type, and (sample name, labels) -> value, as Prometheus' client parses them."""
    answer = client.get("/metrics", headers={"Authorization": f"Bearer {secret}"})
    assert answer.status_code == 200, answer.text
    assert answer.headers["content-type"].startswith("text/plain; version=0.0.4")
    types: dict[str, str] = {}
    samples: Samples = {}
    for family in text_string_to_metric_families(answer.text):
        types[family.name] = family.type
        for sample in family.samples:
            key = (sample.name, tuple(sorted(sample.labels.items())))
            assert key not in samples, f"duplicate series {key}"
            samples[key] = sample.value
    return types, samples


def value(samples: Samples, name: str, **labels: str) -> float:
    return samples[(name, tuple(sorted(labels.items())))]


def result_of(sessions: sessionmaker[Session], run_id: str) -> ServiceResult:
    with sessions() as session:
        return session.scalars(select(ServiceResult).where(ServiceResult.run_id == run_id)).one()


def test_metrics_parse_with_the_expected_families_and_values_of_the_evidence(
        sessions: sessionmaker[Session], database_url: str, tmp_path: Path) -> None:
    (tmp_path / "broken.yml").write_text("name: [unclosed\n")  # a drill file that does not load
    rehearsal = run_small(sessions, rpo_s=0.0)  # trading: RTO target 60 s, RPO target 0 s: met
    failback = run_small(sessions, kind=RunKind.FAILBACK, failback_of=rehearsal, trigger="manual", rpo_s=3.0)
    with sessions() as session, session.begin():
        annotations.add_finding(session, rehearsal, "high", "carol", date.today() - timedelta(days=3),
                                "alerts reached nobody", "auditor")
        record_changes(session, "dr watch", [EarlyWarning(
            "rpo-at-risk", "service:trading", "critical", "its standby backup is 9.0 s behind (target 0 s)",
            utcnow(), {"lag_s": 9.0, "rpo_s": 0.0})], [])
        open_or_update_incident(session, target_kind="service", target_name="trading", impact_start=utcnow(),
                                detected_at=utcnow(), source="watch", level="P1", title="trading down", actor="watch")
    secret = token(database_url, "prometheus", "compliance")
    # Two apps in one process: each has its own registry (a shared one would refuse the second collector).
    with TestClient(create_app(ApiSettings(database_url=database_url, drills_dir=str(tmp_path)))) as client, \
            TestClient(create_app(ApiSettings(database_url=database_url, drills_dir=str(tmp_path)))) as other:
        types, samples = scrape(client, secret)
        assert scrape(other, secret)[1].keys() == samples.keys()

        expected = {
            "dr_orchestrator_build_info": "gauge",  # an info metric: the text format 0.0.4 has no info type
            "dr_service_rto_seconds": "gauge", "dr_service_rpo_seconds": "gauge",
            "dr_service_rto_target_seconds": "gauge", "dr_service_rpo_target_seconds": "gauge",
            "dr_service_rto_measured_timestamp_seconds": "gauge", "dr_service_rpo_measured_timestamp_seconds": "gauge",
            "dr_service_failback_rto_seconds": "gauge", "dr_service_failback_rpo_seconds": "gauge",
            "dr_service_last_test_timestamp_seconds": "gauge", "dr_service_last_test_targets_met": "gauge",
            "dr_service_required_test_interval_seconds": "gauge",
            "dr_service_targets_met": "gauge", "dr_service_tests": "gauge",
            "dr_drill_last_verdict": "gauge", "dr_drill_last_run_timestamp_seconds": "gauge",
            "dr_drill_next_fire_timestamp_seconds": "gauge", "dr_drill_files_invalid": "gauge",
            "dr_scheduler_leader": "gauge", "dr_runs": "gauge", "dr_pending_approvals": "gauge",
            "dr_findings_overdue": "gauge", "dr_incidents_open": "gauge", "dr_watch_warning": "gauge",
            "dr_evidence_chain_valid": "gauge", "dr_evidence_chain_problems": "gauge",
            "dr_evidence_chain_entries": "gauge", "dr_evidence_chain_verified_timestamp_seconds": "gauge",
        }
        assert types == expected

        tested, failed_back = result_of(sessions, rehearsal), result_of(sessions, failback)
        assert tested.rpo_s == 0.0 and failed_back.rpo_s == 3.0 and failed_back.rto_s is not None
        # The failback came last, yet the service's figures are its test's: a failback is not a failover's RTO.
        assert value(samples, "dr_service_rto_seconds", service="trading") == pytest.approx(tested.rto_s)
        assert value(samples, "dr_service_rpo_seconds", service="trading") == 0.0
        assert value(samples, "dr_service_failback_rto_seconds", service="trading") == pytest.approx(failed_back.rto_s)
        assert value(samples, "dr_service_failback_rpo_seconds", service="trading") == 3.0
        assert value(samples, "dr_service_rto_target_seconds", service="trading") == 60
        assert value(samples, "dr_service_rpo_target_seconds", service="quotation") == 60
        assert ("dr_service_rto_seconds", (("service", "quotation"),)) not in samples  # never exercised
        incident_at = tested.incident_at if tested.incident_at.tzinfo else tested.incident_at.replace(tzinfo=UTC)
        assert value(samples, "dr_service_rto_measured_timestamp_seconds",
                     service="trading") == pytest.approx(incident_at.timestamp())
        assert value(samples, "dr_service_last_test_targets_met", service="trading") == 1
        assert ("dr_service_last_test_targets_met", (("service", "quotation"),)) not in samples
        assert abs(value(samples, "dr_service_last_test_timestamp_seconds", service="trading")
                   - utcnow().timestamp()) < 60
        assert value(samples, "dr_service_required_test_interval_seconds",
                     service="quotation") == UNTESTED_AFTER.total_seconds()
        assert value(samples, "dr_service_tests", service="trading") == 1  # the failback is no test
        assert value(samples, "dr_service_targets_met", service="trading") == 1
        assert value(samples, "dr_runs", state="succeeded") == 2
        assert value(samples, "dr_drill_files_invalid") == 1
        assert value(samples, "dr_pending_approvals") == 0
        assert value(samples, "dr_findings_overdue", severity="high") == 1
        assert value(samples, "dr_findings_overdue", severity="low") == 0
        assert value(samples, "dr_incidents_open", level="P1") == 1
        assert value(samples, "dr_watch_warning", kind="rpo-at-risk", target="service:trading",
                     severity="critical") == 1
        assert value(samples, "dr_scheduler_leader") == 0  # no scheduler runs
        assert value(samples, "dr_evidence_chain_valid") == 1 and value(samples, "dr_evidence_chain_problems") == 0
        assert value(samples, "dr_evidence_chain_entries") > 10
        assert value(samples, "dr_orchestrator_build_info", version=__import__("dr_orchestrator").__version__) == 1

        # A later test that misses its RPO target becomes the service's latest; the failback's figures stay apart.
        switchover = run_small(sessions, kind=RunKind.SWITCHOVER, trigger="manual", rpo_s=2.0)
        assert result_of(sessions, switchover).rpo_met is False
        lock = leader_lock(database_url)
        assert lock.try_acquire()
        try:
            _, samples = scrape(client, secret)
            assert value(samples, "dr_scheduler_leader") == 1
        finally:
            lock.release()
        assert value(samples, "dr_service_rpo_seconds", service="trading") == 2.0
        assert value(samples, "dr_service_failback_rpo_seconds", service="trading") == 3.0
        assert value(samples, "dr_service_last_test_targets_met", service="trading") == 0
        assert value(samples, "dr_service_tests", service="trading") == 2
        assert value(scrape(client, secret)[1], "dr_scheduler_leader") == 0  # released

        answer = client.get("/metrics", headers={"Authorization": f"Bearer {secret}",
                                                 "Accept": "application/openmetrics-text; version=1.0.0"})
        assert answer.headers["content-type"].startswith("application/openmetrics-text")
        assert answer.text.endswith("# EOF\n")


def test_a_tampered_chain_shows_at_the_next_walk(sessions: sessionmaker[Session], database_url: str) -> None:
    from dr_orchestrator.api.metrics import render

    run_id = run_small(sessions)
    now = [0.0]
    check = ChainCheck(every_s=60.0, clock=lambda: now[0])
    with sessions() as session:
        assert check.of(session).ok
    tamper(database_url, "UPDATE runs SET reason = 'rewritten' WHERE id = :id", id=run_id)
    with sessions() as session:
        assert check.of(session).ok  # walked 0 s ago: the last walk's result
        now[0] = 60.0
        state = check.of(session)
        assert not state.ok and state.problems == 1
        exposition = render(session, {"drills": [], "problems": []})
    assert "dr_evidence_chain_valid 0.0" in exposition.splitlines()


# --- the shipped alerting rules -------------------------------------------------------------------------


def metric_names_in(expression: str) -> set[str]:
    return set(re.findall(r"\bdr_[a-z_]+\b", expression))


def test_every_rule_refers_to_metrics_that_metrics_exports(sessions: sessionmaker[Session], database_url: str,
                                                          tmp_path: Path) -> None:
    from dr_orchestrator.api.metrics import render

    run_small(sessions)
    with sessions() as session:
        exposition = render(session, {"drills": [], "problems": []})
    exported = {sample.name for family in text_string_to_metric_families(exposition) for sample in family.samples}
    exported |= {line.split()[2] for line in exposition.splitlines() if line.startswith("# TYPE")}  # empty families
    rules: list[dict[str, Any]] = [rule for group in yaml.safe_load(RULES.read_text())["groups"]
                                   for rule in group["rules"]]
    wanted = {"DRServiceTestOverdue", "DRServiceLastTestMissedTargets", "DRReplicationLagAboveRPO",
              "DREvidenceChainBroken", "DRNoSchedulerLeader", "DRFindingsOverdue"}
    assert wanted <= {rule["alert"] for rule in rules}
    for rule in rules:
        names = metric_names_in(rule["expr"])
        assert names, rule["alert"]
        assert names <= exported, f"{rule['alert']} uses {sorted(names - exported)}, which /metrics does not export"


PROMTOOL = shutil.which("promtool")
needs_promtool = pytest.mark.skipif(
    PROMTOOL is None, reason="promtool is not installed (Debian package prometheus, in scripts/debian-packages.txt)")


@needs_promtool
def test_the_rules_pass_promtool_check_rules() -> None:
    assert PROMTOOL is not None
    checked = subprocess.run([PROMTOOL, "check", "rules", str(RULES)], capture_output=True, text=True, timeout=60)
    assert checked.returncode == 0, checked.stdout + checked.stderr
    assert "SUCCESS: 6 rules found" in checked.stdout + checked.stderr


@needs_promtool
def test_the_rules_unit_tests_fire_alerts_on_given_series() -> None:
    assert PROMTOOL is not None
    tested = subprocess.run([PROMTOOL, "test", "rules", str(RULES_TEST)], capture_output=True, text=True,
                            timeout=60, cwd=RULES_TEST.parent)
    assert tested.returncode == 0, tested.stdout + tested.stderr
    cases = yaml.safe_load(RULES_TEST.read_text())["tests"]
    fired = {test["alertname"] for case in cases for test in case["alert_rule_test"] if test.get("exp_alerts")}
    assert len(fired) >= 2, fired


@needs_promtool
def test_promtool_rules_tests_fail_when_an_alert_does_not_fire(tmp_path: Path) -> None:
    """The unit test file can fail: expecting an alert on a healthy series makes promtool say so."""
    assert PROMTOOL is not None
    broken = yaml.safe_load(RULES_TEST.read_text())
    broken["rule_files"] = [str(RULES)]
    broken["tests"] = [{"interval": "1m", "input_series": [
        {"series": 'dr_evidence_chain_valid{job="dr",instance="a"}', "values": "1x30"}],
        "alert_rule_test": [{"eval_time": "20m", "alertname": "DREvidenceChainBroken",
                             "exp_alerts": [{"exp_labels": {"severity": "critical", "job": "dr", "instance": "a"}}]}]}]
    path = tmp_path / "broken.test.yml"
    path.write_text(yaml.safe_dump(broken))
    tested = subprocess.run([PROMTOOL, "test", "rules", str(path)], capture_output=True, text=True, timeout=60)
    assert tested.returncode != 0 and "DREvidenceChainBroken" in tested.stdout + tested.stderr
