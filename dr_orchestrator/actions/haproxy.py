"""HAProxy front door, switched through its runtime API (the admin socket), never by a reload.

The inventory says where the socket is and which server of each backend stands for which site::

    dr.vars.front_door:
      admin_socket: /run/haproxy/admin.sock
      backends:
        trading: {backend: trading, servers: {primary: primary, backup: backup}}

Runtime changes are lost when HAProxy reloads unless it keeps a server-state file: the runbooks
verify the state they need (``haproxy.state``) rather than assume it.
"""

from __future__ import annotations

import socket
import time
from dataclasses import dataclass
from typing import Any

from pydantic import Field

from dr_orchestrator.actions.base import Action, ActionContext, ActionError, ActionResult, Params
from dr_orchestrator.model.events import utcnow
from dr_orchestrator.model.inventory import Inventory
from dr_orchestrator.model.runbook import Effect

SOCKET_TIMEOUT_S = 2.0
# srv_admin_state bits (HAProxy's SRV_ADMF_MAINT and _DRAIN): forced, inherited and resolver
# maintenance; forced and inherited drain. 0x04 (`disabled` in the configuration) only records where
# a forced maintenance came from: `set server ... state ready` leaves it set and the server serves.
MAINT_BITS = 0x01 | 0x02 | 0x20
DRAIN_BITS = 0x08 | 0x10
OPERATIONAL = {"0": "down", "1": "starting", "2": "up", "3": "stopping"}
# srv_check_result: the newest health check's outcome (a server stays up until `fall` checks failed).
CHECK_RESULTS = {"0": "unknown", "1": "neutral", "2": "failed", "3": "passed", "4": "passed"}


@dataclass(frozen=True)
class Backend:
    name: str  # as the inventory names it (usually the service)
    haproxy_name: str
    servers: dict[str, str]  # site -> HAProxy server name


@dataclass(frozen=True)
class FrontDoor:
    admin_socket: str
    backends: dict[str, Backend]

    def backend(self, name: str) -> Backend:
        if name not in self.backends:
            raise ActionError(
                f"backend {name!r} is not in the front door's backends: {', '.join(sorted(self.backends))}"
            )
        return self.backends[name]


def front_door(inventory: Inventory) -> FrontDoor:
    spec = inventory.vars.get("front_door")
    if not isinstance(spec, dict) or not spec.get("admin_socket"):
        raise ActionError(f"inventory {inventory.name!r} has no front door with an admin_socket (dr.vars.front_door)")
    backends = {}
    for name, entry in dict(spec.get("backends") or {}).items():
        entry = entry or {}
        servers = {str(site): str(server) for site, server in dict(entry.get("servers") or {}).items()}
        backends[str(name)] = Backend(str(name), str(entry.get("backend") or name), servers)
    return FrontDoor(str(spec["admin_socket"]), backends)


def runtime_api(path: str, line: str, timeout: float) -> str:
    """One line of commands (``;``-separated) over the admin socket; HAProxy's answer."""
    try:
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
            sock.settimeout(timeout)
            sock.connect(path)
            sock.sendall(line.encode() + b"\n")
            chunks = []
            while chunk := sock.recv(65536):
                chunks.append(chunk)
    except TimeoutError:
        raise ActionError(f"HAProxy's admin socket {path} did not answer within {timeout:.1f}s") from None
    except OSError as exc:
        raise ActionError(f"HAProxy's admin socket {path}: {exc.strerror or exc}") from None
    return b"".join(chunks).decode(errors="replace")


def servers_state(path: str, backend: Backend, timeout: float) -> dict[str, dict[str, Any]]:
    """Per HAProxy server of ``backend``: admin (ready, maint, drain), operational state, weight."""
    answer = runtime_api(path, f"show servers state {backend.haproxy_name}", timeout)
    columns: list[str] = []
    states: dict[str, dict[str, Any]] = {}
    for line in answer.splitlines():
        if line.startswith("# "):
            columns = line[2:].split()
        elif columns and line.strip() and not line.strip().isdigit():
            row = dict(zip(columns, line.split(), strict=False))
            admin = int(row.get("srv_admin_state", "0"))
            states[row["srv_name"]] = {
                "admin": "maint" if admin & MAINT_BITS else "drain" if admin & DRAIN_BITS else "ready",
                "operational": OPERATIONAL.get(row.get("srv_op_state", ""), row.get("srv_op_state")),
                "weight": int(row.get("srv_uweight", "0")),
                "last_check": CHECK_RESULTS.get(row.get("srv_check_result", ""), "unknown"),
            }
    if not states:
        raise ActionError(f"HAProxy knows no servers of backend {backend.haproxy_name!r}: {answer.strip()[:200]}")
    return states


def active_sites(backend: Backend, states: dict[str, dict[str, Any]]) -> list[str]:
    """Sites whose server takes traffic: not in maintenance or drain, and up."""
    return [
        site
        for site, server in backend.servers.items()
        if states.get(server, {}).get("admin") == "ready" and states[server]["operational"] == "up"
    ]


class BackendsParams(Params):
    backends: list[str] = Field(
        default_factory=list,
        description="Front-door backends (names under dr.vars.front_door.backends); by default the step's service.",
        json_schema_extra={"refers_to": "backend"},
    )

    def chosen(self, ctx: ActionContext, door: FrontDoor, every_by_default: bool = False) -> list[Backend]:
        if self.backends:
            return [door.backend(name) for name in self.backends]
        if ctx.service is not None:
            return [door.backend(ctx.service)]
        if every_by_default:
            return list(door.backends.values())
        raise ActionError("say which backends (the step has no service to default to)")


class SetActiveParams(BackendsParams):
    site: str = Field(
        description="Site whose server takes all the traffic; the other sites' servers go to maintenance.",
        json_schema_extra={"refers_to": "site"},
    )
    only_if_serving: str | None = Field(
        default=None,
        description="A URL of the site's own service (not through the front door) that must answer 2xx first, "
        "else nothing is switched: a rollback then never sends traffic back to a site that cannot serve it.",
    )


SERVING_WINDOW_S = 3.0  # how long a site's service gets to answer well before a switch to it is refused
SERVING_PROBE_TIMEOUT_S = 2.0


def require_serving(url: str, site: str, ctx: ActionContext) -> None:
    """ActionError unless ``url`` answers 2xx within the window (one slow answer is not a refusal)."""
    import httpx  # only switches that ask for it pay for the import

    deadline = time.monotonic() + min(SERVING_WINDOW_S, ctx.remaining())
    seen = "no answer"
    with httpx.Client(timeout=SERVING_PROBE_TIMEOUT_S) as client:
        while True:
            ctx.check_cancelled()
            started = utcnow()
            began = time.monotonic()
            try:
                status = client.get(url).status_code
            except httpx.HTTPError as exc:
                seen = f"{type(exc).__name__}: {exc}" if str(exc) else type(exc).__name__
                ok = False
            else:
                seen, ok = f"HTTP {status}", 200 <= status < 300
            ctx.probe(url, ok, started, (time.monotonic() - began) * 1000, seen)
            if ok:
                return
            if time.monotonic() + 0.1 >= deadline:
                raise ActionError(f"not switching to {site}: its service does not serve ({url}: {seen}); "
                                  f"traffic stays where it is")
            ctx.sleep(0.1)


class SetActive(Action[SetActiveParams]):
    """Sends each backend's traffic to one site: its server ``ready``, the others ``maint``, in one
    runtime-API exchange, then verified with ``show servers state``. Before and after states are in
    the output, with ``previous_site``: the site that was active before (when the backends agreed).

    The inverse, as a rollback, is the same action with the previous site::

        rollback: {action: haproxy.set_active, with: {site: primary, backends: [trading]}}

    A server leaving maintenance counts as up at once, before any health check: check the site's
    service directly (``http.check``) before switching to it.
    """

    name = "haproxy.set_active"
    effect = Effect.REVERSIBLE
    Params = SetActiveParams
    idempotent = True

    def run(self, params: SetActiveParams, ctx: ActionContext) -> ActionResult:
        door = front_door(ctx.inventory)
        backends = params.chosen(ctx, door)
        if params.only_if_serving is not None:
            require_serving(params.only_if_serving, params.site, ctx)
        for backend in backends:
            if params.site not in backend.servers:
                raise ActionError(
                    f"backend {backend.name!r} has no server for site {params.site!r}; it has: "
                    f"{', '.join(backend.servers)}"
                )
        timeout = max(0.001, min(SOCKET_TIMEOUT_S, ctx.remaining()))
        before = {b.name: servers_state(door.admin_socket, b, timeout) for b in backends}
        commands = []
        for backend in backends:
            for site, server in backend.servers.items():
                if server not in before[backend.name]:
                    raise ActionError(f"HAProxy backend {backend.haproxy_name!r} has no server {server!r}")
                if site != params.site:
                    commands.append(f"set server {backend.haproxy_name}/{server} state maint")
            commands.append(f"set server {backend.haproxy_name}/{backend.servers[params.site]} state ready")
        previous = {b.name: next(iter(active_sites(b, before[b.name])), None) for b in backends}
        output: dict[str, Any] = {
            "site": params.site,
            "previous_sites": previous,
            "previous_site": next(iter(set(previous.values()))) if len(set(previous.values())) == 1 else None,
            "before": before,
        }
        if ctx.check_mode:
            return ActionResult(output={**output, "check_mode": True, "would_send": commands})

        started, switched_at = time.monotonic(), utcnow()
        answer = runtime_api(door.admin_socket, "; ".join(commands), timeout).strip()
        if answer:
            raise ActionError(f"HAProxy refused the switch to {params.site}: {answer[:300]}")
        switch_s = time.monotonic() - started
        after = {b.name: servers_state(door.admin_socket, b, timeout) for b in backends}
        for backend in backends:
            for site, server in backend.servers.items():
                wanted = "ready" if site == params.site else "maint"
                found = after[backend.name][server]["admin"]
                if found != wanted:
                    raise ActionError(
                        f"after the switch, backend {backend.haproxy_name!r} server {server!r} is {found}, not {wanted}"
                    )
            target = after[backend.name][backend.servers[params.site]]
            if target["operational"] != "up":
                raise ActionError(
                    f"backend {backend.haproxy_name!r}: server {backend.servers[params.site]!r} is ready but "
                    f"{target['operational']} (HAProxy's health checks fail): no traffic would be served"
                )
        output.update(after=after, switched_at=switched_at.isoformat(), switch_s=round(switch_s, 6))
        return ActionResult(output=output)


class StateParams(BackendsParams):
    expect_site: str | None = Field(
        default=None,
        description="Fail unless exactly this site's server takes each backend's traffic.",
        json_schema_extra={"refers_to": "site"},
    )
    require_sites: list[str] = Field(
        default_factory=list,
        description="Fail unless each backend has a server for each of these sites, known to HAProxy: the "
        "readiness check before a switch to (or back to) them.",
        json_schema_extra={"refers_to": "site"},
    )


class State(Action[StateParams]):
    """Reads the servers' states of the backends (all of them by default, when the step has no
    service); with ``expect_site``, a check that the traffic goes there and only there."""

    name = "haproxy.state"
    effect = Effect.READ_ONLY
    Params = StateParams
    idempotent = True

    def run(self, params: StateParams, ctx: ActionContext) -> ActionResult:
        door = front_door(ctx.inventory)
        timeout = max(0.001, min(SOCKET_TIMEOUT_S, ctx.remaining()))
        report: dict[str, Any] = {}
        wrong, missing = [], []
        for backend in params.chosen(ctx, door, every_by_default=True):
            states = servers_state(door.admin_socket, backend, timeout)
            for site in params.require_sites:
                if site not in backend.servers:
                    missing.append(f"backend {backend.name} has no server for site {site} in the inventory "
                                   f"(it has: {', '.join(backend.servers)})")
                elif backend.servers[site] not in states:
                    missing.append(f"HAProxy's backend {backend.haproxy_name} has no server "
                                   f"{backend.servers[site]!r} (site {site})")
            active = active_sites(backend, states)
            report[backend.name] = {"servers": states, "active_sites": active}
            if params.expect_site is not None and active != [params.expect_site]:
                wrong.append(f"{backend.name} goes to {', '.join(active) or 'no site'}")
        if missing:
            raise ActionError(f"the front door cannot switch as required: {'; '.join(missing)}")
        if wrong:
            raise ActionError(f"the front door does not send traffic to {params.expect_site} only: {'; '.join(wrong)}")
        return ActionResult(output={"backends": report})
