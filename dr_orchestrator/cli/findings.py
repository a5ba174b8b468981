"""`dr findings ...` and `dr reconcile`: what a run showed must be fixed, and the data checks made
after a recovery."""

from __future__ import annotations

import json

import click

from dr_orchestrator.cli.common import UserError, existing_run_id, output_option, session_factory


@click.group()
def findings() -> None:
    """Findings of runs: what must be fixed, by whom, by when; closed with evidence."""


@findings.command("add")
@click.argument("run_id", metavar="RUN")
@click.argument("text")
@click.option("--severity", required=True, type=click.Choice(["low", "medium", "high", "critical"]))
@click.option("--owner", required=True)
@click.option("--due", required=True, metavar="DATE", help="YYYY-MM-DD")
@click.pass_context
def findings_add(ctx: click.Context, run_id: str, text: str, severity: str, owner: str, due: str) -> None:
    """Record a finding on RUN (a run or drill run id, or a unique prefix; a drill run's finding goes
    on its failover run)."""
    from datetime import date

    from dr_orchestrator.evidence.annotations import AnnotationError, add_finding
    from dr_orchestrator.evidence.queries import AmbiguousRunId
    from dr_orchestrator.plans import default_actor

    try:
        due_date = date.fromisoformat(due)
    except ValueError:
        raise UserError(f"--due {due!r} is not a date such as 2026-12-31") from None
    with session_factory(ctx)() as session, session.begin():
        try:
            finding = add_finding(session, run_id, severity, owner, due_date, text, default_actor())
        except (AnnotationError, AmbiguousRunId) as exc:
            raise UserError(str(exc)) from None
        finding_id = finding.id
    click.echo(f"finding {finding_id} recorded")


@findings.command("list")
@click.option("--open", "open_only", is_flag=True, help="only findings not closed")
@click.option("--run", "run_id", metavar="RUN", help="only findings of this run")
@output_option
@click.pass_context
def findings_list(ctx: click.Context, open_only: bool, run_id: str | None, output: str) -> None:
    """Findings, oldest first; open ones past their due date are flagged OVERDUE."""
    from dr_orchestrator.evidence.annotations import list_findings

    sessions = session_factory(ctx)
    run_ids = [existing_run_id(sessions, run_id)] if run_id else None
    with sessions() as session:
        rows = list_findings(session, open_only=open_only, run_ids=run_ids)
    if output == "json":
        click.echo(json.dumps(rows, indent=2, default=str))
        return
    if not rows:
        click.echo("no findings")
    for row in rows:
        closed = row["closed"]
        state = "open" if closed is None else (
            f"closed {closed['closed_at'][:10]} by {closed['closed_by']}: "
            f"{closed['evidence_run_id'] or closed['evidence_text']}")
        overdue = "  OVERDUE" if row["overdue"] else ""
        click.echo(f"{row['id']:>4}  {row['severity']:<8} due {row['due']}{overdue}  {row['owner']:<12} "
                   f"run {row['run_id'][:8]}  {row['text']}  [{state}]")
    overdue_count = sum(1 for row in rows if row["overdue"])
    if overdue_count:
        click.echo(f"{overdue_count} open finding(s) past their due date")


@findings.command("close")
@click.argument("finding_id", type=int, metavar="ID")
@click.option("--evidence", required=True, metavar="RUN_OR_TEXT", help="a run proving the fix, or a text")
@click.pass_context
def findings_close(ctx: click.Context, finding_id: int, evidence: str) -> None:
    """Close a finding; the closing is a new record, the finding itself never changes."""
    from dr_orchestrator.evidence.annotations import AnnotationError, close_finding
    from dr_orchestrator.evidence.queries import AmbiguousRunId
    from dr_orchestrator.plans import default_actor

    with session_factory(ctx)() as session, session.begin():
        try:
            closure = close_finding(session, finding_id, evidence, default_actor())
        except (AnnotationError, AmbiguousRunId) as exc:
            raise UserError(str(exc)) from None
        by = closure.evidence_run_id or closure.evidence_text
    click.echo(f"finding {finding_id} closed: {by}")


@click.command()
@click.argument("run_id", metavar="RUN")
@click.option("--check", required=True, metavar="NAME", help="what was compared, e.g. 'orders row count'")
@click.option("--result", required=True, type=click.Choice(["ok", "mismatch"]))
@click.option("--detail", required=True, metavar="TEXT", help="what was found, e.g. '10482 rows at both sites'")
@click.option("--service", help="the service checked (default: the run's whole scope)")
@click.pass_context
def reconcile(ctx: click.Context, run_id: str, check: str, result: str, detail: str, service: str | None) -> None:
    """Record a data-integrity check made after recovery on RUN (a run or drill run id, or a unique
    prefix); it appears in the after-action report and the evidence export."""
    from dr_orchestrator.evidence.annotations import AnnotationError, record_check
    from dr_orchestrator.evidence.queries import AmbiguousRunId
    from dr_orchestrator.plans import default_actor

    with session_factory(ctx)() as session, session.begin():
        try:
            row = record_check(session, run_id, check, result, detail, default_actor(), service=service)
        except (AnnotationError, AmbiguousRunId) as exc:
            raise UserError(str(exc)) from None
        recorded = (row.id, row.run_id)
    click.echo(f"reconciliation {recorded[0]} recorded on run {recorded[1]}: {check}: {result}")
