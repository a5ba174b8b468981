"""Structured notifications: at each incident transition (detected, decided, executing, restored,
closed) and each new or cleared early warning, a payload with the fields a pager or chat bot routes
on, not only text, sent to the targets of the inventory's ``dr.watch.notify``:

    {"event": "restored", "incident": "INC-20261207-1a2b3c4d", "service": "trading" (or "site": ...),
     "services": [...], "severity": "major", "state": "restored", "at": "...", "rto_so_far_s": 1.8,
     "rto_target_s": 60.0, "link": "https://dr.example.com/dashboard#incident-INC-...", "text": "..."}

Targets reuse the runbooks' notification code (``actions.notify``): a webhook (JSON POST, signed with
HMAC-SHA256 in ``X-DR-Signature`` when it has a ``secret``) or an e-mail; secrets by reference only.
Each target has a sender thread of its own, so a slow or dead one delays nobody else and never the
watch. A delivery that fails after its retries is recorded: on the incident as an ``updated`` event
(``notification_failed``), for a warning as an audit event.

The ``Notifier`` finds incident transitions in the evidence itself (``poll``: the incident events
recorded since it started), so it tells of every transition whoever recorded it: the watch, a run
starting, ``dr incidents close``, an alert through the API.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Iterable
from concurrent.futures import Future, ThreadPoolExecutor, wait
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

from pydantic import ValidationError
from sqlalchemy import func, select
from sqlalchemy.orm import Session, sessionmaker

from dr_orchestrator.actions.notify import CHANNELS, Delivery, send_message
from dr_orchestrator.evidence.liveness import writing
from dr_orchestrator.evidence.models import Incident, IncidentEvent
from dr_orchestrator.model.inventory import Inventory
from dr_orchestrator.model.watch import NotificationTarget, WatchSettings
from dr_orchestrator.watch.warnings import EarlyWarning

log = logging.getLogger(__name__)

INCIDENT_EVENTS = ("detected", "decided", "executing", "restored", "closed")
FAILED = "notification_failed"  # what an ``updated`` event of a failed delivery holds
AUDIT_ACTION = "watch.notification_failed"
POLL_S = 0.25


@dataclass(frozen=True)
class Notice:
    event: str
    subject: str
    payload: dict[str, Any]  # every field, "text" included
    incident: str | None = None

    @property
    def text(self) -> str:
        return str(self.payload["text"])


def setup_problems(settings: WatchSettings) -> list[str]:
    """Each target of ``dr.watch.notify`` checked against its action's parameters: one sentence each."""
    problems = []
    for index, target in enumerate(settings.notify):
        try:
            CHANNELS[target.channel].params.model_validate(
                {**target.settings, **CHANNELS[target.channel].placeholder})
        except ValidationError as exc:
            error = exc.errors()[0]
            where = ".".join(str(part) for part in error["loc"])
            says = str(error["ctx"]["error"]) if error["type"] == "value_error" else error["msg"]
            problems.append(f"dr.watch.notify[{index}].{target.channel}.{where}: {says}")
    return problems


# --- payloads ---------------------------------------------------------------------------------------


def link_to(base_url: str | None, anchor: str) -> str | None:
    return f"{base_url.rstrip('/')}/dashboard#{anchor}" if base_url else None


def incident_notice(session: Session, event: IncidentEvent, inventory: Inventory, base_url: str | None) -> Notice:
    """The notice of an incident's transition ``event`` (one of INCIDENT_EVENTS)."""
    incident = session.get(Incident, event.incident_id)
    assert incident is not None  # the event refers to it
    kind, name = incident.target_kind or "service", incident.target_name or incident.title
    services = list(incident.services or ([name] if kind == "service" else []))
    targets = [inventory.services[s].rto for s in services if s in inventory.services]
    rto_target = min(targets) if targets else None
    at = _aware(event.at)
    impact = _aware(incident.impact_start) if incident.impact_start is not None else None
    so_far = round((at - impact).total_seconds(), 3) if impact is not None else None
    level = incident.level or event.data.get("level")
    happened = {
        "detected": "is down", "decided": f"decided: policy {event.data.get('policy', '?')}"
        + (f", outcome {event.data['outcome']}" if "outcome" in event.data else ""),
        "executing": f"failing over (run {str(event.data.get('run_id', '?'))[:8]})",
        "restored": "restored", "closed": "closed",
    }[event.kind]
    rto = "" if so_far is None else f"; RTO so far {so_far:.1f} s" + (
        f" (target {rto_target:g} s)" if rto_target is not None else "")
    text = f"{incident.id}: {kind} {name} {happened} (level {level or 'unclassified'}){rto}"
    payload = {"event": event.kind, "incident": incident.id, kind: name, "services": services, "severity": level,
               "state": event.kind, "at": at.isoformat(), "rto_so_far_s": so_far, "rto_target_s": rto_target,
               "link": link_to(base_url, f"incident-{incident.id}"), "text": text}
    return Notice(event.kind, f"[DR {level or 'incident'}] {kind} {name}: {event.kind}", payload, incident.id)


def warning_notice(warning: EarlyWarning, raised: bool, base_url: str | None) -> Notice:
    kind, _, name = warning.target.partition(":")
    event = "warning" if raised else "warning-cleared"
    text = warning.message if raised else f"cleared: {warning.message}"
    payload = {"event": event, "incident": None, kind: name, "severity": warning.severity, "warning": warning.kind,
               "state": "active" if raised else "cleared", "at": datetime.now(UTC).isoformat(),
               "since": warning.since.isoformat(), "rto_so_far_s": None, "rto_target_s": None,
               "link": link_to(base_url, "warnings"), "text": text}
    return Notice(event, f"[DR {warning.severity}] {warning.target}: {warning.kind}"
                  + ("" if raised else " cleared"), payload)


def _aware(moment: datetime) -> datetime:
    return moment.replace(tzinfo=UTC) if moment.tzinfo is None else moment


# --- delivery ---------------------------------------------------------------------------------------


def deliver(target: NotificationTarget, notice: Notice) -> Delivery:
    """One notice to one target, with the target's retries."""
    fields = {name: value for name, value in notice.payload.items() if name != "text"}
    return send_message(target.channel, target.settings, notice.subject, notice.text, fields)


class Notifier:
    """``start()`` polls the evidence for incident transitions in a thread; ``warning_changed`` is the
    early warnings' hook; ``close()`` stops polling and waits (bounded) for what is queued."""

    def __init__(self, settings: WatchSettings, inventory: Inventory, sessions: sessionmaker[Session], actor: str,
                 *, poll_s: float = POLL_S) -> None:
        self.targets = settings.notify
        self.base_url = settings.base_url
        self.inventory = inventory
        self.sessions = sessions
        self.actor = actor
        self.poll_s = poll_s
        self.senders = [ThreadPoolExecutor(max_workers=1, thread_name_prefix=f"watch-notify-{index}")
                        for index in range(len(self.targets))]
        with sessions() as session:  # only what happens from now on
            self.last_event_id = session.scalar(select(func.max(IncidentEvent.id))) or 0
        self.stopping = threading.Event()
        self.poller: threading.Thread | None = None
        self.queued: set[Future[None]] = set()

    def start(self) -> None:
        self.poller = threading.Thread(target=self._poll_until_stopped, name="watch-notify-poll", daemon=True)
        self.poller.start()

    def close(self, timeout: float = 30.0) -> None:
        """Stop polling, send what was recorded last, and wait at most ``timeout`` for the deliveries
        queued (a dead target's retries do not hold the watch's stop up longer)."""
        self.stopping.set()
        if self.poller is not None:
            self.poller.join(timeout)
        try:
            self.poll()
        except Exception:  # noqa: BLE001 - the watch is stopping; the log has it
            log.exception("reading the last incident events to notify failed")
        wait(list(self.queued), timeout=timeout)
        for sender in self.senders:
            sender.shutdown(wait=False, cancel_futures=True)

    def _poll_until_stopped(self) -> None:
        while not self.stopping.wait(self.poll_s):
            try:
                self.poll()
            except Exception:  # noqa: BLE001 - a notification must never take the watch down
                log.exception("reading incident events to notify failed")

    def poll(self) -> int:
        """Queue a notice of each incident transition recorded since the last poll; how many."""
        with self.sessions() as session:
            events = list(session.scalars(select(IncidentEvent).where(IncidentEvent.id > self.last_event_id)
                                          .order_by(IncidentEvent.id)))
            notices = [incident_notice(session, event, self.inventory, self.base_url)
                       for event in events if event.kind in INCIDENT_EVENTS]
        if events:
            self.last_event_id = events[-1].id
        self.send(notices)
        return len(notices)

    def warning_changed(self, warning: EarlyWarning, raised: bool) -> None:
        self.send([warning_notice(warning, raised, self.base_url)])

    def send(self, notices: Iterable[Notice]) -> None:
        for notice in notices:
            for target, sender in zip(self.targets, self.senders, strict=True):
                if notice.event in target.events:
                    queued = sender.submit(self._deliver, target, notice)
                    self.queued.add(queued)
                    queued.add_done_callback(self.queued.discard)

    def _deliver(self, target: NotificationTarget, notice: Notice) -> None:
        try:
            delivery = deliver(target, notice)
        except Exception as exc:  # noqa: BLE001 - recorded below like any failed delivery
            delivery = Delivery(target.channel, "?", False, 0, datetime.now(UTC), f"{type(exc).__name__}: {exc}")
        if delivery.delivered:
            log.info("%s notice %s to %s: %s", notice.event, notice.incident or "", delivery.target, delivery.detail)
            return
        log.warning("%s notice not delivered to %s: %s", notice.event, delivery.target, delivery.detail)
        failed = {"event": notice.event, **delivery.as_dict()}
        try:
            self._record_failure(notice, failed)
        except Exception:  # noqa: BLE001 - logged above; the watch goes on
            log.exception("could not record the failed %s notice", notice.event)

    def _record_failure(self, notice: Notice, failed: dict[str, Any]) -> None:
        from dr_orchestrator.evidence.annotations import record_audit_event
        from dr_orchestrator.evidence.incidents import record_incident_event

        with writing(self.sessions) as session:
            if notice.incident is not None:
                record_incident_event(session, notice.incident, "updated", datetime.now(UTC), self.actor,
                                      {FAILED: failed})
            else:
                record_audit_event(session, self.actor, AUDIT_ACTION, str(notice.payload.get("warning")), failed)
