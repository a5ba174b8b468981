"""`dr runs ...`: the runs recorded in the evidence database."""

from __future__ import annotations

import json

import click

from dr_orchestrator.cli.common import UserError, output_option, session_factory


@click.group()
def runs() -> None:
    """Runs recorded in the evidence database."""


@runs.command("list")
@click.option("--service", help="only runs that touched this service")
@click.option("--kind", type=click.Choice(["failover", "switchover", "failback", "rehearsal"]))
@click.option("--state")
@click.option("--limit", default=50, show_default=True)
@output_option
@click.pass_context
def runs_list(ctx: click.Context, service: str | None, kind: str | None, state: str | None, limit: int,
              output: str) -> None:
    """Newest runs first."""
    from dr_orchestrator.evidence import queries
    from dr_orchestrator.progress import print_run_list

    with session_factory(ctx)() as session:
        rows = queries.list_runs(session, service=service, kind=kind, state=state, limit=limit)
    if output == "json":
        click.echo(json.dumps(rows, indent=2, default=str))
    else:
        print_run_list(rows)


@runs.command("show")
@click.argument("run_id")
@output_option
@click.pass_context
def runs_show(ctx: click.Context, run_id: str, output: str) -> None:
    """Timeline of steps and attempts, outputs, RTO/RPO with the raw timestamps behind them."""
    from dr_orchestrator.evidence import queries
    from dr_orchestrator.progress import print_run_detail

    with session_factory(ctx)() as session:
        try:
            detail = queries.run_detail(session, run_id)
        except queries.AmbiguousRunId as exc:
            raise UserError(str(exc)) from None
    if detail is None:
        raise UserError(f"no run {run_id!r} in the evidence database (see `dr runs list`)")
    if output == "json":
        click.echo(json.dumps(detail, indent=2, default=str))
    else:
        print_run_detail(detail)
