"""`dr watch ...`: the watch and its automation switch; thin, heavy imports inside the commands."""

from __future__ import annotations

import json
from typing import Any

import click

from dr_orchestrator.cli.common import (
    UserError,
    announce,
    log_format_of,
    output_option,
    run_until_stopped,
    session_factory,
)


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
    from dr_orchestrator.logs import log_to_terminal

    watcher = prepared_watch(ctx, inventory_path)
    log_to_terminal(log_format_of(ctx), "%(asctime)s %(levelname)s %(message)s")
    inventory = watcher.inventory
    announce(ctx, f"watching {inventory.name}: {len(inventory.services)} services, {len(inventory.sites)} sites "
                  f"(Ctrl-C to stop)")
    run_until_stopped(watcher.run)
    announce(ctx, "watch stopped")


@watch.command("warnings")
@click.option("-i", "--inventory", "inventory_path", required=True, type=click.Path(dir_okay=False),
              help="the inventory to probe")
@click.option("--drills", "drills_dir", default="failover_tests", show_default=True,
              help="the drill files whose schedules say when a drill is overdue")
@output_option
@click.pass_context
def watch_warnings(ctx: click.Context, inventory_path: str, drills_dir: str, output: str) -> None:
    """Early warnings now, from one round of probes and the evidence: replication behind a service's RPO
    target or not streaming, a recovery site unreachable, a certificate near expiry, a host missing from
    known_hosts, a drill overdue. Exit code 0 when there is none, 1 when there is any."""
    from datetime import UTC, datetime

    from dr_orchestrator.loading import load_inventory
    from dr_orchestrator.watch.observers import ObserverSetupError, Prober
    from dr_orchestrator.watch.warnings import active_warnings, gather_facts
    from dr_orchestrator.yamlsource import LoadError

    try:
        inventory, _ = load_inventory(inventory_path)
        prober = Prober(inventory, wait_s=1.0)
    except LoadError as exc:
        raise UserError("; ".join(str(problem) for problem in exc.problems)) from None
    except ObserverSetupError as exc:
        raise UserError(str(exc)) from None
    with prober:
        prober.round()
    now = datetime.now(UTC)
    with session_factory(ctx)() as session:
        facts = gather_facts(inventory, inventory_path, session, drills_dir=drills_dir, now=now)
    found = active_warnings(inventory, prober.readings, facts, now)
    if output == "json":
        click.echo(json.dumps({"warnings": [warning.as_dict() for warning in found]}, indent=2))
    elif not found:
        click.echo(f"no early warnings for {inventory.name}")
    for warning in found if output != "json" else ():
        click.echo(f"{warning.severity:8}  {warning.target}: {warning.message}")
    ctx.exit(1 if found else 0)


def prepared_watch(ctx: click.Context, inventory_path: str) -> Any:
    """A Watch of the inventory, or UserError naming what is wrong with it (exit code 2)."""
    from dr_orchestrator.loading import load_inventory, watch_runbook_problems
    from dr_orchestrator.watch.notify import setup_problems
    from dr_orchestrator.watch.observers import ObserverSetupError
    from dr_orchestrator.watch.policy import settings_of
    from dr_orchestrator.watch.service import Watch
    from dr_orchestrator.yamlsource import LoadError

    try:
        inventory, document = load_inventory(inventory_path)
    except LoadError as exc:
        raise UserError("; ".join(str(problem) for problem in exc.problems)) from None
    problems = watch_runbook_problems(inventory, document)
    if problems:
        raise UserError("; ".join(str(problem) for problem in problems))
    if notify_problems := setup_problems(settings_of(inventory)):
        raise UserError("; ".join(notify_problems))
    try:
        return Watch(inventory_path, session_factory(ctx))
    except ObserverSetupError as exc:
        raise UserError(str(exc)) from None
