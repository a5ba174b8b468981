"""The drill's own notifications (started, expectation missed, failed, completed, missed): sent in
the background so the drill never waits on a slow mail server, each delivery or failure to deliver
recorded as evidence with its time, and never fatal to the drill."""

from __future__ import annotations

import logging
import queue
import threading
from typing import Any

from pydantic import ValidationError

from dr_orchestrator.actions.notify import Delivery, send_message
from dr_orchestrator.evidence import drills as records
from dr_orchestrator.model.drill import NotifyEvent, NotifyTarget
from dr_orchestrator.model.events import utcnow

log = logging.getLogger(__name__)

# How much a notice asks of whoever receives it, in the watch's words for its notices.
SEVERITY = {NotifyEvent.STARTED: "info", NotifyEvent.COMPLETED: "info", NotifyEvent.EXPECTATION_MISSED: "warning",
            NotifyEvent.FAILED: "critical", NotifyEvent.MISSED: "warning"}


class DrillNotifier:
    def __init__(self, targets: tuple[NotifyTarget, ...], sessions: records.Sessions) -> None:
        self.targets = targets
        self.sessions = sessions
        self._queue: queue.Queue[tuple[str | None, NotifyEvent, str, str, dict[str, Any]] | None] = queue.Queue()
        self._worker: threading.Thread | None = None

    def send(self, drill_run_id: str | None, event: NotifyEvent, subject: str, text: str,
             fields: dict[str, Any] | None = None) -> None:
        """Queue the notice; ``fields``: its structured part (drill, verdict, RTO and RPO against targets, ...),
        to which its event and severity are added."""
        if not any(event in target.events for target in self.targets):
            return
        if self._worker is None:
            self._worker = threading.Thread(target=self._deliver_all, name="drill-notifier", daemon=True)
            self._worker.start()
        self._queue.put((drill_run_id, event, subject, text, {"event": event.value, "severity": SEVERITY[event],
                                                               **(fields or {})}))

    def close(self, timeout: float = 60.0) -> None:
        """Wait (bounded) for what is queued to be delivered or given up."""
        if self._worker is not None:
            self._queue.put(None)
            self._worker.join(timeout)

    def _deliver_all(self) -> None:
        while (item := self._queue.get()) is not None:
            drill_run_id, event, subject, text, fields = item
            for target in self.targets:
                if event in target.events:
                    self._deliver(target, drill_run_id, event, subject, text, fields)

    def _deliver(self, target: NotifyTarget, drill_run_id: str | None, event: NotifyEvent, subject: str,
                 text: str, fields: dict[str, Any]) -> None:
        try:
            delivery = deliver(target, subject, text, fields)
        except Exception as exc:  # noqa: BLE001 - a notification must never take the drill down
            delivery = Delivery(target.channel, str(target.settings.get("url") or target.settings.get("to")),
                                False, 0, utcnow(), f"{type(exc).__name__}: {exc}")
        try:
            records.record_notification(self.sessions, drill_run_id, event.value, delivery.as_dict())
        except Exception:  # noqa: BLE001 - logged; the drill's own evidence matters more
            log.exception("could not record the %s notification of drill run %s", event, drill_run_id)


def deliver(target: NotifyTarget, subject: str, text: str, fields: dict[str, Any]) -> Delivery:
    try:
        return send_message(target.channel, target.settings, subject, text, fields)
    except ValidationError as exc:  # checked when the drill was loaded; here only if that was skipped
        return Delivery(target.channel, "?", False, 0, utcnow(), f"bad settings: {exc.errors()[0]['msg']}")
