"""The audit chain over real runs: an untouched database verifies; a changed byte, a removed row,
a row slipped in or a chain entry tampered with is found and named; concurrent writers never fork
the chain; on PostgreSQL the database itself refuses to change finished evidence."""

from __future__ import annotations

import json
import threading
from datetime import date
from pathlib import Path

import psycopg
import pytest
from evidence_runs import run_small
from sqlalchemy import select, text
from sqlalchemy.engine import make_url
from sqlalchemy.orm import Session, sessionmaker
from support.evidence import dr, tamper

from dr_orchestrator.cli import run as run_commands
from dr_orchestrator.evidence import annotations, chain, migrate
from dr_orchestrator.evidence.database import make_engine, make_session_factory
from dr_orchestrator.evidence.models import AuditEntry, FindingClosure, MeasurementRecord, Run, StepRecord
from dr_orchestrator.evidence.store import EvidenceStore
from dr_orchestrator.evidence.values import TEST_TYPES
from dr_orchestrator.model.approval import Identity

pytestmark = pytest.mark.timeout(180)


def verify(sessions: sessionmaker[Session]) -> chain.ChainReport:
    with sessions() as session:
        return chain.verify_session(session)


def test_untouched_database_verifies_with_every_record_chained(sessions: sessionmaker[Session]) -> None:
    failed = run_small(sessions, fail=True)
    run_small(sessions, scenario="SIGKILL the primary site", failback_of=failed)
    with sessions() as session, session.begin():
        finding = annotations.add_finding(session, failed, "high", "bob", date(2027, 1, 31), "backup refused", "alice")
        annotations.close_finding(session, finding.id, "fixed in change CHG-1", "carol")
        annotations.record_reconciliation(session, failed, acknowledged_writes=1200, missing_writes=0,
                                          service="trading")

    report = verify(sessions)
    assert report.ok, [p.describe() for p in report.problems]
    with sessions() as session:
        entries = session.scalars(select(AuditEntry).order_by(AuditEntry.seq)).all()
        runs = {run.id: run for run in session.scalars(select(Run))}
    assert [e.seq for e in entries] == list(range(1, len(entries) + 1))  # gapless
    assert report.head_seq == len(entries) and report.head_sha256 == entries[-1].entry_sha256
    # Each record chained when inserted; steps, attempts and runs again each time they changed state.
    operations = {(e.table_name, e.operation) for e in entries}
    assert {("runs", "update"), ("steps", "update"), ("attempts", "update"), ("measurements", "insert"),
            ("findings", "insert"), ("finding_closures", "insert"), ("reconciliations", "insert")} <= operations
    assert ("measurements", "update") not in operations
    assert len({(e.table_name, e.record_id) for e in entries}) == report.records
    # The DR test record's fields the store fills in.
    assert {run.test_type for run in runs.values()} == {"planned switchover rehearsal", "unplanned failover rehearsal"}
    failback = next(run for run in runs.values() if run.failback_of)
    assert failback.failback_of == failed and failback.scenario == "SIGKILL the primary site"
    assert failback.retain_until is not None
    assert failback.retain_until.replace(year=failback.retain_until.year - 6) == failback.started_at
    assert run_commands.TEST_TYPES == list(TEST_TYPES)  # the CLI's copy (kept for a fast `dr --help`) agrees


def test_changed_measurement_and_deleted_step_are_named(database_url: str, sessions: sessionmaker[Session]) -> None:
    run_small(sessions, fail=True)
    with sessions() as session:
        measurement = session.scalars(select(MeasurementRecord)).one()
        never = session.scalars(select(StepRecord).where(StepRecord.step_id == "never")).one()
        assert never.state == "skipped"  # has no attempts: its row alone can go
    tamper(database_url, "UPDATE measurements SET value = 0.5 WHERE id = :id", id=measurement.id)

    report = verify(sessions)
    assert not report.ok and report.first is not None
    assert (report.first.kind, report.first.table, report.first.record_id) == (
        "record changed", "measurements", str(measurement.id))
    assert len(report.problems) == 1

    tamper(database_url, "DELETE FROM steps WHERE id = :id", id=never.id)
    report = verify(sessions)
    problems = {(p.kind, p.table, p.record_id) for p in report.problems}
    assert problems == {("record changed", "measurements", str(measurement.id)),
                        ("record removed", "steps", str(never.id))}
    # The first named is the one earliest in the chain.
    assert report.first is not None and report.first.seq == min(p.seq for p in report.problems if p.seq)


def test_tampered_chain_entries_and_rows_outside_it_are_named(
    database_url: str, sessions: sessionmaker[Session]
) -> None:
    run_id = run_small(sessions)
    tamper(database_url, "UPDATE audit_chain SET content_sha256 = :h WHERE seq = 3", h="f" * 64)
    tamper(database_url, "DELETE FROM audit_chain WHERE seq = 5")
    tamper(
        database_url,
        "INSERT INTO probes (run_id, step_id, attempt, at, target, ok, latency_ms, detail, recorded_at) "
        "VALUES (:run, 'verify', 1, :at, 'http://forged', :ok, 1.0, '', :at)",
        run=run_id, at="2026-11-28T10:00:00.000000+00:00", ok=True,
    )
    report = verify(sessions)
    kinds = [(p.kind, p.seq) for p in report.problems]
    assert kinds[0] == ("entry changed", 3)
    assert ("entry removed", 5) in kinds
    assert report.problems[-1].kind == "record inserted" and report.problems[-1].table == "probes"


def test_concurrent_writers_never_fork_the_chain(sessions: sessionmaker[Session]) -> None:
    """Two stores (as in two processes: no shared lock) and a findings writer at the same time."""
    errors: list[BaseException] = []
    run_ids: list[str] = []

    def writer() -> None:
        try:
            run_ids.append(run_small(sessions, EvidenceStore(sessions)))
        except BaseException as exc:  # noqa: BLE001 - reported by the assertion below
            errors.append(exc)

    def auditor() -> None:
        try:
            for n in range(10):
                with sessions() as session, session.begin():
                    annotations.record_audit_event(session, "auditor", "test.write", str(n))
        except BaseException as exc:  # noqa: BLE001 - reported by the assertion below
            errors.append(exc)

    threads = [threading.Thread(target=writer) for _ in range(2)] + [threading.Thread(target=auditor)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=120)
    assert not errors, errors
    assert len(run_ids) == 2
    report = verify(sessions)
    assert report.ok, [p.describe() for p in report.problems]
    with sessions() as session:
        audited = session.scalars(select(AuditEntry).where(AuditEntry.table_name == "audit_events")).all()
    assert len(audited) == 10


def test_closing_a_finding_adds_a_record_and_keeps_the_finding(sessions: sessionmaker[Session]) -> None:
    run_id = run_small(sessions)
    with sessions() as session, session.begin():
        finding_id = annotations.add_finding(session, run_id[:8], "low", "bob", date(2027, 1, 1), "slow DNS", "al").id
    with sessions() as session, session.begin():
        annotations.close_finding(session, finding_id, run_id, "carol")
    with sessions() as session, session.begin(), pytest.raises(annotations.AnnotationError, match="already closed"):
        annotations.close_finding(session, finding_id, "again", "carol")
    with sessions() as session:
        (finding,) = annotations.list_findings(session)
        assert annotations.list_findings(session, open_only=True) == []
        closure = session.scalars(select(FindingClosure)).one()
    assert (finding["text"], finding["open"], finding["closed"]["evidence_run_id"]) == ("slow DNS", False, run_id)
    assert closure.evidence_text == ""
    assert verify(sessions).ok


def _pg_conninfo(url: str) -> str:
    return make_url(url).set(drivername="postgresql").render_as_string(hide_password=False)


@pytest.mark.postgres
def test_postgres_refuses_changes_to_finished_evidence(postgres_database_url: str) -> None:
    migrate.upgrade(postgres_database_url)
    engine = make_engine(postgres_database_url)
    try:
        sessions = make_session_factory(engine)
        run_id = run_small(sessions, fail=True)
    finally:
        engine.dispose()
    refused = [
        ("UPDATE runs SET reason = 'rewritten' WHERE id = %s", (run_id,)),
        ("UPDATE steps SET state = 'succeeded' WHERE step_id = 'breaks'", None),
        ("UPDATE attempts SET error = NULL", None),
        ("UPDATE measurements SET value = 0.5", None),
        ("UPDATE audit_chain SET prev_sha256 = prev_sha256", None),
        ("DELETE FROM probes", None),
        ("DELETE FROM audit_chain WHERE seq = 1", None),
        ("DELETE FROM runs WHERE id = %s", (run_id,)),
        ("TRUNCATE service_results", None),
    ]
    with psycopg.connect(_pg_conninfo(postgres_database_url), autocommit=True) as conn:
        for sql, params in refused:
            with pytest.raises(psycopg.errors.InsufficientPrivilege, match="evidence is append-only"):
                conn.execute(sql, params)
        # Running records may still change (the store finishes them); finished ones not.
        conn.execute(
            "INSERT INTO steps (run_id, step_id, phase, state, recorded_at) VALUES (%s, 'late', 'forward', "
            "'running', now())", (run_id,))
        conn.execute("UPDATE steps SET state = 'succeeded', finished_at = now() WHERE step_id = 'late'")
        with pytest.raises(psycopg.errors.InsufficientPrivilege):
            conn.execute("UPDATE steps SET state = 'failed' WHERE step_id = 'late'")


@pytest.mark.slow
def test_cli_verify_exit_codes_and_findings(database_url: str, sessions: sessionmaker[Session], tmp_path: Path) -> None:
    run_id = run_small(sessions)
    ok = dr("evidence", "verify", db=database_url, cwd=tmp_path)
    assert ok.returncode == 0 and ok.stdout.startswith("intact:"), ok.stdout + ok.stderr

    added = dr("findings", "add", run_id[:8], "failover took manual DNS work", "--severity", "medium", "--owner",
               "bob", "--due", "2027-02-01", db=database_url, cwd=tmp_path)
    assert added.returncode == 0, added.stderr
    bad = dr("findings", "add", run_id, "x", "--severity", "medium", "--owner", "bob", "--due", "soon",
             db=database_url, cwd=tmp_path)
    assert bad.returncode == 2 and "--due 'soon' is not a date" in bad.stderr and "Traceback" not in bad.stderr
    closed = dr("findings", "close", "1", "--evidence", "DNS automated in CHG-7", db=database_url, cwd=tmp_path)
    assert closed.returncode == 0, closed.stderr
    again = dr("findings", "close", "1", "--evidence", "x", db=database_url, cwd=tmp_path)
    assert again.returncode == 2 and "already closed" in again.stderr
    listed = json.loads(dr("findings", "list", "-o", "json", db=database_url, cwd=tmp_path).stdout)
    assert [(Identity.parse(f["created_by"]).label, f["open"], f["closed"]["evidence_text"]) for f in listed] == [
        ("auditor", False, "DNS automated in CHG-7")]
    assert dr("findings", "list", "--open", db=database_url, cwd=tmp_path).stdout.strip() == "no findings"

    with sessions() as session:
        measurement_id = session.scalars(select(MeasurementRecord.id)).one()
    tamper(database_url, "UPDATE measurements SET method = 'guessed' WHERE id = :id", id=measurement_id)
    bad_chain = dr("evidence", "verify", db=database_url, cwd=tmp_path)
    assert bad_chain.returncode == 1
    assert bad_chain.stdout.startswith(f"TAMPERED: record changed: measurements id {measurement_id} (entry ")

    unmigrated = dr("evidence", "verify", db=f"sqlite:///{tmp_path}/none.db", cwd=tmp_path)
    assert unmigrated.returncode == 2 and "dr db upgrade" in unmigrated.stderr


def test_migration_chains_evidence_written_before_the_chain(database_url: str) -> None:
    migrate.upgrade(database_url, "0001")
    engine = make_engine(database_url)
    try:
        with engine.begin() as conn:
            conn.execute(
                text(
                    "INSERT INTO runs (id, runbook_name, kind, state, trigger, started_by, reason, orchestrator_host,"
                    " started_at, finished_at, runbook_path, runbook_sha256, runbook_text, inventory_name,"
                    " inventory_path, inventory_sha256, inventory_text, parameters, parameters_sha256, sites,"
                    " targets, forced, recorded_at) VALUES ('r-1', 'rb', 'rehearsal', 'succeeded', 'manual', 'al',"
                    " '', 'h', :at, :at, 'rb.yml', :sha, '', 'lab', 'inv.yml', :sha, '', '{}', :sha, '[]', '{}',"
                    " '[]', :at)"
                ),
                {"at": "2026-07-01T00:00:00.000000+00:00", "sha": "0" * 64},
            )
        migrate.upgrade(database_url)
        with engine.connect() as conn:
            assert conn.execute(text("SELECT table_name, record_id, operation FROM audit_chain")).all() == [
                ("runs", "r-1", "adopt")]
            assert chain.verify(conn).ok
        migrate.downgrade(database_url, "0001")
        migrate.upgrade(database_url)
        assert migrate.schema_is_current(database_url)
    finally:
        engine.dispose()


@pytest.mark.slow
def test_dr_run_records_test_type_scenario_failback_and_retention(tmp_path: Path) -> None:
    url = f"sqlite:///{tmp_path / 'evidence.db'}"
    migrate.upgrade(url)
    runbook = tmp_path / "tiny.yml"
    runbook.write_text("name: tiny\nscope: {services: [quotation]}\nsteps:\n  - id: switch\n    action: noop\n")
    inventory = str(Path(__file__).resolve().parents[1] / "inventories" / "local.yml")
    first = dr("run", str(runbook), "-i", inventory, "--kind", "rehearsal", "--scenario", "stop the primary",
               "--retention-years", "10", "-q", db=url, cwd=tmp_path)
    assert first.returncode == 0, first.stderr
    (listed,) = json.loads(dr("runs", "list", "-o", "json", db=url, cwd=tmp_path).stdout)
    back = dr("run", str(runbook), "-i", inventory, "--kind", "failback", "--failback-of", listed["id"][:8], "-q",
              db=url, cwd=tmp_path)
    assert back.returncode == 0, back.stderr
    wrong = dr("run", str(runbook), "-i", inventory, "--failback-of", "no-such-run", db=url, cwd=tmp_path)
    assert wrong.returncode == 2 and "no run 'no-such-run'" in wrong.stderr

    engine = make_engine(url)
    try:
        with make_session_factory(engine)() as session:
            runs = {run.kind: run for run in session.scalars(select(Run))}
    finally:
        engine.dispose()
    rehearsal, failback = runs["rehearsal"], runs["failback"]
    assert (rehearsal.test_type, rehearsal.scenario) == ("unplanned failover rehearsal", "stop the primary")
    assert rehearsal.retain_until == rehearsal.started_at.replace(year=rehearsal.started_at.year + 10)
    assert (failback.test_type, failback.failback_of) == ("failback", rehearsal.id)
    assert failback.retain_until == failback.started_at.replace(year=failback.started_at.year + 6)
