"""What every ``aws.*`` action shares: where to call, clients per run, evidence of every call, errors, waiting.

- Credentials come from boto3's standard chain (environment, shared files, SSO, instance or task
  role); runbooks never hold them.
- Region: the ``region`` parameter, else the region of the step's site (the ``site`` parameter or
  the step's ``site:``), else boto3's own default (``AWS_DEFAULT_REGION``, config file).
- Endpoint: the ``endpoint_url`` parameter, else the site's ``aws_endpoint_url`` variable, else
  boto3's own (``AWS_ENDPOINT_URL``, else AWS).
- Every API call, including each poll of a wait, is reported as an ``aws.call`` event with its
  request id, HTTP status and the retries botocore's standard mode made (throttling included).
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, ClassVar, TypeVar

import boto3
from botocore.config import Config
from botocore.exceptions import BotoCoreError, ClientError, NoCredentialsError, NoRegionError
from pydantic import Field, field_validator

from dr_orchestrator.actions.base import Action, ActionCancelled, ActionContext, ActionError, ActionResult, Params
from dr_orchestrator.model.durations import Duration, format_duration

# Timeouts of one HTTP exchange with AWS; a step's own timeout bounds the whole action.
CONNECT_TIMEOUT_S = 5.0
READ_TIMEOUT_S = 30.0
# When a wait runs out of time, how long to let the engine end the step (so it reads "timed out").
_DEADLINE_GRACE_S = 1.0

# The action context of the step running on this thread: botocore's event hooks report to it.
# Clients are shared by all steps of a run, but each step's calls run on its own worker thread.
_current = threading.local()


class AwsParams(Params):
    site: str | None = Field(
        default=None,
        json_schema_extra={"refers_to": "site"},
        description="Inventory site whose region and aws_endpoint_url to use (default: the step's `site:`).",
    )
    region: str | None = Field(default=None, description="AWS region, overriding the site's.")
    endpoint_url: str | None = Field(
        default=None, description="API endpoint, overriding the site's aws_endpoint_url and $AWS_ENDPOINT_URL."
    )
    max_attempts: int = Field(
        default=5,
        ge=1,
        le=20,
        description="Attempts per API call, the first included (botocore's standard retry mode: throttling, 5xx).",
    )


class PollingParams(Params):
    wait: bool = Field(default=True, description="Wait until the change is complete (bounded by the step timeout).")
    poll_interval: Duration = Field(default=2.0, description="Time between status reads while waiting (seconds or 2s).")

    @field_validator("poll_interval")
    @classmethod
    def _positive(cls, value: float) -> float:
        if value <= 0:
            raise ValueError("must be more than zero (e.g. 2s)")
        return value


@dataclass(frozen=True)
class Target:
    site: str | None
    region: str | None
    endpoint_url: str | None


def resolve_target(params: AwsParams, ctx: ActionContext) -> Target:
    site_name = params.site or ctx.site
    region = params.region
    endpoint = params.endpoint_url
    if site_name:
        site = ctx.inventory.sites.get(site_name)
        if site is None:
            known = ", ".join(ctx.inventory.sites) or "none"
            raise ActionError(f"site {site_name!r} is not in inventory {ctx.inventory.name!r} (sites: {known})")
        region = region or site.region
        endpoint = endpoint or site.vars.get("aws_endpoint_url") or None
    return Target(site_name, region, endpoint)


def _error_code(response: Any, exception: Exception | None) -> str | None:
    if exception is not None:
        return type(exception).__name__
    if not response:
        return None
    http, parsed = response
    error = parsed.get("Error") or {}
    if error.get("Code"):
        return str(error["Code"])
    return f"HTTP {http.status_code}" if http.status_code >= 300 else None


def _on_needs_retry(
    attempts: int, response: Any = None, caught_exception: Exception | None = None, request_dict: Any = None, **_: Any
) -> bool | None:
    """Remember each failed attempt's error; stop retrying once the step is cancelled or out of time."""
    code = _error_code(response, caught_exception)
    if code is None:
        return None
    if isinstance(request_dict, dict):
        request_dict.setdefault("context", {}).setdefault("dr_attempt_errors", []).append(code)
    ctx: ActionContext | None = getattr(_current, "ctx", None)
    if ctx is not None and (ctx.cancelled.is_set() or ctx.remaining() <= 0):
        return False  # first non-None answer wins: botocore's retry handler is not asked
    return None


def _on_before_send(**_: Any) -> None:
    ctx: ActionContext | None = getattr(_current, "ctx", None)
    if ctx is not None:
        ctx.check_cancelled()  # no new request (or retry) once the step is over


def _call_record(model: Any, context: dict[str, Any]) -> dict[str, Any]:
    return {
        "service": model.service_model.service_name,
        "operation": model.name,
        "region": context.get("client_region"),
    }


def _on_after_call(http_response: Any, parsed: dict[str, Any], model: Any, context: dict[str, Any], **_: Any) -> None:
    ctx: ActionContext | None = getattr(_current, "ctx", None)
    if ctx is None:
        return
    meta = parsed.get("ResponseMetadata") or {}
    retries = int(meta.get("RetryAttempts", 0))
    data = _call_record(model, context) | {
        "request_id": meta.get("RequestId"),
        "http_status": http_response.status_code,
        "retries": retries,
    }
    if meta.get("HostId"):
        data["extended_request_id"] = meta["HostId"]
    error = parsed.get("Error") or {}
    if http_response.status_code >= 300:
        _current.failed_service = data["service"]  # errors name the service that answered
        data["error_code"] = error.get("Code") or f"HTTP {http_response.status_code}"
        data["error"] = ctx.redact(str(error.get("Message") or ""))
    if retries:
        data["retried_errors"] = list(context.get("dr_attempt_errors", []))[:retries]
    ctx.report("aws.call", **data)


def _on_after_call_error(exception: Exception, context: dict[str, Any], event_name: str = "", **_: Any) -> None:
    """A call that got no answer to parse (connection refused, timeouts) after botocore's retries."""
    ctx: ActionContext | None = getattr(_current, "ctx", None)
    if ctx is None or isinstance(exception, ActionCancelled):
        return
    parts = event_name.split(".", 2) + ["", ""]  # after-call-error.<service-id>.<Operation>
    service, operation = parts[1], parts[2]
    errors = list(context.get("dr_attempt_errors", []))
    ctx.report(
        "aws.call",
        service=service,
        operation=operation,
        region=context.get("client_region"),
        request_id=None,
        http_status=None,
        retries=max(0, len(errors) - 1),
        error_code=type(exception).__name__,
        error=ctx.redact(str(exception)),
    )


def new_client(service: str, target: Target, max_attempts: int) -> Any:
    config = Config(
        # total_max_attempts counts the first attempt too (botocore's max_attempts counts only retries).
        retries={"mode": "standard", "total_max_attempts": max_attempts},
        connect_timeout=CONNECT_TIMEOUT_S,
        read_timeout=READ_TIMEOUT_S,
        user_agent_extra="dr-orchestrator",
    )
    # A session per client: boto3 sessions are not thread-safe, clients are.
    client = boto3.session.Session().client(
        service, region_name=target.region, endpoint_url=target.endpoint_url, config=config
    )
    events = client.meta.events
    events.register_first("needs-retry", _on_needs_retry)
    events.register_first("before-send", _on_before_send)
    events.register("after-call", _on_after_call)
    events.register("after-call-error", _on_after_call_error)
    return client


class Aws:
    """One step's way into AWS: clients (shared within the run) and bounded waiting."""

    def __init__(self, params: AwsParams, ctx: ActionContext) -> None:
        self.params = params
        self.ctx = ctx
        self.target = resolve_target(params, ctx)

    def client(self, service: str) -> Any:
        target = self.target
        key = f"aws:{service}:{target.region}:{target.endpoint_url}:{self.params.max_attempts}"
        return self.ctx.resources.get_or_create(
            key, lambda: new_client(service, target, self.params.max_attempts), lambda client: client.close()
        )

    def wait_until(self, what: str, check: Callable[[], tuple[bool, str]], interval: float) -> tuple[str, float]:
        """Call ``check()`` -> (done, state) until done; return the final state and the seconds it took.

        Bounded by the step's deadline and cancellation, never by a botocore waiter's own schedule.
        Each state change is reported as an ``aws.wait`` event.
        """
        start = time.monotonic()
        polls = 0
        last_state: str | None = None
        while True:
            self.ctx.check_cancelled()
            done, state = check()
            polls += 1
            if state != last_state:
                self.ctx.report("aws.wait", what=what, state=state, polls=polls,
                                elapsed_s=round(time.monotonic() - start, 3))
                last_state = state
            if done:
                return state, time.monotonic() - start
            if self.ctx.remaining() <= 0:
                # The engine ends the step at this same deadline: let it, so the step reads "timed out".
                self.ctx.cancelled.wait(_DEADLINE_GRACE_S)
                raise ActionCancelled(
                    f"{what}: still {state} when the step's timeout passed "
                    f"({polls} polls in {format_duration(time.monotonic() - start)})"
                )
            try:
                self.ctx.sleep(interval)
            except ActionCancelled:
                raise ActionCancelled(f"{what}: still {state} when the step was cancelled") from None


P = TypeVar("P", bound=AwsParams)


class AwsAction(Action[P]):
    """Runs ``execute`` with this step's context known to the event hooks; AWS errors become one sentence."""

    service: ClassVar[str]

    def run(self, params: P, ctx: ActionContext) -> ActionResult:
        previous = getattr(_current, "ctx", None)
        _current.ctx = ctx
        _current.failed_service = None
        try:
            return self.execute(params, Aws(params, ctx))
        except ClientError as exc:
            service = getattr(_current, "failed_service", None) or self.service
            raise ActionError(describe_client_error(service, exc, ctx)) from None
        except NoCredentialsError:
            raise ActionError(
                "no AWS credentials found in the standard chain (environment, shared credentials or config "
                "file, SSO, instance or task role); runbooks never hold credentials"
            ) from None
        except NoRegionError:
            raise ActionError(
                "no AWS region: give the site a region in the inventory, set the step's `site:`, "
                "or pass the `region` parameter"
            ) from None
        except BotoCoreError as exc:
            raise ActionError(f"AWS {self.service} call failed: {ctx.redact(str(exc))}") from None
        finally:
            _current.ctx = previous

    def execute(self, params: P, aws: Aws) -> ActionResult:
        raise NotImplementedError

    def hosts(self, params: P) -> list[str]:
        where = params.region or params.site
        return [f"aws:{self.service}@{where}" if where else f"aws:{self.service}"]


def describe_client_error(service: str, exc: ClientError, ctx: ActionContext) -> str:
    error = exc.response.get("Error") or {}
    code = error.get("Code") or "Unknown"
    message = ctx.redact(str(error.get("Message") or "no message"))
    retries = int((exc.response.get("ResponseMetadata") or {}).get("RetryAttempts", 0))
    after = f" (after {retries} retr{'y' if retries == 1 else 'ies'})" if retries else ""
    return f"AWS {service} {exc.operation_name} failed with {code}: {message}{after}"


def paginate(client: Any, operation: str, key: str, **kwargs: Any) -> list[Any]:
    items: list[Any] = []
    for page in client.get_paginator(operation).paginate(**kwargs):
        items.extend(page.get(key, []))
    return items
