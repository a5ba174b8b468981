"""The lab demo, the README's first command: two sites, a killed primary, a measured failover.

It sits beside the CLI (it composes the product with the lab, which product code never imports)
and does what an engineer would: start the lab (each service with its own store: trading's
PostgreSQL replicating synchronously, contract-signing's asynchronously, quotation's Redis cache with
a replica), put a steady load on it, kill the primary site, run ``runbooks/site-failover.yml`` with
the kill time as the incident time, compare the recorded RTO/RPO with what the load generator's
clients saw, keep all of it in the evidence database, fail back, show the services home again, and
take the lab down.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Any

from rich.console import Console
from rich.table import Table

from dr_orchestrator.evidence import queries
from dr_orchestrator.evidence.annotations import record_reconciliation
from dr_orchestrator.evidence.database import database_url, session_factory_for
from dr_orchestrator.evidence.migrate import upgrade
from dr_orchestrator.lab import Lab, LabConfig
from dr_orchestrator.lab.load import load_report, start_load, stop_load
from dr_orchestrator.model.durations import format_duration
from dr_orchestrator.plans import build_plan
from dr_orchestrator.progress import ProgressPrinter, console
from dr_orchestrator.runs import execute as runs

REPO = Path(__file__).resolve().parent.parent
RUNBOOKS = REPO / "runbooks"
SERVICES = ("trading", "contract-signing", "quotation")
# How far the recorded RTO may stray from the outage the clients saw (issue #4's bar).
AGREEMENT_S = 0.5
# A lost write was acknowledged after its commit, so it lies inside the RPO window; this is clock jitter.
RPO_AGREEMENT_S = 0.05
WARM_UP_OK = 20  # good answers per service before the fault, so the ledger shows a steady state
DEADLINE_S = 60.0


class DemoError(Exception):
    """The demo could not be carried out; one sentence."""


@dataclass
class Verdict:
    failover_run: str = ""
    failback_run: str = ""
    problems: list[str] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return not self.problems


def run_demo(config: LabConfig, database: str | None = None, out: Console | None = None) -> Verdict:
    out = out or console()
    lab = Lab(config)
    if lab.is_up():
        raise DemoError(f"a lab is already running at {config.root}; take it down with `dr lab down` first")
    url = database_url(database)
    upgrade(url)
    sessions = session_factory_for(url)
    verdict = Verdict()
    started = time.monotonic()
    try:
        out.rule("1. two sites; each service with its own store and replica")
        result = lab.up()
        out.print(f"lab up in {result.seconds:.1f} s")
        for line in result.layout:
            out.print(f"  {line}")
        inventory = str(config.inventory_path)

        out.rule("2. steady load through the front door")
        start_load(config)
        _wait_for(lambda: _all_answering(config), "the load generator's first answers")
        out.print(f"load running: every service answered at least {WARM_UP_OK} requests")

        # Plans are checked before the fault: a mistake must not cost a site.
        failover = build_plan(str(RUNBOOKS / "site-failover.yml"), inventory, kind="rehearsal", trigger="manual",
                              reason="lab demo: primary site killed")
        failback = build_plan(str(RUNBOOKS / "site-failback.yml"), inventory, kind="failback",
                              reason="lab demo: return to the primary site")

        out.rule("3. power loss at the primary site")
        killed = lab.kill_site("primary")
        incident_at = lab.killed_at
        assert incident_at is not None
        out.print(f"SIGKILL at {incident_at.isoformat()}: {', '.join(killed)}")

        out.rule("4. unplanned site failover (runbooks/site-failover.yml)")
        plan = failover.model_copy(update={
            "incident_at": incident_at, "scenario": "site loss: every process of the primary site SIGKILLed"})
        outcome = runs.execute(sessions, plan, observers=[ProgressPrinter()])
        verdict.failover_run = outcome.run_id
        if outcome.state != "succeeded":
            verdict.problems.append(f"the failover run {outcome.run_id} ended {outcome.state}")
        _wait_for(lambda: _recovered(config), "the clients' first answers after the failover")
        stop_load(config)
        truth = load_report(config)
        with sessions() as session:
            detail = queries.run_detail(session, outcome.run_id)
        assert detail is not None
        _compare(out, detail, truth, verdict, incident_at)
        _reconcile(sessions, outcome.run_id, truth)

        out.rule("5. failback once the primary site has power again (runbooks/site-failback.yml)")
        lab.start_site("primary")
        back = runs.execute(sessions, failback.model_copy(update={"failback_of": outcome.run_id}),
                              observers=[ProgressPrinter()])
        verdict.failback_run = back.run_id
        if back.state != "succeeded":
            verdict.problems.append(f"the failback run {back.run_id} ended {back.state}")
        _show_home(out, config, verdict)
    finally:
        out.rule("6. lab down")
        stop_load(config)
        lab.down()
        out.print(f"lab down; evidence kept in {url}")
    out.print(f"demo took {time.monotonic() - started:.0f} s; see `dr runs show {verdict.failover_run}`")
    return verdict


def _wait_for(condition: Any, what: str, deadline_s: float = DEADLINE_S) -> None:
    deadline = time.monotonic() + deadline_s
    while not condition():
        if time.monotonic() > deadline:
            raise DemoError(f"gave up waiting for {what} after {deadline_s:.0f} s")
        time.sleep(0.2)


def _all_answering(config: LabConfig) -> bool:
    services = load_report(config)["services"]
    return all(services.get(name, {}).get("ok", 0) >= WARM_UP_OK for name in SERVICES)


def _recovered(config: LabConfig) -> bool:
    """Every service answers the clients from the backup site and no outage of theirs is ongoing. A
    client may have seen no outage at all: a request caught by the switch is redispatched by the front
    door and answered from the backup site."""
    services = load_report(config)["services"]
    return all(
        seen.get("answers_by_site", {}).get("backup", 0) > 0
        and not any(window["ongoing"] for window in seen.get("outage_windows", ()))
        for seen in (services.get(name, {}) for name in SERVICES)
    )


def _compare(out: Console, detail: dict[str, Any], truth: dict[str, Any], verdict: Verdict,
             incident_at: datetime) -> None:
    """The orchestrator's figures next to the clients' ground truth: the recorded RTO against the
    clients' outage, the recorded RPO against the acknowledged writes the promoted store lacks (every
    one of them must lie inside the RPO window before the incident)."""
    table = Table("service", "RTO recorded", "clients' outage", "difference", "RPO recorded",
                  "acked writes missing", "within target", title="failover: recorded vs. seen by clients")
    results = {row["service"]: row for row in detail["results"]}
    for name in SERVICES:
        figures = results.get(name, {})
        seen = truth["services"][name]
        window = max(seen["outage_windows"], key=lambda w: w["duration_s"]) if seen["outage_windows"] else None
        rto_s, rpo_s = figures.get("rto_s"), figures.get("rpo_s")
        missing = seen.get("missing_writes")
        missing_count = missing["count"] if missing else None
        difference = abs(rto_s - window["duration_s"]) if rto_s is not None and window else None
        met = bool(figures.get("rto_met")) and bool(figures.get("rpo_met"))
        table.add_row(
            name,
            _seconds(rto_s, figures.get("rto_target_s")),
            format_duration(window["duration_s"]) if window else "none seen",
            format_duration(difference) if difference is not None else "-",
            _seconds(rpo_s, figures.get("rpo_target_s")),
            "-" if missing_count is None else str(missing_count),
            "[green]yes[/]" if met else "[red]NO[/]",
        )
        if not met:
            verdict.problems.append(f"{name}: RTO {rto_s} s / RPO {rpo_s} s against its targets")
        if difference is not None and difference > AGREEMENT_S:
            verdict.problems.append(f"{name}: recorded RTO differs from the clients' outage by {difference:.3f} s")
        if missing_count and rpo_s == 0:
            verdict.problems.append(f"{name}: RPO recorded 0 but {missing_count} acknowledged writes are missing")
        elif missing_count and rpo_s is not None and missing.get("first_acked_at"):
            oldest_loss_s = (incident_at - datetime.fromisoformat(missing["first_acked_at"])).total_seconds()
            if oldest_loss_s > rpo_s + RPO_AGREEMENT_S:
                verdict.problems.append(
                    f"{name}: RPO recorded {rpo_s:.3f} s but an acknowledged write {oldest_loss_s:.3f} s before "
                    f"the incident is missing")
    out.print(table)


def _seconds(value: float | None, target: float | None) -> str:
    if value is None:
        return "not measured"
    if target is None:
        return format_duration(value)
    return f"{format_duration(value)} (target {format_duration(target)})"


def _reconcile(sessions: Any, run_id: str, truth: dict[str, Any]) -> None:
    """Keep the clients' view in the run's record: the data-integrity reconciliation."""
    with sessions() as session, session.begin():
        for name in SERVICES:
            missing = truth["services"][name].get("missing_writes")
            if missing is None:
                continue
            record_reconciliation(
                session, run_id, service=name, acknowledged_writes=missing["acknowledged"],
                missing_writes=missing["count"],
                window_start=_time(missing.get("first_acked_at")), window_end=_time(missing.get("last_acked_at")),
                details={"checked_site": missing["checked_site"], "missing_keys": missing["keys"][:100],
                         "outage_windows": truth["services"][name]["outage_windows"]},
            )


def _time(value: str | None) -> datetime | None:
    return datetime.fromisoformat(value) if value else None


def _show_home(out: Console, config: LabConfig, verdict: Verdict) -> None:
    import httpx

    table = Table("service", "front door", "answered from", "database", title="after failback")
    with httpx.Client(timeout=2.0) as client:
        for name in SERVICES:
            url = f"{config.frontend_url(name)}/health"
            try:
                body = client.get(url).json()
            except (httpx.HTTPError, ValueError) as exc:
                body = {"site": f"no answer ({exc})", "db_role": "-"}
            table.add_row(name, url, str(body.get("site")), str(body.get("db_role")))
            if body.get("site") != "primary":
                verdict.problems.append(f"{name} is not served from the primary site after failback")
    out.print(table)
