#!/usr/bin/python3
"""heartbeat: every 100 ms, a row in the site's database saying how current it is (pt-heartbeat).

    heartbeat.py start --config SITE_DIR/site.json   idempotent; detaches and returns at once
    heartbeat.py run --config SITE_DIR/site.json     the loop itself (what `start` detaches)

Each row of ``dr_heartbeat`` holds the writing site, its clock at insert time, its WAL position and
the replication state of its standby at that moment (``sync``, ``async`` or ``none``, from
``pg_stat_replication``). The table replicates like any other, so a standby's newest row says how
current it was even while the primary is idle; the ``postgres.rpo`` action reads it after a promotion.

The lab starts it at the primary site, so it dies with that site. It writes only while the site's
database is a primary (a standby refuses writes; it tries again next tick): after a failback, start
it again there. Run by /usr/bin/python3 with python3-psycopg2, like the services.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

INTERVAL_S = 0.1
KEEP = "1 hour"  # rows older than this are deleted now and then: only the newest matter
PRUNE_EVERY_S = 60.0

CREATE = """
CREATE TABLE IF NOT EXISTS dr_heartbeat (
    id bigserial PRIMARY KEY,
    site text NOT NULL,
    at timestamptz NOT NULL DEFAULT clock_timestamp(),
    primary_lsn pg_lsn NOT NULL,
    sync_state text NOT NULL
)"""

BEAT = """
INSERT INTO dr_heartbeat (site, primary_lsn, sync_state)
SELECT %s, pg_current_wal_lsn(),
       COALESCE((SELECT sync_state FROM pg_stat_replication WHERE state = 'streaming'
                 ORDER BY sync_state = 'sync' DESC LIMIT 1), 'none')"""


def settings(path: str) -> dict[str, Any]:
    with open(path) as handle:
        loaded: dict[str, Any] = json.load(handle)
    return loaded


def pidfile(config_path: str) -> Path:
    return Path(config_path).resolve().parent / "run" / "heartbeat.pid"


def running_pid(config_path: str) -> int | None:
    """The pid in the pidfile when it is alive and this very heartbeat (not a reused pid)."""
    try:
        pid = int(pidfile(config_path).read_text().strip())
        cmdline = Path(f"/proc/{pid}/cmdline").read_bytes()
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except (OSError, ValueError):
        return None
    return pid if state != "Z" and os.path.abspath(__file__).encode() in cmdline else None


def start(config_path: str) -> int:
    if running_pid(config_path) is not None:
        return 0
    log_path = Path(config_path).resolve().parent / "log" / "heartbeat.log"
    with open(log_path, "ab") as log:
        # A new session: it outlives this command and the SSH session that ran it.
        process = subprocess.Popen(
            [sys.executable, os.path.abspath(__file__), "run", "--config", config_path],
            stdin=subprocess.DEVNULL, stdout=log, stderr=log, start_new_session=True, close_fds=True,
        )
    pidfile(config_path).write_text(f"{process.pid}\n")
    return 0


def run(config_path: str) -> int:
    import psycopg2.errors  # only the loop needs it

    config = settings(config_path)
    database = config["database"]
    stopping = False

    def stop(signum: int, frame: Any) -> None:
        nonlocal stopping
        stopping = True

    signal.signal(signal.SIGTERM, stop)
    signal.signal(signal.SIGINT, stop)
    connection = None
    state = "starting"
    pruned_at = 0.0
    next_at = time.monotonic()
    while not stopping:
        try:
            if connection is None or connection.closed:
                connection = psycopg2.connect(
                    host=database["host"], port=database["port"], dbname=database["dbname"], user=database["user"],
                    connect_timeout=2, application_name="dr-heartbeat",
                )
                connection.autocommit = True
            with connection.cursor() as cursor:
                try:
                    cursor.execute(BEAT, (config["site"],))
                except psycopg2.errors.UndefinedTable:
                    cursor.execute(CREATE)
                    cursor.execute(BEAT, (config["site"],))
                if time.monotonic() - pruned_at > PRUNE_EVERY_S:
                    cursor.execute(f"DELETE FROM dr_heartbeat WHERE at < now() - interval '{KEEP}'")
                    pruned_at = time.monotonic()
            new_state = "writing"
        except psycopg2.errors.ReadOnlySqlTransaction:
            new_state = "standby (read-only): waiting"
        except psycopg2.Error as exc:
            first_line = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
            new_state = f"database error: {first_line}"
            if connection is not None:
                connection.close()
            connection = None
        if new_state != state:
            print(f"{time.strftime('%Y-%m-%dT%H:%M:%S')} {config['site']}: {new_state}", flush=True)
            state = new_state
        next_at += INTERVAL_S
        delay = next_at - time.monotonic()
        if delay < 0:
            next_at = time.monotonic()  # fell behind (a hung database): keep the rate from now on
        else:
            time.sleep(delay)
    if connection is not None:
        connection.close()
    pidfile(config_path).unlink(missing_ok=True)
    return 0


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(description="write a heartbeat row every 100 ms while the database is primary")
    parser.add_argument("command", choices=["start", "run"])
    parser.add_argument("--config", required=True, help="the site's site.json")
    arguments = parser.parse_args(argv)
    config_path = os.path.abspath(arguments.config)
    return start(config_path) if arguments.command == "start" else run(config_path)


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
