"""From files on disk to an immutable RunPlan, and what `dr plan` shows of it.

Shared by the CLI, the HTTP API and the scheduler, so all three check and build plans alike.
"""

from __future__ import annotations

import hashlib
import json
import os
import pwd
from collections.abc import Callable, Iterator
from datetime import datetime
from pathlib import Path
from typing import Any

import yaml

from dr_orchestrator import templating
from dr_orchestrator.actions import default_registry
from dr_orchestrator.actions.base import ActionRegistry
from dr_orchestrator.engine.context import template_context
from dr_orchestrator.loading import check_files, validate
from dr_orchestrator.model.approval import Identity
from dr_orchestrator.model.run import RunKind, RunPlan, SourceDocument
from dr_orchestrator.yamlsource import LoadError, Problem, YamlDocument


class PlanError(Exception):
    """The user asked for something that cannot be planned; one clear sentence."""


def parse_overrides(pairs: list[str]) -> dict[str, Any]:
    """``key=value`` pairs from the command line; values are read as YAML scalars (3, true, text)."""
    overrides: dict[str, Any] = {}
    for pair in pairs:
        key, sep, value = pair.partition("=")
        if not sep or not key.strip():
            raise PlanError(f"parameter {pair!r} is not key=value")
        try:
            overrides[key.strip()] = yaml.safe_load(value) if value else ""
        except yaml.YAMLError:
            overrides[key.strip()] = value
    return overrides


def validate_files(runbook_path: str, inventory_path: str, registry: ActionRegistry | None = None) -> list[Problem]:
    """Every problem of a runbook against an inventory (empty when clean)."""
    registry = registry or default_registry()
    return validate(runbook_path, inventory_path, registry.params_model, effect_of=registry.effect)


def build_plan(
    runbook_path: str,
    inventory_path: str,
    overrides: dict[str, Any] | None = None,
    *,
    kind: str | None = None,
    incident_at: datetime | None = None,
    started_by: str | None = None,
    reason: str = "",
    trigger: str = "manual",
    forced: tuple[str, ...] = (),
    registry: ActionRegistry | None = None,
    strict: bool = False,
    warn: Callable[[Problem], None] | None = None,
) -> RunPlan:
    """Load, check and freeze a plan; raise LoadError with every problem found, the parameters'
    included, in one pass. Warnings go to ``warn`` and stop nothing, unless ``strict``."""
    registry = registry or default_registry()
    checked = check_files(runbook_path, inventory_path, registry.params_model, given=overrides or {},
                          effect_of=registry.effect)
    if checked.errors or (strict and checked.problems):
        raise LoadError(checked.problems)
    if warn is not None:
        for warning in checked.problems:
            warn(warning)
    runbook, inventory, parameters = checked.runbook, checked.inventory, checked.parameters
    runbook_document, inventory_document = checked.runbook_document, checked.inventory_document
    assert runbook is not None and inventory is not None and runbook_document and inventory_document  # no errors
    chosen_kind = kind or runbook.kind
    try:
        run_kind = RunKind(chosen_kind)
    except ValueError:
        raise PlanError(f"kind {chosen_kind!r} is not one of {', '.join(k.value for k in RunKind)}") from None
    return RunPlan(
        runbook=runbook,
        inventory=inventory,
        parameters=parameters,
        kind=run_kind,
        incident_at=incident_at,
        started_by=started_by or default_actor(),
        reason=reason,
        trigger=trigger,
        runbook_source=_source(runbook_document),
        inventory_source=_source(inventory_document),
        parameters_sha256=hashlib.sha256(json.dumps(parameters, sort_keys=True, default=str).encode()).hexdigest(),
        forced=forced,
    )


def default_actor() -> str:
    """Who acts from this process, as the evidence records it (``model.approval.Identity``): the
    account of the real uid (not $USER or $LOGNAME, which anyone sets), SUDO_USER and the SSH client
    address when present, after the $DR_ACTOR label when one is given (a label proves nothing)."""
    uid = os.getuid()
    try:
        account = pwd.getpwuid(uid).pw_name
    except KeyError:  # a uid without a passwd entry (containers): the number is who it is
        account = str(uid)
    ssh = os.environ.get("SSH_CONNECTION", "").split()
    return str(Identity.of_process(os.environ.get("DR_ACTOR"), account, os.environ.get("SUDO_USER"),
                                   ssh[0] if ssh else None))


def _source(document: YamlDocument) -> SourceDocument:
    return SourceDocument(path=str(Path(document.path)), sha256=document.sha256, text=document.text)


# ---------------------------------------------------------------- what `dr plan` shows


class _StepOutputPlaceholder:
    """Stands in for outputs of steps that have not run: renders as ``<steps.x.output.y>``."""

    def __init__(self, path: str) -> None:
        self._path = path

    def __getattr__(self, name: str) -> _StepOutputPlaceholder:
        if name.startswith("_"):
            raise AttributeError(name)
        return _StepOutputPlaceholder(f"{self._path}.{name}")

    def __getitem__(self, key: object) -> _StepOutputPlaceholder:
        return _StepOutputPlaceholder(f"{self._path}.{key}")

    def __str__(self) -> str:
        return f"<{self._path}>"

    def __iter__(self) -> Iterator[_StepOutputPlaceholder]:
        return iter([self])

    def __bool__(self) -> bool:
        return True


def live_difference(plan: RunPlan, timeout_s: float = 2.0) -> dict[str, Any]:
    """What is live now for each service of the plan's scope, probed once as the watch probes (the
    site the front door serves it from, its front-door servers, each site's store and replication
    link), and the change the run would make: the site(s) it moves the service to."""
    from dr_orchestrator.engine.preflight import target_sites
    from dr_orchestrator.model.events import utcnow
    from dr_orchestrator.model.safety import policy_of
    from dr_orchestrator.watch.observers import Prober

    probed_at = utcnow()
    with Prober(plan.inventory, timeout_s=timeout_s, wait_s=timeout_s) as prober:
        prober.round()
        readings = prober.readings
    context = template_context(plan, {}, {})
    targets = target_sites(plan, policy_of(plan.inventory), lambda source: templating.render_string(source, context))
    services: dict[str, Any] = {}
    for name in plan.services_in_scope():
        front = readings.front.get(name)
        answer = front.value if front is not None else None
        serving = answer.site if answer is not None and answer.healthy else None
        if front is None:
            front_door = "not probed (no health URL)"
        elif answer is None:
            front_door = f"no answer: {front.error}"
        else:
            front_door = f"HTTP {answer.status} from {answer.site or 'an unnamed site'}"
        probed_servers = readings.servers.get(name)
        servers = probed_servers.value if probed_servers is not None and probed_servers.value is not None else {}
        stores = {site: _store_text(probed.value, probed.error)
                  for (service, site), probed in sorted(readings.stores.items()) if service == name}
        after = sorted(targets.get(name, ()))
        if not after:
            change = "the run does not say which site it moves the service to"
        elif serving in after:
            change = f"already served at {serving}: the run keeps it there"
        else:
            change = f"moves from {serving or 'nowhere (the front door does not serve it)'} to {', '.join(after)}"
        services[name] = {
            "served_by": serving, "front_door": front_door, "stores": stores, "after_run": after, "change": change,
            "servers": {site: f"{state.get('admin')}/{state.get('operational')}" for site, state in servers.items()},
        }
    return {"probed_at": probed_at.isoformat(), "services": services}


def _store_text(state: Any, error: str | None) -> str:
    if state is None:
        return f"no answer: {error}"
    if state.role == "primary":
        return f"{state.kind} primary ({'writable' if state.writable else 'read-only'})"
    return f"{state.kind} {state.role} of {state.upstream or '?'} ({state.link or 'no link'})"


def describe_plan(plan: RunPlan, registry: ActionRegistry | None = None) -> dict[str, Any]:
    """Execution order with parallel groups, each step's rendered parameters and the hosts it touches."""
    registry = registry or default_registry()
    runbook = plan.runbook
    run_info = {"id": "<run id>", "kind": str(plan.kind), "started_by": plan.started_by,
                "incident_at": plan.incident_at.isoformat() if plan.incident_at else "<run start>",
                "started_at": "<run start>", "forced": list(plan.forced),
                "approvals": plan.runbook.approvals.model_dump(mode="json"), "pre_approved_by": plan.pre_approved_by}
    steps_placeholder = _StepOutputPlaceholder("steps")
    by_id = {step.id: step for step in runbook.steps}  # runbook.step() per step was quadratic
    groups = []
    for number, group in enumerate(runbook.execution_groups(), start=1):
        described = []
        for step_id in group:
            step = by_id[step_id]
            service = plan.service_of(step)
            context = template_context(plan, run_info, {}, service, step.site)
            context["steps"] = steps_placeholder
            entry: dict[str, Any] = {
                "id": step.id, "action": step.action, "needs": list(step.needs), "timeout_s": step.timeout,
                "retries": step.retries.count, "on_failure": str(step.on_failure), "marks": list(step.marks),
                "service": service, "when": step.when,
            }
            try:
                rendered = templating.render_value(step.with_, context)
                entry["with"] = _plain(rendered)
                action = registry.get(step.action)
                try:
                    entry["hosts"] = action().hosts(action.Params.model_validate(rendered))
                except Exception:  # noqa: BLE001 - placeholders may not validate; hosts are a courtesy
                    entry["hosts"] = []
            except templating.TemplateError as exc:
                entry["with"] = {}
                entry["error"] = str(exc)
            if step.rollback is not None:
                entry["rollback"] = {"action": step.rollback.action}
            described.append(entry)
        groups.append({"group": number, "parallel": len(described) > 1, "steps": described})
    return {
        "runbook": runbook.name, "kind": str(plan.kind), "inventory": plan.inventory.name,
        "parameters": plan.parameters, "runbook_sha256": plan.runbook_source.sha256,
        "inventory_sha256": plan.inventory_source.sha256, "groups": groups,
    }


def _plain(value: Any) -> Any:
    if isinstance(value, dict):
        return {k: _plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    if isinstance(value, _StepOutputPlaceholder):
        return str(value)
    return value


# ---------------------------------------------------------------- saved plans: `dr plan --out`, `dr run --plan`

SAVED_PLAN_FORMAT = "dr-saved-plan/1"


def saved_plan(plan: RunPlan, overrides: dict[str, Any], saved_at: datetime) -> dict[str, Any]:
    """The document `dr plan --out` writes: what was reviewed (the rendered plan), the digests of the
    files and parameters it came from, and its own digest (an edited file is refused)."""
    document = {
        "format": SAVED_PLAN_FORMAT,
        "saved_at": saved_at.isoformat(),
        "saved_by": plan.started_by,
        "runbook": {"path": str(Path(plan.runbook_source.path).resolve()), "sha256": plan.runbook_source.sha256},
        "inventory": {"path": str(Path(plan.inventory_source.path).resolve()),
                      "sha256": plan.inventory_source.sha256},
        "overrides": overrides,
        "parameters_sha256": plan.parameters_sha256,
        "plan": describe_plan(plan),
    }
    return document | {"sha256": _digest(document)}


def read_saved_plan(path: str) -> dict[str, Any]:
    """A saved plan, checked whole; PlanError naming the file and what is wrong."""
    try:
        document = json.loads(Path(path).read_text(encoding="utf-8"))
    except OSError as exc:
        raise PlanError(f"cannot read the saved plan {path}: {exc.strerror}") from None
    except ValueError:
        raise PlanError(f"{path} is not a saved plan (not JSON); write one with `dr plan --out`") from None
    if not isinstance(document, dict) or document.get("format") != SAVED_PLAN_FORMAT:
        raise PlanError(f"{path} is not a saved plan of format {SAVED_PLAN_FORMAT}; write one with `dr plan --out`")
    claimed = document.pop("sha256", None)
    if claimed != _digest(document):
        raise PlanError(f"the saved plan {path} was edited after it was saved (its digest does not match); "
                        "save it again with `dr plan --out` and have it reviewed")
    files_named = all(isinstance(document.get(part), dict) and isinstance(document[part].get("path"), str)
                      and isinstance(document[part].get("sha256"), str) for part in ("runbook", "inventory"))
    if not files_named or not isinstance(document.get("overrides"), dict):
        raise PlanError(f"the saved plan {path} lacks its runbook, inventory or parameters")
    return document | {"sha256": claimed}


def check_against_saved(plan: RunPlan, saved: dict[str, Any], path: str) -> None:
    """Refuse (PlanError) a plan that is not exactly the saved one: its runbook, inventory or
    parameters changed since it was saved."""
    changed = [
        f"the {part} {saved[part]['path']} (SHA-256 {saved[part]['sha256'][:12]} then, {now[:12]} now)"
        for part, now in (("runbook", plan.runbook_source.sha256), ("inventory", plan.inventory_source.sha256))
        if saved[part]["sha256"] != now
    ]
    if saved.get("parameters_sha256") != plan.parameters_sha256:
        changed.append("its parameters (their defaults in the runbook or inventory)")
    if changed:
        raise PlanError(f"the plan saved in {path} at {saved.get('saved_at')} no longer matches: "
                        f"{'; '.join(changed)} changed. Review the change, save the plan again "
                        "(dr plan --out) and have it approved again")


def _digest(document: dict[str, Any]) -> str:
    return hashlib.sha256(json.dumps(document, sort_keys=True, default=str).encode()).hexdigest()
