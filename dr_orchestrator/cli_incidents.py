"""`dr incidents ...`: part of the `dr` command (mounted by cli.py); thin, heavy imports inside the commands."""

from __future__ import annotations

import json
from typing import Any

import click

from dr_orchestrator.cli import UserError, output_option, session_factory


@click.group()
def incidents() -> None:
    """Incidents: the runs (attempts, retries, failback) of one disruption, and its impact start."""


@incidents.command("list")
@click.option("--limit", default=50, show_default=True)
@output_option
@click.pass_context
def incidents_list(ctx: click.Context, limit: int, output: str) -> None:
    """Newest first."""
    from dr_orchestrator.evidence.incidents import list_incidents
    from dr_orchestrator.progress import print_incident_list

    with session_factory(ctx)() as session:
        rows = list_incidents(session, limit=limit)
    if output == "json":
        click.echo(json.dumps(rows, indent=2))
    else:
        print_incident_list(rows)


@incidents.command("show")
@click.argument("incident_id")
@output_option
@click.pass_context
def incidents_show(ctx: click.Context, incident_id: str, output: str) -> None:
    """Its runs in order with state and RTO/RPO, and the impact start with how it was determined."""
    from dr_orchestrator.evidence.incidents import incident_detail
    from dr_orchestrator.progress import print_incident

    with session_factory(ctx)() as session:
        detail: dict[str, Any] | None = incident_detail(session, incident_id)
    if detail is None:
        raise UserError(f"no incident {incident_id!r} in the evidence database (see `dr incidents list`)")
    if output == "json":
        click.echo(json.dumps(detail, indent=2))
    else:
        print_incident(detail)
