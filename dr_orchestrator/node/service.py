"""A cluster node (`dr node run`): one per site and one at the witness; one of them leads.

Every node campaigns for leadership on etcd (``cluster.leadership``) and runs the watch, so every node
observes the services and sites and agrees on what is down. Only the leader decides and acts: a
follower's watch keeps what it found down undecided, and decides it the moment it leads while the
outage lasts (its impact start is its own first failed observation). Every run of the leader is fenced
(each changing step first proves in an etcd transaction that the term is still current) and keeps its
evidence in the node's local journal while the evidence database is away. Beside the watch the node
hosts the HTTP API and the drill scheduler (``node.hosting``), under the same rule: only the leader acts.

Takeover. While it leads, a node looks every ``TAKEOVER_EVERY_S`` for runs of the cluster's nodes that
no process runs any more: runs still live whose process is gone (the same sweep as every `dr` command:
a dead pid on this node, or no heartbeat for three beats from another) are marked interrupted, and
every interrupted run of a node, interrupted within ``TAKEOVER_WINDOW``, is resumed under the new
term by the existing resume rules: completed steps are kept, and a step that was in flight is repeated
only when idempotent. A run that needs an engineer's decision (a non-idempotent step in flight) is
left interrupted, and the refusal is recorded. Until the takeover has settled (no live run of
another node left), the watch of a new leader does not decide: a failover half done by the old leader
is finished by resuming it, never by starting another one over it. When the evidence database is
away at that moment (it was at the lost site, and its own failover takes tens of seconds), the outage
comes first: the node leads without seeing the old leader's runs, and those it finds later are left to
an engineer (the refusal recorded), never resumed over what it did meanwhile.
"""

from __future__ import annotations

import logging
import math
import threading
from collections.abc import Callable
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

from sqlalchemy import select
from sqlalchemy.orm import Session, sessionmaker

from dr_orchestrator.cluster.journal import EvidenceJournal, JournalFallback
from dr_orchestrator.cluster.leadership import Leadership
from dr_orchestrator.cluster.members import LeaderAddress, leader_address, read_members, register_member
from dr_orchestrator.evidence.annotations import record_audit_event
from dr_orchestrator.evidence.liveness import LIVE_RUN_STATES, sweep_interrupted, writing
from dr_orchestrator.evidence.models import Run
from dr_orchestrator.evidence.store import database_unreachable
from dr_orchestrator.model.cluster import NodeConfig
from dr_orchestrator.model.events import utcnow
from dr_orchestrator.model.run import RunState
from dr_orchestrator.node.readiness import notify_ready

log = logging.getLogger(__name__)

TAKEOVER_EVERY_S = 1.0
TAKEOVER_WINDOW = timedelta(hours=1)  # older interrupted runs wait for an engineer's `dr resume`
TAKEOVER_ACTION = "cluster.takeover"
TAKEOVER_REFUSED_ACTION = "cluster.takeover_refused"


def node_actor(node: str) -> str:
    return f"dr node {node}"


def resolve_path(path: str, config_path: Path) -> str:
    """A path of the node's configuration: relative ones are relative to the configuration file."""
    candidate = Path(path)
    return str(candidate if candidate.is_absolute() else config_path.parent / candidate)


class Node:
    """``run(stop)`` until ``stop`` is set. ``watch_factory(node)`` builds the watch (tests); ``api_factory``
    and ``scheduler_factory`` what else the node hosts, each run in a thread of its own (`dr node run`:
    ``node.hosting``'s API server and drill scheduler; none without them)."""

    def __init__(self, config: NodeConfig, config_path: Path, sessions: sessionmaker[Session], *,
                 watch_factory: Callable[[Node], Any] | None = None,
                 api_factory: Callable[[Node], Any] | None = None,
                 scheduler_factory: Callable[[Node], Any] | None = None) -> None:
        self.config = config
        self.config_path = config_path
        self.name = config.node
        self.actor = node_actor(config.node)
        self.sessions = sessions
        self.inventory_path = self.path_of(config.inventory) if config.inventory else None
        self.journal = EvidenceJournal(resolve_path(config.journal, config_path), node=config.node)
        self.fallback = JournalFallback(self.journal, sessions, node=config.node)
        self.leadership = Leadership(config.etcd, config.node, math.ceil(config.lease_ttl), config.leader_key)
        self.watch_factory = watch_factory or _default_watch
        self.settled_term: int | None = None  # the fencing revision whose takeover has settled
        self.term_seen: int | None = None
        self.blind_since: datetime | None = None  # this term settled without the database: from then on
        self.attempted: set[str] = set()  # runs whose takeover this term tried
        self.resuming: dict[str, threading.Thread] = {}
        self._members: set[str] = {config.node}
        self._wake = threading.Event()
        self.scheduler = scheduler_factory(self) if scheduler_factory else None
        self.api = api_factory(self) if api_factory else None  # bound last: nothing left open when the rest failed

    def path_of(self, path: str) -> str:
        return resolve_path(path, self.config_path)

    @property
    def host(self) -> str:
        """The host name the node's runs record: its node name."""
        return self.name

    # -- what the watch sees: leading, and the takeover of this term settled ---------------------------

    def is_leader(self) -> bool:
        term = self.leadership.term()
        return term is not None and self.settled_term == term.token.revision

    def fence_check(self) -> Callable[[], object]:
        return self.leadership.fence_check()

    def leader_api(self) -> LeaderAddress:
        """Where the leader serves the API (from etcd); NoLeader when none is known."""
        return leader_address(self.leadership.gateway, self.config.leader_key)

    # -- the service -------------------------------------------------------------------------------------

    def run(self, stop: threading.Event) -> None:
        self.leadership.on_elected(lambda token: self._wake.set())
        self.leadership.on_lost(lambda token, reason: log.warning(
            "node %s no longer leads (term %s: %s): it stops acting", self.name, token, reason))
        self.leadership.start()
        takeover = threading.Thread(target=self.take_over_while_leading, args=(stop,), name="node-takeover",
                                    daemon=True)
        takeover.start()
        hosted = [threading.Thread(target=resident.run, args=(stop,), name=name)
                  for name, resident in (("node-api", self.api), ("node-scheduler", self.scheduler))
                  if resident is not None]
        for thread in hosted:
            thread.start()
        try:
            watch = self.watch_factory(self)
            if watch is None:
                notify_ready()
                stop.wait()
            else:
                watch.run(stop, ready=notify_ready)
        finally:
            stop.set()
            self._wake.set()
            for thread in hosted:  # the API's runs and the scheduler's drills end first (their rollbacks run)
                thread.join()
            takeover.join(timeout=10)
            for thread in list(self.resuming.values()):
                thread.join()
            self.leadership.stop(resign=True)
            self.fallback.close()
            self.journal.close()

    def take_over_while_leading(self, stop: threading.Event) -> None:
        registered = False
        while not stop.is_set():
            if not registered:
                registered = self.register()
            term = self.leadership.term()
            if term is not None:
                revision = term.token.revision
                if revision != self.term_seen:  # a new term tries every interrupted run again
                    self.attempted.clear()
                    self.term_seen = revision
                    self.blind_since = None
                try:
                    if self.take_over_once() and self.leadership.term() is term:
                        if self.settled_term != revision:
                            log.info("node %s leads (fencing token %s); takeover settled", self.name, term.token)
                        self.settled_term = revision
                except Exception as exc:  # noqa: BLE001 - tried again next time
                    if not database_unreachable(exc):
                        log.exception("takeover failed; trying again")
                    elif self.settled_term != revision and self.leadership.term() is term:
                        # The outage comes first: decide without seeing the old leader's runs. Those found
                        # later are left to an engineer, never resumed over what this node did meanwhile.
                        self.blind_since = utcnow()
                        self.settled_term = revision
                        log.warning("takeover: evidence database unreachable (%s): leading without the old "
                                    "leader's runs; runs found later are left to an engineer", exc)
            self._wake.wait(TAKEOVER_EVERY_S)
            self._wake.clear()

    def register(self) -> bool:
        try:
            register_member(self.leadership.gateway, self.config.leader_key, self.name,
                            {"site": self.config.site, "api": f"{self.config.api.host}:{self.config.api.port}"})
            return True
        except Exception as exc:  # noqa: BLE001 - etcd away: tried again next round
            log.warning("node %s could not register in etcd: %s", self.name, exc)
            return False

    def members(self) -> set[str]:
        try:
            self._members = set(read_members(self.leadership.gateway, self.config.leader_key)) | {self.name}
        except Exception as exc:  # noqa: BLE001 - the last list read stays right: members are never removed
            log.warning("node %s could not read the cluster's members: %s", self.name, exc)
        return self._members

    def take_over_once(self) -> bool:
        """Resume what the cluster's nodes left interrupted; True when no run of another node is left
        live (the takeover has settled and the watch may decide)."""
        from dr_orchestrator.runs.resume import ResumeRefused, ResumeRequest, prepare_resume

        members = self.members()
        sweep_interrupted(self.sessions, self.name)
        since = utcnow() - TAKEOVER_WINDOW
        with self.sessions() as session:
            rows = session.execute(
                select(Run.id, Run.orchestrator_host, Run.state, Run.started_at).where(
                    Run.orchestrator_host.in_(sorted(members)),
                    ((Run.state == RunState.INTERRUPTED.value) & (Run.finished_at >= since))
                    | Run.state.in_(LIVE_RUN_STATES))
                .order_by(Run.started_at)).all()
        live_elsewhere = [run_id for run_id, host, state, _ in rows
                          if state in LIVE_RUN_STATES and run_id not in self.resuming and host != self.name]
        for run_id, host, state, started_at in rows:
            if state != RunState.INTERRUPTED.value or run_id in self.attempted or run_id in self.resuming:
                continue
            self.attempted.add(run_id)
            request = ResumeRequest(run_id, self.actor, f"takeover: node {self.name} leads now; the run's node "
                                                        f"{host} left it interrupted")
            try:
                if self.blind_since is not None and _utc(started_at) < self.blind_since:
                    raise ResumeRefused(f"node {self.name} began leading while the evidence database was away and "
                                        f"may have acted on the same services meanwhile: check, then `dr resume "
                                        f"{run_id}` if it is still needed")
                the_id, plan, point = prepare_resume(self.sessions, request)
            except ResumeRefused as refused:
                log.error("takeover of run %s refused: %s", run_id, refused, extra={"run_id": run_id})
                with writing(self.sessions) as session:
                    record_audit_event(session, self.actor, TAKEOVER_REFUSED_ACTION, run_id,
                                       {"node": self.name, "from_node": host, "reason": str(refused)})
                continue
            fence = self.leadership.fence_check()
            with writing(self.sessions) as session:
                record_audit_event(session, self.actor, TAKEOVER_ACTION, run_id,
                                   {"node": self.name, "from_node": host, "fencing_token": str(fence.token)})
            log.warning("takeover: resuming run %s that node %s left interrupted", run_id, host,
                        extra={"run_id": run_id})
            thread = threading.Thread(target=self._resume, args=(the_id, plan, point, fence),
                                      name=f"takeover-{run_id[:8]}", daemon=False)
            self.resuming[run_id] = thread
            thread.start()
        return not live_elsewhere

    def _resume(self, run_id: str, plan: Any, point: Any, fence: Callable[[], object]) -> None:
        from dr_orchestrator.runs import execute as runs

        try:
            outcome = runs.execute(self.sessions, plan, run_id=run_id, resume=point, fence=fence,
                                   fallback=self.fallback, host=self.name)
            log.warning("takeover: run %s ended %s", run_id, outcome.state, extra={"run_id": run_id})
        except Exception:  # noqa: BLE001 - recorded by the run itself; the node goes on
            log.exception("takeover: resuming run %s failed", run_id, extra={"run_id": run_id})
        finally:
            self.resuming.pop(run_id, None)


def _utc(moment: datetime) -> datetime:
    return moment if moment.tzinfo else moment.replace(tzinfo=UTC)


def _default_watch(node: Node) -> Any:
    if node.inventory_path is None:
        return None
    from dr_orchestrator.watch.service import Watch

    return Watch(node.inventory_path, node.sessions, leader=node, fallback=node.fallback, host=node.name)
