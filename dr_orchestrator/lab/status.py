"""The lab's state at a glance: processes, service health, each service's store and its replication, front door."""

from __future__ import annotations

import json
import urllib.error
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from typing import Any

from dr_orchestrator.lab import haproxy, postgres, redis
from dr_orchestrator.lab.config import (
    POSTGRES_SERVICES,
    REDIS_SERVICE,
    SERVICES,
    SITES,
    SYNCHRONOUS_SERVICES,
    LabConfig,
    store_name,
)
from dr_orchestrator.lab.processes import ProcessSpec, running_pid


def service_health(url: str, timeout: float = 1.0) -> dict[str, Any]:
    """GET url/health: {"status": code, **body}, or {"status": None, "error": ...} when nothing answers."""
    try:
        with urllib.request.urlopen(url + "/health", timeout=timeout) as response:
            return {"status": response.status, **json.loads(response.read() or b"{}")}
    except urllib.error.HTTPError as exc:
        try:
            return {"status": exc.code, **json.loads(exc.read() or b"{}")}
        except ValueError:
            return {"status": exc.code}
    except (OSError, ValueError) as exc:
        return {"status": None, "error": str(getattr(exc, "reason", exc))}


def store_status(config: LabConfig, service: str) -> dict[str, Any]:
    """`service`'s store at each site, where it takes writes (None: nowhere, or split brain), and its replication."""
    if service == REDIS_SERVICE:
        sites = {site: redis.cache_state(config, site) for site in SITES}
    else:
        sites = {site: postgres.database_state(config, site, service) for site in SITES}
    writable = [site for site in SITES if sites[site].get("writable")]
    active = writable[0] if len(writable) == 1 else None
    status: dict[str, Any] = {"kind": "redis" if service == REDIS_SERVICE else "postgres",
                              "store": store_name(service), "synchronous": service in SYNCHRONOUS_SERVICES,
                              "active_site": active, "sites": sites}
    if service in POSTGRES_SERVICES:
        # With writes stopped everywhere (a switchover's fence), the one primary still feeds the standby.
        primaries = [site for site in SITES if sites[site].get("role") == "primary"]
        feeding = active or (primaries[0] if len(primaries) == 1 else None)
        status["replication"] = postgres.replication_rows(config, service, feeding) if feeding else []
    return status


def collect_status(config: LabConfig, specs: list[ProcessSpec], state: dict[str, Any]) -> dict[str, Any]:
    processes = [{"name": spec.name, "site": spec.site, "pid": running_pid(spec)} for spec in specs]
    for entry in processes:
        entry["running"] = entry["pid"] is not None
    targets = [(service, site) for site in SITES for service in SERVICES]
    with ThreadPoolExecutor(max_workers=len(targets) + len(SERVICES)) as pool:
        health = dict(zip(targets, pool.map(lambda t: service_health(config.service_url(*t)), targets), strict=True))
        stores = dict(zip(SERVICES, pool.map(lambda service: store_status(config, service), SERVICES), strict=True))
    services = {
        service: {site: {"url": config.service_url(service, site), **health[(service, site)]} for site in SITES}
        for service in SERVICES
    }
    try:
        servers = haproxy.server_states(config)
    except OSError:
        servers = {}
    front_door = {
        service: {"url": config.frontend_url(service), "servers": servers.get(service, {})} for service in SERVICES
    }
    report = {
        "root": str(config.root),
        "port_offset": config.port_offset,
        "up": bool(state) and any(entry["running"] for entry in processes),
        "started_at": state.get("started_at"),
        "processes": processes,
        "services": services,
        "stores": stores,
        "front_door": front_door,
    }
    report["problems"] = problems(report)
    report["healthy"] = report["up"] and not report["problems"]
    return report


def problems(report: dict[str, Any]) -> list[str]:
    """What is wrong with the lab now, one sentence each; after a failover the backup site may lead."""
    found = [f"{p['name']}@{p['site']} is not running" if p["site"] else f"{p['name']} is not running"
             for p in report["processes"] if not p["running"]]
    for service, store in report["stores"].items():
        found += _store_problems(service, store)
    stopped = {(p["name"], p["site"]) for p in report["processes"] if not p["running"]}
    for service, sites in report["services"].items():
        active = report["stores"][service]["active_site"]
        for site, health in sites.items():
            if (service, site) in stopped:
                continue  # already said
            if site == active and health.get("status") != 200:
                found.append(f"{service}@{site} is not ready ({_describe(health)})")
            elif health.get("status") is None:
                found.append(f"{service}@{site} does not answer ({_describe(health)})")
    for service, door in report["front_door"].items():
        active = report["stores"][service]["active_site"]
        # "UP 1/2": up, one failed check on its way down; still serving.
        up = [server for server, state in door["servers"].items() if state.startswith("UP")]
        if not up:
            found.append(f"the front door has no server UP for {service} ({door['servers'] or 'no answer'})")
        elif active and active not in up:
            found.append(f"the front door sends {service} to {', '.join(up)}, not to {active} where its store "
                         f"takes writes")
    return found


def _store_problems(service: str, store: dict[str, Any]) -> list[str]:
    """Split brain is two copies of one service's store taking writes; a fenced (read-only) primary is not."""
    name, sites, active = store["store"], store["sites"], store["active_site"]
    writable = [site for site, copy in sites.items() if copy.get("writable")]
    if len(writable) > 1:
        return [f"{name} takes writes at {' and '.join(writable)} (split brain)"]
    if not writable:
        read_only = [site for site, copy in sites.items() if copy.get("role") == "primary"]
        return [f"{name} takes writes nowhere" + "".join(f" ({site}: a primary set read-only)" for site in read_only)]
    if store["kind"] == "redis":
        linked = [site for site, copy in sites.items() if copy.get("role") == "replica" and copy.get("link") == "up"]
        return [] if linked else [f"no replica of {name} is linked to the {active} site"]
    rows = store["replication"]
    if not any(row.get("state") == "streaming" for row in rows):
        return [f"no standby of {name} is streaming from the {active} site"]
    if store["synchronous"] and not any(row.get("sync_state") == "sync" for row in rows):
        return [f"{name}'s standby is not synchronous (its RPO target of 0 needs it)"]
    return []


def _describe(health: dict[str, Any]) -> str:
    if health.get("status") is None:
        return health.get("error") or "no answer"
    return f"HTTP {health['status']}, db {health.get('db_role')}"
