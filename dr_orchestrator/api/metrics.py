"""/metrics in Prometheus' text exposition format (0.0.4), written by hand: a handful of gauges
computed from the evidence at scrape time, no client library and no state in the process."""

from __future__ import annotations

import math
from collections.abc import Iterable
from datetime import datetime
from pathlib import Path
from typing import Any

from sqlalchemy.orm import Session

from dr_orchestrator.api import views
from dr_orchestrator.evidence import qualifying
from dr_orchestrator.evidence.annotations import SEVERITIES, overdue_findings
from dr_orchestrator.evidence.approvals import waiting_gates
from dr_orchestrator.evidence.reports import quarter_of
from dr_orchestrator.model.events import utcnow

CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"


def _label_value(value: str) -> str:
    return value.replace("\\", "\\\\").replace("\n", "\\n").replace('"', '\\"')


def _number(value: float) -> str:
    if math.isnan(value):
        return "NaN"
    if math.isinf(value):
        return "+Inf" if value > 0 else "-Inf"
    return repr(float(value))


class Exposition:
    def __init__(self) -> None:
        self.lines: list[str] = []

    def gauge(self, name: str, help_text: str, samples: Iterable[tuple[dict[str, str], float]]) -> None:
        self.lines += [f"# HELP {name} {help_text}", f"# TYPE {name} gauge"]
        for labels, value in samples:
            rendered = ",".join(f'{key}="{_label_value(text)}"' for key, text in labels.items())
            self.lines.append(f"{name}{{{rendered}}} {_number(value)}" if rendered else f"{name} {_number(value)}")

    def text(self) -> str:
        return "\n".join(self.lines) + "\n"


def _timestamp(moment: datetime) -> float:
    return moment.timestamp()


def render(session: Session, drills: dict[str, Any]) -> str:
    """The exposition; ``drills`` is what ``scheduling.service.schedules`` returns."""
    from dr_orchestrator.watch.warnings import recorded_warnings

    out = Exposition()
    targets = views.current_targets(session)
    tests = qualifying.period(session)  # what counts, as in the quarterly report: drills once, no failbacks
    for kind in ("rto", "rpo"):
        last = {service: results[-1] for service, results in qualifying.measured(tests, kind).items()}
        upper = kind.upper()
        out.gauge(f"dr_service_{kind}_seconds", f"{upper} achieved by the latest test of each service, seconds.",
                  (({"service": s}, float(getattr(r, f"{kind}_s"))) for s, r in sorted(last.items())))
        out.gauge(f"dr_service_{kind}_target_seconds",
                  f"{upper} target per service in the inventory of its newest run, seconds.",
                  (({"service": s}, t[f"{kind}_s"]) for s, t in sorted(targets.items())
                   if t.get(f"{kind}_s") is not None))
        out.gauge(f"dr_service_{kind}_measured_timestamp_seconds",
                  f"Incident time of the test the last {upper} comes from, Unix seconds.",
                  (({"service": s}, _timestamp(r.incident_at)) for s, r in sorted(last.items())))
    this_quarter = quarter_of(utcnow())
    standings = qualifying.standings(qualifying.period(session, this_quarter.start, this_quarter.end),
                                     sorted(targets))
    out.gauge("dr_service_targets_met", "1 when the service's latest test this quarter met both its RTO and RPO "
              "targets, else 0 (also when it has no test this quarter).",
              (({"service": s}, 1.0 if standing.all_targets_met else 0.0) for s, standing in standings.items()))
    out.gauge("dr_service_tests", "Tests of each service this quarter (drills once; failbacks and runs that "
              "changed nothing not counted).",
              (({"service": s}, float(standing.tests)) for s, standing in standings.items()))
    verdicts = views.last_drill_verdicts(session)
    judged = sorted(verdicts.items())
    out.gauge("dr_drill_last_verdict", "Last verdict per drill: 1 passed, 0 failed.",
              (({"drill": name}, 1.0 if record.verdict == "passed" else 0.0) for name, record in judged))
    out.gauge("dr_drill_last_run_timestamp_seconds", "When the last judged run of each drill started, Unix seconds.",
              (({"drill": name}, _timestamp(record.started_at)) for name, record in judged))
    scheduled = [(entry["name"], datetime.fromisoformat(entry["next"][0]["utc"]))
                 for entry in drills["drills"] if entry["next"]]
    out.gauge("dr_drill_next_fire_timestamp_seconds", "Next fire time per drill schedule, Unix seconds.",
              (({"drill": name}, _timestamp(at)) for name, at in scheduled))
    out.gauge("dr_drill_files_invalid", "Drill files that do not load (they never fire).",
              [({}, float(len({p["file"] for p in drills["problems"]})))])
    states = views.runs_by_state(session)
    out.gauge("dr_runs", "Runs in the evidence database by state.",
              (({"state": state}, float(count)) for state, count in sorted(states.items())))
    out.gauge("dr_pending_approvals", "Approval steps waiting for a decision.",
              [({}, float(len(waiting_gates(session))))])
    overdue = overdue_findings(session)
    out.gauge("dr_findings_overdue", "Open findings past their due date, by severity.",
              (({"severity": severity}, float(sum(1 for f in overdue if f["severity"] == severity)))
               for severity in SEVERITIES))
    out.gauge("dr_watch_warning", "Early warnings the watch raised and has not cleared, 1 each (kind, target, "
              "severity; the message is on the dashboard and in `dr watch warnings`).",
              (({"kind": w.kind, "target": w.target, "severity": w.severity}, 1.0) for w in recorded_warnings(session)))
    return out.text()


def drill_schedules(drills_dir: str) -> dict[str, Any]:
    """Schedules of ``drills_dir``, or none when the directory does not exist (an API without drills)."""
    from dr_orchestrator.scheduling.service import schedules

    if not Path(drills_dir).is_dir():
        return {"drills": [], "problems": []}
    return schedules(drills_dir, count=3)
