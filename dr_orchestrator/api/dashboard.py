"""The dashboard page, rendered on the server (charts as inline SVG, no JavaScript, nothing from a
CDN), and its sign-in: a login form, or a one-time ``/dashboard?token=`` link; either keeps the token
in an HttpOnly, SameSite=Strict cookie. Requests are logged without query strings (see ``app``)."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from functools import cache
from typing import Any
from urllib.parse import parse_qs

import jinja2
from fastapi import APIRouter, Query, Request
from fastapi.responses import HTMLResponse, RedirectResponse, Response
from sqlalchemy.orm import Session, sessionmaker

from dr_orchestrator.api import metrics, views
from dr_orchestrator.api.auditing import audit
from dr_orchestrator.api.auth import ANONYMOUS, COOKIE, Principal, header_token, identify
from dr_orchestrator.api.responses import MEANINGS
from dr_orchestrator.api.tokens import LADDER, Rejection, allows
from dr_orchestrator.evidence import drills as drill_records
from dr_orchestrator.evidence import qualifying
from dr_orchestrator.evidence.annotations import overdue_findings
from dr_orchestrator.evidence.approvals import waiting_gates
from dr_orchestrator.evidence.charts import rto_chart
from dr_orchestrator.evidence.reports import quarter_of
from dr_orchestrator.model.events import utcnow

router = APIRouter(tags=["dashboard"])
MAX_FORM_BYTES = 4096
SIGN_IN_AGAIN = {"description": "no token, or a refused one: the sign-in form, saying why",
                 "content": {"text/html": {}}}
# Declared by hand: FastAPI would give a model of an HTML route's answer the route's media type.
MALFORMED = {"description": MEANINGS[422],
             "content": {"application/json": {"schema": {"$ref": "#/components/schemas/ErrorBody"}}}}


@cache
def _templates() -> jinja2.Environment:
    return jinja2.Environment(loader=jinja2.PackageLoader("dr_orchestrator.api", "templates"),
                              autoescape=True, undefined=jinja2.StrictUndefined)


def _page(name: str, status: int = 200, **context: Any) -> HTMLResponse:
    return HTMLResponse(_templates().get_template(name).render(**context), status_code=status)


def _with_cookie(request: Request, response: Response, token: str) -> Response:
    response.set_cookie(COOKIE, token, httponly=True, samesite="strict", secure=request.url.scheme == "https",
                        path="/")
    return response


@router.get("/", include_in_schema=False)
def root() -> Response:
    return RedirectResponse("/dashboard", status_code=303)


def _reader(sessions: sessionmaker[Session], token: str | None) -> Principal | Rejection:
    """The holder of ``token`` when it may read the dashboard (an alerts token may not)."""
    found = identify(sessions, token)
    if isinstance(found, Principal) and not allows(found.role, LADDER[0]):
        return Rejection(f"the token {found.name!r} has the role {found.role}: it may only post alerts", found.name)
    return found


@router.get("/login", response_class=HTMLResponse, summary="Sign-in form of the dashboard")
def login_form() -> HTMLResponse:
    return _page("login.html.j2", error=None)


@router.post("/login", response_class=RedirectResponse, status_code=303, responses={
    303: {"description": "signed in: to /dashboard, with the cookie"}, 401: SIGN_IN_AGAIN},
    summary="Sign in: keeps the token in an HttpOnly cookie")
async def login(request: Request) -> Response:
    body = await request.body()
    token = (parse_qs(body[:MAX_FORM_BYTES].decode(errors="replace")).get("token") or [""])[0].strip()
    sessions = request.app.state.sessions
    found = _reader(sessions, token)
    if isinstance(found, Rejection):
        audit(sessions, found.name or ANONYMOUS, "api.refused", "POST /login", {"status": 401, "error": found.reason})
        return _page("login.html.j2", status=401, error=found.reason)
    request.state.actor = found.name
    return _with_cookie(request, RedirectResponse("/dashboard", status_code=303), token)


@router.get("/logout", response_class=RedirectResponse, status_code=303, summary="Sign out: forgets the cookie",
            responses={303: {"description": "to /login, the cookie forgotten"}})
def logout() -> Response:
    response = RedirectResponse("/login", status_code=303)
    response.delete_cookie(COOKIE, path="/")
    return response


@router.get("/dashboard", response_class=HTMLResponse, summary="Latest drills, RTO trend per service, approvals",
            responses={303: {"description": "signed in by the link: to /dashboard, with the cookie"},
                       401: SIGN_IN_AGAIN, 422: MALFORMED})
def dashboard(request: Request, token: str | None = Query(
        None, description="one-time sign-in link: sets the cookie and redirects here without the token")) -> Response:
    sessions = request.app.state.sessions
    if token is not None:
        found = _reader(sessions, token)
        if isinstance(found, Rejection):
            return _page("login.html.j2", status=401, error=found.reason)
        return _with_cookie(request, RedirectResponse("/dashboard", status_code=303), token)
    presented = header_token(request) or request.cookies.get(COOKIE)
    found = _reader(sessions, presented)
    if isinstance(found, Rejection):
        return _page("login.html.j2", status=401, error=found.reason if presented else None)
    request.state.actor = found.name
    return _page("dashboard.html.j2", **_content(request, found))


def _content(request: Request, principal: Principal) -> dict[str, Any]:
    from dr_orchestrator.watch.warnings import recorded_warnings

    listing = metrics.drill_schedules(request.app.state.settings.drills_dir)
    with request.app.state.sessions() as session:
        trends = views.rto_trend(session)
        this_quarter = quarter_of(utcnow())
        standings = qualifying.standings(qualifying.period(session, this_quarter.start, this_quarter.end),
                                         sorted(views.current_targets(session)))
        approvals = waiting_gates(session)
        drill_runs = [drill_records.summary(r) for r in views.latest_drill_runs(session, 10)]
        runs = views.filtered_runs(session, limit=15)
        overdue = overdue_findings(session)
        warnings = recorded_warnings(session)
    return {"principal": principal, "trends": [_chart(trend) for trend in trends], "approvals": approvals,
            "quarter": this_quarter.label, "standings": [s.as_dict() for s in standings.values()],
            "drill_runs": drill_runs, "runs": runs, "overdue_findings": overdue, "warnings": warnings,
            "schedules": [entry for entry in listing["drills"] if entry["schedule"]]}


def _chart(trend: views.Trend) -> dict[str, object]:
    moments = [point.at for point in trend.points]
    margin = max((max(moments) - min(moments)) * 0.05, timedelta(seconds=1))
    end = max(max(moments) + margin, min(datetime.now(UTC), max(moments) + timedelta(days=1)))
    svg = rto_chart(trend.service, trend.points, trend.target_s, min(moments) - margin, end)
    return {"service": trend.service, "count": len(trend.points), "target_s": trend.target_s, "svg": svg}
