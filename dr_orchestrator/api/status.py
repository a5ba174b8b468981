"""The public status page and what the DR team publishes on it.

``GET /status`` (HTML) and ``GET /status.json`` need no token and only read: each service's state
(operational, degraded, outage, restored-recently) and the messages published, read from the
evidence at every request (two queries), so each transition shows at once. Nothing internal is in
them (``evidence.incidents.public_status``). These are the only routes without a token besides the
sign-in pages. ``POST /api/incidents/{incident_id}/messages`` publishes a message (engineer), audited
with the token's holder as the one who said it."""

from __future__ import annotations

import time
from typing import Any, Literal

from fastapi import APIRouter, Depends, Path, Request, Response
from fastapi.responses import HTMLResponse
from pydantic import BaseModel, ConfigDict, Field
from sqlalchemy import select

from dr_orchestrator.api.auth import ApiError, Principal, engineer
from dr_orchestrator.api.dashboard import _page
from dr_orchestrator.api.responses import Timestamp, refusals
from dr_orchestrator.api.values import NonBlank
from dr_orchestrator.evidence import incidents
from dr_orchestrator.evidence.annotations import record_audit_event
from dr_orchestrator.evidence.models import RunService
from dr_orchestrator.model.events import utcnow

router = APIRouter(tags=["status"])
KNOWN_SERVICES_FOR_S = 60.0  # without ApiSettings.status_services, the evidence's services, read once a minute
FRESH = {"Cache-Control": "no-cache"}  # a cache may keep the page, but must ask again before showing it


class ServiceStatus(BaseModel):
    service: str
    state: Literal["operational", "degraded", "outage", "restored-recently"]
    since: Timestamp | None = Field(description="when the disruption began, or when the service was restored")


class PublishedMessage(BaseModel):
    at: Timestamp
    text: str
    services: list[str] = Field(description="the services the incident hits")
    by: Literal["the DR team"]


class StatusView(BaseModel):
    updated_at: Timestamp
    services: list[ServiceStatus]
    messages: list[PublishedMessage] = Field(description="newest first")


class MessageRequest(BaseModel):
    # The one who said it is the token's holder: a body naming anyone else is refused.
    model_config = ConfigDict(extra="forbid")

    text: NonBlank = Field(description="what customers should know, shown as it is written",
                           json_schema_extra={"maxLength": incidents.MESSAGE_MAX_CHARS})


class Published(BaseModel):
    incident_id: str
    at: Timestamp
    text: str
    actor: str = Field(description="the token's name")


def _status(request: Request) -> dict[str, Any]:
    with request.app.state.sessions() as session:
        return incidents.public_status(session, _services(request))


def _services(request: Request) -> list[str]:
    configured = request.app.state.settings.status_services
    if configured:
        return list(configured)
    known: tuple[float, list[str]] | None = getattr(request.app.state, "status_known_services", None)
    if known is None or time.monotonic() - known[0] > KNOWN_SERVICES_FOR_S:
        with request.app.state.sessions() as session:
            names = sorted(session.scalars(select(RunService.service).distinct()))
        known = (time.monotonic(), names)
        request.app.state.status_known_services = known
    return known[1]


@router.get("/status", response_class=HTMLResponse, summary="Public status page: each service's state and the "
            "messages the DR team published (no token)")
def status_page(request: Request) -> HTMLResponse:
    response = _page("status.html.j2", shown=_status(request))
    response.headers.update(FRESH)
    return response


@router.get("/status.json", response_model=StatusView, summary="The public status page as JSON (no token)")
def status_json(request: Request, response: Response) -> dict[str, Any]:
    response.headers.update(FRESH)
    return _status(request)


@router.post("/api/incidents/{incident_id}/messages", status_code=201, tags=["incidents"],
             summary="Publish a message of an incident on the status page (engineer)", response_model=Published,
             responses=refusals(401, 403, 404, 422))
def publish_message(body: MessageRequest, request: Request,
                    incident_id: str = Path(pattern=f"^{incidents.INCIDENT_ID.pattern}$",
                                            description="e.g. INC-20261207-1a2b3c4d"),
                    principal: Principal = Depends(engineer)) -> dict[str, Any]:
    """Same as `dr incidents say`: shown on /status at once, signed "the DR team"; the evidence keeps
    who said it (the token's name)."""
    at = utcnow()
    with request.app.state.sessions() as session:
        try:
            incidents.say(session, incident_id, body.text, principal.name, at)
        except incidents.IncidentError as exc:
            session.rollback()
            raise ApiError(404 if isinstance(exc, incidents.UnknownIncident) else 422, str(exc)) from None
        record_audit_event(session, principal.name, "incident.say", incident_id, {"text": body.text.strip()})
        session.commit()
    return {"incident_id": incident_id, "at": at.isoformat(), "text": body.text.strip(), "actor": principal.name}
