"""A real etcd cluster for the lab and the tests: one member per site (primary 127.0.10.1, backup 127.0.20.1,
witness 127.0.30.1), Debian's etcd-server (3.4), run as the current user with its own data directories.

    with EtcdCluster(Path("/tmp/x")) as cluster:     # started, healthy; every member stopped after
        cluster.endpoints                             # ["http://127.0.10.1:PORT", ...]
        cluster.kill("primary"); cluster.restart("primary")

Nothing here uses a system-wide etcd (Debian's package installs an etcd.service on the default ports
2379/2380): members listen on free ports of their site's loopback address only. Raft timing is tuned
for a fast lab (heartbeat 100 ms, election timeout 1 s), so a lost etcd leader is replaced in about a
second. Each member writes a pidfile and names its data directory on its command line, so `stop_all_under`
finds members that a killed test session left behind.

Given `gids` (site -> numeric group, as root), each member runs with its site's group and no other: every
socket it opens carries that group, which is what a lab partition's nftables rules match (lab/partition.py).
"""

from __future__ import annotations

import base64
import json
import os
import secrets
import shutil
import socket
import subprocess
import time
import urllib.request
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType
from typing import Any

from dr_orchestrator.lab.config import HA_SITE_ADDRESSES, HA_SITES, WITNESS_ADDRESS
from dr_orchestrator.lab.processes import ProcessSpec, SiteMembers, command_line, kill_now
from dr_orchestrator.lab.system import LabSetupError

ETCD = "/usr/bin/etcd"
ETCD_SITES: dict[str, str] = HA_SITE_ADDRESSES
DEFAULT_SITES: tuple[str, ...] = HA_SITES
HEARTBEAT_MS = 100
ELECTION_TIMEOUT_MS = 1000
_START_ATTEMPTS = 3  # fresh ports each time: another process may take a probed port before etcd binds it


class EtcdLabError(LabSetupError):
    """An etcd member did not start, answer or stop in time (one sentence, names the log to read)."""


@dataclass(frozen=True)
class EtcdMember:
    site: str
    address: str
    client_port: int
    peer_port: int
    directory: Path  # holds data/, the pidfile and the log

    @property
    def client_url(self) -> str:
        return f"http://{self.address}:{self.client_port}"

    @property
    def peer_url(self) -> str:
        return f"http://{self.address}:{self.peer_port}"

    @property
    def data_dir(self) -> Path:
        return self.directory / "data"

    @property
    def log_path(self) -> Path:
        return self.directory / "etcd.log"

    @property
    def process(self) -> ProcessSpec:
        return ProcessSpec(name="etcd", site=self.site, pidfile=self.directory / "etcd.pid",
                           marker=f"--data-dir={self.data_dir}")


def _free_port(address: str) -> int:
    """A port the kernel considers free on `address` (scratch.free_port only probes 127.0.0.1)."""
    with socket.socket() as sock:
        sock.bind((address, 0))
        return int(sock.getsockname()[1])


def member_health(client_url: str, timeout: float = 1.0) -> bool:
    """Whether the member at `client_url` answers /health with true (it is up and sees a raft leader)."""
    try:
        with urllib.request.urlopen(f"{client_url}/health", timeout=timeout) as response:
            return bool(json.loads(response.read()).get("health") == "true")
    except (OSError, ValueError):  # refused, timed out, HTTP 503 (urllib.error.HTTPError is an OSError)
        return False


def _gateway_post(endpoint: str, path: str, body: dict[str, Any], timeout: float = 1.0) -> dict[str, Any] | None:
    """One JSON request to a member's gateway; None when it does not answer or answers an error."""
    request = urllib.request.Request(f"{endpoint}{path}", data=json.dumps(body).encode(), method="POST",
                                     headers={"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(request, timeout=timeout) as response:
            answer = json.loads(response.read())
    except (OSError, ValueError):
        return None
    return answer if isinstance(answer, dict) else None


def read_key(endpoints: Sequence[str], key: str, timeout: float = 1.0) -> bytes | None:
    """The value of `key` from the first member that answers (through etcd's JSON gateway, /v3/kv/range), None
    when it is absent or no member answers. A plain read for the lab's own waiting; the product reads the
    leader key with dr_orchestrator.cluster (`dr cluster status`)."""
    for endpoint in endpoints:
        answer = _gateway_post(endpoint, "/v3/kv/range", {"key": base64.b64encode(key.encode()).decode()}, timeout)
        if answer is None:
            continue
        kvs = answer.get("kvs") or []
        return base64.b64decode(kvs[0].get("value") or "") if kvs else None
    return None


class EtcdCluster(SiteMembers[EtcdMember]):
    """An etcd cluster of one member per site in `sites`, its files under `directory`."""

    def __init__(self, directory: Path, sites: Sequence[str] = DEFAULT_SITES, heartbeat_ms: int = HEARTBEAT_MS,
                 election_timeout_ms: int = ELECTION_TIMEOUT_MS, gids: Mapping[str, int] | None = None) -> None:
        super().__init__()
        unknown = [site for site in sites if site not in ETCD_SITES]
        if unknown or not sites:
            raise ValueError(f"etcd sites must be among {sorted(ETCD_SITES)}, got {list(sites)}")
        self.gids = dict(gids or {})  # site -> the numeric group its member runs with (root only)
        if self.gids and os.geteuid() != 0:
            raise ValueError("etcd members run with groups of their own only when started as root")
        self.directory = Path(os.path.abspath(directory))
        self.sites = tuple(sites)
        self.heartbeat_ms = heartbeat_ms
        self.election_timeout_ms = election_timeout_ms
        self.token = f"dr-lab-{secrets.token_hex(4)}"

    # --- state, for a lab driven by separate commands (`dr lab up`, later `dr lab kill-site`) -------------

    def state(self) -> dict[str, Any]:
        """What another process needs to find, kill and restart these members (JSON-ready)."""
        return {"directory": str(self.directory), "token": self.token, "heartbeat_ms": self.heartbeat_ms,
                "election_timeout_ms": self.election_timeout_ms, "gids": self.gids,
                "members": [{"site": m.site, "client_port": m.client_port, "peer_port": m.peer_port}
                            for m in (self.members[site] for site in self.sites)]}

    @classmethod
    def from_state(cls, state: dict[str, Any]) -> EtcdCluster:
        """The cluster `state()` described; its running members are found by pidfile and command line."""
        sites = [entry["site"] for entry in state["members"]]
        cluster = cls(Path(state["directory"]), sites=sites, heartbeat_ms=int(state["heartbeat_ms"]),
                      election_timeout_ms=int(state["election_timeout_ms"]),
                      gids={site: int(gid) for site, gid in (state.get("gids") or {}).items()})
        cluster.token = str(state["token"])
        for entry in state["members"]:
            site = entry["site"]
            cluster.members[site] = EtcdMember(site, ETCD_SITES[site], int(entry["client_port"]),
                                               int(entry["peer_port"]), cluster.directory / f"etcd-{site}")
        return cluster

    # --- what clients need ---------------------------------------------------------------------------

    @property
    def endpoints(self) -> list[str]:
        """The members' client URLs, in the order of `sites`."""
        return [self.members[site].client_url for site in self.sites]

    def endpoint(self, site: str) -> str:
        return self.members[site].client_url

    # --- life cycle ----------------------------------------------------------------------------------

    def __enter__(self) -> EtcdCluster:
        self.start()
        return self

    def __exit__(self, kind: type[BaseException] | None, error: BaseException | None,
                 trace: TracebackType | None) -> None:
        self.stop()

    def start(self, timeout: float = 30.0) -> None:
        """Start every member on fresh free ports and wait until all report healthy; on failure nothing
        is left running."""
        if not os.access(ETCD, os.X_OK):
            raise EtcdLabError(f"{ETCD} is missing: install it with `sudo apt-get install etcd-server`")
        self.directory.mkdir(parents=True, exist_ok=True)
        last: EtcdLabError | None = None
        for _ in range(_START_ATTEMPTS):
            for member in self.members.values():  # a failed attempt's members: a new cluster starts empty
                shutil.rmtree(member.directory, ignore_errors=True)
            self._assign_ports()
            try:
                for site in self.sites:
                    self._spawn(site, new_cluster=True)
                self.wait_healthy(timeout=timeout)
                return
            except EtcdLabError as error:
                last = error
                self.stop()
                if not any("address already in use" in self._log_tail(site) for site in self.sites):
                    break
        assert last is not None
        raise last

    def _assign_ports(self) -> None:
        for site in self.sites:
            address = ETCD_SITES[site]
            client_port = _free_port(address)
            peer_port = _free_port(address)
            while peer_port == client_port:
                peer_port = _free_port(address)
            directory = self.directory / f"etcd-{site}"
            self.members[site] = EtcdMember(site, address, client_port, peer_port, directory)

    def _command(self, member: EtcdMember, new_cluster: bool) -> list[str]:
        initial = ",".join(f"{m.site}={m.peer_url}" for m in (self.members[s] for s in self.sites))
        return [
            ETCD, f"--name={member.site}", f"--data-dir={member.data_dir}",
            f"--listen-client-urls={member.client_url}", f"--advertise-client-urls={member.client_url}",
            f"--listen-peer-urls={member.peer_url}", f"--initial-advertise-peer-urls={member.peer_url}",
            f"--initial-cluster={initial}", f"--initial-cluster-token={self.token}",
            # ignored once the data directory holds a member (a restart rejoins with its own state)
            f"--initial-cluster-state={'new' if new_cluster else 'existing'}",
            f"--heartbeat-interval={self.heartbeat_ms}", f"--election-timeout={self.election_timeout_ms}",
            "--pre-vote=true",  # a restarted member does not depose a healthy raft leader
            "--logger=zap", "--log-outputs=stderr", "--enable-v2=false",
        ]

    def _spawn(self, site: str, new_cluster: bool) -> None:
        member = self.members[site]
        member.directory.mkdir(mode=0o700, exist_ok=True)
        gid = self.gids.get(site)
        with member.log_path.open("ab") as log:
            child = subprocess.Popen(self._command(member, new_cluster), stdin=subprocess.DEVNULL, stdout=log,
                                     stderr=subprocess.STDOUT, start_new_session=True,
                                     group=gid, extra_groups=[] if gid is not None else None)
        self._children[site] = child
        member.process.pidfile.write_text(f"{child.pid}\n")

    def wait_healthy(self, timeout: float = 20.0, sites: Iterable[str] | None = None) -> None:
        """Wait until each member of `sites` (all by default) reports healthy, or raise naming the laggards."""
        waiting = list(self.sites if sites is None else sites)
        deadline = time.monotonic() + timeout
        while True:
            waiting = [site for site in waiting if not member_health(self.members[site].client_url, timeout=0.5)]
            if not waiting:
                return
            dead = [site for site in waiting if not self.running(site)]
            if dead or time.monotonic() >= deadline:
                site = (dead or waiting)[0]
                state = "exited" if dead else f"was not healthy within {timeout:.0f} s"
                raise EtcdLabError(f"etcd member {site} ({self.members[site].client_url}) {state}: "
                                   f"{self._log_tail(site)[-400:]} (log: {self.members[site].log_path})")
            time.sleep(0.05)

    def raft_leader(self) -> str | None:
        """The site whose member is etcd's raft leader now (None when no member answers or none leads)."""
        ids = {}
        for site in self.sites:
            status = _gateway_post(self.members[site].client_url, "/v3/maintenance/status", {})
            if status is None:
                continue
            ids[str(status.get("header", {}).get("member_id"))] = site
            leader = str(status.get("leader") or "")
            if leader in ids:
                return ids[leader]
            if leader and leader != "0":
                listed = _gateway_post(self.members[site].client_url, "/v3/cluster/member/list", {}) or {}
                names = {str(m.get("ID")): m.get("name") for m in listed.get("members", [])}
                return names.get(leader)
        return None

    def move_raft_leader(self, site: str, timeout: float = 10.0) -> None:
        """Make `site`'s member etcd's raft leader (etcd's move-leader, asked of the current leader). A new
        raft leader extends every lease by its election timeout, so a lab that keeps its raft leader at the
        witness replaces a lost leader node in about the lease's TTL rather than TTL + 2.6 s."""
        deadline = time.monotonic() + timeout
        while (current := self.raft_leader()) != site:
            if time.monotonic() >= deadline:
                raise EtcdLabError(f"etcd's raft leader did not move to the {site} member within {timeout:.0f} s "
                                   f"(it is at {current or 'no member'})")
            if current is not None:
                target = _gateway_post(self.members[site].client_url, "/v3/maintenance/status", {}) or {}
                member_id = target.get("header", {}).get("member_id")
                if member_id is not None:
                    _gateway_post(self.members[current].client_url, "/v3/maintenance/transfer-leadership",
                                  {"targetID": member_id}, timeout=3.0)
            time.sleep(0.05)

    def kill(self, site: str, timeout: float = 5.0) -> None:
        """SIGKILL one member, as a site's power loss would, and wait until it is gone."""
        pid = self.pid(site)
        if pid is None:
            return
        survivors = kill_now([pid], timeout)
        self._reap(site)
        if survivors:
            raise EtcdLabError(f"etcd member {site} (pid {pid}) survived SIGKILL for {timeout:.0f} s")

    def restart(self, site: str, timeout: float = 20.0) -> None:
        """Start a stopped member again on its own ports and data (it rejoins), and wait until it is healthy."""
        if self.running(site):
            raise EtcdLabError(f"etcd member {site} is running already")
        self._spawn(site, new_cluster=False)
        self.wait_healthy(timeout=timeout, sites=[site])

    def stop(self, timeout: float = 5.0) -> None:
        """Stop every member and any stray one under our directory. SIGKILL at once: etcd's WAL survives it,
        and on SIGTERM a raft leader first tries to hand its leadership over to members that are stopping
        too (seconds lost per stop)."""
        pids = {pid for pid in (self.pid(site) for site in self.members) if pid is not None}
        survivors = kill_now(pids, timeout)
        for site in list(self._children):
            self._reap(site)
        stop_all_under(self.directory)
        if survivors:
            raise EtcdLabError(f"etcd processes {sorted(survivors)} survived SIGKILL for {timeout:.0f} s")


def stop_all_under(directory: Path, timeout: float = 5.0) -> set[int]:
    """SIGKILL every etcd process whose data directory lies under `directory` (left by a killed session);
    returns the pids that were found."""
    needle = f"--data-dir={str(Path(os.path.abspath(directory))).rstrip('/')}/"
    found: set[int] = set()
    for entry in os.listdir("/proc"):
        if not entry.isdigit() or int(entry) == os.getpid():
            continue
        line = command_line(int(entry))
        if line is not None and line.startswith(ETCD + " ") and needle in line:
            found.add(int(entry))
    if found:
        kill_now(found, timeout)
    return found


__all__ = ["DEFAULT_SITES", "ETCD_SITES", "WITNESS_ADDRESS", "EtcdCluster", "EtcdLabError", "EtcdMember",
           "member_health", "read_key", "stop_all_under"]
