"""``notify.webhook`` (JSON POST, e.g. a chat tool's incoming webhook) and ``notify.email`` (SMTP).

Both retry with backoff and report every delivery, or failure to deliver, with its time: auditors
ask when stakeholders were told. ``deliver_webhook`` and ``deliver_email`` are also what the drill
runner uses for its own notifications. Secrets (HMAC key, SMTP password, a webhook URL holding a
token) are given by reference (``env:NAME``, ``file:/path``) and never recorded.
"""

from __future__ import annotations

import hashlib
import hmac
import json
import smtplib
import ssl
import threading
import time
from dataclasses import asdict, dataclass, field
from datetime import datetime
from email.message import EmailMessage
from email.utils import formatdate, make_msgid
from typing import Any
from urllib.parse import urlsplit

from pydantic import Field, field_validator

from dr_orchestrator.actions import secretref
from dr_orchestrator.actions.base import Action, ActionContext, ActionError, ActionResult, Params
from dr_orchestrator.model.durations import Duration
from dr_orchestrator.model.events import utcnow
from dr_orchestrator.model.runbook import Effect

SIGNATURE_HEADER = "X-DR-Signature"
TIMESTAMP_HEADER = "X-DR-Timestamp"


class RetryParams(Params):
    attempts: int = Field(default=4, ge=1, le=20, description="Tries in all, the first included.")
    backoff: Duration = Field(default=0.5, ge=0, le=60, description="Time before the second try; doubles after.")
    timeout: Duration = Field(default=10.0, gt=0, le=120, description="Time per try (seconds or e.g. 10s).")


class WebhookParams(RetryParams):
    url: str = Field(description="Where to POST; may be a reference (env:NAME) when the URL holds a token.",
                     json_schema_extra={"secret": True})
    text: str = Field(default="", description="The message, sent as {\"text\": ...} (chat incoming webhooks).")
    payload: dict[str, Any] = Field(default_factory=dict, description="More JSON fields, merged into the body.")
    secret: str | None = Field(default=None, description="HMAC-SHA256 key by reference, signs timestamp.body.",
                               json_schema_extra={"secret": True})
    headers: dict[str, str] = Field(default_factory=dict)

    @field_validator("secret")
    @classmethod
    def _secret_by_reference(cls, value: str | None) -> str | None:
        return secretref.must_be_reference(value)

    @field_validator("url")
    @classmethod
    def _http_url(cls, value: str) -> str:
        if not secretref.is_reference(value) and urlsplit(value).scheme not in ("http", "https"):
            raise ValueError(f"{value!r} is not an http(s) URL nor a reference (env:NAME, file:/path)")
        return value


class EmailParams(RetryParams):
    to: list[str] = Field(min_length=1, description="Recipients.")
    sender: str = Field(alias="from", description="The From address.")
    subject: str
    body: str = ""
    host: str = "localhost"
    port: int = Field(default=25, ge=1, le=65535)
    starttls: bool = Field(default=False, description="Upgrade the connection with STARTTLS before logging in.")
    ssl: bool = Field(default=False, description="Implicit TLS (SMTPS, usually port 465).")
    username: str | None = None
    password: str | None = Field(default=None, description="By reference only: env:NAME or file:/path.",
                                 json_schema_extra={"secret": True})

    model_config = Params.model_config | {"populate_by_name": True}

    @field_validator("password")
    @classmethod
    def _password_by_reference(cls, value: str | None) -> str | None:
        return secretref.must_be_reference(value)


@dataclass
class Delivery:
    """One notification: delivered or not, when, after how many tries, to where (secrets left out)."""

    channel: str
    target: str
    delivered: bool
    attempts: int
    at: datetime
    detail: str
    tries: list[dict[str, Any]] = field(default_factory=list)

    def as_dict(self) -> dict[str, Any]:
        data = asdict(self)
        data["at"] = self.at.isoformat()
        return data


class _Permanent(Exception):
    """A failure that another try will not fix (a 4xx answer, a missing secret)."""


def _with_retries(channel: str, target: str, params: RetryParams, send: Any,
                  cancelled: threading.Event | None, deadline: float | None) -> Delivery:
    tries: list[dict[str, Any]] = []
    detail = "not tried"
    for attempt in range(1, params.attempts + 1):
        if attempt > 1:
            pause = min(params.backoff * 2 ** (attempt - 2), 30.0)
            if deadline is not None and time.monotonic() + pause >= deadline:
                detail += " (no time left for another try)"
                break
            if cancelled is not None and cancelled.wait(pause):
                detail += " (cancelled)"
                break
            if cancelled is None:
                time.sleep(pause)
        at = utcnow()
        try:
            detail = send()
        except _Permanent as exc:
            detail = str(exc)
            tries.append({"at": at.isoformat(), "ok": False, "detail": detail})
            break
        except Exception as exc:  # noqa: BLE001 - every transport error is worth another try
            detail = f"{type(exc).__name__}: {exc}"
            tries.append({"at": at.isoformat(), "ok": False, "detail": detail})
            continue
        tries.append({"at": at.isoformat(), "ok": True, "detail": detail})
        return Delivery(channel, target, True, attempt, utcnow(), detail, tries)
    return Delivery(channel, target, False, len(tries), utcnow(), detail, tries)


def shown_url(url: str) -> str:
    """Scheme and host only: incoming-webhook paths are often the token itself."""
    if secretref.is_reference(url):
        return url
    parts = urlsplit(url)
    return f"{parts.scheme}://{parts.netloc}/…" if parts.path not in ("", "/") else f"{parts.scheme}://{parts.netloc}/"


def signature(secret: str, timestamp: str, body: bytes) -> str:
    """``sha256=<hex>`` of HMAC-SHA256(secret, timestamp + "." + body): what a receiver recomputes."""
    digest = hmac.new(secret.encode(), timestamp.encode() + b"." + body, hashlib.sha256).hexdigest()
    return f"sha256={digest}"


def deliver_webhook(params: WebhookParams, cancelled: threading.Event | None = None,
                    deadline: float | None = None) -> Delivery:
    import httpx

    target = shown_url(params.url)

    def send() -> str:
        try:
            url = secretref.resolve(params.url)
            secret = secretref.resolve(params.secret) if params.secret else None
        except ValueError as exc:
            raise _Permanent(str(exc)) from None
        body = json.dumps({"text": params.text, **params.payload} if params.text else params.payload,
                          default=str).encode()
        headers = {"Content-Type": "application/json", **params.headers}
        if secret is not None:
            stamp = str(int(time.time()))
            headers[TIMESTAMP_HEADER] = stamp
            headers[SIGNATURE_HEADER] = signature(secret, stamp, body)
        timeout = params.timeout if deadline is None else max(0.1, min(params.timeout, deadline - time.monotonic()))
        response = httpx.post(url, content=body, headers=headers, timeout=timeout)
        answer = f"HTTP {response.status_code}"
        if 200 <= response.status_code < 300:
            return answer
        if response.status_code in (408, 425, 429) or response.status_code >= 500:
            raise RuntimeError(answer)
        raise _Permanent(f"{answer}: {response.text[:200]}")

    return _with_retries("webhook", target, params, send, cancelled, deadline)


def deliver_email(params: EmailParams, cancelled: threading.Event | None = None,
                  deadline: float | None = None) -> Delivery:
    target = f"{', '.join(params.to)} via {params.host}:{params.port}"

    def send() -> str:
        try:
            password = secretref.resolve(params.password) if params.password else None
        except ValueError as exc:
            raise _Permanent(str(exc)) from None
        message = EmailMessage()
        message["From"] = params.sender
        message["To"] = ", ".join(params.to)
        message["Subject"] = params.subject
        message["Date"] = formatdate(localtime=False)
        message["Message-ID"] = make_msgid(domain="dr-orchestrator")
        message.set_content(params.body or params.subject)
        timeout = params.timeout if deadline is None else max(0.1, min(params.timeout, deadline - time.monotonic()))
        smtp_class = smtplib.SMTP_SSL if params.ssl else smtplib.SMTP
        with smtp_class(params.host, params.port, timeout=timeout) as smtp:
            if params.starttls:
                smtp.starttls(context=ssl.create_default_context())
            if params.username:
                try:
                    smtp.login(params.username, password or "")
                except smtplib.SMTPAuthenticationError as exc:
                    raise _Permanent(f"SMTP login refused: {exc.smtp_code}") from None
            try:
                refused = smtp.send_message(message)
            except smtplib.SMTPRecipientsRefused as exc:
                raise _Permanent(f"every recipient was refused: {', '.join(exc.recipients)}") from None
        if refused:
            return f"sent; refused for {', '.join(refused)}"
        return f"sent as {message['Message-ID']}"

    return _with_retries("email", target, params, send, cancelled, deadline)


def _finish(delivery: Delivery, ctx: ActionContext) -> ActionResult:
    ctx.report("notification", **delivery.as_dict())
    if not delivery.delivered:
        raise ActionError(f"{delivery.channel} notification to {delivery.target} not delivered after "
                          f"{delivery.attempts} tries: {delivery.detail}")
    return ActionResult(output=delivery.as_dict())


class NotifyWebhook(Action[WebhookParams]):
    """As a runbook step, e.g. a customer notice when trading moves; give it `on_failure: continue`
    when the failover must not wait on the notice."""

    name = "notify.webhook"
    effect = Effect.READ_ONLY
    Params = WebhookParams

    def run(self, params: WebhookParams, ctx: ActionContext) -> ActionResult:
        return _finish(deliver_webhook(params, ctx.cancelled, ctx.deadline), ctx)

    def hosts(self, params: WebhookParams) -> list[str]:
        return [shown_url(params.url)]


class NotifyEmail(Action[EmailParams]):
    name = "notify.email"
    effect = Effect.READ_ONLY
    Params = EmailParams

    def run(self, params: EmailParams, ctx: ActionContext) -> ActionResult:
        return _finish(deliver_email(params, ctx.cancelled, ctx.deadline), ctx)

    def hosts(self, params: EmailParams) -> list[str]:
        return [f"{params.host}:{params.port}"]
