"""An Ansible YAML inventory to an ``Inventory``: groups named like sites hold their hosts, and the DR
fields (sites, services, targets, safety, watch, free variables) live under ``all.vars.dr``."""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path
from typing import Any

from pydantic import ValidationError

from dr_orchestrator.loading.problems import by_line, not_known, pydantic_problems
from dr_orchestrator.model.durations import parse_duration
from dr_orchestrator.model.inventory import CAPABILITY_ELEMENTS, Capability, Host, Inventory, Service, Site
from dr_orchestrator.model.safety import SafetyPolicy
from dr_orchestrator.model.watch import PLACEHOLDER, RunbookMapping, WatchSettings, settings_of
from dr_orchestrator.yamlsource import LoadError, PathKey, Problem, YamlDocument, read_yaml

_HOST_KEYS = {
    "ansible_host": "address",
    "ansible_port": "port",
    "ansible_user": "user",
    "ansible_ssh_private_key_file": "key_file",
    "dr_known_hosts": "known_hosts",
    "dr_roles": "roles",
}


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
            problems.extend(pydantic_problems(document, base + ("sites", name), exc, name_is_key=True))
    services: dict[str, Service] = {}
    declared_services = _mapping(document, base + ("services",), dr.get("services"), problems)
    for name, spec in declared_services.items():
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
                    fields[target], durations_ok = 0.0, False  # the rest is still checked in this pass
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
        try:
            service = Service(name=name, **fields)
        except ValidationError as exc:
            problems.extend(pydantic_problems(document, key, exc, name_is_key=True))
            continue
        if durations_ok:
            services[name] = service
    hosts = _inventory_hosts(document, all_group, all_vars, sites, problems)
    extra = set(dr) - {"name", "sites", "services", "vars", "safety", "capability", "watch"}
    for name in sorted(extra):
        problems.append(document.problem(base + (name,), "is not a known field",
                                         "allowed: name, sites, services, vars, safety, capability, watch"))
    capability = _capability(document, base + ("capability",), dr.get("capability"), problems)
    for name in ("vars", "safety", "watch"):
        if dr.get(name) is not None and not isinstance(dr[name], dict):
            problems.append(document.problem(base + (name,), "must be a mapping of names to values"))
    if isinstance(dr.get("safety"), dict):
        problems.extend(_safety_problems(document, base + ("safety",), dr["safety"], declared_sites,
                                         declared_services))
    if isinstance(dr.get("watch"), dict):
        tiers = sorted({service.tier for service in services.values()})
        problems.extend(_watch_problems(document, base + ("watch",), dr["watch"], declared_sites, declared_services,
                                        tiers))
    inventory = _inventory(document, path, dr, sites, hosts, services, capability, problems)
    if problems or inventory is None:
        raise LoadError(problems)
    return inventory, document


def _inventory(document: YamlDocument, path: str, dr: dict[str, Any], sites: dict[str, Site],
               hosts: dict[str, Host], services: dict[str, Service], capability: Capability | None,
               problems: list[Problem]) -> Inventory | None:
    """The inventory of what was read well (its name checked in the same pass as the rest); a file
    without ``dr.name`` is named by its path."""

    def mapping(name: str) -> dict[str, Any]:  # one that is not was reported
        value = dr.get(name)
        return value if isinstance(value, dict) else {}

    try:
        return Inventory(name=str(dr.get("name") or path), sites=sites, hosts=hosts, services=services,
                         vars=mapping("vars"), safety=mapping("safety"), watch=mapping("watch"), capability=capability)
    except ValidationError as exc:
        found = pydantic_problems(document, ("all", "vars", "dr"), exc)
        if not dr.get("name"):
            found = [replace(problem, message=f"is not given, and the file's path, which names the inventory "
                             f"instead, {problem.message}", fix="add a name under all.vars.dr")
                     if problem.field.endswith(".name") else problem for problem in found]
        problems.extend(found)
        return None


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


def _safety_problems(document: YamlDocument, key: PathKey, safety: dict[str, Any], sites: dict[str, Any],
                     services: dict[str, Any]) -> list[Problem]:
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
                    services: dict[str, Any], tiers: list[str]) -> list[Problem]:
    """``dr.watch``: its shape (pydantic), then every name it uses, read from the raw mapping so that
    both kinds of mistake are reported in one pass (``sites`` and ``services`` as declared, a wrong one
    too: its own problem is reported apart). Runbook files are checked by
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
            problems.append(not_known(document, at, kind, name, names, where))

    levels = dict(entries("levels")) if isinstance(watch.get("levels"), dict) else dict(WatchSettings().levels)
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
    return by_line(problems)


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
                for problem in pydantic_problems(document, key, exc, name_is_key=True):  # name the variable as written
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
