"""`dr lab ...`: the lab's commands (mounted by dr_orchestrator.cli as `lab_group`).

Run alone with `python -m dr_orchestrator.lab.cli`. A user's mistake or a missing part of the
machine is one sentence and exit code 2.
"""

from __future__ import annotations

import json
import sys
from collections.abc import Callable
from functools import wraps
from typing import TYPE_CHECKING, Any, TypeVar

import click

from dr_orchestrator.lab.config import (
    KILLABLE,
    PORT_OFFSET_ENV,
    POSTGRES_SERVICES,
    ROOT_ENV,
    SITES,
    LabConfig,
    LabConfigError,
)
from dr_orchestrator.lab.load.cli import load_group

if TYPE_CHECKING:
    from dr_orchestrator.lab.lab import Lab

F = TypeVar("F", bound=Callable[..., Any])


def _friendly(function: F) -> F:
    """Turn the lab's own errors into one sentence and exit code 2."""

    @wraps(function)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        from dr_orchestrator.lab.system import LabSetupError

        try:
            return function(*args, **kwargs)
        except (LabSetupError, LabConfigError) as exc:
            click.echo(f"dr lab: {exc}", err=True)
            sys.exit(2)

    return wrapper  # type: ignore[return-value]


def _lab(context: click.Context) -> Lab:
    from dr_orchestrator.lab.lab import Lab

    config: LabConfig = context.obj
    return Lab(config)


@click.group("lab")
@click.option("--root", type=click.Path(file_okay=False), default=None,
              help=f"the lab's directory [env {ROOT_ENV}; default /tmp/dr-lab]")
@click.option("--port-offset", type=int, default=None,
              help=f"added to every port of the lab [env {PORT_OFFSET_ENV}; default 0]")
@click.pass_context
@_friendly
def lab_group(context: click.Context, root: str | None, port_offset: int | None) -> None:
    """The two-site lab on this machine: primary 127.0.10.1, backup 127.0.20.1, front door 127.0.0.1."""
    context.obj = LabConfig.from_env(root=root, port_offset=port_offset)


@lab_group.command()
@click.pass_context
@_friendly
def up(context: click.Context) -> None:
    """Start both sites and the front door, and print what runs where."""
    lab = _lab(context)
    result = lab.up()
    if result.already_up:
        click.echo(f"The lab at {lab.config.root} is already up; `dr lab status` shows it, "
                   f"`dr lab down` stops it.")
        return
    click.echo(f"Lab up in {result.seconds:.1f} s at {lab.config.root}:")
    for line in result.layout:
        click.echo(f"  {line}")


@lab_group.command()
@click.pass_context
@_friendly
def down(context: click.Context) -> None:
    """Stop everything the lab started and remove its directory."""
    lab = _lab(context)
    stopped = lab.down()
    if stopped:
        click.echo(f"Lab at {lab.config.root} is down; stopped {len(stopped)} processes: {', '.join(stopped)}.")
    else:
        click.echo(f"Nothing was running; the lab at {lab.config.root} is removed.")


@lab_group.command()
@click.option("--output", "-o", type=click.Choice(["text", "json"]), default="text", show_default=True)
@click.pass_context
@_friendly
def status(context: click.Context, output: str) -> None:
    """Every process, its health, and the replication state. Exit code 1 when something is unhealthy."""
    report = _lab(context).status()
    if output == "json":
        click.echo(json.dumps(report, indent=2, default=str))
    else:
        _print_status(report)
    if not report["healthy"]:
        sys.exit(1)


def _print_status(report: dict[str, Any]) -> None:
    if not report["up"]:
        click.echo(f"The lab at {report['root']} is not up.")
        return
    click.echo(f"Lab at {report['root']} (port offset {report['port_offset']}, started {report['started_at']})")
    click.echo("Processes:")
    for entry in report["processes"]:
        where = entry["site"] or "front door"
        state = f"pid {entry['pid']}" if entry["running"] else "NOT RUNNING"
        click.echo(f"  {entry['name']:<28}{where:<12}{state}")
    click.echo("Services (health):")
    for service, sites in report["services"].items():
        cells = []
        for site, health in sites.items():
            if health.get("status") is None:
                cells.append(f"{site}: no answer")
            else:
                cells.append(f"{site}: {health['status']} db {health.get('db_role')}"
                             f"{' ready' if health.get('ready') else ''}")
        click.echo(f"  {service:<18}" + "   ".join(cells))
    click.echo("Stores:")
    for store in report["stores"].values():
        mode = "synchronous" if store["synchronous"] else "asynchronous"
        click.echo(f"  {store['store']} ({mode}; takes writes at: {store['active_site'] or 'no single site'})")
        for site, copy in store["sites"].items():
            details = ", ".join(f"{key} {value}" for key, value in copy.items() if key != "role")
            click.echo(f"    {site:<16}{copy['role']}{' (' + details + ')' if details else ''}")
        for row in store.get("replication", []):
            click.echo(f"    replication {row['application_name']}: {row['state']}, {row['sync_state']}, "
                       f"lag {row['lag_bytes']} bytes, {row['lag_seconds']:.3f} s")
    click.echo("Front door:")
    for service, door in report["front_door"].items():
        servers = ", ".join(f"{server} {state}" for server, state in door["servers"].items()) or "no answer"
        click.echo(f"  {service:<18}{door['url']}  {servers}")
    if report["problems"]:
        click.echo("Problems:")
        for problem in report["problems"]:
            click.echo(f"  - {problem}")
    else:
        click.echo("All healthy.")


@lab_group.command("kill-site")
@click.argument("site", type=click.Choice(SITES))
@click.pass_context
@_friendly
def kill_site(context: click.Context, site: str) -> None:
    """SIGKILL every process of SITE at once (a power loss)."""
    lab = _lab(context)
    killed = lab.kill_site(site)
    click.echo(f"Killed the {site} site: {', '.join(killed) if killed else 'nothing was running'}.")
    _print_marked_at(lab)


def _print_marked_at(lab: Lab) -> None:
    """The SIGKILL's moment, for a drill step that marks it (shell.run reads it as the step's mark)."""
    from dr_orchestrator.model.marks import MARKED_AT_PREFIX  # not at import: the model loads pydantic

    if lab.killed_at is not None:
        click.echo(f"{MARKED_AT_PREFIX}{lab.killed_at.isoformat()}")


@lab_group.command("kill")
@click.argument("target", metavar="SERVICE@SITE")
@click.pass_context
@_friendly
def kill(context: click.Context, target: str) -> None:
    """SIGKILL one service at one site, e.g. trading@primary, or a store: postgres-trading@primary,
    postgres-contract-signing@backup, redis-quotation@primary."""
    service, _, site = target.partition("@")
    if service not in KILLABLE or site not in SITES:
        raise click.BadParameter(f"use SERVICE@SITE with SERVICE in {', '.join(KILLABLE)} and SITE in "
                                 f"{', '.join(SITES)}; got {target!r}", param_hint="SERVICE@SITE")
    lab = _lab(context)
    pid = lab.kill_service(service, site)
    click.echo(f"Killed {service}@{site} (pid {pid}).")
    _print_marked_at(lab)


@lab_group.command("break-replication")
@click.argument("service", type=click.Choice(POSTGRES_SERVICES))
@click.pass_context
@_friendly
def break_replication(context: click.Context, service: str) -> None:
    """Cut SERVICE's standby off its primary: the backup site stops receiving its WAL."""
    _lab(context).break_replication(service)
    click.echo(f"Replication is broken: {service}'s standby no longer receives WAL from its primary.")


@lab_group.command("start-site")
@click.argument("site", type=click.Choice(SITES))
@click.pass_context
@_friendly
def start_site(context: click.Context, site: str) -> None:
    """Power restored at SITE: its sshd comes back; the failback runbook rebuilds the rest."""
    _lab(context).start_site(site)
    click.echo(f"The {site} site has power again: sshd is up; its database and services are still down.")


lab_group.add_command(load_group)


if __name__ == "__main__":
    lab_group()
