"""``postgres.rebuild_standby``: turn a replaced primary into a standby of the new one (failback's first half).

Works over SSH on the database host of the site being rebuilt, as the login user of that host
(the database's OS user): stop the server if it runs, ``pg_rewind`` from the new primary (the
servers need ``wal_log_hints = on`` or data checksums), or a fresh ``pg_basebackup`` when rewinding
is impossible; keep the site's own configuration files (a rewind or a base backup copies the new
primary's, whose addresses are the other site's); make it a standby with a replication slot on the
new primary named after the site; start it; wait until the new primary sees it streaming.
"""

from __future__ import annotations

import posixpath
import re
import shlex
import time
from typing import Any

import psycopg
from pydantic import Field

from dr_orchestrator.actions.base import Action, ActionContext, ActionError, ActionResult
from dr_orchestrator.actions.pgdb import (
    Database,
    connect,
    forced_reasons,
    one,
    poll_until_deadline,
    probe_role,
    resolve,
    role_of,
)
from dr_orchestrator.actions.postgres import DatabaseParams
from dr_orchestrator.actions.shell import last_line
from dr_orchestrator.actions.ssh import ExecResult, execute
from dr_orchestrator.model.inventory import Host

CONFIG_FILES = ("postgresql.conf", "pg_hba.conf", "pg_ident.conf", "postgresql.auto.conf")
# Settings of the old life that a fresh standby must not keep (they are written anew or dropped).
DROPPED_SETTINGS = (
    "primary_conninfo",
    "primary_slot_name",
    "synchronous_standby_names",
    "default_transaction_read_only",
)


class RebuildStandbyParams(DatabaseParams):
    site: str = Field(
        description="Site whose server becomes a standby (the replaced primary).",
        json_schema_extra={"refers_to": "site"},
    )
    primary_site: str | None = Field(
        default=None,
        description="Site of the new primary to follow; by default the database's other site.",
        json_schema_extra={"refers_to": "site"},
    )
    host: str | None = Field(
        default=None,
        description="Inventory host to work on; by default the site's only host with the `db` role.",
        json_schema_extra={"refers_to": "host"},
    )
    allow_basebackup: bool = Field(
        default=True, description="When pg_rewind fails, copy the whole database with pg_basebackup instead."
    )
    flush: bool = Field(
        default=True,
        description="pg_rewind and pg_basebackup flush the copy to disk before they finish; false only for "
        "throwaway labs (--no-sync: it saves seconds on slow disks).",
    )


class RebuildStandby(Action[RebuildStandbyParams]):
    """Refuses to rebuild a server that is a writable primary unless the run is forced; does nothing
    (``already_streaming``) when the server already streams from the new primary."""

    name = "postgres.rebuild_standby"
    Params = RebuildStandbyParams
    idempotent = True

    def run(self, params: RebuildStandbyParams, ctx: ActionContext) -> ActionResult:
        db = resolve(ctx.inventory, params.database)
        db.check_site(params.site)
        source = db.other_site(params.site, params.primary_site, "new primary")
        host = self._host(ctx, params)
        data_dir = db.data_dirs.get(params.site) or host.vars.get("pg_data_dir")
        if not data_dir:
            raise ActionError(f"database {db.name!r} has no data directory for site {params.site} (data_dirs)")
        slot = re.sub(r"[^a-z0-9_]", "_", params.site.lower())
        output: dict[str, Any] = {"site": params.site, "primary_site": source, "host": host.name, "slot": slot}

        with connect(db, source, ctx) as primary:
            if role_of(primary)["role"] != "primary":
                raise ActionError(f"{db.where(source)} is not a primary: there is nothing to follow")
            if self._streaming(primary, params.site) is not None:
                return ActionResult(output={**output, "already_streaming": True})
        target = probe_role(db, params.site, ctx)
        output["before"] = target
        if target["writable"]:
            forced = forced_reasons(ctx)
            if not forced:
                raise ActionError(
                    f"refusing to rebuild {db.where(params.site)}: it is a writable primary, and rebuilding it "
                    "discards what was written there since it diverged (fence it first, or --force with a reason)"
                )
            output["forced"] = forced
        if ctx.check_mode:
            return ActionResult(output={**output, "check_mode": True})

        with connect(db, source, ctx) as primary:
            one(
                primary,
                "SELECT count(pg_create_physical_replication_slot(%s, true)) WHERE NOT EXISTS"
                " (SELECT 1 FROM pg_replication_slots WHERE slot_name = %s)",
                (slot, slot),
            )
            # pg_rewind reads the new primary's timeline from its control file, which a promotion
            # updates only at its next checkpoint: until then it would find "no rewind required".
            primary.execute(b"CHECKPOINT")
        remote = _Remote(ctx, host, db.pg_bin, db.os_user)
        started = time.monotonic()
        output["server_found"] = remote.stop_if_running(data_dir)
        # Outside the data directory, which the rewind or the base backup rewrites.
        saved = remote.check(
            "save configuration",
            f'saved=$(mktemp -d "${{TMPDIR:-/tmp}}/dr-saved-config.XXXXXX") && cd {q(data_dir)} && '
            f'cp -p {_files()} "$saved"/ && echo "$saved"',
        ).stdout.strip()
        output["method"], output["rewind_error"] = self._copy(remote, db, source, data_dir, slot, params)
        remote.check("restore configuration", _restore_script(db, source, params.site, slot, data_dir, saved))
        log_file = db.log_files.get(params.site) or posixpath.join(posixpath.dirname(data_dir), "log", "postgres.log")
        remote.check(
            "start",
            f"mkdir -p {q(posixpath.dirname(log_file))} && "
            + shlex.join([remote.pg("pg_ctl"), "-D", data_dir, "-l", log_file, "-w", "-t", "60", "start"]),
        )
        output["streaming"] = self._wait_streaming(db, source, params.site, ctx)
        output["rebuild_s"] = round(time.monotonic() - started, 6)
        output["remote_steps"] = remote.steps
        return ActionResult(output=output)

    @staticmethod
    def _host(ctx: ActionContext, params: RebuildStandbyParams) -> Host:
        if params.host is not None:
            return ctx.host(params.host)
        candidates = ctx.inventory.site_hosts(params.site, role="db")
        if len(candidates) != 1:
            found = ", ".join(h.name for h in candidates) or "none"
            raise ActionError(f"say which host to rebuild on: site {params.site} has these db hosts: {found}")
        return candidates[0]

    @staticmethod
    def _copy(
        remote: _Remote, db: Database, source: str, data_dir: str, slot: str, params: RebuildStandbyParams
    ) -> tuple[str, str | None]:
        """pg_rewind, else (if allowed) pg_basebackup; returns the method and why rewinding failed."""
        source_server = db.remote_conninfo(source, application_name="pg_rewind", dbname="postgres")
        no_sync = [] if params.flush else ["--no-sync"]
        rewind = remote.run(
            "pg_rewind",
            shlex.join([remote.pg("pg_rewind"), "-D", data_dir, f"--source-server={source_server}", *no_sync]),
        )
        if rewind.exit_status == 0:
            return "pg_rewind", None
        why = last_line(rewind.stderr) or f"exit {rewind.exit_status}"
        if not params.allow_basebackup:
            raise ActionError(f"pg_rewind of {db.where(params.site)} failed: {why}")
        backup = shlex.join(
            [
                remote.pg("pg_basebackup"), "-h", db.hosts[source], "-p", str(db.port_of(source)), "-U", db.user,
                "-D", data_dir, "-X", "stream", "-c", "fast", "-S", slot, *no_sync,
            ]
        )  # fmt: skip
        # Emptied, not removed: the directory's parent need not be writable by the database's user.
        emptied = f"find {q(data_dir)} -mindepth 1 -maxdepth 1 -exec rm -rf {{}} +"
        remote.check("pg_basebackup", f"{emptied} && {backup}")
        return "pg_basebackup", why

    @staticmethod
    def _streaming(primary: psycopg.Connection, site: str) -> dict[str, Any] | None:
        row = primary.execute(
            b"SELECT state, sync_state, replay_lsn::text FROM pg_stat_replication"
            b" WHERE application_name = %s AND state = 'streaming'",
            (site,),
        ).fetchone()
        return None if row is None else {"state": row[0], "sync_state": row[1], "replay_lsn": row[2]}

    def _wait_streaming(self, db: Database, source: str, site: str, ctx: ActionContext) -> dict[str, Any]:
        started = time.monotonic()
        with connect(db, source, ctx) as primary:
            while True:
                streaming = self._streaming(primary, site)
                if streaming is not None:
                    return {**streaming, "waited_s": round(time.monotonic() - started, 6)}
                poll_until_deadline(
                    ctx, f"{db.where(site)} was started as a standby but does not stream from {source}", started
                )


def q(text: str) -> str:
    return shlex.quote(text)


def _files() -> str:
    return " ".join(q(name) for name in CONFIG_FILES)


def _restore_script(db: Database, source: str, site: str, slot: str, data_dir: str, saved: str) -> str:
    """Put the site's own configuration back, minus its old replication roles, and make it a standby."""
    settings = {
        "primary_conninfo": db.remote_conninfo(source, application_name=site),
        "primary_slot_name": slot,
        # A standby promoted later must not wait for a standby of its own until one is set up.
        "synchronous_standby_names": "",
    }
    lines = [f"{name} = '{value.replace(chr(39), chr(39) * 2)}'" for name, value in settings.items()]
    dropped = q(rf"^[[:space:]]*({'|'.join(DROPPED_SETTINGS)})[[:space:]]*=")
    own = " ".join(q(f"{saved}/{name}") for name in CONFIG_FILES[:3])
    auto_conf, saved_auto_conf = q(f"{data_dir}/postgresql.auto.conf"), q(f"{saved}/postgresql.auto.conf")
    return " && ".join(
        [
            f"cp -p {own} {q(data_dir)}/",
            f"{{ grep -v -E {dropped} {saved_auto_conf} || true; }} > {auto_conf}",
            f"printf '%s\\n' {' '.join(q(line) for line in lines)} >> {auto_conf}",
            f"touch {q(data_dir + '/standby.signal')}",
            f"rm -rf {q(saved)}",
        ]
    )


class _Remote:
    """Commands on the host as the database's OS user, each recorded (name, exit status, duration,
    stderr's end). When the SSH login is another user, through ``sudo -n -u OS_USER``."""

    def __init__(self, ctx: ActionContext, host: Host, pg_bin: str, os_user: str | None) -> None:
        self.ctx, self.host, self.pg_bin = ctx, host, pg_bin
        self.sudo_to = os_user if os_user and os_user != host.user else None
        self.steps: list[dict[str, Any]] = []

    def pg(self, program: str) -> str:
        return posixpath.join(self.pg_bin, program)

    def as_os_user(self, command: str) -> str:
        if self.sudo_to is None:
            return command
        return shlex.join(["sudo", "-n", "-u", self.sudo_to, "--", "sh", "-c", command])

    def run(self, name: str, command: str) -> ExecResult:
        result = execute(self.ctx, self.host, self.as_os_user(command))
        self.steps.append(
            {
                "step": name,
                "exit_status": result.exit_status,
                "duration_s": round(result.duration_s, 6),
                "stderr_tail": result.stderr[-2000:],
            }
        )
        return result

    def check(self, name: str, command: str) -> ExecResult:
        result = self.run(name, command)
        if result.exit_status != 0:
            why = last_line(result.stderr) or last_line(result.stdout) or "no output"
            raise ActionError(f"{name} on host {self.host.name} failed (exit {result.exit_status}): {why}")
        return result

    def stop_if_running(self, data_dir: str) -> str:
        """Stop the server of ``data_dir`` if one runs there; what was found: running, stale or stopped.

        Not ``pg_ctl status``: after a crash, the pid in postmaster.pid may belong to a zombie or to
        another process by now, and pg_ctl would wait for that one. A server runs there when the pid's
        working directory is the data directory; else a postmaster.pid left by the crash is removed.
        """
        found = self.check("server state", shlex.join(["sh", "-c", _SERVER_STATE, "sh", data_dir])).stdout.strip()
        if found == "running":
            self.check(
                "pg_ctl stop", shlex.join([self.pg("pg_ctl"), "-D", data_dir, "-m", "fast", "-w", "-t", "60", "stop"])
            )
        elif found == "stale":
            self.check("remove stale postmaster.pid", shlex.join(["rm", "-f", f"{data_dir}/postmaster.pid"]))
        return found


_SERVER_STATE = """
cd "$1" || exit 4
[ -f postmaster.pid ] || { echo stopped; exit 0; }
pid=$(head -n 1 postmaster.pid)
if [ -n "$pid" ] && [ "$(readlink "/proc/$pid/cwd" 2>/dev/null)" = "$(pwd -P)" ]; then echo running; exit 0; fi
# A killed postmaster not yet reaped keeps its pid, and PostgreSQL would take its lock files as in use.
tries=0
while [ "$(cut -d ' ' -f 3 "/proc/$pid/stat" 2>/dev/null)" = Z ] && [ $tries -lt 200 ]; do
    sleep 0.05; tries=$((tries + 1))
done
echo stale
"""
