"""What people see in the terminal: live step progress, run summaries, timelines."""

from __future__ import annotations

import sys
import time
from typing import Any

from rich.console import Console
from rich.markup import escape
from rich.table import Table
from rich.text import Text

from dr_orchestrator.model.durations import format_duration
from dr_orchestrator.model.events import (
    ActionEvent,
    ApprovalDecided,
    ApprovalRequested,
    AttemptFinished,
    Event,
    MarkerReached,
    Measurement,
    RunFinished,
    RunResumed,
    RunStarted,
    StepFinished,
    StepStarted,
)
from dr_orchestrator.model.run import Phase

_STYLE = {
    "succeeded": "green", "failed": "red", "timed_out": "red", "skipped": "yellow", "cancelled": "yellow",
    "rolled_back": "magenta", "rollback_failed": "bold red", "aborted": "bold red", "running": "cyan",
    "waiting_approval": "cyan", "interrupted": "bold red",
}


def console(stderr: bool = False) -> Console:
    """Full-width output when piped (rich would wrap at 80 columns and cut run ids)."""
    stream = sys.stderr if stderr else sys.stdout
    return Console(file=stream, highlight=False, width=None if stream.isatty() else 200)


def _state(state: str) -> str:
    return f"[{_STYLE.get(state, 'white')}]{state}[/]"


class ProgressPrinter:
    """An engine observer printing one line per step change, with elapsed times (monotonic)."""

    def __init__(self, output: Console | None = None) -> None:
        self.console = output or console(stderr=True)
        self.run_started = time.monotonic()
        self.step_started: dict[tuple[str, str], float] = {}

    def __call__(self, event: Event) -> None:
        now = time.monotonic()
        elapsed = f"[dim]{now - self.run_started:7.3f}s[/]"
        if isinstance(event, RunStarted):
            self.run_started = now
            plan = event.plan
            self.console.print(f"run [bold]{event.run_id}[/] {plan.runbook.name} ({plan.kind}) "
                               f"by {plan.started_by} on {event.host}")
        elif isinstance(event, RunResumed):
            self.run_started = now
            self.console.print(f"run [bold]{event.run_id}[/] {event.plan.runbook.name} resumed by {event.actor} "
                               f"on {event.host}")
        elif isinstance(event, ApprovalRequested):
            rule = " (two-person rule: not by " + event.started_by + ")" if event.two_person else ""
            self.console.print(f"{elapsed}  {event.step_id:<28} {_state('waiting_approval')}{rule}: "
                               f"{event.message}\n{'':12}dr approve {event.run_id} {event.step_id}   or   "
                               f"dr reject {event.run_id} {event.step_id} --reason ...   "
                               f"(on timeout in {format_duration(event.timeout_s)}: {event.on_timeout})")
        elif isinstance(event, ApprovalDecided):
            self.console.print(f"{elapsed}  {event.step_id:<28} {event.decision} by {event.actor}"
                               + (f": {event.reason}" if event.reason else ""))
        elif isinstance(event, StepStarted):
            self.step_started[(event.step_id, event.phase)] = now
            label = "rolling back" if event.phase == Phase.ROLLBACK else "started"
            self.console.print(f"{elapsed}  {event.step_id:<28} {label}")
        elif isinstance(event, AttemptFinished) and event.state != "succeeded":
            self.console.print(f"{elapsed}  {event.step_id:<28} attempt {event.attempt} {_state(event.state)}: "
                               f"{event.error or ''}")
        elif isinstance(event, StepFinished):
            began = self.step_started.get((event.step_id, event.phase))
            took = f" in {format_duration(now - began)}" if began is not None else ""
            reason = f": {event.error}" if event.error and event.state != "succeeded" else ""
            self.console.print(f"{elapsed}  {event.step_id:<28} {_state(event.state)}{took}{reason}")
        elif isinstance(event, MarkerReached):
            self.console.print(f"{elapsed}  [bold]{event.marker}[/] {event.service or ''} at {event.at.isoformat()}")
        elif isinstance(event, Measurement):
            self.console.print(f"{elapsed}  measured {event.metric} = {event.value:g} ({event.method})")
        elif isinstance(event, ActionEvent) and event.kind in SHOWN_ACTION_EVENTS:
            self.console.print(f"{elapsed}  {SHOWN_ACTION_EVENTS[event.kind](event.data)}")
        elif isinstance(event, RunFinished):
            error = f": {event.error}" if event.error else ""
            self.console.print(f"{elapsed}  run {_state(event.state)}{error}")


def _clients(data: dict[str, Any]) -> str:
    text = str(data.get("text", ""))
    return f"[green]{text}[/]" if data.get("left_as_found") else f"[red bold]{text}[/]"


# Action events worth a line of their own while a run goes, and in its summary.
SHOWN_ACTION_EVENTS = {
    "blast_radius.verdict": _clients,
    "rollback.stopped": lambda data: (f"[yellow]rollback stopped[/]: {data.get('reason')}; not undone: "
                                      f"{', '.join(data.get('not_undone') or []) or 'nothing'}"),
}


def _figure(value: Any, target: Any, met: Any) -> str:
    if value is None:
        return "[yellow]not measured[/]"
    verdict = "[green]met[/]" if met else "[red]MISSED[/]"
    target_text = f" / target {format_duration(float(target))}" if target is not None else ""
    return f"{format_duration(float(value))}{target_text} {verdict}"


def figure_text(value: Any, target: Any, met: Any) -> str:
    """A figure against its target as the summary table shows it, without colour: for a log line."""
    return Text.from_markup(_figure(value, target, met)).plain


def print_results(detail: dict[str, Any] | None, out: Console | None = None) -> None:
    out = out or console()
    if detail is None:
        out.print("[red]the run is not in the evidence database[/]")
        return
    run = detail["run"]
    incident = f"  incident {run['incident_id']}" if run.get("incident_id") else ""
    out.print(f"\nrun {run['id']} {_state(run['state'])}  ({run['kind']}, {run['runbook_name']}){incident}")
    for event in detail.get("events") or []:
        if event["kind"] in SHOWN_ACTION_EVENTS:
            out.print(f"  {SHOWN_ACTION_EVENTS[event['kind']](event.get('data') or {})}")
    results = detail.get("results") or []
    if not results:
        return
    table = Table("service", "RTO achieved / target", "RPO achieved / target", title="recovery figures")
    for row in results:
        table.add_row(row["service"], _figure(row.get("rto_s"), row.get("rto_target_s"), row.get("rto_met")),
                      _figure(row.get("rpo_s"), row.get("rpo_target_s"), row.get("rpo_met")))
    out.print(table)
    for warning in dict.fromkeys(w for row in results for w in (row.get("raw") or {}).get("warnings") or []):
        out.print(f"[yellow bold]warning: {warning}[/] (give --incident-at, or the --incident of earlier attempts)")
    for row in results:
        out.print(f"  {row['service']}: RTO = {row.get('rto_method') or 'not measured'}")
        out.print(f"  {row['service']}: RPO = {row.get('rpo_method') or 'not measured'}")


def print_incident_list(rows: list[dict[str, Any]], out: Console | None = None) -> None:
    out = out or console()
    table = Table("incident", "created", "by", "impact start", "runs", "latest run", "title")
    for row in rows:
        table.add_row(row["id"], str(row["created_at"]), row["created_by"], str(row["impact_start"] or "-"),
                      str(row["runs"]), _state(row["latest_state"]) if row["latest_state"] else "-", row["title"])
    out.print(table)


def print_incident(detail: dict[str, Any], out: Console | None = None) -> None:
    out = out or console()
    incident = detail["incident"]
    out.print(f"incident [bold]{incident['id']}[/]  {incident['title']}")
    out.print(f"  created {incident['created_at']} by {incident['created_by']}; declared time: "
              f"{incident['declared_at'] or 'none'}")
    out.print(f"  impact start: {incident['impact_start'] or 'not known yet'}"
              + (f" ({incident['impact_start_method']})" if incident["impact_start_method"] else ""))
    if incident.get("target_kind"):
        out.print(f"  hits {incident['target_kind']} {incident['target_name']} (services: "
                  f"{', '.join(incident['services'] or []) or 'none named'}); level {incident['level'] or '-'}; "
                  f"source {incident['source']}; state {_state(incident['state'])}")
    table = Table("run", "kind", "state", "started", "service", "RTO achieved / target", "RPO achieved / target",
                  "counted from", title="runs, in the order they started")
    for run in detail["runs"]:
        label = run["kind"] + (f" of {run['failback_of'][:8]}" if run.get("failback_of") else "")
        results = run["results"] or [{}]
        for index, row in enumerate(results):
            first = index == 0
            table.add_row(run["id"] if first else "", label if first else "", _state(run["state"]) if first else "",
                          str(run["started_at"]) if first else "", row.get("service", "-"),
                          _figure(row.get("rto_s"), row.get("rto_target_s"), row.get("rto_met")) if row else "-",
                          _figure(row.get("rpo_s"), row.get("rpo_target_s"), row.get("rpo_met")) if row else "-",
                          str(row.get("incident_at") or "-"))
    out.print(table)
    for note in detail.get("notifications") or []:
        verdict = "[green]delivered[/]" if note.get("delivered") else "[red]NOT DELIVERED[/]"
        out.print(f"  notified {note.get('channel')} {note.get('target')} at {note.get('at')} (run "
                  f"{note['run_id'][:8]}, step {note['step_id']}): {verdict}"
                  + (f" ({note['detail']})" if note.get("detail") else ""))
    if detail.get("events"):
        _print_lifecycle(detail["timeline"], detail["events"], out)


def _print_lifecycle(timeline: dict[str, Any], events: list[dict[str, Any]], out: Console) -> None:
    """The incident's moments with the RTO's parts between them, then every event as recorded."""
    table = Table("moment", "at", "part", "took", title="lifecycle: RTO = detection + decision + execution")
    for moment, part in (("impact_start", None), ("detected", "detection"), ("decided", "decision"),
                         ("executing", None), ("restored", "execution"), ("closed", None)):
        took = timeline.get(f"{part}_s") if part else None
        table.add_row(moment.replace("_", " "), str(timeline[moment] or "-"), part or "",
                      format_duration(took) if took is not None else "")
    out.print(table)
    rto = timeline["rto_s"]
    out.print(f"  RTO {format_duration(rto) if rto is not None else 'not restored yet'}; runs: "
              f"{', '.join(run_id[:8] for run_id in timeline['run_ids']) or 'none'}")
    for event in events:
        said = event["data"].get("text") if event["kind"] == "message" else None
        out.print(f"  {event['at']} {event['kind']} by {escape(event['actor'])}: "
                  + escape(said if said is not None else _short(event["data"], 120)), highlight=False)


def print_run_list(rows: list[dict[str, Any]], out: Console | None = None) -> None:
    out = out or console()
    table = Table("run", "runbook", "kind", "state", "started", "by", "services")
    for row in rows:
        table.add_row(row["id"], row["runbook_name"], row["kind"], _state(row["state"]),
                      str(row["started_at"]), row.get("started_by") or "", ", ".join(row.get("services") or []))
    out.print(table)


def print_run_detail(detail: dict[str, Any], out: Console | None = None) -> None:
    out = out or console()
    run = detail["run"]
    out.print(f"run {run['id']}  {run['runbook_name']}  {run['kind']}  {_state(run['state'])}")
    for label, key in (("started by", "started_by"), ("on host", "orchestrator_host"), ("reason", "reason"),
                       ("incident at", "incident_at"), ("started at", "started_at"), ("finished at", "finished_at"),
                       ("runbook", "runbook_path"), ("runbook sha256", "runbook_sha256"),
                       ("inventory sha256", "inventory_sha256"), ("error", "error")):
        if run.get(key):
            out.print(f"  {label:<17} {run[key]}")
    table = Table("step", "phase", "state", "started", "finished", "attempts", "error / output")
    for step in detail.get("steps", []):
        attempts = step.get("attempts") or []
        note = step.get("error") or _short(step.get("output"))
        table.add_row(step["step_id"], step.get("phase", ""), _state(step["state"]), str(step.get("started_at") or ""),
                      str(step.get("finished_at") or ""), str(len(attempts)), note)
    out.print(table)
    probes = detail.get("probes") or []
    if probes:
        out.print(f"  {len(probes)} probes; first {probes[0]['at']}, last {probes[-1]['at']}")
    for approval in detail.get("approvals") or []:
        out.print(f"  {approval['decision']} {approval.get('step_id') or ''} by {approval['actor']} at "
                  f"{approval['at']}" + (f": {approval['reason']}" if approval.get("reason") else ""))
    for event in detail.get("run_events") or []:
        out.print(f"  {event['action']} by {event['actor']} at {event['at']} {_short(event.get('data'), 120)}")
    for marker in detail.get("markers") or []:
        out.print(f"  marker {marker['marker']} {marker.get('service') or ''} at {marker['at']}")
    for measurement in detail.get("measurements") or []:
        out.print(f"  measured {measurement['metric']} = {measurement['value']} ({measurement['method']}) "
                      f"raw {measurement.get('raw')}")
    print_results(detail, out)


def _short(value: Any, limit: int = 80) -> str:
    text = "" if not value else str(value)
    return text if len(text) <= limit else text[: limit - 1] + "…"
