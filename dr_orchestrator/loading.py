"""YAML files to typed model objects. Every problem names file, line, field and the fix.

Inventories are Ansible YAML inventories: groups named like sites hold their hosts, and the DR
fields (sites, services, targets, free variables) live under ``all.vars.dr``.
"""

from __future__ import annotations

import dataclasses
import difflib
import itertools
from collections.abc import Callable, Container, Iterator, Mapping
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

from pydantic import AliasChoices, BaseModel, ValidationError
from pydantic.fields import FieldInfo

from dr_orchestrator import templating
from dr_orchestrator.model.cluster import NodeConfig
from dr_orchestrator.model.durations import parse_duration
from dr_orchestrator.model.inventory import CAPABILITY_ELEMENTS, Capability, Host, Inventory, Service, Site
from dr_orchestrator.model.runbook import Effect, OnFailure, Runbook, Step
from dr_orchestrator.model.safety import SafetyPolicy
from dr_orchestrator.model.watch import PLACEHOLDER, RunbookMapping, WatchSettings, settings_of
from dr_orchestrator.yamlsource import LoadError, PathKey, Problem, YamlDocument, read_yaml

ParamsLookup = Callable[[str], type[BaseModel] | None]
EffectLookup = Callable[[str], Effect | None]  # an action's declared effect; None for an unknown action

_HOST_KEYS = {
    "ansible_host": "address",
    "ansible_port": "port",
    "ansible_user": "user",
    "ansible_ssh_private_key_file": "key_file",
    "dr_known_hosts": "known_hosts",
    "dr_roles": "roles",
}


def pydantic_problems(document: YamlDocument, base: PathKey, error: ValidationError,
                      skip: Callable[[Any], bool] = lambda item: False) -> list[Problem]:
    """One problem per error pydantic found, but those ``skip`` says are reported otherwise."""
    problems = []
    for item in error.errors():
        if skip(item):
            continue
        key = base + tuple(p for p in item["loc"] if isinstance(p, (str, int)))
        key = tuple("with" if p == "with_" else p for p in key)
        # Our own checks' sentences without pydantic's "Value error, " before them.
        message = str(item["ctx"]["error"]) if item["type"] == "value_error" and "error" in item.get("ctx", {}) \
            else item["msg"]
        fix = ""
        if item["type"] == "missing":
            message, fix = "is required", "add it"
        elif item["type"] == "extra_forbidden":
            message, fix = "is not a known field", "remove it or check its spelling"
        problems.append(document.problem(key, message, fix))
    return problems


# ---------------------------------------------------------------- inventory


def load_inventory(path: str, text: str | None = None) -> tuple[Inventory, YamlDocument]:
    document = read_yaml(path, text)
    problems: list[Problem] = []
    data = document.data
    if not isinstance(data, dict) or not isinstance(data.get("all"), dict):
        raise LoadError(
            [
                document.problem(
                    (),
                    "an inventory starts with `all:` (an Ansible YAML inventory)",
                    "see inventories/lab.yml for the shape",
                )
            ]
        )
    all_group = data["all"]
    all_vars = all_group.get("vars") or {}
    dr = all_vars.get("dr") if isinstance(all_vars, dict) else None
    if not isinstance(dr, dict):
        raise LoadError(
            [
                document.problem(
                    ("all", "vars"),
                    "`all.vars.dr` is missing: it holds sites and services",
                    "add dr: {name, sites, services}",
                )
            ]
        )
    base: PathKey = ("all", "vars", "dr")
    sites: dict[str, Site] = {}
    declared_sites = _mapping(document, base + ("sites",), dr.get("sites"), problems)
    for name, spec in declared_sites.items():
        if spec is not None and not isinstance(spec, dict):
            problems.append(
                document.problem(base + ("sites", name), "must be a mapping", "e.g. {description: ..., region: ...}")
            )
            continue
        if spec and "name" in spec:
            problems.append(document.problem(base + ("sites", name, "name"), "is not a known field",
                                             "a site's name is its key; remove it"))
            continue
        try:
            sites[name] = Site.model_validate({**(spec or {}), "name": name})
        except ValidationError as exc:
            problems.extend(pydantic_problems(document, base + ("sites", name), exc))
    services: dict[str, Service] = {}
    for name, spec in _mapping(document, base + ("services",), dr.get("services"), problems).items():
        key = base + ("services", name)
        if not isinstance(spec, dict):
            problems.append(document.problem(key, "must be a mapping with rto, rpo and sites"))
            continue
        fields = dict(spec)
        if "name" in fields:
            problems.append(document.problem(key + ("name",), "is not a known field",
                                             "a service's name is its key; remove it"))
            continue
        durations_ok = True
        for target in ("rto", "rpo"):
            if target in fields:
                try:
                    fields[target] = parse_duration(fields[target])
                except ValueError as exc:
                    problems.append(document.problem(key + (target,), str(exc)))
                    durations_ok = False
        served_by = fields.get("sites")
        for index, site in enumerate(served_by if isinstance(served_by, list) else []):
            if isinstance(site, str) and site not in declared_sites:
                problems.append(
                    document.problem(
                        key + ("sites", index),
                        f"site {site!r} is not in dr.sites",
                        f"use one of: {', '.join(declared_sites) or 'none defined'}",
                    )
                )
        if not durations_ok:
            continue
        try:
            service = Service(name=name, **fields)
        except ValidationError as exc:
            problems.extend(pydantic_problems(document, key, exc))
            continue
        services[name] = service
    hosts = _inventory_hosts(document, all_group, all_vars, sites, problems)
    named: list[tuple[PathKey, Any, int]] = [(base + ("name",), dr.get("name"), MAX_NAME)]
    named += [(base + ("sites", name), name, MAX_NAME) for name in declared_sites]
    for name, spec in (dr.get("services") or {}).items() if isinstance(dr.get("services"), dict) else ():
        named.append((base + ("services", name), name, MAX_NAME))
        if isinstance(spec, dict):
            named += [(base + ("services", name, f), spec.get(f), MAX_LABEL) for f in ("tier", "criticality")]
    named += [(("all", "children", host.site, "hosts", host.name), host.name, MAX_NAME) for host in hosts.values()]
    problems.extend(_too_long(document, named))
    extra = set(dr) - {"name", "sites", "services", "vars", "safety", "capability", "watch"}
    for name in sorted(extra):
        problems.append(document.problem(base + (name,), "is not a known field",
                                         "allowed: name, sites, services, vars, safety, capability, watch"))
    capability = _capability(document, base + ("capability",), dr.get("capability"), problems)
    for name in ("vars", "safety", "watch"):
        if dr.get(name) is not None and not isinstance(dr[name], dict):
            problems.append(document.problem(base + (name,), "must be a mapping of names to values"))
    if isinstance(dr.get("safety"), dict):
        problems.extend(_safety_problems(document, base + ("safety",), dr["safety"], declared_sites, services))
    if isinstance(dr.get("watch"), dict):
        problems.extend(_watch_problems(document, base + ("watch",), dr["watch"], declared_sites, services))
    if problems:
        raise LoadError(problems)
    inventory = Inventory(
        name=str(dr.get("name") or path),
        sites=sites,
        hosts=hosts,
        services=services,
        vars=dr.get("vars") or {},
        safety=dr.get("safety") or {},
        watch=dr.get("watch") or {},
        capability=capability,
    )
    return inventory, document


def _capability(document: YamlDocument, key: PathKey, value: Any, problems: list[Problem]) -> Capability | None:
    """``dr.capability``: GB/T 20988's elements, each the level (1-6) it meets, for every service."""
    if value is None:
        return None
    if not isinstance(value, dict):
        problems.append(document.problem(key, "must map capability elements to levels 1-6",
                                         f"e.g. {{{CAPABILITY_ELEMENTS[0]}: 5, {CAPABILITY_ELEMENTS[2]}: 4}}"))
        return None
    try:
        return Capability.model_validate(value)
    except ValidationError as exc:
        problems.extend(pydantic_problems(document, key, exc))
        return None


# The evidence database keeps names (runbook, step, action, service, site, host, mark) in 200
# characters and a service's tier and criticality in 50: longer ones would be lost mid-run.
MAX_NAME = 200
MAX_LABEL = 50


def _too_long(document: YamlDocument, named: list[tuple[PathKey, Any, int]]) -> list[Problem]:
    return [document.problem(key, f"is {len(value)} characters long; the limit is {limit}", "shorten it")
            for key, value, limit in named if isinstance(value, str) and len(value) > limit]


def _safety_problems(document: YamlDocument, key: PathKey, safety: dict[str, Any], sites: dict[str, Any],
                     services: dict[str, Service]) -> list[Problem]:
    try:
        policy = SafetyPolicy.model_validate(safety)
    except ValidationError as exc:
        return pydantic_problems(document, key, exc)
    problems = []
    for site, checks in policy.readiness.items():
        if site not in sites:
            problems.append(document.problem(key + ("readiness", site), f"site {site!r} is not in dr.sites",
                                             f"use one of: {', '.join(sites)}"))
        for index, check in enumerate(checks):
            if check.service is not None and check.service not in services:
                problems.append(document.problem(key + ("readiness", site, index, "service"),
                                                 f"service {check.service!r} is not in dr.services",
                                                 f"use one of: {', '.join(services)}"))
    return problems


def _watch_problems(document: YamlDocument, key: PathKey, watch: dict[str, Any], sites: dict[str, Any],
                    services: dict[str, Service]) -> list[Problem]:
    """``dr.watch``: its shape (pydantic), then every name it uses, read from the raw mapping so that
    both kinds of mistake are reported in one pass. Runbook files are checked by
    ``watch_runbook_problems`` (a copied inventory may be checked without them)."""
    try:
        WatchSettings.model_validate(watch)
        problems: list[Problem] = []
    except ValidationError as exc:
        problems = pydantic_problems(document, key, exc)

    def entries(*path: str) -> list[tuple[str, Any]]:
        value: Any = watch
        for part in path:
            value = value.get(part) if isinstance(value, dict) else None
        return list(value.items()) if isinstance(value, dict) else []

    def listed(value: Any) -> list[tuple[int, Any]]:
        return list(enumerate(value)) if isinstance(value, list) else []

    def known(kind: str, name: Any, names: Any, at: PathKey, where: str | None = None) -> None:
        if isinstance(name, str) and name not in names:
            problems.append(_not_known(document, at, kind, name, names, where))

    levels = dict(entries("levels")) if isinstance(watch.get("levels"), dict) else dict(WatchSettings().levels)
    tiers = sorted({service.tier for service in services.values()})
    for level, rule in entries("levels"):
        at = key + ("levels", level)
        for index, tier in listed(rule.get("tiers") if isinstance(rule, dict) else None):
            known("tier", tier, tiers, at + ("tiers", index), "the tiers of dr.services")
        for index, service in listed(rule.get("services") if isinstance(rule, dict) else None):
            known("service", service, services, at + ("services", index))
    for level, _ in entries("policies", "default"):
        known("level", level, levels, key + ("policies", "default", level), "dr.watch.levels")
    for kind, names in (("service", services), ("site", sites)):
        for name, by_level in entries("policies", kind + "s"):
            at = key + ("policies", kind + "s", name)
            known(kind, name, names, at)
            for level in by_level if isinstance(by_level, dict) else ():
                known("level", level, levels, at + (level,), "dr.watch.levels")
    mapped: list[tuple[tuple[str, ...], Any, set[str]]] = [(("runbooks", "site"), dict(entries("runbooks")).get("site"),
                                                             {"site"})]
    for name, mapping in entries("runbooks", "services"):
        known("service", name, services, key + ("runbooks", "services", name))
        mapped.append((("runbooks", "services", name), mapping, {"site", "service"}))
    for at, mapping, allowed in mapped:
        for parameter, value in entries(*at, "parameters") if isinstance(mapping, dict) else ():
            for placeholder in PLACEHOLDER.findall(value) if isinstance(value, str) else ():
                if placeholder not in allowed:
                    problems.append(document.problem(
                        key + (*at, "parameters", parameter), f"{{{placeholder}}} is not a placeholder here",
                        f"use {' or '.join(f'{{{name}}}' for name in sorted(allowed))}"))
    for index, window in listed(watch.get("maintenance")):
        for kind, names in (("service", services), ("site", sites)):
            for position, name in listed(window.get(kind + "s") if isinstance(window, dict) else None):
                known(kind, name, names, key + ("maintenance", index, kind + "s", position))
    for index, silence in listed(watch.get("silences")):
        target = silence.get("target") if isinstance(silence, dict) else None
        kind, _, name = target.partition(":") if isinstance(target, str) else ("", "", "")
        if kind in ("service", "site") and name:
            known(kind, name, services if kind == "service" else sites, key + ("silences", index, "target"))
    return _by_line(problems)


def watch_runbook_problems(inventory: Inventory, document: YamlDocument) -> list[Problem]:
    """Each runbook ``dr.watch`` maps must exist (relative to the inventory file's directory): what
    ``dr watch`` checks before it starts. Not part of loading: a copy of an inventory without its
    runbooks beside it is still a valid inventory for everything else."""
    base = Path(document.path).parent
    runbooks = settings_of(inventory).runbooks
    mapped: list[tuple[tuple[str, ...], RunbookMapping]] = [(("runbooks", "services", name), mapping)
                                                            for name, mapping in runbooks.services.items()]
    if runbooks.site:
        mapped.insert(0, (("runbooks", "site"), runbooks.site))
    return [document.problem(("all", "vars", "dr", "watch", *at, "path"), f"{mapping.path} does not exist "
                             f"(as {base / mapping.path})", "paths are relative to the inventory file")
            for at, mapping in mapped if not (base / mapping.path).is_file()]


def _inventory_hosts(
    document: YamlDocument,
    all_group: dict[str, Any],
    all_vars: dict[str, Any],
    sites: dict[str, Site],
    problems: list[Problem],
) -> dict[str, Host]:
    inherited = {k: v for k, v in all_vars.items() if k != "dr"}
    hosts: dict[str, Host] = {}
    children = all_group.get("children") or {}
    if not isinstance(children, dict):
        problems.append(document.problem(("all", "children"), "must be a mapping of groups"))
        return hosts
    for group, spec in children.items():
        if group not in sites:
            continue  # other Ansible groups are Ansible's business
        group_key: PathKey = ("all", "children", group)
        spec = spec or {}
        if not isinstance(spec, dict):
            problems.append(document.problem(group_key, "a group is a mapping with hosts (and optional vars)"))
            continue
        group_vars = spec.get("vars") or {}
        group_hosts = spec.get("hosts") or {}
        if not isinstance(group_vars, dict) or not isinstance(group_hosts, dict):
            problems.append(document.problem(group_key, "a group's hosts and vars must be mappings"))
            continue
        for name, host_vars in group_hosts.items():
            key: PathKey = group_key + ("hosts", name)
            if host_vars is not None and not isinstance(host_vars, dict):
                problems.append(document.problem(key, "a host's value must be a mapping of its variables"))
                continue
            merged = {**inherited, **group_vars, **(host_vars or {})}
            fields: dict[str, Any] = {"name": name, "site": group, "vars": {}}
            for var, value in merged.items():
                if var in _HOST_KEYS:
                    fields[_HOST_KEYS[var]] = value
                else:
                    fields["vars"][var] = value
            fields.setdefault("address", name)
            if name in hosts:
                problems.append(document.problem(key, f"host {name!r} is in two sites", "a host belongs to one site"))
                continue
            try:
                hosts[name] = Host(**fields)
            except ValidationError as exc:
                for problem in pydantic_problems(document, key, exc):  # name the variable as written
                    for var, field_name in _HOST_KEYS.items():
                        if problem.field.endswith("." + field_name):
                            line = document.line(key + (var,))
                            problem = replace(problem, field=problem.field[: -len(field_name)] + var, line=line)
                    problems.append(problem)
    return hosts


def _mapping(document: YamlDocument, key: PathKey, value: Any, problems: list[Problem]) -> dict[str, Any]:
    if isinstance(value, dict) and value:
        return value
    problems.append(document.problem(key, "must be a non-empty mapping"))
    return {}


# ---------------------------------------------------------------- runbook

_STEP_DURATIONS = ("timeout",)
_RETRY_DURATIONS = ("delay", "max_delay")
_MAX_DURATION_S = 31 * 24 * 3600.0


@dataclass
class _ParsedRunbook:
    runbook: Runbook | None  # None when even a lenient reading of its top-level fields fails
    steps: list[tuple[int, Step]]  # the well-formed steps, with their index in the file
    problems: list[Problem]


def load_node_config(path: str, text: str | None = None) -> NodeConfig:
    """A cluster node's configuration file (model/cluster.py); every problem named with its line."""
    document = read_yaml(path, text)
    if not isinstance(document.data, dict):
        raise LoadError([document.problem((), "a node configuration is a mapping (node, site, etcd, journal, ...)",
                                          "see deploy/cluster/node.example.yml")])
    try:
        return NodeConfig.model_validate(document.data)
    except ValidationError as exc:
        raise LoadError(pydantic_problems(document, (), exc)) from None


def load_runbook(path: str, text: str | None = None) -> tuple[Runbook, YamlDocument]:
    """Parse and check a runbook on its own (structure, ids, needs, durations, template syntax)."""
    document = read_yaml(path, text)
    parsed = _parse_runbook(document)
    if parsed.problems or parsed.runbook is None:
        raise LoadError(_by_line(parsed.problems))
    return parsed.runbook, document


def parse_runbook(document: YamlDocument) -> Runbook:
    """A runbook from an already read document: one held inside another file (a drill's fault,
    checks and cleanup), whose line map points into that file."""
    parsed = _parse_runbook(document)
    if parsed.problems or parsed.runbook is None:
        raise LoadError(_by_line(parsed.problems))
    return parsed.runbook


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
    parsed = _parse_runbook(document)
    found = list(parsed.problems)
    runbook, inventory = parsed.runbook, checked.inventory
    if inventory is not None and runbook is not None:
        values = None
        if given is not None:
            values, wrong = parameter_values(runbook, document, inventory, given)
            found.extend(wrong)
            checked.parameters = values
        found.extend(_check_steps(runbook, parsed.steps, document, inventory, params_model, values))
    if runbook is not None and effect_of is not None:
        found.extend(change_order_problems(runbook, parsed.steps, document, effect_of))
    problems.extend(_by_line(found))
    if not parsed.problems:
        checked.runbook = runbook
    return checked


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


def _by_line(problems: list[Problem]) -> list[Problem]:
    return sorted(problems, key=lambda p: (p.file, p.line if p.line is not None else 0))


def _parse_runbook(document: YamlDocument) -> _ParsedRunbook:
    """Read as much of a runbook as is well-formed, with every problem found on the way."""
    problems: list[Problem] = []
    data = document.data
    if not isinstance(data, dict):
        return _ParsedRunbook(None, [], [document.problem((), "a runbook is a mapping with name and steps")])
    raw_steps = data.get("steps")
    if not isinstance(raw_steps, list) or not raw_steps:
        problems.append(document.problem(("steps",), "must be a non-empty list of steps"))
        raw_steps = []
    named: list[tuple[PathKey, Any, int]] = [(("name",), data.get("name"), MAX_NAME)]
    for index, raw in enumerate(raw_steps):
        if isinstance(raw, dict):
            named += [(("steps", index, field), raw.get(field), MAX_NAME) for field in ("id", "action", "service")]
            marks = raw.get("marks")
            named += [(("steps", index, "marks", i), mark, MAX_NAME) for i, mark in enumerate(marks)
                      ] if isinstance(marks, list) else [(("steps", index, "marks"), marks, MAX_NAME)]
    problems.extend(_too_long(document, named))
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
    step_ids = _listed(list(ids))
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
        problems.extend(_template_syntax(document, ("steps", index), steps[-1][1]))
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
    return _ParsedRunbook(runbook, steps, problems)


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


def _template_syntax(document: YamlDocument, key: PathKey, step: Step) -> list[Problem]:
    problems = []
    for tkey, source in _templates(key, step):
        try:
            templating.references(source)
        except templating.TemplateForbidden as exc:
            problems.append(document.problem(tkey, str(exc), "read parameters, inventory values and step outputs"))
        except templating.TemplateError as exc:
            problems.append(document.problem(tkey, str(exc), "see the Jinja2 syntax: {{ params.name }}"))
    return problems


# ---------------------------------------------------------------- runbook against inventory and actions


def inventory_reference(model: type[BaseModel] | None, field: str) -> str | None:
    """What an action's parameter names in the inventory: ``host``, ``site``, ``service``, ``backend``
    (of the front door), ``database`` or ``redis`` (an instance); None when it names nothing there.

    Actions declare it on the field: ``Field(json_schema_extra={"refers_to": "host"})``. A site named
    by an action that also names backends (or a database) must be one each of them serves."""
    return _field_extra(model, field).get("refers_to")


def _field_extra(model: type[BaseModel] | None, field: str) -> dict[str, Any]:
    if model is None or field not in model.model_fields:
        return {}
    extra = model.model_fields[field].json_schema_extra
    return extra if isinstance(extra, dict) else {}


class _SitesOf(Mapping[str, tuple[str, ...]]):
    """Inventory entries by name, each read as the sites it has only when asked: built for every
    step, a copy of thousands of hosts made validation quadratic (20,000 steps on 20,000 hosts: 70 s)."""

    def __init__(self, entries: Mapping[str, Any], sites_of: Callable[[str, Any], tuple[str, ...]]) -> None:
        self.entries, self.sites_of = entries, sites_of

    def __getitem__(self, name: str) -> tuple[str, ...]:
        return self.sites_of(name, self.entries[name])

    def __iter__(self) -> Iterator[str]:
        return iter(self.entries)

    def __len__(self) -> int:
        return len(self.entries)


def _referents(inventory: Inventory, kind: str) -> Mapping[str, tuple[str, ...]]:
    """The names of ``kind`` in the inventory, each with the sites it has (a backend, a database, a
    Redis instance: its servers' sites), read the way the actions read them (actions/haproxy.py
    ``front_door``, actions/postgres/base.py and actions/redis.py ``resolve``)."""
    if kind == "site":
        return _SitesOf(inventory.sites, lambda name, _: (name,))
    if kind == "host":
        return _SitesOf(inventory.hosts, lambda _, host: (host.site,))
    if kind == "service":
        return _SitesOf(inventory.services, lambda _, service: service.sites)
    if kind == "backend":
        door = inventory.vars.get("front_door")
        backends = door.get("backends") if isinstance(door, dict) else None
        return {str(name): _sites_of(entry, "servers") for name, entry in backends.items()
                } if isinstance(backends, dict) else {}
    if kind == "database":
        described = inventory.vars.get("databases")
        if not isinstance(described, dict):
            return {}
        if "hosts" in described:  # one database, described directly: known by its name or dbname
            names = {str(described.get("name") or described.get("dbname") or "main"), str(described.get("dbname"))}
            return {name: _sites_of(described, "hosts") for name in names}
        return {str(name): _sites_of(spec, "hosts") for name, spec in described.items()}
    if kind == "redis":
        instances = inventory.vars.get("redis")
        return {str(name): _sites_of(spec, "hosts") for name, spec in instances.items()
                } if isinstance(instances, dict) else {}
    return {}


def _only_database(inventory: Inventory) -> str | None:
    """The database an action uses when it names none: the inventory's only one."""
    described = inventory.vars.get("databases")
    if isinstance(described, dict) and "hosts" in described:
        return str(described.get("name") or described.get("dbname") or "main")
    return next(iter(described)) if isinstance(described, dict) and len(described) == 1 else None


def _sites_of(entry: Any, field: str) -> tuple[str, ...]:
    value = entry.get(field) if isinstance(entry, dict) else None
    return tuple(str(site) for site in value) if isinstance(value, dict) else ()


_WHERE = {"site": "dr.sites", "host": "the inventory", "service": "dr.services",
          "backend": "the front door's backends (dr.vars.front_door.backends)", "database": "dr.vars.databases",
          "redis": "dr.vars.redis"}


def _not_known(document: YamlDocument, key: PathKey, kind: str, name: str, known: Any,
               where: str | None = None) -> Problem:
    """``backend 'quotaton' is not in ... (did you mean 'quotation'?)``, naming what there is. Among
    more than _CLOSE_AMONG names no guess: thousands of typos against thousands of hosts took minutes."""
    close = difflib.get_close_matches(name, [str(n) for n in known], n=1) if len(known) <= _CLOSE_AMONG else []
    guess = f" (did you mean {close[0]!r}?)" if close else ""
    shown = _listed([str(n) for n in itertools.islice(known, _LISTED)], len(known)) if known else "none defined"
    return document.problem(key, f"{kind} {name!r} is not in {where or _WHERE.get(kind, 'the inventory')}{guess}",
                            f"use one of: {shown}")


_CLOSE_AMONG = 1000


def check_runbook(
    runbook: Runbook, document: YamlDocument, inventory: Inventory, params_model: ParamsLookup,
    effect_of: EffectLookup | None = None,
) -> list[Problem]:
    """Everything that needs the inventory or the action registry to check."""
    steps = list(enumerate(runbook.steps))
    problems = _check_steps(runbook, steps, document, inventory, params_model)
    if effect_of is not None:
        problems.extend(change_order_problems(runbook, steps, document, effect_of))
    return problems


def _check_steps(
    runbook: Runbook,
    steps: list[tuple[int, Step]],
    document: YamlDocument,
    inventory: Inventory,
    params_model: ParamsLookup,
    values: dict[str, Any] | None = None,
) -> list[Problem]:
    """``values``: the parameters' values templates are rendered with (by default their defaults)."""
    problems: list[Problem] = []
    ancestry = _Ancestry(runbook, _steps_read(steps))
    template_names = _TemplateNames(runbook, inventory)
    for field in ("services", "sites"):
        known = inventory.services if field == "services" else inventory.sites
        for i, name in enumerate(getattr(runbook.scope, field)):
            if name not in known:
                problems.append(_not_known(document, ("scope", field, i), field[:-1], name, known,
                                           f"inventory {inventory.name!r}"))
    if values is None:
        values = {name: spec.default for name, spec in runbook.parameters.items() if spec.default is not None}
    for index, step in steps:
        key: PathKey = ("steps", index)
        service = runbook.service_of(step)
        renderer = _Renderer(inventory, values, service)
        if step.service and step.service not in inventory.services:
            problems.append(_not_known(document, key + ("service",), "service", step.service, inventory.services))
        site = renderer.render(document, key + ("site",), step.site, problems)
        if isinstance(site, str) and site not in inventory.sites:
            problems.append(_not_known(document, key + ("site",), "site", site, inventory.sites))
        renderer.site = site
        calls = [(key, step.action, step.with_)]
        if step.rollback is not None:
            calls.append((key + ("rollback",), step.rollback.action, step.rollback.with_))
        for at, action, given in calls:
            model = params_model(action)
            if model is None:
                problems.append(document.problem(at + ("action",), f"unknown action {action!r}",
                                                 "run `dr actions` to list the actions"))
            else:
                problems.extend(_check_call(document, at + ("with",), given, model, inventory, renderer))
        for tkey, source in _templates(key, step):
            readable = _Readable(ancestry, step.id, tkey[2] == "rollback")
            problems.extend(_check_template(document, tkey, source, template_names, readable))
    return problems


def _steps_read(steps: list[tuple[int, Step]]) -> set[str]:
    """The steps some template reads that its own step does not need directly."""
    read: set[str] = set()
    for index, step in steps:
        for _, source in _templates(("steps", index), step):
            try:
                refs = templating.references(source)
            except templating.TemplateError:
                continue
            read.update(attr for name, attr in refs if name == "steps" and attr is not None and attr not in step.needs)
    return read


class _Ancestry:
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
class _Readable:
    """The steps a template of ``step_id`` may read: those it needs, and itself for its rollback (which
    runs after it)."""

    ancestry: _Ancestry
    step_id: str
    rollback: bool

    def __contains__(self, other: object) -> bool:
        return isinstance(other, str) and (
            (self.rollback and other == self.step_id) or self.ancestry.needs(self.step_id, other))


def _field_names(name: str, info: FieldInfo) -> set[str]:
    """The keys a runbook may use for a parameter: its name and its aliases."""
    names = {name}
    for alias in (info.alias, info.validation_alias):
        if isinstance(alias, str):
            names.add(alias)
        elif isinstance(alias, AliasChoices):
            names.update(choice for choice in alias.choices if isinstance(choice, str))
    return names


_UNKNOWN = object()  # a value known only during the run (it reads a step's output, or the run)


class _Renderer:
    """Renders, at validation time, the templates that read only what is known then: the parameters'
    values (given, or defaults), the inventory, the step's service and site. A template reading a
    step's output or the run, or a name the template checks report as undefined, stays unknown."""

    def __init__(self, inventory: Inventory, values: dict[str, Any], service: str | None) -> None:
        self.inventory = inventory
        self.values = values
        self.service = service
        self.site: Any = None

    def knows(self, source: str) -> bool:
        try:
            refs = templating.references(source)
        except templating.TemplateError:
            return False
        inventory = self.inventory
        known: dict[str, Any] = {"params": self.values, "vars": inventory.vars, "services": inventory.services,
                                 "sites": inventory.sites, "hosts": inventory.hosts, "inventory": None,
                                 "service": None, "site": None}
        for name, attr in refs:
            if name == "site" and self.site is _UNKNOWN:
                return False
            if name not in known:
                if name in templating.environment().globals:
                    continue
                return False
            if (name == "params" and attr is None) or (attr is not None and known[name] is not None
                                                         and attr not in known[name]):
                return False
        return True

    def render(self, document: YamlDocument, key: PathKey, value: Any, problems: list[Problem]) -> Any:
        """``value`` rendered, as is when it holds no template, or _UNKNOWN; a template that cannot render
        with what is known is a problem (it would fail the same way in the run)."""
        if not _has_template(value):
            return value
        sources = [source for _, source in _walk_templates(value, ())]
        if not all(self.knows(source) for source in sources):
            return _UNKNOWN
        inventory = self.inventory
        context = {"params": self.values, "inventory": inventory, "vars": inventory.vars,
                   "services": inventory.services, "sites": inventory.sites, "hosts": inventory.hosts,
                   "service": inventory.services.get(self.service) if self.service else None, "site": self.site}
        try:
            return templating.render_value(value, context)
        except templating.TemplateError as exc:
            problems.append(document.problem(key, f"cannot be rendered: {exc}",
                                             "fix the template; it fails the same way when the run gets here"))
            return _UNKNOWN


def _check_call(
    document: YamlDocument, key: PathKey, given: dict[str, Any], model: type[BaseModel], inventory: Inventory,
    renderer: _Renderer,
) -> list[Problem]:
    """An action's parameters: names, required ones, types and references into the inventory, with
    templates rendered where validation can, and shell command lines that take a value unquoted."""
    problems = []
    names = {name: _field_names(name, info) for name, info in model.model_fields.items()}
    accepted = set().union(*names.values()) if names else set()
    if model.model_config.get("extra") == "forbid":
        for name in given:
            if name not in accepted:
                problems.append(document.problem(key + (name,), "is not a parameter of this action",
                                                 f"parameters: {', '.join(sorted(accepted)) or 'none'}"))
    for name, info in model.model_fields.items():
        if info.is_required() and not names[name] & set(given):
            shown = info.alias or name
            problems.append(
                document.problem(key, f"missing required parameter {shown!r}", f"add `{shown}:` under with")
            )
    rendered: dict[str, Any] = {}
    for name, value in given.items():
        rendered[name] = renderer.render(document, key + (name,), value, problems)
    unknown = {name for name, value in rendered.items() if value is _UNKNOWN}
    known = {name: value for name, value in rendered.items() if value is not _UNKNOWN}
    try:
        model.model_validate(known)
    except ValidationError as exc:  # missing and unknown parameters are reported above
        problems.extend(pydantic_problems(document, key, exc, skip=lambda item: (
            item["type"] in ("missing", "extra_forbidden") or (bool(unknown) and not item["loc"])
            or bool(item["loc"]) and item["loc"][0] in unknown)))
    by_field = {field: value for field, aliases in names.items() for name, value in known.items() if name in aliases}
    unknown_fields = {field for field, aliases in names.items() if aliases & unknown}
    problems.extend(_check_references(document, key, by_field, unknown_fields, model, inventory, renderer.service))
    for name, value in given.items():
        if _field_extra(model, name).get("shell_command") and isinstance(value, str):
            problems.extend(_unquoted_in_shell(document, key + (name,), value))
    return problems


def _check_references(
    document: YamlDocument, key: PathKey, values: dict[str, Any], unknown: set[str], model: type[BaseModel],
    inventory: Inventory, service: str | None,
) -> list[Problem]:
    """Each name a parameter gives must be in the inventory; a site must be served by the backends
    (or the database) the same call names, or that are its default. ``unknown``: the fields whose
    value is known only during the run."""
    problems = []
    containers: list[tuple[str, str, tuple[str, ...]]] = []  # (kind, name, its sites)
    sites: list[tuple[str, str]] = []  # (field, site)
    for field in model.model_fields:
        kind = inventory_reference(model, field)
        if kind is None or field in unknown:
            continue
        known = _referents(inventory, kind)
        value = values.get(field)
        if kind == "backend" and not value:
            value = [service] if service else []  # the step's service is the default backend
        if kind == "database" and value is None:
            value = _only_database(inventory)
        if kind == "redis" and value is None and len(known) == 1:
            value = next(iter(known))  # the inventory's only instance
        for name in value if isinstance(value, list) else [value]:
            if not isinstance(name, str):
                continue
            if name not in known:
                problems.append(_not_known(document, key + (field,) if field in values else key, kind, name, known))
            elif kind in ("backend", "database", "redis"):
                containers.append((kind, name, known[name]))
            elif kind == "site":
                sites.append((field, name))
    for field, site in sites:
        for kind, name, served in containers:
            if site not in served:
                problems.append(document.problem(
                    key + (field,), f"{kind} {name!r} has no server at site {site!r}",
                    f"its sites: {', '.join(served) or 'none'}"))
    return problems


def _unquoted_in_shell(document: YamlDocument, key: PathKey, command: str) -> list[Problem]:
    if not templating.is_template(command):
        return []
    try:
        unquoted = templating.unquoted_in_shell(command)
    except templating.TemplateError:
        return []  # reading the runbook reported it
    if not unquoted:
        return []
    shown = ", ".join(f"{{{{ {expression} }}}}" for expression in unquoted[:3])
    more = f" and {len(unquoted) - 3} more" if len(unquoted) > 3 else ""
    return [document.problem(
        key, f"{shown}{more} put into a shell command line unquoted: a value with a space, quote or ; would "
        "change the command", f"write {{{{ {unquoted[0]} | shquote }}}}, or give argv as a list", severity="warning")]


def _walk_templates(value: Any, at: PathKey) -> list[tuple[PathKey, str]]:
    """Every template string inside ``value`` (dicts and lists walked), with where it is."""
    if isinstance(value, str):
        return [(at, value)] if templating.is_template(value) else []
    if isinstance(value, dict):
        return [found for k, v in value.items() for found in _walk_templates(v, at + (k,))]
    if isinstance(value, list):
        return [found for i, v in enumerate(value) for found in _walk_templates(v, at + (i,))]
    return []


def _templates(key: PathKey, step: Any) -> list[tuple[PathKey, str]]:
    found = _walk_templates(step.with_, key + ("with",))
    if step.rollback is not None:
        found += _walk_templates(step.rollback.with_, key + ("rollback", "with"))
    if step.when:
        found.append((key + ("when",), step.when))
    for name in ("site",):
        value = getattr(step, name)
        if isinstance(value, str) and templating.is_template(value):
            found.append((key + (name,), value))
    return found


def _has_template(value: Any) -> bool:
    if isinstance(value, str):
        return templating.is_template(value)
    if isinstance(value, dict):
        return any(_has_template(v) for v in value.values())
    if isinstance(value, list):
        return any(_has_template(v) for v in value)
    return False


_LISTED = 12  # names a fix offers: 20,000 problems each listing 20,000 steps would take gigabytes


def _listed(names: list[str], total: int | None = None) -> str:
    """``a, b, c``, or the first few and how many there are in all (``total``, when ``names`` holds
    only the first ones)."""
    total = len(names) if total is None else total
    if total > len(names[:_LISTED]):
        return f"{', '.join(names[:_LISTED])}, ... ({total} in all)"
    return ", ".join(names) or "none"


class _TemplateNames:
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
            self._listed[name] = _listed(sorted(self.known[name] or ()))
        return self._listed[name]


def _check_template(
    document: YamlDocument, key: PathKey, source: str, names: _TemplateNames, readable: Container[str]
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


def step_effect(step: Step, effect_of: EffectLookup) -> Effect | None:
    """What the step does to the world: its own ``effect``, else its action's (None: unknown action)."""
    return step.effect or effect_of(step.action)


def change_order_problems(
    runbook: Runbook, steps: list[tuple[int, Step]], document: YamlDocument, effect_of: EffectLookup
) -> list[Problem]:
    """Nothing changes before the target is known ready: every changing step needs, directly or not,
    every check that runs before any change (a read-only step none of whose needs changes anything,
    and that may not fail: ``on_failure: continue`` only records), unless it says why it may go first
    (``before_checks``). A check that fails then stops the run before the first change instead of
    after it. Linear in the steps: the checks each step has waited for are a bit set."""
    by_id = {step.id: step for step in runbook.steps}
    effects = {step.id: step_effect(step, effect_of) for step in runbook.steps}
    bits: dict[str, int] = {}  # check id -> its bit
    waited: dict[str, int] = {}  # step id -> the checks it waits for, as bits
    changed_before: dict[str, bool] = {}  # step id -> some step it waits for changes something
    for step in runbook.steps:  # a step may need one written after it: visit in dependency order
        _visit(step.id, by_id, effects, bits, waited, changed_before)
    index_of = {step.id: index for index, step in steps}
    names = list(bits)
    problems = []
    for step in runbook.steps:
        effect = effects[step.id]
        if effect is None or not effect.changes or step.before_checks or step.id not in index_of:
            continue
        missing, count = _first_unset(waited[step.id], len(names))
        if count:
            quoted = _listed([repr(names[i]) for i in missing], count)
            problems.append(document.problem(
                ("steps", index_of[step.id], "needs"),
                f"step {step.id!r} changes the world ({effect}) but can start before the check"
                f"{'s' if count > 1 else ''} {quoted} end{'' if count > 1 else 's'}",
                f"add {quoted} to its needs, or say why it may go first: before_checks: \"reason\"",
            ))
    return problems


def _first_unset(mask: int, size: int) -> tuple[list[int], int]:
    """The first few (``_LISTED``) of the ``size`` low bits of ``mask`` that are 0, and how many are:
    without walking every bit of every changing step (thousands of each made it quadratic)."""
    unset = ~mask & ((1 << size) - 1)
    first: list[int] = []
    rest = unset
    while rest and len(first) < _LISTED:
        lowest = rest & -rest
        first.append(lowest.bit_length() - 1)
        rest ^= lowest
    return first, unset.bit_count()


def _visit(step_id: str, by_id: dict[str, Step], effects: dict[str, Effect | None], bits: dict[str, int],
           waited: dict[str, int], changed_before: dict[str, bool]) -> None:
    """Fill ``waited`` and ``changed_before`` for the step and what it needs (iteratively: a chain
    of thousands of steps must not hit the recursion limit). A need that closes a cycle (reported
    elsewhere) is passed over."""
    todo = [step_id]
    expanded: set[str] = set()  # their needs are on the stack; one met again is on a cycle
    while todo:
        current = todo[-1]
        if current in waited:
            todo.pop()
            continue
        if current not in expanded:
            expanded.add(current)
            todo.extend(need for need in by_id[current].needs
                        if need in by_id and need not in waited and need not in expanded)
            continue
        todo.pop()
        needs = [need for need in by_id[current].needs if need in waited]
        mask, changed = 0, False
        for need in needs:
            mask |= waited[need]
            effect = effects[need]
            need_changes = effect is None or effect.changes
            changed = changed or changed_before[need] or need_changes
            if need in bits:
                mask |= 1 << bits[need]
        waited[current] = mask
        changed_before[current] = changed
        effect = effects[current]
        # A check allowed to fail (on_failure: continue) only records; it protects nothing.
        if effect is Effect.READ_ONLY and not changed and by_id[current].on_failure is not OnFailure.CONTINUE:
            bits[current] = len(bits)
