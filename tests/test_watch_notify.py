"""Structured notifications (dr_orchestrator.watch.notify): the payload of each incident transition and
warning, delivery to a real local webhook with its HMAC signature checked, targets listening only to
some events, a failing target recorded on the incident while the watch goes on, and a target the
actions would refuse stopping `dr watch run` before it starts."""

from __future__ import annotations

import json
import threading
from collections.abc import Iterator
from datetime import timedelta
from pathlib import Path
from typing import Any

import pytest
from api_support import prepared
from click.testing import CliRunner
from notify_servers import WebhookReceiver, free_port, start_webhook_receiver
from sqlalchemy.orm import Session, sessionmaker
from support.waiting import wait_for
from support.watch import T0, Executed, Script, healthy_round, site_lost_round, steps

from dr_orchestrator.actions.notify import (
    SIGNATURE_HEADER,
    TIMESTAMP_HEADER,
    AppriseParams,
    deliver_apprise,
    shown_url,
    signature,
)
from dr_orchestrator.cli.watch import watch as watch_group
from dr_orchestrator.evidence.incidents import (
    incident_detail,
    list_incidents,
    open_or_update_incident,
    record_incident_event,
)
from dr_orchestrator.evidence.models import IncidentEvent
from dr_orchestrator.loading import load_inventory
from dr_orchestrator.model.inventory import Inventory
from dr_orchestrator.watch.notify import Notifier, incident_notice, warning_notice
from dr_orchestrator.watch.policy import settings_of
from dr_orchestrator.watch.service import Watch
from dr_orchestrator.watch.warnings import EarlyWarning

REPO = Path(__file__).resolve().parent.parent
BASE_URL = "https://dr.example.com"


def inventory_with(tmp_path: Path, notify: list[dict[str, Any]], base_url: str | None = BASE_URL) -> Path:
    """The lab's inventory (runbooks by absolute path) with ``dr.watch.notify`` and ``base_url``."""
    text = (REPO / "inventories" / "lab.yml").read_text().replace("../runbooks/", f"{REPO / 'runbooks'}/")
    extra = f"        notify: {json.dumps(notify)}\n" + (f"        base_url: {base_url}\n" if base_url else "")
    path = tmp_path / "inventory.yml"
    path.write_text(text.replace("      watch:\n", "      watch:\n" + extra, 1))
    return path


def loaded(path: Path) -> Inventory:
    return load_inventory(str(path))[0]


@pytest.fixture
def receivers() -> Iterator[list[WebhookReceiver]]:
    started = [start_webhook_receiver() for _ in range(2)]
    try:
        yield [receiver for receiver, _ in started]
    finally:
        for _, stop in started:
            stop()


def record_lifecycle(sessions: sessionmaker[Session]) -> str:
    """trading down from T0, detected 1.5 s later, decided, executing, restored at 3.2 s, closed."""
    with sessions() as session, session.begin():
        incident = open_or_update_incident(
            session, target_kind="service", target_name="trading", impact_start=T0,
            detected_at=T0 + timedelta(seconds=1.5), source="watch", level="major", title="service trading down",
            actor="dr watch")
        for kind, at_s, data in (("decided", 1.6, {"policy": "auto"}), ("executing", 1.7, {"run_id": "r" * 36}),
                                 ("restored", 3.2, {}), ("closed", 600.0, {"reason": "done"})):
            record_incident_event(session, incident, kind, T0 + timedelta(seconds=at_s), "dr watch", data)
    return incident


@pytest.mark.slow
def test_each_transition_reaches_the_webhook_as_signed_structured_fields(
        tmp_path: Path, sessions: sessionmaker[Session], receivers: list[WebhookReceiver],
        monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("DR_TEST_HOOK_KEY", "s3cret")
    everything, restored_only = receivers
    inventory = loaded(inventory_with(tmp_path, [
        {"webhook": {"url": everything.url, "secret": "env:DR_TEST_HOOK_KEY"}},
        {"webhook": {"url": restored_only.url}, "events": ["restored"]}]))
    notifier = Notifier(settings_of(inventory), inventory, sessions, "dr watch")
    incident = record_lifecycle(sessions)
    assert notifier.poll() == 5
    calls = everything.wait_for(5)
    bodies = [json.loads(call.body) for call in calls]
    assert [body["event"] for body in bodies] == ["detected", "decided", "executing", "restored", "closed"]
    restored = bodies[3]
    assert {key: restored[key] for key in ("incident", "service", "services", "severity", "state", "rto_so_far_s",
                                           "rto_target_s", "link")} == {
        "incident": incident, "service": "trading", "services": ["trading"], "severity": "major",
        "state": "restored", "rto_so_far_s": 3.2, "rto_target_s": 60.0,
        "link": f"{BASE_URL}/dashboard#incident-{incident}"}
    assert restored["text"] == f"{incident}: service trading restored (level major); RTO so far 3.2 s (target 60 s)"
    assert bodies[0]["rto_so_far_s"] == 1.5 and "policy auto" in bodies[1]["text"]
    for call in calls:  # what a receiver recomputes with the shared key
        assert call.headers[SIGNATURE_HEADER] == signature("s3cret", call.headers[TIMESTAMP_HEADER], call.body)
    (only,) = restored_only.wait_for(1)
    notifier.close()
    assert json.loads(only.body)["event"] == "restored" and SIGNATURE_HEADER not in only.headers
    assert len(restored_only.delivered()) == 1


def test_an_apprise_target_gets_each_transition_with_its_fields_and_a_refusal_says_why(
        tmp_path: Path, sqlite_sessions: sessionmaker[Session], receivers: list[WebhookReceiver],
        monkeypatch: pytest.MonkeyPatch) -> None:
    """Apprise reaches the chat tools banks page through by URL (dingtalk://, wecombot://, feishu://,
    slack://, ...); here its JSON webhook (json://) stands for them, on a real local receiver."""
    receiver, _ = receivers
    monkeypatch.setenv("DR_TEST_APPRISE_URL", receiver.url.replace("http://", "json://"))
    inventory = loaded(inventory_with(tmp_path, [{"apprise": {"urls": ["env:DR_TEST_APPRISE_URL"]}}]))
    notifier = Notifier(settings_of(inventory), inventory, sqlite_sessions, "dr watch")
    incident = record_lifecycle(sqlite_sessions)
    assert notifier.poll() == 5
    bodies = [json.loads(call.body) for call in receiver.wait_for(5)]
    notifier.close()
    assert [body["state"] for body in bodies] == ["detected", "decided", "executing", "restored", "closed"]
    restored = bodies[3]
    assert restored["title"] == "[DR major] service trading: restored"
    assert restored["message"].startswith(f"{incident}: service trading restored (level major)")
    assert "rto_so_far_s: 3.2" in restored["message"].splitlines()  # the fields in the text, for chat tools
    # ...and in the body, as fields of their own (Apprise sends their values as text)
    assert (restored["incident"], restored["service"], restored["rto_so_far_s"], restored["rto_target_s"]) == (
        incident, "trading", "3.2", "60.0")

    refused = deliver_apprise(AppriseParams(urls=[f"json://127.0.0.1:{free_port()}/hooks/T0KEN"], text="x",
                                            attempts=2, backoff=0.05, timeout=1))
    assert not refused.delivered and refused.attempts == 2
    assert "Connection error" in refused.detail and "T0KEN" not in refused.detail + refused.target


def test_a_site_incident_names_the_site_and_its_strictest_rto_target(
        tmp_path: Path, sqlite_sessions: sessionmaker[Session]) -> None:
    inventory = loaded(inventory_with(tmp_path, [], base_url=None))
    with sqlite_sessions() as session, session.begin():
        incident = open_or_update_incident(
            session, target_kind="site", target_name="primary", impact_start=T0, detected_at=T0 + timedelta(seconds=1),
            source="watch", level="particularly-serious", title="site primary down", actor="dr watch",
            services=["trading", "quotation"])
    with sqlite_sessions() as session:
        event = session.query(IncidentEvent).filter_by(incident_id=incident, kind="detected").one()
        notice = incident_notice(session, event, inventory, None)
    assert notice.payload["site"] == "primary" and "service" not in notice.payload
    assert notice.payload["rto_target_s"] == 30.0  # quotation's, the strictest of the services it hits
    assert notice.payload["link"] is None and notice.payload["severity"] == "particularly-serious"


def test_a_warning_and_its_clearing_are_notices_of_their_own() -> None:
    warning = EarlyWarning("rpo-at-risk", "service:contract-signing", "critical",
                           "a failover now would miss contract-signing's RPO target: its standby backup is 7.2 s "
                           "behind (target 5 s)", T0, {"lag_s": 7.2})
    raised, cleared = warning_notice(warning, True, BASE_URL), warning_notice(warning, False, BASE_URL)
    assert {key: raised.payload[key] for key in ("event", "incident", "service", "severity", "state", "warning",
                                                  "link", "text")} == {
        "event": "warning", "incident": None, "service": "contract-signing", "severity": "critical", "state": "active",
        "warning": "rpo-at-risk", "link": f"{BASE_URL}/dashboard#warnings", "text": warning.message}
    assert cleared.event == "warning-cleared" and cleared.payload["state"] == "cleared"
    assert cleared.text == f"cleared: {warning.message}"


@pytest.mark.slow
def test_a_failing_target_is_recorded_on_the_incident_and_the_watch_goes_on(
        tmp_path: Path, sqlite_sessions: sessionmaker[Session], receivers: list[WebhookReceiver]) -> None:
    working = receivers[0]
    dead = f"http://127.0.0.1:{free_port()}/hook"  # nothing listens there
    path = inventory_with(tmp_path, [{"webhook": {"url": dead, "attempts": 1, "timeout": "1s"}},
                                     {"webhook": {"url": working.url}}])
    rounds = [healthy_round(t) for t in steps(0, 0.5)] + [site_lost_round(t) for t in steps(0.6, 1.6)]
    executed = Executed()
    watcher = Watch(str(path), sqlite_sessions, probe=Script(rounds), execute=executed)
    stop = threading.Event()
    thread = threading.Thread(target=watcher.run, args=(stop,))
    thread.start()
    try:
        told = working.wait_for(2)

        def failures() -> list[dict[str, Any]] | None:
            with sqlite_sessions() as session:
                (incident,) = list_incidents(session)
                detail = incident_detail(session, incident["id"])
            assert detail is not None
            found = [e["data"]["notification_failed"] for e in detail["events"]
                     if e["kind"] == "updated" and "notification_failed" in e["data"]]
            return found if len(found) >= 2 else None

        failed = wait_for(failures, 20.0, "both failed deliveries recorded on the incident")
    finally:
        stop.set()
        thread.join(30)
    assert not thread.is_alive()
    assert [c["runbook"] for c in executed.calls] == ["site-failover.yml"]  # the watch acted all the same
    assert [json.loads(call.body)["event"] for call in told] == ["detected", "decided"]
    assert [(f["event"], f["delivered"], f["target"]) for f in failed] == [
        ("detected", False, shown_url(dead)), ("decided", False, shown_url(dead))]


def test_a_target_the_notify_actions_refuse_stops_dr_watch_run_before_it_starts(tmp_path: Path) -> None:
    url = prepared(f"sqlite:///{tmp_path / 'evidence.db'}")
    hook = "https://chat.example.com/hook"
    clear_secret = inventory_with(tmp_path, [{"webhook": {"url": hook, "secret": "hunter2"}}])
    result = CliRunner().invoke(watch_group, ["run", "-i", str(clear_secret)], obj={"database": url})
    assert result.exit_code == 2 and "Traceback" not in result.output
    assert "dr.watch.notify[0].webhook.secret: secrets are given by reference only" in result.output
    both = inventory_with(tmp_path, [{"webhook": {"url": hook}, "email": {"to": ["x@y"]}}])
    result = CliRunner().invoke(watch_group, ["run", "-i", str(both)], obj={"database": url})
    assert result.exit_code == 2 and "exactly one of webhook, email or apprise" in result.output
