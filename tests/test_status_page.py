"""The public status page (/status, /status.json) through FastAPI's TestClient on SQLite and
PostgreSQL: no token needed and no other route opened; each service's state follows the incidents'
transitions; messages said by `dr incidents say` or the API show at once, escaped, signed "the DR
team", with nothing internal (hosts, runs, labels, levels, people) on the page."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
from api_support import INVENTORIES, RUNBOOKS, prepared, record_run, token
from fastapi.testclient import TestClient
from sqlalchemy import select
from starlette.routing import BaseRoute, Route

from dr_orchestrator.api.app import ApiSettings, create_app
from dr_orchestrator.evidence import incidents
from dr_orchestrator.evidence.chain import verify_session
from dr_orchestrator.evidence.database import session_factory_for
from dr_orchestrator.evidence.models import AuditEvent, IncidentEvent
from dr_orchestrator.model.events import utcnow

SERVICES = ("trading", "contract-signing", "quotation", "payments")
# What answers without a token: the status page, and the dashboard's sign-in form, its redirects and the spec.
PUBLIC = {("GET", "/status"), ("GET", "/status.json"), ("GET", "/"), ("GET", "/login"), ("GET", "/logout"),
          ("GET", "/openapi.json")}


@dataclass
class Site:
    url: str
    client: TestClient

    def status(self) -> dict[str, Any]:
        answer = self.client.get("/status.json")
        assert answer.status_code == 200, answer.text
        assert answer.headers["cache-control"] == "no-cache"
        return dict(answer.json())

    def states(self) -> dict[str, tuple[str, str | None]]:
        return {entry["service"]: (entry["state"], entry["since"]) for entry in self.status()["services"]}

    def page(self) -> str:
        answer = self.client.get("/status")
        assert answer.status_code == 200 and answer.headers["content-type"].startswith("text/html")
        return answer.text


def serve(url: str, tmp_path: Path, services: tuple[str, ...] = SERVICES) -> TestClient:
    (tmp_path / "drills").mkdir(exist_ok=True)
    return TestClient(create_app(ApiSettings(database_url=url, runbooks_dir=str(RUNBOOKS),
                                             inventories_dir=str(INVENTORIES), drills_dir=str(tmp_path / "drills"),
                                             status_services=services)))


@pytest.fixture
def site(database_url: str, tmp_path: Path) -> Iterator[Site]:
    url = prepared(database_url)
    with serve(url, tmp_path) as client:
        yield Site(url, client)


def write(url: str, change: Any) -> Any:
    with session_factory_for(url)() as session, session.begin():
        return change(session)


def open_incident(url: str, name: str, *, source: str = "watch", impact: datetime, kind: str = "service",
                  services: list[str] | None = None, **extra: Any) -> str:
    return str(write(url, lambda session: incidents.open_or_update_incident(
        session, target_kind=kind, target_name=name, impact_start=impact, detected_at=impact + timedelta(seconds=1),
        source=source, level=extra.get("level", "serious"), title=extra.get("title", f"{name} down"),
        actor=extra.get("actor", "dr watch"), labels=extra.get("labels", {}), services=services)))


def event(url: str, incident_id: str, kind: str, moment: datetime, data: dict[str, Any] | None = None) -> None:
    write(url, lambda session: incidents.record_incident_event(session, incident_id, kind, moment, "dr watch", data))


def dr(*args: str, db: str, cwd: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "dr_orchestrator.cli", *args], cwd=cwd,
                          env={**os.environ, "DR_DATABASE_URL": db}, capture_output=True, text=True, timeout=120)


def test_each_service_state_follows_its_incidents_with_no_token(site: Site) -> None:
    now = utcnow()
    assert site.states() == {name: ("operational", None) for name in SERVICES}
    trading = open_incident(site.url, "trading", impact=now - timedelta(seconds=30))
    quotation = open_incident(site.url, "quotation", source="alert:alertmanager", impact=now - timedelta(seconds=20))
    old = open_incident(site.url, "contract-signing", impact=now - timedelta(days=3))
    event(site.url, old, "restored", now - timedelta(days=2))
    assert site.states() == {
        "trading": ("outage", (now - timedelta(seconds=30)).isoformat()),  # the watch confirmed it down
        "quotation": ("degraded", (now - timedelta(seconds=20)).isoformat()),  # only an alert says so
        "contract-signing": ("operational", None),  # restored two days ago
        "payments": ("operational", None)}

    for kind in ("decided", "executing"):
        event(site.url, trading, kind, utcnow())
        assert site.states()["trading"][0] == "outage"
    restored = utcnow()
    event(site.url, trading, "restored", restored)
    assert site.states()["trading"] == ("restored-recently", restored.isoformat())
    open_incident(site.url, "quotation", impact=now - timedelta(seconds=25))  # the watch confirms the alert's
    assert site.states()["quotation"] == ("outage", (now - timedelta(seconds=25)).isoformat())
    event(site.url, quotation, "closed", utcnow())  # closed without a restoration: nothing to say any more
    assert site.states()["quotation"] == ("operational", None)

    # a site down puts every service it hits in outage, and one never listed is added
    open_incident(site.url, "primary", kind="site", services=["payments", "ledger"], impact=now)
    states = site.states()
    assert (states["payments"][0], states["ledger"][0]) == ("outage", "outage")
    assert list(states) == [*SERVICES, "ledger"]
    page = site.page()
    assert re.search(r"<td>trading</td><td class=\"restored-recently\">restored-recently</td>", page)
    assert re.search(r"<td>ledger</td><td class=\"outage\">outage</td>", page)


def every_route(routes: list[BaseRoute]) -> Iterator[Route]:
    """The app's routes, those of included routers too (FastAPI keeps them inside the router included)."""
    for route in routes:
        included = getattr(route, "original_router", None)
        if included is not None:
            yield from every_route(included.routes)
        elif isinstance(route, Route):
            yield route


def test_every_other_route_still_needs_a_token(site: Site) -> None:
    answered = set()
    for route in every_route(site.client.app.routes):  # type: ignore[attr-defined]
        path = re.sub(r"\{[^}]+\}", "1", route.path)
        for method in (route.methods or set()) - {"HEAD"}:
            answer = site.client.request(method, path, json={}, follow_redirects=False)
            if (method, route.path) in PUBLIC:
                assert answer.status_code < 400, (method, route.path, answer.status_code)
                answered.add((method, route.path))
            else:
                assert answer.status_code == 401, (method, route.path, answer.status_code, answer.text[:200])
    assert answered == PUBLIC


@pytest.mark.slow
def test_a_message_said_by_the_cli_shows_escaped_signed_by_the_team(site: Site, tmp_path: Path) -> None:
    incident_id = open_incident(site.url, "trading", impact=utcnow() - timedelta(seconds=5))
    text = "<script>alert('x')</script> Trading moves to the backup site & is back within minutes."
    said = dr("incidents", "say", incident_id, text, db=site.url, cwd=tmp_path)
    assert said.returncode == 0, said.stderr
    later = "Trading answers from the backup site."
    assert dr("incidents", "say", incident_id, later, db=site.url, cwd=tmp_path).returncode == 0

    messages = site.status()["messages"]
    assert [(m["text"], m["services"], m["by"]) for m in messages] == [
        (later, ["trading"], "the DR team"), (text, ["trading"], "the DR team")]  # newest first
    page = site.page()
    assert "<script>" not in page
    assert ("&lt;script&gt;alert(&#39;x&#39;)&lt;/script&gt; Trading moves to the backup site &amp; is back within "
            "minutes.") in page
    assert page.index(later) < page.index("Trading moves")
    with session_factory_for(site.url)() as session:  # who said it stays in the evidence, not on the page
        actors = set(session.scalars(select(IncidentEvent.actor).where(IncidentEvent.kind == "message")))
    assert len(actors) == 1 and actors.pop() not in page

    blank = dr("incidents", "say", incident_id, "  ", db=site.url, cwd=tmp_path)
    unknown = dr("incidents", "say", "INC-404", "hello", db=site.url, cwd=tmp_path)
    assert (blank.returncode, blank.stderr.strip()) == (
        2, "Error: the message is blank: write what customers should know")
    assert (unknown.returncode, unknown.stderr.strip()) == (
        2, "Error: no incident 'INC-404' in the evidence database (see `dr incidents list`)")


def test_publishing_over_the_api_needs_an_engineer_and_is_audited(site: Site) -> None:
    incident_id = open_incident(site.url, "quotation", impact=utcnow())
    erin, carol = token(site.url, "erin", "engineer"), token(site.url, "carol", "compliance")
    path = f"/api/incidents/{incident_id}/messages"

    def post(who: str | None, body: Any, where: str = path) -> Any:
        return site.client.post(where, json=body, headers={"Authorization": f"Bearer {who}"} if who else {})

    assert post(None, {"text": "hello"}).status_code == 401
    assert post(carol, {"text": "hello"}).status_code == 403
    published = post(erin, {"text": " Quotation is degraded; we are on it. "})
    assert published.status_code == 201, published.text
    answer = published.json()
    assert (answer["incident_id"], answer["text"], answer["actor"]) == (
        incident_id, "Quotation is degraded; we are on it.", "erin")
    refused = [(post(erin, {"text": "hi"}, "/api/incidents/INC-404/messages"), 404,
                "no incident 'INC-404' in the evidence database (see `dr incidents list`)"),
               (post(erin, {"text": " "}), 422, "body.text: ' ' is blank: write something"),
               (post(erin, {"text": "hi", "actor": "mallory"}), 422, "body.actor: Extra inputs are not permitted"),
               (post(erin, {"text": "x" * 2001}), 422, "the message has 2001 characters; at most 2000 are published")]
    for answer_, status, error in refused:
        assert (answer_.status_code, answer_.json()["error"]) == (status, error)

    assert [m["text"] for m in site.status()["messages"]] == ["Quotation is degraded; we are on it."]
    with session_factory_for(site.url)() as session:
        said = list(session.scalars(select(IncidentEvent).where(IncidentEvent.kind == "message")))
        audits = [(a.actor, a.action, a.target, a.data.get("status")) for a in
                  session.scalars(select(AuditEvent).order_by(AuditEvent.id))]
        assert verify_session(session).ok
    assert [(row.incident_id, row.actor) for row in said] == [(incident_id, "erin")]
    assert ("erin", "incident.say", incident_id, None) in audits
    assert ("carol", "api.refused", f"POST {path}", 403) in audits


def test_nothing_internal_leaks(database_url: str, tmp_path: Path) -> None:
    url = prepared(database_url)
    run_id = record_run(url, "restore-trading.yml", incident_ago_s=2, actor="alice")
    incident_id = open_incident(url, "trading", impact=utcnow() - timedelta(seconds=9), level="particularly serious",
                                title="db-primary-01 (10.0.0.7) refuses connections", actor="bob",
                                labels={"instance": "db-primary-01.internal:9100", "runbook": "failover-trading"})
    event(url, incident_id, "executing", utcnow(), {"run_id": run_id, "host": "10.0.0.7"})
    write(url, lambda session: incidents.say(session, incident_id, "Trading is unavailable.", "carol", utcnow()))
    internal = [run_id, run_id[:8], incident_id, "10.0.0.7", "db-primary-01", "failover-trading", "alice", "bob",
                "carol", "dr watch", "particularly serious", "watch", "127.0.0.1", "restore-trading"]
    with serve(url, tmp_path, services=()) as client:  # the services the evidence knows: trading, from the run
        shown = client.get("/status.json").json()
        page = client.get("/status").text
    assert set(shown) == {"updated_at", "services", "messages"}
    assert [entry["service"] for entry in shown["services"]] == ["trading"]
    assert [set(entry) for entry in shown["services"]] == [{"service", "state", "since"}]
    assert [set(message) for message in shown["messages"]] == [{"at", "text", "services", "by"}]
    for secret in internal:
        assert secret not in str(shown) and secret not in page, secret
