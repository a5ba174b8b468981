"""The load generator and its ground-truth report: the computation on synthetic ledgers, the generator
against a small fake front door (real HTTP, real process, real SQLite), and the whole against the lab."""

from __future__ import annotations

import contextlib
import json
import os
import random
import signal
import socket
import sqlite3
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import psycopg
import pytest
from click.testing import CliRunner, Result
from support.lab import set_read_only
from support.waiting import wait_for

from dr_orchestrator.lab import haproxy
from dr_orchestrator.lab.config import FRONTEND_PORTS, SERVICES, LabConfig
from dr_orchestrator.lab.lab import Lab
from dr_orchestrator.lab.load import LoadError, ledger_path, load_report, load_running, start_load, stop_load
from dr_orchestrator.lab.load import report as report_module
from dr_orchestrator.lab.load.analysis import missing_writes, outage_windows, summarise_service
from dr_orchestrator.lab.load.cli import load_group
from dr_orchestrator.lab.load.database import SiteDatabase
from dr_orchestrator.lab.load.ledger import (
    LedgerEntry,
    RunInfo,
    insert_entries,
    latest_run,
    open_ledger,
    record_run_start,
    run_entries,
)
from dr_orchestrator.lab.load.report import checked_database, serving_database

# --- synthetic ledgers ----------------------------------------------------------------------------


def stamp(t: float) -> str:
    return f"2026-11-28T10:00:{t:09.6f}+00:00"


def entry(
    t: float,
    outcome: str = "ok",
    site: str | None = "primary",
    key: str = "k",
    service: str = "trading",
    took: float = 0.01,
) -> LedgerEntry:
    """A request answered ``t`` seconds after 10:00:00 UTC, sent ``took`` seconds earlier."""
    status = 201 if outcome == "ok" else None
    return LedgerEntry(
        "run1", service, "place_order", key, stamp(t - took), stamp(t), t - took, t, outcome, status, site
    )


def test_an_outage_runs_from_the_last_success_to_the_first_success_after_it() -> None:
    entries = [
        entry(1.0),
        entry(1.5),
        entry(2.0, "http 503", site="primary"),
        entry(2.5, "error: ConnectError", site=None),
        entry(3.25, site="backup"),
        entry(4.0, site="backup"),
    ]

    [window] = outage_windows(entries)

    assert window.start == "2026-11-28T10:00:01.500000+00:00"
    assert window.end == "2026-11-28T10:00:03.250000+00:00"
    assert window.duration_s == pytest.approx(1.75)
    assert (window.site_before, window.site_after) == ("primary", "backup")
    assert window.failed_requests == 2
    assert window.first_failure_at == "2026-11-28T10:00:02.000000+00:00"
    assert window.last_failure_at == "2026-11-28T10:00:02.500000+00:00"
    assert not window.ongoing


def test_separate_runs_of_failures_are_separate_outages_and_success_only_has_none() -> None:
    entries = [
        entry(1.0),
        entry(2.0, "http 503"),
        entry(3.0),
        entry(4.0),
        entry(5.0, "http 502"),
        entry(5.5, "http 502"),
        entry(6.0),
    ]

    windows = outage_windows(entries)

    assert [(w.duration_s, w.failed_requests) for w in windows] == [(pytest.approx(2.0), 1), (pytest.approx(2.0), 2)]
    assert outage_windows([entry(1.0), entry(2.0)]) == []
    assert outage_windows([]) == []


def test_a_request_in_flight_when_the_service_recovered_does_not_open_a_new_outage() -> None:
    sent_order = [
        entry(1.0),
        entry(2.0, "http 503"),
        entry(3.2, "error: ReadTimeout", site=None, took=1.0),  # sent at 2.2 to the dead site, answered late
        entry(2.5, site="backup"),
        entry(3.0, site="backup"),
    ]

    [window] = outage_windows(sorted(sent_order, key=lambda e: e.sent_mono))

    assert (window.end, window.failed_requests, window.last_failure_at) == (stamp(2.5), 2, stamp(3.2))


def test_an_outage_without_a_success_before_has_no_start_and_one_still_failing_has_no_end() -> None:
    [leading] = outage_windows([entry(1.0, "http 503"), entry(2.0)])
    [trailing] = outage_windows([entry(1.0), entry(2.0, "http 503"), entry(3.0, "error: ReadTimeout")])

    assert leading.start is None and leading.end is not None and leading.duration_s is None
    assert trailing.start is not None and trailing.end is None and trailing.duration_s is None
    assert trailing.ongoing and trailing.failed_requests == 2 and trailing.site_after is None


def test_missing_writes_are_the_acknowledged_keys_absent_from_the_database_with_their_time_window() -> None:
    acknowledged = [entry(float(i), key=f"run1-{i}") for i in range(1, 7)]

    lost = missing_writes(acknowledged, present_keys={"run1-1", "run1-2", "run1-4", "run1-6"}, site="backup")

    assert lost.checked_site == "backup"
    assert lost.acknowledged == 6
    assert lost.keys == ("run1-3", "run1-5") and lost.count == 2
    assert lost.first_acked_at == "2026-11-28T10:00:03.000000+00:00"
    assert lost.last_acked_at == "2026-11-28T10:00:05.000000+00:00"
    nothing_lost = missing_writes(acknowledged, {e.key for e in acknowledged}, "primary")
    assert nothing_lost.count == 0 and nothing_lost.first_acked_at is None


def test_a_service_summary_counts_outcomes_sites_and_acknowledged_writes() -> None:
    entries = [
        entry(1.0),
        entry(2.0, "http 503"),
        entry(3.0, "http 503"),
        entry(4.0, "error: ConnectError", site=None),
        entry(5.0, site="backup"),
    ]

    summary = summarise_service("trading", entries, writes=True)
    reads = summarise_service("quotation", entries, writes=False)

    assert (summary.requests, summary.ok, summary.failed) == (5, 2, 3)
    assert summary.failures_by_outcome == {"http 503": 2, "error: ConnectError": 1}
    assert summary.answers_by_site == {"primary": 3, "backup": 1}
    assert summary.acknowledged_writes == 2 and reads.acknowledged_writes is None
    assert len(summary.outage_windows) == 1


def test_the_serving_database_is_the_read_write_one_and_a_split_brain_is_reported() -> None:
    primary_rw = SiteDatabase("primary", "host=a", reachable=True, read_write=True)
    backup_rw = SiteDatabase("backup", "host=b", reachable=True, read_write=True)
    backup_ro = SiteDatabase("backup", "host=b", reachable=True, read_write=False)
    primary_gone = SiteDatabase("primary", "host=a", reachable=False, read_write=False, error="refused")
    served_by_backup = [entry(1.0, site="primary"), entry(2.0, site="backup"), entry(3.0, "http 503", site="primary")]

    assert serving_database([primary_rw, backup_ro], []) == (primary_rw, None)
    chosen, note = serving_database([primary_rw, backup_rw], served_by_backup)
    assert chosen == backup_rw and note is not None and "split brain" in note and "checked backup" in note
    nobody, why = serving_database([primary_gone, backup_ro], served_by_backup)
    assert nobody is None and why is not None and "primary: unreachable, backup: read-only" in why


def test_each_services_writes_are_checked_where_it_wrote_last_and_elsewhere_only_when_that_site_is_down() -> None:
    primary_rw = SiteDatabase("primary", "host=a", reachable=True, read_write=True)
    backup_rw = SiteDatabase("backup", "host=b", reachable=True, read_write=True)
    backup_gone = SiteDatabase("backup", "host=b", reachable=False, read_write=False, error="refused")
    by_backup = [entry(1.0, site="primary"), entry(2.0, site="backup")]

    assert checked_database([primary_rw, backup_rw], by_backup, primary_rw) == backup_rw
    assert checked_database([primary_rw, backup_gone], by_backup, primary_rw) == primary_rw
    assert checked_database([primary_rw, backup_gone], [], None) is None


def test_a_trading_write_acknowledged_by_the_backup_is_looked_for_there_not_counted_missing(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """After failover-trading: trading's primary set read-only and its promoted standby serving; contract-
    signing untouched, on a database of its own. Each service's writes are checked in its own database."""
    config = LabConfig(root=tmp_path / "lab")
    ledger_path(config.root).parent.mkdir(parents=True)
    signed = entry(1.0, site="primary", key="contract-1", service="contract-signing")
    placed = entry(2.0, site="backup", key="order-1", service="trading")
    with open_ledger(ledger_path(config.root)) as connection:
        record_run_start(connection, RunInfo("run1", 1, stamp(0.0), None, 1.0, 1.0))
        insert_entries(connection, [signed, placed])
    databases = {
        "trading": [SiteDatabase("primary", "trading@primary", reachable=True, read_write=False),
                    SiteDatabase("backup", "trading@backup", reachable=True, read_write=True)],
        "contract-signing": [SiteDatabase("primary", "contract-signing@primary", reachable=True, read_write=True),
                             SiteDatabase("backup", "contract-signing@backup", reachable=True, read_write=False)],
    }
    # Where each key is: contract-1 at contract-signing's primary (its standby lags), order-1 at trading's
    # promoted standby and not at its fenced primary (as if lost there).
    rows = {"contract-signing@primary": {"contract-1"}, "trading@backup": {"order-1"}}
    monkeypatch.setattr(report_module, "site_databases", lambda _, service: databases[service])
    monkeypatch.setattr(report_module, "present_keys",
                        lambda database, table, column, keys: rows.get(database.conninfo, set()) & set(keys))

    report = report_module.build_report(config)

    assert report["databases"] == {
        "trading": {"serving_site": "backup", "note": None, "sites": {
            "primary": {"reachable": True, "read_write": False, "error": None},
            "backup": {"reachable": True, "read_write": True, "error": None}}},
        "contract-signing": {"serving_site": "primary", "note": None, "sites": {
            "primary": {"reachable": True, "read_write": True, "error": None},
            "backup": {"reachable": True, "read_write": False, "error": None}}},
    }
    trading, signing = (report["services"][s]["missing_writes"] for s in ("trading", "contract-signing"))
    assert (trading["checked_site"], trading["acknowledged"], trading["count"]) == ("backup", 1, 0)
    assert (signing["checked_site"], signing["acknowledged"], signing["count"]) == ("primary", 1, 0)
    assert report["services"]["quotation"]["missing_writes"] is None  # it only reads


# --- the generator against a fake front door ------------------------------------------------------


class FakeFrontDoor:
    """The three services' HTTP API on the lab's front-door ports; can be switched down and to another site."""

    def __init__(self, port_offset: int) -> None:
        self.site = "primary"
        self.down = False
        self.acknowledged: dict[str, set[str]] = {service: set() for service in SERVICES}
        self._lock = threading.Lock()
        self._servers = [self._serve(service, FRONTEND_PORTS[service] + port_offset) for service in SERVICES]

    def _serve(self, service: str, port: int) -> ThreadingHTTPServer:
        door = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"
            disable_nagle_algorithm = True

            def log_message(self, format: str, *args: object) -> None:
                pass

            def do_POST(self) -> None:
                body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
                key = body.get("client_order_id") or body.get("contract_id")
                if door.down:
                    self._answer(503, {"error": "database is read-only"})
                    return
                with door._lock:
                    door.acknowledged[service].add(key)
                self._answer(201, body)

            def do_GET(self) -> None:
                symbol = self.path.rsplit("/", 1)[-1]
                self._answer(503, {}) if door.down else self._answer(200, {"symbol": symbol, "bid": 1.0, "ask": 1.1})

            def _answer(self, status: int, body: dict[str, object]) -> None:
                data = json.dumps(body).encode()
                self.send_response(status)
                self.send_header("X-DR-Site", door.site)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

        server = ThreadingHTTPServer(("127.0.0.1", port), Handler)
        server.daemon_threads = True
        threading.Thread(target=server.serve_forever, daemon=True).start()
        return server

    def close(self) -> None:
        for server in self._servers:
            server.shutdown()
            server.server_close()


def _ports_free(offset: int) -> bool:
    for port in [FRONTEND_PORTS[s] + offset for s in SERVICES]:
        with socket.socket() as probe:
            try:
                probe.bind(("127.0.0.1", port))
            except OSError:
                return False
    return True


@pytest.fixture
def fake_lab(tmp_path: Path) -> Iterator[tuple[LabConfig, FakeFrontDoor]]:
    """A lab config whose front door is a fake; its databases do not exist (nothing listens there)."""
    for _ in range(50):
        # Labs take offsets that are multiples of 1000; stay clear of them and below the ephemeral ports.
        offset = random.randrange(1, 14) * 1000 + random.randrange(100, 900)
        if _ports_free(offset):
            break
    else:
        pytest.fail("found no free front-door ports")
    config = LabConfig(root=tmp_path / "lab", port_offset=offset)
    door = FakeFrontDoor(offset)
    try:
        yield config, door
    finally:
        stop_load(config)
        door.close()


def ledger(config: LabConfig) -> list[LedgerEntry]:
    with open_ledger(ledger_path(config.root)) as connection:
        run = latest_run(connection)
        return run_entries(connection, run.run_id) if run else []


def every_service_saw(config: LabConfig, condition: Callable[[LedgerEntry], bool], after: float = 0.0) -> bool:
    seen = {e.service for e in ledger(config) if e.answered_mono > after and condition(e)}
    return seen == set(SERVICES)


def test_the_generator_records_every_request_and_the_report_shows_the_outage_it_saw(
    fake_lab: tuple[LabConfig, FakeFrontDoor],
) -> None:
    config, door = fake_lab
    pid = start_load(config, rate=20)
    assert load_running(config) == pid

    wait_for(lambda: every_service_saw(config, lambda e: e.ok and e.site == "primary"), 10, "successes at primary")
    door.down = True
    down_at = time.monotonic()
    wait_for(lambda: every_service_saw(config, lambda e: not e.ok, after=down_at), 10, "failures in the outage")
    time.sleep(0.3)  # let the outage last a few requests
    door.site, door.down = "backup", False
    up_at = time.monotonic()
    wait_for(lambda: every_service_saw(config, lambda e: e.ok and e.site == "backup"), 10, "successes at backup")
    assert stop_load(config) == pid

    assert load_running(config) is None
    report = load_report(config)
    assert report["run"]["running"] is False and report["run"]["stopped_at"] is not None
    assert set(report["databases"]) == {"trading", "contract-signing"}  # the writing services, each its own
    for database in report["databases"].values():
        assert database["serving_site"] is None and "No site's database is read-write" in database["note"]
        assert [site["reachable"] for site in database["sites"].values()] == [False, False]
    entries = ledger(config)
    for service in SERVICES:
        summary = report["services"][service]
        [window] = summary["outage_windows"]
        assert (window["site_before"], window["site_after"]) == ("primary", "backup")
        assert window["failed_requests"] >= 2
        assert up_at - down_at - 0.2 <= window["duration_s"] <= up_at - down_at + 0.5
        assert summary["ok"] + summary["failed"] == summary["requests"] == sum(e.service == service for e in entries)
        sent = sorted(e.sent_mono for e in entries if e.service == service)
        assert (len(sent) - 1) / (sent[-1] - sent[0]) == pytest.approx(20, rel=0.2)  # the configured rate
    for service in ("trading", "contract-signing"):
        acked_in_ledger = {e.key for e in entries if e.service == service and e.ok}
        assert acked_in_ledger == door.acknowledged[service]
        assert report["services"][service]["acknowledged_writes"] == len(acked_in_ledger)
        assert report["services"][service]["missing_writes"] is None  # no database to check


@pytest.mark.slow
def test_the_ledger_survives_the_generator_being_killed(fake_lab: tuple[LabConfig, FakeFrontDoor]) -> None:
    config, door = fake_lab
    pid = start_load(config, rate=20)
    wait_for(lambda: len(ledger(config)) >= 60, 10, "60 requests in the ledger")

    os.kill(pid, signal.SIGKILL)
    wait_for(lambda: load_running(config) is None, 5, "the killed generator to be gone")

    with sqlite3.connect(ledger_path(config.root)) as connection:
        assert connection.execute("PRAGMA integrity_check").fetchone() == ("ok",)
    entries = ledger(config)
    for service in ("trading", "contract-signing"):
        in_ledger = {e.key for e in entries if e.service == service and e.ok}
        assert in_ledger <= door.acknowledged[service]
        # Only the last uncommitted batch (100 ms, ~2 requests per service at 20/s) may be lost.
        assert len(door.acknowledged[service] - in_ledger) <= 6
    assert stop_load(config) is None
    assert start_load(config) != pid  # a new run starts after the crash
    assert stop_load(config) is not None
    with open_ledger(ledger_path(config.root)) as connection:
        assert connection.execute("SELECT count(*) FROM runs").fetchone() == (2,)


def test_a_second_start_is_refused_and_stop_is_idempotent(fake_lab: tuple[LabConfig, FakeFrontDoor]) -> None:
    config, _ = fake_lab
    assert stop_load(config) is None
    pid = start_load(config)

    with pytest.raises(LoadError, match=f"already running \\(pid {pid}\\)"):
        start_load(config)
    assert stop_load(config) == pid
    assert stop_load(config) is None


def test_a_report_without_a_ledger_says_to_start_the_load(tmp_path: Path) -> None:
    with pytest.raises(LoadError, match="start the load first"):
        load_report(LabConfig(root=tmp_path))


# --- the commands ------------------------------------------------------------------------------------


def run_load_command(config: LabConfig, *args: str) -> Result:
    env = {"DR_LAB_DIR": str(config.root), "DR_LAB_PORT_OFFSET": str(config.port_offset)}
    return CliRunner().invoke(load_group, list(args), env=env)


def test_the_load_commands_start_stop_and_report_as_json(fake_lab: tuple[LabConfig, FakeFrontDoor]) -> None:
    config, door = fake_lab
    config.root.mkdir(parents=True)
    config.marker.touch()  # what `dr lab up` leaves in a lab directory

    started = run_load_command(config, "start", "--rate", "10")
    assert started.exit_code == 0, started.output
    assert "10 requests/s per service" in started.output
    refused = run_load_command(config, "start")
    assert refused.exit_code == 2 and "already running" in refused.output
    wait_for(lambda: every_service_saw(config, lambda e: e.ok), 10, "a success per service")
    stopped = run_load_command(config, "stop")
    assert stopped.exit_code == 0 and "stopped" in stopped.output
    report = run_load_command(config, "report", "--output", "json")
    text = run_load_command(config, "report")

    assert report.exit_code == 0, report.output
    data = json.loads(report.output)
    assert data["run"]["rate"] == 10 and data["run"]["running"] is False
    assert set(data["services"]) == set(SERVICES)
    assert data["services"]["trading"]["acknowledged_writes"] == len(door.acknowledged["trading"]) > 0
    assert text.exit_code == 0 and "trading" in text.output and data["run"]["run_id"] in text.output
    assert run_load_command(config, "stop").output.strip() == "No load generator was running."


def test_the_load_commands_explain_a_missing_lab_or_ledger_in_one_sentence(tmp_path: Path) -> None:
    config = LabConfig(root=tmp_path / "nolab")

    started = run_load_command(config, "start")
    reported = run_load_command(config, "report")

    assert started.exit_code == 2 and "There is no lab at" in started.output and "Traceback" not in started.output
    assert reported.exit_code == 2 and "No load ledger at" in reported.output


# --- against the real lab ---------------------------------------------------------------------------


WRITES = {"trading": ("orders", "client_order_id"), "contract-signing": ("contracts", "contract_id")}


def acked_ledger_keys(config: LabConfig, service: str) -> list[LedgerEntry]:
    return [e for e in ledger(config) if e.service == service and e.ok]


def run_load_until_acked(config: LabConfig, writes_per_service: int) -> dict[str, Any]:
    """Run the generator until each write service has that many acknowledged writes; return the report."""
    start_load(config)
    try:
        for service in ("trading", "contract-signing"):
            wait_for(
                lambda s=service: len(acked_ledger_keys(config, s)) >= writes_per_service,  # type: ignore[misc]
                30,
                f"{writes_per_service} acknowledged writes to {service}",
            )
    finally:
        stop_load(config)
    return load_report(config)


def rows_of_run(config: LabConfig, site: str, service: str, run_id: str) -> set[str]:
    """The run's rows in `service`'s own database at `site`."""
    table, column = WRITES[service]
    query = f"SELECT {column} FROM {table} WHERE {column} LIKE %s"
    with psycopg.connect(config.dsn(site, service)) as connection:
        return {row[0] for row in connection.execute(query, (f"{run_id}-%",))}


@pytest.mark.lab
def test_the_ledger_counts_match_the_database_rows(lab: Lab) -> None:
    config = lab.config

    report = run_load_until_acked(config, writes_per_service=40)

    run_id = report["run"]["run_id"]
    assert {service: (database["serving_site"], database["note"]) for service, database in
            report["databases"].items()} == {"trading": ("primary", None), "contract-signing": ("primary", None)}
    for summary in report["services"].values():
        assert summary["failed"] == 0 and summary["outage_windows"] == [], summary["failures_by_outcome"]
        assert summary["answers_by_site"] == {"primary": summary["requests"]}
    for service in WRITES:
        acked = {e.key for e in acked_ledger_keys(config, service)}
        # A clean stop leaves no request in flight: the run's rows are exactly its acknowledged writes,
        # in its own database and not in the other service's.
        assert rows_of_run(config, "primary", service, run_id) == acked
        other = next(name for name in WRITES if name != service)
        with psycopg.connect(config.dsn("primary", other)) as connection:
            assert connection.execute("SELECT to_regclass(%s)", (WRITES[service][0],)).fetchone() == (None,)
        assert report["services"][service]["acknowledged_writes"] == len(acked) >= 40
        assert report["services"][service]["missing_writes"]["count"] == 0


@pytest.mark.lab
def test_the_report_names_acknowledged_writes_missing_from_the_serving_database(lab: Lab) -> None:
    config = lab.config
    run_load_until_acked(config, writes_per_service=10)
    acked = acked_ledger_keys(config, "trading")
    lost = [acked[2], acked[5], acked[7]]
    with psycopg.connect(config.dsn("primary", "trading")) as connection:  # as if the failover had lost them
        connection.execute("DELETE FROM orders WHERE client_order_id = ANY(%s)", ([e.key for e in lost],))

    report = load_report(config)

    missing = report["services"]["trading"]["missing_writes"]
    assert missing["checked_site"] == "primary" and missing["acknowledged"] == len(acked)
    assert missing["keys"] == [e.key for e in lost] and missing["count"] == 3
    assert (missing["first_acked_at"], missing["last_acked_at"]) == (lost[0].answered_at, lost[-1].answered_at)
    assert report["services"]["contract-signing"]["missing_writes"]["count"] == 0


def backup_serves_steadily(config: LabConfig, services: Sequence[str], answers: int = 10) -> bool:
    entries = ledger(config)
    latest = [[e for e in entries if e.service == service][-answers:] for service in services]
    return all(len(last) == answers and all(e.ok and e.site == "backup" for e in last) for last in latest)


@pytest.mark.lab
@pytest.mark.slow
def test_after_a_failover_the_report_shows_the_outage_and_checks_the_promoted_backup(
    lab_factory: Callable[..., contextlib.AbstractContextManager[Lab]],
) -> None:
    with lab_factory() as lab:
        config = lab.config
        start_load(config)
        try:
            wait_for(lambda: every_service_saw(config, lambda e: e.ok), 10, "a success per service")
            lab.kill_site("primary")
            killed_at = time.monotonic()
            wait_for(lambda: every_service_saw(config, lambda e: not e.ok, after=killed_at), 10, "failures")
            during = load_report(config)
            for service in WRITES:
                with psycopg.connect(config.dsn("backup", service), autocommit=True) as connection:
                    connection.execute("SELECT pg_promote(wait => true)")
            for service in SERVICES:  # what a runbook's haproxy step does (quotation reads from its replica)
                haproxy.command(config, f"set server {service}/primary state maint")
                haproxy.command(config, f"set server {service}/backup state ready")
            wait_for(lambda: backup_serves_steadily(config, SERVICES), 20, "the backup serving steadily")
        finally:
            stop_load(config)
        report = load_report(config)
        run_id = report["run"]["run_id"]
        acked = {service: acked_ledger_keys(config, service) for service in WRITES}
        at_backup = {service: rows_of_run(config, "backup", service, run_id) for service in WRITES}

    for service in WRITES:
        database = during["databases"][service]
        assert database["serving_site"] is None and "primary: unreachable, backup: read-only" in database["note"]
        assert database["sites"]["primary"]["reachable"] is False
    for service in SERVICES:
        # Killing a site's processes takes a few milliseconds, so a blip can come before the real outage.
        ongoing = during["services"][service]["outage_windows"][-1]
        assert ongoing["ongoing"] and ongoing["site_before"] == "primary" and ongoing["end"] is None
        *blips, window = report["services"][service]["outage_windows"]
        assert (window["site_before"], window["site_after"]) == ("primary", "backup")
        assert window["start"] == ongoing["start"] and window["duration_s"] > 0
        assert all(blip["site_after"] == "primary" for blip in blips)
    for service in WRITES:
        assert (report["databases"][service]["serving_site"], report["databases"][service]["note"]) == ("backup", None)
        # Asynchronous replication may lose a few acknowledged writes; the report must name exactly those.
        lost = [e for e in acked[service] if e.key not in at_backup[service]]
        missing = report["services"][service]["missing_writes"]
        assert missing["checked_site"] == "backup" and missing["acknowledged"] == len(acked[service])
        assert missing["keys"] == [e.key for e in lost]
        assert missing["first_acked_at"] == (lost[0].answered_at if lost else None)
    # Trading's commits waited for its standby: nothing it acknowledged is lost (its RPO target is 0).
    assert report["services"]["trading"]["missing_writes"]["count"] == 0


@pytest.mark.lab
@pytest.mark.slow
def test_after_trading_alone_fails_over_each_services_writes_are_checked_in_its_own_database(
    lab_factory: Callable[..., contextlib.AbstractContextManager[Lab]],
) -> None:
    """What failover-trading.yml does: fence trading's primary, promote its standby, switch its front door.
    Contract-signing and quotation stay at the primary site on their own stores, writing throughout."""
    with lab_factory() as lab:
        config = lab.config
        start_load(config)
        try:
            wait_for(lambda: every_service_saw(config, lambda e: e.ok), 10, "a success per service")
            set_read_only(config, "primary", "trading", True)
            with psycopg.connect(config.dsn("backup", "trading"), autocommit=True) as connection:
                connection.execute("SELECT pg_promote(wait => true)")
            haproxy.command(config, "set server trading/primary state maint")
            haproxy.command(config, "set server trading/backup state ready")
            wait_for(lambda: backup_serves_steadily(config, ("trading",)), 20, "trading served steadily by the backup")
        finally:
            stop_load(config)
        report = load_report(config)
        run_id = report["run"]["run_id"]
        acked = {service: {e.key for e in acked_ledger_keys(config, service)} for service in WRITES}
        orders_at_backup = rows_of_run(config, "backup", "trading", run_id)
        contracts_at_primary = rows_of_run(config, "primary", "contract-signing", run_id)

    # Both of trading's copies are primaries by pg_is_in_recovery(), but the fenced one takes no writes:
    # no split brain, and contract-signing's database was never in question.
    assert report["databases"]["trading"]["serving_site"] == "backup"
    assert report["databases"]["contract-signing"]["serving_site"] == "primary"
    assert [database["note"] for database in report["databases"].values()] == [None, None]
    for service in ("contract-signing", "quotation"):
        summary = report["services"][service]
        assert summary["failed"] == 0 and summary["outage_windows"] == [], summary["failures_by_outcome"]
        assert summary["answers_by_site"] == {"primary": summary["requests"]}
    trading, signing = (report["services"][service]["missing_writes"] for service in WRITES)
    assert (trading["checked_site"], trading["acknowledged"], trading["count"]) == ("backup", len(acked["trading"]), 0)
    assert acked["trading"] <= orders_at_backup  # synchronous: every acknowledged order reached the standby
    assert (signing["checked_site"], signing["acknowledged"], signing["count"]) == (
        "primary", len(acked["contract-signing"]), 0)
    assert contracts_at_primary == acked["contract-signing"]
    assert report["services"]["trading"]["answers_by_site"].get("backup", 0) >= 10


@pytest.mark.lab
def test_taking_the_lab_down_stops_the_load_generator(
    lab_factory: Callable[..., contextlib.AbstractContextManager[Lab]],
) -> None:
    with lab_factory() as lab:
        pid = start_load(lab.config)
        lab.down()

        assert not Path(f"/proc/{pid}").exists() or Path(f"/proc/{pid}/stat").read_text().split()[2] == "Z"
        assert load_running(lab.config) is None
