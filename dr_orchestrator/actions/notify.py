"""``notify.webhook`` (JSON POST, e.g. a chat tool's incoming webhook), ``notify.email`` (SMTP) and
``notify.apprise`` (any service Apprise knows by URL: DingTalk, WeCom, Feishu, Slack, Teams, e-mail,
JSON webhooks, ...).

Both retry with backoff and report every delivery, or failure to deliver, with its time: auditors
ask when stakeholders were told. ``deliver_webhook`` , ``deliver_email`` and ``deliver_apprise`` are also what the
drill runner and the watch use for their own notifications. Secrets (HMAC key, SMTP password, a webhook URL holding a
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
from collections.abc import Callable, Mapping
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


class AppriseParams(RetryParams):
    urls: list[str] = Field(min_length=1, description="Apprise URLs (dingtalk://, wecombot://, feishu://, "
                            "slack://, msteams://, mailto://, json://, ...), each by reference (env:NAME, "
                            "file:/path) when it holds a token.", json_schema_extra={"secret": True})
    title: str = Field(default="", description="The title, where the service shows one.")
    text: str = Field(default="", description="The message.")
    fields: dict[str, Any] = Field(default_factory=dict, description="Structured fields: added to the message "
                                   "as `name: value` lines, and to the body of json://, form:// and xml:// "
                                   "targets as fields of their own.")

    @field_validator("urls")
    @classmethod
    def _known_schemes(cls, values: list[str]) -> list[str]:
        for index, value in enumerate(values):
            if not secretref.is_reference(value) and "://" not in value:  # not echoed: it may hold a token
                raise ValueError(f"urls[{index}] is neither an Apprise URL (scheme://...) nor a reference "
                                 "(env:NAME, file:/path)")
        return values


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


_FIELD_SCHEMES = ("json", "jsons", "form", "forms", "xml", "xmls")  # Apprise adds `:name=value` to their body


def deliver_apprise(params: AppriseParams, cancelled: threading.Event | None = None,
                    deadline: float | None = None) -> Delivery:
    """One message to every URL of ``params`` through Apprise: delivered when every one took it;
    otherwise the reason is what Apprise said about each that did not (its warnings, secrets left out)."""
    import apprise

    target = ", ".join(shown_url(url) for url in params.urls)
    lines = [f"{name}: {_field_text(value)}" for name, value in params.fields.items()]
    body = "\n".join([params.text, *lines] if params.text else lines) or params.title or "(no text)"

    def send() -> str:
        try:
            urls = [secretref.resolve(url) for url in params.urls]
        except ValueError as exc:
            raise _Permanent(str(exc)) from None
        notifier = apprise.Apprise()
        for url in urls:
            if not notifier.add(_with_fields(url, params.fields)):
                raise _Permanent(f"Apprise does not know the URL {shown_url(url)} (its scheme, or its form)")
        timeout = params.timeout if deadline is None else max(0.1, min(params.timeout, deadline - time.monotonic()))
        for service in notifier:
            service.socket_read_timeout = service.socket_connect_timeout = timeout
        with apprise.LogCapture(level=apprise.logging.WARNING) as said:
            sent = notifier.notify(title=params.title, body=body)
        if sent:
            return f"sent to {len(urls)} target(s)"
        reason = " ".join(line.split(" - ", 2)[-1].strip() for line in said.getvalue().splitlines() if line.strip())
        for url in urls:  # an URL's token must not reach the evidence through a message
            reason = reason.replace(url, shown_url(url))
        raise RuntimeError(reason or "Apprise reported a failure without a reason")

    return _with_retries("apprise", target, params, send, cancelled, deadline)


def _field_text(value: Any) -> str:
    return value if isinstance(value, str) else json.dumps(value, default=str)


def _with_fields(url: str, fields: dict[str, Any]) -> str:
    if not fields or urlsplit(url).scheme.lower() not in _FIELD_SCHEMES:
        return url
    from urllib.parse import quote, urlencode

    added = urlencode({f":{name}": _field_text(value) for name, value in fields.items()}, quote_via=quote)
    return f"{url}{'&' if '?' in url else '?'}{added}"


@dataclass(frozen=True)
class Channel:
    params: type[RetryParams]
    deliver: Callable[..., Delivery]
    placeholder: dict[str, str]  # the message a target's settings are checked with before any is sent


CHANNELS = {
    "webhook": Channel(WebhookParams, deliver_webhook, {"text": "-"}),
    "email": Channel(EmailParams, deliver_email, {"subject": "-"}),
    "apprise": Channel(AppriseParams, deliver_apprise, {"text": "-"}),
}


def send_message(channel: str, settings: Mapping[str, Any], subject: str, text: str,
                 fields: Mapping[str, Any]) -> Delivery:
    """``text`` and its structured ``fields`` through ``channel`` set up with ``settings`` (a target's
    parameters without the message): a webhook gets the fields in its JSON body (beside its own
    ``payload``), an e-mail below the text, Apprise both ways (``AppriseParams.fields``). Raises
    pydantic's ValidationError when the settings do not fit the channel."""
    message: dict[str, Any]
    if channel == "webhook":
        message = {"text": text, "payload": {**settings.get("payload", {}), **fields}}
    elif channel == "apprise":
        message = {"title": subject, "text": text,
                   "fields": {name: value for name, value in fields.items() if value is not None}}
    else:
        message = {"subject": subject,
                   "body": text + ("\n\n" + json.dumps(fields, indent=2, default=str) if fields else "")}
    chosen = CHANNELS[channel]
    return chosen.deliver(chosen.params.model_validate({**settings, **message}))


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


class NotifyApprise(Action[AppriseParams]):
    """Any service Apprise reaches by URL (chat tools banks page through, e-mail, webhooks), with the
    structured fields in the message and, for JSON/form/XML webhooks, in the body."""

    name = "notify.apprise"
    effect = Effect.READ_ONLY
    Params = AppriseParams

    def run(self, params: AppriseParams, ctx: ActionContext) -> ActionResult:
        return _finish(deliver_apprise(params, ctx.cancelled, ctx.deadline), ctx)

    def hosts(self, params: AppriseParams) -> list[str]:
        return [shown_url(url) for url in params.urls]
