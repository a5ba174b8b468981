"""What a runbook may write shorter than the model has it: ``needs: a`` for ``[a]`` (and no ``needs``
for the step before), ``retries: 3``, durations as text (``30s``), ``rollback: {none: reason}``, ``marks: a``,
a parameter's default as its value, a scope's one name; each duration checked where it is written."""

from __future__ import annotations

from typing import Any

from dr_orchestrator.model.durations import parse_duration
from dr_orchestrator.yamlsource import PathKey, Problem, YamlDocument

_STEP_DURATIONS = ("timeout",)
_RETRY_DURATIONS = ("delay", "max_delay")
_MAX_DURATION_S = 31 * 24 * 3600.0


def normalise_top(data: dict[str, Any]) -> dict[str, Any]:
    top = {k: v for k, v in data.items() if k != "steps"}
    parameters = top.get("parameters")
    if isinstance(parameters, dict):  # `name: value` is shorthand for a default
        top["parameters"] = {
            name: spec if isinstance(spec, dict) else {"default": spec} for name, spec in parameters.items()
        }
    scope = top.get("scope")
    if isinstance(scope, dict):
        top["scope"] = {k: [v] if isinstance(v, str) else v for k, v in scope.items()}
    return top


def normalise_step(
    document: YamlDocument, key: PathKey, raw: dict[str, Any], previous: str | None, problems: list[Problem]
) -> dict[str, Any]:
    step = dict(raw)
    needs = step.get("needs", [previous] if previous else [])  # unstated needs: the step before
    if isinstance(needs, str):
        needs = [needs]
    if not isinstance(needs, list) or not all(isinstance(n, str) for n in needs):
        problems.append(
            document.problem(key + ("needs",), "must be a step id or a list of step ids", "use [] to start at once")
        )
        needs = []
    step["needs"] = needs
    if isinstance(step.get("when"), bool):  # `when: false` is YAML's boolean, not a string
        step["when"] = str(step["when"]).lower()
    for name in _STEP_DURATIONS:
        if name in step:
            step[name] = _duration(document, key + (name,), step[name], problems, positive=True)
    retries = step.get("retries")
    if isinstance(retries, int) and not isinstance(retries, bool):
        step["retries"] = {"count": retries}
    elif isinstance(retries, dict):
        step["retries"] = dict(retries)
        for name in _RETRY_DURATIONS:
            if name in retries:
                step["retries"][name] = _duration(document, key + ("retries", name), retries[name], problems)
    rollback = step.get("rollback")
    if isinstance(rollback, dict) and set(rollback) == {"none"}:  # `rollback: {none: "reason"}`
        reason = rollback["none"]
        if not isinstance(reason, str) or not reason.strip():
            problems.append(document.problem(key + ("rollback", "none"), "must say why the step has no rollback",
                                             'e.g. rollback: {none: "a promotion cannot be undone"}'))
        step.pop("rollback")
        step["no_rollback"] = str(reason or "")
    elif isinstance(rollback, dict) and "timeout" in rollback:
        step["rollback"] = {
            **rollback,
            "timeout": _duration(document, key + ("rollback", "timeout"), rollback["timeout"], problems, positive=True),
        }
    if isinstance(step.get("marks"), str):
        step["marks"] = [step["marks"]]
    return step


def _duration(document: YamlDocument, key: PathKey, value: Any, problems: list[Problem], positive: bool = False) -> Any:
    try:
        seconds = parse_duration(value)
    except ValueError as exc:
        problems.append(document.problem(key, str(exc)))
        return 1.0
    if positive and seconds <= 0:
        problems.append(document.problem(key, "must be more than zero", "e.g. 30s"))
        return 1.0
    if seconds > _MAX_DURATION_S:  # also keeps waits within what the OS timers accept
        problems.append(document.problem(key, "is longer than 31 days", "no step waits that long; e.g. 30m"))
        return 1.0
    return seconds
