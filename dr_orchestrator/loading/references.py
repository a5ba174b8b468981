"""A runbook's steps against the inventory and the actions: scope, services and sites, each action's
parameters (names, types, what they name in the inventory), templates rendered where validation can."""

from __future__ import annotations

from collections.abc import Callable, Iterator, Mapping
from typing import Any

from pydantic import AliasChoices, BaseModel, ValidationError
from pydantic.fields import FieldInfo

from dr_orchestrator import templating
from dr_orchestrator.loading.problems import not_known, pydantic_problems
from dr_orchestrator.loading.templates import (
    Ancestry,
    Readable,
    TemplateNames,
    check_template,
    has_template,
    step_templates,
    steps_read,
    walk_templates,
)
from dr_orchestrator.model.inventory import Inventory
from dr_orchestrator.model.runbook import Runbook, Step
from dr_orchestrator.yamlsource import PathKey, Problem, YamlDocument

ParamsLookup = Callable[[str], type[BaseModel] | None]


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


def check_steps(
    runbook: Runbook,
    steps: list[tuple[int, Step]],
    document: YamlDocument,
    inventory: Inventory,
    params_model: ParamsLookup,
    values: dict[str, Any] | None = None,
) -> list[Problem]:
    """``values``: the parameters' values templates are rendered with (by default their defaults)."""
    problems: list[Problem] = []
    ancestry = Ancestry(runbook, steps_read(steps))
    template_names = TemplateNames(runbook, inventory)
    for field in ("services", "sites"):
        known = inventory.services if field == "services" else inventory.sites
        for i, name in enumerate(getattr(runbook.scope, field)):
            if name not in known:
                problems.append(not_known(document, ("scope", field, i), field[:-1], name, known,
                                           f"inventory {inventory.name!r}"))
    if values is None:
        values = {name: spec.default for name, spec in runbook.parameters.items() if spec.default is not None}
    for index, step in steps:
        key: PathKey = ("steps", index)
        service = runbook.service_of(step)
        renderer = _Renderer(inventory, values, service)
        if step.service and step.service not in inventory.services:
            problems.append(not_known(document, key + ("service",), "service", step.service, inventory.services))
        site = renderer.render(document, key + ("site",), step.site, problems)
        if isinstance(site, str) and site not in inventory.sites:
            problems.append(not_known(document, key + ("site",), "site", site, inventory.sites))
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
        for tkey, source in step_templates(key, step):
            readable = Readable(ancestry, step.id, tkey[2] == "rollback")
            problems.extend(check_template(document, tkey, source, template_names, readable))
    return problems


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
        if not has_template(value):
            return value
        sources = [source for _, source in walk_templates(value, ())]
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
                problems.append(not_known(document, key + (field,) if field in values else key, kind, name, known))
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
