"""The `dr` command: thin; parses, composes the rooms, prints. Heavy imports stay inside commands.

This module is the root group and mounts the command groups, one module each (`run.py`: validate,
plan, run; `evidence.py`: dr evidence ...; ...). What they share is in `common.py`; none of them
imports this module back, and nothing outside the package imports the package.
"""

from __future__ import annotations

import click

from dr_orchestrator.cli import (
    actions,
    approvals,
    cluster,
    db,
    demo,
    drills,
    evidence,
    findings,
    incidents,
    node,
    report,
    resume,
    run,
    runs,
    schema,
    serve,
    watch,
)


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.option("--db", "database", envvar="DR_DATABASE_URL", metavar="URL",
              help="evidence database (default: sqlite:///dr-evidence.db, or $DR_DATABASE_URL)")
@click.option("--log-format", type=click.Choice(["text", "json"]), default="text", envvar="DR_LOG_FORMAT",
              show_default=True,
              help="how dr logs: text lines, or one JSON object per line on stderr with run, incident and step "
                   "ids (or $DR_LOG_FORMAT); in JSON, run and drill run log in place of their progress and tables")
@click.version_option(package_name="dr-orchestrator")
@click.pass_context
def cli(ctx: click.Context, database: str | None, log_format: str) -> None:
    """Disaster-recovery orchestrator: run failover runbooks and keep RTO/RPO evidence."""
    ctx.obj = {"database": database, "log_format": log_format}


for _command in (
    run.validate, run.plan, run.run,
    runs.runs,
    evidence.evidence,
    findings.findings, findings.reconcile,
    report.report,
    db.db,
    actions.actions, schema.schema_command,
    demo.demo,
    approvals.approve, approvals.reject, approvals.approvals, resume.resume,
    drills.drill, drills.scheduler,
    incidents.incidents,
    watch.watch,
    cluster.cluster, node.node,
    serve.serve, serve.tokens,
):
    cli.add_command(_command)


def _mount_lab() -> None:
    """`dr lab ...`, imported only when `dr` runs: product code never imports the lab."""
    from importlib.util import find_spec

    if find_spec("dr_orchestrator.lab.cli") is None:  # an install without the lab still works
        return
    from dr_orchestrator.lab.cli import lab_group

    cli.add_command(lab_group, "lab")


def main() -> None:
    _mount_lab()
    cli.main(prog_name="dr")
