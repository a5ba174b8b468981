"""A runbook file to a ``Runbook``: its structure, ids, needs, durations and template syntax, read as
far as it is well-formed, with every problem found on the way."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from pydantic import ValidationError

from dr_orchestrator.loading.problems import by_line, listed, pydantic_problems
from dr_orchestrator.loading.templates import template_syntax
from dr_orchestrator.model.durations import parse_duration
from dr_orchestrator.model.runbook import Runbook, Step
from dr_orchestrator.yamlsource import LoadError, PathKey, Problem, YamlDocument, read_yaml

_STEP_DURATIONS = ("timeout",)
_RETRY_DURATIONS = ("delay", "max_delay")
_MAX_DURATION_S = 31 * 24 * 3600.0


@dataclass
class ParsedRunbook:
    runbook: Runbook | None  # None when even a lenient reading of its top-level fields fails
    steps: list[tuple[int, Step]]  # the well-formed steps, with their index in the file
    problems: list[Problem]


def load_runbook(path: str, text: str | None = None) -> tuple[Runbook, YamlDocument]:
    """Parse and check a runbook on its own (structure, ids, needs, durations, template syntax)."""
    document = read_yaml(path, text)
    parsed = read_runbook(document)
    if parsed.problems or parsed.runbook is None:
        raise LoadError(by_line(parsed.problems))
    return parsed.runbook, document


def parse_runbook(document: YamlDocument) -> Runbook:
    """A runbook from an already read document: one held inside another file (a drill's fault,
    checks and cleanup), whose line map points into that file."""
    parsed = read_runbook(document)
    if parsed.problems or parsed.runbook is None:
        raise LoadError(by_line(parsed.problems))
    return parsed.runbook


def read_runbook(document: YamlDocument) -> ParsedRunbook:
    """Read as much of a runbook as is well-formed, with every problem found on the way."""
    problems: list[Problem] = []
    data = document.data
    if not isinstance(data, dict):
        return ParsedRunbook(None, [], [document.problem((), "a runbook is a mapping with name and steps")])
    raw_steps = data.get("steps")
    if not isinstance(raw_steps, list) or not raw_steps:
        problems.append(document.problem(("steps",), "must be a non-empty list of steps"))
        raw_steps = []
    normalised: list[tuple[int, dict[str, Any]]] = []
    ids: dict[str, int] = {}
    previous: str | None = None
    for index, raw in enumerate(raw_steps):
        key: PathKey = ("steps", index)
        if not isinstance(raw, dict):
            problems.append(document.problem(key, "a step is a mapping with id and action"))
            continue
        step = _normalise_step(document, key, raw, previous, problems)
        step_id = step.get("id")
        if isinstance(step_id, str):
            if step_id in ids:
                problems.append(
                    document.problem(
                        key + ("id",),
                        f"step id {step_id!r} is used twice (first at step {ids[step_id] + 1})",
                        "give each step its own id",
                    )
                )
            else:
                ids[step_id] = index
            previous = step_id
        normalised.append((index, step))
    step_ids = listed(list(ids))
    for index, step in normalised:
        written_as_list = isinstance(raw_steps[index].get("needs"), list)
        for n, need in enumerate(step.get("needs", ())):
            if need not in ids:
                at: PathKey = ("steps", index, "needs", n) if written_as_list else ("steps", index, "needs")
                problems.append(document.problem(at, f"needs unknown step {need!r}", f"use one of: {step_ids}"))
    cycle = _find_cycle([step for _, step in normalised])
    if cycle:
        # Point at the `needs` entry that closes the loop.
        last, first = cycle[-2], cycle[-1]
        at = next(
            ("steps", index, "needs", n)
            for index, step in normalised
            if step.get("id") == last
            for n, need in enumerate(step["needs"])
            if need == first
        )
        problems.append(
            document.problem(at, "a cycle in needs: " + " -> ".join(cycle), "remove one of these needs")
        )
    steps: list[tuple[int, Step]] = []
    for index, step in normalised:
        try:
            steps.append((index, Step.model_validate(step)))
        except ValidationError as exc:
            problems.extend(pydantic_problems(document, ("steps", index), exc))
            partial = _lenient_step(step, exc)  # so that its action and templates are checked in this pass too
            if partial is None:
                continue
            steps.append((index, partial))
        problems.extend(template_syntax(document, ("steps", index), steps[-1][1]))
    top = _normalise_top(data)
    try:
        runbook: Runbook | None = Runbook(**top, steps=tuple(s for _, s in steps))
    except ValidationError as exc:
        problems.extend(pydantic_problems(document, (), exc))
        # Read the rest leniently so that the steps can still be checked against the inventory.
        wrong = {e["loc"][0] for e in exc.errors() if e["loc"]}
        lenient = {k: v for k, v in top.items() if k not in wrong}
        lenient.setdefault("name", document.path)
        try:
            runbook = Runbook(**lenient, steps=tuple(s for _, s in steps))
        except ValidationError:
            runbook = None
    return ParsedRunbook(runbook, steps, problems)


def _lenient_step(step: dict[str, Any], error: ValidationError) -> Step | None:
    """The step without the fields that are wrong (reported), when its id and action are right."""
    wrong = {item["loc"][0] for item in error.errors() if item["loc"]}
    if wrong & {"id", "action"} or any(not item["loc"] for item in error.errors()):
        return None
    try:
        return Step.model_validate({k: v for k, v in step.items() if k not in wrong})
    except ValidationError:
        return None


def _normalise_top(data: dict[str, Any]) -> dict[str, Any]:
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


def _normalise_step(
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


def _find_cycle(steps: list[dict[str, Any]]) -> list[str] | None:
    graph: dict[str, list[str]] = {}
    for step in steps:  # a duplicated id (reported apart) contributes the needs of both steps
        if isinstance(step.get("id"), str):
            graph.setdefault(step["id"], []).extend(step.get("needs", ()))
    state: dict[str, int] = {}  # 1 = on the current path, 2 = done
    for root in graph:  # depth first, iteratively: a chain of 20,000 steps must not hit the recursion limit
        if root in state:
            continue
        state[root] = 1
        path, branches = [root], [iter(graph[root])]
        while branches:
            need = next(branches[-1], None)
            if need is None:
                state[path.pop()] = 2
                branches.pop()
            elif need in graph and state.get(need) == 1:
                return path[path.index(need) :] + [need]
            elif need in graph and need not in state:
                state[need] = 1
                path.append(need)
                branches.append(iter(graph[need]))
    return None
