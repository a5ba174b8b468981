"""Appending the API's audit events to the chain, each in its own write transaction."""

from __future__ import annotations

from typing import Any

from sqlalchemy.orm import Session, sessionmaker

from dr_orchestrator.evidence.annotations import record_audit_event
from dr_orchestrator.evidence.database import begin_write


def audit(sessions: sessionmaker[Session], actor: str, action: str, target: str, data: dict[str, Any]) -> None:
    with sessions() as session:
        begin_write(session)
        record_audit_event(session, actor, action, target, data)
        session.commit()
