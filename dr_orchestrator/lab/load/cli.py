"""`dr lab load start|stop|report`: thin commands over the load package's functions."""

from __future__ import annotations

import json

import click

from dr_orchestrator.lab.config import LabConfig, LabConfigError
from dr_orchestrator.lab.load import (
    DEFAULT_RATE,
    DEFAULT_TIMEOUT,
    LoadError,
    ledger_path,
    load_report,
    start_load,
    stop_load,
)


class LoadUsageError(click.ClickException):
    """One sentence for the user, exit code 2, no traceback."""

    exit_code = 2


def _config(ctx: click.Context) -> LabConfig:
    """The lab group's config when it put one in the context, else the environment's (DR_LAB_DIR, ...)."""
    config = ctx.find_object(LabConfig)
    if config is not None:
        return config
    try:
        return LabConfig.from_env()
    except LabConfigError as error:
        raise LoadUsageError(str(error)) from None


@click.group("load")
def load_group() -> None:
    """Drive the lab's services through the front door and keep a ledger (ground truth for RTO/RPO)."""


@load_group.command("start")
@click.option(
    "--rate",
    type=click.FloatRange(min=0, min_open=True),
    default=DEFAULT_RATE,
    show_default=True,
    help="requests per second per service",
)
@click.option(
    "--timeout",
    type=click.FloatRange(min=0, min_open=True),
    default=DEFAULT_TIMEOUT,
    show_default=True,
    help="seconds before a request counts as failed",
)
@click.pass_context
def start_command(ctx: click.Context, rate: float, timeout: float) -> None:
    """Start the load generator in the background."""
    config = _config(ctx)
    if not config.marker.exists():
        raise LoadUsageError(f"There is no lab at {config.root}; start it with `dr lab up` first.")
    try:
        pid = start_load(config, rate=rate, timeout=timeout)
    except LoadError as error:
        raise LoadUsageError(str(error)) from None
    click.echo(
        f"Load generator started (pid {pid}): {rate:g} requests/s per service through the front door, "
        f"ledger {ledger_path(config.root)}."
    )


@load_group.command("stop")
@click.pass_context
def stop_command(ctx: click.Context) -> None:
    """Stop the load generator; its ledger stays for `report`."""
    try:
        pid = stop_load(_config(ctx))
    except LoadError as error:
        raise LoadUsageError(str(error)) from None
    if pid is None:
        click.echo("No load generator was running.")
    else:
        click.echo(f"Load generator stopped (pid {pid}); `dr lab load report` gives the ground truth.")


@load_group.command("report")
@click.option(
    "--output",
    "-o",
    type=click.Choice(["text", "json"]),
    default="text",
    show_default=True,
    help="text for people, json for scripts",
)
@click.pass_context
def report_command(ctx: click.Context, output: str) -> None:
    """Ground truth of the latest load run: outages the client saw, acknowledged writes now missing."""
    try:
        report = load_report(_config(ctx))
    except LoadError as error:
        raise LoadUsageError(str(error)) from None
    if output == "json":
        click.echo(json.dumps(report, indent=2))
    else:
        from rich.console import Console

        from dr_orchestrator.lab.load.render import render_report

        Console().print(render_report(report))
