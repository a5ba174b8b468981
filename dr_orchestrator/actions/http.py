"""``http.check``: probe an HTTP endpoint until it answers as expected N times in a row."""

from __future__ import annotations

from typing import Any, Literal
from urllib.parse import urlsplit

import httpcore  # noqa: F401 - httpx imports it with the first client (~50 ms): now, before the run's clock
import httpx
from pydantic import Field, field_validator

from dr_orchestrator.actions.base import Action, ActionContext, ActionResult
from dr_orchestrator.actions.probing import ProbingParams, Verdict, probe_until_streak
from dr_orchestrator.model.runbook import Effect

_MISSING = object()


class HttpCheckParams(ProbingParams):
    url: str = Field(description="Endpoint to probe, http:// or https://.")
    method: Literal["GET", "HEAD", "POST", "PUT", "PATCH", "DELETE", "OPTIONS"] = Field(
        default="GET", description="HTTP method of every probe."
    )
    expect_status: list[int] = Field(default=[200], min_length=1, description="Status codes that count as good.")
    expect_json: dict[str, Any] = Field(
        default_factory=dict,
        description='Dotted paths into the JSON body and the values they must hold, e.g. {"db.role": "primary"}.',
    )
    expect_text: str | None = Field(default=None, description="Text the body must contain.")
    headers: dict[str, str] = Field(
        default_factory=dict,
        description="Extra request headers; env:NAME / file:PATH values are secrets (e.g. a bearer token).",
        json_schema_extra={"secret": True},
    )
    verify_tls: bool = Field(default=True, description="Verify the server's TLS certificate (https).")

    @field_validator("method", mode="before")
    @classmethod
    def _upper(cls, value: Any) -> Any:
        return value.upper() if isinstance(value, str) else value

    @field_validator("url")
    @classmethod
    def _http_url(cls, value: str) -> str:
        parts = urlsplit(value)
        if parts.scheme not in ("http", "https") or not parts.hostname:
            raise ValueError(f"{value!r} is not an http:// or https:// URL with a host")
        return value


def json_path(document: Any, path: str) -> Any:
    """``a.b.0.c`` into nested objects and lists; ``_MISSING`` when absent."""
    node = document
    for part in path.split("."):
        if isinstance(node, dict) and part in node:
            node = node[part]
        elif isinstance(node, list) and part.isdigit() and int(part) < len(node):
            node = node[int(part)]
        else:
            return _MISSING
    return node


def same_json(actual: Any, expected: Any) -> bool:
    """Equal as JSON values: true is not 1, as Python would have it."""
    if isinstance(actual, bool) or isinstance(expected, bool):
        return type(actual) is type(expected) and actual == expected
    return bool(actual == expected)


def judge(response: httpx.Response, params: HttpCheckParams) -> Verdict:
    """Good when the status, then every JSON field, then the text match; else name what failed first."""
    status = response.status_code
    if status not in params.expect_status:
        expected = " or ".join(str(code) for code in params.expect_status)
        return Verdict(False, f"status {status}, expected {expected}")
    if params.expect_json:
        try:
            document = response.json()
        except ValueError:  # JSONDecodeError and UnicodeDecodeError alike
            return Verdict(False, f"status {status}, but the body is not JSON")
        for path, expected_value in params.expect_json.items():
            actual = json_path(document, path)
            if actual is _MISSING:
                return Verdict(False, f"status {status}, but JSON field {path!r} is missing")
            if not same_json(actual, expected_value):
                found = f"JSON field {path!r} is {actual!r}, expected {expected_value!r}"
                return Verdict(False, f"status {status}, but {found}")
    if params.expect_text is not None and params.expect_text not in response.text:
        return Verdict(False, f"status {status}, but the body does not contain {params.expect_text!r}")
    return Verdict(True, f"status {status}")


def _new_client(verify: bool) -> httpx.Client:
    # One client per run keeps connections alive between probes (a new client costs ~23 ms);
    # httpcore sets TCP_NODELAY itself. Redirects are not followed: a redirect is an answer to judge.
    return httpx.Client(verify=verify, follow_redirects=False)


class HttpCheck(Action[HttpCheckParams]):
    name = "http.check"
    effect = Effect.READ_ONLY
    Params = HttpCheckParams
    idempotent = True

    def run(self, params: HttpCheckParams, ctx: ActionContext) -> ActionResult:
        # Plain http needs no TLS context: loading the CA bundle costs up to half a second on a busy
        # host, and that would count towards the measured RTO.
        verify = params.verify_tls and params.url.lower().startswith("https:")
        client: httpx.Client = ctx.resources.get_or_create(
            f"httpx:verify={verify}", lambda: _new_client(verify), lambda c: c.close()
        )
        last_status: int | None = None

        def probe(timeout: float) -> Verdict:
            nonlocal last_status
            try:
                response = client.request(params.method, params.url, headers=params.headers, timeout=timeout)
            except httpx.TimeoutException:
                last_status = None
                return Verdict(False, f"no answer within {timeout * 1000:.0f}ms")
            except httpx.HTTPError as exc:
                last_status = None
                return Verdict(False, f"{type(exc).__name__}: {exc}")
            last_status = response.status_code
            return judge(response, params)

        streak = probe_until_streak(ctx, f"{params.method} {params.url}", probe, params)
        return ActionResult(output={**streak.output(), "last_status": last_status}, marked_at=streak.first_good_at)

    def hosts(self, params: HttpCheckParams) -> list[str]:
        parts = urlsplit(params.url)
        port = parts.port or (443 if parts.scheme == "https" else 80)
        host = f"[{parts.hostname}]" if ":" in (parts.hostname or "") else parts.hostname
        return [f"{host}:{port}"]
