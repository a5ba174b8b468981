"""The templates of a runbook's steps: where they are, their syntax, and the names and steps they read."""

from __future__ import annotations

from collections.abc import Container
from dataclasses import dataclass
from typing import Any

from dr_orchestrator import templating
from dr_orchestrator.loading.problems import listed
from dr_orchestrator.model.inventory import Inventory
from dr_orchestrator.model.runbook import Runbook, Step
from dr_orchestrator.yamlsource import PathKey, Problem, YamlDocument


def template_syntax(document: YamlDocument, key: PathKey, step: Step) -> list[Problem]:
    problems = []
    for tkey, source in step_templates(key, step):
        try:
            templating.references(source)
        except templating.TemplateForbidden as exc:
            problems.append(document.problem(tkey, str(exc), "read parameters, inventory values and step outputs"))
        except templating.TemplateError as exc:
            problems.append(document.problem(tkey, str(exc), "see the Jinja2 syntax: {{ params.name }}"))
    return problems


def steps_read(steps: list[tuple[int, Step]]) -> set[str]:
    """The steps some template reads that its own step does not need directly."""
    read: set[str] = set()
    for index, step in steps:
        for _, source in step_templates(("steps", index), step):
            try:
                refs = templating.references(source)
            except templating.TemplateError:
                continue
            read.update(attr for name, attr in refs if name == "steps" and attr is not None and attr not in step.needs)
    return read


class Ancestry:
    """Whether a step needs another, directly or not (so the other has ended before it starts). Each
    step keeps, as the bits of an int, which of the steps templates read beyond their direct needs
    (``asked``) it waits for: a chain of 20,000 steps costs a few bits each, not a set of every
    step before it (quadratic time and memory)."""

    def __init__(self, runbook: Runbook, asked: set[str]) -> None:
        self.direct: dict[str, set[str]] = {}
        for step in runbook.steps:  # a duplicated id (reported apart) needs what both steps need
            self.direct.setdefault(step.id, set()).update(step.needs)
        self.bit = {step_id: 1 << i for i, step_id in enumerate(sorted(asked & self.direct.keys()))}
        self.waits: dict[str, int] = {}
        for step_id in runbook.in_need_order():
            mask = 0
            for need in self.direct[step_id]:  # a need in a cycle (reported apart) may not be done: nothing
                mask |= self.waits.get(need, 0) | self.bit.get(need, 0)
            self.waits[step_id] = mask

    def needs(self, step_id: str, other: str) -> bool:
        return other in self.direct.get(step_id, ()) or bool(self.waits.get(step_id, 0) & self.bit.get(other, 0))


@dataclass(frozen=True)
class Readable:
    """The steps a template of ``step_id`` may read: those it needs, and itself for its rollback (which
    runs after it)."""

    ancestry: Ancestry
    step_id: str
    rollback: bool

    def __contains__(self, other: object) -> bool:
        return isinstance(other, str) and (
            (self.rollback and other == self.step_id) or self.ancestry.needs(self.step_id, other))


def walk_templates(value: Any, at: PathKey) -> list[tuple[PathKey, str]]:
    """Every template string inside ``value`` (dicts and lists walked), with where it is."""
    if isinstance(value, str):
        return [(at, value)] if templating.is_template(value) else []
    if isinstance(value, dict):
        return [found for k, v in value.items() for found in walk_templates(v, at + (k,))]
    if isinstance(value, list):
        return [found for i, v in enumerate(value) for found in walk_templates(v, at + (i,))]
    return []


def step_templates(key: PathKey, step: Any) -> list[tuple[PathKey, str]]:
    found = walk_templates(step.with_, key + ("with",))
    if step.rollback is not None:
        found += walk_templates(step.rollback.with_, key + ("rollback", "with"))
    if step.when:
        found.append((key + ("when",), step.when))
    for name in ("site",):
        value = getattr(step, name)
        if isinstance(value, str) and templating.is_template(value):
            found.append((key + (name,), value))
    return found


def has_template(value: Any) -> bool:
    if isinstance(value, str):
        return templating.is_template(value)
    if isinstance(value, dict):
        return any(has_template(v) for v in value.values())
    if isinstance(value, list):
        return any(has_template(v) for v in value)
    return False


class TemplateNames:
    """What templates may read: each context name with the keys it has (None: any), built once per
    runbook, not per template."""

    def __init__(self, runbook: Runbook, inventory: Inventory) -> None:
        self.known: dict[str, set[str] | None] = {
            "params": set(runbook.parameters),
            "vars": set(inventory.vars),
            "services": set(inventory.services),
            "sites": set(inventory.sites),
            "hosts": set(inventory.hosts),
            "steps": {s.id for s in runbook.steps},
            "inventory": None,
            "run": set(templating.RUN_KEYS),
            "service": None,
            "site": None,
        }
        self._listed: dict[str, str] = {}

    def listed(self, name: str) -> str:
        """The keys of ``name``, sorted, as a fix offers them (built once, however many problems)."""
        if name not in self._listed:
            self._listed[name] = listed(sorted(self.known[name] or ()))
        return self._listed[name]


def check_template(
    document: YamlDocument, key: PathKey, source: str, names: TemplateNames, readable: Container[str]
) -> list[Problem]:
    """Names a template reads must exist; steps it reads must be ones this step needs (so they have run)."""
    try:
        refs = templating.references(source)
    except templating.TemplateError:
        return []  # reading the runbook reported the syntax error
    problems = []
    known_by_name = names.known
    for name, attr in refs:
        if name not in known_by_name:
            if name in templating.environment().globals:
                continue
            problems.append(
                document.problem(
                    key,
                    f"template uses undefined variable {name!r}",
                    f"use one of: {', '.join(templating.CONTEXT_NAMES)}",
                )
            )
            continue
        known = known_by_name[name]
        if attr is not None and known is not None and attr not in known:
            what = {"params": "parameter", "steps": "step", "vars": "inventory variable"}.get(name, name[:-1])
            problems.append(
                document.problem(
                    key,
                    f"template uses undefined {what} {name}.{attr}",
                    f"declare it or use one of: {names.listed(name)}",
                )
            )
        elif name == "steps" and attr is not None and attr not in readable:
            problems.append(
                document.problem(
                    key,
                    f"template reads steps.{attr}, but this step does not need {attr!r}, so it may not have run yet",
                    f"add {attr} to this step's needs",
                )
            )
    return problems
