"""Immutable typed objects shared by every room. Imports nothing of the project."""

from dr_orchestrator.model.durations import parse_duration
from dr_orchestrator.model.inventory import Host, Inventory, Service, Site
from dr_orchestrator.model.run import Phase, RunKind, RunPlan, RunState, StepState
from dr_orchestrator.model.runbook import (
    OnFailure,
    Parameter,
    Retries,
    RollbackSpec,
    Runbook,
    Step,
)

__all__ = [
    "Host",
    "Inventory",
    "OnFailure",
    "Parameter",
    "Phase",
    "Retries",
    "RollbackSpec",
    "Runbook",
    "RunKind",
    "RunPlan",
    "RunState",
    "Service",
    "Site",
    "Step",
    "StepState",
    "parse_duration",
]
