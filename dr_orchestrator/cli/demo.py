"""`dr demo`: the lab demo (imports the lab only inside the command)."""

from __future__ import annotations

import sys

import click

from dr_orchestrator.cli.common import UserError, database_of, fail_with_problems


@click.command()
@click.pass_context
def demo(ctx: click.Context) -> None:
    """The lab demo: two sites, kill the primary, fail over, compare RTO/RPO with the clients' view,
    keep the evidence, fail back. Exit 0 only when every service came back within its targets."""
    from dr_orchestrator.demo import DemoError, run_demo
    from dr_orchestrator.lab import LabConfig
    from dr_orchestrator.lab.system import LabSetupError
    from dr_orchestrator.yamlsource import LoadError

    try:
        verdict = run_demo(LabConfig.from_env(), database_of(ctx))
    except LoadError as exc:
        fail_with_problems(exc.problems, "text")
    except (DemoError, LabSetupError) as exc:
        raise UserError(str(exc)) from None
    if verdict.ok:
        click.echo("demo passed: every service came back within its RTO and RPO targets, as the clients saw it")
        return
    for problem in verdict.problems:
        click.echo(f"demo failed: {problem}", err=True)
    sys.exit(1)
