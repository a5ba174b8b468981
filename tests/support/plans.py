"""Run plans for tests: a runbook's YAML text, loaded against a small two-site inventory."""

from __future__ import annotations

import hashlib
import json
import textwrap
from typing import Any

from dr_orchestrator.loading import load_inventory, load_runbook
from dr_orchestrator.model.run import RunPlan, SourceDocument

# Two sites and one service (trading), a host at each site.
INVENTORY = """\
all:
  vars:
    dr:
      name: test
      sites: {primary: {}, backup: {}}
      services:
        trading: {rto: 60s, rpo: 0s, sites: [primary, backup]}
  children:
    primary: {hosts: {p1: {ansible_host: 127.0.0.1}}}
    backup: {hosts: {b1: {ansible_host: 127.0.0.1}}}
"""


def source(path: str, text: str) -> SourceDocument:
    return SourceDocument(path=path, sha256=hashlib.sha256(text.encode()).hexdigest(), text=text)


def make_plan(runbook_yaml: str, inventory: str = INVENTORY, parameters: dict[str, Any] | None = None,
              guarded: bool = True) -> RunPlan:
    """The plan of ``runbook_yaml`` (dedented) on ``inventory``; parameters not given take their defaults."""
    text = textwrap.dedent(runbook_yaml)
    runbook, _ = load_runbook("runbook.yml", text)
    loaded, _ = load_inventory("inventory.yml", inventory)
    params = {name: p.default for name, p in runbook.parameters.items()} | (parameters or {})
    return RunPlan(
        runbook=runbook,
        inventory=loaded,
        parameters=params,
        runbook_source=source("runbook.yml", text),
        inventory_source=source("inventory.yml", inventory),
        parameters_sha256=hashlib.sha256(json.dumps(params, sort_keys=True).encode()).hexdigest(),
        guarded=guarded,
    )
