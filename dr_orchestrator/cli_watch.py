"""`dr watch ...`: part of the `dr` command (mounted by cli.py); thin, heavy imports inside the commands."""

from __future__ import annotations

import json

import click

from dr_orchestrator.cli import UserError, output_option, session_factory


@click.group()
def watch() -> None:
    """The watch: detect outages, classify them, and act by the inventory's policies (dr.watch)."""


@watch.command("automation")
@click.argument("state", required=False, type=click.Choice(["on", "off"]))
@click.option("--reason", help="why (required to switch; recorded with who and when)")
@output_option
@click.pass_context
def watch_automation(ctx: click.Context, state: str | None, reason: str | None, output: str) -> None:
    """Switch the watch's automation off or on (audited), or show who switched it last.

    Off, every incident only notifies: nothing runs by itself, not even after approvals, until it is
    switched on again. Never switched, each inventory's dr.watch.automation applies."""
    from dr_orchestrator.plans import default_actor
    from dr_orchestrator.watch.automation import automation_state, switch_automation

    if state is not None and not (reason or "").strip():
        raise UserError(f'say why with --reason: `dr watch automation {state} --reason "..."` (it is audited)')
    with session_factory(ctx)() as session, session.begin():
        if state is None:
            current = automation_state(session, default=True)
        else:
            current = switch_automation(session, state == "on", default_actor(), (reason or "").strip())
    if output == "json":
        click.echo(json.dumps({"on": current.on, "by": current.by, "reason": current.reason,
                               "at": current.at.isoformat() if current.at else None}))
    elif current.by is None:
        click.echo("automation has never been switched: each inventory's dr.watch.automation applies")
    else:
        click.echo(current.describe())
