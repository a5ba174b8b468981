"""Safety pre-flight: the inventory's rules (``dr.safety``) checked before a run's first step.

The run's change: each service in its scope moves to its target site, which is the rendered
``site`` of the steps marked ``service_restored`` for it, else the value of the first runbook
parameter named in ``safety.target_site_parameters`` (``to_site``, ``target_site``, ``home_site``).
Readiness checks of the sites involved run once each, as ``http.check`` / ``tcp.check``.

Everything is recorded under the step id ``preflight``: each check (``safety.readiness``), each
rule's verdict (``safety.rule``) and each override (``safety.override``, with rule, actor, reason).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from dr_orchestrator import templating
from dr_orchestrator.model.run import RunPlan
from dr_orchestrator.model.safety import (
    RULES,
    SERVICE_SERVED,
    TARGET_READY,
    ReadinessCheck,
    SafetyPolicy,
    override_text,
    policy_of,
)

RESTORED = "service_restored"

# (site, check) -> (ok, what happened); runs the check as an action of the run
CheckRunner = Callable[[str, ReadinessCheck], tuple[bool, str]]
# (kind, data) -> records it as an action event of the pre-flight
Reporter = Callable[[str, dict[str, Any]], None]


@dataclass(frozen=True)
class Violation:
    rule: str
    problem: str


def target_sites(plan: RunPlan, policy: SafetyPolicy, render: Callable[[str], Any]) -> dict[str, set[str]]:
    """Per service in scope, the site(s) the run moves it to (absent: the run does not say)."""
    targets: dict[str, set[str]] = {}
    for step in plan.runbook.steps:
        if RESTORED not in step.marks or not step.site:
            continue
        service = plan.service_of(step)
        try:
            site = render(step.site)
        except templating.TemplateError:
            continue  # reads a step's output: known only during the run
        if service and isinstance(site, str):
            targets.setdefault(service, set()).add(site)
    for name in policy.target_site_parameters:
        value = plan.parameters.get(name)
        if isinstance(value, str) and value in plan.inventory.sites:
            for service in plan.services_in_scope():
                targets.setdefault(service, {value})
            break
    return targets


class _Readiness:
    """Each site's checks, run at most once, in the order they are asked for."""

    def __init__(self, policy: SafetyPolicy, run_check: CheckRunner, report: Reporter) -> None:
        self.policy = policy
        self.run_check = run_check
        self.report = report
        self.results: dict[tuple[str, int], tuple[bool, str]] = {}

    def failures(self, site: str, services: set[str] | None) -> list[str]:
        """What failed among the site's checks about the whole site or one of ``services`` (None: any)."""
        failed = []
        for index, check in enumerate(self.policy.readiness.get(site, ())):
            if check.service is not None and services is not None and check.service not in services:
                continue
            if (site, index) not in self.results:
                ok, detail = self.run_check(site, check)
                self.results[(site, index)] = ok, detail
                self.report("safety.readiness", {"site": site, "check": check.target, "service": check.service,
                                                 "ok": ok, "detail": detail})
            ok, detail = self.results[(site, index)]
            if not ok:
                failed.append(f"{check.target}: {detail}")
        return failed


def violations(plan: RunPlan, policy: SafetyPolicy, targets: dict[str, set[str]],
               readiness: _Readiness) -> list[Violation]:
    found: list[Violation] = []
    scope = set(plan.services_in_scope())
    if policy.enabled(TARGET_READY):
        for site in sorted(set().union(*targets.values()) if targets else set()):
            failed = readiness.failures(site, scope)
            if failed:
                found.append(Violation(TARGET_READY, f"site {site}, where the run moves "
                                       f"{', '.join(sorted(s for s in targets if site in targets[s]))}, is not "
                                       f"ready ({'; '.join(failed)})"))
    if policy.enabled(SERVICE_SERVED):
        for name in sorted(scope):
            service = plan.inventory.services[name]
            after = targets.get(name) or set(service.sites)
            declared = sorted(site for site in after if site in service.sites)
            if not declared:
                found.append(Violation(SERVICE_SERVED, f"after this run {name} would be served at "
                                       f"{', '.join(sorted(after))}, and the inventory says only "
                                       f"{', '.join(service.sites)} serve it"))
                continue
            unready = {site: readiness.failures(site, {name}) for site in declared}
            if all(unready.values()):
                reasons = "; ".join(f"{site}: {', '.join(problems)}" for site, problems in unready.items())
                found.append(Violation(SERVICE_SERVED, f"no site would serve {name} after this run ({reasons})"))
    return found


def check(plan: RunPlan, render: Callable[[str], Any], run_check: CheckRunner, report: Reporter) -> str | None:
    """Run the pre-flight; the sentence refusing the run, or None to go on (overrides recorded)."""
    policy = policy_of(plan.inventory)
    for rule, enabled in policy.rules.items():
        if not enabled:
            report("safety.rule", {"rule": rule, "rule_text": RULES[rule], "enabled": False})
    readiness = _Readiness(policy, run_check, report)
    targets = target_sites(plan, policy, render)
    found = violations(plan, policy, targets, readiness)
    for violation in found:
        report("safety.rule", {"rule": violation.rule, "rule_text": RULES[violation.rule], "enabled": True,
                               "ok": False, "problem": violation.problem})
    if found and plan.forced:
        for violation in found:
            report("safety.override", {"rule": violation.rule, "problem": violation.problem,
                                       "actor": plan.started_by, "reason": "; ".join(plan.forced)})
        return None
    if found:
        first = found[0]
        return f"safety rule {first.rule} refused the run: {first.problem}; {override_text(first.rule)}"
    return None
