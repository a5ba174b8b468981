"""The watch's observers (dr_orchestrator.watch.observers): what each makes of the probes, on synthetic
readings and against the two-site lab (a healthy lab, a killed service, a killed site)."""

from __future__ import annotations

from collections.abc import Callable
from contextlib import AbstractContextManager
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import psycopg
import pytest
from sqlalchemy.engine import make_url
from support.waiting import wait_for

from dr_orchestrator.actions.postgres.base import Database
from dr_orchestrator.lab.config import SERVICES
from dr_orchestrator.lab.lab import Lab
from dr_orchestrator.loading import load_inventory
from dr_orchestrator.model.inventory import Inventory
from dr_orchestrator.watch.agreement import Agreement
from dr_orchestrator.watch.observations import Observation, Target, Transition
from dr_orchestrator.watch.observers import (
    Health,
    KeptDatabaseConnections,
    Probed,
    Prober,
    Readings,
    StoreState,
    _postgres,
    layout_of,
    observations_from,
    probe_all,
)

REPO = Path(__file__).resolve().parent.parent
LabFactory = Callable[..., AbstractContextManager[Lab]]
T0 = datetime(2026, 12, 7, 3, 0, tzinfo=UTC)
SERVICE_OBSERVERS = {"front-door", "direct:primary", "store", "haproxy"}


def by_key(observations: list[Observation]) -> dict[tuple[Target, str], Observation]:
    keyed = {(item.target, item.observer): item for item in observations}
    assert len(keyed) == len(observations), "one observation per observer and target"
    return keyed


def observers_of(observations: list[Observation], target: Target) -> set[str]:
    return {item.observer for item in observations if item.target == target}


# --- synthetic readings --------------------------------------------------------------------------


def lab_like_inventory() -> Inventory:
    return load_inventory(str(REPO / "inventories" / "lab.yml"))[0]


def probed(value: Any, error: str | None = None) -> Probed[Any]:
    return Probed(T0, 0.002, value, error)


def healthy_readings(serving: str = "primary") -> Readings:
    other = "backup" if serving == "primary" else "primary"
    readings = Readings()
    for service in SERVICES:
        readings.front[service] = probed(Health(200, serving, "read-write", None))
        readings.direct[(service, serving)] = probed(Health(200, serving, "read-write", None))
        readings.direct[(service, other)] = probed(Health(503, other, "read-only", "the database is a standby"))
        kind = "cache" if service == "quotation" else "database"
        readings.stores[(service, serving)] = probed(StoreState(kind, "primary", True))
        readings.stores[(service, other)] = probed(StoreState(kind, "standby", False, serving, "streaming"))
        readings.servers[service] = probed({serving: {"admin": "ready", "operational": "up"},
                                            other: {"admin": "maint", "operational": "down"}})
    return readings


def derive(readings: Readings) -> list[Observation]:
    inventory = lab_like_inventory()
    return observations_from(layout_of(inventory), readings, inventory.sites)


def test_a_standby_site_answering_503_is_alive_and_its_maintenance_servers_say_nothing() -> None:
    observations = derive(healthy_readings())
    assert all(item.ok for item in observations), [item for item in observations if not item.ok]
    assert observers_of(observations, Target("site", "backup")) == {"direct:backup", "store-host:backup"}
    assert observers_of(observations, Target("site", "primary")) == {
        "direct:primary", "store-host:primary", "replication:primary", "haproxy:primary"}


def test_a_service_is_judged_at_the_site_its_front_door_server_is_ready_for() -> None:
    observations = derive(healthy_readings(serving="backup"))
    assert observers_of(observations, Target("service", "trading")) == {"front-door", "direct:backup", "store",
                                                                         "haproxy"}
    assert all(item.ok for item in observations)


def test_a_site_whose_replicas_lost_their_link_and_stores_are_gone_fails_those_observers() -> None:
    readings = healthy_readings()
    for service in SERVICES:
        readings.direct[(service, "primary")] = probed(None, "connection refused")
        readings.stores[(service, "primary")] = probed(None, "connection refused")
        standby = readings.stores[(service, "backup")].value
        assert standby is not None
        readings.stores[(service, "backup")] = probed(StoreState(standby.kind, standby.role, False, "primary", None))
    keyed = by_key(derive(readings))
    site = Target("site", "primary")
    for observer in ("direct:primary", "store-host:primary", "replication:primary"):
        assert not keyed[(site, observer)].ok
    assert "trading: connection refused" in keyed[(site, "direct:primary")].detail
    assert keyed[(Target("site", "backup"), "store-host:backup")].ok


def test_a_front_door_server_whose_newest_health_check_failed_fails_the_haproxy_observers() -> None:
    readings = healthy_readings()
    servers = readings.servers["trading"].value
    assert servers is not None
    servers["primary"]["last_check"] = "failed"  # still up: HAProxy waits for `fall` failed checks
    keyed = by_key(derive(readings))
    haproxy = keyed[(Target("service", "trading"), "haproxy")]
    assert not haproxy.ok
    assert haproxy.detail == "server primary of backend trading: ready, up, last check failed"
    assert keyed[(Target("site", "primary"), "haproxy:primary")].ok  # the other services' servers pass


# --- the lab -----------------------------------------------------------------------------------------


def lab_inventory(lab: Lab) -> Inventory:
    return load_inventory(str(lab.config.inventory_path))[0]


@pytest.mark.lab
def test_a_healthy_lab_gives_good_observations_of_every_service_and_site(lab: Lab) -> None:
    inventory = lab_inventory(lab)
    before = datetime.now(UTC)
    observations = probe_all(inventory)
    after = datetime.now(UTC)
    assert [item for item in observations if not item.ok] == []
    for service in SERVICES:
        assert observers_of(observations, Target("service", service)) == SERVICE_OBSERVERS
    assert observers_of(observations, Target("site", "primary")) == {
        "direct:primary", "store-host:primary", "replication:primary", "haproxy:primary"}
    assert observers_of(observations, Target("site", "backup")) == {"direct:backup", "store-host:backup"}
    for item in observations:
        assert before <= item.at <= after
        assert 0 <= item.latency_s <= (after - before).total_seconds()  # measured inside the round
        assert "\n" not in item.detail
    assert "site=primary" in by_key(observations)[(Target("service", "trading"), "front-door")].detail


def test_the_probes_of_services_a_run_fails_over_rest_until_it_ends(lab: Lab) -> None:
    """While the watch's run fails trading over, nothing probes trading (the run's own checks tell when
    it is back) and the machine is the run's; every other service is still watched."""
    with Prober(lab_inventory(lab)) as prober:
        prober.resting = frozenset({"trading"})
        seen: list[Observation] = []
        wait_for(lambda: seen.extend(prober.round()) or {"contract-signing", "quotation"} <= {
            item.target.name for item in seen if item.target.kind == "service"}, 10, "the other services' probes")
        for _ in range(3):
            seen += prober.round()
        assert not [item for item in seen if item.target == Target("service", "trading")]
        assert not [slot for slot in prober.out if "trading" in str(slot)]
        prober.resting = frozenset()
        wait_for(lambda: any(item.target == Target("service", "trading") for item in prober.round()), 10,
                 "trading probed again")


def feed_until(agreement: Agreement, inventory: Inventory, target: Target, state: str,
               timeout: float) -> list[Transition]:
    transitions: list[Transition] = []

    def reached() -> bool:
        for item in probe_all(inventory):
            transitions.extend(agreement.feed(item))
        return agreement.state(target) == state

    wait_for(reached, timeout, f"{target} {state}")
    return transitions


@pytest.mark.lab
@pytest.mark.slow
def test_a_killed_service_fails_its_own_observers_only_and_is_down_by_agreement(lab_factory: LabFactory) -> None:
    with lab_factory() as lab:
        inventory = lab_inventory(lab)
        trading = Target("service", "trading")
        agreement = Agreement(confirm_s=0.5)
        rounds: list[list[Observation]] = []
        transitions: list[Transition] = []

        def step() -> list[Observation]:
            rounds.append(prober())
            transitions.extend(t for item in rounds[-1] for t in agreement.feed(item))
            return rounds[-1]

        with Prober(inventory) as prober:
            assert [item for item in prober() if not item.ok] == []
            lab.kill_service("trading", "primary")
            wait_for(lambda: step() and agreement.state(trading) == "down", 15, "trading down")
            # The front door's answer is slower (HAProxy retries the dead server for a second): wait for it too.
            wait_for(lambda: any(not item.ok and item.observer == "front-door" for item in step()), 15,
                     "the front door to fail trading")

        failed = [item for observations in rounds for item in observations if not item.ok]
        assert {item.target for item in failed} == {trading}
        assert {"front-door", "direct:primary"} <= {item.observer for item in failed}
        # A kept connection to the killed process is reset (or closed before an answer), a new one refused.
        direct = [item.detail for item in failed if item.observer == "direct:primary"]
        assert set(direct) <= {"Connection reset by peer", "connection refused",
                               "Server disconnected without sending a response."}
        assert direct[-1] == "connection refused"
        assert all(item.detail and "\n" not in item.detail for item in failed)
        # While the front door retries the dead server (a second), rounds go on without waiting for it.
        assert any(any(not item.ok and item.observer == "direct:primary" for item in observations)
                   and not any(item.observer == "front-door" and item.target == trading for item in observations)
                   for observations in rounds)
        assert {(t.target, t.state) for t in transitions} == {(trading, "suspect"), (trading, "down")}
        assert agreement.state(Target("site", "primary")) == "ok"


@pytest.mark.lab
@pytest.mark.slow
def test_a_killed_site_is_down_when_its_observers_agree(lab_factory: LabFactory) -> None:
    with lab_factory() as lab:
        inventory = lab_inventory(lab)
        primary = Target("site", "primary")
        agreement = Agreement(confirm_s=0.5)
        for item in probe_all(inventory):
            assert agreement.feed(item) == []
        lab.kill_site("primary")
        transitions = feed_until(agreement, inventory, primary, "down", 15)
        down = next(t for t in transitions if t.target == primary and t.state == "down")
        assert len(set(down.observers)) >= 2
        assert set(down.observers) <= {"direct:primary", "store-host:primary", "replication:primary",
                                        "haproxy:primary"}
        assert lab.killed_at is not None
        assert lab.killed_at <= down.impact_start <= lab.killed_at + timedelta(seconds=1.5)
        assert down.at - down.impact_start >= timedelta(seconds=0.5)
        assert agreement.state(Target("site", "backup")) == "ok"


@pytest.mark.postgres
def test_a_store_probe_keeps_its_connection_and_a_session_cut_under_it_is_not_a_down_store(postgres_url: str) -> None:
    """Each round reuses one session per store and site (a fresh one per 100 ms round cost the server a
    backend process each time); a session ended under it (a restart, a terminated backend) is asked
    again on a fresh connection, so the store is not reported down for it."""
    server = make_url(postgres_url)
    database = Database(name="evidence", dbname="postgres", user=str(server.username), port=int(server.port or 5432),
                        hosts={"primary": str(server.host)})
    kept = KeptDatabaseConnections(timeout_s=1.0)
    backend = "SELECT pg_backend_pid()"
    try:
        assert _postgres(database, "primary", kept).role == "primary"
        first = kept.take(("evidence", "primary"))
        assert first is not None
        pid = first.execute(backend).fetchone()
        kept.give(("evidence", "primary"), first)

        assert _postgres(database, "primary", kept).role == "primary"
        again = kept.take(("evidence", "primary"))
        assert again is first and again.execute(backend).fetchone() == pid
        kept.give(("evidence", "primary"), again)

        with psycopg.connect(database.conninfo("primary"), autocommit=True) as other:
            other.execute("SELECT pg_terminate_backend(%s)", pid)
        state = _postgres(database, "primary", kept)
        assert state.role == "primary" and state.writable
        fresh = kept.take(("evidence", "primary"))
        assert fresh is not None and fresh is not first and fresh.execute(backend).fetchone() != pid
        fresh.close()
    finally:
        kept.close()
