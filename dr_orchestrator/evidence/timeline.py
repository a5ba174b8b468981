"""A run's timeline as its DR test record and the auditor's rows show it: incident, detection,
declaration, switch, verification, failback, each with where its time comes from."""

from __future__ import annotations

from typing import Any

from dr_orchestrator.evidence.rto import DETECTED_MARKER
from dr_orchestrator.model.run import Phase

# Marks a runbook's steps may carry to pin the timeline (else the first and last step are used).
SWITCH_STARTED_MARKER = "switch_started"
SWITCH_FINISHED_MARKER = "switch_finished"


def _first(markers: list[dict[str, Any]], name: str) -> dict[str, Any] | None:
    named = [m for m in markers if m["marker"] == name]
    return min(named, key=lambda m: m["at"]) if named else None


def _last(markers: list[dict[str, Any]], name: str) -> dict[str, Any] | None:
    named = [m for m in markers if m["marker"] == name]
    return max(named, key=lambda m: m["at"]) if named else None


def timeline(detail: dict[str, Any], failbacks: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Incident, detection, declaration, switch start and end, service verified, failback: each
    with its time (None when the run recorded nothing for it) and where the time comes from."""
    run, markers = detail["run"], detail["markers"]
    forward = [s for s in detail["steps"] if s["phase"] == Phase.FORWARD and s["started_at"]]
    events: list[dict[str, Any]] = []

    def add(event: str, at: str | None, source: str, service: str | None = None) -> None:
        events.append({"event": event, "at": at, "source": source, "service": service})

    if run["incident_at"]:
        add("incident", run["incident_at"], "declared incident time")
    else:
        add("incident", run["started_at"], "no incident time declared: the run's start")
    detected = _first(markers, DETECTED_MARKER)
    if detected:
        add("detection", detected["at"], f"{DETECTED_MARKER} mark of step {detected['step_id']!r}")
    else:
        add("detection", None, f"no {DETECTED_MARKER} mark recorded")
    add("declaration", run["started_at"], "the run's start")
    started = _first(markers, SWITCH_STARTED_MARKER)
    if started:
        add("switch started", started["at"], f"{SWITCH_STARTED_MARKER} mark of step {started['step_id']!r}")
    elif forward:
        first = min(forward, key=lambda s: s["started_at"])
        add("switch started", first["started_at"], f"start of the first step, {first['step_id']!r}")
    else:
        add("switch started", None, "no step started")
    finished = _last(markers, SWITCH_FINISHED_MARKER)
    ended = [s for s in forward if s["finished_at"]]
    if finished:
        add("switch finished", finished["at"], f"{SWITCH_FINISHED_MARKER} mark of step {finished['step_id']!r}")
    elif ended:
        last = max(ended, key=lambda s: s["finished_at"])
        add("switch finished", last["finished_at"], f"end of the last step, {last['step_id']!r}")
    else:
        add("switch finished", None, "no step finished")
    for result in detail["results"]:
        if result["restored_at"]:
            add("service verified", result["restored_at"], "service_restored mark", result["service"])
        else:
            add("service verified", None, "never verified restored", result["service"])
    add("run finished", run["finished_at"], f"run {run['state']}")
    for failback in failbacks:
        add("failback", failback["started_at"], f"run {failback['id']} ({failback['state']})")
    return events
