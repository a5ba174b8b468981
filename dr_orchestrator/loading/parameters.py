"""A run's parameter values against the runbook's declarations and the inventory."""

from __future__ import annotations

import difflib
from typing import Any

from dr_orchestrator.model.inventory import Inventory
from dr_orchestrator.model.runbook import Runbook
from dr_orchestrator.yamlsource import PathKey, Problem, YamlDocument


def parameter_values(
    runbook: Runbook, document: YamlDocument, inventory: Inventory, given: dict[str, Any]
) -> tuple[dict[str, Any], list[Problem]]:
    """The run's parameter values (given, else defaults) and what is wrong with them: unknown names,
    required ones missing, values outside ``choices`` or not a site (service) of the inventory for
    ``type: site`` (``service``). A wrong value is left out, so templates reading it are not rendered."""
    problems: list[Problem] = []
    values: dict[str, Any] = {}
    for name in given:
        if name not in runbook.parameters:
            close = difflib.get_close_matches(name, list(runbook.parameters), n=1)
            guess = f" (did you mean {close[0]!r}?)" if close else ""
            problems.append(Problem(document.path, None, "parameters",
                                    f"runbook {runbook.name!r} has no parameter {name!r}{guess}",
                                    f"its parameters: {', '.join(runbook.parameters) or 'none'}"))
    for name, spec in runbook.parameters.items():
        key: PathKey = ("parameters", name)
        if name in given:
            value, said = given[name], "given"
        elif spec.required:
            problems.append(document.problem(key, "is required and was not given",
                                             f"pass -p {name}=VALUE (in the API: params)"))
            continue
        else:
            value, said = spec.default, "its default"
            key = key + ("default",)
        if value is None and not spec.required:
            values[name] = value
            continue
        wrong = _parameter_problem(document, key, name, value, said, spec, inventory)
        if wrong is None:
            values[name] = value
        else:
            problems.append(wrong)
    return values, problems


def _parameter_problem(document: YamlDocument, key: PathKey, name: str, value: Any, said: str, spec: Any,
                       inventory: Inventory) -> Problem | None:
    allowed: list[Any] | None = None
    if spec.type is not None:
        known = inventory.sites if spec.type == "site" else inventory.services
        allowed = [choice for choice in spec.choices if choice in known] if spec.choices else list(known)
        what = f"a {spec.type} of inventory {inventory.name!r}"
    elif spec.choices is not None:
        allowed, what = list(spec.choices), "one of its choices"
    if allowed is None or value in allowed:
        return None
    names = [str(choice) for choice in allowed]
    close = difflib.get_close_matches(str(value), names, n=1)
    guess = f"; did you mean {close[0]!r}?" if close else ""
    return document.problem(key, f"{name} = {value!r} ({said}) is not {what}{guess}",
                            f"use one of: {', '.join(names) or 'none'}")
