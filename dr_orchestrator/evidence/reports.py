"""Reports for auditors: the after-action report of one run and the quarterly compliance report.

``*_data`` functions return plain JSON-ready dicts (the API serves them as they are); ``render_*``
turn them into HTML with the Jinja2 templates shipped in ``templates/``; ``pdf.html_to_pdf`` prints
that HTML. Charts are inline SVG drawn here, so no report needs JavaScript.
"""

from __future__ import annotations

import csv
import io
import json
import re
from collections.abc import Iterable
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import jinja2
from markupsafe import Markup
from sqlalchemy import select
from sqlalchemy.orm import Session

from dr_orchestrator.evidence import charts
from dr_orchestrator.evidence.annotations import list_findings
from dr_orchestrator.evidence.dr_record import FINAL_STATES, dr_test_record
from dr_orchestrator.evidence.levels import LevelTable, load_levels
from dr_orchestrator.evidence.models import Run, RunService, ServiceResult
from dr_orchestrator.evidence.store import derive_test_type
from dr_orchestrator.model.events import utcnow

TEMPLATES = Path(__file__).with_name("templates")
DORA_MAX_GAP = timedelta(days=365)
QUARTER_CSV_FIELDS = (
    "quarter",
    "service",
    "tier",
    "criticality",
    "exercised",
    "run_id",
    "test_type",
    "kind",
    "trigger",
    "state",
    "started_at",
    "incident_at",
    "restored_at",
    "rto_s",
    "rto_target_s",
    "rto_met",
    "rpo_s",
    "rpo_target_s",
    "rpo_met",
    "capability_level",
)


class ReportError(ValueError):
    """The report cannot be made as asked; one sentence."""


@dataclass(frozen=True)
class Quarter:
    label: str  # 2026Q3
    start: datetime  # inclusive, UTC
    end: datetime  # exclusive


def parse_quarter(text: str) -> Quarter:
    match = re.fullmatch(r"\s*(\d{4})\s*-?\s*[Qq]([1-4])\s*", text)
    if not match:
        raise ReportError(f"quarter {text!r} is not like 2026Q3")
    year, number = int(match.group(1)), int(match.group(2))
    start = datetime(year, 3 * number - 2, 1, tzinfo=UTC)
    end = datetime(year + 1, 1, 1, tzinfo=UTC) if number == 4 else datetime(year, 3 * number + 1, 1, tzinfo=UTC)
    return Quarter(f"{year}Q{number}", start, end)


def quarter_of(moment: datetime) -> Quarter:
    return parse_quarter(f"{moment.year}Q{(moment.month - 1) // 3 + 1}")


def _environment() -> jinja2.Environment:
    env = jinja2.Environment(
        loader=jinja2.FileSystemLoader(str(TEMPLATES)),
        autoescape=True,
        undefined=jinja2.StrictUndefined,
        trim_blocks=True,
        lstrip_blocks=True,
    )
    env.filters["seconds"] = _seconds
    env.filters["short_time"] = _short_time
    env.filters["duration"] = _duration
    return env


def _duration(value: float | None) -> str:
    """A bound for people: ``none``, ``0 s``, ``30 min``, ``7 days``."""
    if value is None:
        return "none"
    for unit, size in (("days", 86400), ("h", 3600), ("min", 60)):
        if value >= size:
            return f"{value / size:g} {unit}"
    return f"{value:g} s"


def _short_time(iso: str) -> str:
    """``2026-11-28 03:51:44`` from an ISO-8601 UTC timestamp (tables with many columns)."""
    return datetime.fromisoformat(iso).astimezone(UTC).strftime("%Y-%m-%d %H:%M:%S")


def _seconds(value: float | None) -> str:
    return "—" if value is None else f"{value:.3f} s"


# -- after-action report ----------------------------------------------------------------------------


def after_action_data(session: Session, run_id: str) -> dict[str, Any]:
    record = dr_test_record(session, run_id)
    if record is None:
        raise ReportError(f"no run {run_id!r} in the evidence database (see `dr runs list`)")
    record["generated_at"] = utcnow().isoformat()
    return record


def render_after_action(record: dict[str, Any]) -> str:
    return _environment().get_template("after_action.html.j2").render(r=record, generated_at=record["generated_at"])


def after_action_html(session: Session, run_id: str) -> str:
    return render_after_action(after_action_data(session, run_id))


# -- quarterly compliance report ------------------------------------------------------------------


def _is_critical(info: dict[str, Any]) -> bool:
    return info.get("tier") == "critical" or info.get("criticality") == "critical"


def _known_services(runs: Iterable[Run], inventory_services: dict[str, dict[str, Any]] | None) -> dict[str, Any]:
    """Services to account for: the inventory's if given, else every service of the inventories
    that the period's runs used (their targets as the latest run saw them)."""
    if inventory_services is not None:
        return dict(inventory_services)
    known: dict[str, Any] = {}
    for run in sorted(runs, key=lambda r: r.started_at):
        for name, target in (run.targets or {}).items():
            known[name] = target
    return known


def quarter_data(
    session: Session,
    quarter: str | Quarter,
    service: str | None = None,
    inventory_services: dict[str, dict[str, Any]] | None = None,
    levels: LevelTable | None = None,
) -> dict[str, Any]:
    """Per service: every finished run of the quarter with achieved RTO/RPO against targets and the
    capability level the figures reach; services not exercised (with the last time they were, for
    DORA's yearly test of every critical function); open findings; the RTO chart per service.

    ``inventory_services``: name -> {rto_s, rpo_s, tier, criticality} (``store.target_snapshot`` of
    an inventory); default: the services of the inventories the quarter's runs used."""
    period = quarter if isinstance(quarter, Quarter) else parse_quarter(quarter)
    table = levels or load_levels()
    runs = list(
        session.scalars(
            select(Run)
            .where(Run.started_at >= period.start, Run.started_at < period.end, Run.state.in_(FINAL_STATES))
            .order_by(Run.started_at, Run.id)
        )
    )
    results: dict[str, list[ServiceResult]] = {}
    for result in session.scalars(
        select(ServiceResult).where(ServiceResult.run_id.in_([r.id for r in runs])).order_by(ServiceResult.id)
    ):
        results.setdefault(result.run_id, []).append(result)
    known = _known_services(runs, inventory_services)
    for run in runs:
        for result in results.get(run.id, []):
            known.setdefault(result.service, {"rto_s": result.rto_target_s, "rpo_s": result.rpo_target_s})
    names = sorted(n for n in known if service is None or n == service)
    if service is not None and service not in known:
        names = [service]
        known[service] = {}

    services = []
    for name in names:
        info = known.get(name, {})
        rows = []
        for run in runs:
            for result in results.get(run.id, []):
                if result.service != name:
                    continue
                level = table.reached(result.rto_s, result.rpo_s)
                rows.append(
                    {
                        "run_id": run.id,
                        "runbook": run.runbook_name,
                        "test_type": run.test_type or derive_test_type(run.kind, run.trigger, run.scenario),
                        "kind": run.kind,
                        "trigger": run.trigger,
                        "state": run.state,
                        "started_at": run.started_at.isoformat(),
                        "incident_at": result.incident_at.isoformat(),
                        "restored_at": result.restored_at.isoformat() if result.restored_at else None,
                        "rto_s": result.rto_s,
                        "rto_target_s": result.rto_target_s,
                        "rto_met": result.rto_met,
                        "rpo_s": result.rpo_s,
                        "rpo_target_s": result.rpo_target_s,
                        "rpo_met": result.rpo_met,
                        "capability_level": level.level if level else None,
                        "capability_level_name": level.name if level else None,
                    }
                )
        reached = [row["capability_level"] for row in rows if row["capability_level"] is not None]
        services.append(
            {
                "service": name,
                "tier": info.get("tier"),
                "criticality": info.get("criticality"),
                "critical": _is_critical(info),
                "rto_target_s": info.get("rto_s"),
                "rpo_target_s": info.get("rpo_s"),
                "exercised": bool(rows),
                "runs": rows,
                "all_targets_met": bool(rows) and all(r["rto_met"] and r["rpo_met"] for r in rows),
                "lowest_level": min(reached) if len(reached) == len(rows) and reached else None,
                "latest_level": rows[-1]["capability_level"] if rows else None,
            }
        )
    not_exercised = [
        _not_exercised(session, entry, period) for entry in services if not entry["exercised"]
    ]
    run_ids = [run.id for run in runs]
    findings = [f for f in list_findings(session, open_only=True) if service is None or f["run_id"] in run_ids]
    return {
        "quarter": period.label,
        "start": period.start.isoformat(),
        "end": period.end.isoformat(),
        "service_filter": service,
        "generated_at": utcnow().isoformat(),
        "runs_in_period": len(runs),
        "levels": {
            "source": table.source,
            "table": [vars(level) for level in table.levels],
        },
        "services": services,
        "not_exercised": not_exercised,
        "open_findings": findings,
    }


def _not_exercised(session: Session, entry: dict[str, Any], period: Quarter) -> dict[str, Any]:
    last = session.scalars(
        select(Run.started_at)
        .join(RunService, RunService.run_id == Run.id)
        .where(RunService.service == entry["service"], Run.started_at < period.end, Run.state.in_(FINAL_STATES))
        .order_by(Run.started_at.desc())
        .limit(1)
    ).first()
    overdue = last is None or period.end - last > DORA_MAX_GAP
    return {
        "service": entry["service"],
        "tier": entry["tier"],
        "criticality": entry["criticality"],
        "critical": entry["critical"],
        "last_exercised_at": last.isoformat() if last else None,
        "no_test_within_a_year": overdue,
    }


def quarter_charts(data: dict[str, Any]) -> dict[str, str]:
    """The RTO chart of each service, as SVG text."""
    start, end = datetime.fromisoformat(data["start"]), datetime.fromisoformat(data["end"])
    svgs = {}
    for entry in data["services"]:
        points = [
            charts.Point(datetime.fromisoformat(row["started_at"]), row["rto_s"], row["rto_met"])
            for row in entry["runs"]
            if row["rto_s"] is not None
        ]
        svgs[entry["service"]] = charts.rto_chart(entry["service"], points, entry["rto_target_s"], start, end)
    return svgs


def render_quarter(data: dict[str, Any]) -> str:
    svgs = {name: Markup(svg) for name, svg in quarter_charts(data).items()}  # drawn here, values escaped
    return _environment().get_template("quarter.html.j2").render(q=data, charts=svgs, generated_at=data["generated_at"])


def _csv_cell(value: Any) -> Any:
    if value is None:
        return ""
    if isinstance(value, bool):
        return "true" if value else "false"
    return value


def quarter_csv(data: dict[str, Any]) -> str:
    """One line per service and run; a service not exercised gets one line with ``exercised`` false."""
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=QUARTER_CSV_FIELDS, lineterminator="\n", extrasaction="ignore")
    writer.writeheader()
    for entry in data["services"]:
        base = {
            "quarter": data["quarter"],
            "service": entry["service"],
            "tier": entry["tier"],
            "criticality": entry["criticality"],
            "exercised": entry["exercised"],
        }
        for row in entry["runs"] or [{}]:
            writer.writerow({key: _csv_cell(value) for key, value in (base | row).items()})
    return buffer.getvalue()


def quarter_json(data: dict[str, Any]) -> str:
    return json.dumps(data, indent=2, default=str) + "\n"
