#!/usr/bin/python3
"""heartbeat: every 100 ms, a mark in each of the site's stores saying how current it is (pt-heartbeat).

    heartbeat.py start --config SITE_DIR/site.json   idempotent; detaches and returns at once
    heartbeat.py run --config SITE_DIR/site.json     the loop itself (what `start` detaches)

In each PostgreSQL store (trading's, contract-signing's), a row of ``dr_heartbeat`` holds the writing
site, its clock at insert time, its WAL position and the replication state of its standby at that
moment (``sync``, ``async`` or ``none``, from ``pg_stat_replication``). The table replicates like any
other, so a standby's newest row says how current it was even while the primary is idle; the
``postgres.rpo`` action reads it after a promotion. In the Redis store (quotation's), the key
``dr:heartbeat`` holds the writing site's clock (ISO 8601, UTC); ``redis.rpo`` reads it.

The lab starts it at the primary site, so it dies with that site. It writes to a store only while the
site's copy is the primary (a standby or replica refuses writes; it tries again next tick): after a
failback, start it again there. Run by /usr/bin/python3 with python3-psycopg2 and python3-redis, like
the services.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import subprocess
import sys
import threading
import time
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

INTERVAL_S = 0.1
REDIS_KEY = "dr:heartbeat"
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


class PostgresMark:
    """Beats into one PostgreSQL store while it is a primary."""

    def __init__(self, site: str, store: dict[str, Any]) -> None:
        self.site = site
        self.store = store
        self.connection: Any = None
        self.pruned_at = 0.0

    def beat(self) -> str:
        import psycopg2
        import psycopg2.errors

        store = self.store
        try:
            if self.connection is None or self.connection.closed:
                self.connection = psycopg2.connect(
                    host=store["host"], port=store["port"], dbname=store["dbname"], user=store["user"],
                    connect_timeout=2, application_name="dr-heartbeat",
                )
                self.connection.autocommit = True
            with self.connection.cursor() as cursor:
                try:
                    cursor.execute(BEAT, (self.site,))
                except psycopg2.errors.UndefinedTable:
                    cursor.execute(CREATE)
                    cursor.execute(BEAT, (self.site,))
                if time.monotonic() - self.pruned_at > PRUNE_EVERY_S:
                    cursor.execute(f"DELETE FROM dr_heartbeat WHERE at < now() - interval '{KEEP}'")
                    self.pruned_at = time.monotonic()
            return "writing"
        except psycopg2.errors.ReadOnlySqlTransaction:
            return "standby (read-only): waiting"
        except psycopg2.Error as exc:
            self.close()
            return f"database error: {(str(exc).strip().splitlines() or [type(exc).__name__])[0]}"

    def close(self) -> None:
        if self.connection is not None:
            self.connection.close()
        self.connection = None


class RedisMark:
    """Sets the heartbeat key in one Redis store while it is the master."""

    def __init__(self, site: str, store: dict[str, Any]) -> None:
        import redis

        self.site = site
        self.client = redis.Redis(host=store["host"], port=store["port"], socket_timeout=1,
                                  socket_connect_timeout=1)

    def beat(self) -> str:
        import redis

        try:
            self.client.set(REDIS_KEY, datetime.now(UTC).isoformat())
            return "writing"
        except redis.ReadOnlyError:
            return "replica (read-only): waiting"
        except redis.RedisError as exc:
            return f"redis error: {exc}"

    def close(self) -> None:
        self.client.close()


def beat_forever(site: str, name: str, mark: PostgresMark | RedisMark, stopping: threading.Event) -> None:
    """One store's loop: its own thread, so that a hung store never delays the others' marks."""
    state = "starting"
    next_at = time.monotonic()
    while not stopping.is_set():
        new_state = mark.beat()
        if new_state != state:
            print(f"{time.strftime('%Y-%m-%dT%H:%M:%S')} {site} {name}: {new_state}", flush=True)
            state = new_state
        next_at += INTERVAL_S
        delay = next_at - time.monotonic()
        if delay < 0:
            next_at = time.monotonic()  # fell behind (a hung store): keep the rate from now on
        else:
            stopping.wait(delay)
    mark.close()


def run(config_path: str) -> int:
    config = settings(config_path)
    stopping = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stopping.set())
    signal.signal(signal.SIGINT, lambda *_: stopping.set())
    threads = [
        threading.Thread(target=beat_forever, name=name, args=(
            config["site"], name, (RedisMark if store["kind"] == "redis" else PostgresMark)(config["site"], store),
            stopping))
        for name, store in config["stores"].items()
    ]
    for thread in threads:
        thread.start()
    while not stopping.is_set():  # the main thread stays free for the signal handlers
        stopping.wait(1.0)
    for thread in threads:
        thread.join()
    pidfile(config_path).unlink(missing_ok=True)
    return 0


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(description="write a heartbeat every 100 ms into each store primary here")
    parser.add_argument("command", choices=["start", "run"])
    parser.add_argument("--config", required=True, help="the site's site.json")
    arguments = parser.parse_args(argv)
    config_path = os.path.abspath(arguments.config)
    return start(config_path) if arguments.command == "start" else run(config_path)


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
