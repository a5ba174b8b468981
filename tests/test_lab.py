"""The two-site lab against the real parts: PostgreSQL replication, sshd, HAProxy and the three services.

Tests that only look share the session's `lab`; tests that break things bring up a lab of their own.
"""

from __future__ import annotations

import hashlib
import io
import os
import signal
import socket
import subprocess
import sys
import time
import uuid
from collections.abc import Callable, Iterator
from contextlib import AbstractContextManager
from pathlib import Path
from typing import Any

import httpx
import paramiko
import psycopg
import pytest
from click.testing import CliRunner

from dr_orchestrator.lab import haproxy, system
from dr_orchestrator.lab.cli import lab_group
from dr_orchestrator.lab.config import SERVICES, SITES, LabConfig, LabConfigError
from dr_orchestrator.lab.inventory import render as render_inventory
from dr_orchestrator.lab.lab import Lab, LabError
from dr_orchestrator.lab.load.database import site_databases
from dr_orchestrator.lab.processes import is_running, processes_under
from dr_orchestrator.lab.status import problems as status_problems
from dr_orchestrator.lab.system import LabSetupError
from dr_orchestrator.loading import load_inventory

REPO = Path(__file__).resolve().parent.parent
LabFactory = Callable[..., AbstractContextManager[Lab]]


def wait_for(condition: Callable[[], Any], timeout: float, what: str) -> Any:
    deadline = time.monotonic() + timeout
    while True:
        value = condition()
        if value:
            return value
        if time.monotonic() > deadline:
            pytest.fail(f"timed out after {timeout} s waiting for {what}")
        time.sleep(0.05)


@pytest.fixture
def http() -> Iterator[httpx.Client]:
    with httpx.Client(timeout=3.0) as client:
        yield client


def ssh_client(lab: Lab, site: str, known_hosts: Path) -> paramiko.SSHClient:
    client = paramiko.SSHClient()
    client.load_host_keys(str(known_hosts))
    client.set_missing_host_key_policy(paramiko.RejectPolicy())
    client.connect(lab.config.address(site), port=lab.config.sshd_port, username=lab.config.os_user,
                   key_filename=str(lab.config.client_key), look_for_keys=False, allow_agent=False, timeout=5)
    return client


def ssh_run(client: paramiko.SSHClient, command: str) -> tuple[int, str]:
    _, stdout, stderr = client.exec_command(command, timeout=20)
    output = stdout.read().decode() + stderr.read().decode()
    return stdout.channel.recv_exit_status(), output


def ports_in_use(config: LabConfig) -> list[tuple[str, int]]:
    busy = []
    for address, port in config.listening_ports():
        with socket.socket() as probe:
            probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            try:
                probe.bind((address, port))
            except OSError:
                busy.append((address, port))
    return busy


def assert_nothing_left(config: LabConfig, pids: list[int]) -> None:
    assert [pid for pid in pids if is_running(pid)] == []
    assert processes_under(config.root) == set()
    assert ports_in_use(config) == []
    assert not config.root.exists()


# --- the committed inventory --------------------------------------------------------------------------


def test_the_committed_lab_inventory_is_what_the_default_lab_generates() -> None:
    committed = (REPO / "inventories" / "lab.yml").read_text()

    assert committed == render_inventory(LabConfig(), user="postgres")


def test_the_lab_inventory_loads_with_the_targets_and_hosts_the_runbooks_rely_on() -> None:
    inventory, _ = load_inventory(str(REPO / "inventories" / "lab.yml"))

    targets = {name: (service.rto, service.rpo) for name, service in inventory.services.items()}
    assert targets == {"trading": (60.0, 0.0), "contract-signing": (300.0, 5.0), "quotation": (30.0, 60.0)}
    assert {name: (host.site, host.address, host.port) for name, host in inventory.hosts.items()} == {
        "primary-app": ("primary", "127.0.10.1", 2222), "backup-app": ("backup", "127.0.20.1", 2222)}
    assert all(host.known_hosts == "/tmp/dr-lab/ssh/known_hosts" for host in inventory.hosts.values())
    assert inventory.vars["front_door"]["admin_socket"] == "/tmp/dr-lab/haproxy/admin.sock"
    assert inventory.vars["databases"]["hosts"] == {"primary": "127.0.10.1", "backup": "127.0.20.1"}


def test_a_port_offset_that_leaves_the_port_range_is_refused_in_one_sentence() -> None:
    with pytest.raises(LabConfigError, match="outside 1024-65535"):
        LabConfig(port_offset=50000)
    result = CliRunner().invoke(lab_group, ["--port-offset", "60000", "status"])
    assert result.exit_code == 2 and "Traceback" not in result.output


def test_missing_system_packages_are_named_in_one_sentence_when_not_root(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(system, "REQUIRED_PACKAGES", {"haproxy": "/usr/sbin/haproxy",
                                                      "python3-psycopg2": "/nonexistent/psycopg2/__init__.py"})
    monkeypatch.setattr(system.os, "geteuid", lambda: 1000)

    with pytest.raises(LabSetupError) as raised:
        system.ensure_packages()

    assert str(raised.value) == ("the lab needs these Debian packages: install them with "
                                 "`sudo apt-get install -y python3-psycopg2`")


def test_the_process_scan_finds_processes_naming_the_root_and_not_a_sibling_root(tmp_path: Path) -> None:
    lab_root, sibling = tmp_path / "lab", tmp_path / "lab2"
    script = "import sys, time; time.sleep(60)"
    ours = subprocess.Popen([sys.executable, "-c", script, f"--config={lab_root}/primary/site.json"])
    theirs = subprocess.Popen([sys.executable, "-c", script, str(sibling / "primary" / "site.json")])
    try:
        wait_for(lambda: processes_under(lab_root) == {ours.pid}, 5, "the scan to find the lab's process")
        assert processes_under(lab_root / "primary") == {ours.pid}
        assert processes_under(lab_root / "backup") == set()
        assert processes_under(sibling) == {theirs.pid}
    finally:
        for process in (ours, theirs):
            process.kill()
            process.wait()


# --- the running lab ------------------------------------------------------------------------------------


@pytest.mark.lab
def test_the_lab_comes_up_healthy_with_the_standby_streaming(lab: Lab) -> None:
    status = lab.status()

    assert status["healthy"], status["problems"]
    assert status["active_site"] == "primary"
    assert all(entry["running"] for entry in status["processes"])
    assert status["databases"]["primary"]["role"] == "primary"
    assert status["databases"]["backup"]["role"] == "standby"
    assert status["databases"]["backup"]["wal_receiver"] == "streaming"
    [standby] = status["replication"]
    assert (standby["application_name"], standby["state"], standby["sync_state"]) == ("backup", "streaming", "async")
    assert isinstance(standby["lag_bytes"], int) and isinstance(standby["lag_seconds"], float)
    for service in SERVICES:  # warm at the backup site: answering, on a read-only database
        assert status["services"][service]["primary"]["db_role"] == "read-write"
        assert status["services"][service]["backup"]["db_role"] == "read-only"
        assert status["front_door"][service]["servers"] == {"primary": "UP", "backup": "MAINT"}
    assert status["services"]["quotation"]["backup"]["ready"] is True
    assert status["services"]["trading"]["backup"]["status"] == 503


@pytest.mark.lab
def test_the_running_lab_writes_its_own_inventory_with_its_paths_and_ports(lab: Lab) -> None:
    inventory, _ = load_inventory(str(lab.config.inventory_path))

    host = inventory.hosts["backup-app"]
    assert (host.port, host.key_file, host.known_hosts) == (
        lab.config.sshd_port, str(lab.config.client_key), str(lab.config.known_hosts))
    assert host.vars["servicectl"] == str(lab.config.servicectl("backup"))
    assert inventory.services["trading"].vars["urls"]["backup"] == lab.config.service_url("trading", "backup")
    assert inventory.vars["front_door"]["backends"]["quotation"]["port"] == lab.config.frontend_port("quotation")


@pytest.mark.lab
def test_up_on_a_running_lab_says_so_and_changes_nothing(lab: Lab) -> None:
    before = lab.running()
    arguments = ["--root", str(lab.config.root), "--port-offset", str(lab.config.port_offset), "up"]

    result = CliRunner().invoke(lab_group, arguments)

    assert result.exit_code == 0, result.output
    assert result.output.strip().startswith(f"The lab at {lab.config.root} is already up")
    assert len(result.output.strip().splitlines()) == 1
    assert lab.running() == before


@pytest.mark.lab
def test_status_as_json_and_text_finds_the_labs_port_offset_from_its_root(
    lab: Lab, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.delenv("DR_LAB_PORT_OFFSET", raising=False)
    arguments = ["--root", str(lab.config.root), "status"]

    text = CliRunner().invoke(lab_group, arguments)
    as_json = CliRunner().invoke(lab_group, [*arguments, "--output", "json"])

    assert text.exit_code == 0 and "All healthy." in text.output and "streaming, async" in text.output
    assert as_json.exit_code == 0 and '"healthy": true' in as_json.output


@pytest.mark.lab
def test_ssh_login_with_the_pinned_host_key_runs_servicectl_as_the_lab_user(lab: Lab) -> None:
    for site in SITES:
        client = ssh_client(lab, site, lab.config.known_hosts)
        try:
            code, who = ssh_run(client, "id -un")
            assert (code, who.strip()) == (0, lab.config.os_user)
            code, output = ssh_run(client, f"{lab.config.servicectl(site)} status all")
        finally:
            client.close()
        assert code == 0, output
        assert all(f"{service}: running pid" in output for service in SERVICES), output


@pytest.mark.lab
def test_ssh_is_refused_when_known_hosts_pins_another_key_or_none(lab: Lab, tmp_path: Path) -> None:
    impostor = paramiko.Ed25519Key.from_private_key(io.StringIO(_new_ed25519_private_key(tmp_path)))
    wrong = tmp_path / "known_hosts_wrong"
    wrong.write_text(f"[{lab.config.address('primary')}]:{lab.config.sshd_port} "
                     f"{impostor.get_name()} {impostor.get_base64()}\n")
    empty = tmp_path / "known_hosts_empty"
    empty.write_text("")

    with pytest.raises(paramiko.BadHostKeyException):
        ssh_client(lab, "primary", wrong)
    with pytest.raises(paramiko.SSHException, match="not found in known_hosts"):
        ssh_client(lab, "primary", empty)


def _new_ed25519_private_key(directory: Path) -> str:
    path = directory / "impostor"
    subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f", str(path)], check=True)
    return path.read_text()


@pytest.mark.lab
def test_ssh_login_as_root_or_with_an_unknown_client_key_is_refused(lab: Lab, tmp_path: Path) -> None:
    stranger = tmp_path / "stranger"
    subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f", str(stranger)], check=True)
    client = paramiko.SSHClient()
    client.load_host_keys(str(lab.config.known_hosts))
    client.set_missing_host_key_policy(paramiko.RejectPolicy())
    with pytest.raises(paramiko.AuthenticationException):
        client.connect(lab.config.address("primary"), port=lab.config.sshd_port, username=lab.config.os_user,
                       key_filename=str(stranger), look_for_keys=False, allow_agent=False, timeout=5)
    client.close()


@pytest.mark.lab
def test_a_write_through_the_front_door_is_readable_from_the_standby(lab: Lab, http: httpx.Client) -> None:
    config = lab.config
    order_id = f"test-{uuid.uuid4().hex}"
    order = {"client_order_id": order_id, "symbol": "ACME", "side": "buy", "qty": 7}

    placed = http.post(config.frontend_url("trading") + "/orders", json=order)

    assert placed.status_code == 201 and placed.headers["X-DR-Site"] == "primary"
    assert placed.json()["client_order_id"] == order_id and isinstance(placed.json()["order_id"], int)
    read = wait_for(lambda: (r := http.get(f"{config.service_url('trading', 'backup')}/orders/{order_id}"))
                    .status_code == 200 and r, 5, "the order to reach the standby")
    assert read.headers["X-DR-Site"] == "backup"
    assert {key: read.json()[key] for key in ("order_id", "symbol", "side", "qty")} == {
        "order_id": placed.json()["order_id"], "symbol": "ACME", "side": "buy", "qty": 7}
    # The same client_order_id again is the same order (a retrying client places it once).
    again = http.post(config.frontend_url("trading") + "/orders", json=order)
    assert again.status_code == 201 and again.json()["order_id"] == placed.json()["order_id"]


@pytest.mark.lab
def test_the_services_api(lab: Lab, http: httpx.Client) -> None:
    config = lab.config
    contract_id = f"test-{uuid.uuid4().hex}"

    signed = http.post(config.frontend_url("contract-signing") + "/contracts",
                       json={"contract_id": contract_id, "body": "I agree."})
    quote = http.get(config.frontend_url("quotation") + "/quotes/acme")
    standby_write = http.post(config.service_url("trading", "backup") + "/orders",
                              json={"client_order_id": contract_id, "symbol": "ACME", "side": "sell", "qty": 1})
    bad = http.post(config.frontend_url("trading") + "/orders", json={"symbol": "ACME"})

    assert signed.status_code == 201
    assert signed.json() == {"contract_id": contract_id, "sha256": hashlib.sha256(b"I agree.").hexdigest()}
    assert http.get(f"{config.frontend_url('contract-signing')}/contracts/{contract_id}").json()["body"] == "I agree."
    assert quote.status_code == 200 and quote.json()["symbol"] == "ACME" and quote.json()["bid"] < quote.json()["ask"]
    assert http.get(config.frontend_url("quotation") + "/quotes/NOPE").status_code == 404
    assert standby_write.status_code == 503 and standby_write.json()["db_role"] == "read-only"
    assert standby_write.headers["X-DR-Site"] == "backup"
    assert bad.status_code == 400
    assert http.get(f"{config.frontend_url('trading')}/orders/{contract_id}-missing").status_code == 404


def set_read_only(config: LabConfig, site: str, read_only: bool) -> None:
    """What a fence (postgres.set_read_only) does to a primary."""
    with psycopg.connect(config.dsn(site), autocommit=True) as connection:
        connection.execute(f"ALTER SYSTEM SET default_transaction_read_only = {'on' if read_only else 'off'}".encode())
        connection.execute("SELECT pg_reload_conf()")


@pytest.mark.lab
def test_a_read_only_primary_makes_the_writing_services_unhealthy_and_is_not_split_brain(
    lab: Lab, http: httpx.Client
) -> None:
    config = lab.config
    set_read_only(config, "primary", True)
    try:
        health = {service: wait_for(lambda s=service: (r := http.get(config.service_url(s, "primary") + "/health"))
                                    .json()["db_role"] == "read-only" and r, 5, f"{service} to see the fence")
                  for service in ("trading", "contract-signing")}
        quotation = http.get(config.service_url("quotation", "primary") + "/health")
        status = lab.status()
        databases = site_databases(config)
    finally:
        set_read_only(config, "primary", False)
        # The session's lab as found: HAProxy sees the primary's writing services UP again.
        wait_for(lambda: all(lab.status()["front_door"][s]["servers"]["primary"] == "UP" for s in SERVICES), 10,
                 "the front door to see the primary's services UP again")

    for service, answer in health.items():
        assert answer.status_code == 503
        assert answer.json() == {
            "service": service, "site": "primary", "db_role": "read-only", "writable": False, "ready": False,
            "why": f"the database is a primary set read-only (default_transaction_read_only): {service} cannot write"}
    assert quotation.status_code == 200 and quotation.json()["ready"] is True  # it only reads
    assert quotation.json()["writable"] is False
    assert status["databases"]["primary"] == {**status["databases"]["primary"], "role": "primary", "writable": False}
    assert status["active_site"] is None
    assert "no site's database takes writes (primary: a primary set read-only)" in status["problems"]
    assert not [problem for problem in status["problems"] if "split brain" in problem]
    assert [(db.site, db.read_write) for db in databases] == [("primary", False), ("backup", False)]
    assert http.get(config.service_url("trading", "primary") + "/health").status_code == 200


def _report(databases: dict[str, dict[str, Any]]) -> dict[str, Any]:
    """A status report of a lab whose processes all run and whose services all answer 200."""
    return {"processes": [], "databases": databases, "replication": [], "sync": False,
            "active_site": next((site for site, db in databases.items() if db.get("writable")), None),
            "services": {}, "front_door": {}}


def test_split_brain_is_two_databases_taking_writes_not_a_read_only_primary_beside_a_promoted_one() -> None:
    promoted = {"role": "primary", "writable": True}
    fenced = {"role": "primary", "writable": False}

    after_a_service_failover = status_problems(_report({"primary": fenced, "backup": promoted}))
    both_writable = status_problems(_report({"primary": promoted, "backup": promoted}))

    assert after_a_service_failover == ["no standby is streaming from the backup site"]
    assert both_writable == ["the databases at primary and backup both take writes (split brain)"]


# --- labs of the test's own ---------------------------------------------------------------------------


@pytest.mark.lab
def test_a_sync_lab_makes_commits_wait_for_the_standby_and_the_standby_waits_for_nobody(
    lab_factory: LabFactory, http: httpx.Client
) -> None:
    with lab_factory(sync=True) as own:
        status = own.status()

        assert status["healthy"], status["problems"]
        assert [row["sync_state"] for row in status["replication"]] == ["sync"]
        assert status["databases"]["primary"]["synchronous_standby_names"] == "FIRST 1 (backup)"
        with psycopg.connect(own.config.dsn("backup")) as standby:  # once promoted, it must not wait for itself
            assert standby.execute("SHOW synchronous_standby_names").fetchone() == ("",)
        order = {"client_order_id": f"sync-{uuid.uuid4().hex}", "symbol": "ACME", "side": "sell", "qty": 3}
        assert http.post(own.config.frontend_url("trading") + "/orders", json=order).status_code == 201
        result = CliRunner().invoke(lab_group, ["--root", str(own.config.root), "--port-offset",
                                                str(own.config.port_offset), "up"])
        assert result.exit_code == 0 and "already up (replication synchronous)" in result.output


# --- faults (a lab of the test's own) -----------------------------------------------------------------


@pytest.mark.lab
def test_faults_kill_service_break_replication_and_kill_the_primary_site(
    lab_factory: LabFactory, http: httpx.Client
) -> None:
    with lab_factory() as own:
        config = own.config
        # kill one service: it stops answering; servicectl over SSH brings it back, as a runbook would
        pid = own.kill_service("trading", "backup")
        assert not is_running(pid)
        with pytest.raises(httpx.TransportError):
            http.get(config.service_url("trading", "backup") + "/health")
        client = ssh_client(own, "backup", config.known_hosts)
        try:
            assert ssh_run(client, f"{config.servicectl('backup')} status trading")[0] == 3
            code, output = ssh_run(client, f"{config.servicectl('backup')} start trading")
            assert code == 0 and "health 503" in output, output
            assert ssh_run(client, f"{config.servicectl('backup')} start trading")[0] == 0  # idempotent
        finally:
            client.close()
        own.kill_service("quotation", "primary")
        with pytest.raises(LabError, match="quotation@primary is not running"):
            own.kill_service("quotation", "primary")

        # break replication: the standby stops receiving, the primary keeps taking writes (async)
        own.break_replication()
        status = own.status()
        assert status["replication"] == [] and status["databases"]["backup"]["wal_receiver"] == "stopped"
        assert "no standby is streaming from the primary site" in status["problems"]
        order = {"client_order_id": f"after-break-{uuid.uuid4().hex}", "symbol": "ACME", "side": "buy", "qty": 1}
        assert http.post(config.frontend_url("trading") + "/orders", json=order).status_code == 201

        # a power loss at the primary site: every process of it gone at once, the front door fails
        primary_pids = [pid for label, pid in own.running().items() if label.endswith("@primary")]
        own.kill_site("primary")
        assert [pid for pid in primary_pids if is_running(pid)] == []
        assert processes_under(config.site_dir("primary")) == set()
        failed = http.get(config.frontend_url("trading") + "/health")
        assert failed.status_code == 503 and "X-DR-Site" not in failed.headers  # HAProxy's own answer
        wait_for(lambda: own.status()["front_door"]["trading"]["servers"]["primary"] == "DOWN", 5,
                 "HAProxy's checks to mark trading@primary DOWN")
        assert http.get(config.service_url("quotation", "backup") + "/health").status_code == 200

        # what a failover runbook does: promote the standby, switch the front door; the warm services
        # at the backup site take writes without a restart, and status follows the new roles
        with psycopg.connect(config.dsn("backup"), autocommit=True) as standby:
            standby.execute("SELECT pg_promote(wait => true)")
        for service in SERVICES:
            haproxy.command(config, f"set server {service}/backup state ready")
            haproxy.command(config, f"set server {service}/primary state maint")
        placed = wait_for(lambda: (r := http.post(config.frontend_url("trading") + "/orders", json={
            **order, "client_order_id": f"after-failover-{uuid.uuid4().hex}"})).status_code == 201 and r,
            5, "the promoted backup to take orders")
        assert placed.headers["X-DR-Site"] == "backup"
        status = own.status()
        assert status["active_site"] == "backup"
        assert [p for p in status["problems"] if "is not running" not in p] == [
            "no standby is streaming from the backup site"]

        # power back: sshd only; the database and services stay down until a runbook rebuilds them
        own.start_site("primary")
        client = ssh_client(own, "primary", config.known_hosts)
        client.close()
        assert set(own.running()) - {f"{name}@backup" for name in ("sshd", "postgres", *SERVICES)} == {
            "haproxy", "sshd@primary"}

        # the backup site's database crashes: `dr lab kill postgres@backup`, and status says so
        lab_cli = ["--root", str(config.root), "--port-offset", str(config.port_offset)]
        killed = CliRunner().invoke(lab_group, [*lab_cli, "kill", "postgres@backup"])
        assert killed.exit_code == 0 and killed.output.startswith("Killed postgres@backup (pid "), killed.output
        status = CliRunner().invoke(lab_group, [*lab_cli, "status"])
        assert status.exit_code == 1 and "postgres@backup is not running" in status.output
        assert own.status()["databases"]["backup"] == {"role": "unreachable", "writable": False}
        again = CliRunner().invoke(lab_group, [*lab_cli, "kill", "postgres@backup"])
        assert again.exit_code == 2 and "dr lab: postgres@backup is not running" in again.output
        unknown = CliRunner().invoke(lab_group, [*lab_cli, "kill", "mysql@backup"])
        assert unknown.exit_code == 2 and "trading, contract-signing, quotation, postgres" in unknown.output

        # down after a power loss: nothing left, not even the dead postmaster's shared memory
        shmid = (config.pgdata("primary") / "postmaster.pid").read_text().splitlines()[6].split()[1]
        pids = list(own.running().values())
        own.down()
        assert_nothing_left(config, pids)
        assert shmid not in {line.split()[1] for line in Path("/proc/sysvipc/shm").read_text().splitlines()[1:]}


@pytest.mark.lab
def test_down_leaves_nothing_and_up_down_up_works(lab_config: LabConfig) -> None:
    own = Lab(lab_config)
    for _ in range(2):
        result = own.up()
        assert not result.already_up and result.seconds < 30
        assert own.status()["healthy"]
        pids = list(own.running().values())
        assert len(pids) == len(own.processes())

        own.down()

        assert_nothing_left(lab_config, pids)


@pytest.mark.lab
def test_down_cleans_up_after_an_up_that_was_killed_halfway(lab_config: LabConfig) -> None:
    command = [sys.executable, "-m", "dr_orchestrator.lab.cli", "--root", str(lab_config.root),
               "--port-offset", str(lab_config.port_offset), "up"]
    crashing = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    try:
        # Kill it once the primary database runs and the standby is being made: a crash mid-way.
        wait_for(lambda: (lab_config.pgdata("backup") / "PG_VERSION").exists() or crashing.poll() is not None,
                 60, "the lab to be half up")
    finally:
        os.killpg(crashing.pid, signal.SIGKILL)
        crashing.wait()
    leftovers = processes_under(lab_config.root)
    assert leftovers, "the crash should have left processes for down to clean up"

    Lab(lab_config).down()

    assert_nothing_left(lab_config, list(leftovers))


@pytest.mark.lab
def test_an_up_that_fails_halfway_stops_everything_and_keeps_the_logs(
    lab_config: LabConfig, monkeypatch: pytest.MonkeyPatch
) -> None:
    def broken_front_door(config: LabConfig) -> None:
        raise LabSetupError("HAProxy did not start: simulated")

    monkeypatch.setattr("dr_orchestrator.lab.lab.haproxy.start", broken_front_door)
    own = Lab(lab_config)

    with pytest.raises(LabError, match="simulated .nothing is left running; the logs are under"):
        own.up()

    assert processes_under(lab_config.root) == set() and own.running() == {}
    assert (lab_config.log_dir("primary") / "postgres.log").exists()
    assert not own.is_up()
    own.down()
    assert_nothing_left(lab_config, [])
