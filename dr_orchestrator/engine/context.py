"""What templates in a runbook can see."""

from __future__ import annotations

from typing import Any

from dr_orchestrator.model.run import RunPlan


def template_context(
    plan: RunPlan,
    run_info: dict[str, Any],
    step_results: dict[str, dict[str, Any]],
    service: str | None = None,
    site: str | None = None,
) -> dict[str, Any]:
    inventory = plan.inventory
    return {
        "params": plan.parameters,
        "inventory": inventory,
        "vars": inventory.vars,
        "services": inventory.services,
        "sites": inventory.sites,
        "hosts": inventory.hosts,
        "steps": step_results,
        "run": run_info,
        "service": inventory.services.get(service) if service else None,
        "site": site,
    }
