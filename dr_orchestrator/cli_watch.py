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


@watch.command("run")
@click.option("-i", "--inventory", "inventory_path", required=True, type=click.Path(dir_okay=False),
              help="the inventory to watch (its dr.watch section says how)")
@click.pass_context
def watch_run(ctx: click.Context, inventory_path: str) -> None:
    """Watch every service and site until Ctrl-C or SIGTERM: open incidents when independent observers
    agree that something is down, and act by the inventory's policies."""
    import logging
    import signal
    import threading

    from dr_orchestrator.loading import load_inventory, watch_runbook_problems
    from dr_orchestrator.watch.service import Watch
    from dr_orchestrator.yamlsource import LoadError

    try:
        inventory, document = load_inventory(inventory_path)
    except LoadError as exc:
        raise UserError("; ".join(str(problem) for problem in exc.problems)) from None
    problems = watch_runbook_problems(inventory, document)
    if problems:
        raise UserError("; ".join(str(problem) for problem in problems))
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(message)s")
    stop = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    from dr_orchestrator.watch.observers import ObserverSetupError

    try:
        watcher = Watch(inventory_path, session_factory(ctx))
    except ObserverSetupError as exc:
        raise UserError(str(exc)) from None
    click.echo(f"watching {inventory.name}: {len(inventory.services)} services, {len(inventory.sites)} sites "
               f"(Ctrl-C to stop)")
    try:
        watcher.run(stop)
    except KeyboardInterrupt:
        stop.set()
    click.echo("watch stopped")
