"""`dr schema runbook|inventory|drill`: JSON Schema (draft 2020-12) that accepts every shipped file and
refuses what loading refuses for shape and type (an unknown action, a parameter of the wrong type);
`dr actions`: each parameter's type, default or "required", and description."""

from __future__ import annotations

import copy
import json
from pathlib import Path
from typing import Any

import jsonschema
import pytest
import yaml
from click.testing import CliRunner

from dr_orchestrator.cli import cli

REPO = Path(__file__).resolve().parents[1]
SHIPPED = {"runbook": sorted((REPO / "runbooks").glob("*.yml")),
           "inventory": sorted((REPO / "inventories").glob("*.yml")),
           "drill": sorted((REPO / "failover_tests").glob("*.yml"))}


@pytest.fixture(scope="module")
def schemas() -> dict[str, dict[str, Any]]:
    found = {}
    for kind in SHIPPED:
        result = CliRunner().invoke(cli, ["schema", kind])
        assert result.exit_code == 0, result.output
        found[kind] = json.loads(result.output)
    return found


def errors(schema: dict[str, Any], document: Any) -> list[str]:
    validator = jsonschema.Draft202012Validator(schema)
    return [f"{list(e.absolute_path)}: {e.message}" for e in validator.iter_errors(document)]


@pytest.mark.parametrize("kind", SHIPPED)
def test_the_schema_is_draft_2020_12_and_accepts_every_shipped_file(schemas: dict[str, dict[str, Any]],
                                                                     kind: str) -> None:
    schema = schemas[kind]
    assert schema["$schema"] == "https://json-schema.org/draft/2020-12/schema"
    jsonschema.Draft202012Validator.check_schema(schema)
    assert len(SHIPPED[kind]) >= 3
    for path in SHIPPED[kind]:
        assert errors(schema, yaml.safe_load(path.read_text())) == [], path.name


def failover_trading() -> dict[str, Any]:
    document = yaml.safe_load((REPO / "runbooks" / "failover-trading.yml").read_text())
    assert isinstance(document, dict)
    return document


def first_step_of(document: dict[str, Any], action: str) -> dict[str, Any]:
    return next(step for step in document["steps"] if step["action"] == action)


def test_the_runbook_schema_refuses_an_unknown_action(schemas: dict[str, dict[str, Any]]) -> None:
    document = failover_trading()
    document["steps"][0]["action"] = "postgres.promtoe"
    found = errors(schemas["runbook"], document)
    assert found and any("postgres.promtoe" in message for message in found), found


def test_the_runbook_schema_checks_with_against_the_steps_action(schemas: dict[str, dict[str, Any]]) -> None:
    document = failover_trading()
    check = first_step_of(document, "http.check")
    assert errors(schemas["runbook"], document) == []
    for wrong in ({"expect_status": "two hundred"}, {"no_such_parameter": 1}):
        broken = copy.deepcopy(document)
        first_step_of(broken, "http.check")["with"].update(wrong)
        found = errors(schemas["runbook"], broken)
        assert found, wrong
    # a Jinja template goes where any type does (it is rendered when the step runs)
    templated = copy.deepcopy(document)
    first_step_of(templated, "http.check")["with"]["expect_status"] = "{{ params.status }}"
    assert errors(schemas["runbook"], templated) == []
    assert check["with"]  # the shipped step has parameters to check


def test_durations_and_the_shorthands_of_yaml_are_accepted_and_nonsense_is_not(
        schemas: dict[str, dict[str, Any]]) -> None:
    document = failover_trading()
    step = document["steps"][0]
    step.update(timeout="2m", retries=3, needs=[], marks="switch_started")
    assert errors(schemas["runbook"], document) == []
    step["timeout"] = "two minutes"
    assert errors(schemas["runbook"], document)


def test_dr_actions_shows_a_type_default_or_required_and_no_pydantic_undefined() -> None:
    text = CliRunner().invoke(cli, ["actions"])
    assert text.exit_code == 0 and "PydanticUndefined" not in text.output
    parameters = [line for line in text.output.splitlines() if line.startswith("    ")]
    assert len(parameters) > 100
    for line in parameters:
        assert " (" in line and (", required)" in line or ", default " in line), line
    assert "    tags (list[str], default []): Run only tasks with these tags." in text.output
    assert "    playbook (str, required): Playbook file, relative to the runbook's playbooks/ folder." in text.output
    assert "    timeout (duration | None, default None): " in text.output

    listing = json.loads(CliRunner().invoke(cli, ["actions", "-o", "json"]).output)
    for action, fields in listing.items():
        for name, entry in fields.items():
            assert entry["type"] and entry["type"] != "PydanticUndefined", (action, name)
            assert entry["required"] or "default" in entry, (action, name)
    assert listing["ansible.playbook"]["tags"] == {"type": "list[str]", "required": False, "default": [],
                                                   "description": "Run only tasks with these tags."}
