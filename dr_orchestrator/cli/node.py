"""`dr node run`: this machine's orchestrator node of the cluster (docs/deployment.md)."""

from __future__ import annotations

import click

from dr_orchestrator.cli.common import UserError, announce, log_format_of, run_until_stopped


@click.group()
def node() -> None:
    """An orchestrator node: one per site and one at a witness site, one leader at a time on etcd."""


@node.command("run")
@click.option("-c", "--config", "config_path", required=True, type=click.Path(dir_okay=False),
              help="this node's configuration (deploy/cluster/node.example.yml)")
@click.pass_context
def node_run(ctx: click.Context, config_path: str) -> None:
    """Run this node until SIGTERM or Ctrl-C: campaign for leadership, watch the inventory (decide and
    act only while leading, every changing step fenced), resume what a lost leader left in flight,
    journal evidence locally while the evidence database is away, serve the HTTP API (a follower
    forwards what changes something to the leader) and fire scheduled drills while leading."""
    from pathlib import Path

    from dr_orchestrator.cluster.gateway import ClusterError
    from dr_orchestrator.evidence import migrate
    from dr_orchestrator.evidence.database import database_url, session_factory_for
    from dr_orchestrator.loading import load_node_config
    from dr_orchestrator.logs import log_to_terminal
    from dr_orchestrator.node.hosting import ApiServer, DrillScheduler
    from dr_orchestrator.node.service import Node, resolve_path
    from dr_orchestrator.secrets import SecretError, resolve
    from dr_orchestrator.yamlsource import LoadError

    try:
        config = load_node_config(config_path)
    except LoadError as exc:
        raise UserError("; ".join(str(problem) for problem in exc.problems)) from None
    try:
        url = database_url(resolve(config.evidence) if config.evidence else ctx.obj.get("database"))
    except SecretError as exc:
        raise UserError(f"{config_path}: evidence: {exc}") from None
    if config.inventory and not Path(resolve_path(config.inventory, Path(config_path))).is_file():
        raise UserError(f"{config_path}: inventory: {config.inventory} is not a file")
    problem = migrate.schema_problem(url)
    if problem and "cannot open" not in problem:  # away now is fine: the node journals until it is back
        raise UserError(problem)
    log_to_terminal(log_format_of(ctx), "%(asctime)s %(levelname)s %(threadName)s %(message)s")
    try:
        service = Node(config, Path(config_path), session_factory_for(url), api_factory=ApiServer,
                       scheduler_factory=DrillScheduler)
    except LoadError as exc:
        raise UserError("; ".join(str(problem) for problem in exc.problems)) from None
    except (ClusterError, ValueError, OSError) as exc:
        raise UserError(f"{config_path}: {exc}") from None
    announce(ctx, f"node {config.node} at site {config.site}: {len(config.etcd)} etcd members, "
                  f"{'watching ' + config.inventory if config.inventory else 'no inventory to watch'}, "
                  f"API on http://{config.api.host}:{config.api.port}/ (Ctrl-C to stop)")
    run_until_stopped(service.run)
    announce(ctx, f"node {config.node} stopped")
