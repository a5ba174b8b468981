"""The two-site lab: bring it up, take it down, look at it, and break it (faults)."""

from __future__ import annotations

import json
import shutil
import signal
import socket
import subprocess
import time
from collections.abc import Iterable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from datetime import UTC, datetime
from importlib import resources
from typing import Any

from dr_orchestrator.lab import haproxy, partition, postgres, redis, sshd
from dr_orchestrator.lab import inventory as lab_inventory
from dr_orchestrator.lab.config import (
    DATABASE_NAME,
    DATABASE_USER,
    FRONT_DOOR_ADDRESS,
    HA_SITES,
    KILLABLE,
    POSTGRES_SERVICES,
    REDIS_SERVICE,
    SERVICE_PYTHON,
    SERVICES,
    SITES,
    SYNCHRONOUS_SERVICES,
    LabConfig,
    store_name,
)
from dr_orchestrator.lab.etcd import stop_all_under as stop_etcd_under
from dr_orchestrator.lab.ha import HaCluster, node_name
from dr_orchestrator.lab.processes import (
    ProcessSpec,
    is_running,
    kill_now,
    processes_under,
    running_pid,
    send,
    wait_gone,
    with_descendants,
)
from dr_orchestrator.lab.status import collect_status
from dr_orchestrator.lab.system import LabSetupError, as_user, check_reachable, chown, ensure_packages, run


class LabError(LabSetupError):
    """A lab operation cannot be done as asked (one sentence for the user)."""


@dataclass
class UpResult:
    already_up: bool
    seconds: float = 0.0
    layout: list[str] = field(default_factory=list)


class Lab:
    def __init__(self, config: LabConfig | None = None) -> None:
        self.config = config or LabConfig.from_env()
        self.killed_at: datetime | None = None  # when kill_site or kill_service last sent its SIGKILLs

    def ha(self) -> HaCluster | None:
        """The HA part (etcd, orchestrator nodes, evidence store) of a lab brought up with `--ha`."""
        return HaCluster.load(self.config)

    def _ha_or_refuse(self) -> HaCluster:
        cluster = self.ha()
        if cluster is None:
            raise LabError(f"the lab at {self.config.root} is not an HA lab (it has no orchestrator nodes nor etcd): "
                           f"bring it up with `dr lab up --ha`")
        return cluster

    # --- what runs -----------------------------------------------------------------------------------
    def processes(self) -> list[ProcessSpec]:
        """Every process the lab runs, each with its pidfile and the marker its command line contains."""
        config = self.config
        specs = [ProcessSpec("haproxy", None, config.haproxy_pidfile, haproxy.marker(config))]
        for site in SITES:
            specs.append(ProcessSpec("sshd", site, config.sshd_pidfile(site), sshd.marker(config, site)))
            for service in POSTGRES_SERVICES:
                specs.append(ProcessSpec(store_name(service), site, config.pgdata(site, service) / "postmaster.pid",
                                         postgres.postmaster_marker(config, site, service)))
            specs.append(ProcessSpec(store_name(REDIS_SERVICE), site, config.redis_pidfile(site),
                                     redis.marker(config, site)))
            for service in SERVICES:
                specs.append(ProcessSpec(service, site, config.service_pidfile(site, service),
                                         f"{config.bin_dir(site)}/service_app.py --config "
                                         f"{config.site_settings(site)} --service {service}"))
        specs.append(ProcessSpec("heartbeat", "primary", config.run_dir("primary") / "heartbeat.pid",
                                 f"{config.bin_dir('primary')}/heartbeat.py run "
                                 f"--config {config.site_settings('primary')}"))
        cluster = self.ha()
        if cluster is not None:
            specs += cluster.processes()
        return specs

    def running(self) -> dict[str, int]:
        """label -> pid of the lab's processes that run now."""
        return {spec.label: pid for spec in self.processes() if (pid := running_pid(spec)) is not None}

    def is_up(self) -> bool:
        return self.config.state_file.exists() and bool(self.running())

    def state(self) -> dict[str, Any]:
        try:
            loaded: dict[str, Any] = json.loads(self.config.state_file.read_text())
        except (OSError, ValueError):
            return {}
        return loaded

    # --- up --------------------------------------------------------------------------------------------
    def up(self, ha: bool = False) -> UpResult:
        """Start both sites and the front door (and, with `ha`, the witness site, etcd, an orchestrator node
        per site and their evidence store); says so (already_up) when the lab already runs."""
        config = self.config
        ensure_packages()
        if self.is_up():
            if ha and self.ha() is None:
                raise LabError(f"the lab at {config.root} is up without --ha; take it down (`dr lab down`) and "
                               f"bring it up again with `dr lab up --ha`")
            return UpResult(already_up=True)
        if config.root.exists() and any(config.root.iterdir()):
            if not config.marker.exists():
                raise LabError(f"{config.root} is not empty and was not made by `dr lab up`; choose another --root")
            self.down()  # leftovers of a lab that crashed
        self._check_ports_free()
        started = time.monotonic()
        try:
            self._build()
            if ha:
                HaCluster(config).start()
        except BaseException as failure:
            self.down(keep_files=True)  # the logs say why; the next `up` or `down` removes them
            if isinstance(failure, LabSetupError):
                raise LabError(f"{failure} (nothing is left running; the logs are under {config.root})") from None
            raise
        return UpResult(already_up=False, seconds=time.monotonic() - started, layout=self.layout())

    def _check_ports_free(self) -> None:
        for address, port in self.config.listening_ports():
            with socket.socket() as probe:
                probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
                try:
                    probe.bind((address, port))
                except OSError:
                    raise LabError(f"{address}:{port} is already in use; choose another --port-offset "
                                   f"(or DR_LAB_PORT_OFFSET)") from None

    def _build(self) -> None:
        config = self.config
        check_reachable(config.root.parent, config.os_user)
        config.root.mkdir(mode=0o755, parents=True, exist_ok=True)
        config.root.chmod(0o755)
        config.marker.write_text(json.dumps({"created": _now(), "port_offset": config.port_offset}) + "\n")
        self._lay_out_sites()
        sshd.create_keys(config)
        # Each store's primary, then its standby, in parallel with the others (two cores: initdb and
        # pg_basebackup mostly wait on the disk); sshd and the front door meanwhile.
        with ThreadPoolExecutor(max_workers=len(POSTGRES_SERVICES) + 1) as pool:
            stores = [pool.submit(self._build_database, service) for service in POSTGRES_SERVICES]
            stores.append(pool.submit(self._build_cache))
            for site in SITES:
                sshd.write_config(config, site)
                sshd.start(config, site)
            for store in stores:
                store.result()
        self._start_services(SITES)
        haproxy.start(config)
        self._start_heartbeat()
        self._wait_front_door()
        config.inventory_path.write_text(lab_inventory.render(config, runbooks=str(lab_inventory.RUNBOOKS)))
        config.state_file.write_text(json.dumps({
            "started_at": _now(), "port_offset": config.port_offset, "os_user": config.os_user,
        }, indent=2) + "\n")

    def _build_database(self, service: str) -> None:
        postgres.create_primary(self.config, service)
        postgres.create_standby(self.config, service)
        postgres.wait_streaming(self.config, service)
        if service == "trading":
            postgres.take_base_backup(self.config)  # the cyber-attack drill restores trading to a moment
        if service in SYNCHRONOUS_SERVICES:
            postgres.set_synchronous(self.config, service, True)

    def _build_cache(self) -> None:
        for site in SITES:
            redis.write_config(self.config, site)
        redis.start(self.config, "primary")
        redis.seed(self.config)
        redis.start(self.config, "backup")
        redis.wait_replicating(self.config)

    def _lay_out_sites(self) -> None:
        config = self.config
        files = resources.files("dr_orchestrator.lab") / "files"
        for site in SITES:
            config.site_dir(site).mkdir(mode=0o755)
            # The database's user rebuilds a standby beside its data directory (postgres.rebuild_standby).
            chown(config.site_dir(site), config.os_user)
            for directory in (config.run_dir(site), config.log_dir(site)):
                directory.mkdir(mode=0o755)
                chown(directory, config.os_user)
            config.bin_dir(site).mkdir(mode=0o755)
            for name in ("service_app.py", "heartbeat.py"):
                (config.bin_dir(site) / name).write_bytes((files / name).read_bytes())
            servicectl = config.servicectl(site)
            servicectl.write_bytes((files / "servicectl.py").read_bytes())
            servicectl.chmod(0o755)
            stores: dict[str, dict[str, Any]] = {
                service: {"kind": "postgres", "host": config.address(site), "port": config.postgres_port(service),
                          "dbname": DATABASE_NAME, "user": DATABASE_USER}
                for service in POSTGRES_SERVICES
            }
            stores[REDIS_SERVICE] = {"kind": "redis", "host": config.address(site), "port": config.redis_port}
            config.site_settings(site).write_text(json.dumps({
                "site": site,
                "address": config.address(site),
                "services": {service: config.service_port(service) for service in SERVICES},
                "stores": stores,
            }, indent=2) + "\n")
        for service in POSTGRES_SERVICES:
            config.wal_archive(service).mkdir(mode=0o700)
            chown(config.wal_archive(service), config.os_user)

    def _start_services(self, sites: Iterable[str]) -> None:
        """servicectl start all at each site, the sites in parallel (as the runbooks would, over SSH)."""
        running = {
            site: subprocess.Popen(
                as_user(self.config.os_user, [SERVICE_PYTHON, str(self.config.servicectl(site)), "start", "all"]),
                stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
            for site in sites
        }
        for site, process in running.items():
            output, _ = process.communicate(timeout=60)
            if process.returncode != 0:
                raise LabError(f"the services at the {site} site did not start: {output.strip()[-600:]}")

    def _start_heartbeat(self) -> None:
        """The primary site's heartbeat: a mark in each store every 100 ms that the RPO measurement reads
        (see heartbeat.py)."""
        config = self.config
        run(as_user(config.os_user, [SERVICE_PYTHON, str(config.bin_dir("primary") / "heartbeat.py"), "start",
                                     "--config", str(config.site_settings("primary"))]))

    def _wait_front_door(self, timeout: float = 10.0) -> None:
        """HAProxy's first health checks must pass before the front door serves."""
        deadline = time.monotonic() + timeout
        while True:
            try:
                states = haproxy.server_states(self.config)
            except OSError:
                states = {}
            if all(states.get(service, {}).get("primary") == "UP" for service in SERVICES):
                return
            if time.monotonic() > deadline:
                raise LabError(f"HAProxy does not see the primary services as UP after {timeout:.0f} s: {states}")
            time.sleep(0.05)

    def layout(self) -> list[str]:
        """What runs where, one line per place."""
        config = self.config
        ports = "  ".join(f"{service} :{config.service_port(service)}" for service in SERVICES)
        front = "  ".join(f"{service} :{config.frontend_port(service)}" for service in SERVICES)
        stores = "  ".join(f"{store_name(service)} :{config.postgres_port(service)}" for service in POSTGRES_SERVICES)
        stores += f"  {store_name(REDIS_SERVICE)} :{config.redis_port}"
        lines = [
            f"primary    {config.address('primary')}  sshd :{config.sshd_port}  {ports}",
            f"           {stores} (read-write)",
            f"backup     {config.address('backup')}  sshd :{config.sshd_port}  {ports} (warm)",
            f"           {stores} (standbys: trading synchronous, contract-signing and quotation asynchronous)",
            f"front door {FRONT_DOOR_ADDRESS}  {front}  admin socket {config.admin_socket}",
            f"inventory  {config.inventory_path}",
            f"ssh        ssh -i {config.client_key} -o UserKnownHostsFile={config.known_hosts} "
            f"-p {config.sshd_port} {config.os_user}@{config.address('primary')}",
        ]
        cluster = self.ha()
        if cluster is not None:
            for site in HA_SITES:
                member = cluster.etcd.members.get(site)
                group = f"  group {cluster.gids[site]}" if site in cluster.gids else ""
                lines.append(f"{site:<10} {config.address(site)}  {node_name(site)} {cluster.api_url(site)}  "
                             f"etcd {member.client_url if member else '-'}{group}")
            lines.append(f"nodes      {config.nodes_dir}/<site>/node.yml  (the {node_name('primary')} leads at start; "
                         f"`dr lab partition SITE` / `dr lab heal`)")
        return lines

    # --- down ------------------------------------------------------------------------------------------
    def down(self, keep_files: bool = False) -> list[str]:
        """Stop every process the lab started and remove its directory; returns what was stopped."""
        config = self.config
        stopped_first: list[str] = []
        cluster = self.ha()
        if cluster is not None:  # nodes first (a leader resigns while etcd runs), then etcd, healed
            stopped_first = cluster.stop()
        partition.heal(partition.table_name(config.root))  # even when a crash lost the HA state
        stop_etcd_under(config.root)  # etcd members of a crashed `up --ha`
        specs = {pid: spec for spec in self.processes() if (pid := running_pid(spec)) is not None}
        stray = processes_under(config.root) - set(specs)
        postmasters = {pid for pid, spec in specs.items() if spec.name.startswith("postgres-")}
        segments = {shmid for site in SITES for service in POSTGRES_SERVICES
                    if (shmid := postgres.shared_memory_id(config.pgdata(site, service))) is not None}
        # Immediate shutdown (SIGQUIT) lets the postmaster remove its shared memory; the data goes anyway.
        # Their children, found now: once a parent is gone they belong to init (sshd's per-connection
        # processes outlive the daemon while a client, cut off, never closes its connection).
        children = with_descendants(set(specs) | stray) - set(specs) - stray
        send(postmasters, signal.SIGQUIT)
        send((set(specs) | stray) - postmasters, signal.SIGTERM)
        remaining = wait_gone(set(specs) | stray, timeout=5.0)
        leftovers = with_descendants(remaining | processes_under(config.root) | {pid for pid in children
                                                                                if is_running(pid)})
        if leftovers and kill_now(leftovers):
            raise LabError(f"processes {sorted(leftovers)} of the lab at {config.root} survived SIGKILL")
        for shmid in segments:  # nothing left, not even a dead postmaster's shared memory
            postgres.release_shared_memory(shmid)
        if config.marker.exists() and not keep_files:
            shutil.rmtree(config.root)
        return stopped_first + [spec.label for spec in specs.values()] + [f"stray pid {pid}" for pid in sorted(stray)]

    # --- faults ----------------------------------------------------------------------------------------
    def kill_site(self, site: str) -> list[str]:
        """SIGKILL every process of `site` at once, as a power loss would; returns what was killed. In an HA
        lab that includes the site's orchestrator node and etcd member (the witness site has only those)."""
        cluster = self._check_site(site)
        specs = {pid: spec for spec in self.processes() if spec.site == site and (pid := running_pid(spec))}
        site_dir = self.config.site_dir(site)
        targets = with_descendants(set(specs) | (processes_under(site_dir) if site in SITES else set()))
        send(targets, signal.SIGKILL)
        # The power loss, as the incident time of a drill or demo: stamped once every SIGKILL is sent,
        # so nothing the site commits can be later than it (a stamp before sending let commits land
        # after it, and the RPO of asynchronous replication could not be measured), yet not after
        # waiting for the processes to be reaped (that took up to 0.2 s and would shorten the RTO).
        self.killed_at = datetime.now(UTC)
        if cluster is not None and cluster.evidence is not None:
            cluster.evidence.kill(site)  # the evidence database's member at the site (Patroni), if any
        survivors = wait_gone(targets, timeout=5.0)
        if survivors:
            raise LabError(f"processes {sorted(survivors)} at the {site} site survived SIGKILL")
        return [spec.label for spec in specs.values()]

    def kill_service(self, service: str, site: str) -> int:
        """SIGKILL one service at one site, or one store (``postgres-trading``: the postmaster and its
        backends, as a crash of the server would; ``redis-quotation``); returns the pid."""
        if site not in SITES:
            raise LabError(f"unknown site {site!r}; the lab's services run at {', '.join(SITES)}")
        if service not in KILLABLE:
            raise LabError(f"unknown service or store {service!r}; the lab runs {', '.join(KILLABLE)}")
        spec = next(s for s in self.processes() if s.name == service and s.site == site)
        pid = running_pid(spec)
        if pid is None:
            raise LabError(f"{spec.label} is not running")
        targets = with_descendants({pid})
        send(targets, signal.SIGKILL)
        self.killed_at = datetime.now(UTC)  # the crash's moment, as kill_site stamps it
        if wait_gone(targets, timeout=5.0):
            raise LabError(f"{spec.label} (pid {pid}) survived SIGKILL")
        return pid

    def break_replication(self, service: str) -> None:
        """Cut `service`'s standby off its primary: the backup site stops receiving WAL (the primary keeps serving)."""
        if service not in POSTGRES_SERVICES:
            raise LabError(f"{service!r} has no PostgreSQL standby; those with one: {', '.join(POSTGRES_SERVICES)}")
        if postgres.database_state(self.config, "backup", service).get("role") != "standby":
            raise LabError(f"{service}'s database at the backup site is not a running standby, so there is no "
                           f"replication to break")
        postgres.break_replication(self.config, service)

    def start_site(self, site: str) -> None:
        """Power restored at `site`: its sshd comes back, and in an HA lab its etcd member and orchestrator node;
        nothing else (the failback runbook rebuilds the rest)."""
        cluster = self._check_site(site)
        if not self.config.marker.exists():
            raise LabError(f"there is no lab at {self.config.root}; run `dr lab up` first")
        if site in SITES:
            spec = next(s for s in self.processes() if s.name == "sshd" and s.site == site)
            if running_pid(spec) is None:
                sshd.start(self.config, site)
        if cluster is not None:
            cluster.restart_site(site)

    def _check_site(self, site: str) -> HaCluster | None:
        """The HA part, if any; LabError for a site the lab does not have (the witness only in an HA lab)."""
        cluster = self.ha()
        known = HA_SITES if cluster is not None else SITES
        if site not in known:
            extra = " (the witness site only in an HA lab: `dr lab up --ha`)" if site in HA_SITES else ""
            raise LabError(f"unknown site {site!r}; the lab's sites are {', '.join(known)}{extra}")
        return cluster

    # --- partitions (HA lab, root, nftables) ----------------------------------------------------------------
    def partition(self, site: str) -> None:
        """Cut `site`'s orchestrator node and etcd member off the other sites (and theirs off it); replaces any
        partition in force. The front door and the services are not cut."""
        cluster = self._ha_or_refuse()
        self._check_site(site)
        cluster.cut(site)

    def heal(self) -> bool:
        """Remove the partition; returns whether one was in force."""
        self._ha_or_refuse()
        return partition.heal(partition.table_name(self.config.root))

    # --- status ----------------------------------------------------------------------------------------
    def status(self) -> dict[str, Any]:
        report = collect_status(self.config, self.processes(), self.state())
        cluster = self.ha()
        if cluster is not None and report["up"]:
            report["ha"] = ha = cluster.status()
            if ha["partition"]:
                report["problems"].append(f"a partition is in force: the {ha['partition']} site is cut off "
                                          f"(`dr lab heal` removes it)")
            if not ha["quorum"]:
                report["problems"].append("etcd has no quorum: no orchestrator node can lead")
            elif ha["leader"] is None:
                report["problems"].append("no orchestrator node leads")
            elif ha["leader"]["node"] not in {node_name(site) for site in HA_SITES}:
                report["problems"].append(f"the leader key is held by {ha['leader']['node']}, not by one of the "
                                          f"lab's nodes")
            report["healthy"] = not report["problems"]
        return report


def _now() -> str:
    return datetime.now(UTC).isoformat()

