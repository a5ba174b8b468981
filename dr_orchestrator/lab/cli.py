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
    HA_SITES,
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
@click.option("--ha", is_flag=True,
              help="also the witness site (127.0.30.1), a 3-member etcd and an orchestrator node per site "
                   "(`dr node run`), for `dr lab partition` and site losses of the orchestrator itself")
@click.pass_context
@_friendly
def up(context: click.Context, ha: bool) -> None:
    """Start both sites and the front door, and print what runs where."""
    lab = _lab(context)
    result = lab.up(ha=ha)
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


def _print_ha(ha: dict[str, Any]) -> None:
    leader = ha["leader"]
    if leader is None:
        click.echo("Orchestrator cluster: no node leads" + ("" if ha["quorum"] else " (etcd has no quorum)"))
    else:
        click.echo(f"Orchestrator cluster: {leader['node']} leads (fencing token {leader['revision']}, "
                   f"lease {leader['ttl_remaining_s']} s of {leader['ttl_granted_s']} s left)")
    for node in ha["nodes"]:
        state = f"pid {node['pid']}" if node["pid"] else "NOT RUNNING"
        click.echo(f"  {node['node']:<28}{node['site']:<12}{state}  api {node['api']}")
    for member in ha["etcd"]:
        state = f"pid {member['pid']}" if member["pid"] else "NOT RUNNING"
        health = "healthy" if member["healthy"] else f"unhealthy ({member.get('error') or 'no raft leader'})"
        raft = ", etcd's raft leader" if member["raft_leader"] else ""
        click.echo(f"  etcd {member['site']:<23}{member['site']:<12}{state}  {member['endpoint']} {health}{raft}")
    click.echo(f"  partition: {'the ' + ha['partition'] + ' site is cut off' if ha['partition'] else 'none'}")


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
    if "ha" in report:
        _print_ha(report["ha"])
    if report["problems"]:
        click.echo("Problems:")
        for problem in report["problems"]:
            click.echo(f"  - {problem}")
    else:
        click.echo("All healthy.")


@lab_group.command("kill-site")
@click.argument("site", type=click.Choice(HA_SITES))
@click.pass_context
@_friendly
def kill_site(context: click.Context, site: str) -> None:
    """SIGKILL every process of SITE at once (a power loss); in an HA lab its orchestrator node and etcd
    member too (witness: an HA lab only)."""
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
@click.argument("site", type=click.Choice(HA_SITES))
@click.pass_context
@_friendly
def start_site(context: click.Context, site: str) -> None:
    """Power restored at SITE: its sshd comes back (in an HA lab its etcd member and orchestrator node too);
    the failback runbook rebuilds the rest."""
    lab = _lab(context)
    lab.start_site(site)
    ha = " and its etcd member and orchestrator node" if lab.ha() is not None else ""
    if site in SITES:
        click.echo(f"The {site} site has power again: sshd{ha} are up; its database and services are still down.")
    else:
        click.echo(f"The {site} site has power again: its etcd member and orchestrator node are up.")


@lab_group.command("partition")
@click.argument("site", type=click.Choice(HA_SITES))
@click.pass_context
@_friendly
def partition_site(context: click.Context, site: str) -> None:
    """Cut SITE's orchestrator node and etcd member off the other sites (HA lab, root, nftables); the front
    door still reaches SITE's services. Replaces a partition in force."""
    _lab(context).partition(site)
    click.echo(f"The {site} site is cut off: its node and etcd member reach no other site, nor they it "
               f"(`dr lab heal` ends it).")


@lab_group.command("heal")
@click.pass_context
@_friendly
def heal(context: click.Context) -> None:
    """End the partition in force (delete the lab's nftables table)."""
    healed = _lab(context).heal()
    click.echo("The partition is healed." if healed else "No partition was in force.")


lab_group.add_command(load_group)


if __name__ == "__main__":
    lab_group()
