"""postgres.rpo's arithmetic on the readings it took (no database): readings taken after the
incident are refused, never turned into a negative RPO or a 0 made of one."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from typing import Any

from dr_orchestrator.actions.postgres.rpo import Rpo, RpoParams

INCIDENT = datetime(2026, 12, 6, 3, 0, 0, tzinfo=UTC)


class Promoted:
    """What the figure needs of the database: its name in errors."""

    def where(self, site: str) -> str:
        return f"database main at {site}:"


def beat(seconds_after_incident: float, sync_state: str) -> dict[str, Any]:
    at = INCIDENT + timedelta(seconds=seconds_after_incident)
    return {"id": round(seconds_after_incident * 1000), "site": "primary", "at": at.isoformat(),
            "primary_lsn": "0/3000148", "sync_state": sync_state}


def figure(heartbeat: dict[str, Any] | None, before: dict[str, Any] | None,
           replayed_after_incident_s: float | None = None) -> tuple[float | None, str, dict[str, Any]]:
    raw: dict[str, Any] = {"old_primary_site": "primary"}
    replayed = None if replayed_after_incident_s is None else INCIDENT + timedelta(seconds=replayed_after_incident_s)
    value, method = Rpo._figure(RpoParams(site="backup"), raw, heartbeat, before, INCIDENT, "0/3000148", replayed,
                                Promoted())  # type: ignore[arg-type]
    return value, method, raw


def test_a_heartbeat_written_after_the_incident_is_not_the_synchronous_proof() -> None:
    # The case: the newest heartbeat was written 12.241 s after the incident, and the
    # one at or before the incident saw the standby in sync 40 ms earlier: that one is the proof.
    value, method, raw = figure(beat(12.241, "sync"), beat(-0.04, "sync"))
    assert value == 0.0
    assert method.startswith("synchronous replication in force at the newest heartbeat at or before the incident "
                             f"(a newer one, at {beat(12.241, 'sync')['at']}, is later than the incident and was "
                             "not used), 40 ms before the incident")
    assert raw["heartbeat_before_incident_s"] == 0.04


def test_without_a_heartbeat_at_or_before_the_incident_nothing_is_measured() -> None:
    value, method, raw = figure(beat(12.241, "sync"), None)
    assert value is None
    assert method.startswith("not measured: the newest heartbeat is later than the incident "
                             f"({beat(12.241, 'sync')['at']}, 12241 ms after the incident at {INCIDENT.isoformat()})")


def test_an_asynchronous_standby_holding_commits_after_the_incident_is_not_measured() -> None:
    value, method, _ = figure(beat(-0.5, "async"), beat(-0.5, "async"), replayed_after_incident_s=3.0)
    assert value is None
    assert method.startswith("not measured: the newest replayed commit (pg_last_xact_replay_timestamp) is later "
                             "than the incident")


def test_readings_before_the_incident_give_the_figure_as_before() -> None:
    value, method, _ = figure(beat(-0.25, "async"), beat(-0.25, "async"), replayed_after_incident_s=-0.3)
    assert value == 0.25 and method == "async: newest replicated heartbeat"
    synchronous, method, _ = figure(beat(-0.05, "sync"), beat(-0.05, "sync"))
    assert synchronous == 0.0 and method.startswith("synchronous replication in force at the last heartbeat, 50 ms")
