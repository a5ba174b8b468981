"""The lab's Redis: quotation's price cache, a master at the primary site and a replica at the backup site.

Replication is Redis's own (asynchronous): a SIGKILL of the master loses what the replica had not
received, which the `redis.rpo` action measures from the heartbeat key the lab writes every 100 ms.
Nothing is persisted to disk: a restarted old master is made a replica again by the failback, which
copies the data over (diskless, at once).
"""

from __future__ import annotations

import time
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import redis

from dr_orchestrator.lab.config import LabConfig
from dr_orchestrator.lab.system import LabSetupError, as_user, chown, run

REDIS_SERVER = "/usr/bin/redis-server"
HEARTBEAT_KEY = "dr:heartbeat"
# The quotes every quote read can find (the load generator asks for these symbols).
SEED_QUOTES: dict[str, tuple[float, float]] = {
    "ACME": (101.25, 101.30), "GLOBEX": (54.10, 54.14), "INITECH": (12.02, 12.05),
    "EURUSD": (1.0841, 1.0843), "GBPUSD": (1.2702, 1.2705), "BUND10Y": (131.40, 131.46),
}


def config_file(config: LabConfig, site: str) -> Path:
    return config.redis_dir(site) / "redis.conf"


def marker(config: LabConfig, site: str) -> str:
    """What the server's process title contains (its config file, under the lab's root)."""
    return str(config_file(config, site))


def log_path(config: LabConfig, site: str) -> Path:
    return config.log_dir(site) / "redis-quotation.log"


def write_config(config: LabConfig, site: str) -> None:
    directory = config.redis_dir(site)
    directory.mkdir(mode=0o700, exist_ok=True)
    chown(directory, config.os_user)
    lines = {
        "bind": config.address(site),
        "port": str(config.redis_port),
        "daemonize": "yes",
        "pidfile": str(config.redis_pidfile(site)),
        "logfile": str(log_path(config, site)),
        "dir": str(directory),
        "save": '""',
        "appendonly": "no",
        "protected-mode": "no",  # bound to the site's loopback address only
        # A replica that (re)connects is copied over the socket at once, not after the default 5 s wait.
        "repl-diskless-sync": "yes",
        "repl-diskless-sync-delay": "0",
        "repl-diskless-load": "on-empty-db",
        "repl-timeout": "10",
        "proc-title-template": '"{title} {listen-addr} {config-file}"',
    }
    if site != "primary":
        lines["replicaof"] = f"{config.address('primary')} {config.redis_port}"
    path = config_file(config, site)
    path.write_text("".join(f"{name} {value}\n" for name, value in lines.items()))
    chown(path, config.os_user)


def start(config: LabConfig, site: str, timeout: float = 10.0) -> None:
    """Start the server at `site` (daemonized) and wait until it answers."""
    run(as_user(config.os_user, [REDIS_SERVER, str(config_file(config, site))]), timeout=timeout)
    deadline = time.monotonic() + timeout
    while True:
        try:
            client(config, site).ping()
            return
        except redis.RedisError:
            if time.monotonic() > deadline:
                raise LabSetupError(f"Redis at the {site} site did not answer within {timeout:.0f} s; "
                                    f"see {log_path(config, site)}") from None
            time.sleep(0.02)


def client(config: LabConfig, site: str) -> redis.Redis:
    return redis.Redis(host=config.address(site), port=config.redis_port, socket_timeout=2,
                       socket_connect_timeout=2, decode_responses=True)


def seed(config: LabConfig) -> None:
    """The quotes, written at the master (they replicate)."""
    now = datetime.now(UTC).isoformat()
    with client(config, "primary") as master:
        for symbol, (bid, ask) in SEED_QUOTES.items():
            master.hset(f"quote:{symbol}", mapping={"bid": bid, "ask": ask, "as_of": now})


def wait_replicating(config: LabConfig, timeout: float = 20.0) -> None:
    deadline = time.monotonic() + timeout
    while True:
        state = cache_state(config, "backup")
        if state.get("role") == "replica" and state.get("link") == "up":
            return
        if time.monotonic() > deadline:
            raise LabSetupError(f"quotation's Redis replica did not connect to its master within {timeout:.0f} s; "
                                f"see {log_path(config, 'backup')}")
        time.sleep(0.05)


def cache_state(config: LabConfig, site: str) -> dict[str, Any]:
    """Role (primary, replica, or unreachable), whether it takes writes, replication link and offset."""
    try:
        with client(config, site) as server:
            info = server.info("replication")
    except redis.RedisError:
        return {"role": "unreachable", "writable": False}
    if info.get("role") == "master":
        return {"role": "primary", "writable": True, "offset": info.get("master_repl_offset"),
                "replicas": int(info.get("connected_slaves", 0))}
    return {"role": "replica", "writable": False, "link": info.get("master_link_status"),
            "offset": info.get("slave_repl_offset"),
            "master": f"{info.get('master_host')}:{info.get('master_port')}"}

