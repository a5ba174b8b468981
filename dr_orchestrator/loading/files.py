"""A runbook and its inventory read and checked together, in one pass: what ``dr validate``, ``dr plan``
and every run start from."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any

from dr_orchestrator.loading.change_order import EffectLookup, change_order_problems
from dr_orchestrator.loading.inventory import load_inventory
from dr_orchestrator.loading.parameters import parameter_values
from dr_orchestrator.loading.problems import by_line
from dr_orchestrator.loading.references import ParamsLookup, check_steps
from dr_orchestrator.loading.runbook import read_runbook
from dr_orchestrator.model.inventory import Inventory
from dr_orchestrator.model.runbook import Runbook
from dr_orchestrator.yamlsource import LoadError, Problem, YamlDocument, read_yaml


@dataclass
class Checked:
    """A runbook checked against an inventory: every problem (errors and warnings), and what was read."""

    problems: list[Problem]
    runbook: Runbook | None = None
    runbook_document: YamlDocument | None = None
    inventory: Inventory | None = None
    inventory_document: YamlDocument | None = None
    parameters: dict[str, Any] = dataclasses.field(default_factory=dict)  # the run's values, when `given` was

    @property
    def errors(self) -> list[Problem]:
        return [problem for problem in self.problems if problem.is_error]


def validate(
    runbook_path: str,
    inventory_path: str,
    params_model: ParamsLookup,
    *,
    runbook_text: str | None = None,
    inventory_text: str | None = None,
    effect_of: EffectLookup | None = None,
) -> list[Problem]:
    """Every problem of a runbook against an inventory, structural and semantic together (empty when
    clean): what `dr validate` reports. Inventory problems come first, then the runbook's by line."""
    return check_files(runbook_path, inventory_path, params_model, runbook_text=runbook_text,
                       inventory_text=inventory_text, effect_of=effect_of).problems


def check_files(
    runbook_path: str,
    inventory_path: str,
    params_model: ParamsLookup,
    *,
    given: dict[str, Any] | None = None,
    runbook_text: str | None = None,
    inventory_text: str | None = None,
    effect_of: EffectLookup | None = None,
) -> Checked:
    """Read and check both files in one pass. With ``given`` (the parameters a run is asked for),
    also resolve the run's parameter values and render templates with them; without, templates
    render with the parameters' defaults."""
    problems: list[Problem] = []
    checked = Checked(problems)
    try:
        checked.inventory, checked.inventory_document = load_inventory(inventory_path, inventory_text)
    except LoadError as exc:
        problems.extend(exc.problems)
    try:
        document = read_yaml(runbook_path, runbook_text)
    except LoadError as exc:
        problems.extend(exc.problems)
        return checked
    checked.runbook_document = document
    parsed = read_runbook(document)
    found = list(parsed.problems)
    runbook, inventory = parsed.runbook, checked.inventory
    if inventory is not None and runbook is not None:
        values = None
        if given is not None:
            values, wrong = parameter_values(runbook, document, inventory, given)
            found.extend(wrong)
            checked.parameters = values
        found.extend(check_steps(runbook, parsed.steps, document, inventory, params_model, values))
    if runbook is not None and effect_of is not None:
        found.extend(change_order_problems(runbook, parsed.steps, document, effect_of))
    problems.extend(by_line(found))
    if not parsed.problems:
        checked.runbook = runbook
    return checked


def check_runbook(
    runbook: Runbook, document: YamlDocument, inventory: Inventory, params_model: ParamsLookup,
    effect_of: EffectLookup | None = None,
) -> list[Problem]:
    """Everything that needs the inventory or the action registry to check."""
    steps = list(enumerate(runbook.steps))
    problems = check_steps(runbook, steps, document, inventory, params_model)
    if effect_of is not None:
        problems.extend(change_order_problems(runbook, steps, document, effect_of))
    return problems
