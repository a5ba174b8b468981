"""YAML files to typed model objects. Every problem names file, line, field and the fix.

Inventories are Ansible YAML inventories: groups named like sites hold their hosts, and the DR
fields (sites, services, targets, free variables) live under ``all.vars.dr``.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, replace
from typing import Any

from pydantic import AliasChoices, BaseModel, ValidationError
from pydantic.fields import FieldInfo

from dr_orchestrator import templating
from dr_orchestrator.model.durations import parse_duration
from dr_orchestrator.model.inventory import Host, Inventory, Service, Site
from dr_orchestrator.model.runbook import Runbook, Step
from dr_orchestrator.model.safety import SafetyPolicy
from dr_orchestrator.yamlsource import LoadError, PathKey, Problem, YamlDocument, read_yaml

ParamsLookup = Callable[[str], type[BaseModel] | None]

_HOST_KEYS = {
    "ansible_host": "address",
    "ansible_port": "port",
    "ansible_user": "user",
    "ansible_ssh_private_key_file": "key_file",
    "dr_known_hosts": "known_hosts",
    "dr_roles": "roles",
}


def pydantic_problems(document: YamlDocument, base: PathKey, error: ValidationError) -> list[Problem]:
    problems = []
    for item in error.errors():
        key = base + tuple(p for p in item["loc"] if isinstance(p, (str, int)))
        key = tuple("with" if p == "with_" else p for p in key)
        message = item["msg"]
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
    extra = set(dr) - {"name", "sites", "services", "vars", "safety"}
    for name in sorted(extra):
        problems.append(
            document.problem(base + (name,), "is not a known field", "allowed: name, sites, services, vars, safety")
        )
    for name in ("vars", "safety"):
        if dr.get(name) is not None and not isinstance(dr[name], dict):
            problems.append(document.problem(base + (name,), "must be a mapping of names to values"))
    if isinstance(dr.get("safety"), dict):
        problems.extend(_safety_problems(document, base + ("safety",), dr["safety"], declared_sites, services))
    if problems:
        raise LoadError(problems)
    inventory = Inventory(
        name=str(dr.get("name") or path),
        sites=sites,
        hosts=hosts,
        services=services,
        vars=dr.get("vars") or {},
        safety=dr.get("safety") or {},
    )
    return inventory, document


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


def validate(
    runbook_path: str,
    inventory_path: str,
    params_model: ParamsLookup,
    *,
    runbook_text: str | None = None,
    inventory_text: str | None = None,
) -> list[Problem]:
    """Every problem of a runbook against an inventory, structural and semantic together (empty when
    clean): what `dr validate` reports. Inventory problems come first, then the runbook's by line."""
    problems: list[Problem] = []
    inventory: Inventory | None = None
    try:
        inventory, _ = load_inventory(inventory_path, inventory_text)
    except LoadError as exc:
        problems.extend(exc.problems)
    try:
        document = read_yaml(runbook_path, runbook_text)
    except LoadError as exc:
        return problems + exc.problems
    parsed = _parse_runbook(document)
    found = list(parsed.problems)
    if inventory is not None and parsed.runbook is not None:
        found.extend(_check_steps(parsed.runbook, parsed.steps, document, inventory, params_model))
    return problems + _by_line(found)


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
    for index, step in normalised:
        written_as_list = isinstance(raw_steps[index].get("needs"), list)
        for n, need in enumerate(step.get("needs", ())):
            if need not in ids:
                at: PathKey = ("steps", index, "needs", n) if written_as_list else ("steps", index, "needs")
                problems.append(document.problem(at, f"needs unknown step {need!r}", f"use one of: {', '.join(ids)}"))
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
        else:
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
    path: list[str] = []

    def visit(node: str) -> list[str] | None:
        state[node] = 1
        path.append(node)
        for need in graph.get(node, ()):
            if need not in graph:
                continue
            if state.get(need) == 1:
                return path[path.index(need) :] + [need]
            if need not in state:
                found = visit(need)
                if found:
                    return found
        path.pop()
        state[node] = 2
        return None

    for node in graph:
        if node not in state:
            found = visit(node)
            if found:
                return found
    return None


def _template_syntax(document: YamlDocument, key: PathKey, step: Step) -> list[Problem]:
    problems = []
    for tkey, source in _templates(key, step):
        try:
            templating.references(source)
        except templating.TemplateError as exc:
            problems.append(document.problem(tkey, str(exc), "see the Jinja2 syntax: {{ params.name }}"))
    return problems


# ---------------------------------------------------------------- runbook against inventory and actions


def inventory_reference(model: type[BaseModel] | None, field: str) -> str | None:
    """``"host"`` or ``"site"`` when an action's parameter names inventory hosts or sites.

    Actions declare it on the field: ``Field(json_schema_extra={"refers_to": "host"})``."""
    if model is None or field not in model.model_fields:
        return None
    extra = model.model_fields[field].json_schema_extra
    return extra.get("refers_to") if isinstance(extra, dict) else None  # type: ignore[return-value]


def check_runbook(
    runbook: Runbook, document: YamlDocument, inventory: Inventory, params_model: ParamsLookup
) -> list[Problem]:
    """Everything that needs the inventory or the action registry to check."""
    return _check_steps(runbook, list(enumerate(runbook.steps)), document, inventory, params_model)


def _check_steps(
    runbook: Runbook,
    steps: list[tuple[int, Step]],
    document: YamlDocument,
    inventory: Inventory,
    params_model: ParamsLookup,
) -> list[Problem]:
    problems: list[Problem] = []
    ancestors = _ancestors(runbook)
    for field in ("services", "sites"):
        known = inventory.services if field == "services" else inventory.sites
        for i, name in enumerate(getattr(runbook.scope, field)):
            if name not in known:
                problems.append(
                    document.problem(
                        ("scope", field, i),
                        f"{name!r} is not in inventory {inventory.name!r}",
                        f"use one of: {', '.join(known)}",
                    )
                )
    for index, step in steps:
        key: PathKey = ("steps", index)
        model = params_model(step.action)
        if model is None:
            problems.append(
                document.problem(
                    key + ("action",), f"unknown action {step.action!r}", "run `dr actions` to list the actions"
                )
            )
        else:
            problems.extend(_check_params(document, key + ("with",), step.with_, model))
        if step.rollback is not None:
            rollback_model = params_model(step.rollback.action)
            if rollback_model is None:
                problems.append(
                    document.problem(
                        key + ("rollback", "action"),
                        f"unknown action {step.rollback.action!r}",
                        "run `dr actions` to list the actions",
                    )
                )
            else:
                problems.extend(
                    _check_params(document, key + ("rollback", "with"), step.rollback.with_, rollback_model)
                )
        if step.service and step.service not in inventory.services:
            problems.append(
                document.problem(
                    key + ("service",),
                    f"service {step.service!r} is not in the inventory",
                    f"use one of: {', '.join(inventory.services)}",
                )
            )
        if step.site and not templating.is_template(step.site) and step.site not in inventory.sites:
            problems.append(
                document.problem(
                    key + ("site",),
                    f"site {step.site!r} is not in the inventory",
                    f"use one of: {', '.join(inventory.sites)}",
                )
            )
        problems.extend(_check_names(document, key + ("with",), step.with_, inventory, model))
        if step.rollback is not None:
            problems.extend(
                _check_names(
                    document, key + ("rollback", "with"), step.rollback.with_, inventory,
                    params_model(step.rollback.action),
                )
            )
        for tkey, source in _templates(key, step):
            readable = ancestors.get(step.id, set())
            if tkey[2] == "rollback":
                readable = readable | {step.id}  # a rollback runs after its own step
            problems.extend(_check_template(document, tkey, source, runbook, inventory, readable))
    return problems


def _ancestors(runbook: Runbook) -> dict[str, set[str]]:
    """The steps each step needs, directly or not: the ones sure to have ended before it starts."""
    needs: dict[str, set[str]] = {}
    for step in runbook.steps:
        needs.setdefault(step.id, set()).update(step.needs)
    found: dict[str, set[str]] = {}
    for start in needs:
        seen: set[str] = set()
        todo = list(needs[start])
        while todo:
            node = todo.pop()
            if node not in seen:
                seen.add(node)
                todo.extend(needs.get(node, ()))
        found[start] = seen - {start}
    return found


def _field_names(name: str, info: FieldInfo) -> set[str]:
    """The keys a runbook may use for a parameter: its name and its aliases."""
    names = {name}
    for alias in (info.alias, info.validation_alias):
        if isinstance(alias, str):
            names.add(alias)
        elif isinstance(alias, AliasChoices):
            names.update(choice for choice in alias.choices if isinstance(choice, str))
    return names


def _check_params(
    document: YamlDocument, key: PathKey, values: dict[str, Any], model: type[BaseModel]
) -> list[Problem]:
    problems = []
    names = {name: _field_names(name, info) for name, info in model.model_fields.items()}
    accepted = set().union(*names.values()) if names else set()
    if model.model_config.get("extra") == "forbid":
        for name in values:
            if name not in accepted:
                problems.append(
                    document.problem(
                        key + (name,),
                        "is not a parameter of this action",
                        f"parameters: {', '.join(sorted(accepted)) or 'none'}",
                    )
                )
    for name, info in model.model_fields.items():
        if info.is_required() and not names[name] & set(values):
            shown = info.alias or name
            problems.append(
                document.problem(key, f"missing required parameter {shown!r}", f"add `{shown}:` under with")
            )
    if problems or _has_template(values):
        return problems  # types are checked after rendering
    try:
        model.model_validate(values)
    except ValidationError as exc:
        problems.extend(pydantic_problems(document, key, exc))
    return problems


def _check_names(
    document: YamlDocument, key: PathKey, values: dict[str, Any], inventory: Inventory, model: type[BaseModel] | None
) -> list[Problem]:
    problems = []
    for name, value in values.items():
        refers_to = inventory_reference(model, name)
        items = value if isinstance(value, list) else [value]
        for item in items:
            if not isinstance(item, str) or templating.is_template(item):
                continue
            if refers_to == "host" and item not in inventory.hosts:
                problems.append(
                    document.problem(
                        key + (name,),
                        f"host {item!r} is not in the inventory",
                        f"use one of: {', '.join(inventory.hosts)}",
                    )
                )
            if refers_to == "site" and item not in inventory.sites:
                problems.append(
                    document.problem(
                        key + (name,),
                        f"site {item!r} is not in the inventory",
                        f"use one of: {', '.join(inventory.sites)}",
                    )
                )
    return problems


def _templates(key: PathKey, step: Any) -> list[tuple[PathKey, str]]:
    found: list[tuple[PathKey, str]] = []

    def walk(value: Any, at: PathKey) -> None:
        if isinstance(value, str) and templating.is_template(value):
            found.append((at, value))
        elif isinstance(value, dict):
            for k, v in value.items():
                walk(v, at + (k,))
        elif isinstance(value, list):
            for i, v in enumerate(value):
                walk(v, at + (i,))

    walk(step.with_, key + ("with",))
    if step.rollback is not None:
        walk(step.rollback.with_, key + ("rollback", "with"))
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


def _check_template(
    document: YamlDocument, key: PathKey, source: str, runbook: Runbook, inventory: Inventory, readable: set[str]
) -> list[Problem]:
    """Names a template reads must exist; steps it reads must be ones this step needs (so they have run)."""
    try:
        refs = templating.references(source)
    except templating.TemplateError:
        return []  # reading the runbook reported the syntax error
    problems = []
    known_by_name: dict[str, set[str] | None] = {
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
                    f"declare it or use one of: {', '.join(sorted(known)) or 'none'}",
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
