"""`dr incidents ...`: incidents, their messages, closing and approvals; thin, heavy imports inside
the commands."""

from __future__ import annotations

import json
from typing import Any

import click

from dr_orchestrator.cli.common import UserError, output_option, session_factory


@click.group()
def incidents() -> None:
    """Incidents: the runs (attempts, retries, failback) of one disruption, and its impact start."""


@incidents.command("list")
@click.option("--limit", default=50, show_default=True)
@output_option
@click.pass_context
def incidents_list(ctx: click.Context, limit: int, output: str) -> None:
    """Newest first."""
    from dr_orchestrator.evidence.incidents import list_incidents
    from dr_orchestrator.progress import print_incident_list

    with session_factory(ctx)() as session:
        rows = list_incidents(session, limit=limit)
    if output == "json":
        click.echo(json.dumps(rows, indent=2))
    else:
        print_incident_list(rows)


@incidents.command("show")
@click.argument("incident_id")
@output_option
@click.pass_context
def incidents_show(ctx: click.Context, incident_id: str, output: str) -> None:
    """Its runs in order with state and RTO/RPO, the impact start with how it was determined, its
    lifecycle (detected, decided, executing, restored, closed) with the RTO's parts, and its messages."""
    from dr_orchestrator.evidence.incidents import incident_detail
    from dr_orchestrator.progress import print_incident

    with session_factory(ctx)() as session:
        detail: dict[str, Any] | None = incident_detail(session, incident_id)
    if detail is None:
        raise UserError(f"no incident {incident_id!r} in the evidence database (see `dr incidents list`)")
    if output == "json":
        click.echo(json.dumps(detail, indent=2))
    else:
        print_incident(detail)


@incidents.command("say")
@click.argument("incident_id")
@click.argument("text")
@click.pass_context
def incidents_say(ctx: click.Context, incident_id: str, text: str) -> None:
    """Publish TEXT as a message of the incident on the public status page (/status, signed "the DR
    team"); who said it is kept in the evidence."""
    from dr_orchestrator.evidence.incidents import IncidentError, say
    from dr_orchestrator.model.events import utcnow
    from dr_orchestrator.plans import default_actor

    with session_factory(ctx)() as session, session.begin():
        try:
            say(session, incident_id, text, default_actor(), utcnow())
        except IncidentError as exc:
            raise UserError(str(exc)) from None
    click.echo(f"published on the status page for incident {incident_id}")


@incidents.command("close")
@click.argument("incident_id")
@click.option("--reason", required=True, help="why: restored and checked, a false alarm, ...")
@click.pass_context
def incidents_close(ctx: click.Context, incident_id: str, reason: str) -> None:
    """Close the incident: a new disruption of its target opens a new one, and the status page stops
    showing it (a restored service still says restored-recently for a day)."""
    from dr_orchestrator.evidence.incidents import IncidentError, record_incident_event
    from dr_orchestrator.model.events import utcnow
    from dr_orchestrator.plans import default_actor

    if not reason.strip():
        raise UserError("--reason is blank: say why the incident is closed")
    with session_factory(ctx)() as session, session.begin():
        try:
            record_incident_event(session, incident_id, "closed", utcnow(), default_actor(), {"reason": reason})
        except IncidentError as exc:
            raise UserError(str(exc)) from None
    click.echo(f"incident {incident_id} closed")


def _answer(ctx: click.Context, incident_id: str, answer: str, reason: str) -> None:
    from dr_orchestrator.evidence.incidents import IncidentError, answer_incident
    from dr_orchestrator.model.events import utcnow
    from dr_orchestrator.plans import default_actor

    actor = default_actor()
    try:
        with session_factory(ctx)() as session, session.begin():
            answer_incident(session, incident_id, answer, actor, reason, utcnow())
    except IncidentError as exc:
        raise UserError(str(exc)) from None
    click.echo(f"incident {incident_id}: {answer} by {actor}")


@incidents.command("approve")
@click.argument("incident_id")
@click.option("--reason", default="", help="why (recorded)")
@click.pass_context
def incidents_approve(ctx: click.Context, incident_id: str, reason: str) -> None:
    """Approve what the watch proposes for an incident whose policy asks for approvals: it runs once
    enough distinct people approved (dr.watch.approval.approvers)."""
    _answer(ctx, incident_id, "approved", reason)


@incidents.command("reject")
@click.argument("incident_id")
@click.option("--reason", required=True, help="why (recorded)")
@click.pass_context
def incidents_reject(ctx: click.Context, incident_id: str, reason: str) -> None:
    """Reject what the watch proposes for an incident: nothing runs."""
    _answer(ctx, incident_id, "rejected", reason)
