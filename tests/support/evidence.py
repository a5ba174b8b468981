"""The evidence tests' recorded rehearsal (a plan built from the model, no YAML; its clock), tamper, and
`dr` as their auditor runs it."""

from __future__ import annotations

import subprocess
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

from sqlalchemy import text

from dr_orchestrator.evidence.database import make_engine
from dr_orchestrator.model.inventory import Host, Inventory, Service, Site
from dr_orchestrator.model.run import RunKind, RunPlan
from dr_orchestrator.model.runbook import OnFailure, RollbackSpec, Runbook, Scope, Step
from support import cli
from support.plans import source

T0 = datetime(2026, 11, 28, 10, 0, 0, 123456, tzinfo=UTC)


def at(seconds: float) -> datetime:
    return T0 + timedelta(seconds=seconds)


INVENTORY = Inventory(
    name="lab",
    sites={"primary": Site(name="primary"), "backup": Site(name="backup")},
    hosts={"backup-app": Host(name="backup-app", site="backup", address="127.0.20.1")},
    services={
        "trading": Service(name="trading", rto=60, rpo=0, tier="critical", sites=("primary", "backup")),
        "quotation": Service(name="quotation", rto=30, rpo=60, sites=("primary", "backup")),
        "contract-signing": Service(name="contract-signing", rto=300, rpo=5, sites=("primary", "backup")),
    },
)


def rehearsal_plan(incident_at: datetime | None = at(-10)) -> RunPlan:
    runbook = Runbook(
        name="fail-over-trading",
        scope=Scope(services=("trading", "quotation"), sites=("backup",)),
        steps=(
            Step(id="approve", action="approval"),
            Step(
                id="promote",
                action="shell.run",
                needs=("approve",),
                service="trading",
                site="backup",
                rollback=RollbackSpec(action="shell.run", with_={"argv": ["demote"]}),
            ),
            Step(
                id="verify-trading",
                action="http.check",
                needs=("promote",),
                service="trading",
                marks=("service_restored",),
            ),
            Step(
                id="verify-quotation",
                action="http.check",
                needs=("approve",),
                service="quotation",
                marks=("service_restored",),
                on_failure=OnFailure.CONTINUE,
            ),
            Step(id="cleanup", action="noop", needs=("verify-trading",), when="false"),
        ),
    )
    return RunPlan(
        runbook=runbook,
        inventory=INVENTORY,
        parameters={"dry": False, "when": at(0)},
        kind=RunKind.REHEARSAL,
        incident_at=incident_at,
        started_by="alice",
        reason="quarterly rehearsal",
        trigger="schedule",
        runbook_source=source("runbooks/trading.yml", "name: fail-over-trading\n"),
        inventory_source=source("inventories/lab.yml", "all: {}\n"),
        parameters_sha256="0" * 64,
        forced=("replication-lag",),
    )


def tamper(url: str, sql: str, **params: Any) -> None:
    """Change the database behind the store's back, as someone with the database's keys could.
    On PostgreSQL that takes a superuser switching the evidence triggers off."""
    engine = make_engine(url)
    try:
        with engine.begin() as conn:
            if conn.dialect.name == "postgresql":
                conn.execute(text("SET LOCAL session_replication_role = replica"))
            conn.execute(text(sql), params)
    finally:
        engine.dispose()


def dr(*args: str, db: str, cwd: Path) -> subprocess.CompletedProcess[str]:
    """`dr` run by the evidence tests' auditor (DR_ACTOR=auditor) on the database ``db``."""
    return cli.dr(*args, db=db, cwd=cwd, actor="auditor")
