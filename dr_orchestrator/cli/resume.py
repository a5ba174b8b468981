"""`dr resume`: go on with an interrupted run."""

from __future__ import annotations

import sys
from typing import Any

import click

from dr_orchestrator.cli.common import UserError, print_run_summary, run_guarded, session_factory


@click.command()
@click.argument("run_id", metavar="RUN")
@click.option("--step-done", "step_done", multiple=True, metavar="STEP",
              help="an in-flight step you checked took effect: recorded as done by you, not run again")
@click.option("--retry", multiple=True, metavar="STEP", help="an in-flight step to run again")
@click.option("--reason", default="", help="why, and what you checked (recorded)")
@click.option("--quiet", "-q", is_flag=True, help="no live progress, only the summary")
@click.pass_context
def resume(ctx: click.Context, run_id: str, step_done: tuple[str, ...], retry: tuple[str, ...], reason: str,
           quiet: bool) -> None:
    """Go on with an interrupted run (same run id): completed steps are not repeated; an in-flight
    step is repeated only when idempotent, otherwise name it with --step-done or --retry.

    Exit 0 when the run then succeeds, 1 when it fails, 2 for bad input, 3 when another run holds a lock.
    """
    from dr_orchestrator.plans import default_actor
    from dr_orchestrator.progress import ProgressPrinter
    from dr_orchestrator.runs.resume import ResumeRefused, ResumeRequest, prepare_resume

    sessions = session_factory(ctx)
    request = ResumeRequest(run_id, default_actor(), reason, step_done, retry)
    try:
        the_id, plan, point = prepare_resume(sessions, request)
    except ResumeRefused as exc:
        raise UserError(str(exc)) from None
    observers: list[Any] = [] if quiet else [ProgressPrinter()]
    outcome = run_guarded(sessions, plan, observers, resume=point, run_id=the_id)
    print_run_summary(sessions, outcome.run_id)
    sys.exit(0 if outcome.state == "succeeded" else 1)
