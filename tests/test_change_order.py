"""Nothing changes before the target is known ready: `dr validate` refuses a runbook in which a step
that changes the world can start before the checks end, and every changing step of a shipped runbook
says how it is undone (or why it is not)."""

from __future__ import annotations

import textwrap
from pathlib import Path

import pytest
from click.testing import CliRunner

from dr_orchestrator.actions import default_registry
from dr_orchestrator.cli import cli
from dr_orchestrator.loading import load_runbook, step_effect

REPO = Path(__file__).resolve().parent.parent
LAB_INVENTORY = REPO / "inventories" / "lab.yml"
INVENTORY_OF = {"cloud-failover-quotation.yml": "aws-example.yml", "example-local.yml": "local.yml"}
SHIPPED = sorted(path.name for path in (REPO / "runbooks").glob("*.yml"))


def validate(tmp_path: Path, runbook: str) -> tuple[int, str]:
    path = tmp_path / "runbook.yml"
    path.write_text(textwrap.dedent(runbook))
    result = CliRunner().invoke(cli, ["validate", str(path), "-i", str(LAB_INVENTORY)])
    return result.exit_code, result.output


FENCE_IN_PARALLEL_WITH_THE_CHECK = """\
    name: failover-quotation
    kind: failover
    scope: {services: [quotation]}
    steps:
      - id: precheck
        action: postgres.replication_status
        with: {site: backup}
        needs: []
      - id: fence
        action: haproxy.set_active
        with: {backends: [quotation], site: backup}
        needs: []
"""


def test_a_change_that_can_start_before_the_checks_end_is_refused_naming_both(tmp_path: Path) -> None:
    code, output = validate(tmp_path, FENCE_IN_PARALLEL_WITH_THE_CHECK)

    assert code == 2
    assert "runbook.yml:12: steps[1].needs: step 'fence' changes the world (reversible)" in output
    assert "before the check 'precheck' ends" in output
    assert "add 'precheck' to its needs" in output and "before_checks" in output


def test_the_change_is_accepted_once_it_waits_for_the_check_or_says_why_it_may_not(tmp_path: Path) -> None:
    head, fence = FENCE_IN_PARALLEL_WITH_THE_CHECK.split("      - id: fence\n")
    waits = head + "      - id: fence\n" + fence.replace("needs: []", "needs: [precheck]")
    assert validate(tmp_path, waits)[0] == 0

    reasoned = FENCE_IN_PARALLEL_WITH_THE_CHECK + "        before_checks: the front door is ours to switch back\n"
    assert validate(tmp_path, reasoned) == (0, f"{tmp_path / 'runbook.yml'}: valid against {LAB_INVENTORY}\n")


def test_a_check_allowed_to_fail_protects_nothing_and_is_not_waited_for(tmp_path: Path) -> None:
    recording_only = FENCE_IN_PARALLEL_WITH_THE_CHECK.replace(
        "        with: {site: backup}\n", "        with: {site: backup}\n        on_failure: continue\n")
    assert validate(tmp_path, recording_only)[0] == 0


def test_a_chain_of_checks_and_changes_is_judged_by_what_each_change_waits_for(tmp_path: Path) -> None:
    code, output = validate(tmp_path, """\
        name: chain
        kind: failover
        steps:
          - {id: check-a, action: noop}
          - {id: check-b, action: noop, needs: []}
          - {id: change-1, action: haproxy.set_active, with: {backends: [trading], site: backup}, needs: [check-a]}
          - {id: verify, action: noop, needs: [change-1]}
          - {id: change-2, action: haproxy.set_active, with: {backends: [trading], site: backup},
             needs: [verify, check-b]}
    """)

    assert code == 2
    # change-1 misses check-b; change-2 waits for both (through change-1 and directly); the read-only
    # `verify` after a change is not a check the changes must wait for.
    assert output.count("changes the world") == 1
    assert "step 'change-1' changes the world (reversible) but can start before the check 'check-b' ends" in output


def test_no_rollback_needs_a_reason(tmp_path: Path) -> None:
    code, output = validate(tmp_path, """\
        name: reasons
        steps:
          - {id: promote, action: postgres.promote, with: {site: backup}, rollback: {none: ""}}
    """)

    assert code == 2
    assert "steps[0].rollback.none: must say why the step has no rollback" in output


@pytest.mark.parametrize("name", SHIPPED)
def test_every_shipped_runbook_checks_before_it_changes_and_says_how_each_change_is_undone(name: str) -> None:
    inventory = REPO / "inventories" / INVENTORY_OF.get(name, "lab.yml")
    result = CliRunner().invoke(cli, ["validate", str(REPO / "runbooks" / name), "-i", str(inventory)])
    assert result.exit_code == 0, result.output

    runbook, _ = load_runbook(str(REPO / "runbooks" / name))
    registry = default_registry()
    unexplained = [step.id for step in runbook.steps
                   if (effect := step_effect(step, registry.effect)) is not None and effect.changes
                   and step.rollback is None and not step.no_rollback]
    assert unexplained == [], f"changing steps of {name} without a rollback or a reason for none"


def test_a_cycle_in_needs_is_reported_once_and_the_rule_still_ends(tmp_path: Path) -> None:
    code, output = validate(tmp_path, """\
        name: cycle
        steps:
          - {id: a, action: noop, needs: [c]}
          - {id: b, action: haproxy.set_active, with: {backends: [trading], site: backup}, needs: [a]}
          - {id: c, action: noop, needs: [b]}
    """)

    assert code == 2
    assert "a cycle in needs" in output
