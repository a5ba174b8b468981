"""API tokens: created with a role, shown once, kept only as a SHA-256, expired or revoked.

A token is 32 random bytes (``drt_`` + URL-safe base64). With that much entropy a plain SHA-256 is
as good as a slow password hash, and it lets a request be checked with one indexed lookup.
Creating and revoking a token is an audit event (chained) naming who did it.
"""

from __future__ import annotations

import hashlib
import secrets
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Any

from sqlalchemy import select
from sqlalchemy.orm import Session

from dr_orchestrator.evidence.annotations import record_audit_event
from dr_orchestrator.evidence.database import begin_write
from dr_orchestrator.evidence.models import ApiToken
from dr_orchestrator.model.events import utcnow

PREFIX = "drt_"
# Each role of the ladder may do what the roles before it may.
LADDER = ("compliance", "engineer", "admin")
# Off the ladder: an alerting system's token may only post alerts, and only such a token may (least
# privilege both ways: a token kept in Alertmanager's configuration can neither read nor start anything).
ALERTS = "alerts"
ROLES = (*LADDER, ALERTS)
# Tokens that can change things expire unless told otherwise; a lost one stops working within a quarter.
DEFAULT_LIFETIMES = {"engineer": timedelta(days=90), "admin": timedelta(days=90)}
NEVER = "never"  # the lifetime that asks for a token valid until revoked


class TokenError(ValueError):
    """A request about tokens that cannot be done; one sentence."""


class UnknownToken(TokenError):
    """No token has that id."""


@dataclass(frozen=True)
class Rejection:
    """Why a presented token is not accepted; ``name`` when the token is known (expired, revoked)."""

    reason: str
    name: str | None = None


def digest(token: str) -> str:
    return hashlib.sha256(token.encode()).hexdigest()


def allows(role: str, needed: str) -> bool:
    if ALERTS in (role, needed):
        return role == needed
    return LADDER.index(role) >= LADDER.index(needed)


def token_lifetime(role: str, expires: str | None) -> timedelta | None:
    """The lifetime asked for (``never``: until revoked), else the role's default (90 days for engineer
    and admin; compliance and alerts tokens last until revoked). Raises ValueError on a bad duration."""
    from dr_orchestrator.model.durations import parse_duration

    if expires is None:
        return DEFAULT_LIFETIMES.get(role)
    if expires.strip().lower() == NEVER:
        return None
    return timedelta(seconds=parse_duration(expires))


def create_token(session: Session, name: str, role: str, created_by: str,
                 expires_in: timedelta | None = None) -> tuple[ApiToken, str]:
    """A new token row and the token itself (the only time it exists outside the caller)."""
    begin_write(session)
    if role not in ROLES:
        raise TokenError(f"role {role!r} is not one of {', '.join(ROLES)}")
    if not name.strip():
        raise TokenError("a token needs a name: it is the actor the audit chain records")
    if expires_in is not None and expires_in <= timedelta(0):
        raise TokenError("a token's lifetime must be positive")
    token = PREFIX + secrets.token_urlsafe(32)
    now = utcnow()
    row = ApiToken(name=name.strip(), role=role, token_sha256=digest(token), created_at=now,
                   created_by=created_by, expires_at=now + expires_in if expires_in else None)
    session.add(row)
    session.flush()
    record_audit_event(session, created_by, "token.create", f"token {row.id}",
                       {"name": row.name, "role": role, "expires_at": row.expires_at})
    return row, token


def describe(row: ApiToken, now: datetime | None = None) -> dict[str, Any]:
    """A token as people may see it: never the token, never its hash."""
    return {"id": row.id, "name": row.name, "role": row.role, "created_at": row.created_at.isoformat(),
            "created_by": row.created_by, "expires_at": row.expires_at.isoformat() if row.expires_at else None,
            "revoked_at": row.revoked_at.isoformat() if row.revoked_at else None, "revoked_by": row.revoked_by,
            "state": state_of(row, now or utcnow())}


def state_of(row: ApiToken, now: datetime) -> str:
    if row.revoked_at is not None:
        return "revoked"
    if row.expires_at is not None and row.expires_at <= now:
        return "expired"
    return "active"


def list_tokens(session: Session) -> list[dict[str, Any]]:
    now = utcnow()
    return [describe(row, now) for row in session.scalars(select(ApiToken).order_by(ApiToken.id))]


def revoke_token(session: Session, token_id: int, actor: str) -> ApiToken:
    begin_write(session)
    row = session.get(ApiToken, token_id)
    if row is None:
        raise UnknownToken(f"no token {token_id} (see `dr tokens list`)")
    if row.revoked_at is not None:
        raise TokenError(f"token {token_id} ({row.name}) was already revoked at {row.revoked_at.isoformat()}")
    row.revoked_at, row.revoked_by = utcnow(), actor
    session.flush()
    record_audit_event(session, actor, "token.revoke", f"token {row.id}", {"name": row.name, "role": row.role})
    return row


def authenticate(session: Session, presented: str) -> ApiToken | Rejection:
    """The token row when ``presented`` is a live token; else why not."""
    row = session.scalars(select(ApiToken).where(ApiToken.token_sha256 == digest(presented))).first()
    if row is None:
        return Rejection("the token is not known")
    state = state_of(row, utcnow())
    if state == "revoked":
        return Rejection(f"the token {row.name!r} was revoked", row.name)
    if state == "expired":
        assert row.expires_at is not None
        return Rejection(f"the token {row.name!r} expired at {row.expires_at.isoformat()}", row.name)
    return row
