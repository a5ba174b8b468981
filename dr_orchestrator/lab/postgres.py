"""The lab's PostgreSQL: per writing service (trading, contract-signing) its own primary cluster at the
primary site and a streaming hot standby at the backup site."""

from __future__ import annotations

import re
import time
from pathlib import Path
from typing import Any

import psycopg

from dr_orchestrator.lab.config import (
    DATABASE_NAME,
    DATABASE_USER,
    PG_BIN,
    REPLICATION_SLOT,
    STANDBY_APPLICATION_NAME,
    LabConfig,
)
from dr_orchestrator.lab.system import LabSetupError, as_user, chown, run

SCHEMAS: dict[str, str] = {
    "trading": """
CREATE TABLE orders (
    order_id bigserial PRIMARY KEY,
    client_order_id text NOT NULL UNIQUE,
    symbol text NOT NULL,
    side text NOT NULL CHECK (side IN ('buy', 'sell')),
    qty integer NOT NULL CHECK (qty > 0),
    created_at timestamptz NOT NULL DEFAULT clock_timestamp()
);
""",
    "contract-signing": """
CREATE TABLE contracts (
    contract_id text PRIMARY KEY,
    body text NOT NULL,
    sha256 text NOT NULL,
    created_at timestamptz NOT NULL DEFAULT clock_timestamp()
);
""",
}


def _settings(config: LabConfig, site: str, service: str) -> dict[str, str]:
    """Settings of `service`'s cluster at `site` (appended to postgresql.conf: the last one wins)."""
    archive = config.wal_archive(service)
    return {
        "listen_addresses": f"'{config.address(site)}'",
        "port": str(config.postgres_port(service)),
        "unix_socket_directories": f"'{config.run_dir(site)}'",
        "cluster_name": f"'drlab-{service}-{site}'",
        "max_connections": "100",
        # The lab's power loss is a SIGKILL: the kernel's page cache survives it, so fsync buys
        # nothing here and costs seconds on a virtual disk (trading's commits still wait for its standby).
        "fsync": "off",
        "shared_buffers": "32MB",
        # Dynamic shared memory as files in the data directory: the lab's power loss is a SIGKILL, which
        # leaves POSIX segments behind in /dev/shm for good (1 MB each, every kill); files go with the lab.
        "dynamic_shared_memory_type": "mmap",
        "wal_level": "replica",
        "max_wal_senders": "10",
        "min_wal_size": "8MB",
        "max_wal_size": "256MB",
        "max_replication_slots": "10",
        "wal_log_hints": "on",  # pg_rewind, for failback
        # pg_rewind reads the old primary's WAL back to the last common checkpoint; without a floor, the
        # checkpoint of its own crash recovery recycles those segments and only a full base backup is left.
        "wal_keep_size": "256MB",
        "hot_standby": "on",
        "hot_standby_feedback": "on",
        # A promote landing just as the walreceiver dies would otherwise stall up to 5 s.
        "wal_retrieve_retry_interval": "100ms",
        "archive_mode": "on",
        "archive_command": f"'test ! -f {archive}/%f && cp %p {archive}/%f'",
        "archive_timeout": "60s",
        "logging_collector": "off",
        "log_line_prefix": "'%m [%p] '",
        "timezone": "'UTC'",
        "log_timezone": "'UTC'",
        "log_min_messages": "warning",
    }


def _append_settings(conf: Path, settings: dict[str, str], heading: str) -> None:
    lines = "".join(f"{name} = {value}\n" for name, value in settings.items())
    with conf.open("a") as handle:
        handle.write(f"\n# --- {heading} (dr lab) ---\n{lines}")


def _hba(config: LabConfig) -> str:
    # Loopback only; connections to 127.0.10.1 come from 127.0.0.1, hence the whole /8.
    return (
        "# dr lab: trust on loopback, the lab's sites are all on this machine\n"
        "local   all          all                 trust\n"
        "host    all          all   127.0.0.0/8   trust\n"
        "host    replication  all   127.0.0.0/8   trust\n"
    )


def pg(command: str) -> str:
    return str(PG_BIN / command)


def ctl_start(config: LabConfig, site: str, service: str) -> None:
    command = [pg("pg_ctl"), "-D", str(config.pgdata(site, service)), "-l", str(config.postgres_log(site, service)),
               "-w", "-t", "30", "start"]
    run(as_user(config.os_user, command), timeout=40)


def create_primary(config: LabConfig, service: str) -> None:
    """initdb, configure, start, and create the `drlab` database with the service's table."""
    data = config.pgdata("primary", service)
    data.mkdir(mode=0o700)
    chown(data, config.os_user)
    run(as_user(config.os_user, [pg("initdb"), "-D", str(data), "-U", DATABASE_USER, "-A", "trust",
                                 "-E", "UTF8", "--locale=C.UTF-8", "--no-sync",
                                 # 1 MB WAL segments: /tmp is often mounted with `discard`, where
                                 # creating and deleting 16 MB segments makes up and down slow.
                                 "--wal-segsize=1"]), timeout=60)
    _append_settings(data / "postgresql.conf", _settings(config, "primary", service), "primary site")
    (data / "pg_hba.conf").write_text(_hba(config))
    ctl_start(config, "primary", service)
    with psycopg.connect(config.dsn("primary", service, dbname="postgres"), autocommit=True) as connection:
        connection.execute(f"CREATE DATABASE {DATABASE_NAME}")
    with psycopg.connect(config.dsn("primary", service), autocommit=True) as connection:
        connection.execute(SCHEMAS[service].encode())
        connection.execute("SELECT pg_create_physical_replication_slot(%s)", (REPLICATION_SLOT,))


def create_standby(config: LabConfig, service: str) -> None:
    """pg_basebackup of `service`'s primary into the backup site, configured as a streaming hot standby."""
    data = config.pgdata("backup", service)
    data.mkdir(mode=0o700)
    chown(data, config.os_user)
    run(as_user(config.os_user, [
        pg("pg_basebackup"), "-h", config.address("primary"), "-p", str(config.postgres_port(service)),
        "-U", DATABASE_USER,
        "-D", str(data), "-R", "-X", "stream", "-S", REPLICATION_SLOT, "-c", "fast", "--no-sync",
    ]), timeout=120)
    standby = _settings(config, "backup", service)
    standby.update({
        "primary_conninfo": (f"'host={config.address('primary')} port={config.postgres_port(service)} "
                             f"user={DATABASE_USER} application_name={STANDBY_APPLICATION_NAME}'"),
        "primary_slot_name": f"'{REPLICATION_SLOT}'",
        # The copied configuration must not make a promoted standby wait for a standby of its own.
        "synchronous_standby_names": "''",
    })
    _append_settings(data / "postgresql.conf", standby, "backup site (standby)")
    # pg_basebackup -R wrote its own primary_conninfo into postgresql.auto.conf, which is read last.
    auto = data / "postgresql.auto.conf"
    auto.write_text("".join(line for line in auto.read_text().splitlines(keepends=True)
                            if not line.startswith("primary_conninfo")))
    ctl_start(config, "backup", service)


def take_base_backup(config: LabConfig) -> None:
    """A base backup of trading's primary into the backup site, for point-in-time recovery with the WAL archive."""
    target = config.base_backup
    target.mkdir(mode=0o700)
    chown(target, config.os_user)
    run(as_user(config.os_user, [
        pg("pg_basebackup"), "-h", config.address("primary"), "-p", str(config.postgres_port("trading")),
        "-U", DATABASE_USER,
        "-D", str(target), "-X", "stream", "-c", "fast", "--no-sync",
    ]), timeout=120)


def wait_streaming(config: LabConfig, service: str, timeout: float = 20.0) -> None:
    deadline = time.monotonic() + timeout
    while True:
        rows = replication_rows(config, service)
        if any(row["state"] == "streaming" for row in rows):
            return
        if time.monotonic() > deadline:
            raise LabSetupError(f"{service}'s standby did not start streaming within {timeout:.0f} s; "
                                f"see {config.postgres_log('backup', service)}")
        time.sleep(0.05)


def set_synchronous(config: LabConfig, service: str, synchronous: bool) -> None:
    """Make commits on `service`'s primary wait for its standby (only once it streams, or writes hang)."""
    names = f"FIRST 1 ({STANDBY_APPLICATION_NAME})" if synchronous else ""
    with psycopg.connect(config.dsn("primary", service), autocommit=True) as connection:
        connection.execute(f"ALTER SYSTEM SET synchronous_standby_names = '{names}'".encode())
        connection.execute("SELECT pg_reload_conf()")
        if synchronous:
            deadline = time.monotonic() + 10
            while connection.execute("SELECT count(*) FROM pg_stat_replication WHERE sync_state = 'sync'"
                                     ).fetchone() != (1,):
                if time.monotonic() > deadline:
                    raise LabSetupError(f"{service}'s standby did not become synchronous within 10 s")
                time.sleep(0.05)


def replication_rows(config: LabConfig, service: str, site: str = "primary") -> list[dict[str, Any]]:
    """The view of `service`'s read-write cluster at `site` on its standbys: state, sync_state, lag in bytes
    and seconds."""
    query = """
        SELECT application_name, client_addr::text, state, sync_state,
               pg_wal_lsn_diff(pg_current_wal_lsn(), replay_lsn)::bigint AS lag_bytes,
               COALESCE(EXTRACT(epoch FROM replay_lag), 0)::float AS lag_seconds,
               sent_lsn::text, replay_lsn::text
        FROM pg_stat_replication"""
    try:
        with psycopg.connect(config.dsn(site, service), autocommit=True) as connection:
            cursor = connection.execute(query)
            names = [column.name for column in cursor.description or []]
            return [dict(zip(names, row, strict=True)) for row in cursor.fetchall()]
    except psycopg.Error:
        return []


def database_state(config: LabConfig, site: str, service: str) -> dict[str, Any]:
    """Role, whether it takes writes, and WAL position of `service`'s cluster at `site` ({"role":
    "unreachable", "writable": False} when it does not answer)."""
    query = """
        SELECT pg_is_in_recovery(),
               CASE WHEN pg_is_in_recovery() THEN pg_last_wal_receive_lsn()::text
                    ELSE pg_current_wal_lsn()::text END,
               CASE WHEN pg_is_in_recovery() THEN pg_last_wal_replay_lsn()::text END,
               pg_last_xact_replay_timestamp(),
               (SELECT status FROM pg_stat_wal_receiver),
               current_setting('synchronous_standby_names'),
               pg_wal_lsn_diff(pg_last_wal_receive_lsn(), pg_last_wal_replay_lsn())::bigint,
               current_setting('default_transaction_read_only') = 'on'"""
    try:
        with psycopg.connect(config.dsn(site, service), autocommit=True) as connection:
            row = connection.execute(query).fetchone()
    except psycopg.Error:
        return {"role": "unreachable", "writable": False}
    assert row is not None
    in_recovery, lsn, replay_lsn, replay_time, receiver, sync_names, unreplayed, read_only = row
    # A primary set read-only (a fenced old primary) is not in recovery but takes no writes either.
    state: dict[str, Any] = {"role": "standby" if in_recovery else "primary",
                             "writable": not (in_recovery or read_only), "wal_lsn": lsn}
    if in_recovery:
        # Received but not yet replayed; the lag behind the primary is in pg_stat_replication.
        state.update(replay_lsn=replay_lsn, replay_backlog_bytes=unreplayed, wal_receiver=receiver or "stopped",
                     last_replay=replay_time.isoformat() if replay_time else None)
    else:
        state["synchronous_standby_names"] = sync_names
    return state


def break_replication(config: LabConfig, service: str) -> None:
    """Cut `service`'s standby off its primary (as a broken replication link would): it stops receiving WAL."""
    with psycopg.connect(config.dsn("backup", service), autocommit=True) as connection:
        connection.execute("ALTER SYSTEM SET primary_conninfo = ''")
        connection.execute("SELECT pg_reload_conf()")
        deadline = time.monotonic() + 10
        while connection.execute("SELECT count(*) FROM pg_stat_wal_receiver").fetchone() != (0,):
            if time.monotonic() > deadline:
                raise LabSetupError("the standby's WAL receiver did not stop within 10 s")
            time.sleep(0.05)


def postmaster_marker(config: LabConfig, site: str, service: str) -> str:
    return f"-D {config.pgdata(site, service)}"


_SHM_LINE = re.compile(r"^\s*(\d+)\s+(\d+)\s*$")


def shared_memory_id(pgdata: Path) -> str | None:
    """The SysV segment of the postmaster of `pgdata` (its postmaster.pid; gone after a clean stop)."""
    try:
        lines = (pgdata / "postmaster.pid").read_text().splitlines()
    except OSError:
        return None
    match = _SHM_LINE.match(lines[6]) if len(lines) > 6 else None
    return match.group(2) if match else None


def _attached(shmid: str) -> int | None:
    """How many processes are attached to segment `shmid`; None when it is gone."""
    try:
        table = Path("/proc/sysvipc/shm").read_text().splitlines()[1:]
    except OSError:
        return None
    for entry in table:
        fields = entry.split()  # key shmid perms size cpid lpid nattch ...
        if len(fields) > 6 and fields[1] == shmid:
            return int(fields[6])
    return None


def release_shared_memory(shmid: str, timeout: float = 5.0) -> None:
    """Remove the SysV segment of a postmaster that is gone: left behind by a SIGKILL, or marked removed
    by a clean stop while a backend still finishes exiting. Waits (bounded) for its last process to
    detach; a segment still attached then is left alone."""
    deadline = time.monotonic() + timeout
    while (attached := _attached(shmid)) is not None:
        if attached == 0:
            run(["ipcrm", "-m", shmid], check=False)
            if _attached(shmid) is None:
                return
        if time.monotonic() >= deadline:
            return
        time.sleep(0.02)
