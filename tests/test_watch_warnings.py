"""Early warnings (dr_orchestrator.watch.warnings): each kind from synthetic readings and evidence, none
on a healthy lab reading, what the resident watch records (audit events, /metrics), `dr watch
warnings` and its exit codes, and against the real lab."""

from __future__ import annotations

import json
import socket
import ssl
import threading
from collections.abc import Iterator
from dataclasses import replace
from datetime import UTC, datetime, timedelta
from pathlib import Path

import paramiko
import pytest
from api_support import INVENTORY, RUNBOOKS, prepared, record_run, token
from click.testing import CliRunner
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID
from fastapi.testclient import TestClient
from sqlalchemy.orm import Session, sessionmaker

from dr_orchestrator.api.app import ApiSettings, create_app
from dr_orchestrator.cli.watch import watch
from dr_orchestrator.evidence.database import session_factory_for
from dr_orchestrator.evidence.models import DrillRun
from dr_orchestrator.lab.lab import Lab
from dr_orchestrator.loading import load_inventory
from dr_orchestrator.model.inventory import Inventory
from dr_orchestrator.watch.observers import Health, Probed, Prober, Readings, StandbyLink, StoreState
from dr_orchestrator.watch.warnings import (
    Certificate,
    DrillSchedule,
    EarlyWarning,
    EarlyWarnings,
    Facts,
    active_warnings,
    certificate_expiry,
    drill_schedules,
    gather_facts,
    recorded_warnings,
    unknown_hosts,
)

REPO = Path(__file__).resolve().parent.parent
LAB_INVENTORY = REPO / "inventories" / "lab.yml"
NOW = datetime(2026, 12, 7, 4, 0, tzinfo=UTC)
SERVICES = ("trading", "contract-signing", "quotation")


def lab_inventory() -> Inventory:
    return load_inventory(str(LAB_INVENTORY))[0]


def probed(value: object, error: str | None = None) -> Probed[object]:
    return Probed(NOW, 0.002, value, error)


def healthy_readings() -> Readings:
    """The lab as it should be: primary serving, each standby streaming, trading's synchronous."""
    readings = Readings()
    links = {"trading": StandbyLink("backup", "streaming", "sync", 0.001, 0),
             "contract-signing": StandbyLink("backup", "streaming", "async", 0.2, 120),
             "quotation": StandbyLink("127.0.0.1:16379", "online", lag_s=0.0, behind_bytes=0)}
    for service in SERVICES:
        kind = "cache" if service == "quotation" else "database"
        readings.front[service] = probed(Health(200, "primary", "read-write", None))
        readings.direct[(service, "primary")] = probed(Health(200, "primary", "read-write", None))
        readings.direct[(service, "backup")] = probed(Health(503, "backup", "read-only", "standby"))
        readings.stores[(service, "primary")] = probed(StoreState(kind, "primary", True, standbys=(links[service],)))
        readings.stores[(service, "backup")] = probed(StoreState(kind, "standby", False, "primary", "streaming"))
        readings.servers[service] = probed({"primary": {"admin": "ready", "operational": "up"},
                                            "backup": {"admin": "maint", "operational": "down"}})
    return readings


def recently_tested() -> Facts:
    return Facts(tested={service: NOW - timedelta(days=10) for service in SERVICES})


def with_standby(readings: Readings, service: str, link: StandbyLink) -> Readings:
    primary = readings.stores[(service, "primary")]
    assert primary.value is not None
    readings.stores[(service, "primary")] = probed(replace(primary.value, standbys=(link,)))
    return readings


def kinds(found: list[EarlyWarning]) -> list[tuple[str, str]]:
    return [(w.kind, w.target) for w in found]


# --- each kind, from synthetic readings and facts ------------------------------------------------


def test_a_healthy_lab_reading_warns_of_nothing() -> None:
    assert active_warnings(lab_inventory(), healthy_readings(), recently_tested(), NOW) == []


def test_a_standby_behind_its_services_rpo_target_is_a_warning_saying_by_how_much() -> None:
    behind = StandbyLink("backup", "streaming", "async", 7.2, 9000)
    readings = with_standby(healthy_readings(), "contract-signing", behind)
    (warning,) = active_warnings(lab_inventory(), readings, recently_tested(), NOW)
    assert (warning.kind, warning.target, warning.severity) == ("rpo-at-risk", "service:contract-signing", "critical")
    assert warning.message == ("a failover now would miss contract-signing's RPO target: its standby backup is "
                               "7.2 s behind (target 5 s)")
    assert warning.data["behind_bytes"] == 9000


def test_a_replica_silent_longer_than_its_rpo_target_is_a_warning() -> None:
    readings = with_standby(healthy_readings(), "quotation", StandbyLink("127.0.0.1:16379", "online", lag_s=75.0))
    (warning,) = active_warnings(lab_inventory(), readings, recently_tested(), NOW)
    assert warning.kind == "rpo-at-risk" and "has not acknowledged for 75.0 s (target 60 s)" in warning.message


def test_an_rpo_zero_service_whose_standby_is_not_synchronous_is_a_warning_even_without_lag() -> None:
    readings = with_standby(healthy_readings(), "trading", StandbyLink("backup", "streaming", "async", None, 0))
    (warning,) = active_warnings(lab_inventory(), readings, recently_tested(), NOW)
    assert kinds([warning]) == [("rpo-at-risk", "service:trading")]
    assert "not synchronous (backup async; target RPO 0 s)" in warning.message
    # a synchronous standby's flush lag loses nothing: a commit waits for it
    readings = with_standby(healthy_readings(), "trading", StandbyLink("backup", "streaming", "sync", 3.0, 0))
    assert active_warnings(lab_inventory(), readings, recently_tested(), NOW) == []
    # a server that hides its standbys' state (no pg_read_all_stats) says nothing rather than something false
    readings = with_standby(healthy_readings(), "trading", StandbyLink("backup", None))
    assert active_warnings(lab_inventory(), readings, recently_tested(), NOW) == []


@pytest.mark.parametrize(("store", "error", "says"), [
    (StoreState("database", "standby", False, "primary", "stopping"), None, "is not streaming (link stopping)"),
    (None, "connection refused", "does not answer (connection refused)"),
    (StoreState("database", "primary", True), None, "is a primary too, not a standby"),
])
def test_a_standby_not_streaming_is_a_warning(store: StoreState | None, error: str | None, says: str) -> None:
    readings = healthy_readings()
    readings.stores[("trading", "backup")] = probed(store, error)
    (warning,) = active_warnings(lab_inventory(), readings, recently_tested(), NOW)
    assert (warning.kind, warning.target) == ("standby-not-streaming", "service:trading")
    assert warning.message.startswith("a failover of trading to backup now would lose every write")
    assert says in warning.message


def test_a_backup_site_where_every_probe_fails_is_one_warning_not_one_per_store() -> None:
    readings = healthy_readings()
    for service in SERVICES:
        readings.direct[(service, "backup")] = probed(None, "connection refused")
        readings.stores[(service, "backup")] = probed(None, "timeout after 1.0s")
    (warning,) = active_warnings(lab_inventory(), readings, recently_tested(), NOW)
    assert (warning.kind, warning.target) == ("site-unreachable", "site:backup")
    assert warning.message == ("a failover to backup now would fail: every probe of the site fails "
                               "(connection refused; timeout after 1.0s)")
    # one store of the site answering: the site is reachable, that standby is the trouble
    readings.stores[("quotation", "backup")] = probed(StoreState("cache", "replica", False, "primary", "up"))
    assert {w.kind for w in active_warnings(lab_inventory(), readings, recently_tested(), NOW)} == {
        "standby-not-streaming"}


def test_the_serving_site_failing_is_an_outage_not_an_early_warning() -> None:
    readings = healthy_readings()
    for key in list(readings.direct) + list(readings.stores):
        if key[1] == "primary":
            table = readings.direct if key in readings.direct else readings.stores
            table[key] = probed(None, "connection refused")  # type: ignore[index]
    assert active_warnings(lab_inventory(), readings, recently_tested(), NOW) == []


def test_a_certificate_within_30_days_is_a_warning_and_an_expired_one_critical() -> None:
    facts = recently_tested()
    facts.certificates = [
        Certificate("https://trading.example.com/health", "trading", NOW + timedelta(days=12, hours=1)),
        Certificate("https://quotes.example.com/health", "quotation", NOW - timedelta(days=1)),
        Certificate("https://contracts.example.com/health", "contract-signing", NOW + timedelta(days=90))]
    found = active_warnings(lab_inventory(), healthy_readings(), facts, NOW)
    assert [(w.target, w.severity) for w in found] == [("service:quotation", "critical"),
                                                       ("service:trading", "warning")]
    assert found[1].message == ("the TLS certificate of https://trading.example.com/health (trading's health URL) "
                                "expires in 12 days (2026-12-19)")
    assert "expired on 2026-12-06" in found[0].message


def test_a_drill_past_its_period_and_grace_and_a_service_untested_for_92_days_are_warnings() -> None:
    facts = recently_tested()
    assert facts.tested is not None
    facts.tested["quotation"] = None
    facts.drills = [DrillSchedule("weekly-switchover", timedelta(days=7), NOW - timedelta(days=9)),
                    DrillSchedule("in-its-grace", timedelta(days=7), NOW - timedelta(days=7, hours=12)),
                    DrillSchedule("never-run", timedelta(days=7), None)]
    found = active_warnings(lab_inventory(), healthy_readings(), facts, NOW)
    assert kinds(found) == [("drill-overdue", "drill:weekly-switchover"), ("drill-overdue", "service:quotation")]
    assert found[0].message == ("drill weekly-switchover is overdue: its newest finished run was on 2026-11-28 "
                                "(9 days ago) and its schedule runs it every 7 days")
    assert found[1].message == "quotation has had no DR test (drill or failover) in the last 92 days"


# --- gathering facts: certificates, known_hosts, drills -------------------------------------------


@pytest.fixture
def tls_server(tmp_path: Path) -> Iterator[tuple[int, datetime]]:
    """A TLS server on loopback presenting a self-signed certificate that expires in 20 days."""
    not_after = datetime.now(UTC).replace(microsecond=0) + timedelta(days=20)
    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "127.0.0.1")])
    certificate = (x509.CertificateBuilder().subject_name(name).issuer_name(name).public_key(key.public_key())
                   .serial_number(x509.random_serial_number()).not_valid_before(not_after - timedelta(days=90))
                   .not_valid_after(not_after).sign(key, hashes.SHA256()))
    (tmp_path / "cert.pem").write_bytes(certificate.public_bytes(serialization.Encoding.PEM))
    (tmp_path / "key.pem").write_bytes(key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                                         serialization.NoEncryption()))
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.load_cert_chain(tmp_path / "cert.pem", tmp_path / "key.pem")
    listener = socket.create_server(("127.0.0.1", 0))
    listener.settimeout(0.2)
    stop = threading.Event()

    def serve() -> None:
        while not stop.is_set():
            try:
                connection, _ = listener.accept()
            except TimeoutError:
                continue
            try:
                with context.wrap_socket(connection, server_side=True):
                    pass
            except (OSError, ssl.SSLError):
                connection.close()

    thread = threading.Thread(target=serve, daemon=True)
    thread.start()
    try:
        yield listener.getsockname()[1], not_after
    finally:
        stop.set()
        thread.join(5)
        listener.close()


def test_the_certificate_of_an_https_health_url_is_read_from_the_server(tls_server: tuple[int, datetime],
                                                                         tmp_path: Path) -> None:
    port, not_after = tls_server
    assert certificate_expiry("127.0.0.1", port, 2.0) == not_after
    text = LAB_INVENTORY.read_text().replace("http://127.0.0.1:18101/health", f"https://127.0.0.1:{port}/health")
    (tmp_path / "inventory.yml").write_text(text)
    facts = gather_facts(load_inventory(str(tmp_path / "inventory.yml"))[0], str(tmp_path / "inventory.yml"), None,
                         drills_dir=None, now=NOW)
    assert [(c.service, c.url, c.not_after) for c in facts.certificates] == [
        ("trading", f"https://127.0.0.1:{port}/health", not_after)]


def test_a_host_missing_from_its_known_hosts_file_is_a_warning(tmp_path: Path) -> None:
    known_hosts = tmp_path / "known_hosts"
    key = paramiko.ECDSAKey.generate()
    known_hosts.write_text(f"[127.0.10.1]:2222 {key.get_name()} {key.get_base64()}\n")
    text = LAB_INVENTORY.read_text().replace("/tmp/dr-lab/ssh/known_hosts", str(known_hosts))
    (tmp_path / "inventory.yml").write_text(text)
    inventory = load_inventory(str(tmp_path / "inventory.yml"))[0]
    facts = recently_tested()
    facts.unknown_hosts = unknown_hosts(inventory)
    (warning,) = active_warnings(inventory, healthy_readings(), facts, NOW)
    assert (warning.kind, warning.target) == ("host-key-unknown", "host:backup-app")
    assert warning.message == ("an SSH step on host backup-app ([127.0.20.1]:2222) would refuse to connect: it is "
                               f"not in known_hosts file {known_hosts}")
    known_hosts.unlink()
    assert {u.host: u.why for u in unknown_hosts(inventory)} == {
        host: f"its known_hosts file {known_hosts} does not exist or cannot be read"
        for host in ("backup-app", "primary-app")}


def test_a_scheduled_drill_of_the_inventory_is_judged_by_its_newest_finished_run(
        tmp_path: Path, sqlite_sessions: sessionmaker[Session]) -> None:
    drills = tmp_path / "drills"
    drills.mkdir()
    (drills / "weekly.yml").write_text(
        f"name: weekly-restore\nscenario: planned_maintenance\ninventory: {INVENTORY}\nfault: none\n"
        f"runbook: {{path: {RUNBOOKS / 'restore-trading.yml'}}}\nschedule: {{cron: '0 2 * * 1'}}\n")
    now = datetime.now(UTC)
    with sqlite_sessions() as session, session.begin():
        for days, state in ((9, "finished"), (2, "aborted")):  # an aborted run is no drill done
            session.add(DrillRun(
                id=f"drill-{days}", drill_name="weekly-restore", scenario="planned_maintenance", trigger="schedule",
                state=state, verdict="passed", started_by="scheduler", orchestrator_host="test",
                started_at=now - timedelta(days=days, minutes=5), finished_at=now - timedelta(days=days),
                drill_path=str(drills / "weekly.yml"), drill_sha256="0" * 64, drill_text="", inventory_path="",
                cleanup_left=[]))
    with sqlite_sessions() as session:
        (schedule,) = drill_schedules(session, str(drills), str(INVENTORY), now)
        assert drill_schedules(session, str(drills), str(LAB_INVENTORY), now) == []  # another inventory's drill
    assert schedule.name == "weekly-restore" and schedule.period == timedelta(days=7)
    assert schedule.last_finished is not None and abs(schedule.last_finished - (now - timedelta(days=9))) < \
        timedelta(seconds=1)
    found = active_warnings(lab_inventory(), None, Facts(drills=[schedule]), now)
    assert kinds(found) == [("drill-overdue", "drill:weekly-restore")]


# --- the resident watch's warnings: recorded, /metrics, cleared ------------------------------------


def test_the_watch_records_a_warning_held_twice_shows_it_in_metrics_and_clears_it_after_three_clean_rounds(
        database_url: str, tmp_path: Path) -> None:
    url = prepared(database_url)
    sessions = session_factory_for(url)
    told: list[tuple[str, bool]] = []
    early = EarlyWarnings(lab_inventory(), str(LAB_INVENTORY), sessions, "dr watch", drills_dir=None,
                          changed=lambda warning, raised: told.append((warning.target, raised)))
    early.facts, early.facts_at = recently_tested(), float("inf")  # no certificates nor known_hosts to read
    lagging = with_standby(healthy_readings(), "contract-signing", StandbyLink("backup", "streaming", "async", 9.0))
    assert early.evaluate(lagging, NOW) == ([], [])  # once is not yet a warning (a probe may time out once)
    raised, _ = early.evaluate(lagging, NOW + timedelta(seconds=1))
    assert kinds(raised) == [("rpo-at-risk", "service:contract-signing")] and raised[0].since == NOW
    with sessions() as session:
        assert kinds(recorded_warnings(session)) == kinds(raised)
    scraper = token(url, "prometheus", "compliance")
    with TestClient(create_app(ApiSettings(database_url=url, drills_dir=str(tmp_path)))) as client:
        metrics = client.get("/metrics", headers={"Authorization": f"Bearer {scraper}"}).text
        assert ('dr_watch_warning{kind="rpo-at-risk",severity="critical",target="service:contract-signing"} 1.0'
                in metrics.splitlines())
        page = client.get("/dashboard", headers={"Authorization": f"Bearer {scraper}"}).text
        assert "Early warnings (1)" in page and "its standby backup is 9.0 s behind (target 5 s)" in page
        for second in (2, 3):
            assert early.evaluate(healthy_readings(), NOW + timedelta(seconds=second)) == ([], [])
        _, cleared = early.evaluate(healthy_readings(), NOW + timedelta(seconds=4))
        assert kinds(cleared) == kinds(raised)
        metrics = client.get("/metrics", headers={"Authorization": f"Bearer {scraper}"}).text
        assert not [line for line in metrics.splitlines() if line.startswith("dr_watch_warning{")]
        assert "Early warnings (0)" in client.get("/dashboard", headers={"Authorization": f"Bearer {scraper}"}).text
    assert told == [("service:contract-signing", True), ("service:contract-signing", False)]
    # a watch started again knows what is active from the evidence, and raises nothing twice
    early.evaluate(lagging, NOW + timedelta(seconds=5))
    early.evaluate(lagging, NOW + timedelta(seconds=6))
    again = EarlyWarnings(lab_inventory(), str(LAB_INVENTORY), sessions, "dr watch", drills_dir=None)
    again.facts, again.facts_at = early.facts, float("inf")
    assert again.evaluate(lagging, NOW + timedelta(seconds=7)) == ([], [])


# --- dr watch warnings ------------------------------------------------------------------------------


def test_dr_watch_warnings_exits_0_when_none_1_when_any_and_2_on_a_bad_inventory(tmp_path: Path) -> None:
    url = prepared(f"sqlite:///{tmp_path / 'evidence.db'}")
    runner = CliRunner()
    command = ["warnings", "-i", str(INVENTORY), "--drills", str(tmp_path), "-o", "json"]
    untested = runner.invoke(watch, command, obj={"database": url})
    assert untested.exit_code == 1, untested.output
    assert [(w["kind"], w["target"]) for w in json.loads(untested.output)["warnings"]] == [
        ("drill-overdue", "service:quotation"), ("drill-overdue", "service:trading")]
    record_run(url, "restore-trading.yml", incident_ago_s=1)
    record_run(url, "restore-quotation.yml", incident_ago_s=1)
    tested = runner.invoke(watch, command[:-2], obj={"database": url})
    assert (tested.exit_code, tested.output) == (0, "no early warnings for api-test\n")
    missing = runner.invoke(watch, ["warnings", "-i", str(tmp_path / "nowhere.yml")], obj={"database": url})
    assert missing.exit_code == 2 and "Traceback" not in missing.output and "nowhere.yml" in missing.output


# --- the lab -----------------------------------------------------------------------------------------


@pytest.mark.lab
def test_a_healthy_lab_has_no_replication_site_nor_host_key_warnings(lab: Lab) -> None:
    inventory = load_inventory(str(lab.config.inventory_path))[0]
    with Prober(inventory, wait_s=1.0) as prober:
        prober.round()
    primary = prober.readings.stores[("trading", "primary")].value
    assert primary is not None and [(s.state, s.sync_state) for s in primary.standbys] == [("streaming", "sync")]
    cache = prober.readings.stores[("quotation", "primary")].value
    assert cache is not None and [s.state for s in cache.standbys] == ["online"]
    facts = Facts(unknown_hosts=unknown_hosts(inventory), tested={name: NOW for name in inventory.services})
    assert active_warnings(inventory, prober.readings, facts, datetime.now(UTC)) == []
