"""Classification and policy: what an incident of a target is (its severity level) and what the
watch does about it (auto, approve, notify, or nothing while silenced), with every reason.

Pure: everything comes in as arguments (the inventory's ``dr.watch``, the automation switch's state,
the last automatic run of the target, the time); the one thing read is a mapped runbook's list of
parameters (cached while the file is unchanged), to know whether it takes ``to_site``.
"""

from __future__ import annotations

import functools
import os
from collections.abc import Mapping
from dataclasses import dataclass
from datetime import datetime, timedelta
from pathlib import Path
from typing import Any, Literal

from dr_orchestrator.model.durations import format_duration
from dr_orchestrator.model.inventory import Inventory
from dr_orchestrator.model.watch import PLACEHOLDER, LevelRule, RunbookMapping, WatchSettings, settings_of
from dr_orchestrator.watch.observations import Target
from dr_orchestrator.yamlsource import LoadError, read_yaml

__all__ = ["AutomationState", "Decision", "decide", "settings_of"]

DecidedPolicy = Literal["auto", "approve", "notify", "none"]
_TRUE = ("true", "yes", "1")
CYBER_ATTACK = "cyber_attack"  # a drill's scenario category (model.drill.ScenarioCategory)


@dataclass(frozen=True)
class AutomationState:
    """The audited automation switch (``dr watch automation off|on``), or the inventory's default
    when nobody has switched it (``by`` None)."""

    on: bool
    by: str | None = None
    at: datetime | None = None
    reason: str = ""

    def describe(self) -> str:
        state = "on" if self.on else "off"
        if self.by is None:
            return f"automation is {state} (the inventory's dr.watch.automation)"
        when = f" at {self.at.isoformat(timespec='seconds')}" if self.at else ""
        return f"automation was switched {state} by {self.by}{when}: {self.reason}"


@dataclass(frozen=True)
class Decision:
    level: str  # the inventory's severity level name
    policy: DecidedPolicy  # none: silenced (nobody is notified, nothing runs)
    runbook: str | None  # the mapped runbook, resolved against the inventory file's directory
    parameters: dict[str, Any]
    reasons: tuple[str, ...]  # why this level and this policy, for the evidence and notifications


def decide(watch: WatchSettings, inventory: Inventory, target: Target, *, data_integrity: bool = False,
           labels: Mapping[str, str] | None = None, now: datetime, last_automatic_run: datetime | None = None,
           automation: AutomationState | None = None, inventory_dir: str | Path | None = None) -> Decision:
    """The level (the first of ``watch.levels`` whose conditions match), its policy for the target
    (the service's or site's override, else the default), then what lowers it: a silence (none),
    automation off or a maintenance window (notify), an automatic run of the same target within
    ``anti_flapping`` (approve: never a second automatic failover), no runbook to run (notify).

    ``labels``: ``site`` names the site where a service failed (default: its primary site);
    ``data_integrity=true`` or ``scenario=cyber_attack`` put data integrity in doubt.
    ``automation``: the switch's state (default: the inventory's ``automation``)."""
    labels = labels or {}
    failed_site = _failed_site(inventory, target, labels)
    doubt = _integrity_doubt(data_integrity, labels)
    level, why = _classify(watch, inventory, target, doubt)
    policy, source = _policy(watch, target, level)
    reasons = [why, source]
    runbook, parameters, missing = _runbook(watch, inventory, target, failed_site, inventory_dir)
    silence = next((s for s in watch.silences if (s.kind, s.name) == (target.kind, target.name) and now < s.until),
                   None)
    automation = automation or AutomationState(on=watch.automation)
    window = next((w for w in watch.maintenance if w.covers(target.kind, target.name, failed_site, now)), None)
    if silence is not None:
        policy = "none"
        reasons.append(f"{target} is silenced until {silence.until.isoformat()}: {silence.reason}")
    elif policy != "notify" and not automation.on:
        policy = "notify"
        reasons.append(f"nothing runs by itself: {automation.describe()}")
    elif policy != "notify" and window is not None:
        policy = "notify"
        reasons.append(f"nothing runs by itself in the maintenance window {window.start.isoformat()} to "
                       f"{window.end.isoformat()}: {window.reason}")
    elif policy == "auto" and last_automatic_run is not None \
            and now - last_automatic_run < timedelta(seconds=watch.anti_flapping):
        policy = "approve"
        reasons.append(f"an automatic run for {target} started at {last_automatic_run.isoformat()}, within "
                       f"anti_flapping ({format_duration(watch.anti_flapping)}): a second one needs approval")
    if policy in ("auto", "approve") and runbook is None:
        policy = "notify"
        reasons.append(missing)
    return Decision(level, policy, runbook, parameters, tuple(reasons))


def _failed_site(inventory: Inventory, target: Target, labels: Mapping[str, str]) -> str:
    if target.kind == "site":
        return target.name
    service = inventory.services[target.name]
    named = labels.get("site")
    return named if named in service.sites else service.primary_site


def _integrity_doubt(declared: bool, labels: Mapping[str, str]) -> str | None:
    """Why data integrity is in doubt, or None."""
    if declared:
        return "data integrity is in doubt"
    if labels.get("data_integrity", "").lower() in _TRUE:
        return f"data integrity is in doubt (label data_integrity={labels['data_integrity']})"
    if labels.get("scenario") == CYBER_ATTACK:
        return f"data integrity is in doubt (scenario {CYBER_ATTACK})"
    return None


def _classify(watch: WatchSettings, inventory: Inventory, target: Target, doubt: str | None) -> tuple[str, str]:
    hit = [target.name] if target.kind == "service" else \
        [name for name, service in inventory.services.items() if target.name in service.sites]
    for level, rule in watch.levels.items():
        matched = _matches(rule, inventory, target, hit, doubt)
        if matched is not None:
            return level, f"level {level}: {matched}"
    last = list(watch.levels)[-1]
    return last, f"level {last}: no level's conditions match, so the last applies"


def _matches(rule: LevelRule, inventory: Inventory, target: Target, hit: list[str], doubt: str | None) -> str | None:
    """Why ``rule`` matches (any one of its conditions), or None."""
    if rule.unconditional:
        return "it has no condition (every incident no level above takes)"
    if rule.scope == target.kind:
        return f"{target} is down (scope {rule.scope})"
    for name in hit:
        if inventory.services[name].tier in rule.tiers:
            return f"service {name} is of tier {inventory.services[name].tier}"
        if name in rule.services:
            return f"service {name} is hit"
    if rule.data_integrity and doubt is not None:
        return doubt
    return None


def _policy(watch: WatchSettings, target: Target, level: str) -> tuple[DecidedPolicy, str]:
    overrides = (watch.policies.services if target.kind == "service" else watch.policies.sites).get(target.name, {})
    if level in overrides:
        return overrides[level], f"policy {overrides[level]}: {target}'s own for level {level}"
    if level in watch.policies.default:
        return watch.policies.default[level], f"policy {watch.policies.default[level]}: the default for level {level}"
    return "notify", f"policy notify: no policy is set for level {level}"


def _runbook(watch: WatchSettings, inventory: Inventory, target: Target, failed_site: str,
             inventory_dir: str | Path | None) -> tuple[str | None, dict[str, Any], str]:
    """The runbook's path and its parameters, or None with why not."""
    mapping: RunbookMapping | None = watch.runbooks.site if target.kind == "site" \
        else watch.runbooks.services.get(target.name)
    if mapping is None:
        where = "runbooks.site" if target.kind == "site" else f"runbooks.services.{target.name}"
        return None, {}, f"no runbook to run: dr.watch.{where} is not set"
    path = os.path.abspath(Path(inventory_dir or ".") / mapping.path)
    try:
        accepted = _parameters_of(path, os.stat(path).st_mtime_ns)
    except OSError as exc:
        return None, {}, f"no runbook to run: {path}: {exc.strerror}"
    values = {"site": failed_site, "service": target.name}
    parameters: dict[str, Any] = {}
    candidates = inventory.sites if target.kind == "site" else inventory.services[target.name].sites
    other = next((site for site in candidates if site != failed_site), None)
    if "to_site" in accepted and other is not None:
        parameters["to_site"] = other
    for name, value in mapping.parameters.items():
        parameters[name] = PLACEHOLDER.sub(lambda match: values.get(match.group(1), match.group(0)), value) \
            if isinstance(value, str) else value
    return path, parameters, ""


@functools.lru_cache(maxsize=64)
def _parameters_of(path: str, mtime_ns: int) -> frozenset[str]:
    """The parameters a runbook declares (``mtime_ns``: read again once the file changes). A runbook
    that cannot be read declares none here; planning its run reports why."""
    try:
        data = read_yaml(path).data
    except LoadError:
        return frozenset()
    declared = data.get("parameters") if isinstance(data, dict) else None
    return frozenset(declared) if isinstance(declared, dict) else frozenset()
