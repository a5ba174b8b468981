"""Figure 1: the engine's overhead per step, 1,000 no-op steps in a chain and in parallel, through the
real composition (runs.execute: evidence store, locks, heartbeat) on SQLite and PostgreSQL.

`noop` is idempotent, so the store commits its steps' evidence behind the engine (group commit). A
third shape, "chain, write-ahead", marks every step `idempotent: false`: the engine then waits for
each attempt's start to be committed before the action runs, as it does for promotions and switches."""

from __future__ import annotations

import tempfile
from pathlib import Path

from benchmarks.common import REPO, Figure, Stopwatch, postgres_database, postgres_server, sqlite_database
from dr_orchestrator.model.run import RunPlan

NAME = "engine"
TITLE = "1. engine overhead per step (noop steps, evidence written)"
TARGET_MS = 2.0


SHAPES = {"chain": (True, None), "parallel": (False, None), "chain, write-ahead": (True, False)}


def runbook_text(steps: int, chain: bool, idempotent: bool | None = None) -> str:
    lines = ["name: bench-noop", "kind: rehearsal", "scope: {services: [quotation], sites: [primary]}", "steps:"]
    declared = "" if idempotent is None else f", idempotent: {str(idempotent).lower()}"
    for index in range(steps):
        needs = f"[s{index - 1}]" if chain and index else "[]"
        lines.append(f"  - {{id: s{index}, action: noop, needs: {needs}{declared}}}")
    return "\n".join(lines) + "\n"


def plan_for(steps: int, chain: bool, work: Path, idempotent: bool | None = None) -> RunPlan:
    from dr_orchestrator.plans import build_plan

    runbook = work / f"noop-{'chain' if chain else 'parallel'}-{idempotent}-{steps}.yml"
    runbook.write_text(runbook_text(steps, chain, idempotent))
    return build_plan(str(runbook), str(REPO / "inventories" / "local.yml"), kind="rehearsal", trigger="manual")


def timed_run(url: str, plan: RunPlan) -> float:
    from dr_orchestrator.evidence.database import session_factory_for
    from dr_orchestrator.evidence.migrate import upgrade
    from dr_orchestrator.runs import execute as runs

    upgrade(url)
    sessions = session_factory_for(url)
    with Stopwatch() as watch:
        outcome = runs.execute(sessions, plan)
    if outcome.state.value != "succeeded":
        raise RuntimeError(f"the noop run ended {outcome.state.value}")
    return watch.seconds


def measure(quick: bool) -> list[Figure]:
    steps = 50 if quick else 1000
    figures: list[Figure] = []
    with tempfile.TemporaryDirectory(prefix="dr-bench-engine-") as tmp:
        plans = {shape: plan_for(steps, chain, Path(tmp), idempotent) for shape, (chain, idempotent) in SHAPES.items()}
        with sqlite_database() as url:  # warm-up: imports and lazy set-up are not per-step overhead
            timed_run(url, plan_for(2, True, Path(tmp)))
        with postgres_server() as server:
            for backend in ("sqlite", "postgresql"):
                for shape, plan in plans.items():
                    database = sqlite_database() if backend == "sqlite" else postgres_database(server)
                    with database as url:
                        seconds = timed_run(url, plan)
                    per_step_ms = seconds * 1000 / steps
                    target = TARGET_MS if backend == "sqlite" and shape in ("chain", "parallel") else None
                    figures.append(Figure(f"{steps} steps, {shape}, {backend}: per step", per_step_ms, "ms", target,
                                          note=f"{steps / seconds:.0f} steps/s, run {seconds:.2f} s"))
    return figures
