"""`dr validate`, `dr plan` and `dr run`: a runbook against an inventory, checked, shown, run."""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any

import click

from dr_orchestrator.cli.common import (
    UserError,
    existing_run_id,
    fail_with_problems,
    logs_as_json,
    output_option,
    parse_time,
    print_run_summary,
    print_warning,
    run_guarded,
    session_factory,
    tell,
    with_runbook_arguments,
)

# Kept here, not imported from the evidence room: `dr --help` must stay fast.
TEST_TYPES = ["planned switchover rehearsal", "unplanned failover rehearsal", "planned switchover (production)",
              "real failover", "failback"]


@click.command()
@with_runbook_arguments
@output_option
@click.option("--strict", is_flag=True, help="warnings (e.g. a template put into a shell command unquoted) fail too")
def validate(runbook: str, inventory: str, params: tuple[str, ...], output: str, strict: bool) -> None:
    """Check a runbook against an inventory; exit 2 listing every problem, in one pass.

    Warnings are printed and exit 0, unless --strict."""
    warnings: list[Any] = []
    _build(runbook, inventory, params, output, strict=strict, warn=warnings.append)
    if output == "json":
        click.echo(json.dumps({"ok": True, "problems": [w.as_dict() for w in warnings]}))
        return
    for warning in warnings:
        print_warning(warning)
    click.echo(f"{runbook}: valid against {inventory}" + (f" ({len(warnings)} warning(s))" if warnings else ""))


@click.command()
@with_runbook_arguments
@output_option
@click.option("--out", "out", type=click.Path(dir_okay=False, writable=True),
              help="also save the plan to this file, with the digests of its runbook, inventory and parameters: "
                   "`dr run --plan FILE` runs exactly it, or refuses")
@click.option("--live", is_flag=True,
              help="also probe what is live now (which site serves each service, its front-door servers, its "
                   "stores and their replication) and say what the run would change; still changes nothing")
def plan(runbook: str, inventory: str, params: tuple[str, ...], output: str, out: str | None, live: bool) -> None:
    """Show the steps in execution order with templates rendered; runs nothing."""
    from dr_orchestrator.model.events import utcnow
    from dr_orchestrator.plans import describe_plan, live_difference, parse_overrides, saved_plan

    the_plan = _build(runbook, inventory, params, output, warn=print_warning if output == "text" else None)
    described = describe_plan(the_plan)
    if live:
        from dr_orchestrator.watch.observers import ObserverSetupError

        try:
            described["live"] = live_difference(the_plan)
        except ObserverSetupError as exc:  # the inventory does not say how to reach a store or the front door
            raise UserError(f"cannot probe what is live: {exc}") from None
    if out is not None:
        document = saved_plan(the_plan, parse_overrides(list(params)), utcnow())
        written = Path(out)
        partial = written.with_name(f".{written.name}.partial")
        try:
            partial.write_text(json.dumps(document, indent=2, sort_keys=True, default=str) + "\n", encoding="utf-8")
            partial.replace(written)  # whole or not at all
        except OSError as exc:
            raise UserError(f"cannot save the plan to {out}: {exc.strerror}") from None
        click.echo(f"saved the plan to {out} (SHA-256 {document['sha256']})", err=True)
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
            if step.get("hosts") and not {"host", "hosts"} & set(step["with"]):  # else they are listed there
                click.echo(f"      hosts: {', '.join(step['hosts'])}")
            for key, value in step["with"].items():
                click.echo(f"      {key}: {json.dumps(value, default=str)}")
            if step.get("rollback"):
                click.echo(f"      rollback: {step['rollback']['action']}")
            if step.get("error"):
                click.echo(f"      ! {step['error']}")
    if live:
        click.echo(f"\nlive now (probed at {described['live']['probed_at']}):")
        for name, state in described["live"]["services"].items():
            click.echo(f"   {name}: {state['change']}")
            click.echo(f"      front door: {state['front_door']}")
            for site, server in state["servers"].items():
                click.echo(f"      front-door server at {site}: {server}")
            for site, store in state["stores"].items():
                click.echo(f"      store at {site}: {store}")


def _build(runbook: str, inventory: str, params: tuple[str, ...], output: str = "text", **kwargs: Any) -> Any:
    from dr_orchestrator.plans import PlanError, build_plan, parse_overrides
    from dr_orchestrator.yamlsource import LoadError

    try:
        return build_plan(runbook, inventory, parse_overrides(list(params)), **kwargs)
    except LoadError as exc:
        fail_with_problems(exc.problems, output)
    except PlanError as exc:
        raise UserError(str(exc)) from None


@click.command()
@click.argument("runbook", type=click.Path(dir_okay=False), required=False)
@click.option("--inventory", "-i", type=click.Path(dir_okay=False), help="inventory YAML")
@click.option("--param", "-p", "params", multiple=True, metavar="KEY=VALUE", help="runbook parameter")
@click.option("--plan", "saved_plan_path", metavar="FILE", type=click.Path(dir_okay=False),
              help="run exactly the plan saved by `dr plan --out` (instead of RUNBOOK, -i and -p); refused when its "
                   "runbook, inventory or parameters changed since")
@click.option("--incident-at", help="when the disruption began (ISO-8601 with zone); default: the run's start")
@click.option("--kind", type=click.Choice(["failover", "switchover", "failback", "rehearsal"]),
              help="default: the runbook's kind")
@click.option("--reason", default="", help="why this run (recorded)")
@click.option("--test-type", type=click.Choice(TEST_TYPES),
              help="what the DR test record calls the run (default: from kind, trigger and scenario; "
                   "the trigger of a run started here is always manual)")
@click.option("--scenario", default="", help="the fault injected, in words (recorded)")
@click.option("--failback-of", metavar="RUN", help="the run whose failover this run undoes (joins its incident)")
@click.option("--incident", "incident_id", metavar="ID",
              help="the incident this run belongs to, created when absent (default: a failover or switchover "
                   "opens a new one)")
@click.option("--retention-years", type=click.IntRange(min=1), envvar="DR_RETENTION_YEARS",
              help="keep the record this many years (default 6, or $DR_RETENTION_YEARS)")
@click.option("--force", "force_reason", metavar="REASON",
              help="override the inventory's safety rules that would refuse the run (recorded with rule and actor)")
@click.option("--quiet", "-q", is_flag=True, help="no live progress, only the summary")
@click.pass_context
def run(ctx: click.Context, runbook: str | None, inventory: str | None, params: tuple[str, ...],
        saved_plan_path: str | None, incident_at: str | None, kind: str | None, reason: str, test_type: str | None,
        scenario: str, failback_of: str | None, incident_id: str | None, retention_years: int | None,
        force_reason: str | None, quiet: bool) -> None:
    """Execute a runbook with live progress, then print RTO/RPO per service against targets.

    Exit 0 when the run succeeded, 1 when it failed (after rollback), 2 for bad input, 3 when another
    run holds a service or site of this runbook (nothing ran; the holder is named).
    """
    from dr_orchestrator.progress import ProgressPrinter

    moment = parse_time(incident_at, "--incident-at")
    as_log = logs_as_json(ctx)
    if incident_id is not None:
        from dr_orchestrator.evidence.incidents import IncidentError, check_incident_id

        try:
            check_incident_id(incident_id)
        except IncidentError as exc:
            raise UserError(f"--incident: {exc}") from None
    if force_reason is not None and not force_reason.strip():
        raise UserError('--force needs a reason, e.g. --force "primary site confirmed powered off by facilities"')
    forced = (force_reason.strip(),) if force_reason else ()
    saved = None
    if saved_plan_path is not None:
        from dr_orchestrator.plans import PlanError, read_saved_plan

        if runbook is not None or inventory is not None or params:
            raise UserError("--plan runs the saved plan's own runbook, inventory and parameters: "
                            "give no RUNBOOK, -i or -p with it")
        try:
            saved = read_saved_plan(saved_plan_path)
        except PlanError as exc:
            raise UserError(str(exc)) from None
        runbook, inventory = saved["runbook"]["path"], saved["inventory"]["path"]
        params = tuple(f"{key}={json.dumps(value)}" for key, value in saved["overrides"].items())
    elif runbook is None or inventory is None:
        raise UserError("give RUNBOOK and -i INVENTORY, or --plan FILE saved by `dr plan --out`")
    the_plan = _build(runbook, inventory, params, incident_at=moment, kind=kind, reason=reason, trigger="manual",
                      forced=forced, warn=print_warning)
    if saved is not None:
        from dr_orchestrator.plans import PlanError, check_against_saved

        try:
            check_against_saved(the_plan, saved, str(saved_plan_path))
        except PlanError as exc:
            raise UserError(str(exc)) from None
    sessions = session_factory(ctx)
    if failback_of is not None:
        failback_of = existing_run_id(sessions, failback_of)
    the_plan = the_plan.model_copy(update={"test_type": test_type, "scenario": scenario, "failback_of": failback_of,
                                           "incident_id": incident_id,
                                           "saved_plan_sha256": saved["sha256"] if saved is not None else None})
    observers: list[Any] = [] if quiet or as_log else [ProgressPrinter()]
    outcome = run_guarded(sessions, the_plan, observers, retention_years=retention_years)
    print_run_summary(sessions, outcome.run_id, as_log=as_log)
    if outcome.error and outcome.error.startswith("safety rule "):
        tell(outcome.error, as_log)  # the pre-flight refused: say which rule and how to override
    sys.exit(0 if outcome.state == "succeeded" else 1)
