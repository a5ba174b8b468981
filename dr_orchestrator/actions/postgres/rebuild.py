"""``postgres.rebuild_standby``: turn a replaced primary into a standby of the new one (failback's first half).

Works over SSH on the database host of the site being rebuilt, as the login user of that host
(the database's OS user): stop the server if it runs, ``pg_rewind`` from the new primary (the
servers need ``wal_log_hints = on`` or data checksums), or a fresh ``pg_basebackup`` when rewinding
is impossible; keep the site's own configuration files (a rewind or a base backup copies the new
primary's, whose addresses are the other site's); make it a standby with a replication slot on the
new primary named after the site; start it; wait until the new primary sees it streaming.

Resumable after a kill anywhere (``dr resume`` runs it again): its work lives in ``DATA_DIR.dr-rebuild``
beside the data directory (whose parent the database's OS user must be able to write). The site's
own configuration is saved there once, before anything in the data directory changes, and every
later attempt uses that copy. A base backup goes to a fresh directory there, gets the site's
configuration, and only then replaces the data directory (two renames, each step marked so that a
re-run finishes the swap). A rewind changes the data directory in place, so one that did not finish
(killed or failed) is never trusted: the next attempt takes a base backup. A data directory marked
ready holds its control file's identity, so one that has run since is not trusted either. A re-run
first kills what a killed attempt left running on the host (its pg_rewind or pg_basebackup goes on
after the SSH connection drops). The action and ``playbooks/rebuild-standby.yml`` share this layout.
"""

from __future__ import annotations

import posixpath
import re
import shlex
import time
from collections.abc import Callable
from typing import Any

import psycopg
from pydantic import Field

from dr_orchestrator.actions.base import ActionContext, ActionError, ActionResult
from dr_orchestrator.actions.postgres.base import (
    Database,
    DatabaseAction,
    SiteParams,
    connect,
    one,
    probe_role,
    role_of,
)
from dr_orchestrator.actions.replicated import forced_reasons, optional_site_field, poll_until_deadline, site_field
from dr_orchestrator.actions.shell import last_line
from dr_orchestrator.actions.ssh import ExecResult, execute
from dr_orchestrator.model.inventory import Host

# Beside the data directory: what one rebuild needs across attempts (its parent must be writable).
WORK_SUFFIX = ".dr-rebuild"
CONFIG_FILES = ("postgresql.conf", "pg_hba.conf", "pg_ident.conf", "postgresql.auto.conf")
# Settings of the old life that a fresh standby must not keep (they are written anew or dropped).
DROPPED_SETTINGS = (
    "primary_conninfo",
    "primary_slot_name",
    "synchronous_standby_names",
    "default_transaction_read_only",
)


class RebuildStandbyParams(SiteParams):
    site: str = site_field("Site whose server becomes a standby (the replaced primary).")
    primary_site: str | None = optional_site_field(
        "Site of the new primary to follow; by default the database's other site."
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


class RebuildStandby(DatabaseAction[RebuildStandbyParams]):
    """Refuses to rebuild a server that is a writable primary unless the run is forced; does nothing
    (``already_streaming``) when the server already streams from the new primary, beyond removing
    what a killed attempt left beside its data directory."""

    name = "postgres.rebuild_standby"
    Params = RebuildStandbyParams
    idempotent = True  # resumable: see the module's docstring

    def run(self, params: RebuildStandbyParams, ctx: ActionContext) -> ActionResult:
        db, source = self.database_and_other_site(params, ctx, params.primary_site, "new primary")
        host = self._host(ctx, params)
        data_dir = (db.data_dirs.get(params.site) or host.vars.get("pg_data_dir") or "").rstrip("/")
        if not data_dir:
            raise ActionError(f"database {db.name!r} has no data directory for site {params.site} (data_dirs)")
        slot = re.sub(r"[^a-z0-9_]", "_", params.site.lower())
        output: dict[str, Any] = {"site": params.site, "primary_site": source, "host": host.name, "slot": slot}
        remote = _Remote(ctx, host, db.pg_bin, db.os_user)
        attempt = _Attempt(remote, data_dir)

        with connect(db, source, ctx) as primary:
            if role_of(primary)["role"] != "primary":
                raise ActionError(f"{db.where(source)} is not a primary: there is nothing to follow")
            if self._streaming(primary, params.site) is not None:
                if not ctx.check_mode:
                    output["leftovers"] = attempt.clean_up()
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
        started = time.monotonic()
        found = attempt.leftovers()
        output["resumed"] = sorted(mark for mark, present in found.items() if present and mark != "data_dir") or None
        output["server_found"] = remote.stop_if_running(data_dir)
        if not found["config"]:
            if not found["data_dir"]:
                raise ActionError(
                    f"{data_dir} on host {host.name} is missing and no saved configuration of the site is in "
                    f"{attempt.work}: there is nothing to take the site's own settings from"
                )
            remote.check("save configuration", _save_config_script(data_dir, attempt.work))
        if found["ready"]:
            output["method"], output["rewind_error"] = "resumed: the rebuilt data directory is in place", None
        elif found["copy_complete"]:
            attempt.script("swap in the copy", _SWAP)
            output["method"], output["rewind_error"] = "resumed: pg_basebackup", None
        else:
            output["method"], output["rewind_error"] = self._copy(
                attempt, db, source, slot, params, ctx, _untrusted(found)
            )
        configuration = _configuration(db, source, params.site, slot)
        log_file = db.log_files.get(params.site) or posixpath.join(posixpath.dirname(data_dir), "log", "postgres.log")
        remote.check(
            "start",
            attempt.tracked(
                f"mkdir -p {q(posixpath.dirname(log_file))} && "
                + shlex.join([remote.pg("pg_ctl"), "-D", data_dir, "-l", log_file, "-w", "-t", "60", "start"])
            ),
        )
        output["streaming"] = self._wait_streaming(db, source, params.site, ctx)
        attempt.clean_up()
        output["configuration"] = configuration
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

    def _copy(
        self,
        attempt: _Attempt,
        db: Database,
        source: str,
        slot: str,
        params: RebuildStandbyParams,
        ctx: ActionContext,
        untrusted: str | None,
    ) -> tuple[str, str | None]:
        """pg_rewind, else (if allowed) pg_basebackup; returns the method and why rewinding was not used.
        ``untrusted``: why an earlier attempt left the data directory unfit for a rewind (None: it did not)."""
        remote, work = attempt.remote, attempt.work
        configure = _configure_script(db, source, params.site, slot, work)
        no_sync = [] if params.flush else ["--no-sync"]
        if untrusted is not None:
            why = untrusted
        else:
            source_server = db.remote_conninfo(source, application_name="pg_rewind", dbname="postgres")
            rewind = remote.run(
                "pg_rewind",
                f"touch {q(work)}/rewinding && "
                + attempt.tracked(
                    shlex.join(
                        [remote.pg("pg_rewind"), "-D", attempt.data_dir, f"--source-server={source_server}", *no_sync]
                    )
                ),
            )
            if rewind.exit_status == 0:
                remote.check(
                    "configure",
                    f"{configure(attempt.data_dir)} && " + attempt.script_command(_MARK_READY + "rm -f rewinding"),
                )
                return "pg_rewind", None
            why = last_line(rewind.stderr) or f"exit {rewind.exit_status}"
        if not params.allow_basebackup:
            raise ActionError(f"pg_rewind of {db.where(params.site)} failed: {why}")
        self._free_slot(db, source, slot, ctx)
        copy = f"{work}/copy"
        backup = shlex.join(
            [
                remote.pg("pg_basebackup"), "-h", db.hosts[source], "-p", str(db.port_of(source)), "-U", db.user,
                "-D", copy, "-X", "stream", "-c", "fast", "-S", slot, *no_sync,
            ]
        )  # fmt: skip
        remote.check("pg_basebackup", f"rm -rf {q(copy)} && " + attempt.tracked(backup))
        remote.check("configure the copy", f"{configure(copy)} && touch {q(work)}/copy_complete")
        attempt.script("swap in the copy", _SWAP)
        return "pg_basebackup", why

    @staticmethod
    def _free_slot(db: Database, source: str, slot: str, ctx: ActionContext) -> None:
        """The slot may still be held by the walsender of a killed attempt's pg_basebackup: end it."""
        started = time.monotonic()
        with connect(db, source, ctx) as primary:
            while True:
                row = primary.execute(
                    b"SELECT active_pid, pg_terminate_backend(active_pid) FROM pg_replication_slots"
                    b" WHERE slot_name = %s AND active_pid IS NOT NULL",
                    (slot,),
                ).fetchone()
                if row is None:
                    return
                poll_until_deadline(ctx, f"replication slot {slot} on {db.where(source)} stays in use", started)

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


def _untrusted(found: dict[str, bool]) -> str | None:
    if found["rewinding"]:
        # PostgreSQL's advice after a pg_rewind that did not finish: take a fresh base backup.
        return "an earlier attempt's pg_rewind did not finish: the data directory may be half rewritten"
    if found["stale_ready"]:
        return "an earlier attempt's rebuilt data directory has run since it was marked ready"
    return None


def q(text: str) -> str:
    return shlex.quote(text)


def _save_config_script(data_dir: str, work: str) -> str:
    """The site's own configuration files, from its data directory (untouched until they are saved),
    to ``WORK/config``; renamed into place whole, so a later attempt never reads half a copy."""
    files = " ".join(q(f"{data_dir}/{name}") for name in CONFIG_FILES)
    return (
        f"cd {q(work)} && rm -rf config.partial && mkdir config.partial && cp -p {files} config.partial/ && "
        "mv config.partial config"
    )


def _configuration(db: Database, source: str, site: str, slot: str) -> dict[str, str]:
    return {
        "primary_conninfo": db.remote_conninfo(source, application_name=site),
        "primary_slot_name": slot,
        # A standby promoted later must not wait for a standby of its own until one is set up.
        "synchronous_standby_names": "",
    }


def _configure_script(db: Database, source: str, site: str, slot: str, work: str) -> Callable[[str], str]:
    """A command that puts the site's saved configuration into a data directory, minus its old
    replication roles, and makes it a standby (rewrites files only: running it twice is harmless)."""
    lines = [
        f"{name} = '{value.replace(chr(39), chr(39) * 2)}'"
        for name, value in _configuration(db, source, site, slot).items()
    ]
    dropped = q(rf"^[[:space:]]*({'|'.join(DROPPED_SETTINGS)})[[:space:]]*=")
    saved = f"{work}/config"
    own = " ".join(q(f"{saved}/{name}") for name in CONFIG_FILES[:3])

    def script(directory: str) -> str:
        auto_conf = q(f"{directory}/postgresql.auto.conf")
        return " && ".join(
            [
                f"cp -p {own} {q(directory)}/",
                f"{{ grep -v -E {dropped} {q(saved + '/postgresql.auto.conf')} || true; }} > {auto_conf}",
                f"printf '%s\\n' {' '.join(q(line) for line in lines)} >> {auto_conf}",
                f"touch {q(directory + '/standby.signal')}",
            ]
        )

    return script


# The scripts run in the work directory ($1: the data directory, $2: pg_bin). The data directory's
# identity in its control file: a "ready" mark holds it, so that a mark whose data directory has run
# (and checkpointed) since is not trusted.
_IDENTITY = """data_dir=$1 pg_bin=$2
identity() {
    "$pg_bin/pg_controldata" "$data_dir" 2>/dev/null |
        grep -E '^(Database system identifier|Latest checkpoint location):'
}
"""
_MARK_READY = (
    _IDENTITY
    + """set -e
identity > ready.partial
mv ready.partial ready
"""
)
# Each rename leaves a state the next attempt recognises: a complete copy and no copy directory left
# means the swap is done but not yet marked.
_SWAP = (
    """set -e
if [ -d copy ]; then
    if [ -e "$1" ]; then rm -rf old && mv "$1" old; fi
    mv copy "$1"
fi
"""
    + _MARK_READY
    + """rm -f copy_complete rewinding && rm -rf old
"""
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
        """Stop the server of ``data_dir`` if one runs there; what was found: running, stale, stopped,
        or missing (a swap was interrupted between its two renames).

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


class _Attempt:
    """One attempt of a rebuild on the host: its work directory beside the data directory (see the
    module's docstring), what an earlier attempt left there, and the commands it runs there."""

    def __init__(self, remote: _Remote, data_dir: str) -> None:
        self.remote, self.data_dir, self.work = remote, data_dir, data_dir + WORK_SUFFIX

    def script(self, name: str, script: str) -> ExecResult:
        return self.remote.check(name, self.script_command(script))

    def script_command(self, script: str) -> str:
        """``script`` by ``sh`` in the work directory, with the data directory as ``$1`` and pg_bin as ``$2``."""
        return f"cd {q(self.work)} && " + shlex.join(["sh", "-c", script, "sh", self.data_dir, self.remote.pg_bin])

    def tracked(self, command: str) -> str:
        """``command``, its process group first recorded in the work directory, so that the next
        attempt can end it: killing the orchestrator does not stop what it started on the host."""
        return f"{_RECORD_GROUP} > {q(self.work)}/attempt && {command}"

    def leftovers(self) -> dict[str, bool]:
        """End what a killed attempt left running; which of its marks are there (and the data directory)."""
        work = q(self.work)
        make = (
            f'mkdir -p {work} 2>/dev/null || {{ echo "cannot create {work}: the rebuild works beside the data '
            f'directory, so its parent must be writable by $(id -un)" >&2; exit 3; }}; '
        )
        found = self.remote.check("leftovers", make + self.script_command(_END_ATTEMPT + _LEFTOVERS)).stdout.split()
        marks = ("killed", "config", "rewinding", "copy_complete", "ready", "stale_ready", "data_dir")
        return {name: name in found for name in marks}

    def clean_up(self) -> list[str]:
        """End what an earlier attempt left running and remove its work directory; what was found."""
        command = f"[ -d {q(self.work)} ] || exit 0; " + self.script_command(_END_ATTEMPT + _LEFTOVERS + _REMOVE)
        return self.remote.check("clean up", command).stdout.split()


# The process group of the shell running the command, and its leader's start time (field 22 of
# /proc/PID/stat), which tells a reused id apart.
_RECORD_GROUP = (
    "pgid=$(sed 's/.*) //' /proc/$$/stat | cut -d ' ' -f 3) && "
    "echo \"$pgid $(sed 's/.*) //' /proc/$pgid/stat | cut -d ' ' -f 20)\""
)
# In the work directory. A group whose leader is gone keeps its id while any member lives, so only
# a leader that is there with another start time means the id now belongs to someone else.
_END_ATTEMPT = """
if [ -f attempt ]; then
    read -r pgid leader_started < attempt
    now=$(sed 's/.*) //' "/proc/$pgid/stat" 2>/dev/null | cut -d ' ' -f 20)
    if [ -n "$pgid" ] && { [ -z "$now" ] || [ "$now" = "$leader_started" ]; } && kill -KILL "-$pgid" 2>/dev/null; then
        echo killed
        tries=0
        while kill -0 "-$pgid" 2>/dev/null && [ $tries -lt 200 ]; do sleep 0.05; tries=$((tries + 1)); done
    fi
    rm -f attempt
fi
"""
_LEFTOVERS = (
    _IDENTITY
    + """
for mark in config rewinding copy_complete; do [ -e "$mark" ] && echo "$mark"; done
if [ -e ready ]; then
    if [ "$(identity)" = "$(cat ready)" ]; then echo ready; else echo stale_ready; fi
fi
[ -d "$1" ] && echo data_dir
true
"""
)
_REMOVE = f'\nrm -rf "$1{WORK_SUFFIX}"\n'

_SERVER_STATE = """
[ -d "$1" ] || { echo missing; exit 0; }
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
