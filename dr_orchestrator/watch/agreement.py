"""The agreement rule: when one failing observer makes a target *suspect*, and when independent
observers agree it is *down*.

- An observer's streak runs from its first failed observation of a target until its next good one.
- A target is suspect as soon as any observer's latest observation of it failed.
- It is down when at least ``quorum`` observers (different names) have each been failing for at least
  ``confirm_s``, from their streak's first failure to their newest failing observation. Its impact
  start is the earliest first failure among those agreeing observers: observers are not equally quick
  (HAProxy checks a server once a second), and the first to see the outage saw its start. An observer
  that had already been failing alone moves it back: RTO is then overstated, never understated.
- It has recovered, after down or suspect, when every observer of it is good again. An observer that
  has said nothing about a target for ``silent_s`` (while others still report) no longer counts: e.g.
  ``direct:primary`` of a service that now serves from the backup site.

Deterministic: all time comes from the observations (send times; a verdict counts from when it was
known, ``Observation.known_at``), nothing runs by itself. Feed observations in the order they come.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from datetime import datetime, timedelta
from typing import Literal

from dr_orchestrator.watch.observations import Observation, Target, Transition

State = Literal["ok", "suspect", "down"]


@dataclass(frozen=True)
class _Streak:
    latest: Observation
    first_failure: datetime | None  # None while the latest observation is good


@dataclass
class _Judgement:
    state: State = "ok"
    impact_start: datetime | None = None
    streaks: dict[str, _Streak] = field(default_factory=dict)  # by observer


class Agreement:
    """Feed observations, get transitions."""

    def __init__(self, confirm_s: float = 0.5, quorum: int = 2, silent_s: float = 3.0) -> None:
        if confirm_s < 0 or silent_s <= 0:
            raise ValueError("confirm_s must be at least 0 and silent_s more than 0")
        if quorum < 1:
            raise ValueError("quorum must be at least 1")
        self.confirm_s = confirm_s
        self.quorum = quorum
        self.silent_s = silent_s
        self._confirm = timedelta(seconds=confirm_s)
        self._silent = timedelta(seconds=silent_s)
        self._judgements: dict[Target, _Judgement] = {}

    def state(self, target: Target) -> State:
        judgement = self._judgements.get(target)
        return judgement.state if judgement else "ok"

    def feed(self, observation: Observation) -> list[Transition]:
        judgement = self._judgements.setdefault(observation.target, _Judgement())
        before = judgement.streaks.get(observation.observer)
        if before is not None and observation.at < before.latest.at:
            return []  # older than what this observer already said
        first_failure = None
        if not observation.ok:
            first_failure = before.first_failure if before and before.first_failure else observation.at
        judgement.streaks[observation.observer] = _Streak(observation, first_failure)
        newest = max(streak.latest.at for streak in judgement.streaks.values())
        judgement.streaks = {name: streak for name, streak in judgement.streaks.items()
                             if newest - streak.latest.at <= self._silent}
        transition = self._judge(observation.target, judgement, observation.known_at)
        return [transition] if transition else []

    def _judge(self, target: Target, judgement: _Judgement, now: datetime) -> Transition | None:
        failing = {name: s for name, s in judgement.streaks.items() if s.first_failure is not None}
        if not failing:
            if judgement.state == "ok":
                return None
            assert judgement.impact_start is not None  # set when the state left ok
            judgement.state = "ok"
            return _transition(target, "recovered", now, judgement.impact_start, judgement.streaks)
        if judgement.state == "down":
            return None
        agreeing = {name: s for name, s in failing.items() if _failing_for(s) >= self._confirm}
        if len(agreeing) >= self.quorum:
            judgement.state = "down"
            judgement.impact_start = min(_first_failure(s) for s in agreeing.values())
            return _transition(target, "down", now, judgement.impact_start, agreeing)
        if judgement.state == "ok":
            judgement.state = "suspect"
            judgement.impact_start = min(_first_failure(s) for s in failing.values())
            return _transition(target, "suspect", now, judgement.impact_start, failing)
        return None

def _first_failure(streak: _Streak) -> datetime:
    assert streak.first_failure is not None  # only failing streaks are asked
    return streak.first_failure


def _failing_for(streak: _Streak) -> timedelta:
    return streak.latest.at - _first_failure(streak)


def _transition(target: Target, state: Literal["suspect", "down", "recovered"], at: datetime,
                impact_start: datetime, streaks: dict[str, _Streak]) -> Transition:
    ordered = sorted(streaks.items(), key=lambda item: (item[1].first_failure or item[1].latest.at, item[0]))
    return Transition(target, state, at, impact_start, tuple(name for name, _ in ordered),
                      tuple(streak.latest.detail for _, streak in ordered))
