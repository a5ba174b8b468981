"""How a run is composed and executed, the same way for `dr run` and the HTTP API: the actions
registry, the engine, the evidence store as its first observer (nothing happens unrecorded), and
the evidence database as where approval gates read decisions (`dr approve`, the API). Runs go
through ``supervision.execute``: the plan's locks (``LockHeld`` when another run holds one) and
the heartbeat that lets a crashed run be found and resumed."""

from __future__ import annotations

import threading
from collections.abc import Sequence

from sqlalchemy.orm import Session, sessionmaker

from dr_orchestrator import supervision
from dr_orchestrator.engine import RunOutcome
from dr_orchestrator.evidence.store import EvidenceStore
from dr_orchestrator.model.events import Observer
from dr_orchestrator.model.resume import ResumePoint
from dr_orchestrator.model.run import RunPlan
from dr_orchestrator.testhook import wrap_store


def execute(sessions: sessionmaker[Session], plan: RunPlan, *, observers: Sequence[Observer] = (),
            retention_years: int | None = None, run_id: str | None = None,
            stop: threading.Event | None = None, resume: ResumePoint | None = None) -> RunOutcome:
    """Run ``plan`` to its end (or go on with an interrupted run: ``resume`` and its ``run_id``),
    recording it in the evidence database of ``sessions``. Raises supervision.LockHeld, before
    anything ran, when another live run holds a service or site of the plan."""
    store = wrap_store(EvidenceStore(sessions, retention=retention_years))
    return supervision.execute(sessions, plan, [store, *observers], run_id=run_id, stop=stop, resume=resume)
