"""Figure 5: evidence at scale. Ten years of quarterly drills and real failovers for 200 services
(millions of step and probe rows, bulk-inserted with SQLAlchemy core), then the quarterly compliance
report (reports.quarter_data) and one service's RTO export (auditor.export_evidence), on SQLite and
PostgreSQL."""

from __future__ import annotations

import random
import uuid
from datetime import UTC, datetime, timedelta
from typing import Any

from sqlalchemy import insert

from benchmarks.common import Figure, Stopwatch, postgres_database, postgres_server, sqlite_database

NAME = "evidence"
TITLE = "5. evidence at scale: quarterly report and RTO export"
TARGET_S = 1.0
BATCH = 20_000


def filled(table: Any, values: dict[str, Any], moment: datetime) -> dict[str, Any]:
    """``values`` plus a plain value for every other NOT NULL column without a default."""
    from sqlalchemy import JSON, Boolean, Float, Integer

    from dr_orchestrator.evidence.types import UTCDateTime

    row = dict(values)
    for column in table.columns:
        if column.name in row or column.primary_key:
            continue
        if column.nullable:
            row[column.name] = None
        elif isinstance(column.type, JSON):
            row[column.name] = {}
        elif isinstance(column.type, Boolean):
            row[column.name] = True
        elif isinstance(column.type, Integer):
            row[column.name] = 0
        elif isinstance(column.type, Float):
            row[column.name] = 0.0
        elif isinstance(column.type, UTCDateTime):
            row[column.name] = moment
        else:
            row[column.name] = "bench"
    return row


class Generator:
    """Runs of one service each: a quarterly drill per service and quarter, and now and then a failover."""

    def __init__(self, connection: Any, years: int, services: int, steps: int, probes: int) -> None:
        from dr_orchestrator.evidence import models

        self.connection = connection
        self.models = models
        self.years, self.services, self.steps, self.probes = years, services, steps, probes
        self.pending: dict[Any, list[dict[str, Any]]] = {}
        self.step_pk = 0
        self.rows = 0

    def add(self, table: Any, row: dict[str, Any]) -> None:
        batch = self.pending.setdefault(table, [])
        batch.append(row)
        self.rows += 1
        if len(batch) >= BATCH:
            self.flush(table)

    def flush(self, table: Any | None = None) -> None:
        m = self.models
        order: list[Any] = [m.Run.__table__, m.RunService.__table__, m.StepRecord.__table__, m.Probe.__table__,
                            m.ServiceResult.__table__]
        for each in order if table is None else [self.models.Run.__table__, table]:
            batch = self.pending.get(each)
            if batch:
                self.connection.execute(insert(each), batch)
                batch.clear()

    def run(self, service: str, started: datetime, kind: str) -> None:
        m = self.models
        run_id = str(uuid.uuid4())
        rto = random.uniform(5, 120)
        finished = started + timedelta(seconds=rto + 5)
        self.add(m.Run.__table__, filled(m.Run.__table__, {
            "id": run_id, "runbook_name": f"failover-{service}", "kind": kind, "state": "succeeded",
            "trigger": "schedule" if kind == "rehearsal" else "manual", "started_at": started,
            "finished_at": finished, "sites": ["primary", "backup"], "forced": [], "targets": {},
            "test_type": "quarterly drill" if kind == "rehearsal" else "real failover",
        }, started))
        self.add(m.RunService.__table__, filled(m.RunService.__table__, {
            "run_id": run_id, "service": service, "rto_target_s": 60.0, "rpo_target_s": 5.0, "tier": "critical",
        }, started))
        for index in range(self.steps):
            self.step_pk += 1
            at = started + timedelta(seconds=index)
            self.add(m.StepRecord.__table__, filled(m.StepRecord.__table__, {
                "id": self.step_pk, "run_id": run_id, "step_id": f"step-{index}", "phase": "forward",
                "action": "noop", "service": service, "state": "succeeded", "started_at": at, "finished_at": at,
            }, at))
        for index in range(self.probes):
            at = started + timedelta(milliseconds=100 * index)
            self.add(m.Probe.__table__, filled(m.Probe.__table__, {
                "run_id": run_id, "step_id": "verify", "attempt": 1, "at": at, "target": f"http://{service}/health",
                "ok": index > self.probes // 2, "latency_ms": 0.8, "detail": "200",
            }, at))
        self.add(m.ServiceResult.__table__, filled(m.ServiceResult.__table__, {
            "run_id": run_id, "service": service, "incident_at": started, "run_started_at": started,
            "restored_at": started + timedelta(seconds=rto), "rto_s": rto, "rto_target_s": 60.0,
            "rto_met": rto <= 60, "rto_method": "bench", "rpo_s": 0.5, "rpo_target_s": 5.0, "rpo_met": True,
            "rpo_method": "bench", "raw": {},
        }, started))

    def generate(self) -> int:
        random.seed(9)
        first = datetime(2016, 1, 1, tzinfo=UTC)
        for quarter in range(self.years * 4):
            start = datetime(first.year + quarter // 4, 1 + 3 * (quarter % 4), 1, 2, tzinfo=UTC)
            for number in range(self.services):
                service = f"service-{number:03d}"
                self.run(service, start + timedelta(hours=number), "rehearsal")
                if random.random() < 0.1:  # a real failover now and then
                    self.run(service, start + timedelta(days=30, hours=number), "failover")
        self.flush()
        return self.rows


def measure_one(url: str, years: int, services: int, steps: int, probes: int) -> tuple[int, float, float, float]:
    from dr_orchestrator.evidence import auditor, reports
    from dr_orchestrator.evidence.database import make_engine, session_factory_for
    from dr_orchestrator.evidence.migrate import upgrade

    upgrade(url)
    engine = make_engine(url)
    with Stopwatch() as load, engine.begin() as connection:
        rows = Generator(connection, years, services, steps, probes).generate()
    if url.startswith("postgresql"):
        with engine.connect().execution_options(isolation_level="AUTOCOMMIT") as connection:
            connection.exec_driver_sql("ANALYZE")
    engine.dispose()
    sessions = session_factory_for(url)
    quarter = f"{2016 + years - 1}-Q4"
    with sessions() as session, Stopwatch() as report:
        data = reports.quarter_data(session, quarter)
    if data["runs_in_period"] < services:
        raise RuntimeError(f"the report found {data['runs_in_period']} runs, expected at least {services}")
    with sessions() as session, Stopwatch() as export:
        exported = auditor.export_evidence(session, "csv", service="service-007")
    if exported.count("\n") < years * 4:
        raise RuntimeError("the export missed runs")
    return rows, load.seconds, report.seconds, export.seconds


def measure(quick: bool) -> list[Figure]:
    years, services, steps, probes = (1, 10, 5, 20) if quick else (10, 200, 25, 250)
    figures = []
    with postgres_server() as server:
        for backend in ("sqlite", "postgresql"):
            database = sqlite_database() if backend == "sqlite" else postgres_database(server)
            with database as url:
                rows, load_s, report_s, export_s = measure_one(url, years, services, steps, probes)
            scale = f"{rows:,} rows loaded in {load_s:.0f} s"
            figures.append(Figure(f"{backend}: quarterly compliance report", report_s, "s", TARGET_S, note=scale))
            figures.append(Figure(f"{backend}: RTO export, one service (csv)", export_s, "s", TARGET_S))
    return figures
