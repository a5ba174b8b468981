"""The FastAPI application: settings, error responses (every refusal one JSON body, never a bare
500), the request log, the audit of refusals, and the routers (``routes_read``, ``routes_write``, ``dashboard``)."""

from __future__ import annotations

import logging
import time
from collections import Counter
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass
from typing import Any

from fastapi import Depends, FastAPI, Request, Response
from fastapi.encoders import jsonable_encoder
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from sqlalchemy.orm import Session, sessionmaker
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.routing import Match

from dr_orchestrator.api.auditing import audit
from dr_orchestrator.api.auth import SAFE_METHODS, ApiError, actor_of
from dr_orchestrator.api.forwarding import ClusterRole, forwarded
from dr_orchestrator.api.launcher import Launcher
from dr_orchestrator.evidence.database import session_factory_for

log = logging.getLogger("dr_orchestrator.api")
HTTP_METHODS = ("GET", "HEAD", "POST", "PUT", "PATCH", "DELETE", "OPTIONS")

DESCRIPTION = """RTO/RPO evidence, reports and packs for compliance; runs, drills and approvals for engineers.

Every request needs an API token (`dr tokens create --name N --role R`) as `Authorization: Bearer TOKEN`,
except the public status page (`/status`, `/status.json`: read-only) and the dashboard's sign-in pages.
Roles: **compliance** reads evidence, reports, packs and metrics; **engineer** may also start runs and
drills and approve or reject waiting steps; **admin** may also manage tokens; **alerts** (an alerting
system's token) may only post alerts, and only it may (`/api/alerts/...`). Missing, unknown, expired
or revoked token: 401; a role too low: 403; a malformed value in the path, query or body: 422 naming it.
Every refusal has the body `{"error": "...", "status": N}`. Requests that change something, every
refusal of one, every malformed request (422) and every request for a route or method that does not
exist (404, 405) are recorded in the audit chain with the token's name as the actor."""


@dataclass(frozen=True)
class ApiSettings:
    database_url: str | None = None
    runbooks_dir: str = "runbooks"
    inventories_dir: str = "inventories"
    drills_dir: str = "failover_tests"
    signing_key: str | None = None  # reference to the pack signing key; default $DR_PACK_SIGNING_KEY
    status_services: tuple[str, ...] = ()  # what /status lists; default: the services the evidence knows
    inventory: str | None = None  # the inventory alerts are matched against and classified by (`dr serve -i`)
    alert_webhook_secret: str | None = None  # reference (env:NAME, file:PATH) to the generic webhook's HMAC key


def create_app(settings: ApiSettings, cluster: ClusterRole | None = None,
               sessions: sessionmaker[Session] | None = None) -> FastAPI:
    """``cluster``: the node the API runs in (`dr node run`): its leader's runs are fenced, and a follower
    forwards what changes something to the leader (``forwarding``); None for `dr serve`. ``sessions``: the
    evidence database's, when the caller has them (else made from ``settings.database_url``)."""
    from dr_orchestrator.api import alerts, dashboard, metrics, routes_read, routes_write, status

    sessions = sessions or session_factory_for(settings.database_url)
    launcher = Launcher(sessions, settings.runbooks_dir, settings.inventories_dir, cluster)

    @asynccontextmanager
    async def lifespan(_app: FastAPI) -> AsyncIterator[None]:
        yield
        launcher.stop_all()  # runs started here stop with the server (their rollbacks still run)

    # No /docs nor /redoc: their pages load scripts from a CDN. The spec stays at /openapi.json.
    app = FastAPI(title="dr-orchestrator", version="1", description=DESCRIPTION, lifespan=lifespan, docs_url=None,
                  redoc_url=None, dependencies=[Depends(_each_query_parameter_once)])
    app.state.settings = settings
    app.state.sessions = sessions
    app.state.launcher = launcher
    app.state.cluster = cluster
    app.state.metrics = metrics.Exporter(sessions, settings.drills_dir)  # a registry per app, made at first scrape
    app.add_exception_handler(ApiError, _api_error)  # type: ignore[arg-type]
    app.add_exception_handler(RequestValidationError, _invalid_request)  # type: ignore[arg-type]
    app.add_exception_handler(StarletteHTTPException, _unrouted)  # type: ignore[arg-type]
    app.add_exception_handler(Exception, _failed)
    if cluster is not None:
        app.middleware("http")(_forward_writes)
    app.middleware("http")(_request_log)  # added last, so outermost: forwarded requests are logged too
    app.include_router(routes_read.router)
    app.include_router(routes_write.router)
    app.include_router(dashboard.router)
    app.include_router(status.router)
    app.include_router(alerts.router)
    return app


def _each_query_parameter_once(request: Request) -> None:
    """Every query parameter holds one value: given twice, which one was meant is unknown."""
    counts = Counter(key for key, _value in request.query_params.multi_items())
    repeated = sorted(key for key, count in counts.items() if count > 1)
    if repeated:
        raise ApiError(422, f"query.{_printable(repeated[0])}: given {counts[repeated[0]]} times; give it once")


def _refusal(request: Request, status: int, body: dict[str, Any], headers: dict[str, str] | None = None,
             probe: bool = False) -> JSONResponse:
    """The refusal's answer; audited when the request would change something, is malformed (422), or
    is a ``probe`` (a route or method that does not exist). Other refused reads (a token refused, a
    record not found) are not: a scraper with an expired token must not fill the chain."""
    if probe or status == 422 or request.method not in SAFE_METHODS:
        audit(request.app.state.sessions, actor_of(request), "api.refused", _target(request),
              {"status": status, "error": body["error"]})
    if status == 401:
        headers = {**(headers or {}), "WWW-Authenticate": "Bearer"}
    return JSONResponse(jsonable_encoder(body), status_code=status, headers=headers)


def _printable(text: str) -> str:
    return text.replace("\x00", "\\x00")  # PostgreSQL stores no NUL byte, and a path may carry one


def _target(request: Request) -> str:
    return f"{request.method} {_printable(request.url.path)}"


async def _api_error(request: Request, exc: ApiError) -> Response:
    return _refusal(request, exc.status, {"error": exc.message, "status": exc.status, **exc.extra})


async def _invalid_request(request: Request, exc: RequestValidationError) -> Response:
    problems = [{"where": ".".join(str(part) for part in error["loc"]), "message": _message(error)}
                for error in exc.errors()]
    first = problems[0] if problems else {"where": "request", "message": "invalid"}
    return _refusal(request, 422, {"error": f"{first['where']}: {first['message']}", "status": 422,
                                   "problems": problems})


def _message(error: Any) -> str:
    """Pydantic's message, but our own checks' sentences without its "Value error, " prefix."""
    if error["type"] == "value_error" and "error" in error.get("ctx", {}):
        return str(error["ctx"]["error"])
    return str(error["msg"])


async def _unrouted(request: Request, exc: StarletteHTTPException) -> Response:
    """No route for this path (404) or method (405); the framework's other refusals (400) too."""
    headers = dict(exc.headers or {})
    if exc.status_code == 405:
        headers["Allow"] = ", ".join(_methods_of(request))
        error = f"{request.method} is not allowed on {_printable(request.url.path)}; allowed: {headers['Allow']}"
    elif exc.status_code == 404:
        error = f"no such route: {_printable(request.url.path)} (the routes are in /openapi.json)"
    else:  # FastAPI's 400 for a body it cannot parse is a malformed value like any other
        return _refusal(request, 422, {"error": f"body: {exc.detail}", "status": 422})
    return _refusal(request, exc.status_code, {"error": error, "status": exc.status_code}, headers, probe=True)


def _methods_of(request: Request) -> list[str]:
    """Every method some route takes at this path (Starlette's own 405 names only the first route's)."""
    return [method for method in HTTP_METHODS
            if any(route.matches({**request.scope, "method": method})[0] is Match.FULL
                   for route in request.app.router.routes)]


async def _failed(request: Request, exc: Exception) -> Response:
    """A fault of the server: logged with its traceback, audited, answered without internals. An
    evidence database that does not answer (its failover takes tens of seconds) is 503: try again."""
    from sqlalchemy.exc import SQLAlchemyError

    from dr_orchestrator.evidence.store import database_unreachable

    if isinstance(exc, SQLAlchemyError) and database_unreachable(exc):  # not any OSError: a file may be the fault
        log.warning("%s: the evidence database is unreachable: %s", _target(request), exc)
        return JSONResponse({"error": "the evidence database is unreachable (it may be failing over): try again "
                                      "shortly", "status": 503}, status_code=503, headers={"Retry-After": "5"})
    log.error("%s failed", _target(request), exc_info=exc)
    try:
        audit(request.app.state.sessions, actor_of(request), "api.failed", _target(request),
              {"status": 500, "error": type(exc).__name__})
    except Exception:  # noqa: BLE001 - the database may be the fault; the log has both
        log.exception("%s: the failure could not be audited", _target(request))
    return JSONResponse({"error": "the server failed to answer; its log has the cause", "status": 500},
                        status_code=500)


async def _forward_writes(request: Request, call_next: Callable[[Request], Awaitable[Response]]) -> Response:
    try:
        answer = await forwarded(request, request.app.state.cluster)
    except ApiError as exc:
        return await _api_error(request, exc)
    return answer if answer is not None else await call_next(request)


async def _request_log(request: Request, call_next: Callable[[Request], Awaitable[Response]]) -> Response:
    # Method and path only: a dashboard login link carries the token in its query string.
    started = time.monotonic()
    response = await call_next(request)
    actor = getattr(request.state, "actor", None) or "-"
    log.info("%s %s %s %s %.0fms", actor, request.method, request.url.path, response.status_code,
             (time.monotonic() - started) * 1000)
    return response
