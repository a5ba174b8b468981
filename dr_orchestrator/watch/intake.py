"""Alert intake: what an alerting system reports (Prometheus Alertmanager, or any sender of the signed
generic webhook) opens or updates the incident of the service or site it names, classified as the
watch classifies (``policy.decide``). It never acts: the decision is recorded, and the watch (on its
own observers' agreement) or an engineer runs what it takes. The classification is an ``updated``
event (``classified``), not ``decided``: the incident stays ``detected``, so the watch's policy or its
approvers make the decision (and the RTO's decision part is theirs), and approvals can still be given.

Which target an alert names: ``scope=site`` with a ``site`` label naming one of the inventory's sites
is that whole site; else a ``service`` label naming one of its services is that service (its ``site``
label, if any, says where it failed). Anything else is ignored, with the reason in the answer.

One incident may gather several alerts (a group of Alertmanager's, say ``TradingDown`` and
``TradingErrors``): each alert is known by its key (Alertmanager's fingerprint) in the incident's
events, and a resolved alert restores the incident only when no other alert of it still fires, and
not while a run executes on it (that run's verification records the restoration).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Any, Literal

from sqlalchemy import select
from sqlalchemy.orm import Session

from dr_orchestrator.evidence import incidents
from dr_orchestrator.evidence.chain import lock_chain
from dr_orchestrator.evidence.database import begin_write
from dr_orchestrator.evidence.models import Incident, IncidentEvent
from dr_orchestrator.model.inventory import Inventory
from dr_orchestrator.watch import automation, policy
from dr_orchestrator.watch.observations import Target

ALERTMANAGER = "alert:alertmanager"
WEBHOOK = "alert:webhook"
IGNORED = "ignored: no service or site label matching the inventory"
DOES_NOT_ACT = "alert intake does not act; the watch or an engineer does"
TITLE_MAX_CHARS = 200

OutcomeKind = Literal["opened", "updated", "unchanged", "restored", "resolved", "ignored"]


@dataclass(frozen=True)
class Alert:
    """One alert as reported, whatever its format."""

    state: Literal["firing", "resolved"]
    key: str  # the same alert in every message (Alertmanager's fingerprint)
    title: str
    labels: Mapping[str, str]
    started_at: datetime | None = None  # firing: the impact start as the alerting system saw it
    ended_at: datetime | None = None  # resolved: when it stopped
    detail: Mapping[str, Any] = field(default_factory=dict)  # kept in the evidence: alertname, annotations, ...
    target: Target | None = None  # named outright (the webhook); else read from the labels


@dataclass(frozen=True)
class Outcome:
    """What became of one alert, for the sender's answer."""

    outcome: OutcomeKind
    detail: str
    target: str | None = None
    incident_id: str | None = None
    level: str | None = None
    policy: str | None = None


class Intake:
    """Takes alerts against one inventory: its services and sites, and its ``dr.watch`` to classify."""

    def __init__(self, inventory: Inventory, inventory_path: str | Path) -> None:
        self.inventory = inventory
        self.settings = policy.settings_of(inventory)
        self.inventory_dir = Path(inventory_path).parent

    def target_of(self, alert: Alert) -> Target | str:
        """The target the alert names, or why it is ignored."""
        if alert.target is not None:
            known = self.inventory.services if alert.target.kind == "service" else self.inventory.sites
            return alert.target if alert.target.name in known else \
                f"{IGNORED} ({alert.target} is not one of its {alert.target.kind}s: {', '.join(known)})"
        labels = alert.labels
        if labels.get("scope") == "site":
            site = labels.get("site")
            if site in self.inventory.sites:
                return Target("site", site)
            return f"{IGNORED} (scope=site, but site={site!r} is not one of {', '.join(self.inventory.sites)})"
        service = labels.get("service")
        if service in self.inventory.services:
            return Target("service", service)
        if service is not None:
            return f"{IGNORED} (service={service!r} is not one of {', '.join(self.inventory.services)})"
        return (f"{IGNORED} (it has no service label; a site label names a whole site only with scope=site; "
                f"services: {', '.join(self.inventory.services)}; sites: {', '.join(self.inventory.sites)})")

    def take(self, session: Session, alert: Alert, *, source: str, actor: str, now: datetime) -> Outcome:
        """Record what ``alert`` says (the caller commits)."""
        target = self.target_of(alert)
        if isinstance(target, str):
            return Outcome("ignored", target)
        # The chain head first: finding the target's open incident and opening one happen together,
        # whoever else (the watch, another alert) reports the same target at the same moment.
        begin_write(session)
        lock_chain(session.connection())
        if alert.state == "firing":
            return self._fire(session, target, alert, source, actor, now)
        return self._resolve(session, target, alert, source, actor, now)

    def _fire(self, session: Session, target: Target, alert: Alert, source: str, actor: str,
              now: datetime) -> Outcome:
        decision = policy.decide(self.settings, self.inventory, target, labels=alert.labels, now=now,
                                 automation=automation.automation_state(session, self.settings.automation),
                                 inventory_dir=self.inventory_dir)
        before = _open_incident(session, target)
        recorded = len(_events(session, before.id)) if before is not None else 0
        started = alert.started_at if alert.started_at is not None and alert.started_at <= now else now
        method = f"the alert's start ({source})" if started is alert.started_at else \
            f"the alert's receipt ({source} gave no start, or one in the future)"
        incident_id = incidents.open_or_update_incident(
            session, target_kind=target.kind, target_name=target.name, impact_start=started, detected_at=now,
            source=source, level=decision.level, title=alert.title[:TITLE_MAX_CHARS], actor=actor,
            labels=alert.labels, services=self._services(target), impact_start_method=method,
            detail={**alert.detail, "alert": alert.key})
        incident = session.get(Incident, incident_id)
        assert incident is not None
        events = _events(session, incident_id)
        if _firing(events).get(alert.key) != "firing":  # known to the incident, but not by this alert yet
            incidents.record_incident_event(session, incident_id, "updated", now, actor,
                                            {**alert.detail, "alert": alert.key, "source": source})
        if _classifies(incident, events, decision):
            incidents.record_incident_event(session, incident_id, "updated", now, actor, {
                "classified": True, "level": decision.level, "policy": decision.policy, "runbook": decision.runbook,
                "parameters": dict(decision.parameters), "reasons": list(decision.reasons), "source": source,
                "note": DOES_NOT_ACT})
        changed = len(_events(session, incident_id)) > recorded
        kind: OutcomeKind = "opened" if before is None else "updated" if changed else "unchanged"
        return Outcome(kind, f"{kind} incident {incident_id} of {target}: level {decision.level}, policy "
                             f"{decision.policy} ({DOES_NOT_ACT})", str(target), incident_id, decision.level,
                       decision.policy)

    def _resolve(self, session: Session, target: Target, alert: Alert, source: str, actor: str,
                 now: datetime) -> Outcome:
        incident = _open_incident(session, target)
        if incident is None:
            return Outcome("resolved", f"no open incident of {target}: nothing to restore", str(target))
        firing = _firing(_events(session, incident.id))
        if firing.get(alert.key) != "firing":
            return Outcome("unchanged", f"incident {incident.id} of {target} has no firing alert {alert.key}: "
                                        "nothing to restore", str(target), incident.id)
        others = sorted(key for key, state in firing.items() if state == "firing" and key != alert.key)
        ended = alert.ended_at if alert.ended_at is not None and alert.ended_at <= now else now
        data = {**alert.detail, "alert": alert.key, "resolved": True}
        if others or incident.state == incidents.EXECUTING:
            why = f"{len(others)} other alert(s) of it still fire" if others else \
                "a run executes on it: its verification records the restoration"
            incidents.record_incident_event(session, incident.id, "updated", ended, actor, {**data, "note": why})
            return Outcome("updated", f"incident {incident.id} of {target} stays open: {why}", str(target),
                           incident.id)
        incidents.record_incident_event(session, incident.id, "restored", ended, actor, {**data, "source": source})
        return Outcome("restored", f"incident {incident.id} of {target} restored at {ended.isoformat()}",
                       str(target), incident.id)

    def _services(self, target: Target) -> list[str]:
        """What customers see hit: the service, or the services a site serves when nothing has failed over."""
        if target.kind == "service":
            return [target.name]
        return [name for name, service in self.inventory.services.items() if service.primary_site == target.name]


def _open_incident(session: Session, target: Target) -> Incident | None:
    return session.scalars(select(Incident).where(
        Incident.target_kind == target.kind, Incident.target_name == target.name,
        Incident.state.in_(incidents.ACTIVE_STATES)).order_by(Incident.created_at.desc()).limit(1)).first()


def _events(session: Session, incident_id: str) -> list[IncidentEvent]:
    return list(session.scalars(select(IncidentEvent).where(IncidentEvent.incident_id == incident_id)
                                .order_by(IncidentEvent.at, IncidentEvent.id)))


def _firing(events: list[IncidentEvent]) -> dict[str, str]:
    """Each alert of the incident (by key) and whether it fires or was resolved, by its newest report."""
    states: dict[str, str] = {}
    for event in events:
        key = event.data.get("alert")
        if event.kind in ("detected", "updated") and isinstance(key, str):
            states[key] = "resolved" if event.data.get("resolved") else "firing"
    return states


def _classifies(incident: Incident, events: list[IncidentEvent], decision: policy.Decision) -> bool:
    """Whether to record this classification: the incident is not decided yet (once the watch or its
    approvers decided, an alert has nothing to add), and no alert classified it so already."""
    if incident.state != "detected":
        return False
    last = next((event for event in reversed(events) if event.data.get("classified")), None)
    return last is None or (last.data.get("level"), last.data.get("policy")) != (decision.level, decision.policy)
