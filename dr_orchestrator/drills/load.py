"""``failover_tests/*.yml`` to a Drill, checked whole: its own fields, its steps against the
inventory and the actions, and the runbooks it names with their parameters. Every problem names
file, line, field and the fix.

Paths inside a drill (inventory, runbooks) are relative to the drill file's directory, so a drill
means the same thing whatever the working directory of the scheduler that runs it.
"""

from __future__ import annotations

import re
from dataclasses import replace
from pathlib import Path
from typing import Any
from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

from pydantic import ValidationError

from dr_orchestrator.actions import default_registry
from dr_orchestrator.actions.base import ActionRegistry
from dr_orchestrator.actions.notify import CHANNELS
from dr_orchestrator.loading import check_runbook, load_inventory, parse_runbook, pydantic_problems
from dr_orchestrator.model.drill import (
    Drill,
    NotifyEvent,
    NotifyTarget,
    RunbookRef,
    ScenarioCategory,
    Schedule,
    ServiceExpectation,
    Steps,
)
from dr_orchestrator.model.durations import parse_duration
from dr_orchestrator.model.inventory import Inventory, Service
from dr_orchestrator.model.runbook import Runbook
from dr_orchestrator.plans import PlanError, build_plan
from dr_orchestrator.yamlsource import LoadError, PathKey, Problem, YamlDocument, dotted, read_yaml

FIELDS = ("name", "description", "scenario", "inventory", "fault", "runbook", "expectations", "restore",
          "failback", "cleanup", "schedule", "pre_approved", "notify")
SERVICE_FIELDS = ("rto", "rpo", "restore_point", "health", "data")
# What steps held in a drill (fault, checks, restore, cleanup) can read: {{ params.drill_run_id }},
# e.g. to write a canary record before the fault and look for it after the failover.
DRILL_PARAMETERS = {"drill_run_id": {"default": "", "description": "the id of the drill run"}}
# What a notification target's settings are checked against (the message is the drill's own).
def load_drill(path: str | Path, *, inventory: str | None = None, registry: ActionRegistry | None = None) -> Drill:
    """Read and check a drill; raise LoadError with every problem found.

    ``inventory`` replaces the drill's own (e.g. a lab started elsewhere writes its own inventory)."""
    registry = registry or default_registry()
    document = read_yaml(path)
    return _DrillReader(document, registry, inventory).read()


def load_drills(directory: str | Path, registry: ActionRegistry | None = None) -> tuple[list[Drill], list[Problem]]:
    """Every ``*.yml`` drill of a directory, by name; problems of the ones that do not load."""
    drills: list[Drill] = []
    problems: list[Problem] = []
    registry = registry or default_registry()
    for file in sorted(Path(directory).glob("*.yml")) + sorted(Path(directory).glob("*.yaml")):
        try:
            drills.append(load_drill(file, registry=registry))
        except LoadError as exc:
            problems.extend(exc.problems)
    names: dict[str, str] = {}
    for drill in drills:
        if drill.name in names:
            problems.append(Problem(drill.path, None, "name", f"drill name {drill.name!r} is also used by "
                                    f"{names[drill.name]}", "give each drill its own name"))
        names.setdefault(drill.name, drill.path)
    return drills, problems


class _DrillReader:
    def __init__(self, document: YamlDocument, registry: ActionRegistry, inventory: str | None) -> None:
        self.document = document
        self.registry = registry
        self.inventory_override = inventory
        self.base = Path(document.path).resolve().parent
        self.problems: list[Problem] = []

    def problem(self, key: PathKey, message: str, fix: str = "") -> None:
        self.problems.append(self.document.problem(key, message, fix))

    def read(self) -> Drill:
        data = self.document.data
        if not isinstance(data, dict):
            raise LoadError([self.document.problem((), "a drill is a mapping with name, scenario, runbook ...",
                                                   "see failover_tests/ for examples")])
        for key in data:
            if key not in FIELDS:
                self.problem((key,), "is not a known field", f"allowed: {', '.join(FIELDS)}")
        name = self.text(data, "name", required=True)
        scenario = self.scenario(data.get("scenario"))
        inventory_path = self.inventory_override or self.path_field(data, ("inventory",), data.get("inventory"))
        inventory = self.inventory(inventory_path)
        fault = self.steps(data, "fault", f"{name}: fault", cleanup=False)
        runbook = self.runbook_ref(data, "runbook", required=True)
        failback = self.runbook_ref(data, "failback", required=False)
        expectations, checks = self.expectations(data.get("expectations"), name, inventory)
        restore = self.steps(data, "restore", f"{name}: restore", cleanup=False)
        cleanup = self.steps(data, "cleanup", f"{name}: cleanup", cleanup=True)
        schedule = self.schedule(data.get("schedule"))
        notify = self.notify(data.get("notify"))
        pre_approved = data.get("pre_approved", False)
        if not isinstance(pre_approved, bool):
            self.problem(("pre_approved",), "must be true or false")
        if inventory is not None:
            for steps in (fault, restore, cleanup, checks):
                if steps is not None:
                    found = check_runbook(steps.runbook, steps.document, inventory, self.registry.params_model,
                                           self.registry.effect)
                    self.problems.extend(steps.as_drill_fields(found))
            for key, ref in (("runbook", runbook), ("failback", failback)):
                if ref is not None:
                    self.check_runbook_file((key,), ref, inventory_path or "")
        if any(problem.is_error for problem in self.problems):  # warnings alone do not stop a drill
            raise LoadError(sorted(self.problems, key=lambda p: (p.file, p.line or 0)))
        assert name is not None and scenario is not None and inventory_path is not None and runbook is not None
        return Drill(
            name=name, description=self.text(data, "description") or "", scenario=scenario,
            inventory=inventory_path, fault=fault.model if fault else None, runbook=runbook,
            expectations=tuple(expectations), checks=checks.model if checks else None,
            restore=restore.model if restore else None, failback=failback,
            cleanup=cleanup.model if cleanup else None, schedule=schedule, pre_approved=bool(pre_approved),
            notify=tuple(notify), path=self.document.path, sha256=self.document.sha256, text=self.document.text,
        )

    # -- fields ---------------------------------------------------------------------------------

    def text(self, data: dict[str, Any], key: str, required: bool = False) -> str | None:
        value = data.get(key)
        if value is None:
            if required:
                self.problem((key,), "is required", f"add `{key}:`")
            return None
        if not isinstance(value, str) or not value.strip():
            self.problem((key,), "must be non-empty text")
            return None
        return value

    def scenario(self, value: Any) -> ScenarioCategory | None:
        choices = ", ".join(c.value for c in ScenarioCategory)
        if value is None:
            self.problem(("scenario",), "is required", f"one of: {choices}")
            return None
        try:
            return ScenarioCategory(value)
        except ValueError:
            self.problem(("scenario",), f"{value!r} is not a scenario category", f"use one of: {choices}")
            return None

    def path_field(self, data: Any, key: PathKey, value: Any) -> str | None:
        if not isinstance(value, str) or not value.strip():
            self.problem(key, "is required: a path relative to the drill's directory", "e.g. ../runbooks/x.yml")
            return None
        resolved = (self.base / value).resolve() if not Path(value).is_absolute() else Path(value)
        if not resolved.is_file():
            self.problem(key, f"{value!r} does not exist (looked for {resolved})",
                         "paths are relative to the drill file's directory")
            return None
        return str(resolved)

    def inventory(self, path: str | None) -> Inventory | None:
        if path is None:
            return None
        try:
            inventory, _ = load_inventory(path)
        except LoadError as exc:
            self.problems.extend(exc.problems)
            return None
        return inventory

    def runbook_ref(self, data: dict[str, Any], key: str, required: bool) -> RunbookRef | None:
        value = data.get(key)
        if value is None:
            if required:
                self.problem((key,), "is required", f"add `{key}: {{path: ../runbooks/NAME.yml}}`")
            return None
        if isinstance(value, str):
            value = {"path": value}
        if not isinstance(value, dict):
            self.problem((key,), "must be a path or {path, parameters}")
            return None
        for extra in set(value) - {"path", "parameters"}:
            self.problem((key, extra), "is not a known field", "allowed: path, parameters")
        path = self.path_field(value, (key, "path"), value.get("path"))
        parameters = value.get("parameters") or {}
        if not isinstance(parameters, dict):
            self.problem((key, "parameters"), "must be a mapping of parameter names to values")
            return None
        return RunbookRef(path=path, parameters=parameters) if path else None

    def check_runbook_file(self, key: PathKey, ref: RunbookRef, inventory_path: str) -> None:
        try:
            build_plan(ref.path, inventory_path, ref.parameters, registry=self.registry)
        except LoadError as exc:
            for problem in exc.problems:  # the runbook file's own problems, then where the drill names it
                self.problems.append(problem)
            self.problem(key, f"runbook {ref.path} does not check out against the inventory (see above)")
        except PlanError as exc:
            self.problem(key, str(exc))

    def steps(self, data: dict[str, Any], key: str, name: str, cleanup: bool) -> _EmbeddedSteps | None:
        value = data.get(key)
        if value is None or value == "none":
            return None
        description = ""
        prefix: PathKey = (key,)
        if isinstance(value, dict):
            for extra in set(value) - {"description", "steps"}:
                self.problem((key, extra), "is not a known field", "allowed: description, steps")
            description = str(value.get("description") or "")
            value, prefix = value.get("steps"), (key, "steps")
        if not isinstance(value, list) or not value:
            self.problem(prefix, "must be a non-empty list of steps (or `none`)")
            return None
        items = []
        for index, raw in enumerate(value):
            if isinstance(raw, dict) and cleanup:
                raw = {"on_failure": "continue", **raw}  # every cleanup step is tried
            items.append((prefix + (index,), raw))
        return self.embedded(name, description, items)

    def embedded(self, name: str, description: str, items: list[tuple[PathKey, Any]]) -> _EmbeddedSteps | None:
        document = steps_document(self.document, name, items)
        try:
            runbook = parse_runbook(document)
        except LoadError as exc:
            self.problems.extend(_as_drill_fields(exc.problems, items))
            return None
        return _EmbeddedSteps(Steps(description=description, runbook=runbook), document, items)

    def expectations(self, value: Any, name: str | None, inventory: Inventory | None
                     ) -> tuple[list[ServiceExpectation], _EmbeddedSteps | None]:
        if value is None:
            return [], None
        if not isinstance(value, dict):
            self.problem(("expectations",), "must map service names to {rto, rpo, health, data}")
            return [], None
        found: list[ServiceExpectation] = []
        checks: list[tuple[PathKey, Any]] = []
        for service, spec in value.items():
            key: PathKey = ("expectations", service)
            if inventory is not None and service not in inventory.services:
                self.problem(key, f"service {service!r} is not in inventory {inventory.name!r}",
                             f"use one of: {', '.join(inventory.services)}")
            if not isinstance(spec, dict):
                self.problem(key, "must be a mapping with rto, rpo, health and data")
                continue
            for extra in set(spec) - set(SERVICE_FIELDS):
                self.problem(key + (extra,), "is not a known field", f"allowed: {', '.join(SERVICE_FIELDS)}")
            targets: dict[str, float | None] = {}
            for target in ("rto", "rpo", "restore_point"):
                targets[target] = None
                if spec.get(target) is not None:
                    try:
                        targets[target] = parse_duration(spec[target])
                    except ValueError as exc:
                        self.problem(key + (target,), str(exc))
            if inventory is not None and service in inventory.services:
                self.no_looser_than_inventory(key, inventory, inventory.services[service], targets)
            ids: dict[str, list[str]] = {"health": [], "data": []}
            for kind in ("health", "data"):
                entries = spec.get(kind) or []
                if not isinstance(entries, list):
                    self.problem(key + (kind,), "must be a list of check steps (action, with)")
                    continue
                for index, raw in enumerate(entries):
                    if not isinstance(raw, dict):
                        self.problem(key + (kind, index), "a check is a step: a mapping with action and with")
                        continue
                    step_id = str(raw.get("id") or f"{service}-{kind}-{index + 1}")
                    ids[kind].append(step_id)
                    # Checks are independent: all run at once and each is judged on its own.
                    checks.append((key + (kind, index), {"needs": [], "on_failure": "continue", "service": service,
                                                         **raw, "id": step_id}))
            found.append(ServiceExpectation(service=service, rto=targets["rto"], rpo=targets["rpo"],
                                            restore_point=targets["restore_point"],
                                            health=tuple(ids["health"]), data=tuple(ids["data"])))
        embedded = self.embedded(f"{name}: checks", "expectation checks", checks) if checks else None
        return found, embedded

    def no_looser_than_inventory(self, key: PathKey, inventory: Inventory, service: Service,
                                 targets: dict[str, float | None]) -> None:
        """The inventory's targets are the service's: a drill may expect better, never worse."""
        for target in ("rto", "rpo"):
            expected, fixed = targets[target], getattr(service, target)
            if expected is not None and expected > fixed:
                self.problem(key + (target,),
                             f"expects {target.upper()} {expected:g} s, looser than the target of {fixed:g} s "
                             f"that inventory {inventory.name!r} sets for {service.name!r}",
                             f"expect at most {fixed:g}s, or drop `{target}` (the target applies); "
                             "a point-in-time restore states `restore_point`")

    def schedule(self, value: Any) -> Schedule | None:
        if value is None:
            return None
        if not isinstance(value, dict):
            self.problem(("schedule",), "must be {cron: '0 2 1 1,4,7,10 *', timezone: Asia/Shanghai}")
            return None
        try:
            schedule = Schedule.model_validate(value)
        except ValidationError as exc:
            self.problems.extend(pydantic_problems(self.document, ("schedule",), exc))
            return None
        try:
            ZoneInfo(schedule.timezone)
        except (ZoneInfoNotFoundError, ValueError):
            self.problem(("schedule", "timezone"), f"{schedule.timezone!r} is not a time zone",
                         "use an IANA name such as Asia/Shanghai, Europe/London or UTC")
            return None
        from dr_orchestrator.scheduling.triggers import wall_cron

        try:
            wall_cron(schedule.cron)
        except ValueError as exc:
            self.problem(("schedule", "cron"), f"{schedule.cron!r} is not a cron expression: {exc}",
                         "five fields: minute hour day month weekday, e.g. '0 2 1 1,4,7,10 *'")
            return None
        return schedule

    def notify(self, value: Any) -> list[NotifyTarget]:
        if value is None:
            return []
        if not isinstance(value, list):
            self.problem(("notify",), "must be a list of targets, e.g. - webhook: {url: env:DR_CHAT_WEBHOOK}")
            return []
        targets = []
        for index, raw in enumerate(value):
            key: PathKey = ("notify", index)
            channels = [c for c in ("webhook", "email", "apprise") if isinstance(raw, dict) and c in raw]
            if len(channels) != 1:
                self.problem(key, "a target names exactly one of webhook, email or apprise",
                             "e.g. - apprise: {urls: [env:DR_DINGTALK_URL]}")
                continue
            channel = channels[0]
            for extra in set(raw) - {channel, "events"}:
                fix = "YAML reads `on:` as true: say `events:`" if extra == "True" else f"allowed: {channel}, events"
                self.problem(key + (extra,), "is not a known field", fix)
            settings = raw[channel]
            if not isinstance(settings, dict):
                self.problem(key + (channel,), "must be a mapping of the action's parameters")
                continue
            model = self.registry.params_model(f"notify.{channel}")
            if model is not None:
                try:
                    model.model_validate({**CHANNELS[channel].placeholder, **settings})
                except ValidationError as exc:
                    self.problems.extend(pydantic_problems(self.document, key + (channel,), exc))
                    continue
            events = raw.get("events", [e.value for e in NotifyEvent])
            choices = ", ".join(e.value for e in NotifyEvent)
            try:
                chosen = tuple(NotifyEvent(e) for e in (events if isinstance(events, list) else [events]))
            except ValueError:
                self.problem(key + ("events",), f"{events!r} names an unknown event", f"use some of: {choices}")
                continue
            targets.append(NotifyTarget(channel=channel, settings=settings, events=chosen))
        return targets


class _EmbeddedSteps:
    """Steps read from the drill file, with the document that maps them to its lines."""

    def __init__(self, model: Steps, document: YamlDocument, items: list[tuple[PathKey, Any]]) -> None:
        self.model = model
        self.document = document
        self.items = items

    @property
    def runbook(self) -> Runbook:
        return self.model.runbook

    def as_drill_fields(self, problems: list[Problem]) -> list[Problem]:
        return _as_drill_fields(problems, self.items)


def _as_drill_fields(problems: list[Problem], items: list[tuple[PathKey, Any]]) -> list[Problem]:
    """``steps[2].with.url`` as the drill file has it, e.g. ``expectations.trading.health[0].with.url``."""
    renamed = []
    for problem in problems:
        match = re.match(r"^steps\[(\d+)\]", problem.field)
        if match and int(match.group(1)) < len(items):
            problem = replace(problem, field=dotted(items[int(match.group(1))][0]) + problem.field[match.end():])
        renamed.append(problem)
    return renamed


def steps_document(document: YamlDocument, name: str, items: list[tuple[PathKey, Any]]) -> YamlDocument:
    """A runbook document made of steps found at ``items`` keys of ``document``: its line map points
    into the drill file, so problems with the steps name the drill's lines and fields."""
    sub = YamlDocument(document.path, document.text, {"name": name, "kind": "rehearsal",
                                                      "parameters": DRILL_PARAMETERS,
                                                      "steps": [raw for _, raw in items]})
    first = items[0][0] if items else ()
    sub.lines[()] = document.line(first) or 1
    sub.lines[("steps",)] = document.line(first) or 1
    for index, (prefix, _) in enumerate(items):
        for key, line in document.lines.items():
            if key[: len(prefix)] == prefix:
                sub.lines[("steps", index) + key[len(prefix):]] = line
    return sub
