"""Redis replication (a cache with a replica at another site): look at it, promote the replica,
measure RPO, make a server the replica of another.

The inventory describes instances under ``dr.vars.redis``, each by name::

    redis:
      quotation:
        port: 6379                      # or ports: {primary: 6379, backup: 6380}
        hosts: {primary: 10.0.1.7, backup: 10.0.2.7}
        password: env:NAME              # optional; a reference only (env:NAME, file:/path, {env: NAME})
        heartbeat_key: dr:heartbeat     # optional, this default

Something at the primary site writes the heartbeat key every fraction of a second: ``SET dr:heartbeat
<ISO-8601 time of the write, with its zone>`` on the master. It replicates, so the value a replica
holds is the time of the newest write it received: the input of ``redis.rpo``. Actions name the
instance (``instance``, optional when one is described) and sites; roles are reported as
``primary``/``replica`` (Redis's master/slave), ``unreachable``, or ``unknown`` (it answered with an
error, e.g. a wrong password).
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any, ClassVar

import redis
from pydantic import Field
from redis.backoff import NoBackoff
from redis.retry import Retry

from dr_orchestrator.actions.base import Action, ActionContext, ActionError, ActionResult, Params
from dr_orchestrator.actions.replicated import (
    Servers,
    incident_time,
    optional_site_field,
    poll_until_deadline,
    record_rpo,
    services_field,
    site_field,
    unless_forced,
)
from dr_orchestrator.model.durations import Duration, format_duration
from dr_orchestrator.model.events import utcnow
from dr_orchestrator.model.inventory import Inventory
from dr_orchestrator.model.runbook import Effect
from dr_orchestrator.model.safety import PROMOTE_FENCED
from dr_orchestrator.secrets import is_reference

DEFAULT_PORT = 6379
DEFAULT_HEARTBEAT_KEY = "dr:heartbeat"
CONNECT_TIMEOUT_S = 2.0
PROBE_TTL_MS = 30_000  # the key written to prove a promoted server takes writes expires by itself
ROLES = {"master": "primary", "slave": "replica"}


class RedisUnreachable(ActionError):
    """The server did not accept a connection (or stopped answering)."""

    def __init__(self, where: str, reason: str) -> None:
        super().__init__(f"{where} is unreachable: {reason}")
        self.reason = reason


class RedisRefused(ActionError):
    """The server answered, with an error: a wrong password, still loading its data, a command refused."""

    def __init__(self, where: str, reason: str) -> None:
        super().__init__(f"{where} answered with an error: {reason}")
        self.reason = reason


@dataclass(frozen=True)
class Instance(Servers):
    kind: ClassVar[str] = "redis"
    name: str
    hosts: dict[str, str]  # site -> address
    ports: dict[str, int]  # site -> port
    password: str | None = None  # a reference: env:NAME or file:/path
    heartbeat_key: str = DEFAULT_HEARTBEAT_KEY

    def address(self, site: str) -> str:
        return f"{self.hosts[site]}:{self.ports[site]}"

    def where(self, site: str) -> str:
        return f"redis {self.name!r} at site {site} ({self.address(site)})"

    def site_at(self, host: str, port: int, besides: str | None = None) -> str | None:
        """The site whose server listens at ``host:port``; a replica connecting from another address
        of its machine (loopback, NAT) is known by its port when only one site other than
        ``besides`` (its master's) has it."""
        exact = [site for site in self.hosts if (self.hosts[site], self.ports[site]) == (host, port)]
        by_port = [site for site in self.hosts if self.ports[site] == port and site != besides]
        return exact[0] if exact else by_port[0] if len(by_port) == 1 else None


def resolve(inventory: Inventory, name: str | None) -> Instance:
    """The Redis instance ``name`` (or the only one) described in ``dr.vars.redis``."""
    described = inventory.vars.get("redis")
    if not isinstance(described, dict) or not described:
        raise ActionError(f"inventory {inventory.name!r} describes no Redis instances (dr.vars.redis)")
    if name is None:
        if len(described) != 1:
            raise ActionError(f"say which Redis instance: the inventory describes {', '.join(sorted(described))}")
        name = str(next(iter(described)))
    spec = described.get(name)
    if not isinstance(spec, dict):
        raise ActionError(f"redis {name!r} is not in dr.vars.redis; known: {', '.join(sorted(described))}")
    try:
        hosts = {str(site): str(host) for site, host in dict(spec["hosts"]).items()}
        ports = {str(site): int(port) for site, port in dict(spec.get("ports") or {}).items()}
        port = int(spec.get("port", DEFAULT_PORT))
        return Instance(
            name=name,
            hosts=hosts,
            ports={site: ports.get(site, port) for site in hosts},
            password=_password_reference(name, spec.get("password")),
            heartbeat_key=str(spec.get("heartbeat_key") or DEFAULT_HEARTBEAT_KEY),
        )
    except (KeyError, TypeError, ValueError) as exc:
        raise ActionError(f"redis {name!r} in dr.vars.redis is incomplete or malformed: {exc}") from None


def _password_reference(name: str, value: Any) -> str | None:
    """``env:NAME``, ``file:/path``, or the same as a mapping (``{env: NAME}``), as a reference."""
    if isinstance(value, dict) and len(value) == 1:
        kind, target = next(iter(value.items()))
        value = f"{kind}:{target}"
    if value is not None and not is_reference(value):
        raise ActionError(f"redis {name!r}: password must be a reference (env:NAME or file:/path), not the password")
    return value


@contextmanager
def connect(inst: Instance, site: str, ctx: ActionContext) -> Iterator[redis.Redis]:
    """A client of the server at ``site`` (answered a PING); no command may outlast the step, and
    the client's errors become RedisUnreachable / RedisRefused naming the server."""
    ctx.check_cancelled()
    inst.check_site(site)
    client = redis.Redis(
        host=inst.hosts[site],
        port=inst.ports[site],
        password=ctx.secret(inst.password) if inst.password else None,
        socket_connect_timeout=max(0.05, min(CONNECT_TIMEOUT_S, ctx.remaining())),
        socket_timeout=max(0.05, ctx.remaining()),
        decode_responses=True,
        retry=Retry(NoBackoff(), 0),  # a dead server must not be retried for seconds
    )
    try:
        client.ping()
        yield client
    # Both are ConnectionErrors to redis-py, yet the server answered.
    except (redis.AuthenticationError, redis.BusyLoadingError) as exc:
        raise RedisRefused(inst.where(site), str(exc)) from None
    except (redis.ConnectionError, redis.TimeoutError) as exc:
        raise RedisUnreachable(inst.where(site), str(exc)) from None
    except redis.RedisError as exc:
        raise RedisRefused(inst.where(site), str(exc)) from None
    finally:
        client.close()


def replication_info(client: redis.Redis) -> dict[str, Any]:
    info: dict[str, Any] = client.info("replication")
    return info


def state_of(inst: Instance, site: str, client: redis.Redis) -> dict[str, Any]:
    """The server's role, replication offsets and link, its replicas, and the heartbeat it holds."""
    pipe = client.pipeline(transaction=False)
    pipe.info("replication")
    pipe.get(inst.heartbeat_key)
    pipe.time()
    info, beat, (seconds, micros) = pipe.execute()
    now = datetime.fromtimestamp(seconds + micros / 1e6, UTC)
    state: dict[str, Any] = {
        "address": inst.address(site),
        "role": ROLES.get(info["role"], info["role"]),
        "master_repl_offset": info["master_repl_offset"],
        "connected_replicas": info.get("connected_slaves", 0),
        "replicas": [_replica(inst, site, entry, info["master_repl_offset"])
                     for key, entry in sorted(info.items()) if key.startswith("slave") and isinstance(entry, dict)],
        "heartbeat": _heartbeat(beat, now),
        "observed_at": now.isoformat(),
    }
    if info["role"] == "slave":
        down_s = info.get("master_link_down_since_seconds", -1)
        state.update(
            master=f"{info['master_host']}:{info['master_port']}",
            master_site=inst.site_at(str(info["master_host"]), int(info["master_port"])),
            master_link_status=info["master_link_status"],
            master_link_down_s=down_s if info["master_link_status"] != "up" and down_s >= 0 else None,
            sync_in_progress=bool(info.get("master_sync_in_progress")),
            slave_repl_offset=info["slave_repl_offset"],
            # Received but not yet applied: Redis 7 reports both.
            unapplied_bytes=max(0, info.get("slave_read_repl_offset", info["slave_repl_offset"])
                                - info["slave_repl_offset"]),
        )
    return state


def _replica(inst: Instance, master_site: str, entry: dict[str, Any], master_offset: int) -> dict[str, Any]:
    """A replica as its master reports it; its offset comes with its acknowledgements, once a second."""
    return {
        "address": f"{entry['ip']}:{entry['port']}",
        "site": inst.site_at(str(entry["ip"]), int(entry["port"]), besides=master_site),
        "state": entry.get("state"),
        "acknowledged_offset": entry.get("offset"),
        "lag_bytes": max(0, master_offset - int(entry.get("offset", 0))),
    }


def _heartbeat(value: str | None, now: datetime) -> dict[str, Any] | None:
    if value is None:
        return None
    at = parse_time(value)
    if at is None:
        return {"at": value, "age_s": None, "error": "not an ISO-8601 time with a time zone"}
    return {"at": value, "age_s": round((now - at).total_seconds(), 6)}


def parse_time(value: str) -> datetime | None:
    try:
        moment = datetime.fromisoformat(value)
    except ValueError:
        return None
    return moment if moment.utcoffset() is not None else None


def probe(inst: Instance, site: str, ctx: ActionContext) -> dict[str, Any]:
    """``state_of`` the server at ``site``, or its role ``unreachable``/``unknown`` with the ``error``."""
    try:
        with connect(inst, site, ctx) as client:
            return state_of(inst, site, client)
    except RedisUnreachable as exc:
        return {"address": inst.address(site), "role": "unreachable", "error": exc.reason}
    except RedisRefused as exc:
        return {"address": inst.address(site), "role": "unknown", "error": exc.reason}


def shown_role(state: dict[str, Any]) -> str:
    """``replica``, or ``unreachable (Connection refused)``: for sentences."""
    return f"{state['role']} ({state['error']})" if "error" in state else state["role"]


class InstanceParams(Params):
    instance: str | None = Field(
        default=None,
        description="Redis instance in dr.vars.redis; may be left out when the inventory describes one.",
        json_schema_extra={"refers_to": "redis"},
    )


# ---------------------------------------------------------------- replication status


class ReplicationStatusParams(InstanceParams):
    site: str | None = optional_site_field(
        "The replica to judge against the limits below; without it, the status is only reported."
    )
    max_lag_bytes: int | None = Field(
        default=None,
        ge=0,
        description="Refuse when the replica is more than this many bytes behind its master's replication "
        "offset (when no master answers: behind what it received).",
    )
    max_staleness: Duration | None = Field(
        default=None,
        description="Refuse when the heartbeat the replica holds is older than this (seconds or a duration): "
        "older than now while a master answers, else than the incident time.",
    )
    require_link_up: bool = Field(default=False, description="Refuse unless the replica's link to its master is up.")


class ReplicationStatus(Action[ReplicationStatusParams]):
    """Role, offsets, link and heartbeat of every server of the instance. With ``site`` and limits,
    a precheck: a replica too far behind fails the step unless the run is forced (``--force`` with
    a reason), and the reason is recorded in the output."""

    name = "redis.replication_status"
    effect = Effect.READ_ONLY
    Params = ReplicationStatusParams
    idempotent = True

    def run(self, params: ReplicationStatusParams, ctx: ActionContext) -> ActionResult:
        inst = resolve(ctx.inventory, params.instance)
        if params.site is not None:
            inst.check_site(params.site)
        sites = {site: probe(inst, site, ctx) for site in inst.hosts}
        output: dict[str, Any] = {"instance": inst.name, "sites": sites}
        if params.site is None:
            return ActionResult(output=output)
        replica = sites[params.site]
        if replica["role"] != "replica":
            raise ActionError(f"{inst.where(params.site)} is not a replica: it is {shown_role(replica)}")
        judged = self._judge(params, replica, sites, ctx)
        output.update(judged)
        if judged["problems"]:
            output["forced"] = unless_forced(
                ctx, f"{inst.where(params.site)} is not fit to take over: {'; '.join(judged['problems'])}")
        return ActionResult(output=output)

    @staticmethod
    def _judge(params: ReplicationStatusParams, replica: dict[str, Any], sites: dict[str, dict[str, Any]],
               ctx: ActionContext) -> dict[str, Any]:
        assert params.site is not None
        master = sites.get(replica["master_site"] or "")
        if master is not None and master["role"] == "primary":
            lag_bytes = max(0, master["master_repl_offset"] - replica["slave_repl_offset"])
            lag_reference = f"master at {replica['master_site']}"
        else:
            lag_bytes, lag_reference = replica["unapplied_bytes"], "replica's received stream (no master answers)"
        now = datetime.fromisoformat(replica["observed_at"])
        # With the master gone, the replica ages by the minute: what counts is how current it was at the incident.
        incident = ctx.run_info.get("incident_at")
        masters_answer = any(state["role"] == "primary" for state in sites.values())
        reference = now if masters_answer or not incident else min(now, datetime.fromisoformat(str(incident)))
        beat = replica["heartbeat"]
        beat_at = parse_time(beat["at"]) if beat else None
        staleness = None if beat_at is None else round((reference - beat_at).total_seconds(), 6)
        problems = []
        if params.require_link_up and replica["master_link_status"] != "up":
            down = replica["master_link_down_s"]
            problems.append(f"its link to its master is {replica['master_link_status']}"
                            + (f" (for {down}s)" if down is not None else ""))
        if params.max_lag_bytes is not None and lag_bytes > params.max_lag_bytes:
            problems.append(f"it is {lag_bytes} bytes behind (limit {params.max_lag_bytes})")
        if params.max_staleness is not None and (staleness is None or staleness > params.max_staleness):
            shown = "of unknown age" if staleness is None else f"{format_duration(staleness)} old"
            problems.append(f"its newest heartbeat is {shown} (limit {format_duration(params.max_staleness)})")
        return {
            "replica": params.site,
            "lag_bytes": lag_bytes,
            "lag_reference": lag_reference,
            "staleness_s": staleness,
            "staleness_reference": "now" if reference is now else "incident time",
            "problems": problems,
        }


# ---------------------------------------------------------------- promotion


class PromoteParams(InstanceParams):
    site: str = site_field("Site of the replica to promote.")
    old_primary_site: str | None = optional_site_field(
        "Site of the master being replaced; by default the instance's other site."
    )
    catch_up_timeout: Duration = Field(
        default=10.0,
        description="While the old master answers: how long its writes stay paused waiting for the replica to "
        "reach its offset before the promotion is refused (unless the run is forced).",
    )


class Promote(Action[PromoteParams]):
    """Makes the replica at ``site`` the master, and the old master (when it answers) its replica.

    While the old master answers and is a master (a planned switchover): its writes are paused
    (``CLIENT PAUSE WRITE``, so its offset stops moving), the replica must reach its offset within
    ``catch_up_timeout`` (else refused, unless the run is forced): nothing is lost. Then
    ``REPLICAOF NO ONE`` at ``site``, a probe key written (with a short TTL) and read back, and the
    old master re-pointed with ``REPLICAOF`` before its writes resume: they are refused from then
    on (READONLY), so two masters never take writes. An old master that does not answer is left
    alone; one that answers with an error is refused under the safety rule ``promote_fenced``.
    A server already a master at ``site`` succeeds at once (a re-run), re-pointing an old master
    that is still one.
    """

    name = "redis.promote"
    bars_rollback = True  # the old master's data is replaced once it replicates from the new one
    resumable = True  # a re-run finds the replica already master and only re-points the old one
    Params = PromoteParams

    def run(self, params: PromoteParams, ctx: ActionContext) -> ActionResult:
        inst = resolve(ctx.inventory, params.instance)
        inst.check_site(params.site)
        old_site = inst.other_site(params.site, params.old_primary_site, "old primary")
        with connect(inst, params.site, ctx) as client:
            before = state_of(inst, params.site, client)
        old = probe(inst, old_site, ctx)
        output: dict[str, Any] = {
            "instance": inst.name,
            "site": params.site,
            "old_primary_site": old_site,
            "previous_roles": {params.site: before["role"], old_site: old["role"]},
            "before": before,
            "old_primary_before": old,
            "already_primary": before["role"] == "primary",
            "caught_up": None,
            "old_primary_final_offset": None,
            "caught_up_offset": None,
            "promoted_offset": None,
            "heartbeat_at_promotion": None,
            "promoted_at": None,
            "promote_s": None,
            "old_primary_repointed": False,
        }
        if old["role"] == "unknown":
            output["forced"] = ctx.enforce(PROMOTE_FENCED, (
                f"refusing to promote {inst.where(params.site)}: cannot tell whether the old master, "
                f"{inst.where(old_site)}, takes writes ({old['error']}); stop it or fix the access"))
        if ctx.check_mode:
            return ActionResult(output={**output, "check_mode": True})
        if before["role"] == "primary":
            if old["role"] == "primary":
                self._repoint(inst, old_site, params.site, ctx)
                output.update(old_primary_repointed=True, old_primary_after=probe(inst, old_site, ctx))
            return ActionResult(output=output)
        if old["role"] != "primary":
            output.update(self._promote(inst, params.site, ctx))
        else:
            with self._writes_paused(inst, old_site, ctx) as old_client:
                final_offset = replication_info(old_client)["master_repl_offset"]
                caught_up = self._catch_up(inst, params.site, final_offset, params.catch_up_timeout, ctx)
                output.update(caught_up=caught_up, old_primary_final_offset=final_offset,
                              caught_up_offset=final_offset if caught_up else None)
                if not caught_up:
                    output["forced"] = unless_forced(ctx, (
                        f"refusing to promote {inst.where(params.site)}: it did not reach the old master's offset "
                        f"{final_offset} ({inst.where(old_site)}) within catch_up_timeout, so writes would be lost"))
                output.update(self._promote(inst, params.site, ctx))
                self._repoint(inst, old_site, params.site, ctx)
            output.update(old_primary_repointed=True, old_primary_after=probe(inst, old_site, ctx))
        ctx.measure("promotion_s", output["promote_s"], "REPLICAOF NO ONE, then SET and GET of a probe key",
                    {key: output[key] for key in ("promoted_at", "promoted_offset", "heartbeat_at_promotion")})
        return ActionResult(output=output)

    @staticmethod
    @contextmanager
    def _writes_paused(inst: Instance, site: str, ctx: ActionContext) -> Iterator[redis.Redis]:
        """The master at ``site`` holds its clients' writes (for the rest of the step at most: a
        crashed run cannot leave it paused) until the block ends."""
        with connect(inst, site, ctx) as client:
            client.client_pause(max(1, int(ctx.remaining() * 1000)), all=False)
            try:
                yield client
            finally:
                try:
                    client.client_unpause()
                except redis.RedisError:
                    pass  # the pause ends by itself when the step's time is up

    @staticmethod
    def _catch_up(inst: Instance, site: str, target: int, limit: float, ctx: ActionContext) -> bool:
        started = time.monotonic()
        with connect(inst, site, ctx) as client:
            while True:
                info = replication_info(client)
                if info["role"] != "slave":
                    raise ActionError(f"{inst.where(site)} stopped being a replica while catching up")
                if info["slave_repl_offset"] >= target:
                    return True
                what = f"{inst.where(site)} is at offset {info['slave_repl_offset']}, short of {target}"
                if not poll_until_deadline(ctx, what, started, limit):
                    return False

    @staticmethod
    def _promote(inst: Instance, site: str, ctx: ActionContext) -> dict[str, Any]:
        """REPLICAOF NO ONE, then a probe key written and read back: the moment writes are possible."""
        probe_key = f"dr:promote-probe:{ctx.run_id}:{ctx.step_id}"
        with connect(inst, site, ctx) as client:
            info = replication_info(client)
            heartbeat = client.get(inst.heartbeat_key)
            started = time.monotonic()
            client.replicaof("NO", "ONE")
            attempts = 0
            while True:
                attempts += 1
                try:
                    client.set(probe_key, ctx.run_id, px=PROBE_TTL_MS)
                    if client.get(probe_key) == ctx.run_id:
                        break
                except redis.ReadOnlyError:
                    pass
                poll_until_deadline(
                    ctx, f"{inst.where(site)} was told REPLICAOF NO ONE but does not take writes yet", started)
            promote_s = time.monotonic() - started
        return {
            "promoted_offset": info.get("slave_repl_offset", info["master_repl_offset"]),
            "heartbeat_at_promotion": heartbeat,
            "promoted_at": utcnow().isoformat(),
            "promote_s": round(promote_s, 6),
            "write_probe": {"key": probe_key, "attempts": attempts},
        }

    @staticmethod
    def _repoint(inst: Instance, site: str, master_site: str, ctx: ActionContext) -> None:
        try:
            with connect(inst, site, ctx) as client:
                replicate_from(inst, client, master_site, ctx)
        except (RedisUnreachable, RedisRefused) as exc:
            raise ActionError(f"{inst.where(master_site)} is the master now, but the old master could not be made "
                              f"its replica ({exc}): both take writes; stop the old one") from None


def replicate_from(inst: Instance, client: redis.Redis, master_site: str, ctx: ActionContext) -> None:
    """Tell the server of ``client`` to replicate from ``master_site`` (with the instance's password)."""
    if inst.password:
        client.config_set("masterauth", ctx.secret(inst.password))
    client.replicaof(inst.hosts[master_site], inst.ports[master_site])


# ---------------------------------------------------------------- RPO


class RpoParams(InstanceParams):
    site: str = site_field("Site of the promoted server.")
    old_primary_site: str | None = optional_site_field(
        "Site of the replaced master; by default the instance's other site."
    )
    caught_up_offset: int | None = Field(
        default=None,
        ge=0,
        description="Planned switchover: the old master's final offset the replica had reached "
        "('{{ steps.promote.output.caught_up_offset }}'); RPO is 0 when the promoted server was promoted at it.",
    )
    heartbeat_at_promotion: str | None = Field(
        default=None,
        description="The heartbeat the promoted server held when promoted "
        "('{{ steps.promote.output.heartbeat_at_promotion }}'): use it when something may have written the "
        "heartbeat at the promoted site since; by default the heartbeat it holds now.",
    )
    services: list[str] = services_field("instance")


class Rpo(Action[RpoParams]):
    """Measures the RPO achieved after ``redis.promote``, from the promoted server.

    - switchover (``caught_up_offset`` given): 0 when the server was promoted at (or past) that
      offset, read from the server itself (``second_repl_offset`` - 1, kept since its promotion);
    - otherwise: incident time minus the newest heartbeat the promoted server received, i.e. the
      last write of the old master it saw.

    A heartbeat later than the incident means the old master was still writing then (or something
    wrote at the promoted site since): no figure, an ``rpo.not_measured`` event saying why (never a
    negative RPO). The figure is recorded as ``rpo_s`` for each service, with the method and every
    raw input.
    """

    name = "redis.rpo"
    effect = Effect.READ_ONLY
    Params = RpoParams
    idempotent = True

    def run(self, params: RpoParams, ctx: ActionContext) -> ActionResult:
        inst = resolve(ctx.inventory, params.instance)
        inst.check_site(params.site)
        old_site = inst.other_site(params.site, params.old_primary_site, "old primary")
        incident_at = incident_time(ctx)
        with connect(inst, params.site, ctx) as client:
            info = replication_info(client)
            held = client.get(inst.heartbeat_key)
        if info["role"] != "master":
            raise ActionError(f"{inst.where(params.site)} is still a replica: measure RPO after promoting it")
        second = int(info.get("second_repl_offset", -1))
        raw: dict[str, Any] = {
            "instance": inst.name,
            "promoted_site": params.site,
            "old_primary_site": old_site,
            "incident_at": incident_at.isoformat(),
            "master_repl_offset": info["master_repl_offset"],
            "promoted_at_offset": second - 1 if second > 0 else None,
            "heartbeat_held": held,
            "heartbeat_at_promotion": params.heartbeat_at_promotion,
        }
        value, method = self._figure(params, raw, inst, incident_at)
        services = record_rpo(ctx, params.services, value, method, raw)
        return ActionResult(output={"rpo_s": value, "method": method, "services": services, "raw": raw})

    @staticmethod
    def _figure(params: RpoParams, raw: dict[str, Any], inst: Instance,
                incident_at: datetime) -> tuple[float | None, str]:
        """The figure and its method; None and why when it cannot be measured."""
        prefix = ""
        if params.caught_up_offset is not None:
            raw["caught_up_offset"] = params.caught_up_offset
            promoted_at = raw["promoted_at_offset"]
            if promoted_at is not None and promoted_at >= params.caught_up_offset:
                return 0.0, (f"switchover: promoted at offset {promoted_at}, the old master's final offset was "
                             f"{params.caught_up_offset}")
            prefix = "switchover incomplete; "
        given = params.heartbeat_at_promotion is not None
        beat = params.heartbeat_at_promotion if given else raw["heartbeat_held"]
        if beat is None:
            raise ActionError(
                f"{inst.where(params.site)} holds no heartbeat ({inst.heartbeat_key}): RPO cannot be measured "
                "(is the heartbeat written at the primary?)"
            )
        beat_at = parse_time(beat)
        if beat_at is None:
            raise ActionError(f"heartbeat {beat!r} ({inst.heartbeat_key}) is not an ISO-8601 time with a time "
                              "zone: RPO cannot be measured")
        reading = "heartbeat held at promotion (from the promote step)" if given else "heartbeat held now"
        if beat_at > incident_at:
            return None, (
                f"not measured: the {reading} is later than the incident ({beat}, "
                f"{(beat_at - incident_at).total_seconds() * 1000:.0f} ms after the incident at "
                f"{incident_at.isoformat()}): the old master was still writing then, or something wrote the "
                "heartbeat at the promoted site since its promotion; declare the time the old master stopped "
                "(--incident-at), or pass heartbeat_at_promotion"
            )
        return (incident_at - beat_at).total_seconds(), f"{prefix}async: newest replicated heartbeat ({reading})"


# ---------------------------------------------------------------- replicate (failback)


class ReplicateParams(InstanceParams):
    site: str = site_field("Site whose server becomes a replica: its data is replaced by the master's.")
    of_site: str = site_field("Site of the master it replicates from.")


class Replicate(Action[ReplicateParams]):
    """Makes the server at ``site`` a replica of the master at ``of_site`` (``REPLICAOF``) and waits,
    bounded by the step's timeout, until its link is up, the initial sync is done and it has reached
    the master's offset. Its data is replaced (a full sync, unless Redis can resume the stream).
    Refused when ``of_site`` is not a master; a replica already streaming from ``of_site`` only
    waits to be caught up."""

    name = "redis.replicate"
    Params = ReplicateParams

    def run(self, params: ReplicateParams, ctx: ActionContext) -> ActionResult:
        inst = resolve(ctx.inventory, params.instance)
        inst.check_site(params.site)
        inst.check_site(params.of_site)
        if params.site == params.of_site:
            raise ActionError(f"a server cannot replicate from itself: site and of_site are both {params.site}")
        master = probe(inst, params.of_site, ctx)
        with connect(inst, params.site, ctx) as client:
            before = state_of(inst, params.site, client)
            if master["role"] != "primary":
                if before["role"] == "primary" and master["role"] in ("unreachable", "unknown"):
                    raise ActionError(
                        f"refusing to make {inst.where(params.site)}, the only master, a replica of "
                        f"{inst.where(params.of_site)}, which is {shown_role(master)}: its data would be lost"
                    )
                raise ActionError(f"{inst.where(params.of_site)} is not a master: it is {shown_role(master)}")
            already = (before["role"] == "replica" and before["master"] == inst.address(params.of_site)
                       and before["master_link_status"] == "up")
            output: dict[str, Any] = {"instance": inst.name, "site": params.site, "of_site": params.of_site,
                                      "already_replica": already, "before": before}
            if ctx.check_mode:
                return ActionResult(output={**output, "check_mode": True})
            started = time.monotonic()
            if not already:
                replicate_from(inst, client, params.of_site, ctx)
            target = self._wait_linked(inst, params, client, ctx, started)
            output["master_offset"] = target
            output["after"] = state_of(inst, params.site, client)
        output["waited_s"] = round(time.monotonic() - started, 6)
        return ActionResult(output=output)

    @staticmethod
    def _wait_linked(inst: Instance, params: ReplicateParams, client: redis.Redis, ctx: ActionContext,
                     started: float) -> int:
        """Waits until the link is up and synced, then until the replica reaches the master's offset
        read at that moment; returns that offset."""
        master_address = inst.address(params.of_site)
        while True:
            info = replication_info(client)
            linked = (info["role"] == "slave" and f"{info['master_host']}:{info['master_port']}" == master_address
                      and info["master_link_status"] == "up" and not info.get("master_sync_in_progress"))
            if linked:
                break
            poll_until_deadline(ctx, f"{inst.where(params.site)} is not streaming from {master_address} yet "
                                f"(link {info.get('master_link_status', 'none')})", started)
        with connect(inst, params.of_site, ctx) as master:
            target = int(replication_info(master)["master_repl_offset"])
        while (offset := replication_info(client)["slave_repl_offset"]) < target:
            poll_until_deadline(
                ctx, f"{inst.where(params.site)} is at offset {offset}, short of the master's {target}", started)
        return target
