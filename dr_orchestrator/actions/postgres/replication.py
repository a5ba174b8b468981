"""PostgreSQL streaming replication looked at and steered: ``postgres.replication_status`` (role, WAL
positions and lag of every server, optionally a precheck of a standby), ``postgres.wait_caught_up``
(a planned switchover's standby replays up to the primary's position) and ``postgres.set_sync``
(synchronous replication on or off)."""

from __future__ import annotations

import time
from datetime import datetime
from typing import Any, Literal

import psycopg
from pydantic import Field

from dr_orchestrator.actions.base import ActionContext, ActionError, ActionResult
from dr_orchestrator.actions.postgres.base import (
    Database,
    DatabaseAction,
    DatabaseParams,
    DatabaseUnreachable,
    SiteParams,
    connect,
    latest_heartbeat,
    lsn_value,
    one,
    probe_role,
    role_of,
)
from dr_orchestrator.actions.replicated import optional_site_field, poll_until_deadline, site_field, unless_forced
from dr_orchestrator.model.durations import Duration, format_duration
from dr_orchestrator.model.runbook import Effect

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


class ReplicationStatus(DatabaseAction[ReplicationStatusParams]):
    """Role, WAL positions and lag of every server of the database. With ``site`` and limits, a
    precheck: a standby too far behind fails the step unless the run is forced (``--force`` with a
    reason), and the reason is recorded in the output."""

    name = "postgres.replication_status"
    effect = Effect.READ_ONLY
    Params = ReplicationStatusParams
    idempotent = True

    def run(self, params: ReplicationStatusParams, ctx: ActionContext) -> ActionResult:
        db = self.database(params, ctx, params.site)
        sites: dict[str, dict[str, Any]] = {}
        for site in db.hosts:
            sites[site] = probe_role(db, site, ctx)
            if sites[site]["role"] == "primary":
                sites[site]["standbys"] = self._standbys(db, site, ctx)
        output: dict[str, Any] = {"database": db.name, "sites": sites}
        if params.site is None:
            return ActionResult(output=output)

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


# ---------------------------------------------------------------- catch-up, synchronous replication


class WaitCaughtUpParams(SiteParams):
    site: str = site_field("Site of the standby that must catch up.")
    primary_site: str | None = optional_site_field("Site of the primary; by default the database's other site.")


class WaitCaughtUp(DatabaseAction[WaitCaughtUpParams]):
    """Planned switchover: reads the primary's current WAL position once (stop writes first, e.g.
    with ``postgres.set_read_only``), then waits until the standby has replayed up to it. Its
    ``primary_lsn`` output is what ``postgres.rpo`` compares against (``old_primary_final_lsn``)."""

    name = "postgres.wait_caught_up"
    effect = Effect.READ_ONLY
    Params = WaitCaughtUpParams
    idempotent = True

    def run(self, params: WaitCaughtUpParams, ctx: ActionContext) -> ActionResult:
        db, primary_site = self.database_and_other_site(params, ctx, params.primary_site, "primary")
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


class SetSyncParams(SiteParams):
    site: str = site_field("Site of the primary whose commits should (or should no longer) wait for a standby.")
    standby_site: str | None = optional_site_field(
        "Site of the standby; its application_name is the site's name. By default the database's other site."
    )
    synchronous: bool = Field(default=True, description="true: commits wait for the standby; false: they do not.")


class SetSync(DatabaseAction[SetSyncParams]):
    """Sets ``synchronous_standby_names`` on a primary. Turning it on first waits until the standby
    streams (earlier, every commit would hang), then waits until it is reported ``sync``."""

    name = "postgres.set_sync"
    effect = Effect.REVERSIBLE
    Params = SetSyncParams
    idempotent = True

    def run(self, params: SetSyncParams, ctx: ActionContext) -> ActionResult:
        db, standby = self.database_and_other_site(params, ctx, params.standby_site, "standby")
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
