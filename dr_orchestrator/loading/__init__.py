"""YAML files to typed model objects. Every problem names file, line, field and the fix.

The modules of loading (docs/architecture.md): ``inventory`` (Ansible YAML inventories), ``runbook`` (a
runbook file read as far as it is well-formed, by the ordered passes of ``checks``, with the shorthands of
``shorthands``), ``templates`` (the steps' templates), ``references`` (the steps against the inventory and
the actions), ``parameters`` (a run's values), ``change_order`` (checks before changes), ``files`` (both
files checked in one pass), ``configs`` (a cluster node's file) and ``problems`` (what they share). What
the rest of the product uses is re-exported here; the modules import one another, never this package.
"""

from dr_orchestrator.loading.change_order import EffectLookup, change_order_problems, step_effect
from dr_orchestrator.loading.configs import load_node_config
from dr_orchestrator.loading.files import Checked, check_files, check_runbook, validate
from dr_orchestrator.loading.inventory import load_inventory, watch_runbook_problems
from dr_orchestrator.loading.parameters import parameter_values
from dr_orchestrator.loading.problems import pydantic_problems
from dr_orchestrator.loading.references import ParamsLookup, inventory_reference
from dr_orchestrator.loading.runbook import load_runbook, parse_runbook

__all__ = [
    "Checked",
    "EffectLookup",
    "ParamsLookup",
    "change_order_problems",
    "check_files",
    "check_runbook",
    "inventory_reference",
    "load_inventory",
    "load_node_config",
    "load_runbook",
    "parameter_values",
    "parse_runbook",
    "pydantic_problems",
    "step_effect",
    "validate",
    "watch_runbook_problems",
]
