"""YAML files to typed model objects. Every problem names file, line, field and the fix.

Inventories are Ansible YAML inventories: groups named like sites hold their hosts, and the DR
fields (sites, services, targets, free variables) live under ``all.vars.dr``.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from pydantic import BaseModel, ValidationError

from dr_orchestrator import templating
from dr_orchestrator.model.durations import parse_duration
from dr_orchestrator.model.inventory import Host, Inventory, Service, Site
from dr_orchestrator.model.runbook import Runbook
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
    for name, spec in _mapping(document, base + ("sites",), dr.get("sites"), problems).items():
        try:
            sites[name] = Site(name=name, **(spec or {}))
        except (ValidationError, TypeError) as exc:
            problems.extend(_errors(document, base + ("sites", name), exc))
    services: dict[str, Service] = {}
    for name, spec in _mapping(document, base + ("services",), dr.get("services"), problems).items():
        key = base + ("services", name)
        if not isinstance(spec, dict):
            problems.append(document.problem(key, "must be a mapping with rto, rpo and sites"))
            continue
        fields = dict(spec)
        for target in ("rto", "rpo"):
            if target in fields:
                try:
                    fields[target] = parse_duration(fields[target])
                except ValueError as exc:
                    problems.append(document.problem(key + (target,), str(exc)))
                    fields.pop(target)
        try:
            service = Service(name=name, **fields)
        except (ValidationError, TypeError) as exc:
            problems.extend(_errors(document, key, exc))
            continue
        for index, site in enumerate(service.sites):
            if site not in sites:
                problems.append(
                    document.problem(
                        key + ("sites", index),
                        f"site {site!r} is not in dr.sites",
                        f"use one of: {', '.join(sites) or 'none defined'}",
                    )
                )
        services[name] = service
    hosts = _inventory_hosts(document, all_group, all_vars, sites, problems)
    extra = set(dr) - {"name", "sites", "services", "vars", "safety"}
    for name in sorted(extra):
        problems.append(
            document.problem(base + (name,), "is not a known field", "allowed: name, sites, services, vars, safety")
        )
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
        spec = spec or {}
        group_vars = {**inherited, **(spec.get("vars") or {})}
        for name, host_vars in (spec.get("hosts") or {}).items():
            key: PathKey = ("all", "children", group, "hosts", name)
            merged = {**group_vars, **(host_vars or {})}
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
                problems.extend(_errors(document, key, exc))
    return hosts


def _mapping(document: YamlDocument, key: PathKey, value: Any, problems: list[Problem]) -> dict[str, Any]:
    if isinstance(value, dict) and value:
        return value
    problems.append(document.problem(key, "must be a non-empty mapping"))
    return {}


def _errors(document: YamlDocument, key: PathKey, exc: Exception) -> list[Problem]:
    if isinstance(exc, ValidationError):
        return pydantic_problems(document, key, exc)
    return [document.problem(key, str(exc))]


# ---------------------------------------------------------------- runbook

_STEP_DURATIONS = ("timeout",)
_RETRY_DURATIONS = ("delay", "max_delay")


def load_runbook(path: str, text: str | None = None) -> tuple[Runbook, YamlDocument]:
    """Parse and check a runbook on its own (structure, ids, needs, durations, template syntax)."""
    document = read_yaml(path, text)
    problems: list[Problem] = []
    data = document.data
    if not isinstance(data, dict):
        raise LoadError([document.problem((), "a runbook is a mapping with name and steps")])
    raw_steps = data.get("steps")
    if not isinstance(raw_steps, list) or not raw_steps:
        raise LoadError([document.problem(("steps",), "must be a non-empty list of steps")])
    steps: list[dict[str, Any]] = []
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
        steps.append(step)
    for index, step in enumerate(steps):
        for n, need in enumerate(step.get("needs", ())):
            if need not in ids:
                problems.append(
                    document.problem(
                        ("steps", index, "needs", n), f"needs unknown step {need!r}", f"use one of: {', '.join(ids)}"
                    )
                )
    cycle = _find_cycle(steps)
    if cycle:
        first = ids[cycle[0]]
        problems.append(
            document.problem(
                ("steps", first, "needs"), "a cycle in needs: " + " -> ".join(cycle), "remove one of these needs"
            )
        )
    top = {k: v for k, v in data.items() if k != "steps"}
    for name, spec in (top.get("parameters") or {}).items() if isinstance(top.get("parameters"), dict) else ():
        if not isinstance(spec, dict):  # `name: value` is shorthand for a default
            top["parameters"][name] = {"default": spec}
    scope = top.get("scope")
    if isinstance(scope, dict):
        top["scope"] = {k: [v] if isinstance(v, str) else v for k, v in scope.items()}
    if problems:
        raise LoadError(problems)
    try:
        runbook = Runbook(**top, steps=steps)
    except ValidationError as exc:
        raise LoadError(pydantic_problems(document, (), exc)) from None
    return runbook, document


def _normalise_step(
    document: YamlDocument, key: PathKey, raw: dict[str, Any], previous: str | None, problems: list[Problem]
) -> dict[str, Any]:
    step = dict(raw)
    needs = step.get("needs", [previous] if previous else [])  # unstated needs: the step before
    if isinstance(needs, str):
        needs = [needs]
    if not isinstance(needs, list) or not all(isinstance(n, str) for n in needs):
        problems.append(document.problem(key + ("needs",), "must be a step id or a list of step ids"))
        needs = []
    step["needs"] = needs
    for name in _STEP_DURATIONS:
        if name in step:
            step[name] = _duration(document, key + (name,), step[name], problems)
    retries = step.get("retries")
    if isinstance(retries, int) and not isinstance(retries, bool):
        step["retries"] = {"count": retries}
    elif isinstance(retries, dict):
        step["retries"] = dict(retries)
        for name in _RETRY_DURATIONS:
            if name in retries:
                step["retries"][name] = _duration(document, key + ("retries", name), retries[name], problems)
    rollback = step.get("rollback")
    if isinstance(rollback, dict) and "timeout" in rollback:
        step["rollback"] = {
            **rollback,
            "timeout": _duration(document, key + ("rollback", "timeout"), rollback["timeout"], problems),
        }
    for name in ("marks",):
        if isinstance(step.get(name), str):
            step[name] = [step[name]]
    return step


def _duration(document: YamlDocument, key: PathKey, value: Any, problems: list[Problem]) -> Any:
    try:
        return parse_duration(value)
    except ValueError as exc:
        problems.append(document.problem(key, str(exc)))
        return 0.0


def _find_cycle(steps: list[dict[str, Any]]) -> list[str] | None:
    graph = {s["id"]: list(s.get("needs", ())) for s in steps if isinstance(s.get("id"), str)}
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
    problems: list[Problem] = []
    step_ids = {s.id for s in runbook.steps}
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
    for index, step in enumerate(runbook.steps):
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
        for tkey, source in _templates(key, step):
            problems.extend(_check_template(document, tkey, source, runbook, inventory, step_ids))
    return problems


def _check_params(
    document: YamlDocument, key: PathKey, values: dict[str, Any], model: type[BaseModel]
) -> list[Problem]:
    problems = []
    fields = model.model_fields
    accepted = set(fields) | {f.alias for f in fields.values() if f.alias}
    for name in values:
        if name not in accepted:
            problems.append(
                document.problem(
                    key + (name,), "is not a parameter of this action", f"parameters: {', '.join(sorted(accepted))}"
                )
            )
    for name, info in fields.items():
        if info.is_required() and name not in values and (info.alias or name) not in values:
            problems.append(
                document.problem(
                    key, f"missing required parameter {info.alias or name!r}", f"add `{info.alias or name}:` under with"
                )
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
    document: YamlDocument, key: PathKey, source: str, runbook: Runbook, inventory: Inventory, step_ids: set[str]
) -> list[Problem]:
    try:
        refs = templating.references(source)
    except templating.TemplateError as exc:
        return [document.problem(key, str(exc))]
    problems = []
    known_by_name: dict[str, set[str] | None] = {
        "params": set(runbook.parameters),
        "vars": set(inventory.vars),
        "services": set(inventory.services),
        "sites": set(inventory.sites),
        "hosts": set(inventory.hosts),
        "steps": step_ids,
        "inventory": None,
        "run": {"id", "kind", "incident_at", "started_at", "started_by"},
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
    return problems
