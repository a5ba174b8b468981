"""The watch: observe every service and site, agree on what is down, decide by policy, act.

One loop: a probe round every ``interval`` (``observers.probe_all``), every observation fed to the
agreement rule. A service or site that becomes *down* (independent observers agree) opens or joins an
incident with its impact start (the first failed observation) and detection time, is classified and
decided (``policy.decide``), and then: ``auto`` runs the mapped runbook at once (trigger
``automatic``, the impact start as the incident time, so the run's RTO counts from it); ``approve``
waits until two distinct people approve the incident (``dr incidents approve``), then runs it;
``notify`` only records and tells. Each step is an incident event in the evidence chain.

A site going down takes precedence over its services: a service whose serving site is itself
suspect waits (at most ``site_grace_s``) for the site's verdict, so a site loss runs the site
runbook once instead of one runbook per service.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import threading
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, Protocol

from sqlalchemy.exc import SQLAlchemyError
from sqlalchemy.orm import Session, sessionmaker

from dr_orchestrator.evidence.liveness import writing
from dr_orchestrator.evidence.rto import RESTORED_MARKER
from dr_orchestrator.evidence.store import EvidenceFallback
from dr_orchestrator.model.events import Event, MarkerReached
from dr_orchestrator.model.run import RunPlan
from dr_orchestrator.runs.execute import KeptConnections
from dr_orchestrator.watch.agreement import Agreement
from dr_orchestrator.watch.observations import Observation, Target, Transition
from dr_orchestrator.watch.policy import Decision

log = logging.getLogger(__name__)

WATCH_ACTOR = "dr watch"
APPROVALS_EVERY_ROUNDS = 5  # how often waiting incidents look for new approvals (rounds)
# A follower node's rounds: enough to know which site serves what and to have judged an outage when it
# comes to lead, at a tenth of the cost; it is back to the inventory's interval within one of those.
FOLLOWER_INTERVAL_S = 1.0
KEEP_OPEN_EVERY_S = 5.0  # how often dead or missing SSH connections of the warm path are reopened


class LeaderGate(Protocol):
    """A cluster node's leadership (dr_orchestrator.cluster.leadership.Leadership): the watch of a
    node that does not lead observes and agrees, but decides and acts only while it leads."""

    def is_leader(self) -> bool: ...

    def fence_check(self) -> Callable[[], object]:
        """The check a run calls before each changing step; raises when this node does not lead now."""
        ...


class NodeJournal(EvidenceFallback, Protocol):
    """A cluster node's local evidence journal (cluster.journal.JournalFallback): a run's events, and
    the watch's incident writes, while the evidence database is away."""

    def append_incident(self, operation: Mapping[str, Any]) -> None: ...


@dataclass
class PendingService:
    """A service found down while its serving site was suspect: decided once the site's verdict is in."""

    transition: Transition
    site: str
    until: float  # monotonic deadline


@dataclass
class Awaiting:
    """An incident whose policy asks for approvals: it runs once enough distinct people approved."""

    target: Target
    runbook: str
    parameters: Mapping[str, Any]
    impact_start: datetime
    reason: str
    escalate_at: float  # monotonic
    escalated: bool = False


@dataclass
class ActiveRun:
    incident_id: str
    run_id: str
    thread: threading.Thread
    targets: set[Target] = field(default_factory=set)


class Watch:
    """``run(stop)`` until ``stop`` is set; ``round()`` once (tests drive it)."""

    def __init__(self, inventory_path: str, sessions: sessionmaker[Session], *,
                 probe: Callable[[], list[Observation]] | None = None,
                 execute: Callable[..., Any] | None = None,
                 confirm_s: float | None = None, leader: LeaderGate | None = None,
                 fallback: NodeJournal | None = None, host: str | None = None) -> None:
        """``leader``, ``fallback`` and ``host``: a cluster node's leadership (decide and act only while
        leading, every run fenced), its evidence journal, and its name (recorded as the runs' host)."""
        from dr_orchestrator.loading import load_inventory
        from dr_orchestrator.watch import notify, observers, policy, warnings

        self.inventory_path = inventory_path
        self.inventory, _ = load_inventory(inventory_path)
        self.settings = policy.settings_of(self.inventory)
        self.sessions = sessions
        self.interval_s = self.settings.interval
        self.agreement = Agreement(confirm_s=self.settings.confirm if confirm_s is None else confirm_s)
        self.site_grace_s = 2 * self.agreement.confirm_s
        # The resident prober: warm clients, and a slow probe never holds a round back.
        self.prober: observers.Prober | None = None
        if probe is None:
            self.prober = probe = observers.Prober(self.inventory)
        self.probe = probe
        self.execute = execute or _execute_plan
        self.leader = leader
        self.fallback = fallback
        self.host = host
        self.journaled_incidents: set[str] = set()  # opened while the evidence database was away
        self.automation_known: Any = None  # the automation switch as last read (decide_offline)
        self.pending: list[PendingService] = []
        self.undecided: list[Transition] = []  # found down, but the decision could not be recorded yet
        self.states: dict[Target, str] = {}  # suspect / down, absent when healthy
        self.serving: dict[str, str] = {}  # service -> the site that served it at its newest observation
        self.held_back: set[Target] = set()  # down to this node's observers, yet clients are still served
        self.front_door_at: dict[str, datetime] = {}  # service -> its newest front-door observation
        self.failing_since: dict[str, datetime] = {}  # service -> its first failed front-door probe in a row
        self.active: list[ActiveRun] = []
        self.last_automatic: dict[Target, datetime] = {}
        self.rounds = 0
        self.awaiting: dict[str, Awaiting] = {}
        self.lock = threading.Lock()
        self.plans: dict[tuple[str, str, tuple[float, ...]], RunPlan] = {}
        # The warm path: the hosts' SSH connections, open before a run needs them (a fresh one costs
        # ~0.15 s, the largest part of a site failover's critical path in the lab).
        self.kept: KeptConnections | None = KeptConnections() if self.prober is not None else None
        # Structured notifications of every incident transition, and early warnings off the round.
        self.notifier = notify.Notifier(self.settings, self.inventory, sessions, WATCH_ACTOR) \
            if self.settings.notify else None
        self.warnings = warnings.EarlyWarnings(
            self.inventory, inventory_path, sessions, WATCH_ACTOR,
            changed=self.notifier.warning_changed if self.notifier else None) if self.prober is not None else None

    # -- the loop ----------------------------------------------------------------------------------

    def run(self, stop: threading.Event, ready: Callable[[], object] | None = None) -> None:
        """Watch until ``stop``; ``ready()`` once the first round is judged (a node's readiness)."""
        log.info("watching %s every %.0f ms%s", self.inventory.name, self.interval_s * 1000,
                 f" while leading, every {max(self.interval_s, FOLLOWER_INTERVAL_S):g} s while following"
                 if self.leader is not None else "")
        threading.Thread(target=self.warm_plans, name="watch-plans", daemon=True).start()
        if self.kept is not None:
            threading.Thread(target=self.keep_connections_open, args=(stop,), name="watch-connections",
                             daemon=True).start()
        next_at = time.monotonic()
        if self.notifier is not None:
            self.notifier.start()
        while not stop.is_set():
            try:
                self.round()
            except Exception:  # noqa: BLE001 - one bad round must not end the watch
                log.exception("watch round failed")
            if ready is not None and self.rounds == 1:
                ready()
            next_at = self.next_round(stop, next_at)
        for active in list(self.active):
            active.thread.join()
        if self.kept is not None:
            self.kept.close()
        if self.prober is not None:
            self.prober.close()
        if self.warnings is not None:
            self.warnings.close()
        if self.notifier is not None:
            self.notifier.close()

    def next_round(self, stop: threading.Event, round_at: float) -> float:
        """Wait until the round after the one due at ``round_at`` is due; return when it was due (now, when
        this one overran). Every interval while leading (or outside a cluster), every FOLLOWER_INTERVAL_S
        while following, cut short when the node comes to lead."""
        entered = due = time.monotonic()
        while not stop.is_set():
            due = round_at + (self.interval_s if self.may_act() else max(self.interval_s, FOLLOWER_INTERVAL_S))
            delay = due - time.monotonic()
            if delay <= 0:
                break
            stop.wait(min(delay, self.interval_s))
        return max(due, entered)

    def round(self) -> None:
        transitions: list[Transition] = []
        if self.prober is not None:
            self.prober.resting = frozenset(target.name for active in self.active if active.thread.is_alive()
                                            for target in active.targets if target.kind == "service")
        observations = self.probe()
        if self.rounds == 0:
            log.info("first round: %d observations, %d failing", len(observations),
                     sum(not o.ok for o in observations))
        self.rounds += 1
        for observation in observations:
            if observation.target.kind == "service" and observation.observer == "front-door":
                self.front_door_at[observation.target.name] = observation.at
                if observation.ok:
                    self.failing_since.pop(observation.target.name, None)
                else:
                    self.failing_since.setdefault(observation.target.name, observation.at)
                site = _site_in(observation.detail) if observation.ok else None
                if site:
                    self.serving[observation.target.name] = site
            transitions += self.agreement.feed(observation)
        # Sites first: a site's verdict decides what happens to the services it serves.
        for transition in sorted(transitions, key=lambda t: t.target.kind != "site"):
            self.on_transition(transition)
        self.decide_pending()
        if self.awaiting and self.rounds % APPROVALS_EVERY_ROUNDS == 0 and self.may_act():
            self.check_approvals()
        self.active = [active for active in self.active if active.thread.is_alive()]
        if self.warnings is not None and self.prober is not None:
            self.warnings.round(self.rounds, self.prober.readings)

    # -- transitions ---------------------------------------------------------------------------------

    def on_transition(self, transition: Transition) -> None:
        target = transition.target
        if transition.state == "recovered":
            self.states.pop(target, None)
            return
        self.states[target] = transition.state
        if transition.state != "down":
            return
        if target.kind == "site" and self.serving and not self.served_by(target):
            # Every service is served elsewhere (e.g. after its failover, or a restart of the watch):
            # a lost redundancy is an early warning, not an outage to fail over again.
            log.warning("site %s is down but serves nothing now: no incident", target.name)
            return
        if target.kind == "service":
            site = self.serving_site(target.name)
            if site is not None and self.states.get(Target("site", site)) == "down":
                return  # the site's incident covers it
            if site is not None and self.states.get(Target("site", site)) == "suspect":
                self.pending.append(PendingService(transition, site, time.monotonic() + self.site_grace_s))
                return
        self.handle_down(transition)

    def decide_pending(self) -> None:
        undecided, self.undecided = self.undecided, []
        # Sites first, as in a round: a follower that comes to lead holds every outage it found, and a
        # site's runbook covers the services it serves (their own runbooks must not run beside it).
        for transition in sorted(undecided, key=lambda t: t.target.kind != "site"):
            if self.states.get(transition.target) != "down":
                continue
            site = self.serving_site(transition.target.name) if transition.target.kind == "service" else None
            if site is not None and self.states.get(Target("site", site)) == "down" and \
                    Target("site", site) not in self.held_back:
                continue  # the site's incident covers it
            self.handle_down(transition)
        still: list[PendingService] = []
        for pending in self.pending:
            site_state = self.states.get(Target("site", pending.site))
            if site_state == "down":
                continue  # covered by the site's incident
            if site_state == "suspect" and time.monotonic() < pending.until:
                still.append(pending)
                continue
            if self.states.get(pending.transition.target) == "down":
                self.handle_down(pending.transition)
        self.pending = still

    def may_act(self) -> bool:
        return self.leader is None or self.leader.is_leader()

    def serving_site(self, service: str) -> str | None:
        """The site serving ``service``: the one its front door last answered from. Before the front door
        ever answered this watch (it started during the outage: a node that comes to lead when its site
        is lost), the first of the service's sites found down or suspect, where its outage comes from: a
        site's runbook covers it then, and the service's own must not run beside it."""
        if (site := self.serving.get(service)) is not None or service not in self.inventory.services:
            return site
        return next((name for name in self.inventory.services[service].sites
                     if self.states.get(Target("site", name)) in ("down", "suspect")), None)

    def served_by(self, target: Target) -> list[str]:
        """The services whose clients an outage of ``target`` hurts: the service, or those the site serves."""
        if target.kind == "service":
            return [target.name]
        return sorted(name for name in self.inventory.services.keys() | self.serving.keys()
                      if self.serving_site(name) == target.name)

    def clients_still_served(self, target: Target) -> bool:
        """Whether every service ``target`` serves answers clients through the front door: none has failed
        there for the agreement's confirmation time (one slow answer on a busy machine does not count).
        Then the target is not lost for clients, only unreachable from this watch (a partition that cut
        its node off, which the other observers share), and failing it over would be the harm. Without a
        front-door observation of each, nothing is held back."""
        served = self.served_by(target)
        if not served or any(name not in self.front_door_at for name in served):
            return False
        return all(name not in self.failing_since
                   or (self.front_door_at[name] - self.failing_since[name]).total_seconds() < self.agreement.confirm_s
                   for name in served)

    def busy(self, target: Target) -> bool:
        return any(target in active.targets for active in self.active if active.thread.is_alive())

    def handle_down(self, transition: Transition) -> None:
        target = transition.target
        if self.busy(target):
            return
        if not self.may_act():  # a follower: decided if it leads while the outage lasts
            self.undecided.append(transition)
            return
        if self.clients_still_served(target):
            if target not in self.held_back:
                self.held_back.add(target)
                log.warning("%s %s is down to this watch's observers, but its clients are still served through "
                            "the front door: no failover (the watch may be cut off from it)", target.kind, target.name)
            self.undecided.append(transition)  # decided once clients are hurt too
            return
        if target in self.held_back:  # the clients' outage began when the front door first failed
            self.held_back.discard(target)
            hurt = [self.failing_since[name] for name in self.served_by(target) if name in self.failing_since]
            if hurt:
                transition = dataclasses.replace(transition, impact_start=max(transition.impact_start, min(hurt)),
                                                 at=max(transition.at, max(hurt)))
        try:
            with writing(self.sessions) as session:
                incident_id, decision, asking = self.record_decision(session, transition)
        except SQLAlchemyError as exc:
            from dr_orchestrator.evidence.store import database_unreachable

            if self.fallback is not None and database_unreachable(exc):
                incident_id, decision, asking = self.decide_offline(transition)
            else:  # nothing was decided: the outage must not be forgotten
                log.exception("%s %s is down, but its incident could not be recorded: trying again next round",
                              target.kind, target.name)
                self.undecided.append(transition)
                return
        log.warning("%s %s down since %s: level %s, policy %s (%s)", target.kind, target.name,
                    transition.impact_start.isoformat(), decision.level, decision.policy, "; ".join(decision.reasons),
                    extra={"incident_id": incident_id})
        reason = f"dr watch: {target.kind} {target.name} down ({decision.level}, policy {decision.policy})"
        if decision.policy == "auto" and decision.runbook is not None:
            self.last_automatic[target] = transition.at
            self.start_run(incident_id, target, decision.runbook, decision.parameters, transition.impact_start, reason)
        elif asking and decision.runbook is not None:
            self.awaiting[incident_id] = Awaiting(
                target, decision.runbook, decision.parameters, transition.impact_start, reason,
                time.monotonic() + self.settings.approval.timeout)

    def record_decision(self, session: Session, transition: Transition) -> tuple[str, Decision, bool]:
        """Open (or update) the incident of the target found down and record the policy's decision, or
        that approvals are awaited: (incident id, decision, awaiting approvals). The caller commits."""
        from dr_orchestrator.evidence import incidents
        from dr_orchestrator.watch import automation

        self.automation_known = automation.automation_state(session, self.settings.automation)
        decision, opening, (kind, data) = self.decision_records(transition, self.automation_known)
        incident_id = incidents.open_or_update_incident(session, **opening)
        data = _with_incident(data, incident_id)
        incidents.record_incident_event(session, incident_id, kind, _now(), WATCH_ACTOR, data)
        return incident_id, decision, kind == "updated"

    def decide_offline(self, transition: Transition) -> tuple[str, Decision, bool]:
        """``record_decision`` while the evidence database is away, on a cluster node: decided with the
        automation switch as last read, the incident written to the node's journal (delivered, in order
        before its run, when the database is back)."""
        from dr_orchestrator.evidence import incidents
        from dr_orchestrator.watch.automation import AutomationState

        assert self.fallback is not None
        known = self.automation_known or AutomationState(on=self.settings.automation)
        decision, opening, (kind, data) = self.decision_records(transition, known)
        incident_id = incidents.new_watch_incident_id(transition.at)
        self.fallback.append_incident(incidents.incident_operation("open", incident_id=incident_id, **opening))
        self.journaled_incidents.add(incident_id)
        self.record_incident_event(incident_id, kind, _now(), _with_incident(data, incident_id))
        log.warning("evidence database unreachable: incident %s journaled on this node", incident_id,
                    extra={"incident_id": incident_id})
        return incident_id, decision, kind == "updated"

    def decision_records(self, transition: Transition, automation: Any) -> tuple[
            Decision, dict[str, Any], tuple[str, dict[str, Any]]]:
        """The policy's decision for the target found down, the incident to open for it, and the event
        that records the decision (``decided``, or ``updated`` awaiting approvals)."""
        from dr_orchestrator.watch import policy

        target = transition.target
        site = self.serving_site(target.name) if target.kind == "service" else None
        decision = policy.decide(self.settings, self.inventory, target, now=transition.at,
                                 labels={"site": site} if site else {},
                                 last_automatic_run=self.last_automatic.get(target),
                                 automation=automation, inventory_dir=Path(self.inventory_path).parent)
        covered = self.served_by(target)
        opening = {"target_kind": target.kind, "target_name": target.name, "impact_start": transition.impact_start,
                   "detected_at": transition.at, "source": "watch", "level": decision.level,
                   "title": f"{target.kind} {target.name} down", "actor": WATCH_ACTOR, "services": covered,
                   "impact_start_method": "first failed observation",
                   "detail": {"observers": list(transition.observers), "details": list(transition.details)}}
        decided = {"level": decision.level, "policy": decision.policy, "runbook": decision.runbook,
                   "parameters": dict(decision.parameters), "reasons": list(decision.reasons)}
        if decision.policy == "approve" and decision.runbook is not None:
            # the decision is the approvals': its time is when they are in
            needed = self.settings.approval.approvers
            return decision, opening, ("updated", {**decided, "awaiting_approval": True, "approvers": needed,
                                                   "how": "`dr incidents approve {incident}` by "
                                                          f"{needed} distinct people"})
        return decision, opening, ("decided", decided)

    def record_incident_event(self, incident_id: str, kind: str, at: datetime, data: dict[str, Any]) -> None:
        """One moment of an incident: into the evidence database, or, on a cluster node, into its journal
        when the database is away or the incident itself is still only in the journal."""
        from dr_orchestrator.evidence import incidents
        from dr_orchestrator.evidence.store import database_unreachable

        if self.fallback is None or not (incident_id in self.journaled_incidents and self.fallback.pending()):
            try:
                with writing(self.sessions) as session:
                    incidents.record_incident_event(session, incident_id, kind, at, WATCH_ACTOR, data)
                return
            except SQLAlchemyError as exc:
                if self.fallback is None or not database_unreachable(exc):
                    raise
        self.fallback.append_incident(incidents.incident_operation(
            "event", incident_id=incident_id, kind=kind, at=at, actor=WATCH_ACTOR, data=data))

    def check_approvals(self) -> None:
        """Start what enough distinct people approved; stop at the first rejection; escalate once
        when nobody decided in time."""
        from dr_orchestrator.evidence import incidents
        from dr_orchestrator.model.approval import Identity

        needed = self.settings.approval.approvers
        for incident_id, waiting in list(self.awaiting.items()):
            with writing(self.sessions) as session:
                answers = incidents.incident_answers(session, incident_id)
                rejected = next(((actor, at) for kind, actor, at in answers if kind == "rejected"), None)
                counted: list[tuple[str, datetime]] = []
                people: set[str] = set()
                for kind, actor, at in answers:
                    identity = Identity.parse(actor)
                    if kind == "approved" and not identity.anonymous and not identity.people & people:
                        people |= identity.people
                        counted.append((actor, at))
                if rejected is not None:
                    incidents.record_incident_event(session, incident_id, "decided", rejected[1], WATCH_ACTOR, {
                        "policy": "approve", "outcome": "rejected", "by": rejected[0]})
                    del self.awaiting[incident_id]
                    continue
                if len(counted) >= needed:
                    incidents.record_incident_event(session, incident_id, "decided", counted[needed - 1][1],
                                                    WATCH_ACTOR, {"policy": "approve", "outcome": "approved",
                                                                  "approved_by": [a for a, _ in counted[:needed]]})
                    del self.awaiting[incident_id]
                    start = True
                else:
                    start = False
                    if not waiting.escalated and time.monotonic() >= waiting.escalate_at:
                        waiting.escalated = True
                        incidents.record_incident_event(session, incident_id, "updated", _now(), WATCH_ACTOR, {
                            "escalated_to": list(self.settings.approval.escalate),
                            "approved_so_far": [a for a, _ in counted], "approvers": needed})
            if start:
                self.last_automatic[waiting.target] = _now()
                self.start_run(incident_id, waiting.target, waiting.runbook, waiting.parameters,
                               waiting.impact_start, waiting.reason)

    def plan_for(self, runbook: str, parameters: Mapping[str, Any]) -> RunPlan:
        """The checked plan of ``runbook`` with ``parameters``, built once per version of its files: a
        decided run starts acting at once instead of loading and checking YAML first."""
        from dr_orchestrator.plans import build_plan

        versions = tuple(_mtime(path) for path in (runbook, self.inventory_path))
        key = (runbook, json.dumps(dict(parameters), sort_keys=True, default=str), versions)
        with self.lock:
            plan = self.plans.get(key)
        if plan is None:
            plan = build_plan(runbook, self.inventory_path, dict(parameters), started_by=WATCH_ACTOR,
                              trigger="automatic")
            with self.lock:
                self.plans[key] = plan
        return plan

    def warm_plans(self) -> None:
        """Build the plans of every runbook the policies map, for each site and service, ahead of need,
        and rehearse what deciding and starting each writes (rolled back): a decided run then starts
        acting within milliseconds, its statements compiled and its actions imported."""
        from dr_orchestrator.runs import execute as runs
        from dr_orchestrator.watch import policy

        targets = [Target("site", name) for name in self.inventory.sites] + \
            [Target("service", name) for name in self.inventory.services]
        for target in targets:
            try:
                decision = policy.decide(self.settings, self.inventory, target, now=_now(),
                                         inventory_dir=Path(self.inventory_path).parent)
                if decision.runbook is None:
                    continue
                plan = self.plan_for(decision.runbook, decision.parameters)
                runs.prepare(plan)
            except Exception as exc:  # noqa: BLE001 - a plan that cannot be built is built (and fails) when needed
                log.warning("no plan ready for %s: %s", target, exc)
                continue
            now = _now()

            def open_incident(session: Session, down: Transition = Transition(target, "down", now, now, (), ())) -> str:
                return self.record_decision(session, down)[0]

            try:
                runs.rehearse(self.sessions, plan, open_incident)
            except Exception:  # noqa: BLE001 - an optimisation: the run then compiles as it goes
                log.warning("rehearsing the start of %s's runbook failed", target, exc_info=True)

    def keep_connections_open(self, stop: threading.Event) -> None:
        """Reopen the warm path's connections that died, until ``stop``; says once when a host stops
        or starts answering (the probes, not this, decide whether a site is down)."""
        assert self.kept is not None
        unreachable: dict[str, str] = {}
        while not stop.is_set():
            try:
                failed = self.kept.refresh(self.inventory)
            except Exception:  # noqa: BLE001 - the warm path is an optimisation: a run connects itself
                log.exception("keeping SSH connections open failed")
                failed = unreachable
            for host in failed.keys() - unreachable.keys():
                log.info("warm path: no SSH connection to %s: %s", host, failed[host])
            for host in unreachable.keys() - failed.keys():
                log.info("warm path: SSH connection to %s open", host)
            unreachable = failed
            if self.fallback is not None:
                self.refresh_automation()
            stop.wait(KEEP_OPEN_EVERY_S)

    def refresh_automation(self) -> None:
        """A cluster node reads the automation switch now and then, off the round: it decides with the
        switch as last read while the evidence database is away."""
        from dr_orchestrator.watch import automation

        try:
            with self.sessions() as session:
                self.automation_known = automation.automation_state(session, self.settings.automation)
        except SQLAlchemyError as exc:
            log.debug("automation switch not read: %s", exc)

    def start_run(self, incident_id: str, target: Target, runbook: str, parameters: Mapping[str, Any],
                  impact_start: datetime, reason: str) -> None:
        targets = {target}
        if target.kind == "site":
            targets |= {Target("service", name) for name in self.served_by(target)}
            if self.kept is not None:  # a kept connection to a lost site can break under the fencing command
                self.kept.forget(self.inventory.site_hosts(target.name))
        holder: dict[str, str] = {}
        ready = threading.Event()

        def run() -> None:
            self.execute(self, incident_id, runbook, dict(parameters), impact_start, reason, holder, ready)

        thread = threading.Thread(target=run, name=f"watch-run-{target.name}", daemon=False)
        thread.start()
        ready.wait(5.0)
        self.active.append(ActiveRun(incident_id, holder.get("run_id", "?"), thread, targets))


def _execute_plan(watch: Watch, incident_id: str, runbook: str, parameters: dict[str, Any], impact_start: datetime,
                  reason: str, holder: dict[str, str], ready: threading.Event) -> None:
    """Take the ready plan, run it through the one run composition, record its end on the incident."""
    import uuid

    from dr_orchestrator.evidence import incidents
    from dr_orchestrator.runs import execute as runs

    run_id = str(uuid.uuid4())
    holder["run_id"] = run_id
    try:
        plan = watch.plan_for(runbook, parameters).model_copy(
            update={"incident_id": incident_id, "incident_at": impact_start, "reason": reason})
    except Exception as exc:  # noqa: BLE001 - recorded on the incident; the watch goes on
        ready.set()
        watch.record_incident_event(incident_id, "updated", _now(),
                                    {"error": f"the runbook {runbook} could not be planned: {exc}"})
        return
    try:
        fence = watch.leader.fence_check() if watch.leader is not None else None
    except Exception as exc:  # noqa: BLE001 - deposed between the decision and the start: nothing ran
        ready.set()
        watch.record_incident_event(incident_id, "updated", _now(), {"error": f"{runbook} not started: {exc}"})
        return  # the node that leads now decides the outage itself
    ready.set()  # the run records `executing` on its incident itself, with its start (evidence.incidents)
    restoration = _Restoration(watch, incident_id, run_id, plan.services_in_scope())
    outcome = runs.execute(watch.sessions, plan, run_id=run_id, kept=watch.kept, observers=[restoration],
                           fence=fence, fallback=watch.fallback, host=watch.host)
    restoration.settled()
    ended = {"run_id": run_id, "run_state": str(outcome.state), "error": outcome.error}
    if incident_id in watch.journaled_incidents:  # the run's evidence may be in the journal too
        if not (outcome.state == "succeeded" and restoration.recorded):
            watch.record_incident_event(incident_id, "updated", _now(), ended)
        return
    with writing(watch.sessions) as session:
        restored_at = incidents.restored_at(session, run_id) if outcome.state == "succeeded" else None
        if restored_at is not None and not restoration.recorded:  # else told when its last service was verified
            incidents.record_incident_event(session, incident_id, "restored", restored_at, WATCH_ACTOR,
                                            {"run_id": run_id})
        if restored_at is None:
            incidents.record_incident_event(session, incident_id, "updated", _now(), WATCH_ACTOR, ended)


class _Restoration:
    """Observer of a decided run: the incident is restored the moment every service it covers is
    verified at the recovery site (``service_restored``), not when the run ends (a convergence play
    or the blast-radius reading may go on for seconds, and /status and the notifications would lag)."""

    def __init__(self, watch: Watch, incident_id: str, run_id: str, services: list[str]) -> None:
        self.watch, self.incident_id, self.run_id = watch, incident_id, run_id
        self.waiting = set(services)
        self.moments: list[datetime] = []
        self.recorded = False
        self.recording: threading.Thread | None = None

    def __call__(self, event: Event) -> None:
        if not isinstance(event, MarkerReached) or event.marker != RESTORED_MARKER or not self.waiting:
            return
        self.waiting -= {event.service} if event.service else set(self.waiting)
        self.moments.append(event.at)
        if not self.waiting:  # under the engine's emit lock: the evidence is written beside the run
            self.recording = threading.Thread(target=self.record, args=(max(self.moments),),
                                              name=f"restored-{self.incident_id}", daemon=True)
            self.recording.start()

    def record(self, at: datetime) -> None:

        try:
            self.watch.record_incident_event(self.incident_id, "restored", at, {"run_id": self.run_id})
            self.recorded = True
        except Exception:  # noqa: BLE001 - recorded again from the run's evidence when it ends
            log.exception("incident %s: its restoration was not recorded early", self.incident_id,
                          extra={"incident_id": self.incident_id, "run_id": self.run_id})

    def settled(self) -> None:
        if self.recording is not None:
            self.recording.join()


def _with_incident(data: dict[str, Any], incident_id: str) -> dict[str, Any]:
    """The decision's data, the approval command naming its incident."""
    if "how" in data:
        return {**data, "how": data["how"].replace("{incident}", incident_id)}
    return data


def _mtime(path: str) -> float:
    try:
        return os.stat(path).st_mtime
    except OSError:
        return 0.0


def _site_in(detail: str) -> str | None:
    """The serving site a front-door observation names ("... site=backup ...")."""
    for part in detail.split():
        if part.startswith("site="):
            return part[5:]
    return None


def _now() -> datetime:
    return datetime.now(UTC)
