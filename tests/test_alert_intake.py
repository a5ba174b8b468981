"""Alert intake through FastAPI's TestClient: Alertmanager's webhook and the generic signed webhook open,
update and restore incidents of the inventory's services and sites, classified by its dr.watch and
shown on /status without a token; nothing runs; hostile bodies get one 4xx sentence; the alerts role
may post alerts and nothing else, and only it may."""

from __future__ import annotations

import hashlib
import hmac
import json
import os
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
import schemathesis
from api_support import INVENTORIES, RUNBOOKS, prepared, token
from fastapi.testclient import TestClient
from hypothesis import HealthCheck, settings
from schemathesis.checks import CHECKS
from sqlalchemy import func, select

from dr_orchestrator.api.alerts import MAX_ALERTS, MAX_BODY_BYTES
from dr_orchestrator.api.app import ApiSettings, create_app
from dr_orchestrator.evidence import incidents
from dr_orchestrator.evidence.chain import verify_session
from dr_orchestrator.evidence.database import session_factory_for
from dr_orchestrator.evidence.models import AuditEvent, Incident, IncidentEvent, Run
from dr_orchestrator.model.events import utcnow
from dr_orchestrator.watch.intake import DOES_NOT_ACT, IGNORED

SECRET = "a shared key only the sender and the server know"
# Trading (critical) fails over with a runbook after approval; quotation (standard) only notifies.
INVENTORY = f"""\
all:
  vars:
    dr:
      name: alerts-test
      sites:
        primary: {{description: where the services run}}
        backup: {{description: where they run after a failover}}
      services:
        trading: {{rto: 10s, rpo: 0s, tier: critical, sites: [primary, backup]}}
        quotation: {{rto: 30s, rpo: 60s, tier: standard, sites: [primary, backup]}}
      watch:
        levels:
          particularly-serious: {{scope: site}}
          serious: {{tiers: [critical], data_integrity: true}}
          general: {{}}
        policies:
          default: {{particularly-serious: auto, serious: approve, general: notify}}
        runbooks:
          services: {{trading: {{path: {RUNBOOKS / 'restore-trading.yml'}}}}}
  children:
    primary: {{hosts: {{primary-local: {{ansible_host: 127.0.0.1}}}}}}
    backup: {{hosts: {{backup-local: {{ansible_host: 127.0.0.1}}}}}}
"""


@dataclass
class Intake:
    url: str
    client: TestClient
    alerts_token: str

    def alertmanager(self, payload: Any, who: str | None = "", **kwargs: Any) -> Any:
        who = self.alerts_token if who == "" else who
        headers = {"Authorization": f"Bearer {who}"} if who else {}
        if isinstance(payload, bytes):
            return self.client.post("/api/alerts/alertmanager", content=payload,
                                    headers={**headers, "Content-Type": "application/json"}, **kwargs)
        return self.client.post("/api/alerts/alertmanager", json=payload, headers=headers, **kwargs)

    def webhook(self, body: bytes, headers: dict[str, str]) -> Any:
        return self.client.post("/api/alerts/webhook", content=body, headers={
            "Authorization": f"Bearer {self.alerts_token}", "Content-Type": "application/json", **headers})

    def incidents(self) -> list[Incident]:
        with session_factory_for(self.url)() as session:
            return list(session.scalars(select(Incident).order_by(Incident.created_at)))

    def events(self, incident_id: str) -> list[IncidentEvent]:
        with session_factory_for(self.url)() as session:
            return list(session.scalars(select(IncidentEvent).where(IncidentEvent.incident_id == incident_id)
                                        .order_by(IncidentEvent.at, IncidentEvent.id)))

    def count(self, model: Any) -> int:
        with session_factory_for(self.url)() as session:
            return int(session.scalar(select(func.count()).select_from(model)) or 0)

    def audit(self, action: str) -> list[AuditEvent]:
        with session_factory_for(self.url)() as session:
            return list(session.scalars(select(AuditEvent).where(AuditEvent.action == action).order_by(AuditEvent.id)))

    def states(self) -> dict[str, tuple[str, str | None]]:
        answer = self.client.get("/status.json")  # no token
        assert answer.status_code == 200, answer.text
        return {entry["service"]: (entry["state"], entry["since"]) for entry in answer.json()["services"]}

    def chain_ok(self) -> bool:
        with session_factory_for(self.url)() as session:
            return verify_session(session).ok


def serve(url: str, tmp_path: Path, **settings: Any) -> TestClient:
    (tmp_path / "drills").mkdir(exist_ok=True)
    return TestClient(create_app(ApiSettings(
        database_url=url, runbooks_dir=str(RUNBOOKS), inventories_dir=str(INVENTORIES),
        drills_dir=str(tmp_path / "drills"), status_services=("trading", "quotation"), **settings)))


def inventory_file(tmp_path: Path) -> Path:
    path = tmp_path / "alerts-test.yml"
    path.write_text(INVENTORY)
    return path


def start(url: str, tmp_path: Path) -> Iterator[Intake]:
    with serve(url, tmp_path, inventory=str(inventory_file(tmp_path)),
               alert_webhook_secret="env:DR_TEST_ALERT_SECRET") as client:
        yield Intake(url, client, token(url, "alertmanager", "alerts"))


@pytest.fixture
def intake(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[Intake]:
    monkeypatch.setenv("DR_TEST_ALERT_SECRET", SECRET)
    yield from start(prepared(f"sqlite:///{tmp_path / 'evidence.db'}"), tmp_path)


def iso(moment: datetime) -> str:
    """As Alertmanager writes a moment: RFC 3339 with nanoseconds."""
    return moment.strftime("%Y-%m-%dT%H:%M:%S.%f") + "123Z"


def alert(name: str, labels: dict[str, str], *, status: str = "firing", starts: datetime | None = None,
          ends: datetime | None = None, fingerprint: str | None = None) -> dict[str, Any]:
    starts = starts or utcnow() - timedelta(seconds=40)
    return {"status": status, "labels": {"alertname": name, **labels},
            "annotations": {"summary": f"{name} on {labels.get('service', labels.get('site', '?'))}",
                            "runbook_url": "https://wiki.example.com/dr"},
            "startsAt": iso(starts), "endsAt": iso(ends) if ends else "0001-01-01T00:00:00Z",
            "generatorURL": f"http://prometheus:9090/graph?g0.expr=up%7Bjob%3D%22{name}%22%7D",
            "fingerprint": fingerprint or hashlib.sha256(name.encode()).hexdigest()[:16]}


def message(*alerts: dict[str, Any]) -> dict[str, Any]:
    """Alertmanager's webhook payload (version 4), as its webhook_config sends it."""
    status = "firing" if any(a["status"] == "firing" for a in alerts) else "resolved"
    return {"receiver": "dr-orchestrator", "status": status, "alerts": list(alerts),
            "groupLabels": {"service": "trading"},
            "commonLabels": {"severity": "critical"}, "commonAnnotations": {},
            "externalURL": "http://alertmanager:9093", "version": "4",
            "groupKey": '{}/{severity="critical"}:{service="trading"}', "truncatedAlerts": 0}


def outcomes(answer: Any) -> list[tuple[str, str | None]]:
    assert answer.status_code == 200, answer.text
    return [(entry["outcome"], entry["target"]) for entry in answer.json()["alerts"]]


# ---------------------------------------------------------------- Alertmanager


def test_an_alertmanager_alert_opens_a_classified_incident_that_status_shows_and_runs_nothing(
        database_url: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("DR_TEST_ALERT_SECRET", SECRET)
    for intake in start(prepared(database_url), tmp_path):
        began = utcnow().replace(microsecond=0) - timedelta(seconds=42)
        down = alert("TradingDown", {"service": "trading", "site": "primary", "severity": "critical"}, starts=began)
        disk = alert("NodeDiskFull", {"instance": "db1:9100", "job": "node"})
        assert intake.states()["trading"][0] == "operational"

        first = intake.alertmanager(message(down, disk))
        assert outcomes(first) == [("opened", "service trading"), ("ignored", None)]
        opened, ignored = first.json()["alerts"]
        assert (opened["level"], opened["policy"]) == ("serious", "approve")
        assert DOES_NOT_ACT in opened["detail"]
        assert ignored["detail"].startswith(IGNORED)

        (incident,) = intake.incidents()
        assert incident.id == opened["incident_id"]
        assert (incident.target_kind, incident.target_name, incident.services) == ("service", "trading", ["trading"])
        # Classified, not decided: the watch's policy or its approvers decide (the RTO's decision part is theirs).
        assert (incident.source, incident.level, incident.state) == ("alert:alertmanager", "serious", "detected")
        assert incident.impact_start is not None and incident.impact_start.replace(tzinfo=None) == \
            began.replace(tzinfo=None, microsecond=0)
        assert incident.labels["alertname"] == "TradingDown" and incident.labels["severity"] == "critical"
        detected, classified = intake.events(incident.id)
        assert (detected.kind, detected.actor, detected.data["alert"]) == \
            ("detected", "alertmanager", down["fingerprint"])
        assert detected.data["generator_url"] == down["generatorURL"]
        assert (classified.kind, classified.data["classified"]) == ("updated", True)
        assert classified.data["policy"] == "approve"
        assert classified.data["note"] == DOES_NOT_ACT and classified.data["runbook"].endswith("restore-trading.yml")
        assert intake.count(Run) == 0  # an alert classifies; it never runs the runbook by itself

        state, since = intake.states()["trading"]
        assert state == "degraded" and since is not None and datetime.fromisoformat(since) == began
        assert intake.states()["quotation"] == ("operational", None)

        again = intake.alertmanager(message(down, disk))  # Alertmanager repeats a group every repeat_interval
        assert outcomes(again) == [("unchanged", "service trading"), ("ignored", None)]
        assert again.json()["alerts"][0]["incident_id"] == incident.id
        assert len(intake.incidents()) == 1 and len(intake.events(incident.id)) == 2

        ended = utcnow() - timedelta(seconds=1)
        resolved = intake.alertmanager(message(alert("TradingDown", down["labels"], status="resolved", starts=began,
                                                     ends=ended)))
        assert outcomes(resolved) == [("restored", "service trading")]
        (incident,) = intake.incidents()
        assert incident.state == "restored"
        (restored,) = [event for event in intake.events(incident.id) if event.kind == "restored"]
        assert restored.at.replace(tzinfo=None) == ended.replace(tzinfo=None)  # Alertmanager's endsAt
        assert intake.states()["trading"][0] == "restored-recently"

        received = intake.audit("alerts.receive")
        assert [(event.actor, event.target, event.data["outcomes"]) for event in received] == [
            ("alertmanager", "POST /api/alerts/alertmanager", {"opened": 1, "ignored": 1}),
            ("alertmanager", "POST /api/alerts/alertmanager", {"unchanged": 1, "ignored": 1}),
            ("alertmanager", "POST /api/alerts/alertmanager", {"restored": 1})]
        assert intake.chain_ok()


def test_an_incident_of_two_alerts_is_restored_when_the_last_of_them_resolves(intake: Intake) -> None:
    labels = {"service": "quotation"}
    slow, errors = alert("QuotationSlow", labels), alert("QuotationErrors", labels)
    assert outcomes(intake.alertmanager(message(slow))) == [("opened", "service quotation")]
    answer = intake.alertmanager(message(slow, errors))
    assert outcomes(answer) == [("unchanged", "service quotation"), ("updated", "service quotation")]
    assert answer.json()["alerts"][0]["level"] == "general" and answer.json()["alerts"][0]["policy"] == "notify"

    slow["status"] = "resolved"
    answer = intake.alertmanager(message(slow, errors))
    assert outcomes(answer) == [("updated", "service quotation"), ("unchanged", "service quotation")]
    assert "1 other alert(s) of it still fire" in answer.json()["alerts"][0]["detail"]
    assert intake.states()["quotation"][0] == "degraded"

    errors["status"] = "resolved"
    assert outcomes(intake.alertmanager(message(slow, errors))) == [("unchanged", "service quotation"),
                                                                    ("restored", "service quotation")]
    assert [incident.state for incident in intake.incidents()] == ["restored"]
    # Resolved again (Alertmanager resends a group's resolved alerts): there is nothing left to restore.
    assert outcomes(intake.alertmanager(message(errors))) == [("resolved", "service quotation")]
    # Firing again later is a new incident: the first one was restored.
    errors["status"] = "firing"
    assert outcomes(intake.alertmanager(message(errors))) == [("opened", "service quotation")]
    assert [incident.state for incident in intake.incidents()] == ["restored", "detected"]


def test_the_watch_decides_an_alerts_incident_and_a_resolved_alert_leaves_its_run_to_restore_it(
        intake: Intake) -> None:
    down = alert("TradingDown", {"service": "trading"})
    (opened,) = intake.alertmanager(message(down)).json()["alerts"]
    incident_id = opened["incident_id"]
    now = utcnow()
    with session_factory_for(intake.url)() as session, session.begin():  # what the watch records when it agrees
        assert incidents.open_or_update_incident(
            session, target_kind="service", target_name="trading", impact_start=now - timedelta(seconds=5),
            detected_at=now, source="watch", level="serious", title="service trading down", actor="dr watch") \
            == incident_id
        incidents.record_incident_event(session, incident_id, "decided", now, "dr watch", {"policy": "auto"})
    assert intake.states()["trading"][0] == "outage"  # the watch confirmed it

    quotation = alert("QuotationDown", {"service": "trading", "data_integrity": "true"})
    answer = intake.alertmanager(message(down, quotation))
    assert outcomes(answer) == [("unchanged", "service trading"), ("updated", "service trading")]
    assert not [event for event in intake.events(incident_id) if event.at > now and event.data.get("classified")]

    with session_factory_for(intake.url)() as session, session.begin():
        incidents.record_incident_event(session, incident_id, "executing", utcnow(), "dr watch", {"run_id": "r1"})
    down["status"] = quotation["status"] = "resolved"
    answer = intake.alertmanager(message(down, quotation)).json()["alerts"]
    assert [entry["outcome"] for entry in answer] == ["updated", "updated"]
    assert answer[1]["detail"].endswith("a run executes on it: its verification records the restoration")
    (incident,) = intake.incidents()
    assert incident.state == "executing"


def test_a_site_alert_needs_scope_site_and_data_integrity_labels_raise_the_level(intake: Intake) -> None:
    answer = intake.alertmanager(message(
        alert("PrimaryUnreachable", {"site": "primary", "scope": "site"}),
        alert("PrimaryLatency", {"site": "primary"}),
        alert("QuotationTampered", {"service": "quotation", "scenario": "cyber_attack"}),
        alert("PaymentsDown", {"service": "payments"}),
        alert("BackupGone", {"site": "nowhere", "scope": "site"}),
    ))
    assert outcomes(answer) == [("opened", "site primary"), ("ignored", None), ("opened", "service quotation"),
                                ("ignored", None), ("ignored", None)]
    site, latency, tampered, payments, nowhere = answer.json()["alerts"]
    assert (site["level"], site["policy"]) == ("particularly-serious", "notify")  # no site runbook mapped
    assert "a site label names a whole site only with scope=site" in latency["detail"]
    assert tampered["level"] == "serious"
    assert payments["detail"] == f"{IGNORED} (service='payments' is not one of trading, quotation)"
    assert nowhere["detail"] == f"{IGNORED} (scope=site, but site='nowhere' is not one of primary, backup)"
    by_target = {incident.target_name: incident for incident in intake.incidents()}
    assert by_target["primary"].services == ["trading", "quotation"]
    assert intake.states() == {"trading": ("degraded", site_since(by_target["primary"])),
                               "quotation": ("degraded", site_since(by_target["primary"]))}


def site_since(incident: Incident) -> str:
    assert incident.impact_start is not None
    return incident.impact_start.replace(tzinfo=None).isoformat() + "+00:00"


def test_an_alert_starting_in_the_future_counts_from_its_receipt(intake: Intake) -> None:
    before = utcnow()
    answer = intake.alertmanager(message(alert("TradingDown", {"service": "trading"},
                                               starts=utcnow() + timedelta(minutes=5))))
    assert outcomes(answer) == [("opened", "service trading")]
    (incident,) = intake.incidents()
    assert incident.impact_start is not None and incident.impact_start.replace(tzinfo=None) >= \
        before.replace(tzinfo=None)
    assert incident.impact_start_method == \
        "the alert's receipt (alert:alertmanager gave no start, or one in the future)"


@pytest.mark.parametrize(("body", "where"), [
    (b"{not json", "body: Invalid JSON"),
    (b"", "body: Invalid JSON"),
    (b"[]", "body: Input should be an object"),
    (json.dumps({**message(alert("X", {"service": "trading"})), "version": "3"}).encode(), "body.version: "),
    (json.dumps(message({**alert("X", {"service": "trading"}), "status": "burning"})).encode(),
     "body.alerts.0.status: "),
    (json.dumps(message({**alert("X", {"service": "trading"}), "labels": {"service": 7}})).encode(),
     "body.alerts.0.labels.service: "),
    (json.dumps(message({**alert("X", {"service": "trading"}), "startsAt": "2026-12-07T04:00:00"})).encode(),
     "body.alerts.0.startsAt: "),
    (json.dumps(message(alert("X", {"service": "trad\x00ing"}))).encode(), "body.alerts.0.labels.service: "),
    (json.dumps({**message(alert("X", {"service": "trading"})), "alerts": "many"}).encode(), "body.alerts: "),
])
def test_a_malformed_message_is_refused_with_one_sentence_naming_where(intake: Intake, body: bytes,
                                                                        where: str) -> None:
    answer = intake.alertmanager(body)
    assert answer.status_code == 422, answer.text
    assert answer.json()["error"].startswith(where) and answer.json()["status"] == 422
    assert intake.incidents() == []
    (refused,) = intake.audit("api.refused")
    assert (refused.actor, refused.data["status"]) == ("alertmanager", 422)


def test_too_many_alerts_or_too_large_a_body_is_refused_before_anything_is_recorded(intake: Intake) -> None:
    small = {"status": "firing", "labels": {"service": "trading"}, "startsAt": "2026-12-07T04:00:00Z"}
    many = intake.alertmanager({**message(alert("X", {})), "alerts": [small] * (MAX_ALERTS + 1)})
    assert many.status_code == 422
    assert many.json()["error"] == (f"body.alerts: {MAX_ALERTS + 1} alerts in one message; at most {MAX_ALERTS} "
                                    "are taken (set max_alerts in Alertmanager's webhook_config)")
    flood = intake.alertmanager(message(*[alert(f"Flood{n}", {"service": "trading"}) for n in range(10_000)]))
    assert flood.status_code == 413 and "larger than" in flood.json()["error"]
    padded = json.dumps(message(alert("X", {"service": "trading", "padding": "x" * MAX_BODY_BYTES}))).encode()
    assert intake.alertmanager(padded).status_code == 413

    def chunks() -> Iterator[bytes]:  # no Content-Length: the body is still cut off at the limit
        yield padded[:MAX_BODY_BYTES]
        yield padded[MAX_BODY_BYTES:]

    streamed = intake.client.post("/api/alerts/alertmanager", content=chunks(), headers={
        "Authorization": f"Bearer {intake.alerts_token}", "Content-Type": "application/json"})
    assert streamed.status_code == 413 and "content-length" not in streamed.request.headers
    assert intake.incidents() == []


def test_without_an_inventory_the_intake_says_how_to_give_one(tmp_path: Path) -> None:
    url = prepared(f"sqlite:///{tmp_path / 'evidence.db'}")
    with serve(url, tmp_path) as client:
        answer = client.post("/api/alerts/alertmanager", json=message(alert("X", {"service": "trading"})),
                             headers={"Authorization": f"Bearer {token(url, 'am', 'alerts')}"})
    assert answer.status_code == 503
    assert answer.json()["error"] == ("alert intake needs the inventory whose services and sites alerts name: "
                                      "start the server with `dr serve -i INVENTORY`")


# ---------------------------------------------------------------- the generic signed webhook


def signed(body: bytes, *, key: str = SECRET, at: float | None = None) -> dict[str, str]:
    timestamp = str(int(time.time() if at is None else at))
    digest = hmac.new(key.encode(), timestamp.encode() + b"." + body, hashlib.sha256).hexdigest()
    return {"X-DR-Timestamp": timestamp, "X-DR-Signature": f"sha256={digest}"}


def test_the_webhook_takes_a_correctly_signed_alert_once(intake: Intake) -> None:
    began = utcnow().replace(microsecond=0) - timedelta(seconds=30)
    body = json.dumps({"target": "service:trading", "state": "firing", "summary": "orders time out",
                       "labels": {"data_integrity": "true"}, "started_at": began.isoformat()}).encode()
    headers = signed(body)
    answer = intake.webhook(body, headers)
    assert outcomes(answer) == [("opened", "service trading")]
    assert answer.json()["alerts"][0]["level"] == "serious"
    (incident,) = intake.incidents()
    assert (incident.source, incident.title, incident.labels) == ("alert:webhook", "service:trading: orders time out",
                                                                  {"data_integrity": "true"})

    replayed = intake.webhook(body, headers)
    assert replayed.status_code == 409 and "already received" in replayed.json()["error"]

    unknown = json.dumps({"target": "site:mars", "state": "firing"}).encode()
    assert intake.webhook(unknown, signed(unknown)).json()["alerts"][0]["detail"] == \
        f"{IGNORED} (site mars is not one of its sites: primary, backup)"
    resolved = json.dumps({"target": "service:trading", "state": "resolved"}).encode()
    assert outcomes(intake.webhook(resolved, signed(resolved))) == [("unchanged", "service trading")]  # another key
    resolved = json.dumps({"target": "service:trading", "state": "resolved",
                           "labels": {"data_integrity": "true"}}).encode()
    assert outcomes(intake.webhook(resolved, signed(resolved))) == [("restored", "service trading")]
    assert [event.data["source"] for event in intake.audit("alerts.receive")] == ["alert:webhook"] * 4


def test_a_missing_wrong_or_stale_signature_is_401_and_tells_nothing_of_the_key(intake: Intake) -> None:
    body = json.dumps({"target": "service:trading", "state": "firing"}).encode()
    good = signed(body)
    expected = good["X-DR-Signature"]
    refusals = {
        "missing": intake.webhook(body, {}),
        "no timestamp": intake.webhook(body, {"X-DR-Signature": expected}),
        "wrong key": intake.webhook(body, signed(body, key="a guess")),
        "body changed": intake.webhook(body.replace(b"trading", b"quotation"), good),
        "timestamp changed": intake.webhook(body, {**good, "X-DR-Timestamp": str(int(good["X-DR-Timestamp"]) + 1)}),
        "not hex": intake.webhook(body, {**good, "X-DR-Signature": b"sha256=\xe9t\xe9"}),  # type: ignore[dict-item]
        "stale": intake.webhook(body, signed(body, at=time.time() - 301)),
        "from the future": intake.webhook(body, signed(body, at=time.time() + 301)),
    }
    assert {why: answer.status_code for why, answer in refusals.items()} == dict.fromkeys(refusals, 401)
    errors = {answer.json()["error"] for answer in refusals.values()}
    assert errors == {"the request is not signed: send X-DR-Timestamp and X-DR-Signature",
                      "the request's signature does not match its body and timestamp",
                      "the request was signed more than 300 s from the server's clock (X-DR-Timestamp): sign it "
                      "again now"}
    assert not any(expected[7:] in answer.text or SECRET in answer.text for answer in refusals.values())
    assert intake.incidents() == []
    assert len(intake.audit("api.refused")) == len(refusals)
    assert outcomes(intake.webhook(body, good)) == [("opened", "service trading")]  # the refusals cost it nothing


def test_the_webhook_without_a_key_says_how_to_set_one(tmp_path: Path) -> None:
    url = prepared(f"sqlite:///{tmp_path / 'evidence.db'}")
    body = json.dumps({"target": "service:trading", "state": "firing"}).encode()
    with serve(url, tmp_path, inventory=str(inventory_file(tmp_path))) as client:
        answer = client.post("/api/alerts/webhook", content=body, headers={
            "Authorization": f"Bearer {token(url, 'am', 'alerts')}", **signed(body)})
    assert answer.status_code == 503 and "--alert-webhook-secret" in answer.json()["error"]


# ---------------------------------------------------------------- who may post alerts


def test_the_alerts_role_posts_alerts_and_nothing_else(intake: Intake) -> None:
    who = {"Authorization": f"Bearer {intake.alerts_token}"}
    reads = ["/api/runs", "/api/drills", "/api/approvals", "/api/evidence/verify", "/metrics", "/api/tokens"]
    answers = {path: intake.client.get(path, headers=who).status_code for path in reads}
    assert answers == dict.fromkeys(reads, 403)
    start_run = intake.client.post("/api/runs", headers=who, json={"runbook": "restore-trading.yml",
                                                                    "inventory": "two-services.yml"})
    assert start_run.status_code == 403
    assert start_run.json()["error"] == "the token 'alertmanager' has the role alerts; this needs engineer or above"
    assert intake.client.post("/api/tokens", headers=who, json={"name": "x", "role": "admin"}).status_code == 403
    dashboard = intake.client.get("/dashboard", headers=who)
    assert dashboard.status_code == 401 and "it may only post alerts" in dashboard.text
    signed_in = intake.client.post("/login", data={"token": intake.alerts_token}, follow_redirects=False)
    assert signed_in.status_code == 401 and "dr_token" not in signed_in.cookies
    assert intake.count(Run) == 0


@pytest.mark.parametrize("role", ["compliance", "engineer", "admin"])
def test_no_other_role_may_post_alerts(intake: Intake, role: str) -> None:
    """An engineer's token must not end up in Alertmanager's configuration (it could start runs), and
    an engineer declares an incident by starting the run (`dr run --incident`): alerts take only an
    alerts token."""
    person = token(intake.url, f"pat-{role}", role)
    answer = intake.alertmanager(message(alert("TradingDown", {"service": "trading"})), who=person)
    assert answer.status_code == 403
    assert answer.json()["error"] == (f"the token 'pat-{role}' has the role {role}; this needs only an alerts token "
                                      "(`dr tokens create --role alerts`)")
    body = json.dumps({"target": "service:trading", "state": "firing"}).encode()
    webhook = intake.client.post("/api/alerts/webhook", content=body,
                                 headers={"Authorization": f"Bearer {person}", **signed(body)})
    assert webhook.status_code == 403
    assert intake.alertmanager(message(alert("TradingDown", {"service": "trading"})), who=None).status_code == 401
    assert intake.incidents() == []
    assert [(event.actor, event.data["status"]) for event in intake.audit("api.refused")] == [
        (f"pat-{role}", 403), (f"pat-{role}", 403), ("anonymous", 401)]


@pytest.mark.slow
def test_dr_tokens_create_makes_an_alerts_token_and_dr_serve_refuses_a_broken_inventory(tmp_path: Path) -> None:
    db = prepared(f"sqlite:///{tmp_path / 'evidence.db'}")
    env = {**os.environ, "DR_DATABASE_URL": db}

    def dr(*args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run([sys.executable, "-m", "dr_orchestrator.cli", *args], capture_output=True, text=True,
                              timeout=60, env=env)

    created = dr("tokens", "create", "--name", "alertmanager", "--role", "alerts")
    assert created.returncode == 0, created.stderr
    assert "(alerts)" in created.stdout
    broken = tmp_path / "broken.yml"
    broken.write_text("all: {vars: {dr: {name: x}}}\n")
    refused = dr("serve", "--port", "0", "-i", str(broken))
    assert refused.returncode == 2 and "Traceback" not in refused.stderr
    assert str(broken) in refused.stderr
    secret = dr("serve", "--port", "0", "-i", str(inventory_file(tmp_path)), "--alert-webhook-secret",
                "env:DR_TEST_UNSET_SECRET")
    assert secret.returncode == 2
    assert "--alert-webhook-secret: secret env:DR_TEST_UNSET_SECRET: the environment variable DR_TEST_UNSET_SECRET " \
           "is not set" in secret.stderr


# ---------------------------------------------------------------- generated messages


class StandIn:
    """The ASGI app schemathesis calls: the spec is read at import, the test's app is set by a fixture."""

    def __init__(self, app: Any) -> None:
        self.app = app

    async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
        await self.app(scope, receive, send)


served = StandIn(create_app(ApiSettings(database_url="sqlite://")))
schema = schemathesis.openapi.from_asgi("/openapi.json", served).include(path_regex="^/api/alerts/alertmanager$")


@pytest.fixture(scope="module")
def alerts_token(tmp_path_factory: pytest.TempPathFactory) -> str:
    home = tmp_path_factory.mktemp("generated")
    url = prepared(f"sqlite:///{home / 'evidence.db'}")
    served.app = create_app(ApiSettings(database_url=url, runbooks_dir=str(RUNBOOKS), inventories_dir=str(INVENTORIES),
                                        drills_dir=str(home), inventory=str(inventory_file(home))))
    return token(url, "alertmanager", "alerts")


@schema.parametrize()
@settings(max_examples=40, deadline=None, suppress_health_check=list(HealthCheck))
@pytest.mark.slow
def test_generated_messages_are_taken_or_refused_as_the_spec_says_never_a_500(case: Any, alerts_token: str) -> None:
    case.headers = {**(case.headers or {}), "Authorization": f"Bearer {alerts_token}"}
    case.call_and_validate(checks=[CHECKS.get_one(name) for name in (
        "not_a_server_error", "status_code_conformance", "content_type_conformance", "response_schema_conformance",
        "positive_data_acceptance", "negative_data_rejection")])
