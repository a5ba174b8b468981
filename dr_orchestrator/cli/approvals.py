"""`dr approve`, `dr reject` and `dr approvals`: the approval gates of runs."""

from __future__ import annotations

import json

import click

from dr_orchestrator.cli.common import UserError, output_option, session_factory


def _decide(ctx: click.Context, run_id: str, step_id: str, decision: str, reason: str) -> None:
    from dr_orchestrator.evidence.approvals import ApprovalRefused, decide
    from dr_orchestrator.evidence.liveness import writing
    from dr_orchestrator.model.approval import Decision
    from dr_orchestrator.plans import default_actor

    actor = default_actor()
    try:
        with writing(session_factory(ctx)) as session:
            row = decide(session, run_id, step_id, Decision(decision), actor, reason)
            recorded = f"{row.decision} by {row.actor} at {row.at.isoformat()}"
    except ApprovalRefused as exc:
        raise UserError(str(exc)) from None
    click.echo(f"step {step_id} of run {run_id}: {recorded}")


def _approve_plan(ctx: click.Context, saved_plan_path: str, step_id: str, reason: str) -> None:
    from dr_orchestrator.evidence.approvals import ApprovalRefused, approve_plan
    from dr_orchestrator.evidence.liveness import writing
    from dr_orchestrator.plans import PlanError, default_actor, read_saved_plan

    try:
        saved = read_saved_plan(saved_plan_path)
    except PlanError as exc:
        raise UserError(str(exc)) from None
    try:
        with writing(session_factory(ctx)) as session:
            given = approve_plan(session, saved, step_id, default_actor(), reason)
            recorded = f"approved by {given.actor} at {given.at.isoformat()}"
    except ApprovalRefused as exc:
        raise UserError(str(exc)) from None
    click.echo(f"step {step_id} of the saved plan {saved_plan_path} (SHA-256 {saved['sha256'][:12]}): {recorded}; "
               f"the next `dr run --plan {saved_plan_path}` takes it at that gate")


@click.command()
@click.argument("run_and_step", nargs=-1, metavar="RUN STEP")
@click.option("--plan", "saved_plan_path", metavar="FILE", type=click.Path(dir_okay=False),
              help="approve STEP of the plan saved by `dr plan --out` before it runs: dr approve --plan FILE STEP")
@click.option("--reason", default="", help="why (recorded)")
@click.pass_context
def approve(ctx: click.Context, run_and_step: tuple[str, ...], saved_plan_path: str | None, reason: str) -> None:
    """Approve the gate STEP of RUN, which waits for a decision. You are your OS account (the sudo
    user on root), recorded with the SSH client address and any $DR_ACTOR label; under the two-person
    rule the account that started the run cannot approve, whatever $DR_ACTOR says.

    With --plan FILE, approve the gate STEP of a saved plan before any run: the approval is bound to
    the plan's digest, and the next run of exactly that plan (dr run --plan FILE) takes it at the gate
    (one run; under the two-person rule, not a run you start yourself)."""
    if saved_plan_path is not None:
        if len(run_and_step) != 1:
            raise UserError("with --plan FILE give only the STEP to approve: dr approve --plan FILE STEP")
        _approve_plan(ctx, saved_plan_path, run_and_step[0], reason)
        return
    if len(run_and_step) != 2:
        raise UserError("give the RUN and the STEP to approve (dr approvals lists the gates waiting), "
                        "or --plan FILE STEP for a saved plan")
    _decide(ctx, run_and_step[0], run_and_step[1], "approved", reason)


@click.command()
@click.argument("run_id", metavar="RUN")
@click.argument("step_id", metavar="STEP")
@click.option("--reason", required=True, help="why (recorded; required)")
@click.pass_context
def reject(ctx: click.Context, run_id: str, step_id: str, reason: str) -> None:
    """Reject the gate STEP of RUN: the step fails and the run follows its on_failure."""
    _decide(ctx, run_id, step_id, "rejected", reason)


@click.command()
@click.option("--run", "run_id", metavar="RUN", help="only this run's gates")
@output_option
@click.pass_context
def approvals(ctx: click.Context, run_id: str | None, output: str) -> None:
    """Approval gates waiting for a decision now."""
    from dr_orchestrator.evidence.approvals import waiting_gates

    with session_factory(ctx)() as session:
        gates = waiting_gates(session, run_id)
    if output == "json":
        click.echo(json.dumps(gates, indent=2, default=str))
        return
    if not gates:
        click.echo("no gate is waiting")
    for gate in gates:
        rule = "  two-person" if gate.get("two_person") else ""
        click.echo(f"{gate['run_id']}  {gate['step_id']}  since {gate.get('requested_at')}  started by "
                   f"{gate.get('started_by')}{rule}  {gate.get('message') or ''}")
