"""``postgres.rpo``: the RPO achieved, measured from the promoted database after ``postgres.promote``."""

from __future__ import annotations

from datetime import datetime
from typing import Any

from pydantic import Field, field_validator

from dr_orchestrator.actions.base import ActionContext, ActionError, ActionResult
from dr_orchestrator.actions.postgres.base import (
    Database,
    DatabaseAction,
    SiteParams,
    connect,
    latest_heartbeat,
    lsn_value,
    one,
)
from dr_orchestrator.actions.replicated import (
    incident_time,
    optional_site_field,
    record_rpo,
    services_field,
    site_field,
)
from dr_orchestrator.model.durations import Duration
from dr_orchestrator.model.runbook import Effect


class RpoParams(SiteParams):
    site: str = site_field("Site of the promoted database.")
    old_primary_site: str | None = optional_site_field(
        "Site of the replaced primary, whose heartbeats count; by default the database's other site."
    )
    old_primary_final_lsn: str | None = Field(
        default=None,
        description="Planned switchover: the old primary's pg_current_wal_lsn() once writes stopped "
        "(e.g. '{{ steps.caught_up.output.primary_lsn }}'); RPO is 0 when the promoted database replayed up to it.",
    )
    sync_staleness: Duration = Field(
        default=1.0,
        description="Synchronous replication counts (RPO 0) only when the last heartbeat saw it this close "
        "before the incident (seconds or a duration).",
    )
    services: list[str] = services_field("database")

    @field_validator("old_primary_final_lsn")
    @classmethod
    def _lsn_syntax(cls, value: str | None) -> str | None:
        if value is not None:
            try:
                lsn_value(value)
            except ValueError:
                raise ValueError(f"{value!r} is not a WAL position such as 0/3000148") from None
        return value


# A heartbeat row commits a moment after its `at`: this close to the newest commit, it was that commit.
HEARTBEAT_IS_NEWEST_S = 0.01


class Rpo(DatabaseAction[RpoParams]):
    """Measures the RPO achieved, from the promoted database, after ``postgres.promote``.

    - switchover (``old_primary_final_lsn`` given): 0 when the promoted database replayed the old
      primary's final WAL position (LSN equality);
    - synchronous replication: 0 when the newest replicated heartbeat of the old primary saw its
      standby in ``sync`` state, less than ``sync_staleness`` before the incident;
    - otherwise: incident time minus the newest commit the promoted database replayed, the newest
      replicated heartbeat or, under load, a newer transaction.

    Readings taken after the incident are refused: the synchronous check reads the newest heartbeat
    at or before the incident (and says so when a newer one exists); when the newest replicated
    heartbeat or commit is later than the incident, the old primary was still writing after the
    incident time and the loss cannot be measured from it: no figure, and an ``rpo.not_measured``
    event saying why (never a negative RPO, never a 0 made of it).

    The figure is recorded as ``rpo_s`` for each service, with the method and every raw input.
    """

    name = "postgres.rpo"
    effect = Effect.READ_ONLY
    Params = RpoParams
    idempotent = True

    def run(self, params: RpoParams, ctx: ActionContext) -> ActionResult:
        db, old_site = self.database_and_other_site(params, ctx, params.old_primary_site, "old primary")
        incident_at = incident_time(ctx)
        with connect(db, params.site, ctx) as connection:
            in_recovery, replay_lsn, replayed_at = one(
                connection,
                "SELECT pg_is_in_recovery(), pg_last_wal_replay_lsn()::text, pg_last_xact_replay_timestamp()",
            )
            heartbeat = latest_heartbeat(connection, [old_site])
            before = heartbeat if _not_after(heartbeat, incident_at) else latest_heartbeat(connection, [old_site],
                                                                                            incident_at)
        if in_recovery:
            raise ActionError(f"{db.where(params.site)} is still a standby: measure RPO after promoting it")
        raw: dict[str, Any] = {
            "database": db.name,
            "promoted_site": params.site,
            "old_primary_site": old_site,
            "incident_at": incident_at.isoformat(),
            "replay_lsn": replay_lsn,
            "last_replayed_commit_at": replayed_at.isoformat() if replayed_at else None,
            "heartbeat": heartbeat,
            "heartbeat_at_or_before_incident": before,
            "sync_staleness_s": params.sync_staleness,
        }
        value, method = self._figure(params, raw, heartbeat, before, incident_at, replay_lsn, replayed_at, db)
        services = record_rpo(ctx, params.services, value, method, raw)
        return ActionResult(output={"rpo_s": value, "method": method, "services": services, "raw": raw})

    @staticmethod
    def _figure(
        params: RpoParams,
        raw: dict[str, Any],
        heartbeat: dict[str, Any] | None,
        before: dict[str, Any] | None,
        incident_at: datetime,
        replay_lsn: str | None,
        replayed_at: datetime | None,
        db: Database,
    ) -> tuple[float | None, str]:
        """The figure and its method; None and why when it cannot be measured."""
        if replay_lsn is None:
            raise ActionError(
                f"{db.where(params.site)} no longer knows where its recovery ended (restarted since promotion?): "
                "RPO cannot be measured"
            )
        if params.old_primary_final_lsn is not None:
            raw["old_primary_final_lsn"] = params.old_primary_final_lsn
            if lsn_value(replay_lsn) >= lsn_value(params.old_primary_final_lsn):
                return 0.0, (
                    f"switchover: LSN equality (replayed up to {replay_lsn}, the old primary's final position "
                    f"was {params.old_primary_final_lsn})"
                )
            raw["switchover_short_by_bytes"] = lsn_value(params.old_primary_final_lsn) - lsn_value(replay_lsn)
        if before is not None:
            before_incident_s = (incident_at - datetime.fromisoformat(before["at"])).total_seconds()
            raw["heartbeat_before_incident_s"] = before_incident_s
            if before["sync_state"] == "sync" and before_incident_s <= params.sync_staleness:
                which = "the last heartbeat" if heartbeat is None or heartbeat["id"] == before["id"] else (
                    f"the newest heartbeat at or before the incident (a newer one, at {heartbeat['at']}, is later "
                    "than the incident and was not used)")
                return 0.0, (
                    f"synchronous replication in force at {which}, {before_incident_s * 1000:.0f} ms "
                    "before the incident: every acknowledged commit reached the standby"
                )
        beat_at = datetime.fromisoformat(heartbeat["at"]) if heartbeat else None
        # Asynchronous: what was lost is what the primary committed after the newest commit the standby
        # replayed. Under load that is a transaction newer than the last heartbeat; when idle, the
        # heartbeat (itself a commit) keeps it no more than 100 ms old.
        if replayed_at is None and beat_at is None:
            raise ActionError(
                f"{db.where(params.site)} holds no heartbeat of site {raw['old_primary_site']} and replayed no "
                "commit: RPO cannot be measured (is the heartbeat running at the primary?)"
            )
        newest = max(moment for moment in (beat_at, replayed_at) if moment is not None)
        if newest > incident_at:
            reading = "heartbeat" if newest == beat_at else "replayed commit (pg_last_xact_replay_timestamp)"
            raw["newest_replicated_at"] = newest.isoformat()
            return None, (
                f"not measured: the newest {reading} is later than the incident ({newest.isoformat()}, "
                f"{(newest - incident_at).total_seconds() * 1000:.0f} ms after the incident at "
                f"{incident_at.isoformat()}): the old primary was still writing then, so the incident time "
                "does not bound what it lost; declare the time it stopped (--incident-at)"
            )
        if beat_at is not None and (newest - beat_at).total_seconds() <= HEARTBEAT_IS_NEWEST_S:
            method = "async: newest replicated heartbeat"
        elif beat_at is not None:
            method = "async: newest replayed commit (pg_last_xact_replay_timestamp), newer than the last heartbeat"
        else:
            method = "async: newest replayed commit (pg_last_xact_replay_timestamp; no heartbeat)"
        prefix = "switchover incomplete; " if params.old_primary_final_lsn is not None else ""
        raw["newest_replicated_at"] = newest.isoformat()
        return (incident_at - newest).total_seconds(), prefix + method


def _not_after(heartbeat: dict[str, Any] | None, moment: datetime) -> bool:
    return heartbeat is None or datetime.fromisoformat(heartbeat["at"]) <= moment
