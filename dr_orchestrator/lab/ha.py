"""What `dr lab up --ha` adds to the two-site lab: the orchestrator cluster that survives the loss of any
one site (issue 15).

    witness site 127.0.30.1 (an etcd member and a node, nothing else)
    three etcd members, one per site (lab/etcd.py)                    <root>/etcd/etcd-<site>/
    an orchestrator node per site: `dr node run --config FILE`        <root>/nodes/<site>/node.yml
    the evidence store the nodes share (`evidence_store`, the seam)   <root>/nodes/evidence-url (0600)

Each site's node and etcd member run, as root, with a numeric group of their own (LabConfig.site_gid), so
that `dr lab partition SITE` (lab/partition.py) can cut exactly them off. The lab drives the product only
through its command line (`node run`, `db upgrade`, `cluster status`): the lab imports nothing of the
product but the model.

At `up`, the primary site's node starts first and leads before the others start, so an HA lab always
starts with its leader at the primary site (a test or a demo that cuts the primary off knows what it cuts),
and etcd's raft leader is moved to the witness member.
"""

from __future__ import annotations

import hashlib
import json
import os
import select
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any, Protocol

import yaml

from dr_orchestrator.lab import partition
from dr_orchestrator.lab.config import HA_SITES, LabConfig
from dr_orchestrator.lab.etcd import EtcdCluster, read_key
from dr_orchestrator.lab.inventory import RUNBOOKS
from dr_orchestrator.lab.patroni import EvidenceCluster
from dr_orchestrator.lab.processes import ProcessSpec, kill_now, running_pid, send, wait_gone
from dr_orchestrator.lab.system import LabSetupError

# The product's command line: `node run --config FILE`, `db upgrade`, `cluster status`.
NODE_PROGRAM: tuple[str, ...] = (sys.executable, "-m", "dr_orchestrator.cli")
LEASE_TTL = "2s"
LEADER_KEY = "/dr/leader"
NODE_START_TIMEOUT_S = 90.0  # a node imports, binds its API and judges a first round: slow on a loaded machine


class HaError(LabSetupError):
    """An HA lab operation cannot be done as asked (one sentence for the user)."""


def node_name(site: str) -> str:
    return f"node-{site}"


EVIDENCE_ENV = "DR_LAB_HA_EVIDENCE"  # "sqlite": a SQLite file instead of the Patroni pair

# --- the evidence store: one seam ---------------------------------------------------------------------


class EvidenceStore(Protocol):
    """The evidence database the lab's nodes share. Today a SQLite file (`SqliteEvidence`); once
    lab/patroni.py is in, `patroni.EvidenceCluster` (two PostgreSQL members under Patroni, at the primary
    and backup sites) has this shape already: change `evidence_store` and `evidence_from_state` only."""

    @property
    def url(self) -> str: ...

    def start(self) -> None: ...

    def kill(self, site: str) -> None: ...

    def restart(self, site: str) -> None: ...

    def stop(self) -> None: ...

    def state(self) -> dict[str, Any]: ...


class SqliteEvidence:
    """A SQLite file under the lab's root: every node runs on this one machine, so all reach it, and no
    site's loss takes it away (the scenario of a replicated evidence database comes with Patroni)."""

    kind = "sqlite"

    def __init__(self, path: Path) -> None:
        self.path = Path(os.path.abspath(path))

    @property
    def url(self) -> str:
        return f"sqlite:///{self.path}"

    def start(self) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)

    def kill(self, site: str) -> None:
        """A file at no site: a site's power loss leaves it."""

    def restart(self, site: str) -> None:
        """Nothing was killed."""

    def stop(self) -> None:
        """Nothing runs; the file goes with the lab's directory."""

    def state(self) -> dict[str, Any]:
        return {"kind": self.kind, "path": str(self.path)}


def evidence_store(config: LabConfig, etcd_endpoints: Sequence[str]) -> EvidenceStore:
    """The evidence database of an HA lab: two PostgreSQL members under Patroni on the lab's etcd, at the
    primary and backup sites (`Lab.kill_site` kills a site's member with the site). DR_LAB_HA_EVIDENCE=sqlite
    keeps a SQLite file instead, which no site's loss takes away (quicker, for tests of the nodes alone)."""
    if os.environ.get(EVIDENCE_ENV) == SqliteEvidence.kind:
        return SqliteEvidence(config.nodes_dir / "evidence.db")
    scope = "dr-lab-" + hashlib.sha256(str(config.root).encode()).hexdigest()[:8]
    return PatroniEvidence(config.root / "evidence", etcd_endpoints, scope)


def evidence_from_state(state: dict[str, Any]) -> EvidenceStore:
    if state.get("kind") == SqliteEvidence.kind:
        return SqliteEvidence(Path(state["path"]))
    if state.get("kind") == PatroniEvidence.kind:
        return PatroniEvidence.from_state(state)
    raise HaError(f"unknown evidence store in the HA lab's state: {state.get('kind')!r}")


class PatroniEvidence(EvidenceCluster):
    kind = "patroni"

    def state(self) -> dict[str, Any]:
        return {**super().state(), "kind": self.kind}


# --- the cluster ----------------------------------------------------------------------------------------


class NodeReadiness:
    """A NOTIFY_SOCKET per node (abstract unix datagram sockets: no file to clean up), as systemd gives a
    ``Type=notify`` service; ``waiting()`` names the sites whose node has not said ``READY=1`` yet."""

    def __init__(self, sites: Sequence[str]) -> None:
        tag = os.urandom(6).hex()
        self.sockets: dict[str, socket.socket] = {}
        for site in sites:
            channel = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC)
            channel.bind(f"\0dr-lab-ready-{tag}-{site}")
            channel.setblocking(False)
            self.sockets[site] = channel
        self.ready: set[str] = set()

    def __enter__(self) -> NodeReadiness:
        return self

    def __exit__(self, *_: object) -> None:
        for channel in self.sockets.values():
            channel.close()

    def address(self, site: str) -> str:
        return "@" + self.sockets[site].getsockname()[1:].decode()

    def waiting(self, timeout: float) -> list[str]:
        pending = {channel: site for site, channel in self.sockets.items() if site not in self.ready}
        readable, _, _ = select.select(list(pending), [], [], timeout) if pending else ([], [], [])
        for channel in readable:
            while True:
                try:
                    message = channel.recv(4096)
                except BlockingIOError:
                    break
                if b"READY=1" in message.split(b"\n"):
                    self.ready.add(pending[channel])
        return [site for site in self.sockets if site not in self.ready]


def _free_port(address: str) -> int:
    with socket.socket() as sock:
        sock.bind((address, 0))
        return int(sock.getsockname()[1])


class HaCluster:
    """The HA part of one lab: etcd, the nodes, the evidence store, the groups and the partition table."""

    def __init__(self, config: LabConfig) -> None:
        self.config = config
        self.sites = HA_SITES
        self.as_root = os.geteuid() == 0
        self.gids = {site: config.site_gid(site) for site in self.sites} if self.as_root else {}
        self.table = partition.table_name(config.root)
        self.etcd = EtcdCluster(config.etcd_dir, sites=self.sites, gids=self.gids)
        self.evidence: EvidenceStore | None = None
        self.api_ports: dict[str, int] = {}
        self._children: dict[str, subprocess.Popen[bytes]] = {}

    # --- state (ha.json) ------------------------------------------------------------------------------

    def state(self) -> dict[str, Any]:
        return {"gids": self.gids, "table": self.table,
                "etcd": self.etcd.state(), "api_ports": self.api_ports, "leader_key": LEADER_KEY,
                "evidence": self.evidence.state() if self.evidence is not None else None}

    def save(self) -> None:
        self.config.ha_state_file.write_text(json.dumps(self.state(), indent=2) + "\n")

    @classmethod
    def load(cls, config: LabConfig) -> HaCluster | None:
        """The HA part of the lab at config.root, as `up --ha` recorded it; None for a lab without one."""
        try:
            state = json.loads(config.ha_state_file.read_text())
        except (OSError, ValueError):
            return None
        cluster = cls(config)
        cluster.gids = {site: int(gid) for site, gid in (state.get("gids") or {}).items()}
        cluster.table = str(state.get("table") or cluster.table)
        if state.get("etcd"):
            cluster.etcd = EtcdCluster.from_state(state["etcd"])
        cluster.api_ports = {site: int(port) for site, port in (state.get("api_ports") or {}).items()}
        if state.get("evidence"):
            cluster.evidence = evidence_from_state(state["evidence"])
        return cluster

    # --- what runs --------------------------------------------------------------------------------------

    def node_spec(self, site: str) -> ProcessSpec:
        return ProcessSpec("node", site, self.config.node_dir(site) / "node.pid",
                           f"node run --config {self.config.node_config(site)}")

    def processes(self) -> list[ProcessSpec]:
        specs = [self.node_spec(site) for site in self.sites]
        specs += [self.etcd.members[site].process for site in self.sites if site in self.etcd.members]
        return specs

    def api_url(self, site: str) -> str | None:
        port = self.api_ports.get(site)
        return f"http://{self.config.address(site)}:{port}" if port else None

    def leader(self) -> str | None:
        """The node that holds the leader key now (a plain read; `status` asks the product)."""
        raw = read_key(self.etcd.endpoints, LEADER_KEY, timeout=0.5) if self.etcd.members else None
        if raw is None:
            return None
        try:
            value = json.loads(raw)
        except ValueError:
            return raw.decode(errors="replace")
        return str(value.get("node")) if isinstance(value, dict) else str(value)

    # --- up -------------------------------------------------------------------------------------------------

    def start(self) -> None:
        """etcd, the evidence store, then the nodes: the primary's first, leading before the others start.
        On failure the caller stops everything (`stop`)."""
        config = self.config
        config.nodes_dir.mkdir(mode=0o755, parents=True, exist_ok=True)
        self.etcd.start()
        self.save()  # from here on, another process's `down` finds the members
        # etcd's raft leader at the witness, as docs/cluster.md advises: losing a data-centre site then never
        # costs a raft election on top of the leader lease (TTL + 2.6 s instead of about the TTL).
        self.etcd.move_raft_leader("witness")
        self.evidence = evidence_store(config, self.etcd.endpoints)
        self.evidence.start()
        self.save()
        url_file = config.nodes_dir / "evidence-url"
        url_file.touch(mode=0o600)
        url_file.chmod(0o600)
        url_file.write_text(self.evidence.url + "\n")
        self._migrate(url_file)
        for site in self.sites:
            self._write_node_config(site, url_file)
        self.save()
        with NodeReadiness(self.sites) as readiness:
            self.start_node("primary", notify=readiness.address("primary"))
            self._wait_leader({node_name("primary")}, NODE_START_TIMEOUT_S, waiting_on="primary")
            for site in self.sites[1:]:
                self.start_node(site, notify=readiness.address(site))
            # Ready: watching (its first round judged), so a fault injected from now on is seen by every node.
            deadline = time.monotonic() + NODE_START_TIMEOUT_S
            while waiting := readiness.waiting(timeout=0.1):
                self._check_nodes_alive()
                if time.monotonic() >= deadline:
                    raise HaError(f"the node at the {waiting[0]} site was not ready (watching) within "
                                  f"{NODE_START_TIMEOUT_S:.0f} s: {self._log_tail(waiting[0])}")

    def _migrate(self, url_file: Path) -> None:
        result = subprocess.run([*NODE_PROGRAM, "--db", f"file:{url_file}", "db", "upgrade"],
                                capture_output=True, text=True, timeout=120, cwd=self.config.nodes_dir)
        if result.returncode != 0:
            raise HaError(f"the evidence database could not be migrated: "
                          f"{(result.stderr or result.stdout).strip()[-400:]}")

    def _write_node_config(self, site: str, url_file: Path) -> None:
        config = self.config
        directory = config.node_dir(site)
        directory.mkdir(mode=0o755, exist_ok=True)
        drills = config.nodes_dir / "no-drills"
        drills.mkdir(mode=0o755, exist_ok=True)
        self.api_ports[site] = _free_port(config.address(site))
        inventory = config.inventory_path
        document = {
            "node": node_name(site),
            "site": site,
            "etcd": self.etcd.endpoints,
            "lease_ttl": LEASE_TTL,
            "leader_key": LEADER_KEY,
            "evidence": f"file:{url_file}",
            "journal": str(directory / "journal.jsonl"),
            "inventory": str(inventory) if inventory.exists() else None,
            # The API starts the repository's runbooks against the lab's inventory; no drill is scheduled
            # (a quarterly drill firing in the middle of a test would fail the lab over).
            "runbooks": str(RUNBOOKS),
            "inventories": str(config.root),
            "drills": str(drills),
            "api": {"host": config.address(site), "port": self.api_ports[site]},
        }
        header = f"# The lab's orchestrator node at the {site} site (written by `dr lab up --ha`).\n"
        config.node_config(site).write_text(header + yaml.safe_dump(document, sort_keys=False))

    def start_node(self, site: str, notify: str | None = None) -> int:
        """Start `site`'s node with its site's group (when root); returns its pid. ``notify``: the socket it
        tells when it is ready (systemd's NOTIFY_SOCKET)."""
        spec = self.node_spec(site)
        if (pid := running_pid(spec)) is not None:
            return pid
        gid = self.gids.get(site)
        directory = self.config.node_dir(site)
        environment = {name: value for name, value in os.environ.items() if name != "NOTIFY_SOCKET"}
        if notify is not None:
            environment["NOTIFY_SOCKET"] = notify
        with (directory / "node.log").open("ab") as log:
            child = subprocess.Popen(
                [*NODE_PROGRAM, "node", "run", "--config", str(self.config.node_config(site))],
                stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT, cwd=directory, env=environment,
                start_new_session=True, group=gid, extra_groups=[] if gid is not None else None)
        spec.pidfile.write_text(f"{child.pid}\n")
        self._children[site] = child
        return child.pid

    def _node_exited(self, site: str) -> bool:
        child = self._children.get(site)
        if child is not None:
            return child.poll() is not None
        return running_pid(self.node_spec(site)) is None

    def _check_nodes_alive(self) -> None:
        for site in self._children:
            if self._node_exited(site):
                raise HaError(f"the orchestrator node at the {site} site exited: {self._log_tail(site)} "
                              f"(log: {self.config.node_dir(site) / 'node.log'})")

    def _wait_leader(self, names: set[str], timeout: float, waiting_on: str) -> str:
        deadline = time.monotonic() + timeout
        while True:
            leader = self.leader()
            if leader in names:
                return leader
            self._check_nodes_alive()
            if time.monotonic() >= deadline:
                raise HaError(f"the node at the {waiting_on} site did not take the leader key {LEADER_KEY} within "
                              f"{timeout:.0f} s (held by: {leader or 'nobody'}): {self._log_tail(waiting_on)}")
            time.sleep(0.05)

    def _log_tail(self, site: str) -> str:
        try:
            text = (self.config.node_dir(site) / "node.log").read_text(errors="replace").strip()
        except OSError:
            return "no log"
        return text[-400:] or "an empty log"

    # --- faults ---------------------------------------------------------------------------------------------

    def cut(self, site: str) -> None:
        """Cut `site`'s node and etcd member (and evidence member, with Patroni) off the other sites."""
        if site not in self.sites:
            raise HaError(f"unknown site {site!r}; the HA lab's sites are {', '.join(self.sites)}")
        partition.nft_path()  # nft missing or not root: one sentence
        if not self.gids:
            raise HaError("this HA lab was brought up without root, so its sites have no groups of their own to "
                          "cut off; bring it up again as root")
        partition.cut(self.table, site, self.gids, {s: self.config.address(s) for s in self.sites})

    def heal(self) -> bool:
        return partition.heal(self.table)

    def partitioned(self) -> str | None:
        return partition.partitioned_site(self.table)

    def restart_site(self, site: str) -> None:
        """Power back at `site`: its etcd member rejoins and its node starts again."""
        if not self.etcd.running(site):
            self.etcd.restart(site)
        self.start_node(site)

    # --- down -----------------------------------------------------------------------------------------------

    def stop(self, timeout: float = 5.0) -> list[str]:
        """Heal, stop the nodes (SIGTERM: a leader resigns while etcd still runs), then etcd and the evidence
        store; returns what was stopped."""
        stopped: list[str] = []
        self.heal()
        nodes = {pid: spec for spec in (self.node_spec(site) for site in self.sites)
                 if (pid := running_pid(spec)) is not None}
        send(nodes, signal.SIGTERM)
        survivors = wait_gone(nodes, timeout)
        if survivors:
            kill_now(survivors)
        for child in self._children.values():
            try:
                child.wait(timeout=1)
            except subprocess.TimeoutExpired:
                pass
        stopped += [spec.label for spec in nodes.values()]
        stopped += [f"etcd@{site}" for site in self.etcd.members if self.etcd.running(site)]
        self.etcd.stop()
        if self.evidence is not None:
            self.evidence.stop()
        return stopped

    # --- status -----------------------------------------------------------------------------------------------

    def status(self) -> dict[str, Any]:
        """Nodes, etcd members and who leads, as the product's `dr cluster status` reads them, and the partition."""
        nodes = [{"site": site, "node": node_name(site), "pid": running_pid(self.node_spec(site)),
                  "gid": self.gids.get(site), "api": self.api_url(site), "config": str(self.config.node_config(site))}
                 for site in self.sites]
        cluster = self._cluster_status()
        health = {entry.get("endpoint"): entry for entry in cluster.get("health", [])}
        members = []
        for site in self.sites:
            member = self.etcd.members.get(site)
            entry = health.get(member.client_url, {}) if member else {}
            members.append({"site": site, "endpoint": member.client_url if member else None,
                            "pid": self.etcd.pid(site), "healthy": bool(entry.get("healthy")),
                            "raft_leader": bool(entry.get("raft_leader")), "error": entry.get("error")})
        return {"nodes": nodes, "etcd": members, "quorum": cluster.get("quorum"), "leader": cluster.get("leader"),
                "errors": cluster.get("errors", []), "partition": self.partitioned(), "table": self.table,
                "evidence": self.evidence.state() if self.evidence is not None else None}

    def _cluster_status(self) -> dict[str, Any]:
        """`dr cluster status --etcd ... --output json` (exit 1 without quorum still prints it)."""
        command = [*NODE_PROGRAM, "cluster", "status", "--output", "json"]
        for endpoint in self.etcd.endpoints:
            command += ["--etcd", endpoint]
        try:
            result = subprocess.run(command, capture_output=True, text=True, timeout=30)
            loaded: dict[str, Any] = json.loads(result.stdout)
            return loaded
        except (OSError, ValueError, subprocess.TimeoutExpired) as error:
            return {"errors": [f"`dr cluster status` gave no answer: {error}"]}


__all__ = ["LEADER_KEY", "LEASE_TTL", "NODE_PROGRAM", "EvidenceStore", "HaCluster", "HaError", "SqliteEvidence",
           "evidence_from_state", "evidence_store", "node_name"]
