"""The incident lifecycle in the evidence, on SQLite and PostgreSQL: an incident per target reused
until restored, its impact start only moving earlier, its moments as chained events that move its
state, the RTO's parts adding up to the RTO, a run started on it recorded as executing, and a
tampered event found by `dr evidence verify`."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import uuid
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
from api_support import INVENTORY, RUNBOOKS
from sqlalchemy import select, text
from sqlalchemy.exc import DBAPIError
from sqlalchemy.orm import Session, sessionmaker

from dr_orchestrator.evidence import chain, incidents, migrate
from dr_orchestrator.evidence.database import make_engine
from dr_orchestrator.evidence.models import Incident, IncidentEvent
from dr_orchestrator.model.events import utcnow
from dr_orchestrator.plans import build_plan
from dr_orchestrator.runs.execute import execute

T0 = datetime(2026, 12, 7, 3, 0, 0, 123457, tzinfo=UTC)  # odd microseconds: the parts must still add up


def at(seconds: float) -> datetime:
    return T0 + timedelta(seconds=seconds)


def open_incident(session: Session, name: str = "trading", *, kind: str = "service", impact_s: float = 0.0,
                  detected_s: float = 1.5, source: str = "watch", level: str = "serious",
                  labels: dict[str, Any] | None = None, services: list[str] | None = None) -> str:
    return incidents.open_or_update_incident(
        session, target_kind=kind, target_name=name, impact_start=at(impact_s), detected_at=at(detected_s),
        source=source, level=level, title=f"{kind} {name} down", actor="dr watch", labels=labels or {},
        services=services)


def events_of(session: Session, incident_id: str) -> list[tuple[str, datetime, str, dict[str, Any]]]:
    rows = session.scalars(select(IncidentEvent).where(IncidentEvent.incident_id == incident_id)
                           .order_by(IncidentEvent.at, IncidentEvent.id))
    return [(row.kind, row.at, row.actor, row.data) for row in rows]


def state_of(session: Session, incident_id: str) -> str | None:
    return session.scalar(select(Incident.state).where(Incident.id == incident_id))


def dr(*args: str, db: str, cwd: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "dr_orchestrator.cli", *args], cwd=cwd,
                          env={**os.environ, "DR_DATABASE_URL": db}, capture_output=True, text=True, timeout=120)


def test_one_incident_per_target_until_restored_and_its_impact_start_only_moves_earlier(
        sessions: sessionmaker[Session]) -> None:
    with sessions() as session, session.begin():
        first = open_incident(session, impact_s=0.0, detected_s=1.5)
        assert open_incident(session, impact_s=0.75, detected_s=2.0) == first  # a later first failure: no change
        assert open_incident(session, impact_s=-0.25, detected_s=2.5) == first  # an earlier one moves it
        other_service = open_incident(session, "quotation")
        site = open_incident(session, "trading", kind="site", services=["trading", "quotation"])
    assert len({first, other_service, site}) == 3
    with sessions() as session:
        incident = session.get(Incident, first)
        assert incident is not None
        assert incident.impact_start == at(-0.25)
        assert (incident.target_kind, incident.target_name, incident.services) == ("service", "trading", ["trading"])
        assert (incident.level, incident.source, incident.state) == ("serious", "watch", "detected")
        assert [(kind, moment) for kind, moment, _actor, _data in events_of(session, first)] == [
            ("detected", at(1.5)), ("updated", at(2.5))]
        assert events_of(session, first)[1][3] == {
            "impact_start": {"from": at(0.0).isoformat(), "to": at(-0.25).isoformat()}}
        site_row = session.get(Incident, site)
        assert site_row is not None and site_row.services == ["trading", "quotation"]


def test_an_alert_on_an_open_incident_adds_its_source_labels_and_level(sessions: sessionmaker[Session]) -> None:
    with sessions() as session, session.begin():
        opened = open_incident(session, source="alert:alertmanager", labels={"alertname": "TradingDown"})
        again = open_incident(session, source="watch", level="particularly serious", labels={"team": "markets"},
                              detected_s=3.0)
    assert again == opened
    with sessions() as session:
        incident = session.get(Incident, opened)
        assert incident is not None
        assert incident.labels == {"alertname": "TradingDown", "team": "markets"}
        assert (incident.source, incident.level) == ("alert:alertmanager", "particularly serious")
        (_kind, _at, _actor, data) = events_of(session, opened)[-1]
        assert data == {"source": "watch", "level": {"from": "serious", "to": "particularly serious"},
                        "labels": {"team": "markets"}}


def test_events_move_the_state_in_order_and_the_rto_parts_add_up_exactly(sessions: sessionmaker[Session]) -> None:
    with sessions() as session, session.begin():
        incident_id = open_incident(session, impact_s=0.0, detected_s=1.234567)
        assert state_of(session, incident_id) == "detected"
        moments = [("decided", 1.5), ("executing", 1.500321), ("restored", 2.75), ("closed", 600.0)]
        for kind, seconds in moments:
            incidents.record_incident_event(session, incident_id, kind, at(seconds), "dr watch",
                                            {"run_id": "run-1"} if kind == "executing" else {})
            assert state_of(session, incident_id) == kind
        incidents.say(session, incident_id, "  Trading is back.  ", "alice", at(601.0))
        assert state_of(session, incident_id) == "closed"  # a message moves no state
    with sessions() as session:
        assert [(kind, moment, actor) for kind, moment, actor, _ in events_of(session, incident_id)] == [
            ("detected", at(1.234567), "dr watch"), ("decided", at(1.5), "dr watch"),
            ("executing", at(1.500321), "dr watch"), ("restored", at(2.75), "dr watch"),
            ("closed", at(600.0), "dr watch"), ("message", at(601.0), "alice")]
        assert events_of(session, incident_id)[-1][3] == {"text": "Trading is back."}
        timeline = incidents.incident_timeline(session, incident_id)
    moment = {key: datetime.fromisoformat(timeline[key]) for key in
              ("impact_start", "detected", "decided", "executing", "restored", "closed")}
    assert moment["impact_start"] == at(0.0) and moment["restored"] == at(2.75) and moment["closed"] == at(600.0)
    assert timeline["run_ids"] == ["run-1"]
    assert (timeline["detection_s"], timeline["decision_s"], timeline["execution_s"], timeline["rto_s"]) == (
        1.234567, 0.265433, 1.25, 2.75)
    parts = [moment["detected"] - moment["impact_start"], moment["decided"] - moment["detected"],
             moment["restored"] - moment["decided"]]
    assert sum(parts, timedelta()) == moment["restored"] - moment["impact_start"]
    assert round(timeline["detection_s"] + timeline["decision_s"] + timeline["execution_s"], 6) == timeline["rto_s"]


def test_a_restored_or_closed_incident_is_not_reused_and_a_closed_one_takes_only_messages(
        sessions: sessionmaker[Session]) -> None:
    with sessions() as session, session.begin():
        restored = open_incident(session)
        incidents.record_incident_event(session, restored, "restored", at(5.0), "dr watch", {})
        second = open_incident(session, impact_s=10.0, detected_s=11.0)
        incidents.record_incident_event(session, second, "closed", at(12.0), "alice", {"reason": "false alarm"})
        third = open_incident(session, impact_s=20.0, detected_s=21.0)
    assert len({restored, second, third}) == 3
    with sessions() as session, session.begin():
        with pytest.raises(incidents.IncidentError, match=f"^incident '{second}' is closed: it cannot become "
                                                          "executing$"):
            incidents.record_incident_event(session, second, "executing", at(13.0), "alice", {})
        incidents.say(session, second, "It was a false alarm.", "alice", at(14.0))
        assert state_of(session, second) == "closed"


@pytest.mark.slow
def test_mistakes_are_one_sentence(sessions: sessionmaker[Session]) -> None:
    with sessions() as session, session.begin():
        incident_id = open_incident(session)
    cases: list[tuple[Any, str]] = [
        (lambda s: incidents.say(s, "INC-404", "hello", "alice", at(1)),
         "no incident 'INC-404' in the evidence database (see `dr incidents list`)"),
        (lambda s: incidents.say(s, incident_id, " \n ", "alice", at(1)),
         "the message is blank: write what customers should know"),
        (lambda s: incidents.say(s, incident_id, "x" * 2001, "alice", at(1)),
         "the message has 2001 characters; at most 2000 are published"),
        (lambda s: incidents.record_incident_event(s, incident_id, "fixed", at(1), "alice", {}),
         "incident event kind 'fixed' is not one of suspected, detected, decided, executing, restored, closed, "
         "message, updated, approved, rejected"),
        (lambda s: incidents.record_incident_event(s, incident_id, "decided", datetime(2026, 12, 7), "alice", {}),
         "the moment 2026-12-07T00:00:00 has no time zone: incidents are timed in UTC"),
        (lambda s: open_incident(s, kind="host"), "target kind 'host' is not one of service, site"),
        (lambda s: open_incident(s, impact_s=3.0, detected_s=2.0),
         f"the impact start {at(3.0).isoformat()} of service trading is after its detection {at(2.0).isoformat()}"),
    ]
    for call, sentence in cases:
        with sessions() as session, session.begin(), pytest.raises(incidents.IncidentError) as caught:
            call(session)
        assert str(caught.value) == sentence
    with sessions() as session:
        assert [kind for kind, *_ in events_of(session, incident_id)] == ["detected"]  # nothing half-written


def test_a_run_started_on_the_incident_is_recorded_as_executing_once(sessions: sessionmaker[Session]) -> None:
    impact = utcnow() - timedelta(seconds=3)
    with sessions() as session, session.begin():
        incident_id = incidents.open_or_update_incident(
            session, target_kind="service", target_name="trading", impact_start=impact, detected_at=utcnow(),
            source="watch", level="serious", title="service trading down", actor="dr watch", labels={})
    plan = build_plan(str(RUNBOOKS / "restore-trading.yml"), str(INVENTORY), incident_at=impact, started_by="alice")
    on_incident = plan.model_copy(update={"incident_id": incident_id})
    by_hand = execute(sessions, on_incident)  # a person's run on the incident: the run records executing
    assert by_hand.state == "succeeded", by_hand.error
    watched = str(uuid.uuid4())  # the watch's run: it recorded executing before the run started
    with sessions() as session, session.begin():
        incidents.record_incident_event(session, incident_id, "executing", utcnow(), "dr watch", {"run_id": watched})
    assert execute(sessions, on_incident, run_id=watched).state == "succeeded"
    with sessions() as session, session.begin():
        restored = incidents.restored_at(session, watched)
        assert restored is not None and restored > impact
        incidents.record_incident_event(session, incident_id, "restored", restored, "dr watch", {"run_id": watched})
    with sessions() as session:
        kinds = [(kind, actor, data.get("run_id")) for kind, _at, actor, data in events_of(session, incident_id)]
        timeline = incidents.incident_timeline(session, incident_id)
        assert chain.verify_session(session).ok  # the store's writer chained the event and the state it moved
    assert kinds == [("detected", "dr watch", None), ("executing", "alice", by_hand.run_id),
                     ("executing", "dr watch", watched), ("restored", "dr watch", watched)]
    assert timeline["run_ids"] == [by_hand.run_id, watched]
    assert datetime.fromisoformat(timeline["restored"]) == restored
    assert timeline["decision_s"] is None and timeline["execution_s"] is None  # no decision recorded
    assert timeline["rto_s"] == pytest.approx((restored - impact).total_seconds(), abs=1e-6)


@pytest.mark.slow
def test_dr_incidents_show_and_close_and_a_tampered_event_is_found_by_dr_evidence_verify(
        sessions: sessionmaker[Session], database_url: str, tmp_path: Path) -> None:
    with sessions() as session, session.begin():
        incident_id = open_incident(session)
        incidents.record_incident_event(session, incident_id, "decided", at(2.0), "dr watch", {"policy": "auto"})
        incidents.record_incident_event(session, incident_id, "restored", at(4.5), "dr watch", {})
    said = dr("incidents", "say", incident_id, "We are failing trading over to the backup site.", db=database_url,
              cwd=tmp_path)
    assert said.returncode == 0, said.stderr
    shown = dr("incidents", "show", incident_id, "-o", "json", db=database_url, cwd=tmp_path)
    assert shown.returncode == 0, shown.stderr
    detail = json.loads(shown.stdout)
    assert detail["incident"]["state"] == "restored" and detail["runs"] == []
    assert (detail["timeline"]["detection_s"], detail["timeline"]["decision_s"], detail["timeline"]["execution_s"],
            detail["timeline"]["rto_s"]) == (1.5, 0.5, 2.5, 4.5)
    assert [event["kind"] for event in detail["events"]] == ["detected", "decided", "restored", "message"]
    assert detail["events"][-1]["data"] == {"text": "We are failing trading over to the backup site."}
    text_view = dr("incidents", "show", incident_id, db=database_url, cwd=tmp_path).stdout
    assert "detection" in text_view and "RTO 4.500s" in text_view
    assert "We are failing trading over to the backup site." in text_view

    closed = dr("incidents", "close", incident_id, "--reason", "restored and checked", db=database_url, cwd=tmp_path)
    assert closed.returncode == 0, closed.stderr
    again = dr("incidents", "close", incident_id, "--reason", "twice", db=database_url, cwd=tmp_path)
    blank = dr("incidents", "close", incident_id, "--reason", " ", db=database_url, cwd=tmp_path)
    assert (again.returncode, again.stderr.strip()) == (2, f"Error: incident '{incident_id}' is closed: it cannot "
                                                           "become closed")
    assert (blank.returncode, blank.stderr.strip()) == (2, "Error: --reason is blank: say why the incident is closed")
    with sessions() as session:
        assert state_of(session, incident_id) == "closed"
        assert events_of(session, incident_id)[-1][::3] == ("closed", {"reason": "restored and checked"})

    verified = dr("evidence", "verify", db=database_url, cwd=tmp_path)
    assert verified.returncode == 0 and verified.stdout.startswith("intact:"), verified.stdout + verified.stderr
    with sessions() as session:
        assert chain.verify_session(session).ok
    engine = make_engine(database_url)
    try:
        with engine.begin() as conn:  # as a superuser could: the evidence triggers off
            if conn.dialect.name == "postgresql":
                conn.execute(text("SET LOCAL session_replication_role = replica"))
            conn.execute(text("UPDATE incident_events SET at = :moment WHERE kind = 'restored'"),
                         {"moment": at(3.0) if conn.dialect.name == "postgresql" else at(3.0).isoformat()})
    finally:
        engine.dispose()
    tampered = dr("evidence", "verify", db=database_url, cwd=tmp_path)
    assert tampered.returncode == 1
    assert tampered.stdout.startswith("TAMPERED: record changed: incident_events id ")


def test_postgres_refuses_rewriting_events_or_an_incident_s_identity_or_reopening_it(
        sessions: sessionmaker[Session], database_url: str) -> None:
    if not database_url.startswith("postgresql"):
        pytest.skip("the guards are PostgreSQL triggers")
    with sessions() as session, session.begin():
        incident_id = open_incident(session)
        incidents.record_incident_event(session, incident_id, "closed", at(9.0), "alice", {})
    refused = {
        "UPDATE incident_events SET actor = 'mallory'": "evidence is append-only: UPDATE on incident_events refused",
        "DELETE FROM incident_events": "evidence is append-only: DELETE on incident_events refused",
        f"UPDATE incidents SET target_name = 'quotation' WHERE id = '{incident_id}'":
            f"evidence is append-only: only the impact start, state, level and labels of incident {incident_id} "
            "may change",
        f"UPDATE incidents SET state = 'detected' WHERE id = '{incident_id}'": f"incident {incident_id} is closed",
    }
    for statement, sentence in refused.items():
        with sessions() as session, pytest.raises(DBAPIError, match=sentence):
            session.execute(text(statement))


@pytest.mark.slow
def test_an_incident_recorded_before_the_lifecycle_stays_intact_through_dr_db_upgrade(
        database_url: str, tmp_path: Path) -> None:
    migrate.upgrade(database_url, "0006")
    engine = make_engine(database_url)
    try:
        with engine.begin() as conn:
            moment = at(0.0) if conn.dialect.name == "postgresql" else at(0.0).isoformat()
            conn.execute(text("INSERT INTO incidents (id, created_at, created_by, title, recorded_at) "
                              "VALUES ('INC-OLD', :at, 'alice', 'before the lifecycle', :at)"), {"at": moment})
            assert chain.adopt_unchained(conn) == 1
    finally:
        engine.dispose()
    upgraded = dr("db", "upgrade", db=database_url, cwd=tmp_path)
    assert upgraded.returncode == 0, upgraded.stderr
    verified = dr("evidence", "verify", db=database_url, cwd=tmp_path)
    assert verified.returncode == 0 and verified.stdout.startswith("intact: 1 chain entries"), verified.stdout
    shown = dr("incidents", "show", "INC-OLD", "-o", "json", db=database_url, cwd=tmp_path)
    detail = json.loads(shown.stdout)
    assert (detail["incident"]["state"], detail["incident"]["target_kind"], detail["events"]) == (None, None, [])
    assert detail["timeline"]["rto_s"] is None
