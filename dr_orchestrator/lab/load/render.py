"""The load report (``report.build_report``'s data) as tables for a terminal."""

from __future__ import annotations

from datetime import datetime
from typing import Any

from rich.console import Group, RenderableType
from rich.table import Table
from rich.text import Text


def _clock(moment: str | None, missing: str) -> str:
    """Time of day with microseconds (the date is in the header): tables stay narrow enough for a terminal."""
    return datetime.fromisoformat(moment).strftime("%H:%M:%S.%f") if moment else missing


def render_report(report: dict[str, Any]) -> Group:
    run = report["run"]
    state = "running" if run["running"] else f"stopped {run['stopped_at'] or '(no clean stop recorded)'}"
    serving = ", ".join(f"{service} at {store['serving_site'] or 'no site'}"
                        for service, store in report["databases"].items())
    parts: list[RenderableType] = [
        Text(
            f"Load run {run['run_id']}: started {run['started_at']}, {state}; {run['rate']:g} requests/s per "
            f"service; databases taking writes now: {serving or 'none'}. Times are UTC."
        )
    ]
    parts += [Text(f"{service}: {store['note']}", style="bold yellow")
              for service, store in report["databases"].items() if store["note"]]
    totals = Table("service", "requests", "ok", "failed", "outages", "acked writes", "missing", "missing acked")
    outages = Table("service", "last ok", "first ok again", "seconds", "site before", "site after", "failed")
    for name, service in report["services"].items():
        lost = service["missing_writes"]
        lost_window = "-"
        if lost is not None and lost["count"]:
            lost_window = f"{_clock(lost['first_acked_at'], '?')} - {_clock(lost['last_acked_at'], '?')}"
        totals.add_row(
            name,
            str(service["requests"]),
            str(service["ok"]),
            str(service["failed"]),
            str(len(service["outage_windows"])),
            "-" if service["acknowledged_writes"] is None else str(service["acknowledged_writes"]),
            "-" if lost is None else f"{lost['count']} (at {lost['checked_site']})",  # where it last wrote
            lost_window,
        )
        for window in service["outage_windows"]:
            duration = window["duration_s"]
            outages.add_row(
                name,
                _clock(window["start"], "(none before)"),
                _clock(window["end"], "(still failing)"),
                "-" if duration is None else f"{duration:.3f}",
                window["site_before"] or "-",
                window["site_after"] or "-",
                str(window["failed_requests"]),
            )
    parts.append(totals)
    if outages.row_count:
        parts.append(outages)
    return Group(*parts)
