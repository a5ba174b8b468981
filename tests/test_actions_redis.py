"""The redis.* actions against real redis-server processes: a master at 127.0.10.1 and its replica
at 127.0.20.1, started by each test and killed afterwards, whatever happens."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import textwrap
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Any

import pytest
import redis
from actionctx import Harness
from redis.backoff import NoBackoff
from redis.retry import Retry
from support.waiting import wait_for

from dr_orchestrator.actions import default_registry
from dr_orchestrator.actions.base import Action, ActionError
from dr_orchestrator.actions.redis import Promote, Replicate, ReplicationStatus, Rpo
from dr_orchestrator.loading import load_inventory, validate
from dr_orchestrator.model.events import ActionEvent, utcnow

pytestmark = pytest.mark.redis

ADDRESSES = {"primary": "127.0.10.1", "backup": "127.0.20.1"}
KEY = "dr:heartbeat"
PASSWORD_ENV = "DR_TEST_REDIS_PASSWORD"


def free_port(*addresses: str) -> int:
    """A port nothing listens on at any of ``addresses``."""
    while True:
        with socket.socket() as sock:
            sock.bind((addresses[0], 0))
            port = int(sock.getsockname()[1])
        if all(_bindable(address, port) for address in addresses[1:]):
            return port


def _bindable(address: str, port: int) -> bool:
    with socket.socket() as sock:
        try:
            sock.bind((address, port))
        except OSError:
            return False
    return True


@dataclass
class Server:
    """One redis-server process, without persistence (a SIGKILLed one comes back empty)."""

    address: str
    port: int
    directory: Path
    password: str | None = None
    args: list[str] = field(default_factory=list)
    process: subprocess.Popen[bytes] | None = None

    def start(self) -> None:
        self.directory.mkdir(parents=True, exist_ok=True)
        auth = ["--requirepass", self.password] if self.password else []
        log = (self.directory / "server.log").open("ab")
        self.process = subprocess.Popen(
            ["redis-server", "--bind", self.address, "--port", str(self.port), "--save", "", "--appendonly", "no",
             "--dir", str(self.directory), "--loglevel", "warning",
             "--repl-diskless-sync-delay", "0",  # a full sync waits 5 s for more replicas otherwise
             *auth, *self.args],
            stdout=log, stderr=subprocess.STDOUT,
        )
        log.close()
        wait_for(self._answers, 10, f"redis-server at {self.address}:{self.port}")

    def _answers(self) -> bool:
        assert self.process is not None
        assert self.process.poll() is None, (self.directory / "server.log").read_text()
        try:
            return bool(self.client().ping())
        except redis.ConnectionError:
            return False

    def client(self) -> redis.Redis:
        return redis.Redis(self.address, self.port, password=self.password, decode_responses=True,
                           socket_timeout=5, socket_connect_timeout=1, retry=Retry(NoBackoff(), 0))

    def info(self) -> dict[str, Any]:
        with self.client() as client:
            info: dict[str, Any] = client.info("replication")
        return info

    def kill(self) -> None:
        if self.process is not None and self.process.poll() is None:
            self.process.send_signal(signal.SIGKILL)
            self.process.wait(10)


@pytest.fixture
def servers() -> Iterator[list[Server]]:
    """Every server a test starts goes in this list, and is killed after the test."""
    started: list[Server] = []
    yield started
    for server in started:
        server.kill()


@dataclass
class Pair:
    master: Server
    replica: Server
    inventory_path: Path
    harness: Harness

    def beat(self) -> str:
        """A heartbeat written at the master, as the lab writes it; its value."""
        value = utcnow().isoformat(timespec="microseconds")
        with self.master.client() as client:
            client.set(KEY, value)
        return value

    def act(self, action: type[Action[Any]], timeout: float = 20.0, **params: Any) -> dict[str, Any]:
        return run_action(self.harness, action, timeout, **params)


def run_action(harness: Harness, action: type[Action[Any]], timeout: float = 20.0, **params: Any) -> dict[str, Any]:
    return action().run(action.Params.model_validate(params), harness.ctx(timeout, service="quotation")).output


def inventory_text(redis_spec: str) -> str:
    return textwrap.dedent("""\
        all:
          vars:
            dr:
              name: redis-test
              sites:
                primary: {}
                backup: {}
                elsewhere: {}
              services:
                quotation: {rto: 60s, rpo: 60s, tier: standard, sites: [primary, backup]}
              vars:
                redis:
        __SPEC__
          children:
            primary:
              hosts:
                primary-app: {ansible_host: 127.0.10.1}
            backup:
              hosts:
                backup-app: {ansible_host: 127.0.20.1}
        """).replace("__SPEC__", textwrap.indent(textwrap.dedent(redis_spec), " " * 10))


def holds(server: Server, key: str, value: str) -> Callable[[], bool]:
    def seen() -> bool:
        with server.client() as client:
            return bool(client.get(key) == value)
    return seen


def start_pair(tmp_path: Path, servers: list[Server], password: str | None = None) -> Pair:
    """A master and its replica; with a password, one port at both sites (``port:``), else ``ports:``."""
    if password:
        port = free_port(*ADDRESSES.values())
        ports = {"primary": port, "backup": port}
        where = f"port: {port}\npassword: {{env: {PASSWORD_ENV}}}\n"
    else:
        ports = {site: free_port(address) for site, address in ADDRESSES.items()}
        where = f"ports: {{primary: {ports['primary']}, backup: {ports['backup']}}}\n"
    # The master is started without masterauth: re-pointing it as a replica must give it the password.
    master = Server(ADDRESSES["primary"], ports["primary"], tmp_path / "primary", password)
    masterauth = ["--masterauth", password] if password else []
    replica = Server(ADDRESSES["backup"], ports["backup"], tmp_path / "backup", password,
                     ["--replicaof", master.address, str(master.port), *masterauth])
    for server in (master, replica):
        servers.append(server)
        server.start()
    with master.client() as client:
        client.set("test:streaming", "yes")
    # The link is up once the initial sync is loaded; the stream starts at the replica's first acknowledgement.
    wait_for(holds(replica, "test:streaming", "yes"), 10, "the replica to stream from its master")
    path = tmp_path / "inventory.yml"
    hosts = f"hosts: {{primary: {master.address}, backup: {replica.address}}}\n"
    spec = "quotation:\n" + textwrap.indent(hosts + where, "  ")
    path.write_text(inventory_text(spec))
    inventory, _ = load_inventory(str(path))
    return Pair(master, replica, path, Harness(inventory))


@pytest.fixture
def pair(tmp_path: Path, servers: list[Server]) -> Iterator[Pair]:
    started = start_pair(tmp_path, servers)
    yield started
    started.harness.close()


def replicated(pair: Pair, value: str) -> None:
    wait_for(holds(pair.replica, KEY, value), 10, f"heartbeat {value} at the replica")


class Writer:
    """A client writing one thing after another at a server until it is refused, keeping what was acknowledged."""

    def __init__(self, server: Server, write: Callable[[redis.Redis, int], str]) -> None:
        self.acknowledged: list[str] = []
        self.error: Exception | None = None
        self.stop = threading.Event()
        self.thread = threading.Thread(target=self._run, args=(server, write), daemon=True)
        self.thread.start()
        wait_for(lambda: len(self.acknowledged) >= 50 or self.error is not None, 10, "50 acknowledged writes")

    def _run(self, server: Server, write: Callable[[redis.Redis, int], str]) -> None:
        with server.client() as client:
            for number in range(10_000_000):
                if self.stop.is_set():
                    return
                try:
                    self.acknowledged.append(write(client, number))
                except redis.RedisError as exc:
                    self.error = exc
                    return
                time.sleep(0.002)  # a client's pace, not a benchmark

    def finish(self) -> None:
        self.stop.set()
        self.thread.join(10)


def heartbeat(client: redis.Redis, _: int) -> str:
    value = utcnow().isoformat(timespec="microseconds")  # as the lab writes it: ordered as text too
    client.set(KEY, value)
    return value


def quote(client: redis.Redis, number: int) -> str:
    key = f"quote:SYM{number}"
    client.hset(key, mapping={"bid": "1.10", "ask": "1.12", "as_of": utcnow().isoformat()})
    return key


def dumped(*things: Any) -> str:
    return json.dumps([thing if isinstance(thing, dict) else repr(thing) for thing in things], default=str)


# ---------------------------------------------------------------- status


def test_status_of_a_healthy_pair(pair: Pair) -> None:
    value = pair.beat()
    replicated(pair, value)
    out = pair.act(ReplicationStatus)
    primary, backup = out["sites"]["primary"], out["sites"]["backup"]
    assert out["instance"] == "quotation"
    assert (primary["role"], primary["connected_replicas"]) == ("primary", 1)
    assert [(replica["site"], replica["state"]) for replica in primary["replicas"]] == [("backup", "online")]
    assert backup["role"] == "replica"
    assert (backup["master_site"], backup["master_link_status"]) == ("primary", "up")
    assert backup["master"] == f"{pair.master.address}:{pair.master.port}"
    assert backup["heartbeat"]["at"] == primary["heartbeat"]["at"] == value
    assert 0 <= backup["heartbeat"]["age_s"] < 10

    judged = pair.act(ReplicationStatus, site="backup", max_lag_bytes=10_000, max_staleness="10s",
                      require_link_up=True)
    assert judged["replica"] == "backup" and judged["problems"] == []
    assert judged["lag_reference"] == "master at primary" and judged["staleness_reference"] == "now"
    assert 0 <= judged["lag_bytes"] <= 10_000
    with pytest.raises(ActionError, match=r"at site primary \(127\.0\.10\.1:\d+\) is not a replica: it is primary"):
        pair.act(ReplicationStatus, site="primary")


def test_status_refuses_a_replica_whose_link_is_down(pair: Pair) -> None:
    replicated(pair, pair.beat())
    pair.master.kill()
    wait_for(lambda: pair.replica.info()["master_link_status"] == "down", 10, "the replica to lose its master")
    out = pair.act(ReplicationStatus)
    assert out["sites"]["primary"]["role"] == "unreachable"
    assert "Connection refused" in out["sites"]["primary"]["error"]
    assert out["sites"]["backup"]["master_link_status"] == "down"
    with pytest.raises(ActionError, match=(
            r"^redis 'quotation' at site backup \(127\.0\.20\.1:\d+\) is not fit to take over: "
            r"its link to its master is down.* \(run with --force and a reason to go on anyway\)$")):
        pair.act(ReplicationStatus, site="backup", require_link_up=True)
    # Without the master, staleness counts up to the incident, not up to now.
    pair.harness.run_info.update(incident_at=utcnow().isoformat(), forced=["drill: the master is down on purpose"])
    forced = pair.act(ReplicationStatus, site="backup", require_link_up=True, max_staleness="1m")
    assert forced["forced"] == ["drill: the master is down on purpose"]
    assert [problem.split(" (")[0] for problem in forced["problems"]] == ["its link to its master is down"]
    assert forced["staleness_reference"] == "incident time"
    assert forced["lag_reference"] == "replica's received stream (no master answers)"


# ---------------------------------------------------------------- failover


def test_promote_with_the_master_gone_and_rpo_from_the_last_replicated_heartbeat(pair: Pair) -> None:
    first = pair.beat()
    replicated(pair, first)
    writer = Writer(pair.master, heartbeat)
    pair.master.kill()
    writer.finish()
    incident_at = utcnow()
    with pair.replica.client() as client:
        held = client.get(KEY)
    # What the replica had not read when its master died is lost (even the first of the writer's writes, on a
    # busy machine); the write in flight may have replicated unacknowledged.
    assert held in [first, *writer.acknowledged] or held > writer.acknowledged[-1]
    pair.harness.run_info["incident_at"] = incident_at.isoformat()

    promoted = pair.act(Promote, site="backup")
    assert promoted["previous_roles"] == {"backup": "replica", "primary": "unreachable"}
    assert (promoted["caught_up"], promoted["caught_up_offset"], promoted["old_primary_repointed"]) == (
        None, None, False)
    assert promoted["heartbeat_at_promotion"] == held
    assert promoted["promote_s"] > 0 and datetime.fromisoformat(promoted["promoted_at"]) > incident_at
    assert pair.replica.info()["role"] == "master"
    with pair.replica.client() as client:
        assert client.hset("quote:EURUSD", mapping={"bid": "1.1", "ask": "1.2", "as_of": "now"}) == 3

    rpo = pair.act(Rpo, site="backup")
    expected = (incident_at - datetime.fromisoformat(held)).total_seconds()
    assert rpo["rpo_s"] == pytest.approx(expected, abs=1e-6)
    assert rpo["method"] == "async: newest replicated heartbeat (heartbeat held now)"
    # Ground truth: every acknowledged heartbeat the replica missed lies inside the measured window.
    held_at = datetime.fromisoformat(held)
    missed = [at for at in map(datetime.fromisoformat, writer.acknowledged) if at > held_at]
    assert all(0 < (incident_at - at).total_seconds() < rpo["rpo_s"] for at in missed)
    [measured] = pair.harness.measurements("rpo_s")
    assert (measured.service, measured.value, measured.raw["heartbeat_held"]) == ("quotation", rpo["rpo_s"], held)

    # Something writes the heartbeat at the new master: the figure then needs the promote step's reading.
    with pair.replica.client() as client:
        client.set(KEY, utcnow().isoformat())
    refused = pair.act(Rpo, site="backup")
    assert refused["rpo_s"] is None and refused["method"].startswith("not measured: the heartbeat held now is later")
    [event] = [e for e in pair.harness.events if isinstance(e, ActionEvent) and e.kind == "rpo.not_measured"]
    assert event.data["services"] == ["quotation"] and event.data["reason"] == refused["method"]
    given = pair.act(Rpo, site="backup", heartbeat_at_promotion=promoted["heartbeat_at_promotion"])
    assert given["rpo_s"] == pytest.approx(expected, abs=1e-6)
    assert given["method"] == "async: newest replicated heartbeat (heartbeat held at promotion (from the promote step))"

    again = pair.act(Promote, site="backup")
    assert again["already_primary"] is True and again["promoted_at"] is None


def test_planned_promote_with_the_master_alive_loses_nothing(pair: Pair) -> None:
    pair.harness.run_info["incident_at"] = utcnow().isoformat()
    writer = Writer(pair.master, quote)
    promoted = pair.act(Promote, site="backup")
    wait_for(lambda: writer.error is not None, 10, "the writer to be refused by the old master")
    assert isinstance(writer.error, redis.ReadOnlyError)
    with pair.replica.client() as client:
        held = set(client.scan_iter("quote:*", count=1000))
    assert len(writer.acknowledged) >= 50 and set(writer.acknowledged) <= held

    assert promoted["previous_roles"] == {"backup": "replica", "primary": "primary"}
    assert promoted["caught_up"] is True
    assert promoted["caught_up_offset"] == promoted["old_primary_final_offset"] == promoted["promoted_offset"]
    assert promoted["old_primary_repointed"] is True
    assert (promoted["old_primary_after"]["role"], promoted["old_primary_after"]["master_site"]) == (
        "replica", "backup")
    with pair.master.client() as old, pytest.raises(redis.ReadOnlyError):
        old.set("quote:LATE", "1")
    wait_for(lambda: pair.master.info()["master_link_status"] == "up", 10, "the old master to stream from the new")

    rpo = pair.act(Rpo, site="backup", caught_up_offset=promoted["caught_up_offset"])
    assert rpo["rpo_s"] == 0.0 and rpo["method"].startswith("switchover: promoted at offset")


def test_planned_promote_refuses_when_the_replica_cannot_catch_up(pair: Pair) -> None:
    with pair.replica.client() as client:
        client.replicaof(pair.replica.address, free_port(pair.replica.address))  # a master nobody runs
    pair.beat()  # a write it will never receive
    with pytest.raises(ActionError, match=(
            r"refusing to promote redis 'quotation' at site backup .*: it did not reach the old master's offset \d+ "
            r"\(redis 'quotation' at site primary .*\) within catch_up_timeout, so writes would be lost")):
        pair.act(Promote, site="backup", catch_up_timeout="200ms")
    assert pair.replica.info()["role"] == "slave"
    with pair.master.client() as client:  # its writes are no longer paused
        assert client.set("quote:AFTER", "1", px=1000)


def test_replicate_restores_replication_after_a_failover_and_failback(pair: Pair) -> None:
    pair.master.kill()
    pair.act(Promote, site="backup")
    with pair.replica.client() as client:
        client.hset("quote:WRITTEN_AT_BACKUP", mapping={"bid": "2", "ask": "3", "as_of": "then"})
    pair.master.start()  # back, empty, a master of its own
    both = pair.act(ReplicationStatus)["sites"]
    assert (both["primary"]["role"], both["backup"]["role"]) == ("primary", "primary")

    restored = pair.act(Replicate, site="primary", of_site="backup")
    assert restored["already_replica"] is False
    assert (restored["after"]["role"], restored["after"]["master_site"], restored["after"]["master_link_status"]) == (
        "replica", "backup", "up")
    assert restored["after"]["slave_repl_offset"] >= restored["master_offset"]
    with pair.master.client() as client:
        assert client.hget("quote:WRITTEN_AT_BACKUP", "bid") == "2"
    assert pair.act(Replicate, site="primary", of_site="backup")["already_replica"] is True

    back = pair.act(Promote, site="primary")  # failback, planned: the backup becomes its replica again
    assert (back["caught_up"], back["old_primary_after"]["role"]) == (True, "replica")
    wait_for(lambda: pair.replica.info()["master_link_status"] == "up", 10, "the backup to stream from the primary")
    assert pair.act(Replicate, site="backup", of_site="primary")["already_replica"] is True
    with pytest.raises(ActionError, match=r"redis 'quotation' at site backup \(.*\) is not a master: it is replica"):
        pair.act(Replicate, site="primary", of_site="backup")

    pair.replica.kill()
    with pytest.raises(ActionError, match=(
            r"refusing to make redis 'quotation' at site primary \(.*\), the only master, a replica of "
            r"redis 'quotation' at site backup \(.*\), which is unreachable \(.*Connection refused.*\)")):
        pair.act(Replicate, site="primary", of_site="backup")
    assert pair.master.info()["role"] == "master"


# ---------------------------------------------------------------- mistakes and secrets


def test_a_wrong_instance_or_site_is_named(pair: Pair, tmp_path: Path) -> None:
    with pytest.raises(ActionError, match=r"^redis 'quotaton' is not in dr.vars.redis; known: quotation$"):
        pair.act(ReplicationStatus, instance="quotaton")
    with pytest.raises(ActionError, match=r"^redis 'quotation' has no server at site 'bakup'; it has: primary, backup"):
        pair.act(Promote, site="bakup")
    with pytest.raises(ActionError, match="site and of_site are both backup"):
        pair.act(Replicate, site="backup", of_site="backup")
    assert pair.replica.info()["role"] == "slave"  # none of it touched a server

    literal = pair.inventory_path.read_text().replace("quotation:\n", "quotation:\n            password: hunter2\n")
    bad = tmp_path / "literal.yml"
    bad.write_text(literal)
    with pytest.raises(ActionError, match="password must be a reference"):
        run_action(Harness(load_inventory(str(bad))[0]), ReplicationStatus)

    runbook = tmp_path / "runbook.yml"
    runbook.write_text(textwrap.dedent("""\
        name: refs
        steps:
          - {id: status, action: redis.replication_status, with: {instance: quotaton}}
          - {id: promote, action: redis.promote, with: {site: elsewhere}}
          - {id: rpo, action: redis.rpo, with: {instance: quotation, site: backup}}
        """))
    problems = validate(str(runbook), str(pair.inventory_path), default_registry().params_model)
    assert [(p.field, p.message) for p in problems] == [
        ("steps[0].with.instance", "redis 'quotaton' is not in dr.vars.redis (did you mean 'quotation'?)"),
        ("steps[1].with.site", "redis 'quotation' has no server at site 'elsewhere'"),
    ]


def test_a_password_by_env_reference_works_and_never_shows(tmp_path: Path, servers: list[Server],
                                                           monkeypatch: pytest.MonkeyPatch) -> None:
    password = "s3cret-" + os.urandom(6).hex()
    monkeypatch.delenv(PASSWORD_ENV, raising=False)
    pair = start_pair(tmp_path, servers, password)
    with pytest.raises(ActionError, match=f"the environment variable {PASSWORD_ENV} is not set"):
        pair.act(ReplicationStatus)
    monkeypatch.setenv(PASSWORD_ENV, "wrong-" + password)
    refused = pair.act(ReplicationStatus)["sites"]["primary"]
    assert refused["role"] == "unknown" and "password" in refused["error"]

    monkeypatch.setenv(PASSWORD_ENV, password)
    pair.harness.run_info["incident_at"] = utcnow().isoformat()
    replicated(pair, pair.beat())
    status = pair.act(ReplicationStatus, site="backup", require_link_up=True)
    # One port at both sites, and the replica connects from 127.0.0.1: known as the site that is not its master's.
    assert [replica["site"] for replica in status["sites"]["primary"]["replicas"]] == ["backup"]
    promoted = pair.act(Promote, site="backup")
    assert promoted["old_primary_repointed"] is True
    wait_for(lambda: pair.master.info()["master_link_status"] == "up", 10,
             "the old master to authenticate to the new one")
    rpo = pair.act(Rpo, site="backup", caught_up_offset=promoted["caught_up_offset"])
    assert rpo["rpo_s"] == 0.0
    assert password not in dumped(status, promoted, rpo, *[vars(event) for event in pair.harness.events])
    pair.harness.close()
