"""Approval gates: a runbook's policy for them, a decision as the gate reads it, and who acts
(the identity the two-person rule compares)."""

from __future__ import annotations

import enum
import re
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
    SAVED_PLAN = "saved-plan"  # approved before the run, for the saved plan the run executes


@dataclass(frozen=True)
class ApprovalDecision:
    decision: Decision
    actor: str
    reason: str
    at: datetime


# The shared superuser account: on it, SUDO_USER says which person is acting.
SUPERUSER = "root"
# The part of an actor text read from the process, always last: ``(os alice, sudo bob, ssh 10.0.0.5)``.
_FROM_PROCESS = re.compile(r"\(os (?P<os>[^\s,()]+)(?:, sudo (?P<sudo>[^\s,()]+))?(?:, ssh (?P<ssh>[^\s,()]+))?\)$")
_NOT_A_NAME = re.compile(r"[\s,()]")


@dataclass(frozen=True)
class Identity:
    """Who acts, as the evidence records it (a run's ``started_by``, an approval's ``actor``):
    ``LABEL (os ACCOUNT[, sudo USER][, ssh ADDRESS])``. The label is ``$DR_ACTOR`` (or the person)
    and proves nothing; the part in brackets is read from the process: the account of the real uid,
    ``SUDO_USER`` and the SSH client address. A text without it (an API token's name,
    ``scheduler``, records older than it) is a person of its own name."""

    label: str
    os_account: str | None = None
    sudo_user: str | None = None
    ssh_client: str | None = None

    @classmethod
    def parse(cls, text: str) -> Identity:
        text = text.strip()
        found = _FROM_PROCESS.search(text)
        if found is None:
            return cls(text)
        return cls(text[: found.start()].strip(), found["os"], found["sudo"], found["ssh"])

    @classmethod
    def of_process(cls, label: str | None, os_account: str, sudo_user: str | None, ssh_client: str | None
                   ) -> Identity:
        """What a process knows of itself; the label defaults to the person (the sudo user on root).
        Each part is cut so that the whole fits the evidence's 200-character name columns."""
        account = _as_name(os_account, 32)
        sudo, ssh = _as_name(sudo_user, 32) or None, _as_name(ssh_client, 45) or None
        person = sudo if account == SUPERUSER and sudo else account
        return cls((label or "").strip()[:64] or person, account, sudo, ssh)

    def __str__(self) -> str:
        if self.os_account is None:
            return self.label
        parts = [f"os {self.os_account}"]
        parts += [f"sudo {self.sudo_user}"] if self.sudo_user else []
        parts += [f"ssh {self.ssh_client}"] if self.ssh_client else []
        return f"{self.label} ({', '.join(parts)})"

    @property
    def people(self) -> frozenset[str]:
        """The names of whoever may be behind it: on the superuser account the sudo user alone (root is
        shared, sudo says who); elsewhere the account and, after ``sudo -u``, the user who ran sudo too."""
        if self.os_account is None:
            return frozenset({self.label})
        if self.os_account == SUPERUSER and self.sudo_user:
            return frozenset({self.sudo_user})
        return frozenset(name for name in (self.os_account, self.sudo_user) if name)

    @property
    def anonymous(self) -> bool:
        """The superuser without sudo: any of the people who can become root."""
        return self.os_account == SUPERUSER and not self.sudo_user


def _as_name(value: str | None, longest: int) -> str:
    return _NOT_A_NAME.sub("_", value or "")[:longest]


def second_person_refusal(run_id: str, starter: str, decider: str) -> str | None:
    """Why ``decider`` cannot be the second person on run ``run_id`` that ``starter`` started (a
    clause naming them), None when they can. ``$DR_ACTOR`` labels do not count, only who acts."""
    them, me = Identity.parse(starter), Identity.parse(decider)
    if me.anonymous:
        return f"{SUPERUSER} without sudo does not say which person you are"
    same = sorted(me.people & them.people)
    if same:
        return f"{', '.join(same)} started run {run_id}"
    return None


def same_person(one: str, other: str) -> bool:
    """Whether two actor texts may be the same human (they share a person's name)."""
    return bool(Identity.parse(one).people & Identity.parse(other).people)
