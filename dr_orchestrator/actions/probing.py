"""Probe a target at a fixed rate until N probes in a row are good: the loop behind the health checks.

The send time (UTC) of the first probe of the good streak is what RTO is measured from, so probes
are scheduled on the monotonic clock at fixed intervals (no drift from probe latency), and no sleep
runs past the deadline.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass
from datetime import datetime
from typing import Any

from pydantic import Field, field_validator

from dr_orchestrator.actions.base import ActionCancelled, ActionContext, ActionError, Params
from dr_orchestrator.model.durations import Duration, format_duration
from dr_orchestrator.model.events import utcnow


class ProbingParams(Params):
    """What every check that probes until a streak of good probes shares."""

    consecutive: int = Field(
        default=1, description="Good probes needed in a row; the first of them is when the target counts as healthy."
    )
    interval: Duration = Field(
        default=0.1, description="Time between probe starts, in seconds or as a duration such as 100ms."
    )
    probe_timeout: Duration = Field(
        default=1.0, description="How long one probe may take before it counts as failed (seconds or duration)."
    )
    deadline: Duration | None = Field(
        default=None,
        description="Give up after this long (seconds or duration); by default, when the step's timeout passes.",
    )

    @field_validator("consecutive")
    @classmethod
    def _at_least_one(cls, value: int) -> int:
        if value < 1:
            raise ValueError("consecutive must be 1 or more")
        return value

    @field_validator("interval", "probe_timeout")
    @classmethod
    def _positive(cls, value: float) -> float:
        if value <= 0:
            raise ValueError("must be more than zero (e.g. 100ms)")
        return value


@dataclass(frozen=True)
class Verdict:
    """One probe's outcome; ``detail`` says what it saw (and, when bad, which expectation failed)."""

    ok: bool
    detail: str


@dataclass(frozen=True)
class Streak:
    probes: int
    failed: int
    first_good_at: datetime  # send time of the first probe of the streak: what RTO counts
    last_good_at: datetime
    elapsed_s: float

    def output(self) -> dict[str, Any]:
        return {
            "probes": self.probes,
            "failed_probes": self.failed,
            "first_good_at": self.first_good_at.isoformat(),
            "last_good_at": self.last_good_at.isoformat(),
            "elapsed_s": round(self.elapsed_s, 6),
        }


def probe_until_streak(
    ctx: ActionContext,
    target: str,
    probe: Callable[[float], Verdict],
    params: ProbingParams,
) -> Streak:
    """Call ``probe(timeout_s)`` every ``params.interval`` until ``params.consecutive`` good ones in a row.

    Raises ActionError at the deadline (``params.deadline`` from now, capped by the step's), naming
    the last failure, and ActionCancelled when the step is cancelled.
    """
    start = time.monotonic()
    end = ctx.deadline if params.deadline is None else min(ctx.deadline, start + params.deadline)
    probes = failed = 0
    streak: list[datetime] = []  # send times of the current run of good probes
    last_failure = ""
    # Slot n is due at anchor + n * interval (multiplied, not summed, so rounding does not creep in).
    anchor, slot = start, 0
    next_at = start

    def summary() -> str:
        counts = f"{probes} probe{'s' if probes != 1 else ''}, {failed} failed"
        if streak:
            counts += f", the last {len(streak)} good"
        return f"{counts}; last failure: {last_failure}" if last_failure else counts

    while True:
        if ctx.cancelled.is_set():
            raise ActionCancelled(f"{target}: cancelled while checking ({summary()})")
        now = time.monotonic()
        if next_at >= end:
            window = format_duration(end - start)
            if probes == 0:
                raise ActionError(f"{target}: the deadline ({window}) passed before the first probe")
            wanted = "good probe" if params.consecutive == 1 else f"{params.consecutive} consecutive good probes"
            raise ActionError(f"{target}: no {wanted} within {window} ({summary()})")
        if next_at > now:
            ctx.cancelled.wait(next_at - now)  # wakes at once on cancel, reported at the loop's top
            continue

        sent_at, sent = utcnow(), time.monotonic()
        verdict = probe(max(0.001, min(params.probe_timeout, end - sent)))
        latency_ms = (time.monotonic() - sent) * 1000
        ctx.probe(target, verdict.ok, sent_at, latency_ms, verdict.detail)
        probes += 1
        if verdict.ok:
            streak.append(sent_at)
            if len(streak) >= params.consecutive:
                return Streak(probes, failed, streak[0], sent_at, time.monotonic() - start)
        else:
            failed += 1
            streak.clear()
            last_failure = verdict.detail

        slot += 1
        next_at = anchor + slot * params.interval
        late = time.monotonic()
        if next_at < late:
            # The probe outlasted the interval (a hung target): probe again at once and keep the
            # fixed rate from here, rather than bursting to catch up the missed slots.
            anchor, slot, next_at = late, 0, late
