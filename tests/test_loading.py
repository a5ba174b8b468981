"""Loading: YAML to model with every problem named by file, line and field, and what `dr validate` reports."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
from pathlib import Path
from typing import Annotated, get_args

import pytest
from pydantic import AliasChoices, Field, TypeAdapter

from dr_orchestrator.actions import default_registry
from dr_orchestrator.actions.base import Action, ActionRegistry, Params
from dr_orchestrator.loading import check_files, check_runbook, load_inventory, load_runbook, validate
from dr_orchestrator.model.durations import parse_duration
from dr_orchestrator.model.runbook import OnFailure
from dr_orchestrator.yamlsource import LoadError, Problem

REPO = Path(__file__).resolve().parent.parent

INVENTORY = """\
all:
  vars:
    dr_known_hosts: /etc/ssh/known
    dr:
      name: test
      sites:
        primary: {description: main, region: a}
        backup: {}
      services:
        trading: {rto: 60s, rpo: 0s, tier: critical, sites: [primary, backup]}
      vars:
        front_door: 127.0.0.1:8080
  children:
    primary:
      vars: {ansible_user: postgres}
      hosts:
        primary-app:
          ansible_host: 127.0.10.1
          ansible_port: 2222
          dr_roles: [app, db]
          pg_port: 5432
    backup:
      hosts:
        backup-app: {ansible_host: 127.0.20.1}
    monitoring:  # not a site: Ansible's business
      hosts:
        grafana: {}
"""


class RemoteParams(Params):
    host: str = Field(json_schema_extra={"refers_to": "host"})
    command: str


class Remote(Action[RemoteParams]):
    name = "remote"
    Params = RemoteParams


class PauseParams(Params):
    duration: float = Field(validation_alias=AliasChoices("duration", "seconds"))


class Pause(Action[PauseParams]):
    name = "pause"
    Params = PauseParams


class NoteParams(Params):
    message: str = ""


class Note(Action[NoteParams]):
    name = "note"
    Params = NoteParams


def registry() -> ActionRegistry:
    made = ActionRegistry({})
    for action in (Remote, Pause, Note):
        made.register(action.name, action)
    return made


def write(tmp_path: Path, name: str, text: str) -> str:
    path = tmp_path / name
    path.write_text(textwrap.dedent(text))
    return str(path)


def check(tmp_path: Path, runbook: str, inventory: str = INVENTORY) -> list[Problem]:
    return validate(
        write(tmp_path, "runbook.yml", runbook), write(tmp_path, "inventory.yml", inventory), registry().params_model
    )


def problems_of(error: pytest.ExceptionInfo[LoadError]) -> list[tuple[int | None, str, str]]:
    return [(p.line, p.field, p.message) for p in error.value.problems]


# ---------------------------------------------------------------- what `dr validate` reports


MISTAKES = """\
name: many-mistakes
parameters:
  site: backup
steps:
  - id: fence
    action: note
  - id: promote
    action: remote.run
    with: {host: backup-app, command: promote}
  - id: switch
    action: remote
    with:
      host: backup-app
  - id: switch
    action: note
    needs: [verify]
  - id: verify
    action: note
    needs: [switch]
  - id: announce
    action: note
    with: {message: "moved to {{ params.target_site }} by {{ operator }}"}
  - id: stop-old
    action: remote
    with: {host: primary-ap, command: stop}
"""


def test_validate_reports_every_kind_of_mistake_with_its_line(tmp_path: Path) -> None:
    problems = check(tmp_path, MISTAKES)
    found = [(p.line, p.field, p.message) for p in problems]
    assert found == [
        (8, "steps[1].action", "unknown action 'remote.run'"),
        (13, "steps[2].with", "missing required parameter 'command'"),
        (14, "steps[3].id", "step id 'switch' is used twice (first at step 3)"),
        (19, "steps[4].needs[0]", "a cycle in needs: switch -> verify -> switch"),
        (22, "steps[5].with.message", "template uses undefined parameter params.target_site"),
        (22, "steps[5].with.message", "template uses undefined variable 'operator'"),
        (25, "steps[6].with.host", "host 'primary-ap' is not in the inventory (did you mean 'primary-app'?)"),
    ]
    assert all(p.file.endswith("runbook.yml") for p in problems)
    assert "use one of: primary-app, backup-app" in problems[-1].fix
    assert "site" in problems[4].fix  # the parameters there are


def test_load_runbook_refuses_structural_problems_and_check_runbook_finds_the_rest(tmp_path: Path) -> None:
    with pytest.raises(LoadError) as error:
        load_runbook("runbook.yml", MISTAKES)
    assert [message for _, _, message in problems_of(error)] == [
        "step id 'switch' is used twice (first at step 3)",
        "a cycle in needs: switch -> verify -> switch",
    ]
    clean = MISTAKES.replace("id: switch\n    action: note", "id: switch2\n    action: note").replace(
        "needs: [switch]", "needs: [fence]"
    )
    runbook, document = load_runbook("runbook.yml", clean)
    inventory, _ = load_inventory("inventory.yml", INVENTORY)
    messages = [p.message for p in check_runbook(runbook, document, inventory, registry().params_model)]
    assert messages == [
        "unknown action 'remote.run'",
        "missing required parameter 'command'",
        "template uses undefined parameter params.target_site",
        "template uses undefined variable 'operator'",
        "host 'primary-ap' is not in the inventory (did you mean 'primary-app'?)",
    ]


def test_validate_also_reports_inventory_problems(tmp_path: Path) -> None:
    broken = INVENTORY.replace("rto: 60s", "rto: soonish")
    problems = check(tmp_path, "name: ok\nsteps:\n  - {id: a, action: note}\n", broken)
    assert [(Path(p.file).name, p.line, p.field) for p in problems] == [
        ("inventory.yml", 10, "all.vars.dr.services.trading.rto")
    ]


def test_clean_runbook_validates_without_problems(tmp_path: Path) -> None:
    assert check(tmp_path, "name: ok\nsteps:\n  - {id: a, action: pause, with: {seconds: 1}}\n") == []


def test_the_shipped_example_validates_against_its_inventory() -> None:
    problems = validate(
        str(REPO / "runbooks" / "example-local.yml"),
        str(REPO / "inventories" / "local.yml"),
        default_registry().params_model,
    )
    assert problems == []


def test_unknown_parameter_names_the_accepted_ones(tmp_path: Path) -> None:
    problems = check(tmp_path, "name: x\nsteps:\n  - {id: a, action: pause, with: {secs: 1}}\n")
    assert [(p.line, p.field, p.message) for p in problems] == [
        (3, "steps[0].with.secs", "is not a parameter of this action"),
        (3, "steps[0].with", "missing required parameter 'duration'"),
    ]
    assert "duration, seconds" in problems[0].fix


def test_wrong_parameter_type_is_reported_before_running(tmp_path: Path) -> None:
    problems = check(tmp_path, "name: x\nsteps:\n  - {id: a, action: pause, with: {duration: [1]}}\n")
    assert [(p.line, p.field) for p in problems] == [(3, "steps[0].with.duration")]


def test_template_reading_a_step_it_does_not_need_is_reported(tmp_path: Path) -> None:
    runbook = """\
    name: order
    steps:
      - {id: a, action: note}
      - {id: b, action: note, needs: [], with: {message: "{{ steps.a.output.message }}"}}
      - id: c
        action: note
        needs: [a]
        with: {message: "{{ steps.a.output.message }}"}
        rollback: {action: note, with: {message: "{{ steps.c.output.message }}"}}
      - {id: d, action: note, with: {message: "{{ steps.nope.output }}"}}
    """
    problems = check(tmp_path, runbook)
    assert [(p.line, p.message) for p in problems] == [
        (4, "template reads steps.a, but this step does not need 'a', so it may not have run yet"),
        (10, "template uses undefined step steps.nope"),
    ]


def test_template_syntax_error_names_its_line(tmp_path: Path) -> None:
    with pytest.raises(LoadError) as error:
        load_runbook("runbook.yml", "name: x\nsteps:\n  - id: a\n    action: note\n    when: 'params.x =='\n")
    [(line, field, message)] = problems_of(error)
    assert (line, field) == (5, "steps[0].when")
    assert message.startswith("template syntax error")


def test_scope_naming_an_unknown_service_is_reported(tmp_path: Path) -> None:
    problems = check(tmp_path, "name: x\nscope: {services: tradng}\nsteps:\n  - {id: a, action: note}\n")
    assert [(p.line, p.field, p.message) for p in problems] == [
        (2, "scope.services[0]", "service 'tradng' is not in inventory 'test' (did you mean 'trading'?)")
    ]


# ---------------------------------------------------------------- the runbook's shape


def test_needs_default_to_the_previous_step() -> None:
    runbook, _ = load_runbook(
        "runbook.yml",
        """\
name: needs
steps:
  - {id: a, action: note}
  - {id: b, action: note}
  - {id: c, action: note, needs: []}
  - {id: d, action: note, needs: a}
  - {id: e, action: note}
""",
    )
    assert {s.id: s.needs for s in runbook.steps} == {"a": (), "b": ("a",), "c": (), "d": ("a",), "e": ("d",)}
    assert runbook.execution_groups() == [["a", "c"], ["b", "d"], ["e"]]


def test_step_fields_are_read_with_durations_and_shorthands() -> None:
    runbook, _ = load_runbook(
        "runbook.yml",
        """\
name: fields
parameters:
  target: backup
  region: {default: eu, choices: [eu, us]}
scope: {services: trading}
steps:
  - id: a
    action: note
    timeout: 1m
    retries: {count: 2, delay: 500ms, max_delay: 2s}
    on_failure: rollback
    rollback: {action: note, timeout: 10s}
    marks: service_restored
    when: false
  - {id: b, action: note, retries: 3, when: true}
""",
    )
    a, b = runbook.steps
    assert a.timeout == 60.0
    assert (a.retries.count, a.retries.delay, a.retries.max_delay) == (2, 0.5, 2.0)
    assert a.on_failure is OnFailure.ROLLBACK
    assert a.rollback is not None and a.rollback.timeout == 10.0
    assert a.marks == ("service_restored",)
    assert (a.when, b.when) == ("false", "true")
    assert b.retries.count == 3
    assert runbook.parameters["target"].default == "backup"
    assert runbook.parameters["region"].choices == ("eu", "us")
    assert runbook.scope.services == ("trading",)


def test_bad_step_fields_are_all_reported_with_lines() -> None:
    with pytest.raises(LoadError) as error:
        load_runbook(
            "runbook.yml",
            """\
name: fields
steps:
  - id: a
    action: note
    timeout: soon
    on_failure: panic
  - id: b
    action: note
    timeout: 0s
    needs: [a, 3]
  - id: c
    colour: red
  - action: note
""",
        )
    found = problems_of(error)
    assert [(line, field) for line, field, _ in found] == [
        (5, "steps[0].timeout"),
        (6, "steps[0].on_failure"),
        (9, "steps[1].timeout"),
        (10, "steps[1].needs"),
        (11, "steps[2].action"),
        (12, "steps[2].colour"),
        (13, "steps[3].id"),
    ]
    assert "not a duration" in found[0][2]
    assert "'abort', 'continue' or 'rollback'" in found[1][2]
    assert found[2][2] == "must be more than zero"
    assert found[4][2] == "is required"
    assert found[5][2] == "is not a known field"


def test_needs_naming_an_unknown_step_is_reported() -> None:
    with pytest.raises(LoadError) as error:
        load_runbook("runbook.yml", "name: x\nsteps:\n  - {id: a, action: note}\n  - {id: b, action: note, needs: z}\n")
    assert problems_of(error) == [(4, "steps[1].needs", "needs unknown step 'z'")]


def test_a_step_needing_itself_is_a_cycle() -> None:
    with pytest.raises(LoadError) as error:
        load_runbook("runbook.yml", "name: x\nsteps:\n  - {id: a, action: note, needs: [a]}\n")
    assert problems_of(error) == [(3, "steps[0].needs[0]", "a cycle in needs: a -> a")]


def test_runbook_without_steps_is_refused() -> None:
    with pytest.raises(LoadError) as error:
        load_runbook("runbook.yml", "name: x\nsteps: []\n")
    assert problems_of(error) == [(2, "steps", "must be a non-empty list of steps")]


# ---------------------------------------------------------------- YAML itself


def test_malformed_yaml_names_the_line(tmp_path: Path) -> None:
    path = write(tmp_path, "broken.yml", "name: x\nsteps:\n  - id: a\n    action: [note\n  - id: b\n")
    with pytest.raises(LoadError) as error:
        load_runbook(path)
    [problem] = error.value.problems
    assert problem.file == path
    assert problem.line == 5
    assert problem.message.startswith("not valid YAML")
    assert str(problem).startswith(f"{path}:5: not valid YAML")


def test_duplicated_key_names_its_line() -> None:
    with pytest.raises(LoadError) as error:
        load_runbook("runbook.yml", "name: x\nsteps:\n  - id: a\n    action: note\n    id: b\n")
    assert problems_of(error) == [(5, "steps[0].id", "this key appears twice")]


def test_every_yaml_level_problem_is_reported_at_once() -> None:
    text = "name: x\nname: y\nsteps:\n  - id: a\n    action: !custom note\n    with:\n      <<: {a: 1}\n"
    with pytest.raises(LoadError) as error:
        load_runbook("runbook.yml", text)
    assert [(line, field) for line, field, _ in problems_of(error)] == [
        (2, "name"),
        (5, "steps[0].action"),
        (7, "steps[0].with"),
    ]
    assert "tag '!custom'" in error.value.problems[1].message


def test_anchors_and_aliases_are_refused() -> None:
    text = "name: x\ndefaults: &d {timeout: 5s}\nsteps:\n  - id: a\n    action: note\n    with: *d\n"
    with pytest.raises(LoadError) as error:
        load_runbook("runbook.yml", text)
    assert "anchors and aliases are not supported" in error.value.problems[0].message


def test_unreadable_file_is_one_clear_problem(tmp_path: Path) -> None:
    with pytest.raises(LoadError) as error:
        load_runbook(str(tmp_path / "missing.yml"))
    assert error.value.problems[0].message.startswith("cannot read the file")


# ---------------------------------------------------------------- inventories


def test_inventory_reads_sites_services_and_hosts() -> None:
    inventory, document = load_inventory("inventory.yml", INVENTORY)
    assert inventory.name == "test"
    assert set(inventory.sites) == {"primary", "backup"}
    assert inventory.sites["primary"].region == "a"
    trading = inventory.services["trading"]
    assert (trading.rto, trading.rpo, trading.tier, trading.sites) == (60.0, 0.0, "critical", ("primary", "backup"))
    assert set(inventory.hosts) == {"primary-app", "backup-app"}  # `monitoring` is not a site
    host = inventory.hosts["primary-app"]
    assert (host.site, host.address, host.port, host.user) == ("primary", "127.0.10.1", 2222, "postgres")
    assert host.known_hosts == "/etc/ssh/known"  # inherited from all.vars
    assert host.roles == ("app", "db")
    assert host.vars == {"pg_port": 5432}
    assert inventory.vars == {"front_door": "127.0.0.1:8080"}
    assert document.sha256 and document.text == INVENTORY


def test_inventory_mistakes_name_file_and_line() -> None:
    broken = (
        INVENTORY.replace("rpo: 0s", "rpo: yesterday")
        .replace("sites: [primary, backup]}", "sites: [primary, bakup]}")
        .replace("ansible_port: 2222", "ansible_port: twenty-two")
    )
    with pytest.raises(LoadError) as error:
        load_inventory("inventories/x.yml", broken)
    assert {(p.file, p.line, p.field) for p in error.value.problems} == {
        ("inventories/x.yml", 10, "all.vars.dr.services.trading.rpo"),
        ("inventories/x.yml", 10, "all.vars.dr.services.trading.sites[1]"),
        ("inventories/x.yml", 19, "all.children.primary.hosts.primary-app.ansible_port"),
    }
    by_field = {p.field.rsplit(".", 1)[-1]: p for p in error.value.problems}
    assert "'yesterday' is not a duration" in by_field["rpo"].message
    assert by_field["sites[1]"].message == "site 'bakup' is not in dr.sites"
    assert by_field["sites[1]"].fix == "use one of: primary, backup"


def test_inventory_without_dr_block_says_what_to_add() -> None:
    with pytest.raises(LoadError) as error:
        load_inventory("inv.yml", "all:\n  vars:\n    ansible_user: me\n  children: {}\n")
    [problem] = error.value.problems
    assert (problem.file, problem.line) == ("inv.yml", 3)
    assert "`all.vars.dr` is missing" in problem.message


def test_inventory_that_is_not_ansible_shaped_is_refused() -> None:
    with pytest.raises(LoadError) as error:
        load_inventory("inv.yml", "sites: [a]\n")
    assert "starts with `all:`" in error.value.problems[0].message


@pytest.mark.parametrize(
    ("replace", "by", "field", "message"),
    [
        ("backup: {}", "backup: lab-b", "all.vars.dr.sites.backup", "must be a mapping"),
        ("backup:\n      hosts:", "backup:\n      hosts: [a]\n      x:", "all.children.backup", "must be mappings"),
        ("{ansible_host: 127.0.20.1}", "oops", "all.children.backup.hosts.backup-app", "must be a mapping"),
        ("front_door: 127.0.0.1:8080", "- 1", "all.vars.dr.vars", "must be a mapping"),
        ("name: test", "name: test\n      sights: {}", "all.vars.dr.sights", "is not a known field"),
    ],
)
def test_inventory_shape_mistakes_are_problems_not_crashes(replace: str, by: str, field: str, message: str) -> None:
    assert replace in INVENTORY
    with pytest.raises(LoadError) as error:
        load_inventory("inv.yml", INVENTORY.replace(replace, by))
    assert [(p.field, message in p.message) for p in error.value.problems] == [(field, True)]



LONG, LABEL = "x" * 201, "t" * 51  # one past model.names' limits (the evidence columns)


def test_names_longer_than_the_evidence_keeps_are_refused_where_they_are_written() -> None:
    broken = (INVENTORY.replace("name: test", f"name: {LONG}")
              .replace("backup: {}", f"backup: {{}}\n        {LONG}: {{}}")
              .replace("tier: critical", f"tier: critical, criticality: {LABEL}")
              .replace("        backup-app:", f"        {LONG}: {{}}\n        backup-app:"))
    with pytest.raises(LoadError) as error:
        load_inventory("inv.yml", broken)
    assert sorted((p.line, p.field, p.message, p.fix) for p in error.value.problems) == [
        (5, "all.vars.dr.name", "is 201 characters long; the limit is 200", "shorten it"),
        (9, f"all.vars.dr.sites.{LONG}", "is 201 characters long; the limit is 200", "shorten it"),
        (11, "all.vars.dr.services.trading.criticality", "is 51 characters long; the limit is 50", "shorten it"),
        (25, f"all.children.backup.hosts.{LONG}", "is 201 characters long; the limit is 200", "shorten it"),
    ]
    runbook = textwrap.dedent(f"""\
        name: {LONG}
        steps:
          - id: {LONG}
            action: note
          - id: second
            action: note
            service: {LONG}
            marks: [service_restored, {LONG}]
        """)
    with pytest.raises(LoadError) as error:
        load_runbook("rb.yml", runbook)
    assert [(p.line, p.field, p.message) for p in error.value.problems] == [
        (1, "name", "is 201 characters long; the limit is 200"),
        (3, "steps[0].id", "is 201 characters long; the limit is 200"),
        (7, "steps[1].service", "is 201 characters long; the limit is 200"),
        (8, "steps[1].marks[1]", "is 201 characters long; the limit is 200"),
    ]


def test_an_inventory_without_a_name_is_named_by_its_path_which_must_fit_too(tmp_path: Path) -> None:
    unnamed = INVENTORY.replace("      name: test\n", "")
    assert load_inventory("inv.yml", unnamed)[0].name == "inv.yml"
    with pytest.raises(LoadError) as error:
        load_inventory("d/" * 100 + "inv.yml", unnamed)
    [problem] = error.value.problems
    assert (problem.line, problem.field, problem.fix) == (5, "all.vars.dr.name", "add a name under all.vars.dr")
    assert problem.message == ("is not given, and the file's path, which names the inventory instead, "
                               "is 207 characters long; the limit is 200")


# ---------------------------------------------------------------- durations


@pytest.mark.parametrize(
    ("text", "seconds"),
    [("30s", 30.0), ("5m", 300.0), ("100ms", 0.1), ("1h", 3600.0), ("1.5s", 1.5), (" 2 s ", 2.0), (7, 7.0),
     (0.25, 0.25), ("10", 10.0), ("1d", 86400.0)],
)
def test_durations_parse(text: object, seconds: float) -> None:
    assert parse_duration(text) == seconds


@pytest.mark.parametrize("text", ["soon", "5 minutes", "-1s", -1, True, None, "1s2", ""])
def test_bad_durations_say_what_is_accepted(text: object) -> None:
    with pytest.raises(ValueError, match="duration|negative"):
        parse_duration(text)


# ---------------------------------------------------------------- validation that matches the run

LAB_INVENTORY = str(REPO / "inventories" / "lab.yml")

SWITCH = """\
name: switch-quotation
scope: {services: [quotation]}
parameters:
  to_site: {type: site, default: backup, description: where quotation goes}
steps:
  - id: switch
    action: haproxy.set_active
    with: {backends: [quotaton], site: "{{ params.to_site }}"}
"""


def lab_check(tmp_path: Path, runbook: str, given: dict[str, object] | None = None) -> list[Problem]:
    registry = default_registry()
    return check_files(write(tmp_path, "runbook.yml", runbook), LAB_INVENTORY, registry.params_model,
                       given=given).problems


def dr(tmp_path: Path, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "dr_orchestrator.cli", *args], capture_output=True, text=True,
                          timeout=120, cwd=tmp_path, env={**os.environ, "DR_DATABASE_URL": "sqlite:///unused.db"})


def test_a_typo_in_a_backend_is_refused_with_the_near_name(tmp_path: Path) -> None:
    [problem] = lab_check(tmp_path, SWITCH)
    assert (problem.line, problem.field) == (8, "steps[0].with.backends")
    assert "backend 'quotaton' is not in the front door's backends" in problem.message
    assert "did you mean 'quotation'?" in problem.message
    assert problem.fix == "use one of: trading, contract-signing, quotation"
    assert lab_check(tmp_path, SWITCH.replace("quotaton", "quotation")) == []


def test_a_site_must_be_served_by_the_backend_and_a_rendered_template_is_checked(tmp_path: Path) -> None:
    fixed = SWITCH.replace("quotaton", "quotation")
    [problem] = lab_check(tmp_path, fixed.replace("{type: site, default: backup", "{default: bakup"))
    assert (problem.field, problem.message) == (
        "steps[0].with.site", "site 'bakup' is not in dr.sites (did you mean 'backup'?)")
    defaulted = fixed.replace("with: {backends: [quotation], ", "with: {")  # the step's service is the backend
    assert lab_check(tmp_path, defaulted) == []
    inventory = Path(LAB_INVENTORY).read_text().replace(
        "            quotation:\n              port: 18103\n              backend: quotation\n              servers:\n"
        "                primary: primary\n                backup: backup\n",
        "            quotation:\n              port: 18103\n              backend: quotation\n              servers:\n"
        "                primary: primary\n")
    problems = validate(write(tmp_path, "runbook.yml", defaulted), write(tmp_path, "lab.yml", inventory),
                        default_registry().params_model)
    assert [(p.field, p.message) for p in problems] == [
        ("steps[0].with.site", "backend 'quotation' has no server at site 'backup'")]


def test_database_and_host_references_are_checked(tmp_path: Path) -> None:
    runbook = """\
    name: refs
    parameters:
      site: {type: site, default: backup}
    steps:
      - id: fence
        action: postgres.set_read_only
        with: {database: tradng, site: "{{ params.site }}"}
      - id: stop
        action: ssh.run
        with: {hosts: [backup-ap], argv: [stop]}
    """
    problems = lab_check(tmp_path, runbook)
    assert [(p.field, p.message) for p in problems] == [
        ("steps[0].with.database", "database 'tradng' is not in dr.vars.databases (did you mean 'trading'?)"),
        ("steps[1].with.hosts", "host 'backup-ap' is not in the inventory (did you mean 'backup-app'?)"),
    ]


def test_a_site_parameter_refuses_a_value_that_is_not_a_site(tmp_path: Path) -> None:
    problems = lab_check(tmp_path, SWITCH.replace("quotaton", "quotation"), {"to_site": "mars"})
    [problem] = problems  # templates reading the wrong value are not rendered: one sentence, not five
    assert (problem.line, problem.field) == (4, "parameters.to_site")
    assert problem.message == "to_site = 'mars' (given) is not a site of inventory 'lab'"
    assert problem.fix == "use one of: primary, backup"
    [near] = lab_check(tmp_path, SWITCH.replace("quotaton", "quotation"), {"to_site": "bakup"})
    assert near.message.endswith("; did you mean 'backup'?")


def test_parameter_values_are_checked_against_choices_and_types(tmp_path: Path) -> None:
    runbook = """\
    name: params
    parameters:
      mode: {default: fast, choices: [fast, safe]}
      service: {type: service, default: quotaton}
      target: {required: true}
    steps:
      - {id: a, action: noop, with: {message: "{{ params.mode }} {{ params.service }} {{ params.target }}"}}
    """
    problems = lab_check(tmp_path, runbook, {"mode": "reckless", "targt": 1})
    assert [(p.line, p.field, p.message) for p in problems] == [
        (None, "parameters", "runbook 'params' has no parameter 'targt' (did you mean 'target'?)"),
        (3, "parameters.mode", "mode = 'reckless' (given) is not one of its choices"),
        (4, "parameters.service.default", "service = 'quotaton' (its default) is not a service of inventory 'lab'; "
                                          "did you mean 'quotation'?"),
        (5, "parameters.target", "is required and was not given"),
    ]
    assert problems[1].fix == "use one of: fast, safe"


def test_every_duration_parameter_takes_a_duration(tmp_path: Path) -> None:
    runbook = """\
    name: durations
    steps:
      - {id: gate, action: approval, with: {timeout: 2m}}
      - {id: pause, action: wait, with: {duration: 1m}}
      - id: check
        action: http.check
        with: {url: "http://127.0.0.1:1/", interval: 50ms, probe_timeout: 1s, deadline: 2m}
      - {id: note, action: notify.webhook, with: {url: "http://127.0.0.1:1/", timeout: 5s, backoff: 500ms}}
      - {id: bad, action: approval, with: {timeout: soon}}
    """
    problems = lab_check(tmp_path, runbook)
    assert [(p.field, "'soon' is not a duration" in p.message) for p in problems] == [
        ("steps[4].with.timeout", True)]
    registry = default_registry()
    assert registry.get("approval").Params.model_validate({"timeout": "2m"}).timeout == 120.0  # type: ignore[attr-defined]
    times = 0
    for name, model in ((name, registry.params_model(name)) for name in registry.names()):
        for field, info in (model.model_fields.items() if model else ()):
            if float in (info.annotation, *get_args(info.annotation)):  # every float parameter is a time
                one_field: TypeAdapter[float | None] = TypeAdapter(
                    Annotated[info.annotation, *info.metadata])  # type: ignore[arg-type]
                assert one_field.validate_python("1500ms") == 1.5, (name, field)
                times += 1
    assert times >= 15


def test_templates_the_sandbox_forbids_are_reported(tmp_path: Path) -> None:
    runbook = """\
    name: hostile
    steps:
      - {id: a, action: noop, with: {message: "{{ ''.__class__ }}"}}
      - {id: b, action: noop, with: {message: "{{ params.update({'x': 1}) }}"}}
    """
    problems = lab_check(tmp_path, runbook)
    assert [(p.field, p.message) for p in problems] == [
        ("steps[0].with.message", "templates may not read '__class__': the sandbox forbids internal attributes"),
        ("steps[1].with.message", "templates may not call update(): the sandbox forbids changing values in place"),
    ]


SHELL = """\
name: shell
parameters:
  to_site: {type: site, default: backup}
steps:
  - id: a
    action: shell.run
    with: {shell: true, command: "echo {{ params.to_site }} {{ params.to_site | shquote }}"}
  - id: b
    action: ssh.run
    with: {hosts: [backup-app], command: "echo {{ params.to_site | shquote }}"}
  - id: c
    action: ssh.run
    with: {hosts: [backup-app], argv: [echo, "{{ params.to_site }}"]}
"""


def test_an_unquoted_template_in_a_shell_command_is_a_warning(tmp_path: Path) -> None:
    [problem] = lab_check(tmp_path, SHELL)
    assert (problem.severity, problem.field) == ("warning", "steps[0].with.command")
    assert problem.message.startswith("{{ params.to_site }} put into a shell command line unquoted")
    assert problem.fix == "write {{ params.to_site | shquote }}, or give argv as a list"
    assert str(problem).startswith(f"{tmp_path / 'runbook.yml'}:7: warning: steps[0].with.command")


@pytest.mark.slow
def test_dr_validate_prints_warnings_and_fails_on_them_only_with_strict(tmp_path: Path) -> None:
    runbook = write(tmp_path, "shell.yml", SHELL)
    relaxed = dr(tmp_path, "validate", runbook, "-i", LAB_INVENTORY)
    assert relaxed.returncode == 0, relaxed.stderr
    assert "warning: steps[0].with.command" in relaxed.stderr and "1 warning(s)" in relaxed.stdout
    strict = dr(tmp_path, "validate", "--strict", runbook, "-i", LAB_INVENTORY)
    assert strict.returncode == 2
    assert "0 problem(s) and 1 warning(s) found." in strict.stderr


@pytest.mark.parametrize("command", ["validate", "plan", "run"])
def test_dr_refuses_the_typo_and_the_wrong_site_before_anything_runs(tmp_path: Path, command: str) -> None:
    runbook = write(tmp_path, "switch.yml", SWITCH)
    result = dr(tmp_path, command, runbook, "-i", LAB_INVENTORY, "-p", "to_site=mars")
    assert result.returncode == 2, result.stdout + result.stderr
    assert "Traceback" not in result.stderr
    assert "backend 'quotaton' is not in the front door's backends" in result.stderr
    assert "did you mean 'quotation'?" in result.stderr
    assert "parameters.to_site: to_site = 'mars' (given) is not a site of inventory 'lab' (use one of: primary, " \
           "backup)" in result.stderr
    assert "2 problem(s) found." in result.stderr
    assert not (tmp_path / "unused.db").exists()  # nothing ran, nothing was recorded


def test_validate_lists_every_problem_in_one_pass(tmp_path: Path) -> None:
    runbook = """\
    name: many
    scope: {services: [quotation]}
    parameters:
      to_site: {type: site, default: backup}
    steps:
      - id: gate
        action: approval
        with: {timeout: 2m, two_person: maybe}
        on_failure: panic
      - id: switch
        action: haproxy.set_active
        with: {backends: [quotaton], site: "{{ params.to_site }}"}
      - id: tell
        action: noop
        colour: red
        with: {message: "{{ ''.__class__ }}"}
      - id: fence
        action: ssh.run
        with: {hosts: [primary-ap], command: "stop {{ params.to_site }}", connect_timeout: soon}
    """
    problems = lab_check(tmp_path, runbook, {"to_site": "mars"})
    assert [(p.line, p.field, p.severity) for p in problems] == [
        (4, "parameters.to_site", "error"),
        (8, "steps[0].with.two_person", "error"),
        (9, "steps[0].on_failure", "error"),
        (12, "steps[1].with.backends", "error"),
        (15, "steps[2].colour", "error"),
        (16, "steps[2].with.message", "error"),
        (19, "steps[3].with.connect_timeout", "error"),
        (19, "steps[3].with.hosts", "error"),
        (19, "steps[3].with.command", "warning"),
    ]
    fixed = (runbook.replace("two_person: maybe", "two_person: true").replace("on_failure: panic", "")
             .replace("quotaton", "quotation").replace("colour: red", "").replace("''.__class__", "params.to_site")
             .replace("primary-ap", "primary-app").replace("soon", "1s"))
    assert [(p.field, p.severity) for p in lab_check(tmp_path, fixed, {"to_site": "primary"})] == [
        ("steps[3].with.command", "warning")]  # fixing those brings no new error to light
