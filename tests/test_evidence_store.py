"""The evidence store fed a known sequence of engine events: exactly the rows a reader expects,
written as the events arrive, on SQLite and on PostgreSQL."""

from __future__ import annotations

import hashlib
import threading
from datetime import UTC, datetime, timedelta, timezone

import pytest
from sqlalchemy import select
from sqlalchemy.exc import StatementError
from sqlalchemy.orm import Session, sessionmaker
from support.evidence import at, rehearsal_plan

from dr_orchestrator.evidence.database import make_engine, make_session_factory
from dr_orchestrator.evidence.models import (
    ActionEventRecord,
    Attempt,
    Marker,
    MeasurementRecord,
    Probe,
    Run,
    RunService,
    ServiceResult,
    StepRecord,
)
from dr_orchestrator.evidence.store import EvidenceStore
from dr_orchestrator.model.events import (
    ActionEvent,
    AttemptFinished,
    AttemptStarted,
    MarkerReached,
    Measurement,
    ProbeResult,
    RunFinished,
    RunStarted,
    StepFinished,
    StepStarted,
)
from dr_orchestrator.model.run import RunState, StepState

RUN = "6f1c2a9e-0000-4000-8000-000000000001"


def successful_run_events() -> list[object]:
    return [
        RunStarted(RUN, at(0), rehearsal_plan(), "orchestrator-1"),
        StepStarted(RUN, "approve", at(0.5), rendered={}),
        AttemptStarted(RUN, "approve", 1, at(0.5)),
        AttemptFinished(RUN, "approve", 1, at(5.5), StepState.SUCCEEDED, 5.0, {"approver": "bob"}),
        StepFinished(RUN, "approve", at(5.5), StepState.SUCCEEDED, {"approver": "bob"}),
        # two parallel branches
        StepStarted(RUN, "promote", at(6), rendered={"argv": ["promote", "--now"]}),
        StepStarted(RUN, "verify-quotation", at(6.000001), rendered={"url": "http://q"}),
        AttemptStarted(RUN, "promote", 1, at(6)),
        AttemptStarted(RUN, "verify-quotation", 1, at(6.000001)),
        AttemptFinished(RUN, "promote", 1, at(7), StepState.FAILED, 1.0, {"exit_code": 1}, "exit 1"),
        AttemptStarted(RUN, "promote", 2, at(8)),
        Measurement(
            RUN,
            "promote",
            "trading",
            "rpo_s",
            0.0,
            "pg_last_xact_replay_timestamp vs ledger",
            {"replay_lsn": "0/3000060", "when": at(8.5)},
            at(8.5),
        ),
        AttemptFinished(RUN, "promote", 2, at(9), StepState.SUCCEEDED, 1.0, {"exit_code": 0}),
        StepFinished(RUN, "promote", at(9), StepState.SUCCEEDED, {"exit_code": 0}),
        ActionEvent(RUN, "promote", "ssh.exec", at(8.2), {"host": "backup-app", "argv": ["promote", "--now"]}),
        ProbeResult(RUN, "verify-quotation", 1, at(6.1), "http://q", False, 2.5, "connection refused"),
        ProbeResult(RUN, "verify-quotation", 1, at(6.2), "http://q", True, 1.25),
        AttemptFinished(RUN, "verify-quotation", 1, at(6.3), StepState.SUCCEEDED, 0.3, {"probes": 2}),
        StepFinished(RUN, "verify-quotation", at(6.3), StepState.SUCCEEDED, {"probes": 2}),
        MarkerReached(RUN, "verify-quotation", "service_restored", "quotation", None, at(6.2)),
        StepStarted(RUN, "verify-trading", at(9.1), rendered={"url": "http://t"}),
        AttemptStarted(RUN, "verify-trading", 1, at(9.1)),
        ProbeResult(RUN, "verify-trading", 1, at(9.2), "http://t", True, 1.0),
        ProbeResult(RUN, "verify-trading", 1, at(9.3), "http://t", True, 1.0),
        AttemptFinished(RUN, "verify-trading", 1, at(9.4), StepState.SUCCEEDED, 0.3, {}),
        StepFinished(RUN, "verify-trading", at(9.4), StepState.SUCCEEDED, {}),
        MarkerReached(RUN, "verify-trading", "service_restored", "trading", "backup", at(9.2)),
        StepFinished(RUN, "cleanup", at(9.5), StepState.SKIPPED, {}, "when 'false' was false"),
        RunFinished(RUN, at(10), RunState.SUCCEEDED),
    ]


def test_successful_run_writes_exactly_the_expected_rows(sessions: sessionmaker[Session]) -> None:
    store = EvidenceStore(sessions)
    for event in successful_run_events():
        store(event)  # type: ignore[arg-type]

    with sessions() as s:
        run = s.get_one(Run, RUN)
        assert (run.runbook_name, run.kind, run.state, run.trigger, run.started_by, run.reason) == (
            "fail-over-trading",
            "rehearsal",
            "succeeded",
            "schedule",
            "alice",
            "quarterly rehearsal",
        )
        assert (run.orchestrator_host, run.started_at, run.finished_at, run.incident_at, run.error) == (
            "orchestrator-1",
            at(0),
            at(10),
            at(-10),
            None,
        )
        assert run.runbook_sha256 == hashlib.sha256(b"name: fail-over-trading\n").hexdigest()
        assert (run.runbook_path, run.runbook_text) == ("runbooks/trading.yml", "name: fail-over-trading\n")
        assert (run.inventory_name, run.inventory_path, run.inventory_text) == (
            "lab",
            "inventories/lab.yml",
            "all: {}\n",
        )
        assert run.parameters == {"dry": False, "when": at(0).isoformat()}  # what JSON cannot hold is kept as text
        assert run.sites == ["backup"]
        assert run.forced == ["replication-lag"]
        assert run.targets["contract-signing"] == {
            "rto_s": 300.0,
            "rpo_s": 5.0,
            "tier": "standard",
            "criticality": "high",
            "sites": ["primary", "backup"],
            "capability": {},  # the inventory declares no capability elements
        }

        scope = s.scalars(select(RunService).order_by(RunService.id)).all()
        assert [(r.service, r.rto_target_s, r.rpo_target_s, r.tier) for r in scope] == [
            ("trading", 60.0, 0.0, "critical"),
            ("quotation", 30.0, 60.0, "standard"),
        ]

        steps = s.scalars(select(StepRecord).order_by(StepRecord.id)).all()
        assert [
            (r.step_id, r.phase, r.action, r.service, r.site, r.state, r.started_at, r.finished_at) for r in steps
        ] == [
            ("approve", "forward", "approval", None, None, "succeeded", at(0.5), at(5.5)),
            ("promote", "forward", "shell.run", "trading", "backup", "succeeded", at(6), at(9)),
            ("verify-trading", "forward", "http.check", "trading", None, "succeeded", at(9.1), at(9.4)),
            ("verify-quotation", "forward", "http.check", "quotation", None, "succeeded", at(6.000001), at(6.3)),
            ("cleanup", "forward", "noop", None, None, "skipped", None, at(9.5)),
        ]
        assert steps[1].rendered == {"argv": ["promote", "--now"]}
        assert steps[1].output == {"exit_code": 0}
        assert steps[4].error == "when 'false' was false"

        attempts = s.scalars(select(Attempt).order_by(Attempt.id)).all()
        assert [
            (a.step_id, a.attempt, a.state, a.started_at, a.finished_at, a.duration_s, a.error) for a in attempts
        ] == [
            ("approve", 1, "succeeded", at(0.5), at(5.5), 5.0, None),
            ("promote", 1, "failed", at(6), at(7), 1.0, "exit 1"),
            ("verify-quotation", 1, "succeeded", at(6.000001), at(6.3), 0.3, None),
            ("promote", 2, "succeeded", at(8), at(9), 1.0, None),
            ("verify-trading", 1, "succeeded", at(9.1), at(9.4), 0.3, None),
        ]
        assert {a.step_pk for a in attempts if a.step_id == "promote"} == {steps[1].id}

        probes = s.scalars(select(Probe).order_by(Probe.at)).all()
        assert [(p.step_id, p.attempt, p.at, p.target, p.ok, p.latency_ms, p.detail) for p in probes] == [
            ("verify-quotation", 1, at(6.1), "http://q", False, 2.5, "connection refused"),
            ("verify-quotation", 1, at(6.2), "http://q", True, 1.25, ""),
            ("verify-trading", 1, at(9.2), "http://t", True, 1.0, ""),
            ("verify-trading", 1, at(9.3), "http://t", True, 1.0, ""),
        ]
        markers = s.scalars(select(Marker).order_by(Marker.id)).all()
        assert [(m.step_id, m.marker, m.service, m.site, m.at) for m in markers] == [
            ("verify-quotation", "service_restored", "quotation", None, at(6.2)),
            ("verify-trading", "service_restored", "trading", "backup", at(9.2)),
        ]
        measurement = s.scalars(select(MeasurementRecord)).one()
        assert (measurement.step_id, measurement.service, measurement.metric, measurement.value, measurement.at) == (
            "promote",
            "trading",
            "rpo_s",
            0.0,
            at(8.5),
        )
        assert measurement.raw == {"replay_lsn": "0/3000060", "when": at(8.5).isoformat()}
        event = s.scalars(select(ActionEventRecord)).one()
        assert (event.step_id, event.kind, event.at, event.data) == (
            "promote",
            "ssh.exec",
            at(8.2),
            {"host": "backup-app", "argv": ["promote", "--now"]},
        )

        results = {r.service: r for r in s.scalars(select(ServiceResult))}
        assert set(results) == {"trading", "quotation"}
        trading = results["trading"]
        assert (trading.incident_at, trading.run_started_at, trading.restored_at) == (at(-10), at(0), at(9.2))
        assert trading.rto_s == pytest.approx(19.2)
        assert (trading.detection_s, trading.decision_s, trading.execution_s) == (
            pytest.approx(10),
            pytest.approx(5),
            pytest.approx(4.2),
        )
        assert (trading.rto_target_s, trading.rto_met) == (60.0, True)
        assert (trading.rpo_s, trading.rpo_target_s, trading.rpo_met) == (0.0, 0.0, True)
        assert trading.rpo_method == "pg_last_xact_replay_timestamp vs ledger"
        assert trading.raw["restored_marker"] == {
            "step_id": "verify-trading",
            "service": "trading",
            "id": markers[1].id,
        }
        assert trading.raw["rpo_measurement"]["id"] == measurement.id
        quotation = results["quotation"]
        assert quotation.rto_s == pytest.approx(16.2)
        assert (quotation.rto_target_s, quotation.rto_met) == (30.0, True)
        assert (quotation.rpo_s, quotation.rpo_met) == (None, None)  # not measured: never assumed
        assert quotation.rpo_method.startswith("not measured")


def test_each_event_is_committed_as_it_arrives(sessions: sessionmaker[Session]) -> None:
    """What a crash would leave: everything up to the last event, readable from another connection."""
    store = EvidenceStore(sessions)
    events = successful_run_events()
    for event in events[:8]:
        store(event)  # type: ignore[arg-type]
    with sessions() as s:
        assert s.get_one(Run, RUN).state == "running"
        running = s.scalars(select(StepRecord).where(StepRecord.state == "running").order_by(StepRecord.id)).all()
        assert [r.step_id for r in running] == ["promote", "verify-quotation"]
        assert s.scalars(select(Attempt).where(Attempt.finished_at.is_(None))).one().step_id == "promote"
        pending = s.scalars(select(StepRecord.step_id).where(StepRecord.state == "pending")).all()
        assert sorted(pending) == ["cleanup", "verify-trading"]


@pytest.mark.slow
def test_failed_run_with_rollback(sessions: sessionmaker[Session]) -> None:
    store = EvidenceStore(sessions)
    for event in [
        RunStarted(RUN, at(0), rehearsal_plan(incident_at=None), "orchestrator-1"),
        StepStarted(RUN, "approve", at(1)),
        StepFinished(RUN, "approve", at(2), StepState.SUCCEEDED),
        StepStarted(RUN, "promote", at(3)),
        AttemptStarted(RUN, "promote", 1, at(3)),
        AttemptFinished(RUN, "promote", 1, at(4), StepState.SUCCEEDED, 1.0),
        StepFinished(RUN, "promote", at(4), StepState.SUCCEEDED),
        StepStarted(RUN, "verify-trading", at(5)),
        AttemptStarted(RUN, "verify-trading", 1, at(5)),
        AttemptFinished(RUN, "verify-trading", 1, at(65), StepState.TIMED_OUT, 60.0, error="timed out after 60s"),
        StepFinished(RUN, "verify-trading", at(65), StepState.TIMED_OUT, error="timed out after 60s"),
        StepStarted(RUN, "promote", at(66), phase="rollback", rendered={"argv": ["demote"]}),
        AttemptStarted(RUN, "promote", 1, at(66), phase="rollback"),
        AttemptFinished(RUN, "promote", 1, at(67), StepState.SUCCEEDED, 1.0, phase="rollback"),
        StepFinished(RUN, "promote", at(67), StepState.ROLLED_BACK, phase="rollback"),
        StepFinished(RUN, "verify-quotation", at(68), StepState.CANCELLED, error="the run stopped"),
        StepFinished(RUN, "cleanup", at(68), StepState.SKIPPED, error="needs 'verify-trading'"),
        RunFinished(RUN, at(69), RunState.FAILED, "step verify-trading timed out"),
    ]:
        store(event)  # type: ignore[arg-type]

    with sessions() as s:
        run = s.get_one(Run, RUN)
        assert (run.state, run.finished_at, run.error) == ("failed", at(69), "step verify-trading timed out")
        steps = s.scalars(select(StepRecord).order_by(StepRecord.id)).all()
        assert [(r.step_id, r.phase, r.action, r.state, r.started_at, r.finished_at) for r in steps] == [
            ("approve", "forward", "approval", "succeeded", at(1), at(2)),
            ("promote", "forward", "shell.run", "succeeded", at(3), at(4)),
            ("verify-trading", "forward", "http.check", "timed_out", at(5), at(65)),
            ("verify-quotation", "forward", "http.check", "cancelled", None, at(68)),
            ("cleanup", "forward", "noop", "skipped", None, at(68)),
            ("promote", "rollback", "shell.run", "rolled_back", at(66), at(67)),
        ]
        rollback_attempt = s.scalars(select(Attempt).where(Attempt.phase == "rollback")).one()
        assert (rollback_attempt.step_pk, rollback_attempt.attempt, rollback_attempt.state) == (
            steps[5].id,
            1,
            "succeeded",
        )

        results = {r.service: r for r in s.scalars(select(ServiceResult))}
        for service, target in (("trading", 60.0), ("quotation", 30.0)):
            result = results[service]
            assert result.incident_at == at(0)  # no declared incident: the run's start
            assert (result.restored_at, result.rto_s, result.rto_target_s, result.rto_met) == (
                None,
                None,
                target,
                False,
            )
            assert result.rto_method.startswith("not restored")


def test_marker_for_a_service_outside_the_declared_scope_joins_the_scope(sessions: sessionmaker[Session]) -> None:
    store = EvidenceStore(sessions)
    store(RunStarted(RUN, at(0), rehearsal_plan(), "h"))
    store(MarkerReached(RUN, "verify-trading", "service_restored", "contract-signing", None, at(3)))
    store(Measurement(RUN, "promote", None, "rpo_s", 1.5, "lsn diff", {}, at(2)))  # run-wide
    store(RunFinished(RUN, at(4), RunState.SUCCEEDED))
    with sessions() as s:
        added = s.scalars(select(RunService).where(RunService.service == "contract-signing")).one()
        assert (added.rto_target_s, added.rpo_target_s) == (300.0, 5.0)
        results = {r.service: r for r in s.scalars(select(ServiceResult))}
        assert set(results) == {"trading", "quotation", "contract-signing"}
        cs = results["contract-signing"]
        assert (cs.rto_s, cs.rto_met, cs.rpo_s, cs.rpo_met) == (pytest.approx(13), True, 1.5, True)
        assert (results["trading"].rpo_s, results["trading"].rpo_met) == (1.5, False)  # run-wide reading, target 0


def test_timestamps_keep_microseconds_and_come_back_aware_utc(sessions: sessionmaker[Session]) -> None:
    store = EvidenceStore(sessions)
    store(RunStarted(RUN, at(0), rehearsal_plan(), "h"))
    paris = timezone(timedelta(hours=1))
    sent = [
        datetime(2026, 11, 28, 11, 0, 0, 999999, tzinfo=paris),  # 10:00:00.999999 UTC
        datetime(2026, 11, 28, 10, 0, 0, 1, tzinfo=UTC),
        datetime(2026, 11, 28, 9, 59, 59, 999999, tzinfo=UTC),
    ]
    for moment in sent:
        store(ProbeResult(RUN, "verify-trading", 1, moment, "http://t", True, 1.0))
    store.flush()  # probes are committed behind the engine's back; flush waits for them
    with sessions() as s:
        stored = s.scalars(select(Probe.at).order_by(Probe.at)).all()
    assert stored == sorted(sent)  # sorted in time order by the database, not as text of mixed zones
    assert all(moment.utcoffset() == timedelta(0) for moment in stored)
    assert stored[2].microsecond == 999999 and stored[2].hour == 10


def test_naive_timestamps_are_refused(sessions: sessionmaker[Session]) -> None:
    store = EvidenceStore(sessions)
    store(RunStarted(RUN, at(0), rehearsal_plan(), "h"))
    with pytest.raises(StatementError, match="naive datetime"):  # store() waits for the commit, and raises
        store.store(ProbeResult(RUN, "verify-trading", 1, datetime(2026, 11, 28, 10, 0), "http://t", True, 1.0))


def test_concurrent_writers_lose_nothing(database_url: str, sessions: sessionmaker[Session]) -> None:
    """Several engine threads through one store, and a second store on its own engine (as another
    process would be): every probe is recorded."""
    first = EvidenceStore(sessions)
    first(RunStarted(RUN, at(0), rehearsal_plan(), "h"))
    other_engine = make_engine(database_url)
    second = EvidenceStore(make_session_factory(other_engine))
    errors: list[BaseException] = []

    def write(store: EvidenceStore, worker: int) -> None:
        try:
            for i in range(40):
                store(ProbeResult(RUN, f"step-{worker}", 1, at(worker + i / 1000), f"w{worker}", True, float(i)))
        except BaseException as exc:  # noqa: BLE001 - handed to the test thread
            errors.append(exc)

    threads = [threading.Thread(target=write, args=(first if w % 2 else second, w)) for w in range(6)]
    try:
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join(timeout=120)
        first.flush()
        second.flush()
    finally:
        other_engine.dispose()
    assert not errors
    with sessions() as s:
        counts = {
            target: len(s.scalars(select(Probe.id).where(Probe.target == target)).all())
            for target in (f"w{w}" for w in range(6))
        }
    assert counts == {f"w{w}": 40 for w in range(6)}


@pytest.mark.slow
def test_awkward_outputs_are_kept_as_text_on_every_backend(sessions: sessionmaker[Session]) -> None:
    """Command output can hold NUL bytes and NaN; PostgreSQL refuses both in text and JSON."""
    store = EvidenceStore(sessions)
    store(RunStarted(RUN, at(0), rehearsal_plan(), "h"))
    output = {"stdout": "a\x00b", "ratio": float("nan"), "raw": b"\x01", "state": StepState.FAILED, 7: (1, 2)}
    store(StepStarted(RUN, "promote", at(1), rendered={"argv": ["x\x00"]}))
    store(StepFinished(RUN, "promote", at(2), StepState.FAILED, output, error="exit 1: a\x00b"))
    store(ProbeResult(RUN, "promote", 1, at(1.5), "tcp://h:1", False, 0.5, "got \x00"))
    store.flush()
    with sessions() as s:
        row = s.scalars(select(StepRecord).where(StepRecord.step_id == "promote")).one()
        probe = s.scalars(select(Probe)).one()
    assert row.output == {"stdout": "a\\x00b", "ratio": "nan", "raw": "b'\\x01'", "state": "failed", "7": [1, 2]}
    assert row.rendered == {"argv": ["x\\x00"]}
    assert row.error == "exit 1: a\\x00b"
    assert probe.detail == "got \\x00"
