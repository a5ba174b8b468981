"""The engine: runs a plan's DAG of steps and tells observers what happens. Knows no database."""

from dr_orchestrator.engine.context import template_context
from dr_orchestrator.engine.executor import Engine, RunOutcome

__all__ = ["Engine", "RunOutcome", "template_context"]
