"""The lab's load generator and its ground-truth report (``dr lab load start|stop|report``).

The functions import their modules when called: httpx, psycopg and rich cost about 0.3 s, and the
`dr` command imports this package just to list its subcommands.
"""

from __future__ import annotations

from typing import Any

from dr_orchestrator.lab.config import LabConfig
from dr_orchestrator.lab.load.defaults import DEFAULT_RATE, DEFAULT_TIMEOUT, LoadError
from dr_orchestrator.lab.load.ledger import ledger_path


def start_load(config: LabConfig, rate: float = DEFAULT_RATE, timeout: float = DEFAULT_TIMEOUT) -> int:
    """Start the detached load generator; return its pid. Raises LoadError if one already runs."""
    from dr_orchestrator.lab.load.process import start_generator

    return start_generator(config, rate, timeout)


def stop_load(config: LabConfig) -> int | None:
    """Stop the load generator if one runs (the lab's ``down`` calls this); return its pid or None."""
    from dr_orchestrator.lab.load.process import stop_generator

    return stop_generator(config.root)


def load_running(config: LabConfig) -> int | None:
    """The running generator's pid, or None."""
    from dr_orchestrator.lab.load.process import running_pid

    return running_pid(config.root)


def load_report(config: LabConfig) -> dict[str, Any]:
    """Ground truth of the latest load run, as JSON-ready data (see ``report.build_report``)."""
    from dr_orchestrator.lab.load.report import build_report

    return build_report(config)


__all__ = [
    "DEFAULT_RATE",
    "DEFAULT_TIMEOUT",
    "LoadError",
    "ledger_path",
    "load_report",
    "load_running",
    "start_load",
    "stop_load",
]
