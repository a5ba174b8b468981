"""The two-site lab against the real parts: each service's store and its replication (PostgreSQL for trading
and contract-signing, Redis for quotation), sshd, HAProxy and the three services.

Tests that only look share the session's `lab`; tests that break things bring up a lab of their own.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import signal
import socket
import subprocess
import sys
import uuid
from collections.abc import Callable, Iterator
from contextlib import AbstractContextManager
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import httpx
import paramiko
import psycopg
import pytest
from click.testing import CliRunner, Result
from support.lab import set_read_only
from support.waiting import wait_for

from dr_orchestrator.lab import haproxy, redis, system
from dr_orchestrator.lab.cli import lab_group
from dr_orchestrator.lab.config import SERVICES, SITES, STORES, LabConfig, LabConfigError
from dr_orchestrator.lab.inventory import render as render_inventory
from dr_orchestrator.lab.lab import Lab, LabError
from dr_orchestrator.lab.load.database import site_databases
from dr_orchestrator.lab.processes import is_running, processes_under
from dr_orchestrator.lab.status import problems as status_problems
from dr_orchestrator.lab.system import LabSetupError
from dr_orchestrator.loading import load_inventory

REPO = Path(__file__).resolve().parent.parent
LabFactory = Callable[..., AbstractContextManager[Lab]]


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
    sites = {"primary": "127.0.10.1", "backup": "127.0.20.1"}
    # Each service keeps its own store: a PostgreSQL of its own for each writing service, Redis for quotation.
    databases = inventory.vars["databases"]
    assert {name: (db["hosts"], db["port"]) for name, db in databases.items()} == {
        "trading": (sites, 15432), "contract-signing": (sites, 15433)}
    assert {name: db["data_dirs"]["backup"] for name, db in databases.items()} == {
        "trading": "/tmp/dr-lab/backup/pgdata-trading",
        "contract-signing": "/tmp/dr-lab/backup/pgdata-contract-signing"}
    assert inventory.vars["redis"] == {"quotation": {"port": 16379, "hosts": sites}}


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
def test_the_lab_comes_up_healthy_with_each_services_store_replicating(lab: Lab) -> None:
    status = lab.status()

    assert status["healthy"], status["problems"]
    assert all(entry["running"] for entry in status["processes"])
    stores = status["stores"]
    assert {service: (store["kind"], store["store"], store["synchronous"], store["active_site"])
            for service, store in stores.items()} == {
        "trading": ("postgres", "postgres-trading", True, "primary"),
        "contract-signing": ("postgres", "postgres-contract-signing", False, "primary"),
        "quotation": ("redis", "redis-quotation", False, "primary"),
    }
    for service in ("trading", "contract-signing"):
        sites = stores[service]["sites"]
        assert (sites["primary"]["role"], sites["primary"]["writable"]) == ("primary", True)
        assert (sites["backup"]["role"], sites["backup"]["writable"]) == ("standby", False)
        assert sites["backup"]["wal_receiver"] == "streaming"
        [standby] = stores[service]["replication"]
        assert (standby["application_name"], standby["state"]) == ("backup", "streaming")
        assert isinstance(standby["lag_bytes"], int) and isinstance(standby["lag_seconds"], float)
    # Trading's commits wait for its standby (RPO target 0); contract-signing's do not (5 s).
    assert [row["sync_state"] for row in stores["trading"]["replication"]] == ["sync"]
    assert stores["trading"]["sites"]["primary"]["synchronous_standby_names"] == "FIRST 1 (backup)"
    assert [row["sync_state"] for row in stores["contract-signing"]["replication"]] == ["async"]
    assert stores["contract-signing"]["sites"]["primary"]["synchronous_standby_names"] == ""
    assert "replication" not in stores["quotation"]  # Redis's own replication: the replica's link
    cache = stores["quotation"]["sites"]
    assert (cache["primary"]["role"], cache["primary"]["writable"], cache["primary"]["replicas"]) == (
        "primary", True, 1)
    assert (cache["backup"]["role"], cache["backup"]["writable"], cache["backup"]["link"]) == ("replica", False, "up")
    assert cache["backup"]["master"] == f"{lab.config.address('primary')}:{lab.config.redis_port}"
    for service in SERVICES:  # warm at the backup site: answering, on a read-only store
        assert status["services"][service]["primary"]["db_role"] == "read-write"
        assert status["services"][service]["backup"]["db_role"] == "read-only"
        assert status["front_door"][service]["servers"] == {"primary": "UP", "backup": "MAINT"}
    assert status["services"]["quotation"]["backup"]["ready"] is True
    assert status["services"]["trading"]["backup"]["status"] == 503


@pytest.mark.lab
def test_a_promoted_standby_waits_for_nobody(lab: Lab) -> None:
    """The configuration a standby copies from its primary must not make it, once promoted, wait for a
    standby of its own (trading's primary waits for one)."""
    for service in ("trading", "contract-signing"):
        with psycopg.connect(lab.config.dsn("backup", service)) as standby:
            assert standby.execute("SHOW synchronous_standby_names").fetchone() == ("",)


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

    assert text.exit_code == 0 and "All healthy." in text.output
    assert as_json.exit_code == 0 and json.loads(as_json.output)["healthy"] is True
    blocks = store_blocks(text.output)
    assert list(blocks) == ["postgres-trading", "postgres-contract-signing", "redis-quotation"]
    assert blocks["postgres-trading"][0] == "postgres-trading (synchronous; takes writes at: primary)"
    assert blocks["postgres-contract-signing"][0] == (
        "postgres-contract-signing (asynchronous; takes writes at: primary)")
    assert blocks["redis-quotation"][0] == "redis-quotation (asynchronous; takes writes at: primary)"
    assert [line for line in blocks["postgres-trading"] if line.startswith("replication backup: streaming, sync,")]
    assert [line for line in blocks["postgres-contract-signing"]
            if line.startswith("replication backup: streaming, async,")]
    [replica] = [line for line in blocks["redis-quotation"] if line.startswith("backup ")]
    assert "replica (writable False, link up," in replica


def store_blocks(status_text: str) -> dict[str, list[str]]:
    """`dr lab status`'s Stores section: each store's lines (heading first), stripped."""
    section = status_text.split("\nStores:\n", 1)[1].split("\nFront door:", 1)[0]
    blocks: dict[str, list[str]] = {}
    for line in section.splitlines():
        if not line.startswith("    "):
            blocks[line.strip().split(" ", 1)[0]] = []
        blocks[list(blocks)[-1]].append(line.strip())
    return blocks


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


def lab_cli(lab: Lab, *arguments: str) -> Result:
    """`dr lab --root ROOT --port-offset N ARGUMENTS...`"""
    return CliRunner().invoke(lab_group, ["--root", str(lab.config.root), "--port-offset",
                                          str(lab.config.port_offset), *arguments])


@pytest.mark.lab
def test_fencing_tradings_primary_stops_only_trading_and_is_not_split_brain(lab: Lab, http: httpx.Client) -> None:
    config = lab.config
    set_read_only(config, "primary", "trading", True)
    try:
        fenced = wait_for(lambda: (r := http.get(config.service_url("trading", "primary") + "/health"))
                          .json()["db_role"] == "read-only" and r, 5, "trading to see the fence")
        others = {service: http.get(config.service_url(service, "primary") + "/health")
                  for service in ("contract-signing", "quotation")}
        signed = http.post(config.frontend_url("contract-signing") + "/contracts",
                           json={"contract_id": f"fenced-{uuid.uuid4().hex}", "body": "still signing"})
        quote = http.get(config.frontend_url("quotation") + "/quotes/GLOBEX")
        status = lab.status()
        text = lab_cli(lab, "status")
        trading_databases = site_databases(config, "trading")
        signing_databases = site_databases(config, "contract-signing")
    finally:
        set_read_only(config, "primary", "trading", False)
        # The session's lab as found: HAProxy sees trading at the primary UP again.
        wait_for(lambda: all(lab.status()["front_door"][s]["servers"]["primary"] == "UP" for s in SERVICES), 10,
                 "the front door to see the primary's services UP again")

    assert fenced.status_code == 503 and fenced.json() == {
        "service": "trading", "site": "primary", "db_role": "read-only", "writable": False, "ready": False,
        "why": "the database is a primary set read-only (default_transaction_read_only): trading cannot write"}
    # Contract-signing's and quotation's stores are their own: the fence on trading's does not touch them.
    for answer in others.values():
        assert answer.status_code == 200, answer.text
        assert {key: answer.json()[key] for key in ("db_role", "writable", "ready")} == {
            "db_role": "read-write", "writable": True, "ready": True}
    assert signed.status_code == 201 and signed.headers["X-DR-Site"] == "primary"
    assert quote.status_code == 200 and quote.json()["symbol"] == "GLOBEX"
    trading = status["stores"]["trading"]
    assert trading["sites"]["primary"] == {**trading["sites"]["primary"], "role": "primary", "writable": False}
    assert trading["active_site"] is None
    assert status["stores"]["contract-signing"]["active_site"] == "primary"
    assert status["stores"]["quotation"]["active_site"] == "primary"
    assert "postgres-trading takes writes nowhere (primary: a primary set read-only)" in status["problems"]
    assert [problem for problem in status["problems"] if "contract-signing" in problem or "quotation" in problem] == []
    assert text.exit_code == 1 and "postgres-trading takes writes nowhere" in text.output
    assert "split brain" not in text.output and "split brain" not in " ".join(status["problems"])
    assert [(db.site, db.read_write) for db in trading_databases] == [("primary", False), ("backup", False)]
    assert [(db.site, db.read_write) for db in signing_databases] == [("primary", True), ("backup", False)]
    assert http.get(config.service_url("trading", "primary") + "/health").status_code == 200


@pytest.mark.lab
def test_the_heartbeat_writes_into_every_store_and_reaches_each_standby(lab: Lab) -> None:
    """What the RPO readings rely on: each store's standby or replica holds a mark of how current it is."""
    config = lab.config
    since = datetime.now(UTC)

    def newest_row_at_standby(service: str) -> tuple[str, str] | None:
        with psycopg.connect(config.dsn("backup", service)) as standby:
            row = standby.execute("SELECT site, sync_state FROM dr_heartbeat WHERE at > %s ORDER BY at DESC LIMIT 1",
                                  (since,)).fetchone()
        return None if row is None else (row[0], row[1])

    def replica_mark() -> datetime | None:
        with redis.client(config, "backup") as replica:
            value = replica.get(redis.HEARTBEAT_KEY)
        mark = datetime.fromisoformat(value) if value else None
        return mark if mark is not None and mark > since else None

    trading = wait_for(lambda: newest_row_at_standby("trading"), 5, "a new heartbeat row at trading's standby")
    signing = wait_for(lambda: newest_row_at_standby("contract-signing"), 5,
                       "a new heartbeat row at contract-signing's standby")
    mark = wait_for(replica_mark, 5, "a new heartbeat at quotation's Redis replica")

    # Each row says how its store replicated when it was written: trading's synchronously.
    assert trading == ("primary", "sync") and signing == ("primary", "async")
    assert mark.tzinfo is not None and mark <= datetime.now(UTC)


def _report(stores: dict[str, dict[str, Any]]) -> dict[str, Any]:
    """A status report of a lab whose processes all run and whose services all answer 200, with these stores."""
    return {"processes": [], "stores": stores, "services": {}, "front_door": {}}


def _postgres_store(service: str, primary: dict[str, Any], backup: dict[str, Any],
                    replication: list[dict[str, Any]] | None = None) -> dict[str, Any]:
    sites = {"primary": primary, "backup": backup}
    writable = [site for site, copy in sites.items() if copy.get("writable")]
    return {"kind": "postgres", "store": f"postgres-{service}", "synchronous": service == "trading",
            "active_site": writable[0] if len(writable) == 1 else None, "sites": sites,
            "replication": replication or []}


STREAMING = {"application_name": "backup", "state": "streaming", "sync_state": "async"}
HEALTHY_CACHE = {"kind": "redis", "store": "redis-quotation", "synchronous": False, "active_site": "primary",
                 "sites": {"primary": {"role": "primary", "writable": True},
                           "backup": {"role": "replica", "writable": False, "link": "up"}}}


def test_split_brain_is_two_copies_of_one_store_taking_writes_not_a_fenced_primary_beside_a_promoted_one() -> None:
    promoted = {"role": "primary", "writable": True}
    fenced = {"role": "primary", "writable": False}
    standby = {"role": "standby", "writable": False}
    healthy_signing = _postgres_store("contract-signing", promoted, standby, [STREAMING])

    def problems_with(trading: dict[str, Any], quotation: dict[str, Any] = HEALTHY_CACHE) -> list[str]:
        return status_problems(_report({"trading": trading, "contract-signing": healthy_signing,
                                        "quotation": quotation}))

    after_failover_trading = problems_with(_postgres_store("trading", fenced, promoted))
    fenced_only = problems_with(_postgres_store("trading", fenced, standby, [{**STREAMING, "sync_state": "sync"}]))
    both_writable = problems_with(_postgres_store("trading", promoted, promoted))
    two_masters = problems_with(_postgres_store("trading", promoted, standby, [{**STREAMING, "sync_state": "sync"}]),
                                {**HEALTHY_CACHE, "active_site": None,
                                 "sites": {"primary": {"role": "primary", "writable": True},
                                           "backup": {"role": "primary", "writable": True}}})
    not_sync = problems_with(_postgres_store("trading", promoted, standby, [STREAMING]))

    assert after_failover_trading == ["no standby of postgres-trading is streaming from the backup site"]
    assert fenced_only == ["postgres-trading takes writes nowhere (primary: a primary set read-only)"]
    assert both_writable == ["postgres-trading takes writes at primary and backup (split brain)"]
    assert two_masters == ["redis-quotation takes writes at primary and backup (split brain)"]
    assert not_sync == ["postgres-trading's standby is not synchronous (its RPO target of 0 needs it)"]


# --- faults (a lab of the test's own) -----------------------------------------------------------------


def newest_heartbeat(config: LabConfig, site: str, service: str) -> datetime | None:
    with psycopg.connect(config.dsn(site, service)) as connection:
        row = connection.execute("SELECT max(at) FROM dr_heartbeat").fetchone()
    return None if row is None else row[0]


def kill_error(target: str) -> str:
    return (f"Error: Invalid value for SERVICE@SITE: use SERVICE@SITE with SERVICE in trading, contract-signing, "
            f"quotation, postgres-trading, postgres-contract-signing, redis-quotation and SITE in primary, backup; "
            f"got {target!r}")


@pytest.mark.lab
def test_faults_kill_service_or_store_break_replication_split_brain_and_kill_the_primary_site(
    lab_factory: LabFactory, http: httpx.Client
) -> None:
    with lab_factory() as own:
        config = own.config
        order = {"client_order_id": "", "symbol": "ACME", "side": "buy", "qty": 1}

        def place_order() -> httpx.Response:
            return http.post(config.frontend_url("trading") + "/orders",
                             json={**order, "client_order_id": f"order-{uuid.uuid4().hex}"})

        def sign() -> httpx.Response:
            return http.post(config.frontend_url("contract-signing") + "/contracts",
                             json={"contract_id": f"contract-{uuid.uuid4().hex}", "body": "I agree."})

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

        # trading's database crashes: only trading stops; contract-signing and quotation keep their own stores
        killed = lab_cli(own, "kill", "postgres-trading@primary")
        assert killed.exit_code == 0, killed.output
        assert killed.output.startswith("Killed postgres-trading@primary (pid "), killed.output
        killed_at = datetime.now(UTC)
        refused = wait_for(lambda: (r := http.post(config.service_url("trading", "primary") + "/orders", json={
            **order, "client_order_id": f"refused-{uuid.uuid4().hex}"})).status_code == 503 and r, 5,
            "trading at the primary site to refuse orders")
        assert refused.json()["db_role"] == "unreachable"
        assert sign().status_code == 201
        assert http.get(config.frontend_url("quotation") + "/quotes/ACME").status_code == 200
        wait_for(lambda: (newest_heartbeat(config, "primary", "contract-signing") or killed_at) > killed_at, 5,
                 "contract-signing's heartbeat to go on without trading's database")
        shown = lab_cli(own, "status")
        assert shown.exit_code == 1 and "postgres-trading@primary is not running" in shown.output
        report = own.status()
        assert report["stores"]["trading"]["sites"]["primary"] == {"role": "unreachable", "writable": False}
        assert "postgres-trading takes writes nowhere" in report["problems"]
        assert {service: store["active_site"] for service, store in report["stores"].items()} == {
            "trading": None, "contract-signing": "primary", "quotation": "primary"}
        assert [p for p in report["problems"] if "contract-signing" in p or "quotation" in p] == []
        again = lab_cli(own, "kill", "postgres-trading@primary")
        assert again.exit_code == 2 and again.output.strip() == "dr lab: postgres-trading@primary is not running"

        own.kill_service("quotation", "primary")
        with pytest.raises(LabError, match="quotation@primary is not running"):
            own.kill_service("quotation", "primary")

        # break contract-signing's replication: its standby stops receiving, its primary keeps taking writes (async)
        own.break_replication("contract-signing")
        signing = own.status()["stores"]["contract-signing"]
        assert signing["replication"] == [] and signing["sites"]["backup"]["wal_receiver"] == "stopped"
        assert "no standby of postgres-contract-signing is streaming from the primary site" in own.status()["problems"]
        assert sign().status_code == 201
        with pytest.raises(LabError, match="'quotation' has no PostgreSQL standby"):
            own.break_replication("quotation")

        # promoting the cut-off standby while its primary takes writes: two copies of one store (split brain)
        with psycopg.connect(config.dsn("backup", "contract-signing"), autocommit=True) as standby:
            standby.execute("SELECT pg_promote(wait => true)")
        shown = lab_cli(own, "status")
        split = [line.strip() for line in shown.output.splitlines() if "split brain" in line]
        assert split == ["- postgres-contract-signing takes writes at primary and backup (split brain)"], shown.output

        # a power loss at the primary site: every process of it gone at once, the front door fails
        primary_pids = [pid for label, pid in own.running().items() if label.endswith("@primary")]
        own.kill_site("primary")
        assert [pid for pid in primary_pids if is_running(pid)] == []
        assert processes_under(config.site_dir("primary")) == set()
        failed = http.get(config.frontend_url("contract-signing") + "/health")
        assert failed.status_code == 503 and "X-DR-Site" not in failed.headers  # HAProxy's own answer
        wait_for(lambda: own.status()["front_door"]["contract-signing"]["servers"]["primary"] == "DOWN", 5,
                 "HAProxy's checks to mark contract-signing@primary DOWN")
        assert http.get(config.service_url("quotation", "backup") + "/health").status_code == 200  # its replica reads

        # what a failover runbook does: promote each store's copy at the backup site, switch the front door;
        # the warm services there take writes without a restart, and status follows the new roles
        with psycopg.connect(config.dsn("backup", "trading"), autocommit=True) as standby:
            standby.execute("SELECT pg_promote(wait => true)")
        with redis.client(config, "backup") as replica:
            replica.replicaof("NO", "ONE")
        for service in SERVICES:
            haproxy.command(config, f"set server {service}/backup state ready")
            haproxy.command(config, f"set server {service}/primary state maint")
        placed = wait_for(lambda: (r := place_order()).status_code == 201 and r, 5,
                          "the promoted backup to take orders")
        assert placed.headers["X-DR-Site"] == "backup"
        status = own.status()
        assert {service: store["active_site"] for service, store in status["stores"].items()} == {
            service: "backup" for service in SERVICES}
        assert [p for p in status["problems"] if "is not running" not in p] == [
            "no standby of postgres-trading is streaming from the backup site",
            "no standby of postgres-contract-signing is streaming from the backup site",
            "no replica of redis-quotation is linked to the backup site"]

        # power back: sshd only; the stores and services stay down until a runbook rebuilds them
        own.start_site("primary")
        client = ssh_client(own, "primary", config.known_hosts)
        client.close()
        at_backup = {f"{name}@backup" for name in ("sshd", *STORES, *SERVICES)}
        assert set(own.running()) == at_backup | {"haproxy", "sshd@primary"}

        # the backup site's stores crash one by one: `dr lab kill STORE@backup`; status names each, and
        # trading, on a store of its own, keeps taking orders
        for store, service in (("postgres-contract-signing", "contract-signing"), ("redis-quotation", "quotation")):
            killed = lab_cli(own, "kill", f"{store}@backup")
            assert killed.exit_code == 0 and killed.output.startswith(f"Killed {store}@backup (pid "), killed.output
            shown = lab_cli(own, "status")
            assert shown.exit_code == 1 and f"{store}@backup is not running" in shown.output
            assert own.status()["stores"][service]["sites"]["backup"] == {"role": "unreachable", "writable": False}
            assert place_order().status_code == 201
        again = lab_cli(own, "kill", "redis-quotation@backup")
        assert again.exit_code == 2 and again.output.strip() == "dr lab: redis-quotation@backup is not running"
        for unknown in ("mysql@backup", "postgres@backup", "postgres-trading@elsewhere"):
            refused_kill = lab_cli(own, "kill", unknown)
            assert refused_kill.exit_code == 2 and "Traceback" not in refused_kill.output
            assert refused_kill.output.strip().splitlines()[-1] == kill_error(unknown)

        # down after a power loss: nothing left, not even the dead postmasters' shared memory
        shmids = {(config.pgdata(site, service) / "postmaster.pid").read_text().splitlines()[6].split()[1]
                  for site in SITES for service in ("trading", "contract-signing")}
        pids = list(own.running().values())
        own.down()
        assert_nothing_left(config, pids)
        assert not shmids & {line.split()[1] for line in Path("/proc/sysvipc/shm").read_text().splitlines()[1:]}


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
        wait_for(lambda: (lab_config.pgdata("backup", "trading") / "PG_VERSION").exists()
                 or crashing.poll() is not None,
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
    assert all(lab_config.postgres_log("primary", service).exists() for service in ("trading", "contract-signing"))
    assert not own.is_up()
    own.down()
    assert_nothing_left(lab_config, [])
