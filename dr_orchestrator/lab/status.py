"""The lab's state at a glance: processes, service health, databases, replication, front door."""

from __future__ import annotations

import json
import urllib.error
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from typing import Any

from dr_orchestrator.lab import haproxy, postgres
from dr_orchestrator.lab.config import SERVICES, SITES, LabConfig
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


def collect_status(config: LabConfig, specs: list[ProcessSpec], state: dict[str, Any]) -> dict[str, Any]:
    processes = [{"name": spec.name, "site": spec.site, "pid": running_pid(spec)} for spec in specs]
    for entry in processes:
        entry["running"] = entry["pid"] is not None
    targets = [(service, site) for site in SITES for service in SERVICES]
    with ThreadPoolExecutor(max_workers=len(targets) + 2) as pool:
        health = dict(zip(targets, pool.map(lambda t: service_health(config.service_url(*t)), targets), strict=True))
        databases = dict(zip(SITES, pool.map(lambda site: postgres.database_state(config, site), SITES), strict=True))
        writable = [site for site in SITES if databases[site].get("writable")]
        primaries = [site for site in SITES if databases[site].get("role") == "primary"]
        active = writable[0] if len(writable) == 1 else None
        # With writes stopped everywhere (a switchover's fence), the one primary still feeds the standby.
        feeding = active or (primaries[0] if len(primaries) == 1 else None)
        replication = postgres.replication_rows(config, feeding) if feeding else []
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
        "sync": bool(state.get("sync")),
        "started_at": state.get("started_at"),
        "processes": processes,
        "services": services,
        "active_site": active,  # where the database takes writes (None: nowhere, or split brain)
        "databases": databases,
        "replication": replication,
        "front_door": front_door,
    }
    report["problems"] = problems(report)
    report["healthy"] = report["up"] and not report["problems"]
    return report


def problems(report: dict[str, Any]) -> list[str]:
    """What is wrong with the lab now, one sentence each; after a failover the backup site may lead."""
    found = [f"{p['name']}@{p['site']} is not running" if p["site"] else f"{p['name']} is not running"
             for p in report["processes"] if not p["running"]]
    active = report["active_site"]
    # Split brain is two databases taking writes; a primary set read-only (fenced) is not one of them.
    writable = [site for site, database in report["databases"].items() if database.get("writable")]
    read_only = [site for site, database in report["databases"].items()
                 if database.get("role") == "primary" and not database.get("writable")]
    if len(writable) > 1:
        found.append(f"the databases at {' and '.join(writable)} both take writes (split brain)")
    elif not writable:
        found.append("no site's database takes writes" + "".join(
            f" ({site}: a primary set read-only)" for site in read_only))
    elif not any(row.get("state") == "streaming" for row in report["replication"]):
        found.append(f"no standby is streaming from the {active} site")
    elif report["sync"] and not any(row.get("sync_state") == "sync" for row in report["replication"]):
        found.append("the lab runs with --sync but the standby is not synchronous")
    stopped = {(p["name"], p["site"]) for p in report["processes"] if not p["running"]}
    for service, sites in report["services"].items():
        for site, health in sites.items():
            if (service, site) in stopped:
                continue  # already said
            if site == active and health.get("status") != 200:
                found.append(f"{service}@{site} is not ready ({_describe(health)})")
            elif health.get("status") is None:
                found.append(f"{service}@{site} does not answer ({_describe(health)})")
    for service, door in report["front_door"].items():
        # "UP 1/2": up, one failed check on its way down; still serving.
        up = [server for server, state in door["servers"].items() if state.startswith("UP")]
        if not up:
            found.append(f"the front door has no server UP for {service} ({door['servers'] or 'no answer'})")
        elif active and active not in up:
            found.append(f"the front door sends {service} to {', '.join(up)}, not to {active} where the database "
                         f"is read-write")
    return found


def _describe(health: dict[str, Any]) -> str:
    if health.get("status") is None:
        return health.get("error") or "no answer"
    return f"HTTP {health['status']}, db {health.get('db_role')}"
