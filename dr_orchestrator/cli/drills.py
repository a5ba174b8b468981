"""`dr drill ...` and `dr scheduler ...`: drills run now or on their schedules; thin, heavy imports
inside the commands."""

from __future__ import annotations

import json
import logging
import signal
import sys
import threading
from typing import Any

import click

from dr_orchestrator.cli.common import (
    UserError,
    announce,
    database_of,
    fail_with_problems,
    log_format_of,
    logs_as_json,
    output_option,
    raise_interrupt,
    session_factory,
)

drills_option = click.option("--drills", "drills_dir", default="failover_tests", show_default=True,
                             type=click.Path(file_okay=False), help="directory of drill files")
inventory_option = click.option("--inventory", "-i", type=click.Path(dir_okay=False),
                                help="use this inventory instead of the drill's (e.g. a lab started elsewhere)")


def _load(path: str, inventory: str | None, output: str) -> Any:
    from dr_orchestrator.drills.load import load_drill
    from dr_orchestrator.yamlsource import LoadError

    try:
        return load_drill(path, inventory=inventory)
    except LoadError as exc:
        fail_with_problems(exc.problems, output)


# ---------------------------------------------------------------- dr drill


@click.group()
def drill() -> None:
    """Drills: rehearsals of disasters from failover_tests/*.yml."""


@drill.command("validate")
@click.argument("files", nargs=-1, required=True, type=click.Path(dir_okay=False))
@inventory_option
@output_option
def drill_validate(files: tuple[str, ...], inventory: str | None, output: str) -> None:
    """Check drill files (and the runbooks they name) without running anything; exit 2 on problems."""
    from dr_orchestrator.drills.load import load_drill
    from dr_orchestrator.yamlsource import LoadError

    problems = []
    for file in files:
        try:
            load_drill(file, inventory=inventory)
        except LoadError as exc:
            problems.extend(exc.problems)
    if problems:
        fail_with_problems(problems, output)
    click.echo(json.dumps({"ok": True, "problems": []}) if output == "json" else f"{len(files)} drill(s) valid")


@drill.command("run")
@click.argument("file", type=click.Path(dir_okay=False))
@inventory_option
@click.option("--trigger", type=click.Choice(["manual", "scheduled"]), default="manual", show_default=True)
@click.option("--quiet", "-q", is_flag=True, help="no live progress, only the verdict")
@output_option
@click.pass_context
def drill_run(ctx: click.Context, file: str, inventory: str | None, trigger: str, quiet: bool, output: str) -> None:
    """Run a drill end to end as a rehearsal: fault, failover, checks, failback, cleanup (always).

    Exit 0 only when every expectation is met and the cleanup is complete; 1 otherwise; 2 for bad input.
    """
    from dr_orchestrator.drills.runner import DrillRunner, outcome_as_dict
    from dr_orchestrator.progress import ProgressPrinter
    from dr_orchestrator.scheduling.service import DrillBusy, ensure_idle

    the_drill = _load(file, inventory, output)
    sessions = session_factory(ctx)
    try:
        ensure_idle(sessions, the_drill)
    except DrillBusy as exc:
        raise UserError(str(exc)) from None
    as_log = logs_as_json(ctx)
    observers: list[Any] = [] if quiet or output == "json" or as_log else [ProgressPrinter()]
    previous = signal.signal(signal.SIGTERM, raise_interrupt)
    try:
        outcome = DrillRunner(sessions, observers=observers).run(the_drill, trigger=trigger)
    finally:
        signal.signal(signal.SIGTERM, previous)
    from dr_orchestrator.evidence import drills as records

    with sessions() as session:  # the notices' deliveries, shown next to the verdict
        detail = records.drill_run_detail(session, outcome.drill_run_id)
    described = {**outcome_as_dict(outcome), "notifications": detail["notifications"] if detail else []}
    if output == "json":
        click.echo(json.dumps(described, indent=2, default=str))
    elif as_log:
        logging.getLogger("dr_orchestrator.cli").log(
            logging.INFO if outcome.passed else logging.ERROR, "drill run %s: %s (%s)", described["drill_run_id"],
            described["verdict"].upper(), described["state"], extra={"data": described})
    else:
        _print_outcome(described)
    sys.exit(0 if outcome.passed else 1)


def _print_outcome(outcome: dict[str, Any]) -> None:
    click.echo(f"\ndrill run {outcome['drill_run_id']}: {outcome['verdict'].upper()} ({outcome['state']})")
    for stage, run_id in outcome["runs"].items():
        click.echo(f"  {stage:<9} run {run_id}")
    for result in outcome["expectations"]:
        mark = "met   " if result["met"] else "MISSED"
        name = result["kind"] + (f" {result['check_id']}" if result["check_id"] else "")
        click.echo(f"  {mark} {result['service']} {name}: {result['detail']}")
    left = f": {'; '.join(outcome['cleanup_left'])}" if outcome["cleanup_left"] else ""
    click.echo(f"  cleanup {outcome['cleanup_state']}{left}")
    if outcome["error"]:
        click.echo(f"  {outcome['error']}")
    for note in outcome["notifications"]:
        state = "delivered" if note["delivered"] else f"NOT DELIVERED ({note['detail']})"
        click.echo(f"  notified {note['event']} by {note['channel']} to {note['target']}: {state} at {note['at']}")


@drill.command("runs")
@click.option("--drill", "drill_name", help="only this drill")
@click.option("--limit", default=50, show_default=True)
@output_option
@click.pass_context
def drill_runs(ctx: click.Context, drill_name: str | None, limit: int, output: str) -> None:
    """Drill runs, newest first (missed fire times included)."""
    from dr_orchestrator.evidence import drills as records

    with session_factory(ctx)() as session:
        rows = [records.summary(r) for r in records.drill_run_rows(session, drill_name, limit)]
    if output == "json":
        click.echo(json.dumps(rows, indent=2, default=str))
        return
    for row in rows:
        when = row["scheduled_for"] or row["started_at"]
        click.echo(f"{row['id'][:8]}  {row['drill']:<32} {row['state']:<12} {row['verdict'] or '-':<7} "
                   f"{row['trigger']:<9} {when}")


@drill.command("show")
@click.argument("drill_run_id")
@output_option
@click.pass_context
def drill_show(ctx: click.Context, drill_run_id: str, output: str) -> None:
    """One drill run: its runs, each expectation with the measured value, cleanup, notifications."""
    from dr_orchestrator.evidence import drills as records

    with session_factory(ctx)() as session:
        detail = records.drill_run_detail(session, drill_run_id)
    if detail is None:
        raise UserError(f"no drill run {drill_run_id!r} in the evidence database (see `dr drill runs`)")
    if output == "json":
        click.echo(json.dumps(detail, indent=2, default=str))
        return
    run = detail["drill_run"]
    _print_outcome({"drill_run_id": run["id"], "verdict": run["verdict"] or "-", "state": run["state"],
                    "runs": {k: v for k, v in run["runs"].items() if v}, "expectations": detail["expectations"],
                    "cleanup_state": run["cleanup_state"], "cleanup_left": run["cleanup_left"],
                    "error": run["error"], "notifications": detail["notifications"]})


# ---------------------------------------------------------------- dr scheduler


@click.group()
def scheduler() -> None:
    """The drill scheduler (APScheduler; jobs kept in the evidence database)."""


@scheduler.command("run")
@drills_option
@inventory_option
@click.option("--misfire-grace", default="5m", show_default=True,
              help="how late a fire time may still start (e.g. after a restart); later ones are recorded missed")
@click.option("--retry", "retry", default="5s", show_default=True, help="how often a follower tries to lead")
@click.pass_context
def scheduler_run(ctx: click.Context, drills_dir: str, inventory: str | None, misfire_grace: str,
                  retry: str) -> None:
    """Run the scheduler until stopped (Ctrl-C or SIGTERM stops running drills; their cleanup runs).

    With PostgreSQL, run it on several nodes: one leads, the others wait to take over. With SQLite,
    one scheduler node only.
    """
    import functools

    from dr_orchestrator.logs import log_to_terminal
    from dr_orchestrator.model.durations import parse_duration
    from dr_orchestrator.scheduling.daemon import SchedulerDaemon
    from dr_orchestrator.scheduling.leader import SchedulerRefused

    session_factory(ctx)  # the schema must be current
    try:
        grace, retry_s = parse_duration(misfire_grace), parse_duration(retry)
    except ValueError as exc:
        raise UserError(str(exc)) from None
    log_format = log_format_of(ctx)
    # In text, the scheduler's news is printed and only warnings are logged; in JSON, its news
    # are log records too, and so are the runs' and steps' starts and ends (INFO).
    log_to_terminal(log_format, "%(asctime)s %(levelname)s %(name)s: %(message)s",
                    level=logging.INFO if log_format == "json" else logging.WARNING)
    stop = threading.Event()
    for signum in (signal.SIGTERM, signal.SIGINT):
        signal.signal(signum, lambda *_: stop.set())
    daemon = SchedulerDaemon(database_of(ctx), drills_dir, inventory=inventory, misfire_grace=grace,
                             retry_s=retry_s, say=functools.partial(announce, ctx))
    try:
        daemon.serve(stop)
    except SchedulerRefused as exc:
        raise UserError(str(exc)) from None
    announce(ctx, "scheduler stopped")


@scheduler.command("list")
@drills_option
@click.option("--count", default=3, show_default=True, help="how many fire times to show per drill")
@output_option
def scheduler_list(drills_dir: str, count: int, output: str) -> None:
    """Each drill's schedule and next fire times."""
    from dr_orchestrator.scheduling.service import schedules

    listing = schedules(drills_dir, count)
    if output == "json":
        click.echo(json.dumps(listing, indent=2))
        return
    for entry in listing["drills"]:
        schedule = entry["schedule"]
        when = f"{schedule['cron']} ({schedule['timezone']})" if schedule else "not scheduled"
        click.echo(f"{entry['name']}  [{entry['scenario']}]  {when}")
        for moment in entry["next"]:
            click.echo(f"    {moment['local']}   = {moment['utc']}")
    for problem in listing["problems"]:
        click.echo(f"! {problem['file']}:{problem['line']}: {problem['field']}: {problem['message']}", err=True)


@scheduler.command("trigger")
@click.argument("drill_name")
@drills_option
@inventory_option
@click.option("--quiet", "-q", is_flag=True)
@output_option
@click.pass_context
def scheduler_trigger(ctx: click.Context, drill_name: str, drills_dir: str, inventory: str | None, quiet: bool,
                      output: str) -> None:
    """Run DRILL (a name in --drills, or a file) now, in this process; exit as `dr drill run` does."""
    from dr_orchestrator.scheduling.service import find_drill
    from dr_orchestrator.yamlsource import LoadError

    try:
        found = find_drill(drill_name, drills_dir, inventory)
    except LoadError as exc:
        fail_with_problems(exc.problems, output)
    except LookupError as exc:
        raise UserError(str(exc.args[0])) from None
    ctx.invoke(drill_run, file=found.path, inventory=inventory, trigger="manual", quiet=quiet, output=output)
