"""`dr cluster`: the orchestrator cluster on etcd as a node sees it (members, leader, lease, journal)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import click

from dr_orchestrator.cli.common import UserError, output_option


@click.group()
def cluster() -> None:
    """The orchestrator's cluster: one node per site and a witness, one leader on etcd."""


@cluster.command("status")
@click.option("-c", "--config", "config_path", type=click.Path(dir_okay=False),
              help="this node's configuration (its etcd endpoints, leader key and journal)")
@click.option("--etcd", "endpoints", multiple=True, metavar="URL",
              help="an etcd client URL (repeat for each member), instead of --config")
@output_option
def cluster_status(config_path: str | None, endpoints: tuple[str, ...], output: str) -> None:
    """Members and their health, quorum, the leader and its lease, this node's journal backlog.
    Exit status 1 when the members have no quorum (no node can lead)."""
    from dr_orchestrator.cluster.status import cluster_status as read_status
    from dr_orchestrator.yamlsource import LoadError

    if (config_path is None) == (not endpoints):
        raise UserError("give this node's --config FILE, or the etcd members with --etcd URL (not both)")
    key, journal = "/dr/leader", None
    if config_path is not None:
        from dr_orchestrator.loading import load_node_config

        try:
            config = load_node_config(config_path)
        except LoadError as exc:
            raise UserError(str(exc)) from None
        endpoints, key, journal = config.etcd, config.leader_key, config.journal
    status = read_status(list(endpoints), key)
    if journal is not None:
        status["journal"] = _journal_state(journal)
    if output == "json":
        click.echo(json.dumps(status, indent=2, default=str))
    else:
        _show(status)
    if not status["quorum"]:
        raise SystemExit(1)


def _journal_state(path: str) -> dict[str, Any]:
    from dr_orchestrator.cluster.journal import JournalCorrupt, backlog

    if not Path(path).exists():
        return {"path": path, "backlog": 0, "note": "no journal yet (the evidence database never went away)"}
    try:
        return {"path": path, "backlog": backlog(path)}
    except (OSError, JournalCorrupt) as exc:
        return {"path": path, "backlog": None, "error": str(exc)}


def _show(status: dict[str, Any]) -> None:
    members = status["members"]
    click.echo(f"etcd: {status['healthy_members']} of {len(members) or len(status['endpoints'])} members healthy, "
               f"{'quorum' if status['quorum'] else 'NO QUORUM: no node can lead'}")
    for entry in status["health"]:
        if entry["healthy"]:
            raft = " (etcd's raft leader)" if entry.get("raft_leader") == entry.get("member_id") else ""
            click.echo(f"  {entry['endpoint']}: healthy, etcd {entry.get('version')}{raft}")
        else:
            click.echo(f"  {entry['endpoint']}: {entry.get('error') or 'unhealthy'}")
    leader = status["leader"]
    if leader is None:
        click.echo("leader: none")
    else:
        click.echo(f"leader: {leader['node']} (fencing token {leader['revision']}, lease {leader['lease_id']}, "
                   f"{leader['ttl_remaining_s']} s of {leader['ttl_granted_s']} s left)")
    for node in status["nodes"]:
        click.echo(f"  node {node['node']} at site {node['site']}: API {node['api'] or 'not registered'}"
                   + (" (leader)" if node["leader"] else ""))
    journal = status.get("journal")
    if journal is not None:
        backlog = journal.get("backlog")
        click.echo(f"journal: {journal['path']}: "
                   + (journal.get("error") or f"{backlog} record(s) waiting for the evidence database"))
    for error in status["errors"]:
        click.echo(f"error: {error}", err=True)
