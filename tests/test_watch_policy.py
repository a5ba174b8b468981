"""Classification and policy (`dr.watch`): the inventory's section read with every mistake named by
line, `decide` with each of its rules, the audited automation switch, and the lab's own settings."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest
from click.testing import CliRunner
from sqlalchemy.orm import Session, sessionmaker

from dr_orchestrator.cli import cli
from dr_orchestrator.lab import inventory as lab_inventory
from dr_orchestrator.lab.config import LabConfig
from dr_orchestrator.loading import load_inventory, load_runbook, watch_runbook_problems
from dr_orchestrator.model.inventory import Inventory
from dr_orchestrator.watch.automation import automation_state, switch_automation
from dr_orchestrator.watch.observations import Target
from dr_orchestrator.watch.policy import AutomationState, Decision, decide, settings_of
from dr_orchestrator.yamlsource import LoadError

REPO = Path(__file__).resolve().parent.parent
NOW = datetime(2026, 12, 7, 4, 0, tzinfo=UTC)
SITE = Target("site", "primary")
TRADING, SIGNING, QUOTATION = Target("service", "trading"), Target("service", "contract-signing"), \
    Target("service", "quotation")

INVENTORY = """\
all:
  vars:
    dr:
      name: test
      sites: {primary: {}, backup: {}}
      services:
        trading: {rto: 60s, rpo: 0s, tier: critical, sites: [primary, backup]}
        contract-signing: {rto: 5m, rpo: 5s, tier: important, sites: [primary, backup]}
        quotation: {rto: 30s, rpo: 60s, tier: standard, sites: [primary, backup]}
"""

WATCH = """\
      watch:
        levels:
          particularly-serious: {scope: site}
          serious: {tiers: [critical], data_integrity: true}
          major: {tiers: [critical, important]}
          general: {}
        policies:
          default: {particularly-serious: auto, serious: approve, major: approve, general: notify}
          services:
            quotation: {major: auto, general: auto}
          sites:
            backup: {particularly-serious: notify}
        runbooks:
          site: {path: runbooks/site.yml, parameters: {from_site: "{site}"}}
          services:
            trading: {path: runbooks/trading.yml, parameters: {from_site: "{site}", note: "{service} at {site}"}}
            quotation: {path: runbooks/quotation.yml}
        anti_flapping: 30m
        maintenance:
          - {services: [contract-signing], start: "2026-12-24T00:00:00Z", end: "2026-12-26T00:00:00Z", reason: upgrade}
          - {sites: [backup], start: "2026-12-27T00:00:00Z", end: "2026-12-28T00:00:00Z", reason: power work}
        silences:
          - {target: "service:quotation", until: "2026-12-01T00:00:00Z", reason: known flapping}
"""

SITE_RUNBOOK = "name: site\nparameters:\n  from_site: {type: site}\n  to_site: {type: site}\nsteps: []\n"
TRADING_RUNBOOK = "name: trading\nparameters:\n  from_site: {type: site}\n  note: {default: x}\nsteps: []\n"
QUOTATION_RUNBOOK = "name: quotation\nparameters:\n  to_site: {type: site}\nsteps: []\n"


def write_inventory(tmp_path: Path, watch: str = WATCH, runbooks: bool = True) -> Path:
    path = tmp_path / "inventory.yml"
    path.write_text(INVENTORY + watch)
    if runbooks:
        (tmp_path / "runbooks").mkdir(exist_ok=True)
        (tmp_path / "runbooks" / "site.yml").write_text(SITE_RUNBOOK)
        (tmp_path / "runbooks" / "trading.yml").write_text(TRADING_RUNBOOK)
        (tmp_path / "runbooks" / "quotation.yml").write_text(QUOTATION_RUNBOOK)
    return path


def problems_of(path: Path) -> list[str]:
    with pytest.raises(LoadError) as error:
        load_inventory(str(path))
    return [str(problem) for problem in error.value.problems]


@pytest.fixture
def inventory(tmp_path: Path) -> Inventory:
    loaded, _ = load_inventory(str(write_inventory(tmp_path)))
    return loaded


def judge(inventory: Inventory, target: Target, tmp_path: Path, **options: object) -> Decision:
    options.setdefault("now", NOW)
    return decide(settings_of(inventory), inventory, target, inventory_dir=tmp_path, **options)  # type: ignore[arg-type]


# ---------------------------------------------------------------- reading dr.watch


def test_every_mistake_in_dr_watch_is_reported_at_its_line_in_one_pass(tmp_path: Path) -> None:
    path = write_inventory(tmp_path, """\
      watch:
        interval: 10x
        levels:
          serious: {tiers: [critcal], services: [tradng]}
          general: {}
        policies:
          default: {serious: autp, seriuos: auto}
          services:
            quotaton: {general: auto}
          sites:
            primary: {genral: notify}
        runbooks:
          site: {path: runbooks/site.yml, parameters: {from_site: "{sitte}"}}
          services:
            nosuch: {path: x.yml}
        approval: {approvers: 0}
        maintenance:
          - {services: [trading], start: "2026-12-24T00:00:00", end: "2026-12-26T00:00:00Z", reason: x}
          - {sites: [backup], start: "2026-12-26T00:00:00Z", end: "2026-12-24T00:00:00Z", reason: x}
          - {start: "2026-12-24T00:00:00Z", end: "2026-12-26T00:00:00Z", reason: x}
        silences:
          - {target: "service:quote", until: "2026-12-24T00:00:00Z", reason: x}
          - {target: "trading", until: "2026-12-24T00:00:00Z", reason: x}
        surprise: 1
""")
    shown = problems_of(path)
    expected = [
        ("inventory.yml:11: all.vars.dr.watch.interval: '10x' is not a duration"),
        ("inventory.yml:13: all.vars.dr.watch.levels.serious.tiers[0]: tier 'critcal' is not in the tiers of "
         "dr.services (did you mean 'critical'?)"),
        "inventory.yml:13: all.vars.dr.watch.levels.serious.services[0]: service 'tradng' is not in dr.services "
        "(did you mean 'trading'?)",
        "inventory.yml:16: all.vars.dr.watch.policies.default.serious: 'autp' is not one of auto, approve, notify "
        "(did you mean 'auto'?)",
        "inventory.yml:16: all.vars.dr.watch.policies.default.seriuos: level 'seriuos' is not in dr.watch.levels "
        "(did you mean 'serious'?)",
        "inventory.yml:18: all.vars.dr.watch.policies.services.quotaton: service 'quotaton' is not in dr.services "
        "(did you mean 'quotation'?)",
        "inventory.yml:20: all.vars.dr.watch.policies.sites.primary.genral: level 'genral' is not in "
        "dr.watch.levels (did you mean 'general'?)",
        "inventory.yml:22: all.vars.dr.watch.runbooks.site.parameters.from_site: {sitte} is not a placeholder here "
        "(use {site})",
        "inventory.yml:24: all.vars.dr.watch.runbooks.services.nosuch: service 'nosuch' is not in dr.services",
        "inventory.yml:25: all.vars.dr.watch.approval.approvers: Input should be greater than or equal to 1",
        "inventory.yml:27: all.vars.dr.watch.maintenance[0].start: 2026-12-24T00:00:00 has no time zone; "
        "add Z (UTC) or +08:00",
        "inventory.yml:28: all.vars.dr.watch.maintenance[1]: ends (2026-12-24T00:00:00+00:00) before it starts",
        "inventory.yml:29: all.vars.dr.watch.maintenance[2]: a maintenance window names its services or sites",
        "inventory.yml:31: all.vars.dr.watch.silences[0].target: service 'quote' is not in dr.services",
        "inventory.yml:32: all.vars.dr.watch.silences[1].target: 'trading' is not service:NAME or site:NAME",
        "inventory.yml:33: all.vars.dr.watch.surprise: is not a known field",
    ]
    for text in expected:
        assert any(text in problem for problem in shown), f"{text!r} not in:\n" + "\n".join(shown)
    assert len(shown) == len(expected), "\n".join(shown)


def test_levels_are_one_to_four(tmp_path: Path) -> None:
    five = "".join(f"          level{n}: {{}}\n" for n in range(5))
    [problem] = problems_of(write_inventory(tmp_path, f"      watch:\n        levels:\n{five}"))
    assert problem.endswith("inventory.yml:12: all.vars.dr.watch.levels: has 5 levels; an emergency plan has 1 to 4, "
                            "most severe first (e.g. particularly-serious, serious, major, general)")
    [problem] = problems_of(write_inventory(tmp_path, "      watch:\n        levels: {}\n"))
    assert "inventory.yml:11: all.vars.dr.watch.levels: has 0 levels; an emergency plan has 1 to 4" in problem


def test_dr_validate_lists_every_watch_problem_and_exits_2(tmp_path: Path) -> None:
    path = write_inventory(tmp_path, WATCH.replace("serious: approve", "serious: aprove")
                           .replace("quotation: {major", "quotaton: {major"))
    runbook = REPO / "tests" / "data" / "verify-quotation.yml"
    result = CliRunner().invoke(cli, ["validate", str(runbook), "-i", str(path), "-p", "health_url=http://x/"])
    assert result.exit_code == 2, result.output
    assert "policies.default.serious: 'aprove' is not one of auto, approve, notify (did you mean 'approve'?)" \
        in result.output
    assert "policies.services.quotaton: service 'quotaton' is not in dr.services" in result.output
    assert "2 problem(s) found." in result.output
    assert "Traceback" not in result.output


def test_mapped_runbooks_must_exist_beside_the_inventory_before_the_watch_starts(tmp_path: Path) -> None:
    path = write_inventory(tmp_path, runbooks=False)
    inventory, document = load_inventory(str(path))  # a copy without its runbooks is still an inventory
    shown = [str(problem) for problem in watch_runbook_problems(inventory, document)]
    assert shown == [
        f"{path}:23: all.vars.dr.watch.runbooks.site.path: runbooks/site.yml does not exist "
        f"(as {tmp_path}/runbooks/site.yml) (paths are relative to the inventory file)",
        f"{path}:25: all.vars.dr.watch.runbooks.services.trading.path: runbooks/trading.yml does not exist "
        f"(as {tmp_path}/runbooks/trading.yml) (paths are relative to the inventory file)",
        f"{path}:26: all.vars.dr.watch.runbooks.services.quotation.path: runbooks/quotation.yml does not exist "
        f"(as {tmp_path}/runbooks/quotation.yml) (paths are relative to the inventory file)",
    ]
    write_inventory(tmp_path)
    assert watch_runbook_problems(inventory, document) == []


# ---------------------------------------------------------------- decide: the level


def test_without_dr_watch_every_incident_only_notifies(tmp_path: Path) -> None:
    bare, _ = load_inventory(str(write_inventory(tmp_path, watch="")))
    for target in (SITE, TRADING, QUOTATION):
        decision = judge(bare, target, tmp_path)
        assert decision.policy == "notify", decision
        assert decision.runbook is None
    assert judge(bare, SITE, tmp_path).level == "particularly-serious"


def test_the_first_level_whose_conditions_match_wins(inventory: Inventory, tmp_path: Path) -> None:
    assert [(judge(inventory, target, tmp_path).level) for target in (SITE, TRADING, SIGNING, QUOTATION)] == \
        ["particularly-serious", "serious", "major", "general"]
    assert judge(inventory, TRADING, tmp_path).reasons[0] == "level serious: service trading is of tier critical"
    assert judge(inventory, SITE, tmp_path).reasons[0] == \
        "level particularly-serious: site primary is down (scope site)"
    # data integrity in doubt: declared, by label, or by a cyber-attack scenario
    for options in ({"data_integrity": True}, {"labels": {"data_integrity": "true"}},
                    {"labels": {"scenario": "cyber_attack"}}):
        decision = judge(inventory, QUOTATION, tmp_path, **options)
        assert decision.level == "serious", options
        assert decision.reasons[0].startswith("level serious: data integrity is in doubt")
    assert judge(inventory, QUOTATION, tmp_path, labels={"data_integrity": "false"}).level == "general"


def test_level_order_decides_and_a_site_counts_the_tiers_it_serves(tmp_path: Path) -> None:
    reordered = WATCH.replace("          particularly-serious: {scope: site}\n", "") \
        .replace("          general: {}\n", "          general: {}\n          particularly-serious: {scope: site}\n")
    inventory, _ = load_inventory(str(write_inventory(tmp_path, reordered)))
    assert judge(inventory, SITE, tmp_path).level == "serious"  # a site serving trading, before scope: site
    catch_all_first = WATCH.replace("        levels:\n", "        levels:\n          general: {}\n", 1) \
        .replace("          general: {}\n        policies", "        policies")
    inventory, _ = load_inventory(str(write_inventory(tmp_path, catch_all_first)))
    assert {judge(inventory, target, tmp_path).level for target in (SITE, TRADING, QUOTATION)} == {"general"}
    no_catch_all = WATCH.replace("          general: {}\n", "").replace(", general: notify}", "}") \
        .replace("{major: auto, general: auto}", "{major: auto}")
    inventory, _ = load_inventory(str(write_inventory(tmp_path, no_catch_all)))
    decision = judge(inventory, QUOTATION, tmp_path)
    assert (decision.level, decision.policy) == ("major", "auto")
    assert decision.reasons[0] == "level major: no level's conditions match, so the last applies"


# ---------------------------------------------------------------- decide: the policy


def test_a_service_or_site_override_beats_the_default(inventory: Inventory, tmp_path: Path) -> None:
    quotation = judge(inventory, QUOTATION, tmp_path)
    assert (quotation.policy, quotation.reasons[1]) == (
        "auto", "policy auto: service quotation's own for level general")
    trading = judge(inventory, TRADING, tmp_path)
    assert (trading.policy, trading.reasons[1]) == ("approve", "policy approve: the default for level serious")
    backup = judge(inventory, Target("site", "backup"), tmp_path)
    assert (backup.policy, backup.reasons[1]) == ("notify", "policy notify: site backup's own for level "
                                                  "particularly-serious")
    assert judge(inventory, SITE, tmp_path).policy == "auto"


def test_a_level_without_a_policy_notifies(tmp_path: Path) -> None:
    one_level = """\
      watch:
        levels: {general: {}}
        runbooks: {services: {trading: {path: runbooks/trading.yml}}}
"""
    inventory, _ = load_inventory(str(write_inventory(tmp_path, one_level)))
    decision = judge(inventory, TRADING, tmp_path)
    assert (decision.level, decision.policy, decision.reasons) == (
        "general", "notify", ("level general: it has no condition (every incident no level above takes)",
                              "policy notify: no policy is set for level general"))


# ---------------------------------------------------------------- decide: what lowers the policy


def test_automation_switched_off_notifies_naming_who_switched_it(inventory: Inventory, tmp_path: Path,
                                                                 sqlite_sessions: sessionmaker[Session]) -> None:
    with sqlite_sessions() as session, session.begin():
        assert automation_state(session, default=True) == AutomationState(on=True)
        assert automation_state(session, default=False).on is False
        switch_automation(session, False, "alice (os alice)", "failover exercise with the regulator")
    with sqlite_sessions() as session:
        state = automation_state(session, default=True)
    assert (state.on, state.by, state.reason) == (False, "alice (os alice)", "failover exercise with the regulator")
    for target in (SITE, QUOTATION, TRADING):  # auto and approve alike
        decision = judge(inventory, target, tmp_path, automation=state)
        assert decision.policy == "notify", decision
        assert decision.reasons[-1].startswith("nothing runs by itself: automation was switched off by alice "
                                               "(os alice) at 20")
        assert decision.reasons[-1].endswith(": failover exercise with the regulator")
        assert decision.runbook is not None  # what would have run, for the notification
    with sqlite_sessions() as session, session.begin():
        switch_automation(session, True, "bob", "exercise over")
    with sqlite_sessions() as session:
        state = automation_state(session, default=False)
    assert (state.on, state.by) == (True, "bob")
    assert judge(inventory, SITE, tmp_path, automation=state).policy == "auto"


def test_the_inventorys_automation_default_applies_until_someone_switches(tmp_path: Path) -> None:
    inventory, _ = load_inventory(str(write_inventory(tmp_path, WATCH + "        automation: false\n")))
    decision = judge(inventory, SITE, tmp_path)
    assert decision.policy == "notify"
    assert decision.reasons[-1] == "nothing runs by itself: automation is off (the inventory's dr.watch.automation)"
    assert judge(inventory, SITE, tmp_path, automation=AutomationState(on=True, by="carol", at=NOW,
                                                                       reason="go")).policy == "auto"


def test_a_maintenance_window_notifies_only_while_it_lasts(inventory: Inventory, tmp_path: Path) -> None:
    during = datetime(2026, 12, 25, tzinfo=UTC)
    quotation = judge(inventory, QUOTATION, tmp_path, now=datetime(2026, 12, 27, 12, tzinfo=UTC),
                      labels={"site": "backup"})  # quotation failed at the backup site, itself in maintenance
    assert quotation.policy == "notify"
    assert quotation.reasons[-1] == ("nothing runs by itself in the maintenance window 2026-12-27T00:00:00+00:00 to "
                                     "2026-12-28T00:00:00+00:00: power work")
    assert judge(inventory, QUOTATION, tmp_path, now=datetime(2026, 12, 27, 12, tzinfo=UTC)).policy == "auto"
    signing = WATCH.replace("contract-signing], start", "quotation], start")
    inventory, _ = load_inventory(str(write_inventory(tmp_path, signing)))
    assert judge(inventory, QUOTATION, tmp_path, now=during).policy == "notify"
    assert judge(inventory, QUOTATION, tmp_path, now=datetime(2026, 12, 26, tzinfo=UTC)).policy == "auto"  # ended
    assert judge(inventory, QUOTATION, tmp_path, now=datetime(2026, 12, 23, tzinfo=UTC)).policy == "auto"
    assert judge(inventory, TRADING, tmp_path, now=during).policy == "approve"  # not in the window


def test_a_silenced_target_notifies_nobody_and_runs_nothing_until_the_silence_ends(inventory: Inventory,
                                                                                   tmp_path: Path) -> None:
    before = datetime(2026, 11, 30, tzinfo=UTC)
    decision = judge(inventory, QUOTATION, tmp_path, now=before)
    assert decision.policy == "none"
    assert decision.reasons[-1] == "service quotation is silenced until 2026-12-01T00:00:00+00:00: known flapping"
    assert judge(inventory, TRADING, tmp_path, now=before).policy == "approve"
    assert judge(inventory, QUOTATION, tmp_path, now=datetime(2026, 12, 1, tzinfo=UTC)).policy == "auto"


def test_never_a_second_automatic_run_within_anti_flapping(inventory: Inventory, tmp_path: Path) -> None:
    recent = NOW - timedelta(minutes=29)
    decision = judge(inventory, SITE, tmp_path, last_automatic_run=recent)
    assert decision.policy == "approve"
    assert decision.reasons[-1] == (f"an automatic run for site primary started at {recent.isoformat()}, within "
                                    "anti_flapping (30.0m): a second one needs approval")
    assert decision.runbook == str(tmp_path / "runbooks" / "site.yml")
    assert judge(inventory, SITE, tmp_path, last_automatic_run=NOW - timedelta(minutes=30)).policy == "auto"
    assert judge(inventory, TRADING, tmp_path, last_automatic_run=recent).policy == "approve"  # approve stays


def test_approve_or_auto_without_a_runbook_to_run_notifies(tmp_path: Path) -> None:
    inventory, _ = load_inventory(str(write_inventory(tmp_path, WATCH.replace(
        "          site: {path: runbooks/site.yml, parameters: {from_site: \"{site}\"}}\n", ""))))
    decision = judge(inventory, SITE, tmp_path)
    assert (decision.policy, decision.runbook) == ("notify", None)
    assert decision.reasons[-1] == "no runbook to run: dr.watch.runbooks.site is not set"
    (tmp_path / "runbooks" / "trading.yml").unlink()
    decision = judge(inventory, TRADING, tmp_path)
    assert (decision.policy, decision.runbook) == ("notify", None)
    assert decision.reasons[-1] == f"no runbook to run: {tmp_path}/runbooks/trading.yml: No such file or directory"


# ---------------------------------------------------------------- decide: runbook and parameters


def test_parameters_name_the_failed_site_and_the_other_one_when_the_runbook_takes_it(inventory: Inventory,
                                                                                   tmp_path: Path) -> None:
    site = judge(inventory, Target("site", "backup"), tmp_path, labels={})
    assert (site.runbook, site.parameters) == (str(tmp_path / "runbooks" / "site.yml"),
                                               {"from_site": "backup", "to_site": "primary"})
    trading = judge(inventory, TRADING, tmp_path, labels={"site": "backup"})
    assert trading.parameters == {"from_site": "backup", "note": "trading at backup"}  # no to_site parameter
    assert judge(inventory, TRADING, tmp_path).parameters["from_site"] == "primary"  # default: its primary site
    quotation = judge(inventory, QUOTATION, tmp_path)
    assert quotation.parameters == {"to_site": "backup"}
    explicit = WATCH.replace("quotation: {path: runbooks/quotation.yml}",
                             "quotation: {path: runbooks/quotation.yml, parameters: {to_site: primary}}")
    inventory, _ = load_inventory(str(write_inventory(tmp_path, explicit)))
    assert judge(inventory, QUOTATION, tmp_path).parameters == {"to_site": "primary"}  # the inventory's word wins


# ---------------------------------------------------------------- the automation switch on the command line


@pytest.mark.slow
def test_dr_watch_automation_switches_with_a_reason_and_shows_who(tmp_path: Path,
                                                                 sqlite_sessions: sessionmaker[Session]) -> None:
    env = {**os.environ, "DR_DATABASE_URL": f"sqlite:///{tmp_path / 'evidence.db'}", "DR_ACTOR": "alice"}

    def dr(*args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run([sys.executable, "-m", "dr_orchestrator.cli", "watch", "automation", *args], env=env,
                              cwd=tmp_path, capture_output=True, text=True, timeout=60)

    never = dr()
    assert (never.returncode, never.stdout.strip()) == (
        0, "automation has never been switched: each inventory's dr.watch.automation applies")
    refused = dr("off")
    assert refused.returncode == 2
    assert refused.stderr.strip() == 'Error: say why with --reason: `dr watch automation off --reason "..."` ' \
        "(it is audited)"
    switched = dr("off", "--reason", "regulator's exercise")
    assert switched.returncode == 0, switched.stderr
    assert switched.stdout.startswith("automation was switched off by alice (os ")
    shown = json.loads(dr("-o", "json").stdout)
    assert (shown["on"], shown["reason"]) == (False, "regulator's exercise")
    assert shown["by"].startswith("alice (os ")
    with sqlite_sessions() as session:
        assert automation_state(session, default=True).on is False


# ---------------------------------------------------------------- the lab


def test_the_lab_fails_a_lost_site_or_service_over_at_once_but_waits_for_approval_on_a_cyber_attack() -> None:
    path = REPO / "inventories" / "lab.yml"
    inventory, document = load_inventory(str(path))
    assert watch_runbook_problems(inventory, document) == []
    settings = settings_of(inventory)
    assert (settings.interval, settings.confirm, settings.quorum) == (0.1, 0.5, 2)

    def lab(target: Target, **options: object) -> Decision:
        return decide(settings, inventory, target, now=NOW, inventory_dir=path.parent, **options)  # type: ignore[arg-type]

    site = lab(SITE)
    assert (site.policy, site.runbook, site.parameters) == (
        "auto", str(REPO / "runbooks" / "site-failover.yml"), {"from_site": "primary", "to_site": "backup"})
    for target in (TRADING, SIGNING, QUOTATION):
        decision = lab(target)
        assert (decision.policy, decision.runbook, decision.parameters) == (
            "auto", str(REPO / "runbooks" / f"failover-{target.name}.yml"),
            {"from_site": "primary", "to_site": "backup"}), decision
        assert lab(target, labels={"data_integrity": "true"}).policy == "approve"
    for mapping in (settings.runbooks.site, *settings.runbooks.services.values()):  # parameters the runbooks take
        assert mapping is not None
        runbook, _ = load_runbook(str(path.parent / mapping.path))
        assert set(mapping.parameters) <= set(runbook.parameters), mapping.path


def test_a_running_labs_inventory_names_the_runbooks_by_absolute_path() -> None:
    text = lab_inventory.render(LabConfig(root=Path("/tmp/elsewhere")), runbooks=str(lab_inventory.RUNBOOKS))
    for name in ("site-failover", "failover-trading", "failover-contract-signing", "failover-quotation"):
        assert f"path: {REPO / 'runbooks' / name}.yml\n" in text
