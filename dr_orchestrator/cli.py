"""The `dr` command: thin; parses, composes the rooms, prints. Heavy imports stay inside commands."""

from __future__ import annotations

import json
import signal
import sys
from collections.abc import Callable
from datetime import UTC, datetime
from typing import Any, NoReturn

import click

USER_ERROR = 2


class UserError(click.ClickException):
    """A mistake of the user's: one sentence, exit code 2, no traceback."""

    exit_code = USER_ERROR


def fail_with_problems(problems: list[Any], output: str) -> NoReturn:
    if output == "json":
        click.echo(json.dumps({"ok": False, "problems": [p.as_dict() for p in problems]}, indent=2))
    else:
        for problem in problems:
            click.echo(str(problem), err=True)
        click.echo(f"{len(problems)} problem(s) found.", err=True)
    sys.exit(USER_ERROR)


def parse_time(value: str | None, name: str) -> datetime | None:
    if value is None:
        return None
    try:
        moment = datetime.fromisoformat(value.replace("Z", "+00:00"))
    except ValueError:
        raise UserError(f"{name} {value!r} is not an ISO-8601 time such as 2026-11-28T03:00:00Z") from None
    if moment.tzinfo is None:
        raise UserError(f"{name} {value!r} has no time zone; add Z or +08:00")
    return moment.astimezone(UTC)


output_option = click.option("--output", "-o", type=click.Choice(["text", "json"]), default="text",
                             help="text for people, json for scripts")
runbook_arguments = [
    click.argument("runbook", type=click.Path(dir_okay=False)),
    click.option("--inventory", "-i", required=True, type=click.Path(dir_okay=False), help="inventory YAML"),
    click.option("--param", "-p", "params", multiple=True, metavar="KEY=VALUE", help="runbook parameter"),
]


def with_runbook_arguments(function: Callable[..., Any]) -> Callable[..., Any]:
    for decorator in reversed(runbook_arguments):
        function = decorator(function)
    return function


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.option("--db", "database", envvar="DR_DATABASE_URL", metavar="URL",
              help="evidence database (default: sqlite:///dr-evidence.db, or $DR_DATABASE_URL)")
@click.version_option(package_name="dr-orchestrator")
@click.pass_context
def cli(ctx: click.Context, database: str | None) -> None:
    """Disaster-recovery orchestrator: run failover runbooks and keep RTO/RPO evidence."""
    ctx.obj = {"database": database}


def database_of(ctx: click.Context) -> str | None:
    return ctx.find_root().obj.get("database") if ctx.find_root().obj else None


def session_factory(ctx: click.Context) -> Any:
    from dr_orchestrator.evidence import migrate
    from dr_orchestrator.evidence.database import database_url, session_factory_for

    url = database_url(database_of(ctx))
    problem = migrate.schema_problem(url)
    if problem:
        raise UserError(problem)
    return session_factory_for(url)


# ---------------------------------------------------------------- validate, plan, run


@cli.command()
@with_runbook_arguments
@output_option
def validate(runbook: str, inventory: str, params: tuple[str, ...], output: str) -> None:
    """Check a runbook against an inventory; exit 2 listing every problem."""
    from dr_orchestrator.plans import PlanError, build_plan, parse_overrides
    from dr_orchestrator.yamlsource import LoadError

    try:
        build_plan(runbook, inventory, parse_overrides(list(params)))
    except LoadError as exc:
        fail_with_problems(exc.problems, output)
    except PlanError as exc:
        raise UserError(str(exc)) from None
    if output == "json":
        click.echo(json.dumps({"ok": True, "problems": []}))
    else:
        click.echo(f"{runbook}: valid against {inventory}")


@cli.command()
@with_runbook_arguments
@output_option
def plan(runbook: str, inventory: str, params: tuple[str, ...], output: str) -> None:
    """Show the steps in execution order with templates rendered; runs nothing."""
    from dr_orchestrator.plans import describe_plan

    described = describe_plan(_build(runbook, inventory, params, output))
    if output == "json":
        click.echo(json.dumps(described, indent=2, default=str))
        return
    click.echo(f"runbook {described['runbook']} ({described['kind']}) on inventory {described['inventory']}")
    click.echo(f"parameters: {json.dumps(described['parameters'], default=str)}")
    for group in described["groups"]:
        label = "in parallel" if group["parallel"] else ""
        click.echo(f"\n{group['group']}. {label}".rstrip())
        for step in group["steps"]:
            extras = [f"timeout {step['timeout_s']:g}s"]
            if step["retries"]:
                extras.append(f"retries {step['retries']}")
            extras.append(f"on failure {step['on_failure']}")
            if step["marks"]:
                extras.append("marks " + ",".join(step["marks"]))
            click.echo(f"   {step['id']}  [{step['action']}]  {'; '.join(extras)}")
            if step.get("when"):
                click.echo(f"      when: {step['when']}")
            if step.get("hosts"):
                click.echo(f"      hosts: {', '.join(step['hosts'])}")
            for key, value in step["with"].items():
                click.echo(f"      {key}: {json.dumps(value, default=str)}")
            if step.get("rollback"):
                click.echo(f"      rollback: {step['rollback']['action']}")
            if step.get("error"):
                click.echo(f"      ! {step['error']}")


def _build(runbook: str, inventory: str, params: tuple[str, ...], output: str = "text", **kwargs: Any) -> Any:
    from dr_orchestrator.plans import PlanError, build_plan, parse_overrides
    from dr_orchestrator.yamlsource import LoadError

    try:
        return build_plan(runbook, inventory, parse_overrides(list(params)), **kwargs)
    except LoadError as exc:
        fail_with_problems(exc.problems, output)
    except PlanError as exc:
        raise UserError(str(exc)) from None


@cli.command()
@with_runbook_arguments
@click.option("--incident-at", help="when the disruption began (ISO-8601 with zone); default: the run's start")
@click.option("--kind", type=click.Choice(["failover", "switchover", "failback", "rehearsal"]),
              help="default: the runbook's kind")
@click.option("--reason", default="", help="why this run (recorded)")
@click.option("--trigger", type=click.Choice(["manual", "schedule", "change", "incident"]), default="manual")
@click.option("--quiet", "-q", is_flag=True, help="no live progress, only the summary")
@click.pass_context
def run(ctx: click.Context, runbook: str, inventory: str, params: tuple[str, ...], incident_at: str | None,
        kind: str | None, reason: str, trigger: str, quiet: bool) -> None:
    """Execute a runbook with live progress, then print RTO/RPO per service against targets.

    Exit 0 when the run succeeded, 1 when it failed (after rollback), 2 for bad input.
    """
    from dr_orchestrator.actions import default_registry
    from dr_orchestrator.engine import Engine
    from dr_orchestrator.evidence.store import EvidenceStore
    from dr_orchestrator.progress import ProgressPrinter

    moment = parse_time(incident_at, "--incident-at")
    the_plan = _build(runbook, inventory, params, incident_at=moment, kind=kind, reason=reason, trigger=trigger)
    sessions = session_factory(ctx)
    observers: list[Any] = [EvidenceStore(sessions)]
    if not quiet:
        observers.append(ProgressPrinter())
    engine = Engine(default_registry(), observers)
    previous = signal.signal(signal.SIGTERM, _raise_interrupt)
    try:
        outcome = engine.run(the_plan)
    finally:
        signal.signal(signal.SIGTERM, previous)
    print_run_summary(sessions, outcome.run_id)
    sys.exit(0 if outcome.state == "succeeded" else 1)


def _raise_interrupt(signum: int, frame: Any) -> None:
    raise KeyboardInterrupt


def print_run_summary(sessions: Any, run_id: str) -> None:
    from dr_orchestrator.evidence import queries
    from dr_orchestrator.progress import print_results

    with sessions() as session:
        detail = queries.run_detail(session, run_id)
    print_results(detail)


# ---------------------------------------------------------------- runs and evidence


@cli.group()
def runs() -> None:
    """Runs recorded in the evidence database."""


@runs.command("list")
@click.option("--service", help="only runs that touched this service")
@click.option("--kind", type=click.Choice(["failover", "switchover", "failback", "rehearsal"]))
@click.option("--state")
@click.option("--limit", default=50, show_default=True)
@output_option
@click.pass_context
def runs_list(ctx: click.Context, service: str | None, kind: str | None, state: str | None, limit: int,
              output: str) -> None:
    """Newest runs first."""
    from dr_orchestrator.evidence import queries
    from dr_orchestrator.progress import print_run_list

    with session_factory(ctx)() as session:
        rows = queries.list_runs(session, service=service, kind=kind, state=state, limit=limit)
    if output == "json":
        click.echo(json.dumps(rows, indent=2, default=str))
    else:
        print_run_list(rows)


@runs.command("show")
@click.argument("run_id")
@output_option
@click.pass_context
def runs_show(ctx: click.Context, run_id: str, output: str) -> None:
    """Timeline of steps and attempts, outputs, RTO/RPO with the raw timestamps behind them."""
    from dr_orchestrator.evidence import queries
    from dr_orchestrator.progress import print_run_detail

    with session_factory(ctx)() as session:
        try:
            detail = queries.run_detail(session, run_id)
        except queries.AmbiguousRunId as exc:
            raise UserError(str(exc)) from None
    if detail is None:
        raise UserError(f"no run {run_id!r} in the evidence database (see `dr runs list`)")
    if output == "json":
        click.echo(json.dumps(detail, indent=2, default=str))
    else:
        print_run_detail(detail)


@cli.group()
def evidence() -> None:
    """RTO/RPO evidence for compliance."""


@evidence.command("export")
@click.option("--format", "fmt", type=click.Choice(["json", "csv"]), default="json", show_default=True)
@click.option("--service", help="only this service")
@click.option("--since", help="only runs started at or after this ISO-8601 date or time")
@click.option("--out", type=click.Path(dir_okay=False, writable=True), help="write to a file instead of stdout")
@click.pass_context
def evidence_export(ctx: click.Context, fmt: str, service: str | None, since: str | None, out: str | None) -> None:
    """One row per run and service: achieved RTO/RPO against targets, with the method."""
    from dr_orchestrator.evidence import queries

    moment = parse_time(since if since is None or "T" in since else since + "T00:00:00+00:00", "--since")
    with session_factory(ctx)() as session:
        text = queries.export_evidence(session, fmt=fmt, service=service, since=moment)
    if out:
        with open(out, "w", encoding="utf-8", newline="") as handle:
            handle.write(text)
    else:
        click.echo(text, nl=False)


# ---------------------------------------------------------------- database and actions


@cli.group()
def db() -> None:
    """The evidence database schema (Alembic migrations)."""


@db.command("upgrade")
@click.option("--revision", default="head", show_default=True)
@click.pass_context
def db_upgrade(ctx: click.Context, revision: str) -> None:
    """Create or migrate the evidence database."""
    from dr_orchestrator.evidence import migrate
    from dr_orchestrator.evidence.database import database_url

    url = database_url(database_of(ctx))
    try:
        migrate.upgrade(url, revision)
    except migrate.MigrationError as exc:
        raise UserError(str(exc)) from None
    click.echo(f"evidence database {migrate.display_url(url)} is at revision {migrate.current_revision(url)}")


@db.command("downgrade")
@click.argument("revision")
@click.pass_context
def db_downgrade(ctx: click.Context, revision: str) -> None:
    """Migrate the evidence database down to REVISION (`base` removes every table)."""
    from dr_orchestrator.evidence import migrate
    from dr_orchestrator.evidence.database import database_url

    url = database_url(database_of(ctx))
    try:
        migrate.downgrade(url, revision)
    except migrate.MigrationError as exc:
        raise UserError(str(exc)) from None
    click.echo(f"evidence database {migrate.display_url(url)} is at revision {migrate.current_revision(url)}")


@cli.command()
@output_option
def actions(output: str) -> None:
    """List the actions a step can use, with their parameters."""
    from dr_orchestrator.actions import default_registry

    registry = default_registry()
    listing = {}
    for name in registry.names():
        model = registry.get(name).Params
        listing[name] = {field: ("required" if info.is_required() else f"default {info.default!r}")
                         for field, info in model.model_fields.items()}
    if output == "json":
        click.echo(json.dumps(listing, indent=2, default=str))
        return
    for name, fields in listing.items():
        click.echo(name)
        for field, how in fields.items():
            click.echo(f"    {field}: {how}")


def _mount_lab() -> None:
    from importlib.util import find_spec

    if find_spec("dr_orchestrator.lab.cli") is None:  # an install without the lab still works
        return
    from dr_orchestrator.lab.cli import lab_group

    cli.add_command(lab_group, "lab")


def main() -> None:
    _mount_lab()
    cli.main(prog_name="dr")


if __name__ == "__main__":
    main()
