"""Approval gates: a runbook's policy for them, and a decision as the gate reads it."""

from __future__ import annotations

import enum
from dataclasses import dataclass
from datetime import datetime

from dr_orchestrator.model.inventory import Frozen


class OnTimeout(enum.StrEnum):
    REJECT = "reject"
    APPROVE = "approve"


class ApprovalPolicy(Frozen):
    """A runbook's ``approvals:`` block; an approval step's own parameters override it."""

    # The approver must not be the person who started the run.
    two_person: bool = False
    # What a gate decides when nobody decided before its timeout.
    on_timeout: OnTimeout = OnTimeout.REJECT


class Decision(enum.StrEnum):
    APPROVED = "approved"
    REJECTED = "rejected"


class DecisionSource(enum.StrEnum):
    ENGINEER = "engineer"  # `dr approve` / `dr reject` / the API: already recorded by whoever decided
    TIMEOUT = "timeout"  # nobody decided in time: the gate's on_timeout outcome
    PRE_APPROVED = "pre-approved"  # the run was pre-approved (a drill)


@dataclass(frozen=True)
class ApprovalDecision:
    decision: Decision
    actor: str
    reason: str
    at: datetime
