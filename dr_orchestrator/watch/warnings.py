"""Early warnings: what would make a failover now go wrong, found before anything fails.

Each is an ``EarlyWarning(kind, target, severity, message, since, data)`` with a one-sentence message
("a failover now would miss trading's RPO target: its standby backup is 7.2 s behind (target 0 s)").
Kinds:

- ``rpo-at-risk``: a standby's flush lag (a Redis replica: the time since its last acknowledgement)
  above its service's RPO target, or an RPO-0 service whose standby is not synchronous;
- ``standby-not-streaming``: a standby or replica that does not answer, is not linked to its primary,
  or is a primary itself;
- ``site-unreachable``: a site serving nothing (a recovery site) where every probe fails;
- ``certificate-expiry``: the TLS certificate of an https health URL of the inventory expires within
  30 days (or has); ``host-key-unknown``: a host missing from the known_hosts file the inventory names
  for it (SSH host keys do not expire, but an SSH step refuses a host it does not know);
- ``drill-overdue``: a scheduled drill of this inventory whose newest finished run is older than its
  schedule's period plus a tenth of it (at least a day), or a service with no DR test in 92 days.

``active_warnings`` is a pure function of the probe readings (``observers.Readings``, which the watch
already holds) and ``Facts`` (certificates, known_hosts, drills and tests from the evidence), so it is
unit-testable with synthetic ones. ``EarlyWarnings`` is what the resident watch keeps: it evaluates off
the round, in a thread of its own, records each new and each cleared warning as an audit event
(``watch.warning``; ``recorded_warnings`` reads the active ones back for /metrics and the dashboard),
and tells ``notify``.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field, replace
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

from sqlalchemy import func, select
from sqlalchemy.orm import Session, sessionmaker

from dr_orchestrator.evidence.liveness import writing
from dr_orchestrator.model.inventory import Inventory
from dr_orchestrator.watch.observers import Probed, Readings, StoreState, serving_site

log = logging.getLogger(__name__)

AUDIT_ACTION = "watch.warning"
CRITICAL, WARNING = "critical", "warning"  # critical: a failover now would fail or lose data
CERTIFICATE_WARNING = timedelta(days=30)
UNTESTED_AFTER = timedelta(days=92)
MIN_DRILL_GRACE = timedelta(days=1)
SYNCHRONOUS = ("sync", "quorum")
EVERY_ROUNDS = 10  # the resident watch evaluates every this many rounds
FACTS_EVERY_S = 300.0  # certificates, known_hosts and the evidence are read again after this long
# Evaluations in a row a warning must hold before it is raised (a probe timing out once is not a warning),
# and be absent before it is cleared (a lag around its target does not flap).
RAISE_AFTER, CLEAR_AFTER = 2, 3


@dataclass(frozen=True)
class EarlyWarning:
    kind: str
    target: str  # "service:trading", "site:backup", "host:primary-db", "drill:quarterly-site-failover"
    severity: str  # critical | warning
    message: str
    since: datetime
    data: Mapping[str, Any] = field(default_factory=dict)

    @property
    def key(self) -> tuple[str, str]:
        return self.kind, self.target

    def as_dict(self) -> dict[str, Any]:
        return {"kind": self.kind, "target": self.target, "severity": self.severity, "message": self.message,
                "since": self.since.isoformat(), "data": dict(self.data)}

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> EarlyWarning:
        return cls(str(data["kind"]), str(data["target"]), str(data["severity"]), str(data["message"]),
                   datetime.fromisoformat(str(data["since"])), dict(data.get("data") or {}))


@dataclass(frozen=True)
class Certificate:
    url: str
    service: str
    not_after: datetime


@dataclass(frozen=True)
class UnknownHost:
    host: str
    address: str
    known_hosts: str
    why: str  # one clause: "it is not in known_hosts file F"


@dataclass(frozen=True)
class DrillSchedule:
    name: str
    period: timedelta
    last_finished: datetime | None


@dataclass
class Facts:
    """What the warnings need besides the probe readings (gathered by ``gather_facts``)."""

    certificates: list[Certificate] = field(default_factory=list)
    unknown_hosts: list[UnknownHost] = field(default_factory=list)
    drills: list[DrillSchedule] = field(default_factory=list)
    tested: dict[str, datetime | None] | None = None  # service -> its newest test in UNTESTED_AFTER; None: unknown


# --- the warnings, from readings and facts ------------------------------------------------------------


def active_warnings(inventory: Inventory, readings: Readings | None, facts: Facts, now: datetime) -> list[EarlyWarning]:
    """Every warning that holds now, most severe first."""
    found: list[EarlyWarning] = []
    if readings is not None:
        unreachable = unreachable_sites(inventory, readings, now)
        found += unreachable
        found += replication_warnings(inventory, readings, {w.target.partition(":")[2] for w in unreachable}, now)
    found += certificate_warnings(facts.certificates, now)
    found += [EarlyWarning("host-key-unknown", f"host:{unknown.host}", CRITICAL,
                           f"an SSH step on host {unknown.host} ({unknown.address}) would refuse to connect: "
                           f"{unknown.why}", now,
                           {"known_hosts": unknown.known_hosts, "address": unknown.address})
              for unknown in facts.unknown_hosts]
    found += drill_warnings(inventory, facts, now)
    return sorted(found, key=lambda w: (w.severity != CRITICAL, w.kind, w.target))


def unreachable_sites(inventory: Inventory, readings: Readings, now: datetime) -> list[EarlyWarning]:
    """Sites serving no service where every probe (services and stores) fails."""
    serving = {serving_site(service, readings) for service in inventory.services.values()}
    found = []
    for site in inventory.sites:
        probes: list[Probed[Any]] = [p for (_, at), p in readings.direct.items() if at == site]
        probes += [p for (_, at), p in readings.stores.items() if at == site]
        if site in serving or not probes or any(p.value is not None for p in probes):
            continue
        errors = sorted({p.error or "no answer" for p in probes})
        found.append(EarlyWarning("site-unreachable", f"site:{site}", CRITICAL,
                                  f"a failover to {site} now would fail: every probe of the site fails "
                                  f"({'; '.join(errors)})", min(p.at for p in probes), {"errors": errors}))
    return found


def replication_warnings(inventory: Inventory, readings: Readings, unreachable: set[str],
                         now: datetime) -> list[EarlyWarning]:
    found = []
    for name, service in inventory.services.items():
        stores = {site: probed for (store, site), probed in readings.stores.items() if store == name}
        primaries = [site for site, probed in stores.items()
                     if probed.value is not None and probed.value.role == "primary"]
        if not primaries:
            continue  # no primary: an outage, the incidents' business
        serving = serving_site(service, readings)
        primary = serving if serving in primaries else primaries[0]
        target = f"service:{name}"
        for site, probed in sorted(stores.items()):
            if site == primary or site in unreachable:
                continue
            state = probed.value
            why = _not_following(state, probed.error, primary)
            if why is not None:
                found.append(EarlyWarning(
                    "standby-not-streaming", target, CRITICAL,
                    f"a failover of {name} to {site} now would lose every write since replication stopped: "
                    f"its {state.kind if state else 'store'} there {why}", probed.at,
                    {"site": site, "state": state.describe() if state else None, "error": probed.error}))
        primary_state = stores[primary].value
        assert primary_state is not None  # a primary answered
        found += _rpo_warnings(name, service.rpo, primary_state, stores[primary].at)
    return found


def _not_following(state: StoreState | None, error: str | None, primary: str) -> str | None:
    """Why a store at a recovery site does not replicate from ``primary``; None when it does."""
    if state is None:
        return f"does not answer ({error or 'no answer'})"
    if state.role == "primary":
        return "is a primary too, not a standby"
    if not state.streaming:
        return f"is not streaming (link {state.link or 'none'})"
    if state.upstream not in (None, primary):
        return f"follows {state.upstream}, not {primary}"
    return None


def _rpo_warnings(name: str, rpo: float, primary: StoreState, at: datetime) -> list[EarlyWarning]:
    target = f"service:{name}"
    links = [link for link in primary.standbys if link.state is not None]
    if not links:
        return []
    if primary.kind == "database" and rpo == 0 and not any(link.sync_state in SYNCHRONOUS for link in links):
        states = ", ".join(f"{link.name} {link.sync_state}" for link in links)
        return [EarlyWarning("rpo-at-risk", target, CRITICAL,
                             f"a failover now could lose {name}'s acknowledged writes: its standby is not "
                             f"synchronous ({states}; target RPO 0 s)", at, {"standbys": states, "rpo_s": rpo})]
    found = []
    for link in links:
        if link.lag_s is None or link.lag_s <= rpo or (rpo == 0 and link.sync_state in SYNCHRONOUS):
            continue
        behind = f"replica {link.name} has not acknowledged for {link.lag_s:.1f} s" if primary.kind == "cache" \
            else f"standby {link.name} is {link.lag_s:.1f} s behind"
        found.append(EarlyWarning("rpo-at-risk", target, CRITICAL,
                                  f"a failover now would miss {name}'s RPO target: its {behind} (target {rpo:g} s)", at,
                                  {"standby": link.name, "lag_s": link.lag_s, "behind_bytes": link.behind_bytes,
                                   "rpo_s": rpo}))
    return found


def certificate_warnings(certificates: Sequence[Certificate], now: datetime) -> list[EarlyWarning]:
    found = []
    for certificate in certificates:
        left = certificate.not_after - now
        if left > CERTIFICATE_WARNING:
            continue
        when = f"expired on {certificate.not_after:%Y-%m-%d}" if left <= timedelta(0) else \
            f"expires in {left.days} days ({certificate.not_after:%Y-%m-%d})"
        found.append(EarlyWarning(
            "certificate-expiry", f"service:{certificate.service}", CRITICAL if left <= timedelta(0) else WARNING,
            f"the TLS certificate of {certificate.url} ({certificate.service}'s health URL) {when}",
            now, {"url": certificate.url, "not_after": certificate.not_after.isoformat()}))
    return found


def drill_warnings(inventory: Inventory, facts: Facts, now: datetime) -> list[EarlyWarning]:
    found = []
    for drill in facts.drills:
        if drill.last_finished is None:
            continue  # never run: the services' own rule below says it
        due = drill.last_finished + drill.period + max(drill.period / 10, MIN_DRILL_GRACE)
        if now > due:
            found.append(EarlyWarning(
                "drill-overdue", f"drill:{drill.name}", WARNING,
                f"drill {drill.name} is overdue: its newest finished run was on {drill.last_finished:%Y-%m-%d} "
                f"({(now - drill.last_finished).days} days ago) and its schedule runs it every "
                f"{_days(drill.period)}", due, {"last_finished": drill.last_finished.isoformat(),
                                                 "period_s": drill.period.total_seconds()}))
    for name in inventory.services if facts.tested is not None else ():
        assert facts.tested is not None
        if facts.tested.get(name) is None:
            found.append(EarlyWarning("drill-overdue", f"service:{name}", WARNING,
                                      f"{name} has had no DR test (drill or failover) in the last "
                                      f"{UNTESTED_AFTER.days} days", now, {"days": UNTESTED_AFTER.days}))
    return found


def _days(period: timedelta) -> str:
    return f"{period.days} days" if period >= timedelta(days=2) else f"{period.total_seconds() / 3600:g} hours"


# --- gathering the facts ----------------------------------------------------------------------------


def gather_facts(inventory: Inventory, inventory_path: str, session: Session | None, *, drills_dir: str | None,
                 now: datetime, timeout_s: float = 2.0) -> Facts:
    """Certificates (a TLS handshake per https health URL), known_hosts, and, with a session, the drills
    of this inventory in ``drills_dir`` and the tests of its services in the evidence."""
    facts = Facts(certificates=health_certificates(inventory, timeout_s), unknown_hosts=unknown_hosts(inventory))
    if session is not None:
        facts.drills = drill_schedules(session, drills_dir, inventory_path, now) if drills_dir else []
        facts.tested = tested_services(session, list(inventory.services), now)
    return facts


def health_certificates(inventory: Inventory, timeout_s: float) -> list[Certificate]:
    """The certificate of each https health URL (one per host and port); one that cannot be fetched is
    left out: the health probes say when a service does not answer."""
    seen: dict[tuple[str, int], str] = {}
    for name, service in inventory.services.items():
        urls = [service.health] if service.health else []
        urls += [str(url) for url in dict(service.vars.get("urls") or {}).values()]
        for url in urls:
            parts = urlsplit(str(url))
            if parts.scheme == "https" and parts.hostname:
                seen.setdefault((parts.hostname, parts.port or 443), f"{name} {url}")
    found = []
    for (host, port), owner in sorted(seen.items()):
        name, _, url = owner.partition(" ")
        not_after = certificate_expiry(host, port, timeout_s)
        if not_after is not None:
            found.append(Certificate(url, name, not_after))
    return found


def certificate_expiry(host: str, port: int, timeout_s: float) -> datetime | None:
    """When the certificate ``host:port`` presents expires (unverified: an expired one is the point)."""
    import ssl

    from cryptography import x509

    try:
        pem = ssl.get_server_certificate((host, port), timeout=timeout_s)
    except (OSError, ssl.SSLError) as exc:
        log.info("no certificate from %s:%d: %s", host, port, exc)
        return None
    return x509.load_pem_x509_certificate(pem.encode()).not_valid_after_utc


def unknown_hosts(inventory: Inventory) -> list[UnknownHost]:
    """Hosts missing from the known_hosts file the inventory names for them (hosts naming none: not judged)."""
    import paramiko

    files: dict[str, paramiko.HostKeys | None] = {}
    found = []
    for host in sorted(inventory.hosts.values(), key=lambda h: h.name):
        if not host.known_hosts:
            continue
        if host.known_hosts not in files:
            try:
                files[host.known_hosts] = paramiko.HostKeys(host.known_hosts)
            except (OSError, paramiko.SSHException):
                files[host.known_hosts] = None
        keys = files[host.known_hosts]
        name = host.address if host.port == 22 else f"[{host.address}]:{host.port}"
        if keys is None:
            found.append(UnknownHost(host.name, name, host.known_hosts,
                                     f"its known_hosts file {host.known_hosts} does not exist or cannot be read"))
        elif keys.lookup(name) is None:
            found.append(UnknownHost(host.name, name, host.known_hosts,
                                     f"it is not in known_hosts file {host.known_hosts}"))
    return found


def drill_schedules(session: Session, drills_dir: str, inventory_path: str, now: datetime) -> list[DrillSchedule]:
    """The scheduled drills of ``drills_dir`` that use this inventory, with their newest finished run."""
    from dr_orchestrator.drills.load import load_drills
    from dr_orchestrator.evidence.models import DrillRun
    from dr_orchestrator.scheduling.triggers import next_fire_times

    if not Path(drills_dir).is_dir():
        return []
    drills, _ = load_drills(drills_dir)
    ours = Path(inventory_path).resolve()
    found = []
    for drill in sorted(drills, key=lambda d: d.name):
        if drill.schedule is None or Path(drill.inventory).resolve() != ours:
            continue
        fires = next_fire_times(drill.schedule, 2, now)
        if len(fires) < 2:
            continue
        last = session.scalar(select(func.max(DrillRun.finished_at)).where(
            DrillRun.drill_name == drill.name, DrillRun.state == "finished"))
        found.append(DrillSchedule(drill.name, fires[1] - fires[0], _aware(last)))
    return found


def tested_services(session: Session, services: list[str], now: datetime) -> dict[str, datetime | None]:
    """Each service's newest test (as the quarterly report counts them) within UNTESTED_AFTER."""
    from dr_orchestrator.evidence import qualifying

    period = qualifying.period(session, now - UNTESTED_AFTER, now)
    return {name: max((_aware(t.started_at) for t in period.tests_of(name)), default=None)  # type: ignore[type-var]
            for name in services}


def _aware(moment: datetime | None) -> datetime | None:
    """SQLite gives naive datetimes back; the evidence stores UTC."""
    return moment.replace(tzinfo=UTC) if moment is not None and moment.tzinfo is None else moment


# --- recorded: what /metrics and the dashboard show -------------------------------------------------


def recorded_warnings(session: Session) -> list[EarlyWarning]:
    """The warnings the watch raised and has not cleared (from its ``watch.warning`` audit events)."""
    from dr_orchestrator.evidence.models import AuditEvent

    active: dict[tuple[str, str], EarlyWarning] = {}
    for data in session.scalars(select(AuditEvent.data).where(AuditEvent.action == AUDIT_ACTION)
                                .order_by(AuditEvent.id)):
        warning = EarlyWarning.from_dict(data["warning"])
        if data.get("raised"):
            active[warning.key] = warning
        else:
            active.pop(warning.key, None)
    return sorted(active.values(), key=lambda w: (w.severity != CRITICAL, w.kind, w.target))


def record_changes(session: Session, actor: str, raised: Sequence[EarlyWarning],
                   cleared: Sequence[EarlyWarning]) -> None:
    """One audit event per new and per cleared warning (the caller commits)."""
    from dr_orchestrator.evidence.annotations import record_audit_event

    for warning, is_raised in [*((w, True) for w in raised), *((w, False) for w in cleared)]:
        record_audit_event(session, actor, AUDIT_ACTION, warning.target,
                           {"raised": is_raised, "warning": warning.as_dict()})


# --- the resident watch's early warnings ------------------------------------------------------------

Changed = Callable[[EarlyWarning, bool], None]  # a warning, and whether it is new (False: cleared)


class EarlyWarnings:
    """Call ``round(number, readings)`` each round: every ``EVERY_ROUNDS`` rounds, when the previous
    evaluation is done, it copies the readings and evaluates in a thread of its own (the round never
    waits); ``close()`` after.
    The facts (certificates, known_hosts, drills, tests) are gathered again every ``FACTS_EVERY_S``."""

    def __init__(self, inventory: Inventory, inventory_path: str, sessions: sessionmaker[Session], actor: str, *,
                 drills_dir: str | None = "failover_tests", changed: Changed | None = None) -> None:
        self.inventory = inventory
        self.inventory_path = inventory_path
        self.sessions = sessions
        self.actor = actor
        self.drills_dir = drills_dir
        self.changed = changed
        self.facts: Facts | None = None
        self.facts_at = 0.0
        self.active: dict[tuple[str, str], EarlyWarning] | None = None  # None: not read from the evidence yet
        self.absent: dict[tuple[str, str], int] = {}
        self.present: dict[tuple[str, str], int] = {}
        self.worker: threading.Thread | None = None

    def round(self, number: int, readings: Readings) -> None:
        """The watch's round ``number`` (from 1) is done: evaluate every EVERY_ROUNDS rounds, the first included."""
        if number % EVERY_ROUNDS == 1:
            self.offer(readings)

    def offer(self, readings: Readings) -> bool:
        """Start an evaluation of a copy of ``readings``; False while the previous one still runs."""
        if self.worker is not None and self.worker.is_alive():
            return False
        copied = Readings(dict(readings.front), dict(readings.direct), dict(readings.stores), dict(readings.servers))
        self.worker = threading.Thread(target=self._evaluate_logged, args=(copied,), name="watch-warnings",
                                       daemon=True)
        self.worker.start()
        return True

    def close(self, timeout: float = 10.0) -> None:
        if self.worker is not None:
            self.worker.join(timeout)

    def _evaluate_logged(self, readings: Readings) -> None:
        try:
            self.evaluate(readings)
        except Exception:  # noqa: BLE001 - the warnings must never take the watch down
            log.exception("early warnings failed")

    def evaluate(self, readings: Readings | None, now: datetime | None = None) -> tuple[list[EarlyWarning],
                                                                                      list[EarlyWarning]]:
        """Evaluate, record the changes and tell ``changed``; the new and the cleared warnings."""
        now = now or datetime.now(UTC)
        with self.sessions() as session:
            if self.facts is None or time.monotonic() - self.facts_at >= FACTS_EVERY_S:
                self.facts = gather_facts(self.inventory, self.inventory_path, session, drills_dir=self.drills_dir,
                                          now=now)
                self.facts_at = time.monotonic()
            if self.active is None:
                self.active = {w.key: w for w in recorded_warnings(session)}
        current = {w.key: w for w in active_warnings(self.inventory, readings, self.facts, now)}
        self.present = {key: self.present.get(key, 0) + 1 for key in current}
        raised = [w for key, w in current.items() if key not in self.active and self.present[key] >= RAISE_AFTER]
        cleared = []
        for key, warning in list(self.active.items()):
            if key in current:
                self.absent.pop(key, None)
                self.active[key] = replace(current[key], since=warning.since)  # first seen
                continue
            self.absent[key] = self.absent.get(key, 0) + 1
            if self.absent[key] >= CLEAR_AFTER:
                cleared.append(warning)
                del self.active[key], self.absent[key]
        self.active.update((w.key, w) for w in raised)
        if raised or cleared:
            with writing(self.sessions) as session:
                record_changes(session, self.actor, raised, cleared)
            for warning in raised:
                log.warning("early warning: %s", warning.message)
            if self.changed is not None:
                for warning, is_raised in [*((w, True) for w in raised), *((w, False) for w in cleared)]:
                    self.changed(warning, is_raised)
        return raised, cleared
