"""The agreement rule (dr_orchestrator.watch.agreement) on synthetic observations: suspect vs down."""

from __future__ import annotations

from collections.abc import Iterable
from datetime import UTC, datetime, timedelta

import pytest

from dr_orchestrator.watch.agreement import Agreement
from dr_orchestrator.watch.observations import Observation, Target, Transition

T0 = datetime(2026, 12, 7, 3, 0, tzinfo=UTC)
TRADING = Target("service", "trading")
PRIMARY = Target("site", "primary")
SERVICE_OBSERVERS = ("front-door", "direct:primary", "store", "haproxy")
SITE_OBSERVERS = ("direct:primary", "store-host:primary", "replication:primary", "haproxy:primary")
STEP_S = 0.1  # a probe round every 100 ms


def at(seconds: float) -> datetime:
    return T0 + timedelta(seconds=seconds)


def observation(observer: str, seconds: float, ok: bool, target: Target = TRADING,
                latency_s: float = 0.002) -> Observation:
    return Observation(observer, target, ok, at(seconds), latency_s, "ok" if ok else f"{observer}: connection refused")


def rounds(start_s: float, end_s: float, failing: Iterable[str], target: Target = TRADING,
           observers: Iterable[str] = SERVICE_OBSERVERS) -> list[Observation]:
    """One observation per observer every STEP_S from start_s up to end_s (excluded); ``failing`` fail."""
    failing, observers = set(failing), tuple(observers)
    count = round((end_s - start_s) / STEP_S)
    return [observation(name, start_s + i * STEP_S, name not in failing, target)
            for i in range(count) for name in observers]


def feed(agreement: Agreement, observations: Iterable[Observation]) -> list[Transition]:
    return [transition for item in observations for transition in agreement.feed(item)]


def test_a_kill_is_down_after_confirm_s_with_the_kill_as_impact_start() -> None:
    agreement = Agreement(confirm_s=0.5)
    healthy = feed(agreement, rounds(0.0, 1.0, failing=()))
    transitions = feed(agreement, rounds(1.0, 3.0, failing=SERVICE_OBSERVERS))
    assert healthy == []
    assert [t.state for t in transitions] == ["suspect", "down"]
    suspect, down = transitions
    assert suspect.impact_start == at(1.0)
    assert down.impact_start == at(1.0)
    assert down.at == at(1.5) + timedelta(seconds=0.002)  # the round that reached 0.5 s, once answered
    assert set(down.observers) == {"front-door", "direct:primary"}  # the quorum, as soon as it formed
    assert all("connection refused" in detail for detail in down.details)
    assert agreement.state(TRADING) == "down"


def test_a_300ms_stall_answered_late_is_never_down() -> None:
    agreement = Agreement()
    # Probes sent during the stall hang, then answer well: slow, not failed.
    stalled = [observation(name, 1.0 + i * STEP_S, True, latency_s=0.3 - i * STEP_S)
               for i in range(3) for name in SERVICE_OBSERVERS]
    assert feed(agreement, [*rounds(0.0, 1.0, ()), *stalled, *rounds(1.3, 3.0, ())]) == []


def test_a_300ms_stall_that_times_probes_out_is_suspect_never_down() -> None:
    agreement = Agreement()
    transitions = feed(agreement, [*rounds(0.0, 1.0, ()), *rounds(1.0, 1.3, SERVICE_OBSERVERS),
                                   *rounds(1.3, 3.0, ())])
    assert [t.state for t in transitions] == ["suspect", "recovered"]
    assert agreement.state(TRADING) == "ok"


@pytest.mark.parametrize("dropped_at", [0.5, 1.0, 2.3])
def test_a_single_dropped_probe_is_never_down(dropped_at: float) -> None:
    agreement = Agreement()
    stream = [item for item in rounds(0.0, 3.0, ())
              if not (item.observer == "front-door" and item.at == at(dropped_at))]
    stream.insert(0, observation("front-door", dropped_at, False))
    stream.sort(key=lambda item: item.at)
    transitions = feed(agreement, stream)
    assert [t.state for t in transitions] == ["suspect", "recovered"]
    assert transitions[0].observers == ("front-door",)


def test_one_observer_failing_for_a_minute_alone_is_suspect_never_down() -> None:
    agreement = Agreement()
    transitions = feed(agreement, rounds(0.0, 60.0, failing=["haproxy"]))
    assert [t.state for t in transitions] == ["suspect"]
    assert transitions[0].impact_start == at(0.0)
    assert agreement.state(TRADING) == "suspect"


def test_recovered_once_every_observer_is_good_again() -> None:
    agreement = Agreement()
    transitions = feed(agreement, [*rounds(0.0, 2.0, SERVICE_OBSERVERS),
                                   *rounds(2.0, 2.5, ["haproxy"]),  # one straggler still failing
                                   *rounds(2.5, 4.0, ())])
    assert [t.state for t in transitions] == ["suspect", "down", "recovered"]
    recovered = transitions[-1]
    assert recovered.at == at(2.5) + timedelta(seconds=0.002)
    assert recovered.impact_start == at(0.0)
    assert set(recovered.observers) == set(SERVICE_OBSERVERS)


def test_impact_start_is_the_earliest_failure_of_the_agreeing_observers() -> None:
    agreement = Agreement()
    stream = [*rounds(0.0, 1.0, ()), *rounds(1.0, 1.1, ["store"]), *rounds(1.1, 1.3, ["store", "front-door"]),
              *rounds(1.3, 3.0, ["store", "front-door", "direct:primary"])]
    down = [t for t in feed(agreement, stream) if t.state == "down"]
    assert len(down) == 1
    assert down[0].impact_start == at(1.0)  # the store's first failure
    assert down[0].at == at(1.6) + timedelta(seconds=0.002)  # front-door failing for 0.5 s, with the store
    assert down[0].observers == ("store", "front-door")


def test_a_slow_observer_joining_late_does_not_move_impact_start_forward() -> None:
    agreement = Agreement()
    # direct:primary sees the kill at once; HAProxy's health check fails 0.6 s later.
    stream = [*rounds(0.0, 1.0, ()), *rounds(1.0, 1.6, ["direct:primary"]),
              *rounds(1.6, 3.0, ["direct:primary", "haproxy"])]
    down = [t for t in feed(agreement, stream) if t.state == "down"]
    assert len(down) == 1
    assert down[0].impact_start == at(1.0)
    assert down[0].observers == ("direct:primary", "haproxy")


def test_an_observer_already_failing_alone_moves_impact_start_back_never_forward() -> None:
    agreement = Agreement()
    stream = [*rounds(0.0, 30.0, ["haproxy"]), *rounds(30.0, 32.0, ["haproxy", "front-door", "direct:primary"])]
    down = [t for t in feed(agreement, stream) if t.state == "down"]
    assert len(down) == 1
    assert down[0].impact_start == at(0.0)  # RTO overstated rather than understated
    assert down[0].observers[0] == "haproxy"


def test_an_observer_that_falls_silent_no_longer_holds_recovery_back() -> None:
    agreement = Agreement(silent_s=3.0)
    # The service fails over: direct:primary stops reporting, direct:backup takes its place.
    stream = [*rounds(0.0, 2.0, SERVICE_OBSERVERS),
              *rounds(2.0, 8.0, (), observers=("front-door", "direct:backup", "store", "haproxy"))]
    transitions = feed(agreement, stream)
    assert [t.state for t in transitions] == ["suspect", "down", "recovered"]
    assert transitions[-1].at > at(1.9 + 3.0)
    assert "direct:primary" not in transitions[-1].observers


def test_sites_and_services_are_judged_apart() -> None:
    agreement = Agreement()
    # Trading alone is killed at the primary site: trading goes down, the site stays well.
    site = rounds(0.0, 3.0, (), target=PRIMARY, observers=SITE_OBSERVERS)
    service = rounds(0.0, 3.0, ["front-door", "direct:primary"])
    transitions = feed(agreement, sorted([*site, *service], key=lambda item: item.at))
    assert {(t.target, t.state) for t in transitions} == {(TRADING, "suspect"), (TRADING, "down")}
    assert agreement.state(PRIMARY) == "ok"
    # Then the whole site: the site observers agree too.
    transitions = feed(agreement, rounds(3.0, 4.0, ["direct:primary", "store-host:primary", "replication:primary"],
                                         target=PRIMARY, observers=SITE_OBSERVERS))
    assert [(t.target, t.state) for t in transitions] == [(PRIMARY, "suspect"), (PRIMARY, "down")]
    assert transitions[-1].impact_start == at(3.0)


def test_the_same_observer_twice_is_not_a_quorum() -> None:
    agreement = Agreement(quorum=2)
    transitions = feed(agreement, [observation("front-door", i * STEP_S, False) for i in range(30)])
    assert [t.state for t in transitions] == ["suspect"]


def test_an_observation_older_than_the_observers_latest_is_ignored() -> None:
    agreement = Agreement()
    feed(agreement, rounds(0.0, 1.0, ()))
    assert agreement.feed(observation("front-door", 0.2, False)) == []
    assert agreement.state(TRADING) == "ok"


@pytest.mark.parametrize("settings", [{"quorum": 0}, {"confirm_s": -1.0}, {"silent_s": 0.0}])
def test_impossible_settings_are_refused(settings: dict[str, float]) -> None:
    with pytest.raises(ValueError):
        Agreement(**settings)  # type: ignore[arg-type]
