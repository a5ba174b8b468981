"""Alert intake over HTTP: ``POST /api/alerts/alertmanager`` (Prometheus Alertmanager's webhook,
version 4) and ``POST /api/alerts/webhook`` (one alert as generic JSON, signed with HMAC-SHA256).

Both need a token of the ``alerts`` role, which may do nothing else (Alertmanager sends it with
``http_config.authorization``); the webhook is also signed with a shared key given by reference
(``ApiSettings.alert_webhook_secret``). Each alert is answered on its own (opened, updated,
unchanged, restored, resolved, ignored and why); the intake classifies and records, it never runs
anything (``watch.intake``). Bodies are read up to ``MAX_BODY_BYTES``; a malformed one is 422 naming
the first problem. Each accepted message is an audit event; refusals are audited by the app."""

from __future__ import annotations

import hashlib
import hmac
import os
import threading
import time
from collections import Counter
from dataclasses import asdict
from datetime import datetime
from typing import Annotated, Any, Literal, TypeVar

from fastapi import APIRouter, Depends, Header, Request
from fastapi.exceptions import RequestValidationError
from pydantic import BaseModel, BeforeValidator, ConfigDict, Field, ValidationError, WithJsonSchema

from dr_orchestrator.api.auditing import audit
from dr_orchestrator.api.auth import ApiError, Principal, alerts
from dr_orchestrator.api.responses import refusals
from dr_orchestrator.api.values import NO_NUL, Instant, Text
from dr_orchestrator.loading import load_inventory
from dr_orchestrator.model.events import utcnow
from dr_orchestrator.watch.intake import ALERTMANAGER, WEBHOOK, Alert, Intake
from dr_orchestrator.watch.observations import Target
from dr_orchestrator.yamlsource import LoadError

router = APIRouter(tags=["alerts"])
MAX_BODY_BYTES = 1024 * 1024
MAX_ALERTS = 1000
SIGNATURE_MAX_AGE_S = 300  # a signed body older (or newer) than this is refused: it may be a replay
SIGNATURE_PREFIX = "sha256="
Model = TypeVar("Model", bound=BaseModel)
# Names and values as Prometheus gives them: texts without a NUL byte (PostgreSQL stores none).
Labels = Annotated[dict[Text, Text], WithJsonSchema({"type": "object", "propertyNames": {"pattern": NO_NUL},
                                                     "additionalProperties": {"type": "string", "pattern": NO_NUL}})]


def _at_most_max_alerts(value: Any) -> Any:
    if isinstance(value, list) and len(value) > MAX_ALERTS:
        raise ValueError(f"{len(value)} alerts in one message; at most {MAX_ALERTS} are taken (set max_alerts "
                         "in Alertmanager's webhook_config)")
    return value


class AlertmanagerAlert(BaseModel):
    model_config = ConfigDict(strict=True)  # no false taken as 0, nor 7 as "7"

    status: Literal["firing", "resolved"]
    labels: Labels
    annotations: Labels = Field(default_factory=dict)
    startsAt: Instant  # noqa: N815 - Alertmanager's own field names
    endsAt: Instant | None = None  # noqa: N815
    generatorURL: Text = ""  # noqa: N815
    fingerprint: Text = ""


class AlertmanagerMessage(BaseModel):
    """Alertmanager's webhook payload, version 4 (https://prometheus.io/docs/alerting/latest/configuration/)."""

    model_config = ConfigDict(strict=True)

    version: Literal["4"]
    groupKey: Text = ""  # noqa: N815
    status: Literal["firing", "resolved"]
    receiver: Text = ""
    groupLabels: Labels = Field(default_factory=dict)  # noqa: N815
    commonLabels: Labels = Field(default_factory=dict)  # noqa: N815
    commonAnnotations: Labels = Field(default_factory=dict)  # noqa: N815
    externalURL: Text = ""  # noqa: N815
    alerts: Annotated[list[AlertmanagerAlert], BeforeValidator(_at_most_max_alerts), Field(max_length=MAX_ALERTS)]


class WebhookAlert(BaseModel):
    """One alert from any system that can sign its body."""

    model_config = ConfigDict(extra="forbid", strict=True)

    target: str = Field(pattern=r"^(service|site):[^\x00]+$", description='"service:trading" or "site:primary"')
    state: Literal["firing", "resolved"]
    summary: Text = Field("", max_length=2000)
    labels: Labels = Field(default_factory=dict, description="kept on the incident; data_integrity=true or "
                                                            "scenario=cyber_attack put data integrity in doubt")
    started_at: Instant | None = Field(None, description="when the trouble began (default: when received)")
    id: Text = Field("", max_length=200, description="the alert's own id, the same in each of its reports "
                                                     "(default: its target and labels)")


class AlertOutcome(BaseModel):
    outcome: Literal["opened", "updated", "unchanged", "restored", "resolved", "ignored"]
    detail: str = Field(description="what was done, or why nothing was")
    target: str | None = Field(description='"service trading" or "site primary"; null when none matched')
    incident_id: str | None
    level: str | None = Field(description="the severity level the inventory's dr.watch gives it")
    policy: str | None = Field(description="what the watch's policy would do (the intake itself never acts)")


class AlertsTaken(BaseModel):
    received: int
    alerts: list[AlertOutcome] = Field(description="one per alert, in the order sent")


class SeenSignatures:
    """Signatures accepted within their window: the same signed request twice is a replay."""

    def __init__(self) -> None:
        self._until: dict[str, float] = {}
        self._lock = threading.Lock()

    def first_time(self, signature: str, until: float, now: float) -> bool:
        with self._lock:
            self._until = {seen: end for seen, end in self._until.items() if end >= now}
            if signature in self._until:
                return False
            self._until[signature] = until
            return True


async def raw_body(request: Request) -> bytes:
    """The body as sent, refused (413) past ``MAX_BODY_BYTES`` without reading the rest."""
    declared = request.headers.get("content-length", "")
    too_large = ApiError(413, f"the body is larger than {MAX_BODY_BYTES} bytes; send fewer alerts per message "
                              "(Alertmanager: max_alerts in its webhook_config)")
    if declared.isdigit() and int(declared) > MAX_BODY_BYTES:
        raise too_large
    chunks, size = [], 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > MAX_BODY_BYTES:
            raise too_large
        chunks.append(chunk)
    return b"".join(chunks)


def _parsed(model: type[Model], raw: bytes) -> Model:
    try:
        return model.model_validate_json(raw)
    except ValidationError as exc:
        raise RequestValidationError([{**error, "loc": ("body", *map(_printable, error["loc"]))}
                                      for error in exc.errors()]) from None


def _printable(part: str | int) -> str | int:
    """A part of where a problem is, as the answer and the audit can hold it (a label name may hold a NUL)."""
    return part.replace("\x00", "\\x00") if isinstance(part, str) else part


def _documented(model: type[BaseModel]) -> dict[str, Any]:
    """The request body in the spec, its models inlined: the route reads the body itself (its size is
    bounded, and the webhook's bytes are signed), so FastAPI does not list the models."""
    schema = model.model_json_schema()
    definitions = schema.pop("$defs", {})

    def inline(value: Any) -> Any:
        if isinstance(value, dict):
            ref = value.get("$ref", "")
            if ref.startswith("#/$defs/"):
                return inline(definitions[ref.removeprefix("#/$defs/")])
            return {key: inline(item) for key, item in value.items()}
        return [inline(item) for item in value] if isinstance(value, list) else value

    return {"requestBody": {"required": True, "content": {"application/json": {"schema": inline(schema)}}}}


def _intake(request: Request) -> Intake:
    """The intake of the server's inventory, loaded again when the file changes."""
    path = request.app.state.settings.inventory
    if not path:
        raise ApiError(503, "alert intake needs the inventory whose services and sites alerts name: start the "
                            "server with `dr serve -i INVENTORY`")
    try:
        changed = os.stat(path).st_mtime_ns
    except OSError as exc:
        raise ApiError(503, f"alert intake cannot read the inventory {path}: {exc.strerror}") from None
    cached: tuple[int, Intake] | None = getattr(request.app.state, "alert_intake", None)
    if cached is None or cached[0] != changed:
        try:
            inventory, _document = load_inventory(path)
        except LoadError as exc:
            raise ApiError(503, f"alert intake cannot use the inventory {path}: {exc.problems[0]}") from None
        cached = (changed, Intake(inventory, path))
        request.app.state.alert_intake = cached
    return cached[1]


def _take(request: Request, principal: Principal, alerts_sent: list[Alert], source: str,
          extra: dict[str, Any]) -> AlertsTaken:
    """Each alert in its own transaction, then one audit event for the message."""
    intake = _intake(request)
    answers = []
    for alert in alerts_sent:
        with request.app.state.sessions() as session:
            answers.append(asdict(intake.take(session, alert, source=source, actor=principal.name, now=utcnow())))
            session.commit()
    incident_ids = sorted({answer["incident_id"] for answer in answers if answer["incident_id"]})
    audit(request.app.state.sessions, principal.name, "alerts.receive", f"POST {request.url.path}",
          {**extra, "source": source, "received": len(answers),
           "outcomes": dict(Counter(answer["outcome"] for answer in answers)), "incidents": incident_ids})
    return AlertsTaken(received=len(answers), alerts=[AlertOutcome(**answer) for answer in answers])


@router.post("/api/alerts/alertmanager", summary="Alertmanager's webhook: open or update incidents (alerts token)",
             response_model=AlertsTaken, responses=refusals(401, 403, 413, 422, 503),
             openapi_extra=_documented(AlertmanagerMessage))
def alertmanager(request: Request, principal: Principal = Depends(alerts),
                 raw: bytes = Depends(raw_body)) -> AlertsTaken:
    """Each firing alert whose labels name a service of the server's inventory (`service`) or a whole
    site (`scope=site` and `site`) opens or updates that target's incident, impact start = `startsAt`,
    classified by the inventory's `dr.watch` (labels `data_integrity=true` or `scenario=cyber_attack`
    put data integrity in doubt); a resolved one restores it once no other alert of it fires. Nothing
    runs: the watch or an engineer acts. Alerts naming nothing known are answered `ignored`."""
    message = _parsed(AlertmanagerMessage, raw)
    sent = [Alert(
        state=alert.status, key=alert.fingerprint or _key(alert.labels), labels=alert.labels,
        title=_title(alert.labels.get("alertname", "alert"), alert.annotations.get("summary", "")),
        started_at=alert.startsAt, ended_at=_ended(alert.endsAt),
        detail={"alertname": alert.labels.get("alertname"), "annotations": alert.annotations,
                "generator_url": alert.generatorURL, "receiver": message.receiver},
    ) for alert in message.alerts]
    return _take(request, principal, sent, ALERTMANAGER,
                 {"receiver": message.receiver, "group_key": message.groupKey, "status": message.status})


@router.post("/api/alerts/webhook", summary="A generic signed alert: open or update an incident (alerts token)",
             response_model=AlertsTaken, responses=refusals(401, 403, 409, 413, 422, 503),
             openapi_extra=_documented(WebhookAlert))
def webhook(request: Request, principal: Principal = Depends(alerts), raw: bytes = Depends(raw_body),
            signature: str | None = Header(None, alias="X-DR-Signature", description="sha256=HEX: HMAC-SHA256 "
                                           "with the shared key of the bytes TIMESTAMP.BODY"),
            timestamp: str | None = Header(None, alias="X-DR-Timestamp",
                                           description="when it was signed, Unix time in seconds")) -> AlertsTaken:
    """Same as one Alertmanager alert, for any sender: the body is signed (`X-DR-Signature`) with the
    key `dr serve --alert-webhook-secret` names, over `X-DR-Timestamp` + "." + the body; a missing or
    wrong signature is 401, a signature more than 5 minutes from the server's clock is 401, the same
    signed request twice is 409."""
    _check_signature(request, raw, signature, timestamp)
    body = _parsed(WebhookAlert, raw)
    kind, _, name = body.target.partition(":")
    sent = Alert(state=body.state, key=body.id or _key({"target": body.target, **body.labels}),
                 title=_title(body.target, body.summary), labels=body.labels, started_at=body.started_at,
                 target=Target("service" if kind == "service" else "site", name),
                 detail={"summary": body.summary})
    return _take(request, principal, [sent], WEBHOOK, {"target": body.target, "state": body.state})


def _check_signature(request: Request, raw: bytes, signature: str | None, timestamp: str | None) -> None:
    from dr_orchestrator import secrets

    reference = request.app.state.settings.alert_webhook_secret
    if not reference:
        raise ApiError(503, "the signed alert webhook is not set up here: start the server with "
                            "`dr serve --alert-webhook-secret env:NAME` (or file:PATH)")
    try:
        key = secrets.resolve(reference)
    except secrets.SecretError as exc:
        raise ApiError(503, f"the signed alert webhook cannot check signatures here: {exc}") from None
    if not signature or not timestamp:
        raise ApiError(401, "the request is not signed: send X-DR-Timestamp and X-DR-Signature")
    if not (timestamp.isascii() and timestamp.isdigit() and len(timestamp) <= 12):
        raise ApiError(401, "X-DR-Timestamp must be the Unix time in seconds when the request was signed")
    expected = SIGNATURE_PREFIX + hmac.new(key.encode(), timestamp.encode() + b"." + raw, hashlib.sha256).hexdigest()
    if not hmac.compare_digest(expected.encode(), signature.strip().lower().encode()):
        raise ApiError(401, "the request's signature does not match its body and timestamp")
    now = time.time()
    if abs(now - int(timestamp)) > SIGNATURE_MAX_AGE_S:
        raise ApiError(401, f"the request was signed more than {SIGNATURE_MAX_AGE_S} s from the server's clock "
                            "(X-DR-Timestamp): sign it again now")
    seen: SeenSignatures | None = getattr(request.app.state, "alert_signatures", None)
    if seen is None:
        seen = request.app.state.alert_signatures = SeenSignatures()
    if not seen.first_time(expected, int(timestamp) + SIGNATURE_MAX_AGE_S, now):
        raise ApiError(409, "this signed request was already received: each one is taken once")


def _key(labels: dict[str, str]) -> str:
    """An alert's identity when its sender gives none: its labels, as Alertmanager's fingerprint is."""
    text = "\x00".join(f"{name}={value}" for name, value in sorted(labels.items()))
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def _title(name: str, summary: str) -> str:
    return f"{name}: {summary}" if summary.strip() else name


def _ended(moment: datetime | None) -> datetime | None:
    """None for Go's zero time, Alertmanager's endsAt when it is not known."""
    return None if moment is None or moment.year == 1 else moment
