"""PostgreSQL streaming replication: look at it, fence, promote, measure RPO, wait for catch-up, set sync.

Every action names a database of the inventory (``database``, optional when it describes one) and a
site; connection details come from ``dr.vars.databases`` (see ``pgdb``). Rebuilding an old primary
as a standby is ``postgres.rebuild_standby`` (``postgres_rebuild``), which works over SSH.
"""

from __future__ import annotations

import time
from datetime import datetime
from typing import Any, Literal

import psycopg
from pydantic import Field, field_validator

from dr_orchestrator.actions.base import Action, ActionContext, ActionError, ActionResult, Params
from dr_orchestrator.actions.pgdb import (
    Database,
    DatabaseUnreachable,
    connect,
    latest_heartbeat,
    lsn_value,
    one,
    probe_role,
    resolve,
    role_of,
)
from dr_orchestrator.actions.replicated import (
    incident_time,
    optional_site_field,
    poll_until_deadline,
    record_rpo,
    services_field,
    site_field,
    unless_forced,
)
from dr_orchestrator.model.durations import Duration, format_duration
from dr_orchestrator.model.events import utcnow
from dr_orchestrator.model.runbook import Effect
from dr_orchestrator.model.safety import PROMOTE_FENCED


class DatabaseParams(Params):
    database: str | None = Field(
        default=None,
        description="Database in dr.vars.databases; may be left out when the inventory describes one.",
        json_schema_extra={"refers_to": "database"},
    )


# ---------------------------------------------------------------- replication status


class ReplicationStatusParams(DatabaseParams):
    site: str | None = optional_site_field(
        "The standby to judge against the limits below; without it, the status is only reported."
    )
    max_lag_bytes: int | None = Field(
        default=None,
        ge=0,
        description="Refuse when the standby's replay position is more than this many bytes behind "
        "(the primary's current position when it answers, else what the standby has received).",
    )
    max_staleness: Duration | None = Field(
        default=None,
        description="Refuse when the standby's newest heartbeat (or replayed commit) is older than this "
        "(seconds or a duration): older than now while a primary answers, else than the incident time.",
    )
    require_streaming: bool = Field(default=False, description="Refuse unless the standby's WAL receiver is streaming.")


class ReplicationStatus(Action[ReplicationStatusParams]):
    """Role, WAL positions and lag of every server of the database. With ``site`` and limits, a
    precheck: a standby too far behind fails the step unless the run is forced (``--force`` with a
    reason), and the reason is recorded in the output."""

    name = "postgres.replication_status"
    effect = Effect.READ_ONLY
    Params = ReplicationStatusParams
    idempotent = True

    def run(self, params: ReplicationStatusParams, ctx: ActionContext) -> ActionResult:
        db = resolve(ctx.inventory, params.database)
        sites: dict[str, dict[str, Any]] = {}
        for site in db.hosts:
            sites[site] = probe_role(db, site, ctx)
            if sites[site]["role"] == "primary":
                sites[site]["standbys"] = self._standbys(db, site, ctx)
        output: dict[str, Any] = {"database": db.name, "sites": sites}
        if params.site is None:
            return ActionResult(output=output)

        db.check_site(params.site)
        standby = sites[params.site]
        if standby["role"] != "standby":
            raise ActionError(f"{db.where(params.site)} is not a standby ({standby['role']})")
        judged = self._judge(db, params, standby, sites, ctx)
        output.update(judged)
        if judged["problems"]:
            output["forced"] = unless_forced(
                ctx, f"{db.where(params.site)} is not fit to take over: {'; '.join(judged['problems'])}")
        return ActionResult(output=output)

    @staticmethod
    def _standbys(db: Database, site: str, ctx: ActionContext) -> list[dict[str, Any]]:
        query = (
            "SELECT application_name, client_addr::text, state, sync_state, sent_lsn::text, replay_lsn::text,"
            " pg_wal_lsn_diff(pg_current_wal_lsn(), replay_lsn)::bigint,"
            " EXTRACT(epoch FROM replay_lag)::float FROM pg_stat_replication ORDER BY application_name"
        )
        names = ("application_name", "client_addr", "state", "sync_state", "sent_lsn", "replay_lsn")
        try:
            with connect(db, site, ctx) as connection:
                rows = connection.execute(query.encode()).fetchall()
        except (DatabaseUnreachable, psycopg.Error):
            return []
        return [{**dict(zip(names, row[:6], strict=True)), "lag_bytes": row[6], "replay_lag_s": row[7]} for row in rows]

    @staticmethod
    def _judge(
        db: Database,
        params: ReplicationStatusParams,
        standby: dict[str, Any],
        sites: dict[str, dict[str, Any]],
        ctx: ActionContext,
    ) -> dict[str, Any]:
        assert params.site is not None
        primaries = [site for site, state in sites.items() if state["role"] == "primary"]
        reference = sites[primaries[0]]["current_lsn"] if primaries else standby["receive_lsn"]
        lag_bytes = max(0, lsn_value(reference) - lsn_value(standby["replay_lsn"])) if reference else None
        others = db.other_sites(params.site)
        with connect(db, params.site, ctx) as connection:
            heartbeat = latest_heartbeat(connection, others)
            replayed_at, now = one(connection, "SELECT pg_last_xact_replay_timestamp(), clock_timestamp()")
        newest = datetime.fromisoformat(heartbeat["at"]) if heartbeat else replayed_at
        # With the primary gone, the standby ages by the minute: what counts is how current it was at the incident.
        incident = ctx.run_info.get("incident_at")
        reference = now if primaries or not incident else min(now, datetime.fromisoformat(str(incident)))
        staleness = None if newest is None else round((reference - newest).total_seconds(), 6)
        problems = []
        if params.require_streaming and standby["wal_receiver"] != "streaming":
            problems.append(f"its WAL receiver is {standby['wal_receiver']}, not streaming")
        if params.max_lag_bytes is not None and (lag_bytes is None or lag_bytes > params.max_lag_bytes):
            problems.append(f"it is {lag_bytes} bytes behind (limit {params.max_lag_bytes})")
        if params.max_staleness is not None and (staleness is None or staleness > params.max_staleness):
            shown = "unknown" if staleness is None else format_duration(staleness)
            problems.append(f"its newest data is {shown} old (limit {format_duration(params.max_staleness)})")
        return {
            "standby": params.site,
            "lag_bytes": lag_bytes,
            "lag_reference": f"primary at {primaries[0]}"
            if primaries
            else "standby's received WAL (no primary answers)",
            "staleness_s": staleness,
            "staleness_source": "heartbeat" if heartbeat else "pg_last_xact_replay_timestamp()",
            "staleness_reference": "now" if reference is now else "incident time",
            "heartbeat": heartbeat,
            "problems": problems,
        }


# ---------------------------------------------------------------- fencing


class SetReadOnlyParams(DatabaseParams):
    site: str = site_field("Site whose server stops (or, with read_only false, resumes) taking writes.")
    read_only: bool = Field(default=True, description="true: refuse writes from now on; false: undo it.")
    terminate_sessions: bool = Field(
        default=True,
        description="End the other client sessions, so no transaction begun before the fence commits after it.",
    )
    allow_unreachable: bool = Field(
        default=False, description="A server that does not answer counts as fenced (the site may be down)."
    )


class SetReadOnly(Action[SetReadOnlyParams]):
    """Fences a primary without stopping it: ``default_transaction_read_only = on`` through ALTER
    SYSTEM (it survives a restart), checked from a new session. Its rollback is the same action with
    ``read_only: false``. ``postgres.promote`` accepts an old primary fenced this way."""

    name = "postgres.set_read_only"
    effect = Effect.REVERSIBLE
    Params = SetReadOnlyParams
    idempotent = True

    def run(self, params: SetReadOnlyParams, ctx: ActionContext) -> ActionResult:
        db = resolve(ctx.inventory, params.database)
        db.check_site(params.site)
        value = "on" if params.read_only else "off"
        try:
            with connect(db, params.site, ctx) as connection:
                before = role_of(connection)
                if ctx.check_mode:
                    return ActionResult(output={"check_mode": True, "before": before})
                if params.read_only:
                    connection.execute(b"ALTER SYSTEM SET default_transaction_read_only = on")
                else:
                    connection.execute(b"ALTER SYSTEM RESET default_transaction_read_only")
                connection.execute(b"SELECT pg_reload_conf()")
                terminated = 0
                if params.terminate_sessions and params.read_only:
                    (terminated,) = one(
                        connection,
                        "SELECT count(pg_terminate_backend(pid)) FROM pg_stat_activity"
                        " WHERE backend_type = 'client backend' AND pid <> pg_backend_pid()",
                    )
            self._verify(db, params.site, value, ctx)
            with connect(db, params.site, ctx) as connection:
                after = role_of(connection)
        except DatabaseUnreachable as exc:
            if not params.allow_unreachable:
                raise
            return ActionResult(output={"reachable": False, "error": str(exc)})
        return ActionResult(
            output={"reachable": True, "before": before, "after": after, "terminated_sessions": terminated}
        )

    @staticmethod
    def _verify(db: Database, site: str, value: str, ctx: ActionContext) -> None:
        """A new session sees the setting once the server has reloaded its configuration."""
        started = time.monotonic()
        while True:
            with connect(db, site, ctx) as connection:
                (current,) = one(connection, "SELECT current_setting('default_transaction_read_only')")
            if current == value:
                return
            poll_until_deadline(ctx, f"{db.where(site)}: default_transaction_read_only is still {current}", started)


# ---------------------------------------------------------------- promotion


class PromoteParams(DatabaseParams):
    site: str = site_field("Site of the standby to promote.")
    old_primary_site: str | None = optional_site_field(
        "Site of the primary being replaced; by default the database's other site."
    )


class Promote(Action[PromoteParams]):
    """Promotes a standby and waits until it takes writes.

    Refuses while the old primary still answers and takes writes (split brain) unless it was fenced
    (stopped, unreachable, or made read-only by an earlier step: checked again here) or the run is
    forced with ``--force`` (the reasons are recorded in the output). Before promoting it captures
    the standby's received and replayed WAL positions, its last replayed commit time and newest
    heartbeat: the inputs of the RPO. Then ``pg_promote(wait => false)`` and ``txid_current()`` every
    10 ms until it succeeds (it fails while in recovery): that moment is when writes became possible.
    """

    name = "postgres.promote"
    bars_rollback = True  # the old primary must stay fenced once a standby may have been promoted
    Params = PromoteParams

    def run(self, params: PromoteParams, ctx: ActionContext) -> ActionResult:
        db = resolve(ctx.inventory, params.database)
        db.check_site(params.site)
        old_site = db.other_site(params.site, params.old_primary_site, "old primary")
        with connect(db, params.site, ctx) as connection:
            before = role_of(connection)
            if before["role"] != "standby":
                raise ActionError(f"{db.where(params.site)} is not a standby (pg_is_in_recovery() is false)")
            old_primary = probe_role(db, old_site, ctx)
            forced: list[str] = []
            if old_primary["role"] == "unknown":
                forced = ctx.enforce(PROMOTE_FENCED, f"refusing to promote {db.where(params.site)}: cannot tell "
                                     f"whether the old primary takes writes ({old_primary['error']}); fence it")
            elif old_primary["writable"]:
                forced = ctx.enforce(PROMOTE_FENCED, f"refusing to promote {db.where(params.site)}: the old primary, "
                                     f"{db.where(old_site)}, still answers and takes writes; fence it first (stop it "
                                     "or make it read-only)")
            heartbeat = latest_heartbeat(connection, [old_site])
            output: dict[str, Any] = {
                "database": db.name,
                "site": params.site,
                "old_primary_site": old_site,
                "old_primary": old_primary,
                "before": before,
                "heartbeat_before": heartbeat,
            }
            if old_primary["writable"] or old_primary["role"] == "unknown":
                output["forced"] = forced
            if ctx.check_mode:
                return ActionResult(output={**output, "check_mode": True})

            promote_requested_at, started = utcnow(), time.monotonic()
            (signalled,) = one(connection, "SELECT pg_promote(wait => false)")
            if not signalled:
                raise ActionError(f"{db.where(params.site)}: pg_promote() could not signal the server")
            writes_at, attempts = self._wait_writable(connection, db, params.site, ctx, started)
            promotion_s = time.monotonic() - started
            after = self._after(connection, old_site)

        output.update(
            promote_requested_at=promote_requested_at.isoformat(),
            writes_possible_at=writes_at.isoformat(),
            promotion_s=round(promotion_s, 6),
            write_attempts=attempts,
            timeline=after.pop("timeline"),
            after=after,
        )
        raw = {
            "promote_requested_at": output["promote_requested_at"],
            "writes_possible_at": output["writes_possible_at"],
            "write_attempts": attempts,
            "before": before,
            "after": after,
        }
        ctx.measure("promotion_s", promotion_s, "pg_promote(wait => false), then txid_current() every 10 ms", raw)
        ctx.measure(
            "standby_unreplayed_bytes_at_promotion",
            float(max(0, _lsn(before["receive_lsn"]) - _lsn(before["replay_lsn"]))),
            "pg_last_wal_receive_lsn() - pg_last_wal_replay_lsn() on the standby just before pg_promote()",
            raw,
        )
        return ActionResult(output=output)

    @staticmethod
    def _wait_writable(
        connection: psycopg.Connection, db: Database, site: str, ctx: ActionContext, started: float
    ) -> tuple[datetime, int]:
        attempts = 0
        while True:
            attempts += 1
            try:
                connection.execute(b"SELECT txid_current()")
                return utcnow(), attempts
            except psycopg.errors.ReadOnlySqlTransaction:
                poll_until_deadline(ctx, f"{db.where(site)} was asked to promote but does not take writes yet", started)

    @staticmethod
    def _after(connection: psycopg.Connection, old_site: str) -> dict[str, Any]:
        """Where recovery ended (these stay fixed after promotion) and the new timeline."""
        replay_lsn, replayed_at, timeline = one(
            connection,
            "SELECT pg_last_wal_replay_lsn()::text, pg_last_xact_replay_timestamp(),"
            " ('x' || substr(pg_walfile_name(pg_current_wal_lsn()), 1, 8))::bit(32)::int",
        )
        return {
            "replay_lsn": replay_lsn,
            "last_replayed_commit_at": replayed_at.isoformat() if replayed_at else None,
            "heartbeat": latest_heartbeat(connection, [old_site]),
            "timeline": timeline,
        }


def _lsn(value: str | None) -> int:
    return lsn_value(value) if value else 0


# ---------------------------------------------------------------- RPO


class RpoParams(DatabaseParams):
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


class Rpo(Action[RpoParams]):
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
        db = resolve(ctx.inventory, params.database)
        db.check_site(params.site)
        old_site = db.other_site(params.site, params.old_primary_site, "old primary")
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


# ---------------------------------------------------------------- catch-up, synchronous replication


class WaitCaughtUpParams(DatabaseParams):
    site: str = site_field("Site of the standby that must catch up.")
    primary_site: str | None = optional_site_field("Site of the primary; by default the database's other site.")


class WaitCaughtUp(Action[WaitCaughtUpParams]):
    """Planned switchover: reads the primary's current WAL position once (stop writes first, e.g.
    with ``postgres.set_read_only``), then waits until the standby has replayed up to it. Its
    ``primary_lsn`` output is what ``postgres.rpo`` compares against (``old_primary_final_lsn``)."""

    name = "postgres.wait_caught_up"
    effect = Effect.READ_ONLY
    Params = WaitCaughtUpParams
    idempotent = True

    def run(self, params: WaitCaughtUpParams, ctx: ActionContext) -> ActionResult:
        db = resolve(ctx.inventory, params.database)
        db.check_site(params.site)
        primary_site = db.other_site(params.site, params.primary_site, "primary")
        with connect(db, primary_site, ctx) as primary:
            primary_state = role_of(primary)
        if primary_state["role"] != "primary":
            raise ActionError(f"{db.where(primary_site)} is not a primary ({primary_state['role']})")
        target = primary_state["current_lsn"]
        started = time.monotonic()
        polls = 0
        with connect(db, params.site, ctx) as standby:
            while True:
                polls += 1
                in_recovery, replay_lsn = one(standby, "SELECT pg_is_in_recovery(), pg_last_wal_replay_lsn()::text")
                if not in_recovery:
                    raise ActionError(f"{db.where(params.site)} is not a standby")
                if replay_lsn is not None and lsn_value(replay_lsn) >= lsn_value(target):
                    break
                poll_until_deadline(
                    ctx, f"{db.where(params.site)} has replayed {replay_lsn}, short of {target}", started
                )
        return ActionResult(
            output={
                "primary_site": primary_site,
                "primary_lsn": target,
                "primary_read_only": not primary_state["writable"],
                "standby_replay_lsn": replay_lsn,
                "waited_s": round(time.monotonic() - started, 6),
                "polls": polls,
            }
        )


class SetSyncParams(DatabaseParams):
    site: str = site_field("Site of the primary whose commits should (or should no longer) wait for a standby.")
    standby_site: str | None = optional_site_field(
        "Site of the standby; its application_name is the site's name. By default the database's other site."
    )
    synchronous: bool = Field(default=True, description="true: commits wait for the standby; false: they do not.")


class SetSync(Action[SetSyncParams]):
    """Sets ``synchronous_standby_names`` on a primary. Turning it on first waits until the standby
    streams (earlier, every commit would hang), then waits until it is reported ``sync``."""

    name = "postgres.set_sync"
    effect = Effect.REVERSIBLE
    Params = SetSyncParams
    idempotent = True

    def run(self, params: SetSyncParams, ctx: ActionContext) -> ActionResult:
        db = resolve(ctx.inventory, params.database)
        db.check_site(params.site)
        standby = db.other_site(params.site, params.standby_site, "standby")
        names = f'FIRST 1 ("{standby}")' if params.synchronous else ""
        started = time.monotonic()
        with connect(db, params.site, ctx) as connection:
            if role_of(connection)["role"] != "primary":
                raise ActionError(f"{db.where(params.site)} is not a primary")
            (before,) = one(connection, "SELECT current_setting('synchronous_standby_names')")
            if params.synchronous:
                self._wait_state(connection, db, params.site, standby, "state", "streaming", ctx, started)
            if ctx.check_mode:
                return ActionResult(output={"check_mode": True, "before": before, "would_set": names})
            connection.execute(b"ALTER SYSTEM SET synchronous_standby_names = " + _literal(names))
            connection.execute(b"SELECT pg_reload_conf()")
            if params.synchronous:
                self._wait_state(connection, db, params.site, standby, "sync_state", "sync", ctx, started)
            (after,) = one(connection, "SELECT current_setting('synchronous_standby_names')")
        return ActionResult(
            output={
                "before": before,
                "after": after,
                "standby": standby,
                "waited_s": round(time.monotonic() - started, 6),
            }
        )

    @staticmethod
    def _wait_state(
        connection: psycopg.Connection,
        db: Database,
        site: str,
        standby: str,
        column: Literal["state", "sync_state"],
        wanted: str,
        ctx: ActionContext,
        started: float,
    ) -> None:
        query = f"SELECT {column} FROM pg_stat_replication WHERE application_name = %s"
        while True:
            rows = [row[0] for row in connection.execute(query.encode(), (standby,)).fetchall()]
            if wanted in rows:
                return
            seen = ", ".join(rows) or "not connected"
            poll_until_deadline(
                ctx, f"{db.where(site)}: standby {standby!r} is {seen}, waiting for {column} {wanted}", started
            )


def _literal(text: str) -> bytes:
    return ("'" + text.replace("'", "''") + "'").encode()
