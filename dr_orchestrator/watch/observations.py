"""What the watch sees and what it concludes: targets, observations and transitions."""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Literal


@dataclass(frozen=True)
class Target:
    """What is judged: a service (``trading``) or a whole site (``primary``)."""

    kind: Literal["service", "site"]
    name: str

    def __str__(self) -> str:
        return f"{self.kind} {self.name}"


@dataclass(frozen=True)
class Observation:
    """One probe's verdict on one target, from one independent source (the observer)."""

    observer: str  # "front-door", "direct:primary", "store", "haproxy", "replication:primary", ...
    target: Target
    ok: bool
    at: datetime  # aware UTC, when the probe was sent
    latency_s: float  # from sending to the answer (or to giving up)
    detail: str  # one line: "HTTP 503 ...", "connection refused", "timeout after 1.0s"

    @property
    def known_at(self) -> datetime:
        """When the verdict was known: the send time plus the wait for the answer."""
        return self.at + timedelta(seconds=self.latency_s)


@dataclass(frozen=True)
class Transition:
    """What the agreement rule concludes about a target."""

    target: Target
    state: Literal["suspect", "down", "recovered"]
    at: datetime  # when the rule concluded it (for "down": the detection time)
    impact_start: datetime  # the first failed observation of the current streak
    observers: tuple[str, ...]  # those that agree
    details: tuple[str, ...]  # their latest details, in the same order
