"""A replicated evidence PostgreSQL for the lab: two PostgreSQL 15 members under Patroni on the lab's etcd, one at
the primary site (127.0.10.1), one at the backup site (127.0.20.1).

    cluster = EvidenceCluster(Path("/tmp/lab/evidence"), etcd.endpoints, scope="lab-x")
    cluster.start()                     # primary-site member leads, backup-site member streams synchronously
    cluster.url                         # SQLAlchemy URL naming both members: always reaches the leader
    cluster.kill("primary")             # SIGKILL its Patroni and PostgreSQL (a power loss)
    cluster.wait_leader("backup", 60)   # Patroni's failover: tens of seconds (see below)
    cluster.restart("primary")          # rejoins as a replica (pg_rewind when needed)
    cluster.stop()                      # nothing left running, even after a failed start

Patroni's failover is slow by design: its leader key lives `ttl` seconds (Patroni's floor is 20 s, with
`retry_timeout` >= 3 s and `loop_wait + 2 * retry_timeout <= ttl`), so a power loss of the leader's site costs
about 20 to 25 s of evidence writes. Nothing on a failover's critical path may wait for it: the orchestrator keeps
its local evidence journal meanwhile and delivers it once the URL answers again.

Replication is synchronous (Patroni's `synchronous_mode: true`, not strict): a commit returns once the other
site holds it, so the replica that Patroni promotes has every acknowledged evidence row (RPO 0). Not strict,
because with two members strict mode would stop every evidence write while one site is down, including on
the newly promoted leader; Patroni instead drops to asynchronous while the replica is gone and back to
synchronous when it streams again.

Patroni starts PostgreSQL itself, and PostgreSQL refuses root: so Patroni runs as the `postgres` OS user (when
we are root) from its own small venv, built once by `ensure_patroni()` with Debian's /usr/bin/python3 in a
directory postgres can read (/var/cache/dr-orchestrator/patroni-venv; $DR_PATRONI_VENV to choose another).
scripts/setup.sh builds it (`python -m dr_orchestrator.lab.patroni`); `start()` builds it when missing.
Authentication is `trust` on loopback, as in the rest of the lab: no password exists.

Each member has free ports (REST API and PostgreSQL) on its site's address and its files under `directory`;
its etcd keys live under a namespace unique to each start, so several clusters can share one etcd.
`stop_all_under(directory)` finds what a killed session left running.
"""

from __future__ import annotations

import fcntl
import json
import os
import pwd
import shutil
import socket
import subprocess
import sys
import time
import urllib.request
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType
from typing import Any

import psycopg
import yaml

from dr_orchestrator.lab.config import PG_BIN, SERVICE_PYTHON, SITE_ADDRESSES
from dr_orchestrator.lab.postgres import release_shared_memory, shared_memory_id
from dr_orchestrator.lab.processes import (
    ProcessSpec,
    SiteMembers,
    kill_now,
    processes_under,
    with_descendants,
)
from dr_orchestrator.lab.system import LabSetupError, check_reachable

PATRONI_REQUIREMENTS: tuple[str, ...] = ("patroni[etcd3]==4.1.5", "psycopg[binary]>=3.1")
VENV_ENV = "DR_PATRONI_VENV"
SYSTEM_VENV = Path("/var/cache/dr-orchestrator/patroni-venv")
SITES: tuple[str, ...] = ("primary", "backup")
DATABASE = "dr_evidence"
USER = "dr_evidence"
SUPERUSER = "postgres"
# Patroni's smallest legal timing (ttl >= 20, loop_wait >= 1, retry_timeout >= 3, loop_wait + 2 * retry <= ttl);
# retry_timeout above its floor so a loaded test machine's slow etcd answer does not demote a healthy leader.
TTL = 20
LOOP_WAIT = 2
RETRY_TIMEOUT = 5
_START_ATTEMPTS = 3  # fresh ports each time: another process may take a probed port before its server binds it


class EvidenceLabError(LabSetupError):
    """The evidence cluster did not start, answer or stop in time (one sentence, names the log to read)."""


# --- Patroni's venv ----------------------------------------------------------------------------------


def patroni_venv() -> Path:
    """Where Patroni's venv lives: $DR_PATRONI_VENV, else /var/cache/... for root, else the user's cache."""
    if os.environ.get(VENV_ENV):
        return Path(os.environ[VENV_ENV])
    if os.geteuid() == 0:
        return SYSTEM_VENV
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "dr-orchestrator" / "patroni-venv"


def ensure_patroni(venv: Path | None = None) -> Path:
    """Patroni's executable, building its venv first when missing or built for other requirements (about
    10 s, once; parallel callers wait for one builder). Raises EvidenceLabError saying what to do."""
    venv = venv or patroni_venv()
    executable = venv / "bin" / "patroni"
    stamp = venv / ".dr-requirements"
    wanted = " ".join(PATRONI_REQUIREMENTS)
    if _stamp_matches(stamp, wanted) and os.access(executable, os.X_OK):
        return executable
    try:
        venv.parent.mkdir(mode=0o755, parents=True, exist_ok=True)
        with (venv.parent / f".{venv.name}.lock").open("a") as lock:
            fcntl.flock(lock, fcntl.LOCK_EX)
            if _stamp_matches(stamp, wanted) and os.access(executable, os.X_OK):
                return executable
            shutil.rmtree(venv, ignore_errors=True)
            _build(venv, executable)
            stamp.write_text(wanted + "\n")
    except OSError as error:
        raise EvidenceLabError(f"cannot build Patroni's venv in {venv}: {error}; set {VENV_ENV} to a writable "
                               f"directory the postgres user can read") from error
    return executable


def _stamp_matches(stamp: Path, wanted: str) -> bool:
    try:
        return stamp.read_text().strip() == wanted
    except OSError:
        return False


def _build(venv: Path, executable: Path) -> None:
    steps = [[SERVICE_PYTHON, "-m", "venv", str(venv)],
             [str(venv / "bin" / "python"), "-m", "pip", "install", "--quiet", "--disable-pip-version-check",
              *PATRONI_REQUIREMENTS]]
    for step in steps:
        result = subprocess.run(step, capture_output=True, text=True, stdin=subprocess.DEVNULL, timeout=600,
                                env={**os.environ, "PIP_NO_WARN_SCRIPT_LOCATION": "1"})
        if result.returncode != 0:
            shutil.rmtree(venv, ignore_errors=True)
            tail = (result.stderr.strip() or result.stdout.strip())[-600:]
            hint = " (Debian: `sudo apt-get install python3-venv`)" if step[1:3] == ["-m", "venv"] else ""
            raise EvidenceLabError(f"`{' '.join(step)}` failed{hint}: {tail}")
    for path in [venv, *venv.rglob("*")]:  # readable by the postgres user whatever our umask was
        if not path.is_symlink():
            path.chmod(path.stat().st_mode | 0o444 | (0o111 if path.is_dir() else 0))
    if not os.access(executable, os.X_OK):
        raise EvidenceLabError(f"pip installed no {executable}; remove {venv} and try again")


# --- the cluster -------------------------------------------------------------------------------------


def _free_port(address: str) -> int:
    with socket.socket() as sock:
        sock.bind((address, 0))
        return int(sock.getsockname()[1])


def _http_status(url: str, timeout: float = 1.0) -> int | None:
    """The HTTP status `url` answers with; None when nothing answers."""
    try:
        with urllib.request.urlopen(url, timeout=timeout) as response:
            return int(response.status)
    except urllib.error.HTTPError as error:
        return int(error.code)
    except OSError:
        return None


@dataclass(frozen=True)
class EvidenceMember:
    site: str
    address: str
    rest_port: int
    pg_port: int
    directory: Path  # owned by the OS user: patroni.yml, data/, logs, the pidfile

    @property
    def rest_url(self) -> str:
        return f"http://{self.address}:{self.rest_port}"

    @property
    def config_path(self) -> Path:
        return self.directory / "patroni.yml"

    @property
    def data_dir(self) -> Path:
        return self.directory / "data"

    @property
    def log_path(self) -> Path:
        return self.directory / "patroni.log"

    @property
    def postgres_log_dir(self) -> Path:
        return self.directory / "log"

    @property
    def process(self) -> ProcessSpec:
        return ProcessSpec(name="patroni", site=self.site, pidfile=self.directory / "patroni.pid",
                           marker=str(self.config_path))

    def dsn(self, dbname: str = "postgres", user: str = SUPERUSER) -> str:
        return f"host={self.address} port={self.pg_port} dbname={dbname} user={user} connect_timeout=2"


class EvidenceCluster(SiteMembers[EvidenceMember]):
    """Two PostgreSQL members under Patroni, one per site in SITES, its files under `directory` (its own)."""

    def __init__(self, directory: Path, etcd_endpoints: Sequence[str], scope: str, os_user: str | None = None,
                 database: str = DATABASE, user: str = USER, synchronous: bool = True, ttl: int = TTL,
                 loop_wait: int = LOOP_WAIT, retry_timeout: int = RETRY_TIMEOUT) -> None:
        super().__init__()
        if not etcd_endpoints:
            raise ValueError("the evidence cluster needs the lab's etcd endpoints")
        self.directory = Path(os.path.abspath(directory))
        self.etcd_endpoints = list(etcd_endpoints)
        self.scope = scope
        self.os_user = os_user or ("postgres" if os.geteuid() == 0 else pwd.getpwuid(os.geteuid()).pw_name)
        self.database = database
        self.user = user
        self.synchronous = synchronous
        self.ttl, self.loop_wait, self.retry_timeout = ttl, loop_wait, retry_timeout
        self.namespace = f"/dr-lab-evidence-{os.urandom(4).hex()}/"  # fresh per start: no keys of another run

    # --- state, for a lab driven by separate commands (`dr lab up --ha`, later `dr lab down`) ---------

    def state(self) -> dict[str, Any]:
        """What another process needs to find, kill, restart and reach these members (JSON-ready)."""
        return {"directory": str(self.directory), "etcd_endpoints": self.etcd_endpoints, "scope": self.scope,
                "namespace": self.namespace, "os_user": self.os_user, "database": self.database, "user": self.user,
                "synchronous": self.synchronous, "ttl": self.ttl, "loop_wait": self.loop_wait,
                "retry_timeout": self.retry_timeout,
                "members": [{"site": m.site, "rest_port": m.rest_port, "pg_port": m.pg_port}
                            for m in self.members.values()]}

    @classmethod
    def from_state(cls, state: dict[str, Any]) -> EvidenceCluster:
        """The cluster `state()` described; its running processes are found by pidfile and command line."""
        cluster = cls(Path(state["directory"]), state["etcd_endpoints"], str(state["scope"]),
                      os_user=str(state["os_user"]), database=str(state["database"]), user=str(state["user"]),
                      synchronous=bool(state["synchronous"]), ttl=int(state["ttl"]),
                      loop_wait=int(state["loop_wait"]), retry_timeout=int(state["retry_timeout"]))
        cluster.namespace = str(state["namespace"])
        for entry in state["members"]:
            site = str(entry["site"])
            cluster.members[site] = EvidenceMember(site, SITE_ADDRESSES[site], int(entry["rest_port"]),
                                                   int(entry["pg_port"]), cluster.directory / f"patroni-{site}")
        return cluster

    # --- what clients need ---------------------------------------------------------------------------

    @property
    def url(self) -> str:
        """SQLAlchemy URL (psycopg 3) naming both members; libpq tries each and keeps the read-write one, so it
        reaches whichever member leads. (SQLAlchemy parses several hosts only as `host=` query parameters.)"""
        hosts = "&".join(f"host={m.address}:{m.pg_port}" for m in self.members.values())
        return (f"postgresql+psycopg://{self.user}@/{self.database}?{hosts}"
                "&target_session_attrs=read-write&connect_timeout=2")

    def dsn(self, site: str, dbname: str | None = None, user: str | None = None) -> str:
        """libpq connection string of one member (the evidence database and user unless told otherwise)."""
        return self.members[site].dsn(dbname or self.database, user or self.user)

    # --- life cycle ----------------------------------------------------------------------------------

    def __enter__(self) -> EvidenceCluster:
        self.start()
        return self

    def __exit__(self, kind: type[BaseException] | None, error: BaseException | None,
                 trace: TracebackType | None) -> None:
        self.stop()

    def start(self, timeout: float = 60.0) -> None:
        """Start both members: the primary site's bootstraps and leads, the backup site's clones it and streams
        (as the synchronous standby when `synchronous`); then create the evidence user and database. On failure
        nothing is left running."""
        executable = ensure_patroni()
        check_reachable(executable.parent, self.os_user)
        self.directory.mkdir(parents=True, exist_ok=True)
        check_reachable(self.directory, self.os_user)
        last: EvidenceLabError | None = None
        for _ in range(_START_ATTEMPTS):
            self.stop()
            for member in self.members.values():  # a failed attempt's members: a new cluster starts empty
                shutil.rmtree(member.directory, ignore_errors=True)
            self.namespace = f"/dr-lab-evidence-{os.urandom(4).hex()}/"
            self._assign_ports()
            try:
                deadline = time.monotonic() + timeout
                self._spawn("primary", executable)
                self.wait_leader("primary", timeout=deadline - time.monotonic())
                self._spawn("backup", executable)
                self.wait_replica("backup", timeout=deadline - time.monotonic())
                self._create_database()
                return
            except (EvidenceLabError, psycopg.Error) as error:
                last = error if isinstance(error, EvidenceLabError) else EvidenceLabError(
                    f"the evidence database could not be created: {error}")
                self.stop()
                if not any("already in use" in self._log_tail(site) for site in self.members):
                    break
        assert last is not None
        raise last

    def _assign_ports(self) -> None:
        for site in SITES:
            address = SITE_ADDRESSES[site]
            rest_port = _free_port(address)
            pg_port = _free_port(address)
            while pg_port == rest_port:
                pg_port = _free_port(address)
            self.members[site] = EvidenceMember(site, address, rest_port, pg_port,
                                                self.directory / f"patroni-{site}")

    def _config(self, member: EvidenceMember) -> dict[str, Any]:
        local = "127.0.0.0/8"  # connections to 127.0.10.1 come from 127.0.0.1
        parameters = {
            "unix_socket_directories": str(member.directory),
            "max_connections": 100,
            "shared_buffers": "32MB",
            # A lab power loss is a SIGKILL: the page cache survives it, and fsync costs seconds on a virtual disk.
            "fsync": "off",
            "dynamic_shared_memory_type": "mmap",  # SIGKILL leaves POSIX segments in /dev/shm for good
            "wal_log_hints": "on",  # pg_rewind, when the old leader rejoins
            "wal_keep_size": "128MB",
            "wal_retrieve_retry_interval": "100ms",
            "hot_standby_feedback": "on",
            # A client cut off by a partition never says goodbye: without these its session, and the
            # chain lock its open transaction holds, would outlive it by the kernel's hours of keepalive.
            "tcp_keepalives_idle": 5, "tcp_keepalives_interval": 2, "tcp_keepalives_count": 2,
            "tcp_user_timeout": 5000,
            "logging_collector": "on",
            "log_directory": str(member.postgres_log_dir),
            "log_filename": "postgresql.log",
            "log_line_prefix": "%m [%p] ",
            "log_min_messages": "warning",
            "timezone": "UTC",
            "log_timezone": "UTC",
        }
        return {
            "scope": self.scope,
            "namespace": self.namespace,
            "name": member.site,
            "log": {"level": "INFO", "format": "%(asctime)s %(levelname)s: %(message)s"},
            "restapi": {"listen": f"{member.address}:{member.rest_port}",
                        "connect_address": f"{member.address}:{member.rest_port}"},
            "etcd3": {"hosts": [endpoint.split("://", 1)[-1] for endpoint in self.etcd_endpoints],
                      "protocol": "http"},
            "bootstrap": {
                "dcs": {
                    "ttl": self.ttl, "loop_wait": self.loop_wait, "retry_timeout": self.retry_timeout,
                    "maximum_lag_on_failover": 1024 * 1024,
                    "synchronous_mode": self.synchronous, "synchronous_mode_strict": False,
                    "postgresql": {"use_pg_rewind": True, "use_slots": True, "parameters": {
                        "wal_level": "replica", "hot_standby": "on", "max_wal_senders": 10,
                        "max_replication_slots": 10, "wal_log_hints": "on", "max_connections": 100}},
                },
                "initdb": [{"encoding": "UTF8"}, {"locale": "C.UTF-8"}, "no-sync", {"wal-segsize": "1"}],
            },
            "postgresql": {
                "listen": f"{member.address}:{member.pg_port}",
                "connect_address": f"{member.address}:{member.pg_port}",
                "data_dir": str(member.data_dir),
                "bin_dir": str(PG_BIN),
                "pgpass": str(member.directory / "pgpass"),
                "authentication": {"superuser": {"username": SUPERUSER},
                                   "replication": {"username": "replicator"},
                                   "rewind": {"username": SUPERUSER}},
                "pg_hba": ["# dr lab: trust on loopback, the lab's sites are all on this machine",
                           "local all all trust", f"host all all {local} trust",
                           f"host replication all {local} trust"],
                "parameters": parameters,
                "remove_data_directory_on_rewind_failure": True,
                "remove_data_directory_on_diverged_timelines": True,
            },
            "watchdog": {"mode": "off"},
        }

    def _spawn(self, site: str, executable: Path) -> None:
        member = self.members[site]
        member.directory.mkdir(mode=0o700, exist_ok=True)
        member.postgres_log_dir.mkdir(mode=0o700, exist_ok=True)
        member.config_path.write_text(yaml.safe_dump(self._config(member), sort_keys=False))
        as_other = os.geteuid() == 0 and self.os_user != "root"
        if as_other:
            entry = pwd.getpwnam(self.os_user)
            for path in (member.directory, member.postgres_log_dir, member.config_path):
                os.chown(path, entry.pw_uid, entry.pw_gid)
        environment = {"PATH": f"{executable.parent}:/usr/bin:/bin", "LANG": "C.UTF-8", "LC_ALL": "C.UTF-8",
                       "HOME": str(member.directory), "PYTHONDONTWRITEBYTECODE": "1"}
        with member.log_path.open("ab") as log:
            # Straight as the OS user (no runuser session in between): the pid we keep is Patroni's own.
            child = subprocess.Popen([str(executable), str(member.config_path)], stdin=subprocess.DEVNULL,
                                     stdout=log, stderr=subprocess.STDOUT, cwd=member.directory, env=environment,
                                     start_new_session=True, user=self.os_user if as_other else None,
                                     group=pwd.getpwnam(self.os_user).pw_gid if as_other else None,
                                     extra_groups=[] if as_other else None)
        self._children[site] = child
        member.process.pidfile.write_text(f"{child.pid}\n")

    def _create_database(self) -> None:
        leader = self.members[self.wait_leader(None, timeout=30)]
        with psycopg.connect(leader.dsn(), autocommit=True) as connection:
            exists = connection.execute("SELECT 1 FROM pg_roles WHERE rolname = %s", (self.user,)).fetchone()
            if exists is None:
                connection.execute(f'CREATE ROLE "{self.user}" LOGIN'.encode())
            exists = connection.execute("SELECT 1 FROM pg_database WHERE datname = %s", (self.database,)).fetchone()
            if exists is None:
                connection.execute(f'CREATE DATABASE "{self.database}" OWNER "{self.user}"'.encode())
            created_at = connection.execute("SELECT pg_current_wal_lsn()::text").fetchone()
        # A synchronous standby has flushed the creation but may not have replayed it yet: until it has,
        # connecting to the evidence database there fails with "does not exist".
        for site, member in self.members.items():
            if member is not leader and created_at is not None:
                self._wait_replayed(site, created_at[0], timeout=30)

    def _wait_replayed(self, site: str, lsn: str, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        with psycopg.connect(self.members[site].dsn(), autocommit=True) as connection:
            while not connection.execute("SELECT pg_wal_lsn_diff(pg_last_wal_replay_lsn(), %s::pg_lsn) >= 0",
                                         (lsn,)).fetchone() == (True,):
                if time.monotonic() >= deadline:
                    raise EvidenceLabError(f"the {site} site's evidence replica did not replay the creation of "
                                           f"the evidence database within {timeout:.0f} s; "
                                           f"see {self.members[site].log_path}")
                time.sleep(0.05)

    # --- who leads, who streams ----------------------------------------------------------------------

    def leader(self) -> str | None:
        """The site whose Patroni holds the leader key (its REST API's /leader answers 200), else None."""
        for site, member in self.members.items():
            if _http_status(f"{member.rest_url}/leader", timeout=1.0) == 200:
                return site
        return None

    def _writable(self, site: str) -> bool:
        try:
            with psycopg.connect(self.members[site].dsn(), autocommit=True) as connection:
                row = connection.execute("SELECT pg_is_in_recovery()").fetchone()
        except psycopg.Error:
            return False
        return row is not None and row[0] is False

    def wait_leader(self, site: str | None, timeout: float) -> str:
        """Wait until `site` (any site when None) holds Patroni's leader key and its PostgreSQL takes writes;
        returns the leader's site. After a power loss of the leader's site this takes about `ttl` seconds."""
        deadline = time.monotonic() + timeout
        while True:
            found = self.leader()
            if found is not None and (site is None or found == site) and self._writable(found):
                return found
            for name in self.members:
                if (site is None or name == site) and name in self._children and not self.running(name):
                    raise EvidenceLabError(f"Patroni at the {name} site exited: {self._log_tail(name)[-400:]} "
                                           f"(log: {self.members[name].log_path})")
            if time.monotonic() >= deadline:
                want = f"the {site} site" if site else "a member"
                where = self.members[site].log_path if site else self.directory
                raise EvidenceLabError(f"{want} did not lead the evidence cluster within {timeout:.0f} s "
                                       f"(leader now: {found}); see the Patroni logs under {where}")
            time.sleep(0.1)

    def cluster_view(self) -> dict[str, Any]:
        """Patroni's /cluster (members, roles, states, lag) from the first member that answers; {} if none."""
        for member in self.members.values():
            try:
                with urllib.request.urlopen(f"{member.rest_url}/cluster", timeout=1.0) as response:
                    return dict(json.loads(response.read()))
            except (OSError, ValueError):
                continue
        return {}

    def streaming(self, site: str) -> bool:
        """Whether `site`'s member is a replica streaming from the leader (the synchronous one when
        `synchronous`), as Patroni reports it."""
        for entry in self.cluster_view().get("members", []):
            if entry.get("name") == site:
                role_ok = entry.get("role") == "sync_standby" if self.synchronous else \
                    entry.get("role") in ("replica", "sync_standby")
                return bool(role_ok and entry.get("state") == "streaming")
        return False

    def wait_replica(self, site: str, timeout: float) -> None:
        """Wait until `site`'s member streams from the leader (see `streaming`)."""
        deadline = time.monotonic() + timeout
        while not self.streaming(site):
            if site in self._children and not self.running(site):
                raise EvidenceLabError(f"Patroni at the {site} site exited: {self._log_tail(site)[-400:]} "
                                       f"(log: {self.members[site].log_path})")
            if time.monotonic() >= deadline:
                raise EvidenceLabError(f"the {site} site's evidence replica did not stream within {timeout:.0f} s; "
                                       f"see {self.members[site].log_path}")
            time.sleep(0.1)

    # --- processes -----------------------------------------------------------------------------------

    def kill(self, site: str, timeout: float = 5.0) -> None:
        """SIGKILL `site`'s Patroni and its PostgreSQL at once (a power loss), and wait until they are gone."""
        member = self.members[site]
        own = self.pid(site)
        pids = with_descendants(processes_under(member.directory) | ({own} if own else set()))
        survivors = kill_now(pids, timeout)
        self._reap(site)
        shmid = shared_memory_id(member.data_dir)
        if shmid is not None:
            release_shared_memory(shmid)
        if survivors:
            raise EvidenceLabError(f"processes {sorted(survivors)} of the {site} site survived SIGKILL")

    def restart(self, site: str, timeout: float = 60.0) -> None:
        """Start `site`'s Patroni again on its own ports and data, and wait until its PostgreSQL runs (it rejoins
        as a replica when another member leads; `wait_replica` waits for it to stream)."""
        if self.running(site):
            raise EvidenceLabError(f"Patroni at the {site} site is running already")
        self._spawn(site, ensure_patroni())
        deadline = time.monotonic() + timeout
        while _http_status(f"{self.members[site].rest_url}/health") != 200:
            if not self.running(site):
                raise EvidenceLabError(f"Patroni at the {site} site exited: {self._log_tail(site)[-400:]}")
            if time.monotonic() >= deadline:
                raise EvidenceLabError(f"the {site} site's evidence member was not running within {timeout:.0f} s; "
                                       f"see {self.members[site].log_path}")
            time.sleep(0.1)

    def stop(self, timeout: float = 5.0) -> None:
        """SIGKILL every member (and anything of ours under `directory`): the data is the lab's, thrown away with
        it; a graceful stop would only spend Patroni's loop waits."""
        for site in list(self.members):
            self.kill(site, timeout)
        stop_all_under(self.directory, timeout)


def stop_all_under(directory: Path, timeout: float = 5.0) -> set[int]:
    """SIGKILL every Patroni and PostgreSQL process (and their children) whose command line names a path under
    `directory`, left by a killed session, and free their shared memory; returns the pids found."""
    directory = Path(os.path.abspath(directory))
    found = with_descendants(processes_under(directory))
    if found:
        kill_now(found, timeout)
    for pidfile in _postmaster_pidfiles(directory):
        shmid = shared_memory_id(pidfile.parent)
        if shmid is not None:
            release_shared_memory(shmid)
    return found


def _postmaster_pidfiles(directory: Path) -> Iterable[Path]:
    try:
        return list(directory.glob("patroni-*/data/postmaster.pid"))
    except OSError:
        return []


def main(argv: Sequence[str] | None = None) -> int:
    """`python -m dr_orchestrator.lab.patroni`: build Patroni's venv (scripts/setup.sh runs this)."""
    del argv
    try:
        executable = ensure_patroni()
    except LabSetupError as error:
        print(f"setup: {error}", file=sys.stderr)
        return 2
    print(executable)
    return 0


__all__ = ["EvidenceCluster", "EvidenceLabError", "EvidenceMember", "PATRONI_REQUIREMENTS", "ensure_patroni",
           "patroni_venv", "stop_all_under"]

if __name__ == "__main__":
    sys.exit(main())
