"""The two-site lab on one machine (primary 127.0.10.1, backup 127.0.20.1, front door 127.0.0.1).

    from dr_orchestrator.lab import Lab, LabConfig
    lab = Lab(LabConfig(root="/tmp/my-lab", port_offset=1000))
    lab.up(); lab.status(); lab.kill_site("primary"); lab.down()

Product code never imports this package; the lab uses nothing of the product but the model.
Names are imported lazily so that `dr --help` does not pay for psycopg.
"""

from __future__ import annotations

from importlib import import_module
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from dr_orchestrator.lab.config import LabConfig, LabConfigError
    from dr_orchestrator.lab.lab import Lab, LabError, UpResult
    from dr_orchestrator.lab.system import LabSetupError, ensure_packages

_EXPORTS = {
    "LabConfig": "config", "LabConfigError": "config",
    "Lab": "lab", "LabError": "lab", "UpResult": "lab",
    "LabSetupError": "system", "ensure_packages": "system",
}

__all__ = ["Lab", "LabConfig", "LabConfigError", "LabError", "LabSetupError", "UpResult", "ensure_packages"]


def __getattr__(name: str) -> Any:
    if name not in _EXPORTS:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    return getattr(import_module(f"{__name__}.{_EXPORTS[name]}"), name)
