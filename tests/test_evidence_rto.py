"""RTO/RPO arithmetic: what an auditor would recompute by hand from the stored timestamps."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

import pytest

from dr_orchestrator.evidence.rto import (
    RUN_START_WARNING,
    ImpactFact,
    Interval,
    MarkerFact,
    RpoReading,
    RpoRefusal,
    Targets,
    figures_for,
    is_met,
    overlap_seconds,
    service_figures,
)

T0 = datetime(2026, 11, 28, 10, 0, 0, tzinfo=UTC)


def at(seconds: float) -> datetime:
    return T0 + timedelta(seconds=seconds)


def test_rto_is_restored_marker_minus_declared_incident_with_parts_that_add_up() -> None:
    fig = figures_for(
        "trading",
        Targets(rto_s=60, rpo_s=0),
        run_started_at=at(0),
        declared_incident_at=at(-12.5),
        markers=[MarkerFact("trading", at(40.25), "verify")],
        approvals=[Interval(at(2), at(7), "approve")],
        readings=[],
    )
    assert fig.incident_at == at(-12.5)
    assert fig.restored_at == at(40.25)
    assert fig.rto_s == pytest.approx(52.75)
    assert (fig.detection_s, fig.decision_s, fig.execution_s) == (
        pytest.approx(12.5),
        pytest.approx(5),
        pytest.approx(35.25),
    )
    assert fig.rto_met is True
    assert fig.raw["incident_source"] == "declared"
    assert fig.raw["restored_at"] == at(40.25).isoformat()
    assert fig.raw["approval_intervals"] == [
        {"step_id": "approve", "start": at(2).isoformat(), "end": at(7).isoformat()}
    ]


def test_incident_defaults_to_run_start_and_detection_is_zero() -> None:
    fig = figures_for("q", Targets(30, 60), at(0), None, [MarkerFact("q", at(31), "v")], [], [])
    assert fig.incident_at == at(0)
    assert fig.detection_s == 0
    assert fig.rto_s == 31
    assert fig.rto_met is False
    assert "run start" in fig.rto_method


def test_rto_equal_to_target_is_met() -> None:
    assert figures_for("q", Targets(30, 60), at(0), None, [MarkerFact("q", at(30), "v")], [], []).rto_met is True


def test_service_specific_marker_wins_over_run_wide_and_earliest_counts() -> None:
    markers = [
        MarkerFact(None, at(5), "all"),
        MarkerFact("trading", at(9), "late"),
        MarkerFact("trading", at(8), "early"),
    ]
    assert figures_for("trading", Targets(60, 0), at(0), None, markers, [], []).restored_at == at(8)
    assert figures_for("quotation", Targets(60, 0), at(0), None, markers, [], []).restored_at == at(5)


def test_not_restored_misses_the_target_and_has_no_rto() -> None:
    fig = figures_for("trading", Targets(60, 0), at(0), None, [MarkerFact("other", at(3), "v")], [], [])
    assert fig.restored_at is None and fig.rto_s is None and fig.execution_s is None
    assert fig.rto_met is False
    assert fig.rto_method.startswith("not restored")
    assert figures_for("trading", Targets(None, None), at(0), None, [], [], []).rto_met is None


def test_rpo_is_measured_never_assumed() -> None:
    fig = figures_for("trading", Targets(60, 0), at(0), None, [], [], [])
    assert fig.rpo_s is None and fig.rpo_met is None
    assert fig.rpo_method.startswith("not measured")


def test_rpo_reading_own_service_first_else_run_wide_worst_of_several() -> None:
    readings = [
        RpoReading(None, 0.0, "run-wide", at(3), "promote", 1),
        RpoReading("contract-signing", 2.0, "lsn diff", at(4), "promote-cs", 2),
        RpoReading("contract-signing", 7.5, "replay timestamp", at(5), "promote-cs2", 3),
    ]
    cs = figures_for("contract-signing", Targets(300, 5), at(0), None, [], [], readings)
    assert (cs.rpo_s, cs.rpo_method, cs.rpo_met) == (7.5, "replay timestamp", False)
    assert cs.raw["rpo_measurement"] == {
        "step_id": "promote-cs2",
        "service": "contract-signing",
        "value": 7.5,
        "at": at(5).isoformat(),
        "id": 3,
    }
    trading = figures_for("trading", Targets(60, 0), at(0), None, [], [], readings)
    assert (trading.rpo_s, trading.rpo_method, trading.rpo_met) == (0.0, "run-wide", True)


def test_incident_declared_after_run_start_has_no_detection() -> None:
    fig = figures_for("q", Targets(30, 0), at(0), at(10), [MarkerFact("q", at(25), "v")], [Interval(at(2), at(12))], [])
    assert fig.detection_s == 0
    assert fig.decision_s == pytest.approx(2)  # only the part after the incident
    assert fig.rto_s == pytest.approx(15)
    assert fig.execution_s == pytest.approx(13)


def test_overlapping_approvals_count_once_and_are_clipped() -> None:
    intervals = [Interval(at(1), at(5)), Interval(at(3), at(8)), Interval(at(20), at(40))]
    assert overlap_seconds(intervals, at(0), at(30)) == pytest.approx(7 + 10)
    assert overlap_seconds([], at(0), at(30)) == 0


@pytest.mark.parametrize(
    ("value", "target", "met"),
    [(1.0, 2.0, True), (2.0, 2.0, True), (2.5, 2.0, False), (None, 2.0, None), (1.0, None, None)],
)
def test_is_met(value: float | None, target: float | None, met: bool | None) -> None:
    assert is_met(value, target) is met


def test_service_figures_keeps_scope_order() -> None:
    figures = service_figures({"b": Targets(1, 1), "a": Targets(2, 2)}, at(0), None, [], [], [])
    assert [f.service for f in figures] == ["b", "a"]


# ---------------------------------------------------------------- impact start (incidents)


def restored_at(seconds: float) -> list[MarkerFact]:
    return [MarkerFact("trading", at(seconds), "verify")]


def test_a_measured_failure_before_the_declared_time_is_the_impact_start() -> None:
    impacts = [ImpactFact("trading", at(-14.5), "failed probe of step 'verify' of run 1234abcd (an earlier attempt)"),
               ImpactFact("quotation", at(-60), "another service's failure does not count"),
               ImpactFact(None, at(-12), "fault_detected mark of step 'detect'")]
    fig = figures_for("trading", Targets(60, 0), at(0), at(-10), restored_at(20), [], [], impacts=impacts,
                      failover=True)
    assert fig.incident_at == at(-14.5) and fig.rto_s == pytest.approx(34.5)
    assert fig.rto_method == ("service_restored marker of step 'verify' minus incident time (measured first failure: "
                              "failed probe of step 'verify' of run 1234abcd (an earlier attempt) "
                              "(before the declared time))")
    assert fig.detection_s == pytest.approx(14.5)


def test_a_declared_time_earlier_than_every_measured_failure_wins() -> None:
    fig = figures_for("trading", Targets(60, 0), at(0), at(-10), restored_at(20), [], [],
                      impacts=[ImpactFact(None, at(-3), "fault_detected mark of step 'detect'")])
    assert fig.incident_at == at(-10) and fig.raw["incident_source"] == "declared"


def test_a_retry_without_measurement_counts_from_the_first_attempt_and_warns() -> None:
    fig = figures_for("trading", Targets(60, 0), at(0), None, restored_at(5), [], [],
                      first_attempt=(at(-30), "1234abcd"), failover=True)
    assert fig.incident_at == at(-30) and fig.rto_s == pytest.approx(35)
    assert "start of the incident's first attempt, run 1234abcd" in fig.rto_method
    assert fig.rto_method.endswith(f"; {RUN_START_WARNING}") and fig.raw["warnings"] == [RUN_START_WARNING]


def test_only_a_failover_from_its_start_warns_and_only_with_a_figure() -> None:
    failover = figures_for("trading", Targets(60, 0), at(0), None, restored_at(5), [], [], failover=True)
    assert failover.rto_method.endswith(RUN_START_WARNING)
    rehearsal = figures_for("trading", Targets(60, 0), at(0), None, restored_at(5), [], [])
    assert RUN_START_WARNING not in rehearsal.rto_method and "warnings" not in rehearsal.raw
    never_restored = figures_for("trading", Targets(60, 0), at(0), None, [], [], [], failover=True)
    assert RUN_START_WARNING not in never_restored.rto_method
    declared = figures_for("trading", Targets(60, 0), at(0), at(-1), restored_at(5), [], [], failover=True)
    assert RUN_START_WARNING not in declared.rto_method


def test_an_rpo_method_that_refused_says_why_and_gives_no_figure() -> None:
    reason = "not measured: the newest heartbeat is later than the incident (...)"
    refused = [RpoRefusal(None, reason, "rpo", 7)]
    fig = figures_for("trading", Targets(60, 0), at(0), None, [], [], [], refusals=refused)
    assert (fig.rpo_s, fig.rpo_met, fig.rpo_method) == (None, None, reason)
    assert fig.raw["rpo_refusal"] == {"step_id": "rpo", "service": None, "id": 7}
    measured = figures_for("trading", Targets(60, 0), at(0), None, [], [], [RpoReading("trading", 0.2, "async", at(3),
                                                                                       "rpo")], refusals=refused)
    assert (measured.rpo_s, measured.rpo_method) == (0.2, "async")
