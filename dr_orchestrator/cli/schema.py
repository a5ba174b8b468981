"""`dr schema`: the JSON Schema of runbook, inventory and drill files."""

from __future__ import annotations

import json

import click


@click.command("schema")
@click.argument("kind", type=click.Choice(["runbook", "inventory", "drill"]))
def schema_command(kind: str) -> None:
    """Print the JSON Schema (draft 2020-12) of a runbook, inventory or drill file, for editors
    (yaml-language-server) and linters; a step's `with:` is checked against its action's parameters."""
    from dr_orchestrator.actions import default_registry
    from dr_orchestrator.schemas import schema

    click.echo(json.dumps(schema(kind, default_registry()), indent=2))
