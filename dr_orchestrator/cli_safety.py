"""`dr approve`, `dr reject`, `dr approvals`, `dr resume`, and what `dr run` needs to run safely
(locks, heartbeat, approval gates, recovery of interrupted runs). Heavy imports stay inside commands."""

from __future__ import annotations

import json
import signal
import sys
from typing import Any

import click

from dr_orchestrator.cli import UserError, output_option, print_run_summary

# `dr run` and `dr resume` exit with this when another live run holds a service or site of the plan:
# nothing ran (1 would say the run failed, 2 that the input was wrong).
LOCKED = 3


def sweep(sessions: Any) -> None:
    """Mark runs whose process died ``interrupted`` and say so; called whenever `dr` opens the evidence."""
    import socket

    from dr_orchestrator.evidence.liveness import sweep_interrupted

    for run_id in sweep_interrupted(sessions, socket.gethostname()):
        click.echo(f"run {run_id} was interrupted (its orchestrator process is gone): see `dr runs show {run_id}`, "
                   f"then `dr resume {run_id}`", err=True)


def run_guarded(sessions: Any, plan: Any, observers: list[Any], *, retention_years: int | None = None,
                **options: Any) -> Any:
    """Run (or resume) ``plan`` through ``supervision.execute``, the evidence store first (wrapped by
    the crash-test hook when the environment asks), SIGTERM as Ctrl-C; exit LOCKED when another run
    holds one of its locks."""
    from dr_orchestrator import supervision
    from dr_orchestrator.evidence.store import EvidenceStore
    from dr_orchestrator.testhook import wrap_store

    store = wrap_store(EvidenceStore(sessions, retention=retention_years))
    previous = signal.signal(signal.SIGTERM, _raise_interrupt)
    try:
        return supervision.execute(sessions, plan, [store, *observers], **options)
    except supervision.LockHeld as exc:
        click.echo(f"refused: {exc}", err=True)
        sys.exit(LOCKED)
    finally:
        signal.signal(signal.SIGTERM, previous)


def _raise_interrupt(signum: int, frame: Any) -> None:
    raise KeyboardInterrupt


def _sessions(ctx: click.Context) -> Any:
    from dr_orchestrator.cli import session_factory

    return session_factory(ctx)


def _decide(ctx: click.Context, run_id: str, step_id: str, decision: str, reason: str) -> None:
    from dr_orchestrator.evidence.approvals import ApprovalRefused, decide
    from dr_orchestrator.evidence.liveness import writing
    from dr_orchestrator.model.approval import Decision
    from dr_orchestrator.plans import default_actor

    actor = default_actor()
    try:
        with writing(_sessions(ctx)) as session:
            row = decide(session, run_id, step_id, Decision(decision), actor, reason)
            recorded = f"{row.decision} by {row.actor} at {row.at.isoformat()}"
    except ApprovalRefused as exc:
        raise UserError(str(exc)) from None
    click.echo(f"step {step_id} of run {run_id}: {recorded}")


@click.command()
@click.argument("run_id", metavar="RUN")
@click.argument("step_id", metavar="STEP")
@click.option("--reason", default="", help="why (recorded)")
@click.pass_context
def approve(ctx: click.Context, run_id: str, step_id: str, reason: str) -> None:
    """Approve the gate STEP of RUN, which waits for a decision. You are your OS account (the sudo
    user on root), recorded with the SSH client address and any $DR_ACTOR label; under the two-person
    rule the account that started the run cannot approve, whatever $DR_ACTOR says."""
    _decide(ctx, run_id, step_id, "approved", reason)


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

    with _sessions(ctx)() as session:
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
    from dr_orchestrator.supervision import ResumeRefused, ResumeRequest, prepare_resume

    sessions = _sessions(ctx)
    request = ResumeRequest(run_id, default_actor(), reason, step_done, retry)
    try:
        the_id, plan, point = prepare_resume(sessions, request)
    except ResumeRefused as exc:
        raise UserError(str(exc)) from None
    observers: list[Any] = [] if quiet else [ProgressPrinter()]
    outcome = run_guarded(sessions, plan, observers, resume=point, run_id=the_id)
    print_run_summary(sessions, outcome.run_id)
    sys.exit(0 if outcome.state == "succeeded" else 1)


def mount(cli: click.Group) -> None:
    for command in (approve, reject, approvals, resume):
        cli.add_command(command)

