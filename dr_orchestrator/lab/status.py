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
        replication = postgres.replication_rows(config) if databases["primary"].get("role") == "primary" else []
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
        "databases": databases,
        "replication": replication,
        "front_door": front_door,
    }
    report["problems"] = problems(report)
    report["healthy"] = report["up"] and not report["problems"]
    return report


def problems(report: dict[str, Any]) -> list[str]:
    """What differs from a freshly started lab, one sentence each."""
    found = [f"{p['name']}@{p['site']} is not running" if p["site"] else f"{p['name']} is not running"
             for p in report["processes"] if not p["running"]]
    for service, sites in report["services"].items():
        if sites["primary"].get("status") != 200:
            found.append(f"{service}@primary is not ready ({_describe(sites['primary'])})")
        if sites["backup"].get("status") is None:
            found.append(f"{service}@backup does not answer ({_describe(sites['backup'])})")
    if report["databases"]["primary"].get("role") != "primary":
        found.append(f"the primary site's database is {report['databases']['primary'].get('role')}")
    if report["databases"]["backup"].get("role") != "standby":
        found.append(f"the backup site's database is {report['databases']['backup'].get('role')}, not a standby")
    if not any(row.get("state") == "streaming" for row in report["replication"]):
        found.append("the standby is not streaming from the primary")
    elif report["sync"] and not any(row.get("sync_state") == "sync" for row in report["replication"]):
        found.append("the lab runs with --sync but the standby is not synchronous")
    for service, door in report["front_door"].items():
        if door["servers"].get("primary") != "UP":
            found.append(f"the front door does not see {service}@primary UP ({door['servers'] or 'no answer'})")
    return found


def _describe(health: dict[str, Any]) -> str:
    if health.get("status") is None:
        return health.get("error") or "no answer"
    return f"HTTP {health['status']}, db {health.get('db_role')}"
