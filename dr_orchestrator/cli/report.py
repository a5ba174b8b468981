"""`dr report ...`: the after-action and quarterly compliance reports."""

from __future__ import annotations

import click

from dr_orchestrator.cli.common import UserError, fail_with_problems, session_factory, write_output


@click.group()
def report() -> None:
    """After-action and quarterly compliance reports."""


@report.command("run")
@click.argument("run_id", metavar="RUN")
@click.option("--format", "fmt", type=click.Choice(["html", "pdf"]), default="html", show_default=True)
@click.option("--out", type=click.Path(dir_okay=False), help="file to write (required for pdf)")
@click.pass_context
def report_run(ctx: click.Context, run_id: str, fmt: str, out: str | None) -> None:
    """The after-action report of one run (a run or drill run id, or a unique prefix; a drill run
    gives its failover run's report, with the drill's verdict)."""
    from dr_orchestrator.evidence import reports
    from dr_orchestrator.evidence.pdf import PdfError, html_to_pdf
    from dr_orchestrator.evidence.queries import AmbiguousRunId

    _binary_needs_out(fmt, out)
    with session_factory(ctx)() as session:
        try:
            html = reports.after_action_html(session, run_id)
        except (reports.ReportError, AmbiguousRunId) as exc:
            raise UserError(str(exc)) from None
    if fmt == "pdf":
        try:
            write_output(html_to_pdf(html), out)
        except PdfError as exc:
            raise UserError(str(exc)) from None
    else:
        write_output(html, out)


@report.command("quarter")
@click.argument("quarter")
@click.option("--format", "fmt", type=click.Choice(["html", "pdf", "csv", "json"]), default="html",
              show_default=True)
@click.option("--service", help="only this service")
@click.option("--inventory", "-i", type=click.Path(dir_okay=False),
              help="account for this inventory's services (default: those of the inventories the runs used)")
@click.option("--levels", type=click.Path(dir_okay=False),
              help="capability level table (default: GB/T 20988-2007 Annex A examples)")
@click.option("--out", type=click.Path(dir_okay=False), help="file to write (required for pdf)")
@click.pass_context
def report_quarter(ctx: click.Context, quarter: str, fmt: str, service: str | None, inventory: str | None,
                   levels: str | None, out: str | None) -> None:
    """The quarterly compliance report, e.g. `dr report quarter 2026Q3`."""
    from dr_orchestrator.evidence import reports
    from dr_orchestrator.evidence.levels import LevelsError, load_levels
    from dr_orchestrator.evidence.pdf import PdfError, html_to_pdf

    _binary_needs_out(fmt, out)
    services = None
    if inventory:
        from dr_orchestrator.evidence.store import target_snapshot_of
        from dr_orchestrator.loading import load_inventory
        from dr_orchestrator.yamlsource import LoadError

        try:
            services = target_snapshot_of(load_inventory(inventory)[0])
        except LoadError as exc:
            fail_with_problems(exc.problems, "text")
    try:
        table = load_levels(levels)
        with session_factory(ctx)() as session:
            data = reports.quarter_data(session, quarter, service=service, inventory_services=services, levels=table)
    except (reports.ReportError, LevelsError) as exc:
        raise UserError(str(exc)) from None
    if fmt == "json":
        write_output(reports.quarter_json(data), out)
    elif fmt == "csv":
        write_output(reports.quarter_csv(data), out)
    elif fmt == "pdf":
        try:
            write_output(html_to_pdf(reports.render_quarter(data)), out)
        except PdfError as exc:
            raise UserError(str(exc)) from None
    else:
        write_output(reports.render_quarter(data), out)


def _binary_needs_out(fmt: str, out: str | None) -> None:
    if fmt == "pdf" and not out:
        raise UserError("PDF output is binary: give --out FILE")
