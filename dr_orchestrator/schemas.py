"""JSON Schema (draft 2020-12) of the YAML files people write: runbooks, inventories and drills
(``dr schema runbook|inventory|drill``), for editors (yaml-language-server) and CI linters.

The typed models say what a field holds once loaded; the YAML is looser (``30s`` for a duration,
``retries: 3``, ``needs: one-step``, ``rollback: {none: reason}``, a Jinja template where a number
goes), and a step's ``with:`` depends on its action. So the document structure is written here, its
leaves come from the pydantic models, and each action's parameters come from its ``Params`` model,
applied by ``if/then`` on ``action``. The schema checks shape and types only: ``dr validate`` still
checks what needs the inventory (sites, services, hosts, templates, safety rules).
"""

from __future__ import annotations

import copy
import re
from typing import Annotated, Any, get_args, get_origin

from pydantic import BaseModel, BeforeValidator

from dr_orchestrator.actions.base import ActionRegistry
from dr_orchestrator.model.approval import ApprovalPolicy
from dr_orchestrator.model.drill import NotifyEvent, ScenarioCategory
from dr_orchestrator.model.durations import parse_duration
from dr_orchestrator.model.inventory import Capability, Service, Site
from dr_orchestrator.model.runbook import Effect, OnFailure

DIALECT = "https://json-schema.org/draft/2020-12/schema"
KINDS = ("runbook", "inventory", "drill")
DURATION: dict[str, Any] = {
    "description": "seconds, or a duration: 30s, 5m, 100ms, 1h, 2d",
    "anyOf": [{"type": "number", "minimum": 0},
              {"type": "string", "pattern": r"^\s*\d+(\.\d+)?\s*(ms|s|m|h|d)?\s*$"}],
}
TEMPLATE: dict[str, Any] = {"type": "string", "pattern": r"\{\{|\{%",
                            "description": "a Jinja template, rendered when the step runs"}
NAMES: dict[str, Any] = {"anyOf": [{"type": "string"}, {"type": "array", "items": {"type": "string"}}]}


def schema(kind: str, registry: ActionRegistry) -> dict[str, Any]:
    """The schema of one kind of file (``KINDS``)."""
    if kind == "runbook":
        return _runbook(registry)
    if kind == "inventory":
        return _inventory()
    if kind == "drill":
        return _drill(registry)
    raise ValueError(f"no schema for {kind!r}: use one of {', '.join(KINDS)}")


# --- pieces from the models -------------------------------------------------------------------------


def _is_duration(annotation: Any) -> bool:
    if get_origin(annotation) is Annotated:
        return any(isinstance(m, BeforeValidator) and m.func is parse_duration for m in get_args(annotation)[1:]) \
            or _is_duration(get_args(annotation)[0])
    return any(_is_duration(arg) for arg in get_args(annotation))


def _model_schema(model: type[BaseModel], prefix: str, defs: dict[str, Any], *, templated: bool = False,
                  drop: tuple[str, ...] = (), durations: tuple[str, ...] = ()) -> dict[str, Any]:
    """``model``'s validation schema, its ``$defs`` moved into ``defs`` under ``prefix``; Duration
    fields (and ``durations``) accept the duration forms; ``templated``: every field a template too."""
    found = model.model_json_schema(mode="validation")
    inner = found.pop("$defs", {})
    found = _rebase(found, prefix)
    for name, definition in inner.items():
        defs[prefix + name] = _rebase(definition, prefix)
    properties = found.get("properties", {})
    for name in drop:
        properties.pop(name, None)
        if name in found.get("required", []):
            found["required"].remove(name)
    for name, info in model.model_fields.items():
        key = info.alias or name
        if key not in properties:
            continue
        if name in durations or _is_duration(info.annotation) or any(
                isinstance(m, BeforeValidator) and m.func is parse_duration for m in info.metadata):
            nullable = not info.is_required() and info.default is None
            described = {k: v for k, v in properties[key].items() if k in ("description", "title")}
            properties[key] = {**described, "anyOf": [*DURATION["anyOf"], *([{"type": "null"}] if nullable else [])]}
        if templated:
            properties[key] = {"anyOf": [properties[key], TEMPLATE]}
    found.pop("title", None)
    return found


def _rebase(node: Any, prefix: str) -> Any:
    if isinstance(node, dict):
        return {k: (f"#/$defs/{prefix}{v.removeprefix('#/$defs/')}" if k == "$ref" and isinstance(v, str)
                    else _rebase(v, prefix)) for k, v in node.items()}
    if isinstance(node, list):
        return [_rebase(item, prefix) for item in node]
    return node


def _params(registry: ActionRegistry, defs: dict[str, Any]) -> dict[str, str]:
    """Each action's parameters schema into ``defs``; returns action -> its ``$ref``."""
    refs = {}
    for name in registry.names():
        key = "with." + re.sub(r"[^A-Za-z0-9_.-]", "_", name)
        defs[key] = _model_schema(registry.get(name).Params, key + ".", defs, templated=True)
        defs[key]["description"] = f"parameters of {name} (`dr actions` lists them)"
        refs[name] = f"#/$defs/{key}"
    return refs


def _by_action(refs: dict[str, str]) -> list[dict[str, Any]]:
    """``with`` checked against the parameters of the step's ``action``."""
    return [{"if": {"properties": {"action": {"const": name}}, "required": ["action"]},
             "then": {"properties": {"with": {"$ref": ref}}}} for name, ref in refs.items()]


# --- runbooks -----------------------------------------------------------------------------------------


def _step_defs(registry: ActionRegistry, defs: dict[str, Any]) -> None:
    refs = _params(registry, defs)
    actions = sorted(refs)
    defs["rollback"] = {
        "anyOf": [
            {"type": "object", "additionalProperties": False, "required": ["none"],
             "properties": {"none": {"type": "string", "minLength": 1, "description": "why the step has none"}}},
            {"type": "object", "additionalProperties": False, "required": ["action"],
             "properties": {"action": {"enum": actions}, "with": {"type": "object"}, "timeout": DURATION},
             "allOf": _by_action(refs)},
        ]}
    defs["step"] = {
        "type": "object", "additionalProperties": False, "required": ["id", "action"],
        "properties": {
            "id": {"type": "string", "minLength": 1},
            "action": {"enum": actions, "description": "`dr actions` lists them with their parameters"},
            "with": {"type": "object", "description": "the action's parameters"},
            "needs": {**NAMES, "description": "step ids this step waits for (default: the step before; [] for none)"},
            "when": {"type": ["string", "boolean"], "description": "a condition (template); false: skipped"},
            "timeout": DURATION,
            "retries": {"anyOf": [{"type": "integer", "minimum": 0, "maximum": 100}, {
                "type": "object", "additionalProperties": False, "properties": {
                    "count": {"type": "integer", "minimum": 0, "maximum": 100}, "delay": DURATION,
                    "backoff": {"type": "number", "minimum": 1, "maximum": 10}, "max_delay": DURATION}}]},
            "on_failure": {"enum": [item.value for item in OnFailure]},
            "rollback": {"$ref": "#/$defs/rollback"},
            "no_rollback": {"type": "string"},
            "marks": {**NAMES, "description": "e.g. service_restored"},
            "service": {"type": "string"},
            "site": {"type": "string"},
            "idempotent": {"type": "boolean"},
            "effect": {"enum": [item.value for item in Effect]},
            "before_checks": {"type": "string"},
            "description": {"type": "string"},
        },
        "allOf": _by_action(refs),
    }
    defs["steps"] = {"type": "array", "minItems": 1, "items": {"$ref": "#/$defs/step"}}


def _runbook_body(defs: dict[str, Any]) -> dict[str, Any]:
    defs["approvals"] = _model_schema(ApprovalPolicy, "approvals.", defs)
    parameter = {"type": "object", "additionalProperties": False, "properties": {
        "default": {}, "required": {"type": "boolean"}, "description": {"type": "string"},
        "choices": {"type": "array"}, "type": {"enum": ["site", "service"]}}}
    return {
        "type": "object", "additionalProperties": False, "required": ["name", "steps"],
        "properties": {
            "name": {"type": "string", "minLength": 1},
            "description": {"type": "string"},
            "kind": {"type": "string", "description": "failover, switchover, failback or rehearsal"},
            "scope": {"type": "object", "additionalProperties": False,
                      "properties": {"services": NAMES, "sites": NAMES}},
            "parameters": {"type": "object", "additionalProperties": {
                "anyOf": [parameter, {"type": ["string", "number", "boolean", "null", "array"]}]},
                "description": "name: default, or name: {default, required, description, choices, type}"},
            "steps": {"$ref": "#/$defs/steps"},
            "max_parallel": {"type": "integer", "minimum": 1, "maximum": 256},
            "approvals": {"$ref": "#/$defs/approvals"},
        },
    }


def _runbook(registry: ActionRegistry) -> dict[str, Any]:
    defs: dict[str, Any] = {}
    _step_defs(registry, defs)
    body = _runbook_body(defs)
    return {"$schema": DIALECT, "$id": "https://dr-orchestrator.local/schema/runbook.json",
            "title": "dr-orchestrator runbook", **body, "$defs": defs}


# --- inventories --------------------------------------------------------------------------------------


def _inventory() -> dict[str, Any]:
    defs: dict[str, Any] = {}
    defs["site"] = _model_schema(Site, "site.", defs, drop=("name",))
    defs["service"] = _model_schema(Service, "service.", defs, drop=("name",), durations=("rto", "rpo"))
    defs["service"]["properties"]["sites"] = {**defs["service"]["properties"]["sites"], "type": "array",
                                              "items": {"type": "string"}}
    defs["service"]["properties"].pop("criticality", None)
    defs["capability"] = _model_schema(Capability, "capability.", defs)
    dr = {
        "type": "object", "additionalProperties": False, "required": ["sites", "services"],
        "properties": {
            "name": {"type": "string"},
            "sites": {"type": "object", "additionalProperties": {"anyOf": [{"$ref": "#/$defs/site"},
                                                                            {"type": "null"}]}},
            "services": {"type": "object", "additionalProperties": {"$ref": "#/$defs/service"}},
            "vars": {"type": "object"},
            "safety": {"type": "object", "description": "docs/security.md"},
            "capability": {"$ref": "#/$defs/capability"},
            "watch": {"type": "object", "description": "docs/watch.md"},
        },
    }
    group = {"type": ["object", "null"], "properties": {
        "hosts": {"type": ["object", "null"], "additionalProperties": {"type": ["object", "null"]}},
        "vars": {"type": ["object", "null"]},
        "children": {"type": ["object", "null"], "additionalProperties": {"$ref": "#/$defs/group"}}}}
    defs["group"] = group
    return {
        "$schema": DIALECT, "$id": "https://dr-orchestrator.local/schema/inventory.json",
        "title": "dr-orchestrator inventory (an Ansible YAML inventory with all.vars.dr)",
        "type": "object", "required": ["all"],
        "properties": {"all": {"allOf": [{"$ref": "#/$defs/group"}, {
            "type": "object", "required": ["vars"],
            "properties": {"vars": {"type": "object", "required": ["dr"], "properties": {"dr": dr}}}}]}},
        "$defs": defs,
    }


# --- drills -------------------------------------------------------------------------------------------


def _drill(registry: ActionRegistry) -> dict[str, Any]:
    defs: dict[str, Any] = {}
    _step_defs(registry, defs)
    embedded = {"anyOf": [{"const": "none"}, {"$ref": "#/$defs/steps"}, {
        "type": "object", "additionalProperties": False, "required": ["steps"],
        "properties": {"description": {"type": "string"}, "steps": {"$ref": "#/$defs/steps"}}}]}
    runbook_ref = {"type": "object", "additionalProperties": False, "required": ["path"],
                   "properties": {"path": {"type": "string"}, "parameters": {"type": "object"}}}
    checks = {"type": "array", "items": {"anyOf": [{"type": "string"}, {"$ref": "#/$defs/step"}]}}
    expectation = {"type": "object", "additionalProperties": False, "properties": {
        "rto": DURATION, "rpo": DURATION, "restore_point": DURATION, "health": checks, "data": checks}}
    settings = {name: copy.deepcopy({k: v for k, v in defs[f"with.notify.{name}"].items() if k != "required"})
                for name in ("webhook", "email") if f"with.notify.{name}" in defs}
    targets = [{"type": "object", "additionalProperties": False, "required": [channel],
                "properties": {channel: spec, "events": {"type": "array",
                                                         "items": {"enum": [e.value for e in NotifyEvent]}}}}
               for channel, spec in settings.items()]
    return {
        "$schema": DIALECT, "$id": "https://dr-orchestrator.local/schema/drill.json",
        "title": "dr-orchestrator drill (failover_tests/*.yml)",
        "type": "object", "additionalProperties": False, "required": ["name", "scenario", "inventory", "runbook"],
        "properties": {
            "name": {"type": "string", "minLength": 1},
            "description": {"type": "string"},
            "scenario": {"enum": [item.value for item in ScenarioCategory]},
            "inventory": {"type": "string", "description": "path, relative to the drill file"},
            "fault": embedded,
            "runbook": runbook_ref,
            "expectations": {"type": "object", "additionalProperties": expectation},
            "restore": embedded,
            "failback": runbook_ref,
            "cleanup": embedded,
            "schedule": {"type": "object", "additionalProperties": False, "required": ["cron"], "properties": {
                "cron": {"type": "string", "description": "five crontab fields"}, "timezone": {"type": "string"}}},
            "pre_approved": {"type": "boolean"},
            "notify": {"type": "array", "items": {"anyOf": targets} if targets else {"type": "object"}},
        },
        "$defs": defs,
    }
