"""The one audited switch that turns the watch's automation off (and on again): each switch is an
audit event in the evidence database (who, when, why); the newest one is the state. Off, every
incident only notifies: nothing runs by itself, not even after approvals."""

from __future__ import annotations

from sqlalchemy import select
from sqlalchemy.orm import Session

from dr_orchestrator.evidence.annotations import record_audit_event
from dr_orchestrator.evidence.models import AuditEvent
from dr_orchestrator.watch.policy import AutomationState

AUDIT_ACTION = "watch.automation"


def switch_automation(session: Session, on: bool, actor: str, reason: str) -> AutomationState:
    """Record the switch (the caller commits); its state."""
    row = record_audit_event(session, actor, AUDIT_ACTION, "automation", {"on": on, "reason": reason})
    return AutomationState(on=on, by=row.actor, at=row.at, reason=reason)


def automation_state(session: Session, default: bool) -> AutomationState:
    """The newest switch, or ``default`` (the inventory's ``dr.watch.automation``) when there is none."""
    row = session.scalars(select(AuditEvent).where(AuditEvent.action == AUDIT_ACTION)
                          .order_by(AuditEvent.id.desc()).limit(1)).first()
    if row is None:
        return AutomationState(on=default)
    return AutomationState(on=bool(row.data.get("on")), by=row.actor, at=row.at, reason=str(row.data.get("reason", "")))
