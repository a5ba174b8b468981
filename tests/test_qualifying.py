"""What counts in a period, over small real runs: a drill counts once (its fault, checks and cleanup
runs never), runs that changed nothing are "not executed" with the reason, failbacks apart, a
service's standing is its latest test; drills may only be stricter than the inventory; capability
levels from the inventory's elements and the period's worst figures."""

from __future__ import annotations

import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
from evidence_runs import run_small, small_plan
from sqlalchemy.orm import Session, sessionmaker

from dr_orchestrator.actions import default_registry
from dr_orchestrator.engine import Engine
from dr_orchestrator.evidence import drills, migrate, qualifying, reports
from dr_orchestrator.evidence.database import make_engine, make_session_factory
from dr_orchestrator.evidence.levels import load_levels
from dr_orchestrator.evidence.store import EvidenceStore
from dr_orchestrator.loading import load_inventory
from dr_orchestrator.model.events import utcnow
from dr_orchestrator.model.inventory import CAPABILITY_ELEMENTS
from dr_orchestrator.model.run import RunKind
from dr_orchestrator.model.runbook import Runbook, Scope, Step
from dr_orchestrator.yamlsource import LoadError

REPO = Path(__file__).resolve().parent.parent
LAB_INVENTORY = REPO / "inventories" / "lab.yml"
pytestmark = pytest.mark.timeout(180)


def run_refused(sqlite_sessions: sessionmaker[Session]) -> str:
    """A run whose first step, a check, fails: nothing changed."""
    plan = small_plan(kind=RunKind.SWITCHOVER, trigger="manual")
    refused = Runbook(name="refused-switchover", scope=Scope(services=("trading",)),
                      steps=(Step(id="standby-ready", action="fail", with_={"message": "the standby lags 40 s"}),
                             Step(id="promote", action="test.restore", needs=("standby-ready",))))
    registry = default_registry()
    registry.register("test.restore", "evidence_runs:Restore")
    engine = Engine(registry, [EvidenceStore(sqlite_sessions)], host="test-host", cancel_grace=1.0)
    return engine.run(plan.model_copy(update={"runbook": refused})).run_id


def as_drill(sqlite_sessions: sessionmaker[Session], drill_run_id: str, stages: dict[str, str], verdict: str) -> None:
    drills.start_drill_run(sqlite_sessions, drills.DrillRunStart(
        drill_run_id=drill_run_id, drill_name="quarterly-trading", scenario="site_loss", trigger="scheduled",
        scheduled_for=None, started_by="scheduler", host="test-host", drill_path="failover_tests/q.yml",
        drill_sha256="0" * 64, drill_text="name: quarterly-trading\n", inventory_path="inventories/lab.yml"))
    for stage, run_id in stages.items():
        drills.link_run(sqlite_sessions, drill_run_id, stage, run_id)
    drills.record_expectations(sqlite_sessions, drill_run_id, [
        drills.ExpectationResult("trading", "rto", True, "within", 30.0, 0.1, run_id=stages["failover"])])
    drills.finish_drill_run(sqlite_sessions, drill_run_id, state="finished", verdict=verdict, cleanup_state="done",
                            cleanup_left=[], error=None)


def test_a_drill_counts_once_refused_runs_are_not_executed_and_failbacks_stand_apart(
        sqlite_sessions: sessionmaker[Session]) -> None:
    standalone = run_small(sqlite_sessions, rpo_s=120.0, trigger="manual")  # a test that misses trading's RPO 0 s
    fault, failover, checks, cleanup = (run_small(sqlite_sessions) for _ in range(4))
    failback = run_small(sqlite_sessions, kind=RunKind.FAILBACK, failback_of=failover)
    as_drill(sqlite_sessions, "d-1", {"fault": fault, "failover": failover, "checks": checks, "failback": failback,
                               "cleanup": cleanup}, verdict="passed")
    refused = run_refused(sqlite_sessions)

    with sqlite_sessions() as session:
        found = qualifying.period(session)
        data = reports.quarter_data(session, reports.quarter_of(utcnow()))
    assert [t.id for t in found.tests] == [standalone, "d-1"]  # the drill once; its stage runs never
    (drill,) = [t for t in found.tests if t.drill is not None]
    assert (drill.run_id, drill.test_type, drill.outcome, drill.trigger) == (
        failover, "drill: site_loss", "passed", "scheduled")
    assert [(n.id, n.state) for n in found.not_executed] == [(refused, "failed")]
    assert "the standby lags 40 s" in found.not_executed[0].reason
    assert [f.id for f in found.failbacks] == [failback]
    assert (found.started, found.engine_runs) == (3, 7)  # a test run, a drill (5 runs), a refused run

    trading = {s["service"]: s for s in data["services"]}["trading"]
    assert [t["id"] for t in trading["tests"]] == [standalone, "d-1"]
    assert trading["all_targets_met"]  # the latest test (the drill) met both; the earlier one did not
    assert [t["targets_met"] for t in trading["tests"]] == [False, True]
    assert trading["tests"][1]["drill_expectations"] == {"rto": 30.0}  # beside the inventory's 60 s target
    assert trading["tests"][1]["rto_target_s"] == 60.0
    assert [f["id"] for f in trading["failbacks"]] == [failback]
    assert [(n["id"], n["what"]) for n in data["not_executed"]] == [(refused, "run")]
    assert (data["started"], data["tests_executed"], data["not_executed_count"]) == (3, 2, 1)
    html = reports.render_quarter(data)
    assert "not executed (failed)" in html and "the standby lags 40 s" in html
    assert "MISSED" in html  # the earlier test's RPO, shown as it was

    standing = qualifying.standings(found)["trading"]
    assert standing.all_targets_met and standing.tests == 2 and standing.latest is drill


def test_a_drill_whose_runs_changed_nothing_is_not_executed(sqlite_sessions: sessionmaker[Session]) -> None:
    refused = run_refused(sqlite_sessions)
    as_drill(sqlite_sessions, "d-2", {"failover": refused}, verdict="failed")
    with sqlite_sessions() as session:
        found = qualifying.period(session)
    assert found.tests == [] and [(n.id, n.what) for n in found.not_executed] == [("d-2", "drill")]


def test_capability_level_needs_every_element_and_the_periods_worst_figures() -> None:
    table = load_levels()
    every_six = {name: 6 for name in CAPABILITY_ELEMENTS}
    assert table.assess(every_six, [(30.0, 0.0), (40.0, 0.0)]).level.level == 6  # type: ignore[union-attr]
    one_worse = table.assess(every_six, [(30.0, 0.0), (40.0, 0.5)])  # one test lost half a second
    assert one_worse.level.level == 5 and one_worse.limited_by == ("worst RPO 0.5 s over level 6's 0 s",)  # type: ignore[union-attr]
    # A test that did not measure the RPO shows nothing about it: the others' worst counts, and it is said.
    partly = table.assess(every_six, [(30.0, 0.0), (30.0, None)])
    assert partly.level.level == 6 and partly.notes == (  # type: ignore[union-attr]
        "RPO not measured in 1 of 2 tests: the worst of the others counts",)
    never = table.assess(every_six, [(30.0, None)])  # every level bounds the RPO
    assert never.level is None and never.limited_by == ("RPO not measured",)
    assert table.assess(every_six, []).level is None
    lab, _ = load_inventory(str(LAB_INVENTORY))
    on_the_lab = table.assess(lab.capability_of("trading"), [(5.0, 0.0)])
    assert on_the_lab.level.level == 1  # type: ignore[union-attr]
    assert "backup_network meets level 1" in on_the_lab.limited_by
    assert "backup_infrastructure meets level 1" in on_the_lab.limited_by


@pytest.mark.slow
def test_capability_elements_load_with_overrides_and_line_precise_errors(tmp_path: Path) -> None:
    lab_text = LAB_INVENTORY.read_text()
    lab_elements = lab_text[lab_text.index("      capability:\n"):lab_text.index("  children:")]
    path = tmp_path / "inventory.yml"
    path.write_text(lab_text.replace("          tier: critical\n",
                                     "          tier: critical\n          capability: {backup_network: 6}\n", 1))
    inventory, _ = load_inventory(str(path))
    assert inventory.capability_of("trading")["backup_network"] == 6  # the service's own
    assert inventory.capability_of("quotation")["backup_network"] == 1  # the inventory's
    assert "dr_plan: 5" in lab_elements

    lines = lab_text.splitlines()
    at = lines.index("        backup_network: 1") + 1
    path.write_text(lab_text.replace("        backup_network: 1\n", "        backup_network: 7\n")
                    .replace("        dr_plan: 5\n", "        dr_plan: 5\n        backup_tape: 3\n"))
    with pytest.raises(LoadError) as caught:
        load_inventory(str(path))
    found = {(p.line, p.field): p.message for p in caught.value.problems}
    assert "less than or equal to 6" in found[(at, "all.vars.dr.capability.backup_network")]
    assert found[(at + 5, "all.vars.dr.capability.backup_tape")] == "is not a known field"
    check = subprocess.run([sys.executable, "-m", "dr_orchestrator.cli", "validate", str(REPO / "runbooks" /
                            "site-switchover.yml"), "-i", str(path)], capture_output=True, text=True, timeout=60)
    assert check.returncode == 2 and "capability.backup_network" in check.stdout + check.stderr
    assert "Traceback" not in check.stderr


def test_a_drill_may_expect_better_than_the_inventory_never_worse(tmp_path: Path) -> None:
    from dr_orchestrator.drills.load import load_drill

    shipped = (REPO / "failover_tests" / "monthly-switchover.yml").read_text()
    looser = shipped.replace("    rto: 60s\n    rpo: 0s\n", "    rto: 90s\n    rpo: 5s\n", 1)
    assert looser != shipped
    path = tmp_path / "looser.yml"
    path.write_text(looser.replace("../inventories/lab.yml", str(LAB_INVENTORY))
                    .replace("../runbooks/", str(REPO / "runbooks") + "/"))
    with pytest.raises(LoadError) as caught:
        load_drill(path)
    found = {p.field: p.message for p in caught.value.problems}
    assert found["expectations.trading.rto"] == (
        "expects RTO 90 s, looser than the target of 60 s that inventory 'lab' sets for 'trading'")
    assert "RPO 5 s, looser than the target of 0 s" in found["expectations.trading.rpo"]
    # The shipped cyber drill judges its restore point; trading's RPO target stays the inventory's 0 s.
    cyber = load_drill(REPO / "failover_tests" / "cyber-attack-trading.yml")
    (trading,) = cyber.expectations
    assert (trading.rto, trading.rpo, trading.restore_point) == (60.0, None, 5.0)


def test_a_scheduled_drill_is_labelled_a_drill_with_trigger_scheduled(tmp_path: Path) -> None:
    """The scheduler's job runs the drill: its runs and the report say "scheduled" and "drill: SCENARIO"."""
    import threading

    from dr_orchestrator.evidence.models import DrillRun, Run
    from dr_orchestrator.scheduling import jobs

    path = tmp_path / "labelled.yml"
    path.write_text(textwrap.dedent(f"""\
        name: labelled
        scenario: service_failure
        inventory: {REPO / 'tests' / 'data' / 'api' / 'inventories' / 'two-services.yml'}
        runbook: {REPO / 'tests' / 'data' / 'drills' / 'quick-failover.yml'}
        expectations:
          quotation: {{rto: 30s}}
        """))
    url = f"sqlite:///{tmp_path / 'labels.db'}"
    migrate.upgrade(url)
    engine = make_engine(url)
    try:
        made = make_session_factory(engine)
        jobs.configure(jobs.JobContext(made, threading.Event(), "test-host", misfire_grace=60))
        try:
            jobs.run_scheduled_drill(str(path), "labelled", "* * * * *", "UTC")
        finally:
            jobs.configure(None)
        with made() as session:
            (record,) = session.query(DrillRun).all()
            failover = session.get_one(Run, record.failover_run_id)
            found = qualifying.period(session)
    finally:
        engine.dispose()
    assert (record.trigger, record.verdict) == ("scheduled", "passed")
    assert (failover.test_type, failover.trigger) == ("drill: service_failure", "scheduled")
    assert [(t.test_type, t.trigger) for t in found.tests] == [("drill: service_failure", "scheduled")]
