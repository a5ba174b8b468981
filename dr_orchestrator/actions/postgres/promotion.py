"""Taking over from a primary: fence it (``postgres.set_read_only``), then promote the standby
(``postgres.promote``), which refuses while the old primary still takes writes. The RPO of the
promotion is measured by ``postgres.rpo`` (``rpo.py``)."""

from __future__ import annotations

import time
from datetime import datetime
from typing import Any

import psycopg
from pydantic import Field

from dr_orchestrator.actions.base import ActionContext, ActionError, ActionResult
from dr_orchestrator.actions.postgres.base import (
    Database,
    DatabaseAction,
    DatabaseUnreachable,
    SiteParams,
    connect,
    latest_heartbeat,
    lsn_value,
    one,
    probe_role,
    role_of,
)
from dr_orchestrator.actions.replicated import optional_site_field, poll_until_deadline, site_field
from dr_orchestrator.model.events import utcnow
from dr_orchestrator.model.runbook import Effect
from dr_orchestrator.model.safety import PROMOTE_FENCED

# ---------------------------------------------------------------- fencing


class SetReadOnlyParams(SiteParams):
    site: str = site_field("Site whose server stops (or, with read_only false, resumes) taking writes.")
    read_only: bool = Field(default=True, description="true: refuse writes from now on; false: undo it.")
    terminate_sessions: bool = Field(
        default=True,
        description="End the other client sessions, so no transaction begun before the fence commits after it.",
    )
    allow_unreachable: bool = Field(
        default=False, description="A server that does not answer counts as fenced (the site may be down)."
    )


class SetReadOnly(DatabaseAction[SetReadOnlyParams]):
    """Fences a primary without stopping it: ``default_transaction_read_only = on`` through ALTER
    SYSTEM (it survives a restart), checked from a new session. Its rollback is the same action with
    ``read_only: false``. ``postgres.promote`` accepts an old primary fenced this way."""

    name = "postgres.set_read_only"
    effect = Effect.REVERSIBLE
    Params = SetReadOnlyParams
    idempotent = True

    def run(self, params: SetReadOnlyParams, ctx: ActionContext) -> ActionResult:
        db = self.database(params, ctx, params.site)
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


class PromoteParams(SiteParams):
    site: str = site_field("Site of the standby to promote.")
    old_primary_site: str | None = optional_site_field(
        "Site of the primary being replaced; by default the database's other site."
    )


class Promote(DatabaseAction[PromoteParams]):
    """Promotes a standby and waits until it takes writes.

    Refuses while the old primary still answers and takes writes (split brain) unless it was fenced
    (stopped, unreachable, or made read-only by an earlier step: checked again here) or the run is
    forced with ``--force`` (the reasons are recorded in the output). Before promoting it captures
    the standby's received and replayed WAL positions, its last replayed commit time and newest
    heartbeat: the inputs of the RPO. Then ``pg_promote(wait => false)`` and ``txid_current()`` every
    10 ms until it succeeds (it fails while in recovery): that moment is when writes became possible.

    Resumable: run again after its run was interrupted in the middle of it, it finds the database
    already promoted (and says so, its moment of promotion unknown) or promotes it; never twice.
    """

    name = "postgres.promote"
    bars_rollback = True  # the old primary must stay fenced once a standby may have been promoted
    resumable = True
    Params = PromoteParams

    def run(self, params: PromoteParams, ctx: ActionContext) -> ActionResult:
        db, old_site = self.database_and_other_site(params, ctx, params.old_primary_site, "old primary")
        with connect(db, params.site, ctx) as connection:
            before = role_of(connection)
            if before["role"] == "primary" and ctx.resumed and not ctx.check_mode:
                after = self._after(connection, old_site)
                return ActionResult(output={
                    "database": db.name, "site": params.site, "old_primary_site": old_site,
                    "found_promoted": "the interrupted run's attempt had promoted it: not promoted again; "
                                      "when writes became possible is unknown",
                    "before": before, "timeline": after.pop("timeline"), "after": after})
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
