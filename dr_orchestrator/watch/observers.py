"""The watch's probes, and what each independent observer makes of them.

A round sends every probe at once, each with a timeout (``timeout_s``, 1 s by default: a slow answer
is an answer, not a failure):

- each service's public health URL (``health``: through the front door);
- each service's own ``/health`` at each site (``vars.urls[site]`` + ``vars.health_path``);
- each store at each site: the PostgreSQL databases of ``dr.vars.databases`` and the Redis instances of
  ``dr.vars.redis`` (a store belongs to the service of the same name): its role, and for a standby or
  replica whether its link to the primary is up;
- the front door's servers (``dr.vars.front_door``, through its admin socket).

From those, one Observation per observer and target, stamped with the probe's send time:

- service targets: ``front-door`` (the public health URL answers 2xx), ``direct:SITE`` (its own /health
  at the site serving it answers 2xx), ``store`` (its store there answers and is the writable primary),
  ``haproxy`` (its server there is ready and up). The serving site is the one whose front-door server
  is ready (not in maintenance), else the site that answered through the front door (X-DR-Site), else
  the service's first site.
- site targets: ``direct:SITE`` (some service there answers, with its store reachable),
  ``store-host:SITE`` (some store there answers), ``replication:SITE`` (some standby or replica at
  another site still streams from it), ``haproxy:SITE`` (some front-door server there that is not in
  maintenance is up). A front-door server counts as up only while its newest health check passed.
  An observer with nothing to say about a target (no replica follows the site, the admin socket does
  not answer) says nothing rather than something false.

``probe_all`` is one complete round. A resident watch keeps a ``Prober``: its rounds never wait for a
slow probe (its verdict comes in a later round, stamped with its own send time) and keep HTTP and
PostgreSQL connections open.
"""

from __future__ import annotations

import functools
import re
import ssl
import threading
import time
from collections.abc import Callable, Iterable, Mapping
from concurrent.futures import Future, ThreadPoolExecutor, wait
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any, Generic, TypeVar

import httpx
import psycopg
import redis
from psycopg.conninfo import make_conninfo
from redis.backoff import NoBackoff
from redis.exceptions import RedisError
from redis.retry import Retry

from dr_orchestrator import secrets
from dr_orchestrator.actions import redis as redis_actions
from dr_orchestrator.actions.base import ActionError
from dr_orchestrator.actions.haproxy import FrontDoor, front_door, servers_state
from dr_orchestrator.actions.postgres import base as pgdb
from dr_orchestrator.model.events import utcnow
from dr_orchestrator.model.inventory import Inventory, Service
from dr_orchestrator.watch.observations import Observation, Target

PROBE_TIMEOUT_S = 1.0
ROUND_WAIT_S = 0.1  # a round waits no longer for its probes; the slower ones report in a later round
POSTGRES_STATE = (
    "SELECT pg_is_in_recovery(), current_setting('default_transaction_read_only') = 'on', "
    "(SELECT status FROM pg_stat_wal_receiver), (SELECT sender_host FROM pg_stat_wal_receiver)"
)
# A primary's standbys as it sees them: the sync state and the flush lag (what a failover now would lose).
POSTGRES_STANDBYS = (
    "SELECT application_name, state, sync_state, EXTRACT(EPOCH FROM flush_lag)::float, "
    "pg_wal_lsn_diff(pg_current_wal_lsn(), flush_lsn)::bigint FROM pg_stat_replication"
)
T = TypeVar("T")


class ObserverSetupError(ValueError):
    """The inventory describes a store or the front door in a way the probes cannot use (one sentence)."""


# --- what the probes bring back ------------------------------------------------------------------


@dataclass(frozen=True)
class Probed(Generic[T]):
    """One probe: when it was sent, how long it took, and what it found (or why it found nothing)."""

    at: datetime
    latency_s: float
    value: T | None
    error: str | None = None  # one line, when value is None


@dataclass(frozen=True)
class Health:
    """An answer of GET /health."""

    status: int
    site: str | None  # X-DR-Site, or the body's "site"
    db_role: str | None
    why: str | None

    @property
    def healthy(self) -> bool:
        return 200 <= self.status < 300

    @property
    def alive(self) -> bool:
        """The service answers and its store is reachable (a standby site answers 503, alive)."""
        return self.db_role != "unreachable"

    def describe(self) -> str:
        site = f" site={self.site}" if self.site else ""
        return f"HTTP {self.status}{site}" + (f": {self.why}" if self.why else "")


@dataclass(frozen=True)
class StandbyLink:
    """A standby or replica as its primary reports it (for the early warnings)."""

    name: str  # PostgreSQL's application_name; Redis: the replica's address:port
    state: str | None  # "streaming" / "online" while replicating; None when the server hides it
    sync_state: str | None = None  # PostgreSQL: "sync", "async", "potential", "quorum"
    lag_s: float | None = None  # PostgreSQL: flush lag; Redis: seconds since the replica's last ack
    behind_bytes: int | None = None


@dataclass(frozen=True)
class StoreState:
    """A store's server: its role, and for a standby or replica, its link to its primary."""

    kind: str  # "database" or "cache"
    role: str  # "primary", "standby" (PostgreSQL) or "replica" (Redis)
    writable: bool
    upstream: str | None = None  # the site it replicates from
    link: str | None = None  # "streaming" / "up" while replicating; otherwise what the server says
    standbys: tuple[StandbyLink, ...] = ()  # a primary's view of its standbys or replicas

    @property
    def streaming(self) -> bool:
        return self.link in ("streaming", "up")

    def describe(self) -> str:
        if self.role == "primary":
            return "primary" + ("" if self.writable else ", read-only")
        return f"{self.role} of {self.upstream or 'an unknown site'}, link {self.link or 'none'}"


@dataclass
class Readings:
    front: dict[str, Probed[Health]] = field(default_factory=dict)  # service ->
    direct: dict[tuple[str, str], Probed[Health]] = field(default_factory=dict)  # (service, site) ->
    stores: dict[tuple[str, str], Probed[StoreState]] = field(default_factory=dict)  # (service, site) ->
    servers: dict[str, Probed[dict[str, dict[str, Any]]]] = field(default_factory=dict)  # service -> site ->


# --- what to probe ---------------------------------------------------------------------------------


@dataclass(frozen=True)
class Layout:
    services: Mapping[str, Service]
    door: FrontDoor | None
    databases: dict[str, pgdb.Database]
    caches: dict[str, redis_actions.Instance]


def layout_of(inventory: Inventory) -> Layout:
    try:
        door = front_door(inventory) if inventory.vars.get("front_door") else None
        databases = {name: pgdb.resolve(inventory, name) for name in _named(inventory.vars.get("databases"))}
        caches = {name: redis_actions.resolve(inventory, name) for name in _named(inventory.vars.get("redis"))}
    except ActionError as exc:
        raise ObserverSetupError(f"inventory {inventory.name!r}: {exc}") from None
    return Layout(inventory.services, door, databases, caches)


def _named(described: Any) -> list[str]:
    """Names of the stores described one per name (a single database described directly has none)."""
    if not isinstance(described, dict) or "hosts" in described:
        return []
    return [str(name) for name in described]


# --- one round --------------------------------------------------------------------------------------


def probe_all(inventory: Inventory, *, timeout_s: float = PROBE_TIMEOUT_S) -> list[Observation]:
    """One complete round: every probe at once, each waited for (at most ``timeout_s``); one Observation per
    observer and target, each stamped with its probe's send time."""
    with Prober(inventory, timeout_s=timeout_s, wait_s=timeout_s) as prober:
        return prober.round()


Slot = tuple[str, Any]  # a probe's place in Readings: the field and the key


class _Job:
    """One probe run on a thread of its own; knows when it was sent, even if it never comes back."""

    def __init__(self, probe: Callable[[], Any]) -> None:
        self.probe = probe
        self.submitted_at = utcnow()
        self.submitted = time.monotonic()
        self.sent: datetime | None = None
        self.latency_s: float | None = None  # set once it answered or failed

    def __call__(self) -> Any:
        self.sent, started = utcnow(), time.monotonic()
        try:
            return self.probe()
        finally:
            self.latency_s = time.monotonic() - started


class Prober:
    """Probe rounds for a resident watch (call it, or ``round()``, once per interval; close it after).

    A round sends every probe that is not still out, waits at most ``wait_s`` for them, and returns an
    Observation for each observer and target that has something new. So a slow probe (a front door
    retrying a dead server for a second) never holds the others back: its verdict comes in a later
    round, stamped with its own send time. A probe out for ``timeout_s`` is a timeout; its thread ends
    by its own socket timeouts. HTTP and PostgreSQL connections are kept from round to round."""

    def __init__(self, inventory: Inventory, *, timeout_s: float = PROBE_TIMEOUT_S,
                 wait_s: float = ROUND_WAIT_S) -> None:
        self.layout = layout_of(inventory)
        self.sites = tuple(inventory.sites)
        self.timeout_s = timeout_s
        self.wait_s = min(wait_s, timeout_s)
        self.client = httpx.Client(timeout=timeout_s, verify=_tls_context())
        self.databases = KeptDatabaseConnections(timeout_s)
        self.probes = self._probes()
        # Room for a probe given up on (still ending) beside the one sent after it.
        self.pool = ThreadPoolExecutor(max_workers=max(1, 3 * len(self.probes)), thread_name_prefix="watch-probe")
        self.readings = Readings()
        self.out: dict[Slot, tuple[_Job, Future[Any]]] = {}
        self.reported: dict[tuple[Target, str], datetime] = {}  # the send time each observer last reported
        # Services a run of the watch is failing over: their probes rest until it ends, leaving the
        # machine to the run (the run's own checks tell when they are restored).
        self.resting: frozenset[str] = frozenset()

    def __enter__(self) -> Prober:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    def __call__(self) -> list[Observation]:
        return self.round()

    def close(self) -> None:
        self.pool.shutdown(wait=False, cancel_futures=True)
        self.client.close()
        self.databases.close()

    def _probes(self) -> dict[Slot, Callable[[], Any]]:
        layout, client, timeout_s = self.layout, self.client, self.timeout_s
        probes: dict[Slot, Callable[[], Any]] = {}
        for name, service in layout.services.items():
            if service.health:
                probes[("front", name)] = functools.partial(_health, client, service.health)
            path = str(service.vars.get("health_path") or "/health")
            for site, url in dict(service.vars.get("urls") or {}).items():
                probes[("direct", (name, str(site)))] = functools.partial(_health, client,
                                                                          f"{str(url).rstrip('/')}{path}")
            if layout.door is not None and name in layout.door.backends:
                probes[("servers", name)] = functools.partial(_servers, layout.door, name, timeout_s)
        for name, database in layout.databases.items():
            for site in database.hosts:
                probes[("stores", (name, site))] = functools.partial(_postgres, database, site, self.databases)
        for name, cache in layout.caches.items():
            for site in cache.hosts:
                probes[("stores", (name, site))] = functools.partial(_redis, cache, site, timeout_s)
        return probes

    def round(self) -> list[Observation]:
        for slot, probe in self.probes.items():
            if slot not in self.out and _service_of(slot) not in self.resting:
                job = _Job(probe)
                self.out[slot] = (job, self.pool.submit(job))
        wait([future for _, future in self.out.values()], timeout=self.wait_s)
        now = time.monotonic()
        for slot, (job, future) in list(self.out.items()):
            if future.done() or now - job.submitted >= self.timeout_s:
                field_name, key = slot
                getattr(self.readings, field_name)[key] = _probed(job, future, self.timeout_s)
                del self.out[slot]
        fresh = [item for item in observations_from(self.layout, self.readings, self.sites)
                 if self.reported.get((item.target, item.observer)) != item.at]
        self.reported.update(((item.target, item.observer), item.at) for item in fresh)
        return fresh


def _service_of(slot: Slot) -> str:
    """The service (or the store named after it) a probe looks at."""
    _field, key = slot
    return str(key[0] if isinstance(key, tuple) else key)


def _probed(job: _Job, future: Future[Any], timeout_s: float) -> Probed[Any]:
    sent = job.sent or job.submitted_at
    if not future.done() or job.latency_s is None:
        return Probed(sent, timeout_s, None, f"timeout after {timeout_s:.1f}s")
    failure = future.exception()
    if failure is None:
        return Probed(sent, job.latency_s, future.result())
    if isinstance(failure, httpx.TimeoutException | TimeoutError):
        return Probed(sent, job.latency_s, None, f"timeout after {timeout_s:.1f}s")
    if isinstance(failure, OSError | httpx.HTTPError | psycopg.Error | RedisError | ActionError | ValueError):
        return Probed(sent, job.latency_s, None, _reason(failure))
    raise failure


@functools.cache
def _tls_context() -> ssl.SSLContext:
    """Loading the system's CA certificates takes tens of milliseconds: once per process, not per round."""
    return ssl.create_default_context()


def _reason(exc: BaseException) -> str:
    """One short line: "connection refused", or the error's own first line."""
    text = str(exc).strip() or type(exc).__name__
    if "refused" in text.lower():
        return "connection refused"
    line = re.sub(r"^\[Errno \d+\] ", "", text.splitlines()[0].rpartition("failed: ")[2])
    return " ".join(line.split())[:200] or type(exc).__name__


def _health(client: httpx.Client, url: str) -> Health:
    response = client.get(url)
    try:
        body = response.json()
    except ValueError:
        body = None
    body = body if isinstance(body, dict) else {}
    why = body.get("why") or body.get("error")
    return Health(response.status_code, response.headers.get("X-DR-Site") or body.get("site"), body.get("db_role"),
                  " ".join(str(why).split()) if why else None)


class KeptDatabaseConnections:
    """PostgreSQL connections kept from round to round, one per database and site: a fresh connection
    each round costs the server a new backend process, which at 100 ms rounds took most of an idle HA
    lab's CPU. A probe holds its connection while it runs, so a probe given up on (still hanging on a cut
    network) never shares it with the one sent after it; that one opens its own."""

    def __init__(self, timeout_s: float) -> None:
        # A query on a kept connection to a host cut off ends with TCP's give-up, not minutes later.
        self.options = {"tcp_user_timeout": max(1000, int(timeout_s * 2000)),
                        "keepalives": 1, "keepalives_idle": 5, "keepalives_interval": 1, "keepalives_count": 2}
        self._idle: dict[tuple[str, str], psycopg.Connection[Any]] = {}
        self._lock = threading.Lock()
        self._closed = False

    def open(self, database: pgdb.Database, site: str) -> psycopg.Connection[Any]:
        return psycopg.connect(make_conninfo(database.conninfo(site), **self.options), autocommit=True)

    def take(self, key: tuple[str, str]) -> psycopg.Connection[Any] | None:
        with self._lock:
            return self._idle.pop(key, None)

    def give(self, key: tuple[str, str], connection: psycopg.Connection[Any]) -> None:
        with self._lock:
            if self._closed or key in self._idle:
                spare: psycopg.Connection[Any] | None = connection
            else:
                self._idle[key], spare = connection, None
        if spare is not None:
            spare.close()

    def close(self) -> None:
        with self._lock:
            self._closed = True
            idle, self._idle = list(self._idle.values()), {}
        for connection in idle:
            connection.close()


def _postgres(database: pgdb.Database, site: str, kept: KeptDatabaseConnections) -> StoreState:
    key = (database.name, site)
    connection = kept.take(key)
    if connection is not None:
        try:
            state = _postgres_state(connection, database, site)
        except psycopg.Error:
            # A session ended by a restart says nothing of the server now: ask again on a fresh connection.
            connection.close()
        else:
            kept.give(key, connection)
            return state
    connection = kept.open(database, site)
    try:
        state = _postgres_state(connection, database, site)
    except BaseException:
        connection.close()
        raise
    kept.give(key, connection)
    return state


def _postgres_state(connection: psycopg.Connection[Any], database: pgdb.Database, site: str) -> StoreState:
    row = connection.execute(POSTGRES_STATE).fetchone()
    assert row is not None  # the query returns one row
    in_recovery, read_only, link, sender = row
    if not in_recovery:
        standbys = tuple(StandbyLink(str(name), state, sync, lag, behind)
                         for name, state, sync, lag, behind in connection.execute(POSTGRES_STANDBYS))
        return StoreState("database", "primary", not read_only, standbys=standbys)
    senders = [other for other, host in database.hosts.items() if host == sender and other != site]
    others = database.other_sites(site)
    upstream = senders[0] if len(senders) == 1 else others[0] if len(others) == 1 else None
    return StoreState("database", "standby", False, upstream, link)


def _redis(cache: redis_actions.Instance, site: str, timeout_s: float) -> StoreState:
    client = redis.Redis(
        host=cache.hosts[site], port=cache.ports[site],
        password=secrets.resolve(cache.password) if cache.password else None,
        socket_connect_timeout=timeout_s, socket_timeout=timeout_s, retry=Retry(NoBackoff(), 0),
    )
    try:
        info = client.info("replication")
    finally:
        client.close()
    if info.get("role") == "master":
        replicas = tuple(StandbyLink(f"{value.get('ip')}:{value.get('port')}", value.get("state"),
                                     lag_s=float(value.get("lag", 0)),
                                     behind_bytes=int(info.get("master_repl_offset", 0)) - int(value.get("offset", 0)))
                         for key, value in info.items() if re.fullmatch(r"slave\d+", key) and isinstance(value, dict))
        return StoreState("cache", "primary", True, standbys=replicas)
    upstream = cache.site_at(str(info.get("master_host")), int(info.get("master_port") or 0), besides=site)
    return StoreState("cache", "replica", False, upstream, str(info.get("master_link_status")))


def _servers(door: FrontDoor, service: str, timeout_s: float) -> dict[str, dict[str, Any]]:
    """The service's front-door servers by site: admin state (ready, maint, drain) and operational state."""
    backend = door.backends[service]
    states = servers_state(door.admin_socket, backend, timeout_s)
    return {site: states[server] for site, server in backend.servers.items() if server in states}


# --- from readings to observations -----------------------------------------------------------------


def observations_from(layout: Layout, readings: Readings, sites: Iterable[str]) -> list[Observation]:
    observations: list[Observation] = []
    for name, service in layout.services.items():
        observations += _service_observations(Target("service", name), service, readings)
    for site in sites:
        observations += _site_observations(Target("site", site), readings)
    return observations


def serving_site(service: Service, readings: Readings) -> str:
    """The site the front door sends the service's traffic to (its one ready server), else the site that
    answered through the front door, else the service's first site."""
    servers = readings.servers.get(service.name)
    ready = [site for site, state in (servers.value or {}).items() if state["admin"] == "ready"] if servers else []
    if len(ready) == 1:
        return ready[0]
    front = readings.front.get(service.name)
    answered = front.value.site if front is not None and front.value is not None else None
    return answered if answered in service.sites else service.primary_site


def _service_observations(target: Target, service: Service, readings: Readings) -> list[Observation]:
    site = serving_site(service, readings)
    found: list[Observation] = []
    if (front := readings.front.get(service.name)) is not None:
        found.append(_single("front-door", target, front, lambda health: (health.healthy, health.describe())))
    if (direct := readings.direct.get((service.name, site))) is not None:
        found.append(_single(f"direct:{site}", target, direct,
                             lambda health: (health.healthy, f"{health.describe()} from {site}")))
    if (store := readings.stores.get((service.name, site))) is not None:
        found.append(_single("store", target, store, lambda state: (
            state.role == "primary" and state.writable,
            f"{service.name}'s {state.kind} at {site}: {state.describe()}")))
    servers = readings.servers.get(service.name)
    if servers is not None and servers.value is not None and site in servers.value:
        state = servers.value[site]
        found.append(Observation("haproxy", target, state["admin"] == "ready" and _serves(state), servers.at,
                                 servers.latency_s, f"server {site} of backend {service.name}: {_server(state)}"))
    return found


def _serves(server: dict[str, Any]) -> bool:
    """Up, and its newest health check did not fail: HAProxy keeps a server up until ``fall`` checks failed,
    and the first failed one is the earlier sign."""
    return bool(server["operational"] == "up" and server.get("last_check") != "failed")


def _server(server: dict[str, Any]) -> str:
    return f"{server['admin']}, {server['operational']}, last check {server.get('last_check', 'unknown')}"


def _single(observer: str, target: Target, probed: Probed[T], judge: Callable[[T], tuple[bool, str]]) -> Observation:
    if probed.value is None:
        return Observation(observer, target, False, probed.at, probed.latency_s, probed.error or "no answer")
    ok, detail = judge(probed.value)
    return Observation(observer, target, ok, probed.at, probed.latency_s, detail)


def _site_observations(target: Target, readings: Readings) -> list[Observation]:
    site = target.name
    direct = {service: probed for (service, at), probed in readings.direct.items() if at == site}
    stores = {service: probed for (service, at), probed in readings.stores.items() if at == site}
    replicas = {f"{service}@{at}": probed for (service, at), probed in readings.stores.items()
                if at != site and probed.value is not None and probed.value.upstream == site}
    servers = {service: Probed(probed.at, probed.latency_s, probed.value[site])
               for service, probed in readings.servers.items()
               if probed.value is not None and site in probed.value and probed.value[site]["admin"] != "maint"}
    found = [
        _any_good(f"direct:{site}", target, direct, lambda health: health.alive, Health.describe),
        _any_good(f"store-host:{site}", target, stores, lambda state: True, StoreState.describe),
        _any_good(f"replication:{site}", target, replicas, lambda state: state.streaming, StoreState.describe),
        _any_good(f"haproxy:{site}", target, servers, _serves, _server),
    ]
    return [observation for observation in found if observation is not None]


def _any_good(observer: str, target: Target, probes: Mapping[str, Probed[T]], good: Callable[[T], bool],
              describe: Callable[[T], str]) -> Observation | None:
    """Good while any of the probes finds its part well; None when there is nothing to judge."""
    if not probes:
        return None
    verdicts = {name: (probed.value is not None and good(probed.value),
                       describe(probed.value) if probed.value is not None else probed.error or "no answer")
                for name, probed in probes.items()}
    ok = any(well for well, _ in verdicts.values())
    at = max(probed.at for probed in probes.values())  # as of its newest probe: older ones may be still out
    known = max(probed.at.timestamp() + probed.latency_s for probed in probes.values())
    shown = [f"{name}: {detail}" for name, (well, detail) in sorted(verdicts.items()) if well == ok]
    return Observation(observer, target, ok, at, known - at.timestamp(), "; ".join(shown))
