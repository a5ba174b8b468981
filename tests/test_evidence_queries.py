"""Reading evidence back: run lists with filters, one run's record, and the RTO/RPO export."""

from __future__ import annotations

import csv
import io
import json
from datetime import UTC, datetime, timedelta

import pytest
from sqlalchemy.orm import Session, sessionmaker
from support.evidence import rehearsal_plan

from dr_orchestrator.evidence import auditor, queries
from dr_orchestrator.evidence.store import EvidenceStore
from dr_orchestrator.model.events import (
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
from dr_orchestrator.model.run import RunKind, RunState, StepState

DAY1 = datetime(2026, 7, 1, 2, 0, tzinfo=UTC)
DAY2 = datetime(2026, 10, 1, 2, 0, tzinfo=UTC)
A = "aaaa1111-0000-4000-8000-000000000001"
B = "aaaa2222-0000-4000-8000-000000000002"


@pytest.fixture
def recorded(sessions: sessionmaker[Session]) -> sessionmaker[Session]:
    """The shared ``sessions`` (each database) holding two runs: a rehearsal on DAY1, a failed failover on DAY2."""
    store = EvidenceStore(sessions)
    record_run(store, A, DAY1, RunKind.REHEARSAL, restored_after=12.5, rpo=0.0)
    record_run(store, B, DAY2, RunKind.FAILOVER, restored_after=None, rpo=None)
    return sessions


def record_run(
    store: EvidenceStore, run_id: str, start: datetime, kind: RunKind, restored_after: float | None, rpo: float | None
) -> None:
    plan = rehearsal_plan(incident_at=None).model_copy(update={"kind": kind})
    store(RunStarted(run_id, start, plan, "orchestrator-1"))
    store(StepStarted(run_id, "verify-trading", start + timedelta(seconds=1)))
    store(AttemptStarted(run_id, "verify-trading", 1, start + timedelta(seconds=1)))
    store(ProbeResult(run_id, "verify-trading", 1, start + timedelta(seconds=2), "http://t", True, 1.5))
    ok = restored_after is not None
    state = StepState.SUCCEEDED if ok else StepState.FAILED
    end = start + timedelta(seconds=20)
    store(AttemptFinished(run_id, "verify-trading", 1, end, state, 19.0, error=None if ok else "503"))
    store(StepFinished(run_id, "verify-trading", end, state, error=None if ok else "503"))
    if restored_after is not None:
        store(
            MarkerReached(
                run_id,
                "verify-trading",
                "service_restored",
                "trading",
                "backup",
                start + timedelta(seconds=restored_after),
            )
        )
    if rpo is not None:
        store(
            Measurement(
                run_id,
                "promote",
                "trading",
                "rpo_s",
                rpo,
                "sync replication: standby LSN = primary LSN",
                {"lsn": "0/5000000"},
                start + timedelta(seconds=3),
            )
        )
    store(RunFinished(run_id, end, RunState.SUCCEEDED if ok else RunState.FAILED, None if ok else "verify failed"))


def test_list_runs_newest_first_with_filters(recorded: sessionmaker[Session]) -> None:
    with recorded() as s:
        rows = queries.list_runs(s)
        assert [r["id"] for r in rows] == [B, A]
        assert rows[0]["services"] == ["trading", "quotation"]
        assert rows[0]["started_at"] == DAY2.isoformat()
        assert (rows[0]["runbook_name"], rows[0]["kind"], rows[0]["state"], rows[0]["started_by"]) == (
            "fail-over-trading",
            "failover",
            "failed",
            "alice",
        )
        assert "runbook_text" not in rows[0]
        assert [r["id"] for r in queries.list_runs(s, kind="rehearsal")] == [A]
        assert [r["id"] for r in queries.list_runs(s, state="failed")] == [B]
        assert [r["id"] for r in queries.list_runs(s, since=DAY1 + timedelta(days=1))] == [B]
        assert [r["id"] for r in queries.list_runs(s, service="quotation")] == [B, A]
        assert queries.list_runs(s, service="contract-signing") == []
        assert [r["id"] for r in queries.list_runs(s, limit=1)] == [B]
    json.dumps(rows)  # plain data


def test_run_detail_has_the_whole_record(recorded: sessionmaker[Session]) -> None:
    with recorded() as s:
        detail = queries.run_detail(s, A)
        assert queries.run_detail(s, "aaaa1") == detail  # a unique prefix will do
        assert queries.run_detail(s, "bbbb") is None
        with pytest.raises(queries.AmbiguousRunId, match="give more of the id"):
            queries.run_detail(s, "aaaa")
    assert detail is not None
    json.dumps(detail)  # plain data, as `dr runs show --output json` prints it
    assert detail["run"]["id"] == A and detail["run"]["runbook_text"] == "name: fail-over-trading\n"
    assert [s["service"] for s in detail["services"]] == ["trading", "quotation"]
    # time order: the one step that ran first, then those that never started
    assert [(s["step_id"], s["state"]) for s in detail["steps"]][0] == ("verify-trading", "succeeded")
    assert {s["state"] for s in detail["steps"][1:]} == {"pending"}
    assert [(a["attempt"], a["state"]) for a in detail["steps"][0]["attempts"]] == [(1, "succeeded")]
    assert [p["at"] for p in detail["probes"]] == [(DAY1 + timedelta(seconds=2)).isoformat()]
    assert [m["marker"] for m in detail["markers"]] == ["service_restored"]
    assert [m["value"] for m in detail["measurements"]] == [0.0]
    assert detail["events"] == []
    trading = next(r for r in detail["results"] if r["service"] == "trading")
    assert (trading["rto_s"], trading["rto_met"], trading["rpo_s"], trading["rpo_met"]) == (12.5, True, 0.0, True)
    assert trading["restored_at"] == (DAY1 + timedelta(seconds=12.5)).isoformat()


def test_export_json_and_csv(recorded: sessionmaker[Session]) -> None:
    with recorded() as s:
        rows = json.loads(auditor.export_evidence(s, fmt="json", service="trading"))
        text = auditor.export_evidence(s, fmt="csv")
        recent = json.loads(auditor.export_evidence(s, fmt="json", since=DAY2))
        with pytest.raises(ValueError, match="use json or csv"):
            auditor.export_evidence(s, fmt="xml")
    # The sixteen columns of earlier exports come first and keep their meaning (the fifteen auditor
    # fields that follow: tests/test_evidence_auditor.py).
    assert [{key: row[key] for key in auditor.LEGACY_FIELDS} for row in rows] == [
        {
            "run_id": A,
            "runbook": "fail-over-trading",
            "kind": "rehearsal",
            "state": "succeeded",
            "service": "trading",
            "run_started_at": DAY1.isoformat(),
            "incident_at": DAY1.isoformat(),
            "restored_at": (DAY1 + timedelta(seconds=12.5)).isoformat(),
            "rto_s": 12.5,
            "rto_target_s": 60.0,
            "rto_met": True,
            "rpo_s": 0.0,
            "rpo_target_s": 0.0,
            "rpo_met": True,
            "rto_method": "service_restored marker of step 'verify-trading' minus incident time "
            "(run start (no incident time declared))",
            "rpo_method": "sync replication: standby LSN = primary LSN",
        },
        {
            "run_id": B,
            "runbook": "fail-over-trading",
            "kind": "failover",
            "state": "failed",
            "service": "trading",
            "run_started_at": DAY2.isoformat(),
            "incident_at": DAY2.isoformat(),
            "restored_at": None,
            "rto_s": None,
            "rto_target_s": 60.0,
            "rto_met": False,
            "rpo_s": None,
            "rpo_target_s": 0.0,
            "rpo_met": None,
            "rto_method": "not restored: the run recorded no service_restored marker for this service",
            "rpo_method": "not measured: the run recorded no rpo_s measurement for this service",
        },
    ]
    assert [(r["run_id"], r["service"]) for r in recent] == [(B, "trading"), (B, "quotation")]

    table = list(csv.DictReader(io.StringIO(text)))
    assert tuple(table[0]) == auditor.csv_fields()
    assert auditor.csv_fields()[:16] == auditor.LEGACY_FIELDS
    assert [(r["run_id"], r["service"]) for r in table] == [
        (A, "trading"),
        (A, "quotation"),
        (B, "trading"),
        (B, "quotation"),
    ]
    assert (table[0]["rto_s"], table[0]["rto_met"], table[0]["rpo_s"], table[0]["rpo_met"]) == (
        "12.5",
        "true",
        "0.0",
        "true",
    )
    # unknown stays empty, never a made-up zero
    assert (table[2]["rto_s"], table[2]["rto_met"], table[2]["rpo_s"], table[2]["rpo_met"]) == ("", "false", "", "")
