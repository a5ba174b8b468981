"""The passes that read a runbook, in order, each a function of the reading so far that returns the
problems it finds (and fills in what it read): every pass runs, so one pass reports every problem. A
new check is a function added to ``PASSES`` where what it reads has been read."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from pydantic import ValidationError

from dr_orchestrator.loading.problems import listed, pydantic_problems
from dr_orchestrator.loading.shorthands import normalise_step, normalise_top
from dr_orchestrator.loading.templates import template_syntax
from dr_orchestrator.model.runbook import Runbook, Step
from dr_orchestrator.yamlsource import PathKey, Problem, YamlDocument


@dataclass
class Reading:
    """A runbook as far as the passes have read it."""

    document: YamlDocument
    data: dict[str, Any]  # the file's top-level mapping
    raw_steps: list[Any] = field(default_factory=list)  # `steps` as written (empty when not a list)
    normalised: list[tuple[int, dict[str, Any]]] = field(default_factory=list)  # the mappings, shorthands expanded
    ids: dict[str, int] = field(default_factory=dict)  # each step id -> the index of its first step
    steps: list[tuple[int, Step]] = field(default_factory=list)  # the well-formed steps (or leniently read)
    runbook: Runbook | None = None  # None when even a lenient reading of its top-level fields fails


Pass = Callable[[Reading], list[Problem]]


def steps_listed(reading: Reading) -> list[Problem]:
    """``steps`` is a non-empty list."""
    raw_steps = reading.data.get("steps")
    if not isinstance(raw_steps, list) or not raw_steps:
        return [reading.document.problem(("steps",), "must be a non-empty list of steps")]
    reading.raw_steps = raw_steps
    return []


def steps_mapped(reading: Reading) -> list[Problem]:
    """Each step is a mapping (read with its shorthands) and its id is its own."""
    document, problems = reading.document, []
    previous: str | None = None
    for index, raw in enumerate(reading.raw_steps):
        key: PathKey = ("steps", index)
        if not isinstance(raw, dict):
            problems.append(document.problem(key, "a step is a mapping with id and action"))
            continue
        step = normalise_step(document, key, raw, previous, problems)
        step_id = step.get("id")
        if isinstance(step_id, str):
            if step_id in reading.ids:
                problems.append(document.problem(
                    key + ("id",), f"step id {step_id!r} is used twice (first at step {reading.ids[step_id] + 1})",
                    "give each step its own id"))
            else:
                reading.ids[step_id] = index
            previous = step_id
        reading.normalised.append((index, step))
    return problems


def needs_known(reading: Reading) -> list[Problem]:
    """Each need names a step of the runbook."""
    problems = []
    step_ids = listed(list(reading.ids))
    for index, step in reading.normalised:
        written_as_list = isinstance(reading.raw_steps[index].get("needs"), list)
        for n, need in enumerate(step.get("needs", ())):
            if need not in reading.ids:
                at: PathKey = ("steps", index, "needs", n) if written_as_list else ("steps", index, "needs")
                problems.append(reading.document.problem(at, f"needs unknown step {need!r}",
                                                         f"use one of: {step_ids}"))
    return problems


def needs_acyclic(reading: Reading) -> list[Problem]:
    """No step needs itself, directly or not; the problem points at the need that closes the loop."""
    cycle = _find_cycle([step for _, step in reading.normalised])
    if not cycle:
        return []
    last, first = cycle[-2], cycle[-1]
    at = next(("steps", index, "needs", n) for index, step in reading.normalised if step.get("id") == last
              for n, need in enumerate(step["needs"]) if need == first)
    return [reading.document.problem(at, "a cycle in needs: " + " -> ".join(cycle), "remove one of these needs")]


def steps_typed(reading: Reading) -> list[Problem]:
    """Each step against the ``Step`` model (a wrong one read without its wrong fields, so that its action
    and templates are checked in this pass too), and its templates' syntax."""
    problems = []
    for index, step in reading.normalised:
        try:
            reading.steps.append((index, Step.model_validate(step)))
        except ValidationError as exc:
            problems.extend(pydantic_problems(reading.document, ("steps", index), exc))
            partial = _lenient_step(step, exc)
            if partial is None:
                continue
            reading.steps.append((index, partial))
        problems.extend(template_syntax(reading.document, ("steps", index), reading.steps[-1][1]))
    return problems


def runbook_typed(reading: Reading) -> list[Problem]:
    """The top-level fields against the ``Runbook`` model; wrong ones are left out of a lenient reading
    so that the steps can still be checked against the inventory."""
    top = normalise_top(reading.data)
    steps = tuple(step for _, step in reading.steps)
    try:
        reading.runbook = Runbook(**top, steps=steps)
        return []
    except ValidationError as exc:
        wrong = {e["loc"][0] for e in exc.errors() if e["loc"]}
        lenient = {k: v for k, v in top.items() if k not in wrong}
        lenient.setdefault("name", reading.document.path)
        try:
            reading.runbook = Runbook(**lenient, steps=steps)
        except ValidationError:
            reading.runbook = None
        return pydantic_problems(reading.document, (), exc)


PASSES: list[Pass] = [steps_listed, steps_mapped, needs_known, needs_acyclic, steps_typed, runbook_typed]


def _lenient_step(step: dict[str, Any], error: ValidationError) -> Step | None:
    """The step without the fields that are wrong (reported), when its id and action are right."""
    wrong = {item["loc"][0] for item in error.errors() if item["loc"]}
    if wrong & {"id", "action"} or any(not item["loc"] for item in error.errors()):
        return None
    try:
        return Step.model_validate({k: v for k, v in step.items() if k not in wrong})
    except ValidationError:
        return None


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
