"""How values enter the evidence: JSON both backends accept, text without NUL, and what an auditor
calls a run. Pure functions, below every other evidence module (the store, incidents, annotations and
the reports all use them)."""

from __future__ import annotations

import enum
import math
from datetime import datetime
from typing import Any

from pydantic import BaseModel

from dr_orchestrator.model.run import RunKind

TEST_TYPES = ("planned switchover rehearsal", "unplanned failover rehearsal", "planned switchover (production)",
              "real failover", "failback")


def derive_test_type(kind: str, trigger: str, scenario: str | None) -> str:
    """What an auditor calls the run, from what ran: failbacks are failbacks; a failover run, or a run
    started by a real incident, is a real failover; a switchover run is a planned switchover in
    production (a rehearsal is only what is run as one); a rehearsal with a fault injected (a
    scenario) is an unplanned failover rehearsal, without one a planned one. A drill's runs carry
    their own ("drill: SCENARIO")."""
    if kind == RunKind.FAILBACK:
        return "failback"
    if trigger in ("automatic", "incident") or kind == RunKind.FAILOVER:
        return "real failover"
    if kind == RunKind.SWITCHOVER:
        return "planned switchover (production)"
    if scenario:
        return "unplanned failover rehearsal"
    return "planned switchover rehearsal"


def jsonable(value: Any) -> Any:
    """``value`` as plain JSON data both backends accept. What JSON cannot hold (datetimes, bytes,
    NaN, ...) becomes text, and NUL characters are escaped: PostgreSQL refuses them in text."""
    if isinstance(value, dict):
        return {clean_text(str(key)): jsonable(item) for key, item in value.items()}
    if isinstance(value, (list, tuple, set, frozenset)):
        return [jsonable(item) for item in value]
    if isinstance(value, str):
        return clean_text(value)
    if value is None or isinstance(value, (bool, int)):
        return value
    if isinstance(value, float):
        return value if math.isfinite(value) else str(value)
    if isinstance(value, enum.Enum):
        return jsonable(value.value)
    if isinstance(value, datetime):
        return value.isoformat()
    if isinstance(value, BaseModel):
        return jsonable(value.model_dump(mode="json"))
    return clean_text(str(value))


def clean_text(text: str) -> str:
    return text.replace("\x00", "\\x00")
