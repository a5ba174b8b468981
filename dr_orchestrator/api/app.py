"""The FastAPI application: settings, error responses, the request log, the audit of refusals,
and the routers (``routes_read``, ``routes_write``, ``dashboard``)."""

from __future__ import annotations

import logging
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass
from typing import Any

from fastapi import FastAPI, Request, Response
from fastapi.encoders import jsonable_encoder
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse

from dr_orchestrator.api.auditing import audit
from dr_orchestrator.api.auth import ANONYMOUS, SAFE_METHODS, ApiError
from dr_orchestrator.api.launcher import Launcher
from dr_orchestrator.evidence.database import session_factory_for

log = logging.getLogger("dr_orchestrator.api")

DESCRIPTION = """RTO/RPO evidence, reports and packs for compliance; runs, drills and approvals for engineers.

Every request needs an API token (`dr tokens create --name N --role R`) as `Authorization: Bearer TOKEN`.
Roles: **compliance** reads evidence, reports, packs and metrics; **engineer** may also start runs and
drills and approve or reject waiting steps; **admin** may also manage tokens. Missing, unknown, expired
or revoked token: 401; a role too low: 403. Requests that change something, and every refusal of one,
are recorded in the audit chain with the token's name as the actor."""


@dataclass(frozen=True)
class ApiSettings:
    database_url: str | None = None
    runbooks_dir: str = "runbooks"
    inventories_dir: str = "inventories"
    drills_dir: str = "failover_tests"
    signing_key: str | None = None  # reference to the pack signing key; default $DR_PACK_SIGNING_KEY


def create_app(settings: ApiSettings) -> FastAPI:
    from dr_orchestrator.api import dashboard, routes_read, routes_write

    sessions = session_factory_for(settings.database_url)
    launcher = Launcher(sessions, settings.runbooks_dir, settings.inventories_dir)

    @asynccontextmanager
    async def lifespan(_app: FastAPI) -> AsyncIterator[None]:
        yield
        launcher.stop_all()  # runs started here stop with the server (their rollbacks still run)

    # No /docs nor /redoc: their pages load scripts from a CDN. The spec stays at /openapi.json.
    app = FastAPI(title="dr-orchestrator", version="1", description=DESCRIPTION, lifespan=lifespan, docs_url=None,
                  redoc_url=None)
    app.state.settings = settings
    app.state.sessions = sessions
    app.state.launcher = launcher
    app.add_exception_handler(ApiError, _api_error)  # type: ignore[arg-type]
    app.add_exception_handler(RequestValidationError, _invalid_request)  # type: ignore[arg-type]
    app.middleware("http")(_request_log)
    app.include_router(routes_read.router)
    app.include_router(routes_write.router)
    app.include_router(dashboard.router)
    return app


def _refusal(request: Request, status: int, body: dict[str, Any]) -> JSONResponse:
    if request.method not in SAFE_METHODS:
        actor = getattr(request.state, "actor", None) or ANONYMOUS
        audit(request.app.state.sessions, actor, "api.refused", f"{request.method} {request.url.path}",
              {"status": status, "error": body["error"]})
    headers = {"WWW-Authenticate": "Bearer"} if status == 401 else None
    return JSONResponse(jsonable_encoder(body), status_code=status, headers=headers)


async def _api_error(request: Request, exc: ApiError) -> Response:
    return _refusal(request, exc.status, {"error": exc.message, "status": exc.status, **exc.extra})


async def _invalid_request(request: Request, exc: RequestValidationError) -> Response:
    problems = [{"where": ".".join(str(part) for part in error["loc"]), "message": error["msg"]}
                for error in exc.errors()]
    first = problems[0] if problems else {"where": "request", "message": "invalid"}
    return _refusal(request, 422, {"error": f"{first['where']}: {first['message']}", "status": 422,
                                   "problems": problems})


async def _request_log(request: Request, call_next: Callable[[Request], Awaitable[Response]]) -> Response:
    # Method and path only: a dashboard login link carries the token in its query string.
    started = time.monotonic()
    response = await call_next(request)
    actor = getattr(request.state, "actor", None) or "-"
    log.info("%s %s %s %s %.0fms", actor, request.method, request.url.path, response.status_code,
             (time.monotonic() - started) * 1000)
    return response
