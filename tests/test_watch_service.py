"""The watch service's decisions, driven by synthetic observations: what runs (and what does not) when
a site or a service goes down, and what the incident records. No lab: the runs are recorded, not made."""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy.orm import Session, sessionmaker
from support.watch import (
    LAB_INVENTORY,
    REPO,
    SERVICES,
    T0,
    Executed,
    Script,
    healthy_round,
    seen,
    site_lost_round,
    steps,
    trading_lost_round,
)

from dr_orchestrator.evidence.incidents import (
    IncidentError,
    answer_incident,
    incident_detail,
    incident_timeline,
    list_incidents,
)
from dr_orchestrator.watch import service as watch_service
from dr_orchestrator.watch.automation import switch_automation
from dr_orchestrator.watch.observations import Observation, Target
from dr_orchestrator.watch.service import Watch


@pytest.fixture
def watch_of(sqlite_sessions: sessionmaker[Session]) -> Iterator[Any]:
    def make(rounds: list[list[Observation]]) -> tuple[Watch, Executed]:
        executed = Executed()
        return Watch(LAB_INVENTORY, sqlite_sessions, probe=Script(rounds), execute=executed), executed
    yield make


def drive(watch: Watch, rounds: int) -> None:
    for _ in range(rounds):
        watch.round()
    for active in watch.active:
        active.thread.join(timeout=10)


def test_a_lost_site_runs_the_site_runbook_once_and_no_service_runbook(
        watch_of: Any, sqlite_sessions: sessionmaker[Session]) -> None:
    rounds = [healthy_round(t) for t in steps(0, 0.9)] + [site_lost_round(t) for t in steps(1.0, 2.0)]
    watch, executed = watch_of(rounds)
    drive(watch, len(rounds))
    assert [(c["runbook"], c["parameters"].get("from_site")) for c in executed.calls] == [
        ("site-failover.yml", "primary")]
    # the first failed observation is the impact start, and the run counts its RTO from it
    assert executed.calls[0]["impact_start"] == T0 + timedelta(seconds=1.0)
    with sqlite_sessions() as session:
        (incident,) = list_incidents(session)
        timeline = incident_timeline(session, incident["id"])
    assert timeline["impact_start"] == (T0 + timedelta(seconds=1.0)).isoformat()
    assert timeline["detected"] is not None and timeline["decided"] is not None


def test_a_lost_service_on_a_healthy_site_runs_its_own_runbook(watch_of: Any) -> None:
    rounds = [healthy_round(t) for t in steps(0, 0.5)] + [trading_lost_round(t) for t in steps(0.6, 1.6)]
    watch, executed = watch_of(rounds)
    drive(watch, len(rounds))
    assert [(c["runbook"], c["parameters"].get("from_site")) for c in executed.calls] == [
        ("failover-trading.yml", "primary")]


def test_one_observer_failing_alone_or_a_short_stall_runs_nothing(
        watch_of: Any, sqlite_sessions: sessionmaker[Session]) -> None:
    alone = [[*(o for o in healthy_round(t) if o.observer != "front-door"),
              *(seen("front-door", "service", s, s != "trading", t) for s in SERVICES)] for t in steps(0, 3.0)]
    stall = [site_lost_round(t) for t in steps(3.1, 3.3)] + [healthy_round(t) for t in steps(3.4, 4.0)]
    watch, executed = watch_of(alone + stall)
    drive(watch, len(alone) + len(stall))
    assert executed.calls == []
    with sqlite_sessions() as session:
        assert list_incidents(session) == []


def test_with_automation_switched_off_an_outage_is_recorded_and_nothing_runs(
        watch_of: Any, sqlite_sessions: sessionmaker[Session]) -> None:
    with sqlite_sessions() as session, session.begin():
        switch_automation(session, False, "alice (os alice)", "change freeze")
    rounds = [healthy_round(t) for t in steps(0, 0.5)] + [site_lost_round(t) for t in steps(0.6, 1.6)]
    watch, executed = watch_of(rounds)
    drive(watch, len(rounds))
    assert executed.calls == []
    with sqlite_sessions() as session:
        (incident,) = list_incidents(session)
        detail = incident_detail(session, incident["id"])
    assert detail is not None
    decided = [e for e in detail["events"] if e["kind"] == "decided"]
    assert decided and decided[0]["data"]["policy"] == "notify"
    assert any("alice" in reason for reason in decided[0]["data"]["reasons"]), decided


def waiting_for_approvals(tmp_path: Path, sessions: sessionmaker[Session]) -> tuple[Watch, Executed, dict[str, Any]]:
    """A watch whose policy for trading's level is approve, after trading went down: its incident waits."""
    text = Path(LAB_INVENTORY).read_text().replace("major: auto", "major: approve")
    inventory = tmp_path / "inventory.yml"
    inventory.write_text(text.replace("../runbooks/", f"{REPO / 'runbooks'}/"))
    rounds = [healthy_round(t) for t in steps(0, 0.5)] + [trading_lost_round(t) for t in steps(0.6, 4.6)]
    executed = Executed()
    watch = Watch(str(inventory), sessions, probe=Script(rounds), execute=executed)
    drive(watch, 20)
    with sessions() as session:
        (incident,) = list_incidents(session)
    return watch, executed, incident


def test_an_approve_policy_runs_only_once_two_distinct_people_approved(
        tmp_path: Path, sqlite_sessions: sessionmaker[Session]) -> None:
    watch, executed, incident = waiting_for_approvals(tmp_path, sqlite_sessions)
    assert executed.calls == [] and incident["state"] == "detected"  # waiting: nothing changes

    def answer(actor: str, answer: str = "approved") -> None:
        with sqlite_sessions() as session, session.begin():
            answer_incident(session, incident["id"], answer, actor, "go", datetime.now(UTC))

    answer("alice (os alice)")
    answer("Alice again (os alice, ssh 10.0.0.9)")  # the same person twice counts once
    drive(watch, 10)
    assert executed.calls == []
    with pytest.raises(IncidentError, match="root without sudo"):
        answer("anyone (os root)")
    answer("bob (os bob)")
    drive(watch, 10)
    assert [c["runbook"] for c in executed.calls] == ["failover-trading.yml"]
    with sqlite_sessions() as session:
        timeline = incident_timeline(session, incident["id"])
        detail = incident_detail(session, incident["id"])
    assert detail is not None
    (decided,) = [e for e in detail["events"] if e["kind"] == "decided"]
    assert decided["data"]["approved_by"] == ["alice (os alice)", "bob (os bob)"]
    bob_at = next(e["at"] for e in detail["events"] if e["kind"] == "approved" and e["actor"] == "bob (os bob)")
    assert timeline["decided"] == bob_at  # the wait for the approvals is the recorded decision time


def test_one_rejection_stops_an_approve_policy(tmp_path: Path, sqlite_sessions: sessionmaker[Session]) -> None:
    watch, executed, incident = waiting_for_approvals(tmp_path, sqlite_sessions)
    with sqlite_sessions() as session, session.begin():
        answer_incident(session, incident["id"], "approved", "alice (os alice)", "go", datetime.now(UTC))
        answer_incident(session, incident["id"], "rejected", "carol (os carol)", "the backup is stale",
                        datetime.now(UTC))
        answer_incident(session, incident["id"], "approved", "bob (os bob)", "go", datetime.now(UTC))
    drive(watch, 10)
    assert executed.calls == []
    with sqlite_sessions() as session:
        detail = incident_detail(session, incident["id"])
    assert detail is not None
    (decided,) = [e for e in detail["events"] if e["kind"] == "decided"]
    assert decided["data"]["outcome"] == "rejected" and decided["data"]["by"] == "carol (os carol)"


@pytest.mark.slow
def test_serve_with_watch_needs_an_inventory_and_refuses_a_broken_one(tmp_path: Path) -> None:
    import os
    import subprocess
    import sys

    env = {**os.environ, "DR_DATABASE_URL": f"sqlite:///{tmp_path / 'evidence.db'}"}
    upgraded = subprocess.run([sys.executable, "-m", "dr_orchestrator.cli", "db", "upgrade"], env=env,
                              capture_output=True, text=True, timeout=60, cwd=tmp_path)
    assert upgraded.returncode == 0, upgraded.stderr
    command = [sys.executable, "-m", "dr_orchestrator.cli", "serve", "--port", "0", "--watch"]
    without = subprocess.run(command, env=env, capture_output=True, text=True, timeout=60, cwd=tmp_path)
    assert without.returncode == 2 and "give one" in without.stderr, without.stderr
    broken = tmp_path / "inventory.yml"
    broken.write_text(Path(LAB_INVENTORY).read_text().replace("major: auto", "major: autp"))
    refused = subprocess.run([*command, "-i", str(broken)], env=env, capture_output=True, text=True, timeout=60,
                             cwd=tmp_path)
    assert refused.returncode == 2 and "did you mean 'auto'" in refused.stderr, refused.stderr


def test_a_site_that_serves_nothing_any_more_opens_no_incident(
        watch_of: Any, sqlite_sessions: sessionmaker[Session]) -> None:
    """After a failover (or a restart of the watch then), the lost site stays down: nothing runs again."""
    def served_from_backup(at_s: float) -> list[Observation]:
        observations = [seen("front-door", "service", s, True, at_s, "HTTP 200 site=backup") for s in SERVICES]
        observations += [seen("direct:backup", "service", s, True, at_s, "HTTP 200 site=backup") for s in SERVICES]
        observations += [seen(o, "site", "primary", False, at_s) for o in ("direct:primary", "store-host:primary")]
        return observations

    rounds = [served_from_backup(t) for t in steps(0, 2.0)]
    watch, executed = watch_of(rounds)
    drive(watch, len(rounds))
    assert executed.calls == []
    with sqlite_sessions() as session:
        assert list_incidents(session) == []


def test_an_incident_is_restored_when_its_last_service_is_verified_not_when_the_run_ends(
        sqlite_sessions: sessionmaker[Session]) -> None:
    """/status and the notifications must not wait for a convergence play that runs after the
    verifications: the restored moment is recorded as the last covered service's mark arrives."""
    from dr_orchestrator.evidence.incidents import open_or_update_incident
    from dr_orchestrator.model.events import MarkerReached
    from dr_orchestrator.watch.service import _Restoration

    with sqlite_sessions() as session, session.begin():
        incident_id = open_or_update_incident(
            session, target_kind="site", target_name="primary", impact_start=T0, detected_at=T0 + timedelta(seconds=1),
            source="watch", level="particularly-serious", title="site primary down", actor="dr watch",
            services=["trading", "quotation"])
    watch = Watch(LAB_INVENTORY, sqlite_sessions, probe=Script([]), execute=Executed())
    restoration = _Restoration(watch, incident_id, "run-1", ["trading", "quotation"])
    restoration(MarkerReached("run-1", "verify-trading", "service_restored", "trading", "backup",
                              T0 + timedelta(seconds=2)))
    restoration(MarkerReached("run-1", "rpo", "rpo_measured", "quotation", "backup", T0 + timedelta(seconds=2.5)))
    with sqlite_sessions() as session:
        assert incident_timeline(session, incident_id)["restored"] is None  # quotation is not back yet
    restoration(MarkerReached("run-1", "verify-quotation", "service_restored", "quotation", "backup",
                              T0 + timedelta(seconds=3)))
    restoration.settled()
    assert restoration.recorded
    with sqlite_sessions() as session:
        timeline = incident_timeline(session, incident_id)
    assert timeline["restored"] == (T0 + timedelta(seconds=3)).isoformat()
    assert timeline["rto_s"] == 3.0


def test_warming_up_rehearses_what_a_decided_run_writes_and_leaves_no_trace_of_it(
        sessions: sessionmaker[Session], caplog: pytest.LogCaptureFixture) -> None:
    """The watch writes, ahead of need, what deciding and starting each mapped runbook writes (so that
    its first real run does not compile those statements on its critical path), then rolls it back:
    no incident, run, lock or chain entry stays, and the chain still verifies."""
    from sqlalchemy import event, func, select

    from dr_orchestrator.evidence.chain import verify_session
    from dr_orchestrator.evidence.incidents import open_or_update_incident
    from dr_orchestrator.evidence.models import Base

    def counts() -> dict[str, int]:
        with sessions() as session:
            return {name: session.scalar(select(func.count()).select_from(table)) or 0
                    for name, table in Base.metadata.tables.items()}

    with sessions() as session, session.begin():  # evidence already there, which must stay as it is
        open_or_update_incident(session, target_kind="service", target_name="quotation", impact_start=T0,
                                detected_at=T0, source="watch", level="general", title="earlier", actor="dr watch")
    with sessions() as session:
        chain_before = verify_session(session)
    before = counts()
    inserted: list[str] = []
    engine = sessions.kw["bind"]
    listener = lambda *args: inserted.append(args[2].split()[2]) if args[2].startswith("INSERT") else None  # noqa: E731
    event.listen(engine, "before_cursor_execute", listener)
    try:
        watch = Watch(LAB_INVENTORY, sessions, probe=Script([]), execute=Executed())
        watch.warm_plans()
    finally:
        event.remove(engine, "before_cursor_execute", listener)
    assert "rehearsing" not in caplog.text
    # site-failover, failover-trading, ...: each went through its incident, locks, process row and run
    for table in ("incidents", "incident_events", "run_locks", "run_processes", "runs", "steps", "attempts",
                  "markers", "audit_chain"):
        assert table in inserted, f"the rehearsal wrote nothing into {table}"
    assert counts() == before
    with sessions() as session:
        chain_after = verify_session(session)
    assert chain_after.ok and chain_after.head_sha256 == chain_before.head_sha256 != "0" * 64


def test_the_services_of_a_run_in_progress_rest_from_probing_until_it_ends(
        sqlite_sessions: sessionmaker[Session]) -> None:
    import threading
    from types import SimpleNamespace

    release = threading.Event()
    executed = Executed()

    def execute_slowly(*args: Any) -> None:
        executed(*args)
        release.wait(10)

    rounds = [healthy_round(t) for t in steps(0, 0.9)] + [site_lost_round(t) for t in steps(1.0, 2.0)]
    watch = Watch(LAB_INVENTORY, sqlite_sessions, probe=Script(rounds), execute=execute_slowly)
    watch.prober = SimpleNamespace(resting=frozenset())  # type: ignore[assignment] - only its resting is read
    try:
        for _ in range(len(rounds) - 1):
            watch.round()
        assert executed.calls and watch.active[0].thread.is_alive()
        watch.round()
        assert watch.prober.resting == set(SERVICES)  # the site failover's services
    finally:
        release.set()
    watch.active[0].thread.join(10)
    watch.round()
    assert watch.prober.resting == frozenset()


def test_an_outage_whose_incident_cannot_be_recorded_is_decided_again_next_round(
        watch_of: Any, sqlite_sessions: sessionmaker[Session], monkeypatch: pytest.MonkeyPatch) -> None:
    """A busy evidence database ("database is locked") must not make the watch forget an outage: the
    decision is tried again at the next round, and the site is failed over once."""
    from sqlalchemy.exc import OperationalError

    rounds = [healthy_round(t) for t in steps(0, 0.9)] + [site_lost_round(t) for t in steps(1.0, 2.5)]
    watch, executed = watch_of(rounds)
    record = watch.record_decision
    failures = iter([OperationalError("INSERT INTO incidents", {}, Exception("database is locked"))])

    def busy_once(session: Session, transition: Any) -> Any:
        failure = next(failures, None)
        if failure is not None:
            raise failure
        return record(session, transition)

    monkeypatch.setattr(watch, "record_decision", busy_once)
    drive(watch, len(rounds))
    assert [c["runbook"] for c in executed.calls] == ["site-failover.yml"]
    with sqlite_sessions() as session:
        assert len(list_incidents(session)) == 1


class Gate:
    """A cluster node's leadership, switched by the test."""

    def __init__(self) -> None:
        self.leading = False

    def is_leader(self) -> bool:
        return self.leading

    def fence_check(self) -> Any:
        return lambda: "7@node-test"


def test_a_follower_observes_but_decides_only_once_it_leads_with_its_own_impact_start(
        sqlite_sessions: sessionmaker[Session]) -> None:
    rounds = [healthy_round(t) for t in steps(0, 0.9)] + [site_lost_round(t) for t in steps(1.0, 3.0)]
    executed = Executed()
    gate = Gate()
    watch = Watch(LAB_INVENTORY, sqlite_sessions, probe=Script(rounds), execute=executed, leader=gate)
    drive(watch, 20)
    assert watch.states.get(Target("site", "primary")) == "down"  # agreed, but this node follows
    assert executed.calls == []
    with sqlite_sessions() as session:
        assert list_incidents(session) == []  # nothing decided, nothing recorded
    gate.leading = True
    drive(watch, 5)
    assert [(c["runbook"], c["parameters"].get("from_site")) for c in executed.calls] == [
        ("site-failover.yml", "primary")]
    assert executed.calls[0]["impact_start"] == T0 + timedelta(seconds=1.0)


def test_a_follower_probes_at_its_slower_pace_and_is_back_to_the_interval_as_soon_as_it_leads(
        sqlite_sessions: sessionmaker[Session], monkeypatch: pytest.MonkeyPatch) -> None:
    gate = Gate()
    watch = Watch(LAB_INVENTORY, sqlite_sessions, probe=Script([]), execute=Executed(), leader=gate)
    watch.interval_s = 0.05
    stop = threading.Event()
    monkeypatch.setattr(watch_service, "FOLLOWER_INTERVAL_S", 0.3)
    started = time.monotonic()
    assert watch.next_round(stop, started) == started + 0.3  # a follower's round, not the interval's
    assert time.monotonic() >= started + 0.3

    monkeypatch.setattr(watch_service, "FOLLOWER_INTERVAL_S", 30.0)
    threading.Timer(0.2, lambda: setattr(gate, "leading", True)).start()
    started = time.monotonic()
    watch.next_round(stop, started)
    assert time.monotonic() - started < 10, "a node that came to lead waited out the follower's pace"

    gate.leading = False
    threading.Timer(0.2, stop.set).start()
    started = time.monotonic()
    watch.next_round(stop, started)
    assert time.monotonic() - started < 10, "a stopped watch waited out the follower's pace"


def test_a_node_that_leads_no_more_starts_nothing(sqlite_sessions: sessionmaker[Session]) -> None:
    rounds = [healthy_round(t) for t in steps(0, 0.9)] + [trading_lost_round(t) for t in steps(1.0, 2.5)]
    executed = Executed()
    gate = Gate()
    gate.leading = True
    watch = Watch(LAB_INVENTORY, sqlite_sessions, probe=Script(rounds), execute=executed, leader=gate)
    drive(watch, 10)
    gate.leading = False
    drive(watch, 16)
    assert watch.states.get(Target("service", "trading")) == "down"
    assert executed.calls == []


def test_a_node_decides_while_the_evidence_database_is_away_and_its_journal_delivers_the_incident(
        sqlite_sessions: sessionmaker[Session], tmp_path: Path) -> None:
    """The site that went down held the evidence database: the leader still fails it over at once,
    its incident kept in the node's journal, and delivered whole (impact start, decision, restoration)
    when the database is back."""
    from dr_orchestrator.cluster.journal import EvidenceJournal, JournalFallback, deliver
    from dr_orchestrator.evidence.database import session_factory_for
    from dr_orchestrator.evidence.models import AuditEvent

    away = session_factory_for("postgresql+psycopg://dr@127.0.0.1:1/evidence")  # nothing listens on port 1
    journal = EvidenceJournal(tmp_path / "node.journal", node="node-backup")
    fallback = JournalFallback(journal, away, retry_s=60)
    gate = Gate()
    gate.leading = True
    rounds = [healthy_round(t) for t in steps(0, 0.9)] + [site_lost_round(t) for t in steps(1.0, 2.0)]
    executed = Executed()
    watch = Watch(LAB_INVENTORY, away, probe=Script(rounds), execute=executed, leader=gate, fallback=fallback)
    drive(watch, len(rounds))
    assert [(c["runbook"], c["parameters"].get("from_site")) for c in executed.calls] == [
        ("site-failover.yml", "primary")]
    incident_id = executed.calls[0]["incident"]
    restored = datetime.now(UTC)  # after the decision, which is stamped with the clock
    watch.record_incident_event(incident_id, "restored", restored, {"run_id": "run-0"})
    fallback.close()
    with sqlite_sessions() as session:
        assert incident_detail(session, incident_id) is None  # nothing reached the database yet

    report = deliver(journal, sqlite_sessions, delivered_by="node-witness")
    assert report.complete and report.failed == []
    with sqlite_sessions() as session:
        detail = incident_detail(session, incident_id)
        timeline = incident_timeline(session, incident_id)
        delivered = session.query(AuditEvent).filter(AuditEvent.action == "evidence.journal_delivered").one()
    assert detail is not None and detail["incident"]["state"] == "restored"
    assert (detail["incident"]["target_kind"], detail["incident"]["target_name"]) == ("site", "primary")
    assert [event["kind"] for event in detail["events"]] == ["detected", "decided", "restored"]
    assert timeline["impact_start"] == (T0 + timedelta(seconds=1.0)).isoformat()
    assert timeline["decided"] is not None and timeline["restored"] == restored.isoformat()
    assert delivered.data["node"] == "node-backup" and delivered.data["delivered_by"] == "node-witness"
    assert delivered.data["incident_writes"] == 3  # opened, decided, restored
    journal.close()


def test_a_site_cut_off_from_the_watch_while_its_services_answer_clients_is_not_failed_over(
        watch_of: Any) -> None:
    """A partition between the watch's node and the primary site: its direct probes fail, the front door
    still gets every answer from the primary. Nothing runs until clients are hurt too."""
    def cut_off_round(at_s: float) -> list[Observation]:
        observations = [seen("front-door", "service", s, True, at_s) for s in SERVICES]
        observations += [seen("direct:primary", "service", s, False, at_s) for s in SERVICES]
        return observations + [seen(o, "site", "primary", False, at_s)
                               for o in ("direct:primary", "store-host:primary")]

    rounds = [healthy_round(t) for t in steps(0, 0.9)] + [cut_off_round(t) for t in steps(1.0, 3.0)]
    rounds += [site_lost_round(t) for t in steps(3.1, 4.5)]
    watch, executed = watch_of(rounds)
    drive(watch, 31)
    assert watch.states.get(Target("site", "primary")) == "down"
    assert executed.calls == []
    drive(watch, 3)  # the front door fails too, not yet for the confirmation time
    assert executed.calls == []
    drive(watch, 12)  # the services are agreed down: the site is lost for clients
    assert [(c["runbook"], c["parameters"].get("from_site")) for c in executed.calls] == [
        ("site-failover.yml", "primary")]
    assert executed.calls[0]["impact_start"] == T0 + timedelta(seconds=3.1)  # when clients were first hurt


def test_a_follower_that_comes_to_lead_runs_the_site_runbook_alone_even_when_services_were_found_first(
        sqlite_sessions: sessionmaker[Session]) -> None:
    """Its services' failures were agreed before the site's: as a follower it kept them all. Leading, it
    runs the site's runbook only: service runbooks beside it would act on the same services."""
    def services_first_round(at_s: float) -> list[Observation]:
        observations = [seen("front-door", "service", s, False, at_s) for s in SERVICES]
        observations += [seen("direct:primary", "service", s, False, at_s) for s in SERVICES]
        site_ok = at_s < 1.6  # the site's own observers fail later
        return observations + [seen(o, "site", "primary", site_ok, at_s)
                               for o in ("direct:primary", "store-host:primary")]

    rounds = [healthy_round(t) for t in steps(0, 0.9)] + [services_first_round(t) for t in steps(1.0, 3.5)]
    executed = Executed()
    gate = Gate()
    watch = Watch(LAB_INVENTORY, sqlite_sessions, probe=Script(rounds), execute=executed, leader=gate)
    drive(watch, 16)
    assert watch.states.get(Target("site", "primary")) != "down"
    assert {t.target.kind for t in watch.undecided} == {"service"}  # kept while it follows
    drive(watch, 14)
    assert watch.states.get(Target("site", "primary")) == "down"
    gate.leading = True
    drive(watch, 3)
    assert [(c["runbook"], c["parameters"].get("from_site")) for c in executed.calls] == [
        ("site-failover.yml", "primary")]


def test_a_watch_started_while_a_site_is_down_runs_the_site_runbook_alone(
        watch_of: Any, sqlite_sessions: sessionmaker[Session]) -> None:
    """A node that comes to lead because its predecessor's site is lost may start watching only then: it
    never saw which site served each service. Their outage comes from the down site they have, so the
    site's runbook covers them (in benchmarks.cluster, service runbooks ran beside the site's and failed)."""
    rounds = [site_lost_round(t) for t in steps(0, 2.5)]
    watch, executed = watch_of(rounds)
    drive(watch, len(rounds))
    assert [(c["runbook"], c["parameters"].get("from_site")) for c in executed.calls] == [
        ("site-failover.yml", "primary")]
    with sqlite_sessions() as session:
        (incident,) = list_incidents(session)
        detail = incident_detail(session, incident["id"])
    assert detail is not None and sorted(detail["incident"]["services"]) == sorted(SERVICES)
