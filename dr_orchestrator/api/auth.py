"""Who is asking: the API token from ``Authorization: Bearer`` (or, for reads, the dashboard's
cookie), its role, and the refusals. Refused requests that would change something are audited by
the error handler in ``app``; this module only says who and why."""

from __future__ import annotations

from dataclasses import dataclass

from fastapi import Request, Security
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer
from sqlalchemy.orm import Session, sessionmaker

from dr_orchestrator.api.tokens import ALERTS, ROLES, Rejection, allows, authenticate

COOKIE = "dr_token"
SAFE_METHODS = frozenset({"GET", "HEAD", "OPTIONS"})
ANONYMOUS = "anonymous"
bearer = HTTPBearer(auto_error=False, description="an API token from `dr tokens create`")


class ApiError(Exception):
    """A refusal or a mistake in the request: HTTP ``status`` with one sentence."""

    def __init__(self, status: int, message: str, **extra: object) -> None:
        super().__init__(message)
        self.status = status
        self.message = message
        self.extra = extra


@dataclass(frozen=True)
class Principal:
    token_id: int
    name: str
    role: str


def presented_token(request: Request, credentials: HTTPAuthorizationCredentials | None) -> str | None:
    if credentials is not None and credentials.scheme.lower() == "bearer":
        return credentials.credentials
    # The cookie only for reads: a request that changes something must carry the token itself, so
    # a page elsewhere can never make the browser act with it (SameSite=Strict aside).
    if request.method in SAFE_METHODS:
        return request.cookies.get(COOKIE)
    return None


def header_token(request: Request) -> str | None:
    """The token of an ``Authorization: Bearer`` header, read before (or without) the route's own check."""
    scheme, _, value = request.headers.get("authorization", "").partition(" ")
    return value.strip() if scheme.lower() == "bearer" and value.strip() else None


def actor_of(request: Request) -> str:
    """Who the audit names for this request: its token's holder once known (even an expired or revoked
    token's), else ``anonymous``; a refusal before any route ran (404, 405, a malformed body) looks it up."""
    known = getattr(request.state, "actor", None)
    if known:
        return str(known)
    found = identify(request.app.state.sessions, header_token(request))
    return found.name or ANONYMOUS


def identify(sessions: sessionmaker[Session], token: str | None) -> Principal | Rejection:
    if not token:
        return Rejection("no API token: send `Authorization: Bearer TOKEN` (create one with `dr tokens create`)")
    with sessions() as session:
        found = authenticate(session, token)
    if isinstance(found, Rejection):
        return found
    return Principal(found.id, found.name, found.role)


class Role:
    """Dependency: the caller, who must hold ``needed`` (or a role above it)."""

    def __init__(self, needed: str) -> None:
        assert needed in ROLES
        self.needed = needed

    def __call__(self, request: Request,
                 credentials: HTTPAuthorizationCredentials | None = Security(bearer)) -> Principal:
        found = identify(request.app.state.sessions, presented_token(request, credentials))
        if isinstance(found, Rejection):
            request.state.actor = found.name or ANONYMOUS
            raise ApiError(401, found.reason)
        request.state.actor = found.name
        if not allows(found.role, self.needed):
            needs = "only an alerts token (`dr tokens create --role alerts`)" if self.needed == ALERTS \
                else f"{self.needed} or above"
            raise ApiError(403, f"the token {found.name!r} has the role {found.role}; this needs {needs}",
                           role=found.role, needed=self.needed)
        return found


reader = Role("compliance")
engineer = Role("engineer")
admin = Role("admin")
alerts = Role(ALERTS)
