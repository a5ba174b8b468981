"""What the actions on replicated stores (PostgreSQL, Redis) share, without a driver: a store's
servers by site (the site checked, the other site), site parameters, the engineer's ``--force``
reasons, polling until the step's deadline, the incident time, and how an RPO figure (or the refusal
to give one) is recorded."""

from __future__ import annotations

import time
from datetime import datetime
from typing import Any, ClassVar

from pydantic import Field

from dr_orchestrator.actions.base import ActionContext, ActionError
from dr_orchestrator.model.durations import format_duration

POLL_S = 0.01  # promotion, catch-up and streaming are waited for at this rate: each takes tens of milliseconds
# The action event of a method that refused to give a figure (the evidence's rto.RPO_NOT_MEASURED).
RPO_NOT_MEASURED = "rpo.not_measured"


class Servers:
    """A replicated store's servers, one per site (``hosts``: site -> address); its errors name it
    ``KIND 'NAME'`` (``database 'trading'``, ``redis 'quotation'``). Mixed into the stores' frozen
    dataclasses, which declare ``name`` and ``hosts``."""

    kind: ClassVar[str]
    name: str
    hosts: dict[str, str]

    def check_site(self, site: str) -> None:
        if site not in self.hosts:
            raise ActionError(f"{self.kind} {self.name!r} has no server at site {site!r}; it has: "
                              f"{', '.join(self.hosts)}")

    def other_sites(self, site: str) -> list[str]:
        return [other for other in self.hosts if other != site]

    def other_site(self, site: str, given: str | None, what: str) -> str:
        """``given`` (checked), else the store's one other site; ``what`` names it in errors."""
        if given is not None:
            self.check_site(given)
            if given == site:
                raise ActionError(f"the {what} must be another site than {site}")
            return given
        others = self.other_sites(site)
        if len(others) != 1:
            raise ActionError(f"say which site is the {what}: {self.kind} {self.name!r} has servers at "
                              f"{', '.join(self.hosts)}")
        return others[0]


def site_field(description: str) -> Any:
    return Field(description=description, json_schema_extra={"refers_to": "site"})


def optional_site_field(description: str) -> Any:
    return Field(default=None, description=description, json_schema_extra={"refers_to": "site"})


def services_field(shared: str) -> Any:
    """The ``services`` parameter of an RPO action; ``shared``: what the services share (the database)."""
    return Field(
        default_factory=list,
        description=f"Services the figure applies to (they share the {shared}); by default the step's service, "
        "or every service of the run.",
        json_schema_extra={"refers_to": "service"},
    )


def forced_reasons(ctx: ActionContext) -> list[str]:
    """The reasons the engineer gave with --force (empty: the run is not forced)."""
    return [str(reason) for reason in ctx.run_info.get("forced") or []]


def unless_forced(ctx: ActionContext, refusal: str) -> list[str]:
    """The reasons the run is forced with; without any, ActionError: ``refusal`` and how to go on anyway."""
    forced = forced_reasons(ctx)
    if not forced:
        raise ActionError(f"{refusal} (run with --force and a reason to go on anyway)")
    return forced


def poll_until_deadline(ctx: ActionContext, what: str, started: float, limit: float | None = None) -> bool:
    """Sleep one poll interval and return True; with ``limit``, return False once that many seconds
    have passed since ``started``; raise ActionError saying ``what`` once the step's deadline has."""
    waited = time.monotonic() - started
    if limit is not None and waited >= limit:
        return False
    if ctx.remaining() <= 0:
        raise ActionError(f"{what}: not done when the step's timeout passed ({format_duration(waited)})")
    ctx.sleep(POLL_S)
    return True


def incident_time(ctx: ActionContext) -> datetime:
    value = ctx.run_info.get("incident_at")
    if not value:
        raise ActionError("the run has no incident time, so RPO cannot be measured")
    moment = datetime.fromisoformat(str(value))
    if moment.tzinfo is None or moment.utcoffset() is None:
        raise ActionError(f"the run's incident time {value!r} has no time zone")
    return moment


def record_rpo(ctx: ActionContext, services: list[str], value: float | None, method: str,
               raw: dict[str, Any]) -> list[str | None]:
    """``rpo_s`` measured for each of ``services`` (default: the step's), or, without a figure, one
    ``rpo.not_measured`` event whose reason is ``method``. Returns the services it applies to."""
    applies_to: list[str | None] = list(services) or [ctx.service]
    if value is None:
        ctx.report(RPO_NOT_MEASURED, services=applies_to, reason=method, raw=raw)
    else:
        for service in applies_to:
            ctx.measure("rpo_s", value, method, raw, service=service)
    return applies_to
