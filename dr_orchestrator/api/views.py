"""What the API and the dashboard read from the evidence, beyond ``evidence.queries``: run
verdicts and filters, the RTO trend, and the figures behind /metrics."""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any

from sqlalchemy import func, select
from sqlalchemy.orm import Session

from dr_orchestrator.evidence import qualifying, queries
from dr_orchestrator.evidence.charts import Point
from dr_orchestrator.evidence.models import DrillRun, Run, ServiceResult

LIVE_STATES = ("pending", "running", "waiting_approval")
VERDICTS = ("passed", "failed", "in_progress")


def verdicts(session: Session, run_ids: list[str], states: dict[str, str]) -> dict[str, str]:
    """Per run: ``in_progress`` while live; ``failed`` when the run did not succeed or a service
    missed an RTO or RPO target; else ``passed``."""
    missed: set[str] = set()
    if run_ids:
        rows = session.execute(select(ServiceResult.run_id).where(
            ServiceResult.run_id.in_(run_ids),
            (ServiceResult.rto_met.is_(False)) | (ServiceResult.rpo_met.is_(False))))
        missed = {row[0] for row in rows}
    result = {}
    for run_id in run_ids:
        state = states[run_id]
        if state in LIVE_STATES:
            result[run_id] = "in_progress"
        else:
            result[run_id] = "passed" if state == "succeeded" and run_id not in missed else "failed"
    return result


def filtered_runs(session: Session, *, service: str | None = None, kind: str | None = None,
                  state: str | None = None, verdict: str | None = None, since: datetime | None = None,
                  until: datetime | None = None, limit: int = 50) -> list[dict[str, Any]]:
    """Runs newest first, each with its ``verdict``; ``until`` is exclusive."""
    rows = queries.list_runs(session, service=service, kind=kind, state=state, since=since)
    if until is not None:
        rows = [row for row in rows if datetime.fromisoformat(row["started_at"]) < until]
    judged = verdicts(session, [row["id"] for row in rows], {row["id"]: row["state"] for row in rows})
    for row in rows:
        row["verdict"] = judged[row["id"]]
    if verdict is not None:
        rows = [row for row in rows if row["verdict"] == verdict]
    return rows[:limit]


@dataclass
class Trend:
    service: str
    points: list[Point] = field(default_factory=list)
    target_s: float | None = None


def rto_trend(session: Session, since: datetime | None = None) -> list[Trend]:
    """Per service, the RTO of each of its tests (at its incident time; what counts as in the
    quarterly report: ``evidence.qualifying``) and the newest target."""
    trends = []
    for service, results in sorted(qualifying.measured(qualifying.period(session, since), "rto").items()):
        points = [Point(result.incident_at, result.rto_s, result.rto_met) for result in results
                  if result.rto_s is not None]
        trends.append(Trend(service, points, results[-1].rto_target_s))
    return trends


def latest_drill_runs(session: Session, limit: int = 20) -> list[DrillRun]:
    return list(session.scalars(select(DrillRun).order_by(DrillRun.started_at.desc()).limit(limit)))


def last_drill_verdicts(session: Session) -> dict[str, DrillRun]:
    """Per drill, its newest drill run with a verdict."""
    newest: dict[str, DrillRun] = {}
    query = select(DrillRun).where(DrillRun.verdict.is_not(None)).order_by(DrillRun.started_at)
    for record in session.scalars(query):
        newest[record.drill_name] = record
    return newest


def current_targets(session: Session) -> dict[str, dict[str, Any]]:
    """Every service's targets as the inventories stood at their newest runs (a service never
    exercised has targets too); when inventories disagree, the newest run wins."""
    newest = (select(Run.inventory_name, func.max(Run.started_at).label("latest"))
              .group_by(Run.inventory_name).subquery())
    query = (select(Run.targets)
             .join(newest, (Run.inventory_name == newest.c.inventory_name) & (Run.started_at == newest.c.latest))
             .order_by(Run.started_at))
    targets: dict[str, dict[str, Any]] = {}
    for (snapshot,) in session.execute(query):
        targets.update(snapshot or {})
    return targets


def runs_by_state(session: Session) -> Counter[str]:
    return Counter({state: count for state, count in session.execute(
        select(Run.state, func.count()).group_by(Run.state))})
