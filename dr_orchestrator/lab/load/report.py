"""The ground-truth report of the latest load run: per service, outages seen and acknowledged writes lost."""

from __future__ import annotations

from dataclasses import asdict
from typing import Any

from dr_orchestrator.lab.config import LabConfig
from dr_orchestrator.lab.load.analysis import MissingWrites, ServiceSummary, missing_writes, summarise_service
from dr_orchestrator.lab.load.database import SiteDatabase, present_keys, site_databases
from dr_orchestrator.lab.load.defaults import LoadError
from dr_orchestrator.lab.load.ledger import LedgerEntry, latest_run, ledger_path, open_ledger, run_entries, utc_now
from dr_orchestrator.lab.load.process import running_pid
from dr_orchestrator.lab.load.workload import WORKLOADS


def build_report(config: LabConfig) -> dict[str, Any]:
    path = ledger_path(config.root)
    if not path.exists():
        raise LoadError(f"No load ledger at {path}; start the load first with `dr lab load start`.")
    with open_ledger(path) as connection:
        run = latest_run(connection)
        if run is None:
            raise LoadError(f"The load ledger {path} holds no run yet; start one with `dr lab load start`.")
        entries = run_entries(connection, run.run_id)
    services: dict[str, Any] = {}
    stores: dict[str, Any] = {}
    for name, workload in WORKLOADS.items():
        service_entries = [entry for entry in entries if entry.service == name]
        summary = summarise_service(name, service_entries, workload.is_write)
        lost: MissingWrites | None = None
        if workload.is_write and workload.table and workload.key_column:
            # Each writing service keeps its own database: its writes are checked there, nowhere else.
            databases = site_databases(config, name)
            serving, note = serving_database(databases, service_entries)
            acknowledged = [entry for entry in service_entries if entry.ok]
            checked = checked_database(databases, acknowledged, serving)
            if checked is not None:
                present = present_keys(checked, workload.table, workload.key_column,
                                       [entry.key for entry in acknowledged])
                lost = missing_writes(acknowledged, present, checked.site)
            stores[name] = {
                "sites": {db.site: {"reachable": db.reachable, "read_write": db.read_write, "error": db.error}
                          for db in databases},
                "serving_site": serving.site if serving else None,
                "note": note,
            }
        services[name] = _service_json(summary, lost)
    return {
        "ledger": str(path),
        "generated_at": utc_now(),
        "run": asdict(run) | {"running": running_pid(config.root) == run.pid},
        "databases": stores,
        "services": services,
    }


def serving_database(
    databases: list[SiteDatabase], entries: list[LedgerEntry]
) -> tuple[SiteDatabase | None, str | None]:
    """The database to check acknowledged writes against, and a note for the reader when it is not clear-cut."""
    read_write = [db for db in databases if db.read_write]
    if len(read_write) == 1:
        return read_write[0], None
    if not read_write:
        states = ", ".join(f"{db.site}: {'read-only' if db.reachable else 'unreachable'}" for db in databases)
        return None, f"No site's database is read-write ({states}); missing writes cannot be checked."
    # Split brain: check the site the front door served last, and say so.
    last_site = next((entry.site for entry in reversed(entries) if entry.ok and entry.site), None)
    chosen = next((db for db in read_write if db.site == last_site), read_write[0])
    sites = " and ".join(db.site for db in read_write)
    return chosen, f"Both sites' databases are read-write ({sites}: split brain); checked {chosen.site}, last served."


def checked_database(
    databases: list[SiteDatabase], acknowledged: list[LedgerEntry], serving: SiteDatabase | None
) -> SiteDatabase | None:
    """Where one service's acknowledged writes are looked for: the database of the site that acknowledged
    its latest write (the ledger's X-DR-Site), where the service reads them back now, even while another
    site's database takes writes (a service left on a read-only primary; either side of a split brain).
    When that site's database does not answer, the serving database: what survives is what it holds."""
    last_site = next((entry.site for entry in reversed(acknowledged) if entry.site), None)
    return next((db for db in databases if db.site == last_site and db.reachable), serving)


def _service_json(summary: ServiceSummary, lost: MissingWrites | None) -> dict[str, Any]:
    result = asdict(summary)
    result["operations"] = list(summary.operations)
    result["outage_windows"] = [asdict(window) | {"ongoing": window.ongoing} for window in summary.outage_windows]
    result["missing_writes"] = None if lost is None else asdict(lost) | {"count": lost.count, "keys": list(lost.keys)}
    return result
