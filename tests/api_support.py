"""Helpers of the API and dashboard tests: a migrated database, tokens, and real runs recorded
through the engine and the evidence store (the same composition `dr run` uses)."""

from __future__ import annotations

import textwrap
from datetime import timedelta
from pathlib import Path

from fastapi.testclient import TestClient

from dr_orchestrator.api.app import ApiSettings, create_app
from dr_orchestrator.api.tokens import create_token
from dr_orchestrator.evidence import migrate
from dr_orchestrator.evidence.database import session_factory_for
from dr_orchestrator.model.events import utcnow
from dr_orchestrator.plans import build_plan
from dr_orchestrator.runs.execute import execute

REPO = Path(__file__).resolve().parents[1]
API_DATA = REPO / "tests" / "data" / "api"
RUNBOOKS = API_DATA / "runbooks"
INVENTORIES = API_DATA / "inventories"
INVENTORY = INVENTORIES / "two-services.yml"
DRILL_RUNBOOK = REPO / "tests" / "data" / "drills" / "quick-failover.yml"


def prepared(url: str) -> str:
    migrate.upgrade(url)
    return url


def token(url: str, name: str, role: str, expires_in: timedelta | None = None) -> str:
    sessions = session_factory_for(url)
    with sessions() as session:
        _row, secret = create_token(session, name, role, "test", expires_in)
        session.commit()
    return secret


def record_run(url: str, runbook: str, incident_ago_s: float, actor: str = "alice") -> str:
    """Run ``runbooks/<runbook>`` for real with the incident declared ``incident_ago_s`` ago: the
    restored service's RTO is about that long."""
    plan = build_plan(str(RUNBOOKS / runbook), str(INVENTORY), incident_at=utcnow() - timedelta(seconds=incident_ago_s),
                      started_by=actor)
    outcome = execute(session_factory_for(url), plan)
    assert outcome.state == "succeeded", outcome.error
    return outcome.run_id


def bearer(who: str | None) -> dict[str, str]:
    return {"Authorization": f"Bearer {who}"} if who else {}


def make_api(url: str, drills_dir: Path, runbooks: Path = RUNBOOKS, inventories: Path = INVENTORIES) -> TestClient:
    settings = ApiSettings(database_url=url, runbooks_dir=str(runbooks), inventories_dir=str(inventories),
                           drills_dir=str(drills_dir))
    return TestClient(create_app(settings))


def write_drill(drills_dir: Path, name: str = "api-quick-drill") -> Path:
    path = drills_dir / f"{name}.yml"
    path.write_text(textwrap.dedent(f"""\
        name: {name}
        description: quotation moves to the backup site, planned
        scenario: planned_maintenance
        inventory: {INVENTORY}
        runbook:
          path: {DRILL_RUNBOOK}
        expectations:
          quotation:
            rto: 30s
        schedule: {{cron: "0 2 1 1,4,7,10 *", timezone: UTC}}
        pre_approved: true
        """))
    return path
