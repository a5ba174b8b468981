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

from dr_orchestrator.evidence import charts, qualifying
from dr_orchestrator.evidence.annotations import list_findings
from dr_orchestrator.evidence.auditor import FIGURE_FIELDS
from dr_orchestrator.evidence.dr_record import FINAL_STATES, dr_test_record
from dr_orchestrator.evidence.levels import LevelTable, load_levels
from dr_orchestrator.evidence.models import DrillExpectation, Run
from dr_orchestrator.model.events import utcnow

TEMPLATES = Path(__file__).with_name("templates")
DORA_MAX_GAP = timedelta(days=365)
QUARTER_CSV_FIELDS = (
    "quarter",
    "service",
    "tier",
    "criticality",
    "exercised",
    "id",
    "run_id",
    "name",
    "test_type",
    "trigger",
    "outcome",
    "started_at",
    *FIGURE_FIELDS,
    "targets_met",
    "drill_rto_expected_s",
    "drill_rpo_expected_s",
    "drill_restore_point_expected_s",
    "service_all_targets_met",
    "service_capability_level",
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
    """Per service, under ``qualifying.RULE`` (stated in the report): its tests of the quarter with
    achieved RTO/RPO against the targets (and a drill's own expectations beside them), whether its
    latest test met both targets, the capability level of the period (elements the inventory
    declares and the worst figures of its tests), its failbacks; the runs and drills that changed
    nothing (not executed, with the reason); services not exercised (with the last time they were,
    for DORA's yearly test of every critical function); open findings; the RTO chart per service.

    ``inventory_services``: name -> {rto_s, rpo_s, tier, criticality, capability}
    (``store.target_snapshot_of`` an inventory); default: the services of the inventories the
    quarter's runs used, as the newest of them stood."""
    period = quarter if isinstance(quarter, Quarter) else parse_quarter(quarter)
    table = levels or load_levels()
    found = qualifying.period(session, period.start, period.end)
    runs = list(session.scalars(
        select(Run).where(Run.started_at >= period.start, Run.started_at < period.end, Run.state.in_(FINAL_STATES))))
    known = _known_services(runs, inventory_services)
    for test in found.tests:
        for name, result in test.results.items():
            known.setdefault(name, {"rto_s": result.rto_target_s, "rpo_s": result.rpo_target_s})
    names = sorted(n for n in known if service is None or n == service)
    if service is not None and service not in known:
        names = [service]
        known[service] = {}
    expected = _drill_expectations(session, [t.drill.id for t in found.tests if t.drill is not None])

    services = []
    for name in names:
        info = known.get(name, {})
        rows = [_test_row(test, name, expected) for test in found.tests_of(name)]
        assessment = table.assess(info.get("capability") or {}, [(row["rto_s"], row["rpo_s"]) for row in rows])
        reached = assessment.level
        services.append(
            {
                "service": name,
                "tier": info.get("tier"),
                "criticality": info.get("criticality"),
                "critical": _is_critical(info),
                "rto_target_s": info.get("rto_s"),
                "rpo_target_s": info.get("rpo_s"),
                "exercised": bool(rows),
                "tests": rows,
                "all_targets_met": bool(rows) and rows[-1]["targets_met"],
                "latest_test": rows[-1]["id"] if rows else None,
                "capability_level": reached.level if reached else None,
                "capability_level_name": reached.name if reached else None,
                "capability_limited_by": list(assessment.limited_by),
                "capability_notes": list(assessment.notes),
                "capability_elements": dict(assessment.elements),
                "worst_rto_s": assessment.worst_rto_s,
                "worst_rpo_s": assessment.worst_rpo_s,
                "failbacks": [_test_row(f, name, expected) for f in found.failbacks if name in f.services],
            }
        )
    before_end = qualifying.period(session, end=period.end)
    not_exercised = [_not_exercised(before_end, entry, period) for entry in services if not entry["exercised"]]
    not_executed = [_not_executed_row(n) for n in found.not_executed
                    if service is None or service in n.services]
    run_ids = [run.id for run in runs]
    findings = [f for f in list_findings(session, open_only=True) if service is None or f["run_id"] in run_ids]
    return {
        "quarter": period.label,
        "start": period.start.isoformat(),
        "end": period.end.isoformat(),
        "service_filter": service,
        "generated_at": utcnow().isoformat(),
        "rule": qualifying.RULE,
        "started": found.started,
        "tests_executed": len(found.tests),
        "not_executed_count": len(found.not_executed),
        "failbacks_count": len(found.failbacks),
        "runs_in_period": found.engine_runs,
        "levels": {
            "source": table.source,
            "table": [vars(level) for level in table.levels],
        },
        "services": services,
        "not_executed": not_executed,
        "not_exercised": not_exercised,
        "open_findings": findings,
    }


def _drill_expectations(session: Session, drill_run_ids: list[str]) -> dict[tuple[str, str], dict[str, float]]:
    """(drill run, service) -> the drill's own rto, rpo and restore_point expectations, seconds."""
    found: dict[tuple[str, str], dict[str, float]] = {}
    query = select(DrillExpectation).where(DrillExpectation.drill_run_id.in_(drill_run_ids),
                                           DrillExpectation.target.is_not(None))
    for row in session.scalars(query):
        if row.target is not None:
            found.setdefault((row.drill_run_id, row.service), {})[row.kind] = row.target
    return found


def _test_row(test: qualifying.Test, service: str, expected: dict[tuple[str, str], dict[str, float]]
              ) -> dict[str, Any]:
    result = test.results.get(service)
    return {
        "id": test.id,
        "run_id": test.run_id,
        "name": test.name,
        "test_type": test.test_type,
        "trigger": test.trigger,
        "outcome": test.outcome,
        "drill": test.drill is not None,
        "started_at": test.started_at.isoformat(),
        "incident_at": result.incident_at.isoformat() if result else None,
        "restored_at": result.restored_at.isoformat() if result and result.restored_at else None,
        "rto_s": result.rto_s if result else None,
        "rto_target_s": result.rto_target_s if result else None,
        "rto_met": result.rto_met if result else None,
        "rto_method": result.rto_method if result else None,
        "rpo_s": result.rpo_s if result else None,
        "rpo_target_s": result.rpo_target_s if result else None,
        "rpo_met": result.rpo_met if result else None,
        "rpo_method": result.rpo_method if result else None,
        "targets_met": test.met(service),
        "drill_expectations": expected.get((test.id, service), {}) if test.drill is not None else {},
    }


def _not_executed_row(entry: qualifying.NotExecuted) -> dict[str, Any]:
    return {"id": entry.id, "what": entry.what, "name": entry.name, "trigger": entry.trigger, "state": entry.state,
            "started_at": entry.started_at.isoformat(), "services": entry.services, "reason": entry.reason}


def _not_exercised(before_end: qualifying.Period, entry: dict[str, Any], period: Quarter) -> dict[str, Any]:
    tests = before_end.tests_of(entry["service"])
    last = tests[-1].started_at if tests else None
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
            for row in entry["tests"]
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
        for row in entry["tests"] or [{}]:
            writer.writerow({key: _csv_cell(value) for key, value in (base | _csv_test(row, entry)).items()})
    return buffer.getvalue()


def _csv_test(row: dict[str, Any], entry: dict[str, Any]) -> dict[str, Any]:
    """A test row as the CSV has it: the drill's expectations as their own columns, and the
    service's level for the period (the same on each of its lines)."""
    if not row:
        return {}
    expectations = row["drill_expectations"]
    return row | {"drill_rto_expected_s": expectations.get("rto"), "drill_rpo_expected_s": expectations.get("rpo"),
                  "drill_restore_point_expected_s": expectations.get("restore_point"),
                  "service_all_targets_met": entry["all_targets_met"],
                  "service_capability_level": entry["capability_level"]}


def quarter_json(data: dict[str, Any]) -> str:
    return json.dumps(data, indent=2, default=str) + "\n"
