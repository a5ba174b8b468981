"""Where everything of one lab lives: addresses, ports and paths, all derived from one LabConfig.

Several labs run side by side (tests, helpers, the demo): each has its own root directory and port
offset, so nothing here is a fixed global path or port.
"""

from __future__ import annotations

import getpass
import json
import os
from dataclasses import dataclass
from pathlib import Path

SITES: tuple[str, ...] = ("primary", "backup")
SITE_ADDRESSES: dict[str, str] = {"primary": "127.0.10.1", "backup": "127.0.20.1"}
# An HA lab (`dr lab up --ha`) adds a witness site: an etcd member and an orchestrator node, nothing else.
WITNESS_ADDRESS = "127.0.30.1"
HA_SITES: tuple[str, ...] = ("primary", "backup", "witness")
HA_SITE_ADDRESSES: dict[str, str] = {**SITE_ADDRESSES, "witness": WITNESS_ADDRESS}
SITE_REGIONS: dict[str, str] = {"primary": "lab-a", "backup": "lab-b"}
SERVICES: tuple[str, ...] = ("trading", "contract-signing", "quotation")
# Each service keeps its own data, as in a bank: trading and contract-signing each a PostgreSQL primary
# and streaming standby (trading synchronous: its RPO target is 0; contract-signing asynchronous: 5 s),
# quotation a Redis price cache with a replica at the backup site (60 s).
POSTGRES_SERVICES: tuple[str, ...] = ("trading", "contract-signing")
SYNCHRONOUS_SERVICES: tuple[str, ...] = ("trading",)
REDIS_SERVICE = "quotation"


def store_name(service: str) -> str:
    """The name of `service`'s data store: what `dr lab kill NAME@SITE` and `dr lab status` call it."""
    return f"redis-{service}" if service == REDIS_SERVICE else f"postgres-{service}"


STORES: tuple[str, ...] = tuple(store_name(service) for service in SERVICES)
KILLABLE: tuple[str, ...] = (*SERVICES, *STORES)  # what `dr lab kill NAME@SITE` takes: a service or a store

FRONT_DOOR_ADDRESS = "127.0.0.1"
SSHD_PORT = 2222
POSTGRES_PORTS: dict[str, int] = {"trading": 15432, "contract-signing": 15433}
REDIS_PORT = 16379
SERVICE_PORTS: dict[str, int] = {"trading": 8101, "contract-signing": 8102, "quotation": 8103}
FRONTEND_PORTS: dict[str, int] = {"trading": 18101, "contract-signing": 18102, "quotation": 18103}

DATABASE_NAME = "drlab"
DATABASE_USER = "drlab"  # the clusters' bootstrap superuser, whatever OS user runs PostgreSQL
REPLICATION_SLOT = "backup"
STANDBY_APPLICATION_NAME = "backup"
PG_BIN = Path("/usr/lib/postgresql/15/bin")
SERVICE_PYTHON = "/usr/bin/python3"  # readable by the postgres user, unlike a venv under /root

DEFAULT_ROOT = "/tmp/dr-lab"
ROOT_ENV = "DR_LAB_DIR"
PORT_OFFSET_ENV = "DR_LAB_PORT_OFFSET"
MAX_PORT = 65535
MARKER_NAME = ".dr-lab"

# Each site's orchestrator node and etcd member of an HA lab run with a numeric group of their own (no
# /etc/group entry), which the partition's nftables rules match (`meta skgid`): on loopback a packet's
# source address is always 127.0.0.1, so only the sending socket's group tells the sites apart. The
# groups are derived from the port offset, which no two running labs share (their ports would clash).
SITE_GID_BASE = 3_100_000
_MIN_PORT_OFFSET = 1024 - 2222  # the lowest offset __post_init__ accepts (sshd's port down to 1024)


def _recorded_offset(root: Path) -> int:
    """The port offset in the marker of the lab at `root`; 0 when there is none."""
    try:
        recorded = json.loads((root / MARKER_NAME).read_text()).get("port_offset", 0)
    except (OSError, ValueError, AttributeError):
        return 0
    return recorded if isinstance(recorded, int) else 0


class LabConfigError(ValueError):
    """A lab setting a user chose cannot work (one sentence, shown as is)."""


@dataclass(frozen=True)
class LabConfig:
    root: Path = Path(DEFAULT_ROOT)
    port_offset: int = 0

    def __post_init__(self) -> None:
        object.__setattr__(self, "root", Path(os.path.abspath(self.root)))
        highest = max(REDIS_PORT, *POSTGRES_PORTS.values(), *FRONTEND_PORTS.values()) + self.port_offset
        lowest = min(SSHD_PORT, *SERVICE_PORTS.values()) + self.port_offset
        if lowest < 1024 or highest > MAX_PORT:
            raise LabConfigError(
                f"port offset {self.port_offset} puts the lab's ports outside 1024-{MAX_PORT}; "
                f"choose an offset between {1024 - min(SSHD_PORT, *SERVICE_PORTS.values())} "
                f"and {MAX_PORT - highest + self.port_offset}"
            )

    @classmethod
    def from_env(cls, root: str | Path | None = None, port_offset: int | None = None) -> LabConfig:
        """Explicit values win; then DR_LAB_DIR / DR_LAB_PORT_OFFSET; then the offset the lab at that
        root was made with (so `dr lab status` finds a lab brought up with --port-offset); then the defaults."""
        chosen_root = Path(root if root is not None else os.environ.get(ROOT_ENV) or DEFAULT_ROOT)
        if port_offset is None:
            raw = os.environ.get(PORT_OFFSET_ENV, "").strip()
            try:
                port_offset = int(raw) if raw else _recorded_offset(chosen_root)
            except ValueError:
                raise LabConfigError(f"{PORT_OFFSET_ENV}={raw!r} is not a whole number") from None
        return cls(root=chosen_root, port_offset=port_offset)

    # --- who runs what -----------------------------------------------------------------------------
    @property
    def as_root(self) -> bool:
        return os.geteuid() == 0

    @property
    def os_user(self) -> str:
        """The OS user of PostgreSQL, the services and SSH logins (PostgreSQL refuses root)."""
        return "postgres" if self.as_root else getpass.getuser()

    # --- addresses and ports -----------------------------------------------------------------------
    def address(self, site: str) -> str:
        return HA_SITE_ADDRESSES[site]

    def site_gid(self, site: str) -> int:
        """The numeric group of `site`'s orchestrator node and etcd member in an HA lab (see SITE_GID_BASE)."""
        return SITE_GID_BASE + (self.port_offset - _MIN_PORT_OFFSET) * 4 + HA_SITES.index(site)

    @property
    def sshd_port(self) -> int:
        return SSHD_PORT + self.port_offset

    def postgres_port(self, service: str) -> int:
        return POSTGRES_PORTS[service] + self.port_offset

    @property
    def redis_port(self) -> int:
        return REDIS_PORT + self.port_offset

    def service_port(self, service: str) -> int:
        return SERVICE_PORTS[service] + self.port_offset

    def frontend_port(self, service: str) -> int:
        return FRONTEND_PORTS[service] + self.port_offset

    def service_url(self, service: str, site: str) -> str:
        return f"http://{self.address(site)}:{self.service_port(service)}"

    def frontend_url(self, service: str) -> str:
        return f"http://{FRONT_DOOR_ADDRESS}:{self.frontend_port(service)}"

    def listening_ports(self) -> list[tuple[str, int]]:
        """Every (address, port) the lab binds: all must be free before `up`."""
        ports = [(FRONT_DOOR_ADDRESS, self.frontend_port(s)) for s in SERVICES]
        for site in SITES:
            address = self.address(site)
            ports += [(address, self.sshd_port), (address, self.redis_port)]
            ports += [(address, self.postgres_port(s)) for s in POSTGRES_SERVICES]
            ports += [(address, self.service_port(s)) for s in SERVICES]
        return ports

    def dsn(self, site: str, service: str, dbname: str = DATABASE_NAME) -> str:
        """Connection string of `service`'s PostgreSQL at `site`."""
        return (
            f"host={self.address(site)} port={self.postgres_port(service)} dbname={dbname} "
            f"user={DATABASE_USER} connect_timeout=2"
        )

    # --- paths -------------------------------------------------------------------------------------
    @property
    def marker(self) -> Path:
        """Present only in a directory the lab created: `down` removes nothing without it."""
        return self.root / MARKER_NAME

    @property
    def state_file(self) -> Path:
        return self.root / "lab.json"

    @property
    def inventory_path(self) -> Path:
        return self.root / "inventory.yml"

    @property
    def ssh_dir(self) -> Path:
        return self.root / "ssh"

    @property
    def client_key(self) -> Path:
        return self.ssh_dir / "id_ed25519"

    @property
    def known_hosts(self) -> Path:
        return self.ssh_dir / "known_hosts"

    @property
    def haproxy_dir(self) -> Path:
        return self.root / "haproxy"

    @property
    def haproxy_cfg(self) -> Path:
        return self.haproxy_dir / "haproxy.cfg"

    @property
    def haproxy_pidfile(self) -> Path:
        return self.haproxy_dir / "haproxy.pid"

    @property
    def admin_socket(self) -> Path:
        return self.haproxy_dir / "admin.sock"

    def site_dir(self, site: str) -> Path:
        return self.root / site

    def bin_dir(self, site: str) -> Path:
        return self.site_dir(site) / "bin"

    def servicectl(self, site: str) -> Path:
        return self.bin_dir(site) / "servicectl"

    def site_settings(self, site: str) -> Path:
        """The JSON file the site's servicectl and services read (address, ports, database)."""
        return self.site_dir(site) / "site.json"

    def run_dir(self, site: str) -> Path:
        return self.site_dir(site) / "run"

    def log_dir(self, site: str) -> Path:
        return self.site_dir(site) / "log"

    def pgdata(self, site: str, service: str) -> Path:
        return self.site_dir(site) / f"pgdata-{service}"

    def postgres_log(self, site: str, service: str) -> Path:
        return self.log_dir(site) / f"postgres-{service}.log"

    def redis_dir(self, site: str) -> Path:
        return self.site_dir(site) / "redis"

    def redis_pidfile(self, site: str) -> Path:
        return self.run_dir(site) / "redis.pid"

    def sshd_dir(self, site: str) -> Path:
        return self.site_dir(site) / "sshd"

    def sshd_config(self, site: str) -> Path:
        return self.sshd_dir(site) / "sshd_config"

    def sshd_pidfile(self, site: str) -> Path:
        return self.run_dir(site) / "sshd.pid"

    def service_pidfile(self, site: str, service: str) -> Path:
        return self.run_dir(site) / f"{service}.pid"

    def wal_archive(self, service: str) -> Path:
        """WAL archived by `service`'s primary, kept at the backup site (for point-in-time recovery)."""
        return self.site_dir("backup") / f"wal-archive-{service}"

    @property
    def nodes_dir(self) -> Path:
        """An HA lab's orchestrator nodes: <site>/node.yml, journal.jsonl, node.log, node.pid; the evidence URL."""
        return self.root / "nodes"

    def node_dir(self, site: str) -> Path:
        return self.nodes_dir / site

    def node_config(self, site: str) -> Path:
        return self.node_dir(site) / "node.yml"

    @property
    def etcd_dir(self) -> Path:
        return self.root / "etcd"

    @property
    def ha_state_file(self) -> Path:
        """What an HA lab adds to lab.json's state: etcd members, nodes, groups, the evidence store, a partition."""
        return self.root / "ha.json"

    @property
    def base_backup(self) -> Path:
        """A base backup of trading's primary taken at `lab up`, kept at the backup site: with the archived
        WAL, trading's database can be restored to any moment since (the cyber-attack drill)."""
        return self.site_dir("backup") / "base-backup-trading"
