"""/metrics through ``prometheus_client``: one custom collector that reads the evidence database at
each scrape (no metric state kept in the process, no global registry: each app has a registry of
its own). Names and units follow Prometheus' conventions: base units (seconds), ``_seconds``,
``_timestamp_seconds`` for Unix times, ``_info`` for the build. The list is in docs/api.md, the
alerting rules on them in deploy/prometheus/dr-rules.yml.

What counts as a service's test is ``evidence.qualifying``'s rule (the quarterly report's): failbacks
never give a service's RTO or RPO; theirs are ``dr_service_failback_*``. The audit chain is walked at
most every ``chain_every_s`` per app (a walk reads every evidence row), its result kept in between.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any, cast

from sqlalchemy import func, select
from sqlalchemy.orm import Session, sessionmaker

from dr_orchestrator.api import views
from dr_orchestrator.evidence import qualifying
from dr_orchestrator.evidence.annotations import SEVERITIES, overdue_findings
from dr_orchestrator.evidence.approvals import waiting_gates
from dr_orchestrator.evidence.models import Incident
from dr_orchestrator.evidence.reports import quarter_of
from dr_orchestrator.model.events import utcnow

if TYPE_CHECKING:
    from prometheus_client.metrics_core import Metric
    from prometheus_client.registry import Collector, CollectorRegistry

CHAIN_EVERY_S = 300.0  # a walk reads every evidence row: ~0.2 ms per chain entry measured (2,116 in 0.42 s)


def _timestamp(moment: datetime) -> float:
    """Unix seconds; SQLite gives naive datetimes back, and the evidence stores UTC."""
    return (moment.replace(tzinfo=UTC) if moment.tzinfo is None else moment).timestamp()


@dataclass
class ChainState:
    ok: bool
    problems: int
    entries: int
    verified_at: float  # Unix seconds


class ChainCheck:
    """The audit chain's verification, walked again when the last walk is older than ``every_s``."""

    def __init__(self, every_s: float = CHAIN_EVERY_S, clock: Callable[[], float] = time.monotonic) -> None:
        self.every_s = every_s
        self.clock = clock
        self.lock = threading.Lock()
        self.state: ChainState | None = None
        self.walked_at = 0.0

    def of(self, session: Session) -> ChainState:
        from dr_orchestrator.evidence.chain import verify_session

        with self.lock:  # concurrent scrapes wait for one walk instead of walking twice
            if self.state is None or self.clock() - self.walked_at >= self.every_s:
                report = verify_session(session)
                self.state = ChainState(report.ok, len(report.problems), report.entries, time.time())
                self.walked_at = self.clock()
            return self.state


def families(session: Session, drills: dict[str, Any], chain: ChainCheck) -> Iterator[Metric]:
    """Every metric family of /metrics; ``drills`` is what ``scheduling.service.schedules`` returns."""
    from prometheus_client.core import GaugeMetricFamily, InfoMetricFamily

    from dr_orchestrator import __version__
    from dr_orchestrator.scheduling.leader import leader_present
    from dr_orchestrator.watch.warnings import UNTESTED_AFTER, recorded_warnings

    def gauge(name: str, help_text: str, labels: list[str],
              samples: Iterable[tuple[list[str], float]]) -> GaugeMetricFamily:
        family = GaugeMetricFamily(name, help_text, labels=labels)
        for values, value in samples:
            family.add_metric(values, float(value))
        return family

    yield InfoMetricFamily("dr_orchestrator_build", "The dr-orchestrator version serving /metrics.",
                           value={"version": __version__})

    # --- services: RTO/RPO of their tests (qualifying's rule: no failbacks), targets, standing ----------
    targets = views.current_targets(session)
    services = sorted(targets)
    every_test = qualifying.period(session)
    for kind in ("rto", "rpo"):
        upper = kind.upper()
        last = {s: results[-1] for s, results in qualifying.measured(every_test, kind).items()}
        yield gauge(f"dr_service_{kind}_seconds",
                    f"{upper} achieved by the latest test of each service (failbacks excluded), seconds.",
                    ["service"], (([s], getattr(r, f"{kind}_s")) for s, r in sorted(last.items())))
        yield gauge(f"dr_service_{kind}_target_seconds",
                    f"{upper} target per service in the inventory of its newest run, seconds.",
                    ["service"], (([s], t[f"{kind}_s"]) for s, t in sorted(targets.items())
                                  if t.get(f"{kind}_s") is not None))
        yield gauge(f"dr_service_{kind}_measured_timestamp_seconds",
                    f"Incident time of the test the last {upper} comes from, Unix seconds.",
                    ["service"], (([s], _timestamp(r.incident_at)) for s, r in sorted(last.items())))
        failed_back = _failback_results(every_test, kind)
        yield gauge(f"dr_service_failback_{kind}_seconds",
                    f"{upper} achieved by the latest failback of each service (back to its normal site), seconds.",
                    ["service"], (([s], getattr(r, f"{kind}_s")) for s, r in sorted(failed_back.items())))
    latest = qualifying.standings(every_test, services)
    yield gauge("dr_service_last_test_timestamp_seconds",
                "When the latest test of each service started (drills once, failbacks and runs that changed "
                "nothing not counted), Unix seconds; absent when it never had one.",
                ["service"], (([s], _timestamp(st.latest.started_at)) for s, st in latest.items() if st.latest))
    yield gauge("dr_service_last_test_targets_met",
                "1 when the latest test of each service met both its RTO and RPO targets, else 0 (an RPO not "
                "measured is not met); absent when it never had a test.",
                ["service"], (([s], 1.0 if st.all_targets_met else 0.0) for s, st in latest.items() if st.latest))
    yield gauge("dr_service_required_test_interval_seconds",
                "Longest time a service may go without a test (the watch's drill-overdue rule), seconds.",
                ["service"], (([s], UNTESTED_AFTER.total_seconds()) for s in services))
    this_quarter = quarter_of(utcnow())
    standings = qualifying.standings(qualifying.period(session, this_quarter.start, this_quarter.end), services)
    yield gauge("dr_service_targets_met", "1 when the service's latest test this quarter met both its RTO and RPO "
                "targets, else 0 (also when it has no test this quarter).",
                ["service"], (([s], 1.0 if st.all_targets_met else 0.0) for s, st in standings.items()))
    yield gauge("dr_service_tests", "Tests of each service this quarter (drills once; failbacks and runs that "
                "changed nothing not counted).", ["service"], (([s], st.tests) for s, st in standings.items()))

    # --- drills and their schedules ----------------------------------------------------------------------
    judged = sorted(views.last_drill_verdicts(session).items())
    yield gauge("dr_drill_last_verdict", "Last verdict per drill: 1 passed, 0 failed.",
                ["drill"], (([name], 1.0 if record.verdict == "passed" else 0.0) for name, record in judged))
    yield gauge("dr_drill_last_run_timestamp_seconds", "When the last judged run of each drill started, Unix seconds.",
                ["drill"], (([name], _timestamp(record.started_at)) for name, record in judged))
    scheduled = [(entry["name"], datetime.fromisoformat(entry["next"][0]["utc"]))
                 for entry in drills["drills"] if entry["next"]]
    yield gauge("dr_drill_next_fire_timestamp_seconds", "Next fire time per drill schedule, Unix seconds.",
                ["drill"], (([name], _timestamp(at)) for name, at in scheduled))
    yield gauge("dr_drill_files_invalid", "Drill files that do not load (they never fire).",
                [], [([], len({p["file"] for p in drills["problems"]}))])
    leads = leader_present(session.connection())
    if leads is not None:
        yield gauge("dr_scheduler_leader", "1 when a scheduler (`dr scheduler run`) holds the leader lock of this "
                    "evidence database, else 0 (scheduled drills do not fire).", [], [([], 1.0 if leads else 0.0)])

    # --- runs, approvals, findings, incidents, the watch's warnings ---------------------------------------
    yield gauge("dr_runs", "Runs in the evidence database by state.",
                ["state"], (([state], count) for state, count in sorted(views.runs_by_state(session).items())))
    yield gauge("dr_pending_approvals", "Approval steps waiting for a decision.",
                [], [([], len(waiting_gates(session)))])
    overdue = overdue_findings(session)
    yield gauge("dr_findings_overdue", "Open findings past their due date, by severity.",
                ["severity"], (([severity], sum(1 for f in overdue if f["severity"] == severity))
                               for severity in SEVERITIES))
    level = func.coalesce(Incident.level, "")
    open_incidents = session.execute(
        select(level, func.count()).where(Incident.state.is_not(None), Incident.state != "closed").group_by(level))
    yield gauge("dr_incidents_open", "Incidents not closed yet, by the inventory's severity level "
                "(\"\" when none was classified).", ["level"],
                (([name], count) for name, count in sorted(open_incidents)))
    yield gauge("dr_watch_warning", "Early warnings the watch raised and has not cleared, 1 each (kind, target, "
                "severity; the message is on the dashboard and in `dr watch warnings`).",
                ["kind", "target", "severity"],
                (([w.kind, w.target, w.severity], 1.0) for w in recorded_warnings(session)))

    # --- the audit chain ------------------------------------------------------------------------------
    state = chain.of(session)
    yield gauge("dr_evidence_chain_valid", "1 when the last walk of the audit chain found every evidence record "
                "as chained, else 0 (`dr evidence verify` names the problems).", [], [([], 1.0 if state.ok else 0.0)])
    yield gauge("dr_evidence_chain_problems", "Problems the last walk of the audit chain found.",
                [], [([], state.problems)])
    yield gauge("dr_evidence_chain_entries", "Entries in the audit chain at its last walk.", [], [([], state.entries)])
    yield gauge("dr_evidence_chain_verified_timestamp_seconds", "When the audit chain was last walked, Unix seconds.",
                [], [([], state.verified_at)])


def _failback_results(found: qualifying.Period, kind: str) -> dict[str, Any]:
    """Per service, the result of its latest failback with a measured ``rto`` or ``rpo``."""
    latest: dict[str, Any] = {}
    for failback in found.failbacks:  # oldest first
        for service, result in failback.results.items():
            if getattr(result, f"{kind}_s") is not None:
                latest[service] = result
    return latest


class EvidenceCollector:
    """A ``prometheus_client`` collector over the evidence database (see ``families``)."""

    def __init__(self, sessions: sessionmaker[Session] | Callable[[], Session], drills_dir: str | None,
                 chain: ChainCheck | None = None) -> None:
        self.sessions = sessions
        self.drills_dir = drills_dir
        self.chain = chain or ChainCheck()

    def collect(self) -> Iterator[Metric]:
        listing = drill_schedules(self.drills_dir) if self.drills_dir else {"drills": [], "problems": []}
        with self.sessions() as session:
            yield from list(families(session, listing, self.chain))

    def describe(self) -> list[Metric]:
        return []  # registering it must not read the database


class Exporter:
    """One app's registry, made at its first scrape (``prometheus_client`` is imported only then)."""

    def __init__(self, sessions: sessionmaker[Session], drills_dir: str | None,
                 chain_every_s: float = CHAIN_EVERY_S) -> None:
        self.sessions = sessions
        self.drills_dir = drills_dir
        self.chain_every_s = chain_every_s
        self.lock = threading.Lock()
        self._registry: CollectorRegistry | None = None

    @property
    def registry(self) -> CollectorRegistry:
        from prometheus_client.registry import CollectorRegistry

        with self.lock:
            if self._registry is None:
                registry = CollectorRegistry(auto_describe=False)
                collector = EvidenceCollector(self.sessions, self.drills_dir, ChainCheck(self.chain_every_s))
                registry.register(cast("Collector", collector))
                self._registry = registry
            return self._registry

    def exposition(self, accept: str | None) -> tuple[bytes, str]:
        """The body and its content type for a scrape's ``Accept`` header (text 0.0.4, or OpenMetrics)."""
        from prometheus_client.exposition import choose_encoder

        encoder, content_type = choose_encoder(accept or "")
        return encoder(self.registry), content_type


def render(session: Session, drills: dict[str, Any]) -> str:
    """The text exposition over one open session (reports and tests; the API uses ``Exporter``)."""
    from prometheus_client.exposition import generate_latest
    from prometheus_client.registry import CollectorRegistry

    class Once:
        def collect(self) -> Iterator[Metric]:
            return families(session, drills, ChainCheck(0.0))

    registry = CollectorRegistry(auto_describe=False)
    registry.register(cast("Collector", Once()))
    return generate_latest(registry).decode()


def drill_schedules(drills_dir: str) -> dict[str, Any]:
    """Schedules of ``drills_dir``, or none when the directory does not exist (an API without drills)."""
    from dr_orchestrator.scheduling.service import schedules

    if not Path(drills_dir).is_dir():
        return {"drills": [], "problems": []}
    return schedules(drills_dir, count=3)
