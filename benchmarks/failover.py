"""Figure 2: failover overhead. In a lab of the benchmark's own: the site failover's RTO (SIGKILL of the
primary site to the last of the three services verified, as recorded by runbooks/site-failover.yml
through runs.execute) next to its critical path's actions timed on their own against a second,
identically killed lab (each step of the runbook run alone through the bare engine; the attempt's
own duration, without the engine or the evidence store)."""

from __future__ import annotations

import tempfile
import time
from pathlib import Path
from typing import Any

import yaml

from benchmarks.common import REPO, Figure, running_lab, sqlite_database

NAME = "failover"
TITLE = "2. failover overhead: site failover RTO vs its critical path timed alone"
RUNBOOK = REPO / "runbooks" / "site-failover.yml"
RATIO_TARGET = 1.05
RTO_TARGET_S = 2.0
# RTO ends at the last service's verification; each service moves on its own chain (its store's
# promotion, its switch, its verification), after the checks and the fence they all wait for.
VERIFICATIONS = ("verify-trading", "verify-contract-signing", "verify-quotation")


def critical_steps(document: dict[str, Any]) -> list[str]:
    """The steps the verifications wait for, directly or not (and the verifications), in the runbook's order."""
    needs = {step["id"]: step.get("needs", []) for step in document["steps"]}
    wanted: set[str] = set()
    waiting = list(VERIFICATIONS)
    while waiting:
        step_id = waiting.pop()
        if step_id not in wanted:
            wanted.add(step_id)
            waiting += needs[step_id]
    return [step["id"] for step in document["steps"] if step["id"] in wanted]


def longest_chain(step_id: str, needs: dict[str, list[str]], alone: dict[str, float]) -> float:
    """Seconds from the run's start to the end of `step_id` when every step takes its time alone and
    starts as soon as what it needs is done (the engine's schedule)."""
    return alone[step_id] + max((longest_chain(need, needs, alone) for need in needs[step_id]), default=0.0)


def one_step_runbook(step_id: str, path: Path) -> Path:
    document = yaml.safe_load(RUNBOOK.read_text())
    step = next(s for s in document["steps"] if s["id"] == step_id)
    step["needs"] = []
    step.pop("rollback", None)
    path.write_text(yaml.safe_dump({**document, "name": f"alone-{step_id}", "steps": [step]}, sort_keys=False))
    return path


def time_alone(step_id: str, inventory: str, work: Path) -> float:
    """Seconds the step's action took on its own (verifications: the first good probe's latency)."""
    from dr_orchestrator.actions import default_registry
    from dr_orchestrator.engine import Engine
    from dr_orchestrator.model.events import AttemptFinished, Event, ProbeResult
    from dr_orchestrator.plans import build_plan

    plan = build_plan(str(one_step_runbook(step_id, work / f"{step_id}.yml")), inventory, kind="rehearsal")
    events: list[Event] = []

    def keep(event: Event) -> None:
        events.append(event)

    outcome = Engine(default_registry(), [keep]).run(plan)
    if outcome.state.value != "succeeded":
        errors = [e.error for e in events if isinstance(e, AttemptFinished) and e.error]
        raise RuntimeError(f"step {step_id} alone ended {outcome.state.value}: {outcome.error or ''} {errors}")
    if step_id.startswith("verify-"):
        good = [e.latency_ms / 1000 for e in events if isinstance(e, ProbeResult) and e.ok]
        return min(good)
    return sum(e.duration_s for e in events if isinstance(e, AttemptFinished))


def wait_until_fit(inventory: str, work: Path, deadline_s: float = 60.0) -> None:
    """Until every store's standby or replica is recent (its heartbeat replicated): a lab just up may not be yet."""
    prechecks = [step["id"] for step in yaml.safe_load(RUNBOOK.read_text())["steps"]
                 if step["id"].startswith("precheck-")]
    deadline = time.monotonic() + deadline_s
    while True:
        try:
            for step_id in prechecks:
                time_alone(step_id, inventory, work)
            return
        except RuntimeError:
            if time.monotonic() > deadline:
                raise
            time.sleep(0.5)


def critical_path(work: Path) -> tuple[float, dict[str, float]]:
    document = yaml.safe_load(RUNBOOK.read_text())
    needs = {step["id"]: step.get("needs", []) for step in document["steps"]}
    with running_lab() as lab:
        inventory = str(lab.config.inventory_path)
        wait_until_fit(inventory, work)
        lab.kill_site("primary")
        alone = {step_id: time_alone(step_id, inventory, work) for step_id in critical_steps(document)}
    return max(longest_chain(step_id, needs, alone) for step_id in VERIFICATIONS), alone


def site_failover_rto(work: Path) -> tuple[float, dict[str, Any]]:
    from sqlalchemy import select

    from dr_orchestrator.evidence.database import session_factory_for
    from dr_orchestrator.evidence.migrate import upgrade
    from dr_orchestrator.evidence.models import ServiceResult
    from dr_orchestrator.plans import build_plan
    from dr_orchestrator.runs import execute as runs

    with running_lab() as lab, sqlite_database() as url:
        upgrade(url)
        sessions = session_factory_for(url)
        plan = build_plan(str(RUNBOOK), str(lab.config.inventory_path), kind="rehearsal")
        wait_until_fit(str(lab.config.inventory_path), work)
        lab.kill_site("primary")
        plan = plan.model_copy(update={"incident_at": lab.killed_at})
        outcome = runs.execute(sessions, plan)
        if outcome.state.value != "succeeded":
            raise RuntimeError(f"the site failover ended {outcome.state.value}: {outcome.error or ''}")
        with sessions() as session:
            results = {r.service: r.rto_s for r in session.scalars(
                select(ServiceResult).where(ServiceResult.run_id == outcome.run_id))}
    measured = {name: value for name, value in results.items() if value is not None}
    if len(measured) != 3:
        raise RuntimeError(f"the run recorded RTOs {results}")
    return max(measured.values()), measured


def measure(quick: bool) -> list[Figure]:
    del quick  # one failover is already the smallest size
    with tempfile.TemporaryDirectory(prefix="dr-bench-failover-") as tmp:
        path_s, alone = critical_path(Path(tmp))
        rto_s, per_service = site_failover_rto(Path(tmp))
    parts = ", ".join(f"{step} {seconds * 1000:.0f}" for step, seconds in alone.items())
    services = ", ".join(f"{name} {seconds:.3f}" for name, seconds in sorted(per_service.items()))
    return [
        Figure("site failover RTO (kill -> all three services verified)", rto_s, "s", RTO_TARGET_S,
               note=f"per service s: {services}"),
        Figure("critical path, actions timed alone", path_s, "s", note=f"ms: {parts}"),
        Figure("RTO / critical path", rto_s / path_s, "x", RATIO_TARGET),
    ]
