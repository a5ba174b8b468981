"""The lab's replicated evidence PostgreSQL (dr_orchestrator.lab.patroni): two real PostgreSQL members under
real Patroni on a real etcd cluster; one cluster for the module (a start costs seconds, a failover ~20 s)."""

from __future__ import annotations

import json
import os
import shutil
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import psycopg
import pytest
from sqlalchemy import text

from dr_orchestrator.evidence import chain, migrate
from dr_orchestrator.evidence.database import make_engine
from dr_orchestrator.lab import scratch
from dr_orchestrator.lab.config import PG_BIN
from dr_orchestrator.lab.etcd import ETCD, EtcdCluster
from dr_orchestrator.lab.etcd import stop_all_under as stop_etcd_under
from dr_orchestrator.lab.patroni import EvidenceCluster, EvidenceLabError, stop_all_under
from dr_orchestrator.lab.processes import processes_under, with_descendants

pytestmark = [
    pytest.mark.etcd, pytest.mark.postgres, pytest.mark.slow,
    pytest.mark.skipif(not os.access(ETCD, os.X_OK), reason="needs etcd-server"),
    pytest.mark.skipif(not (PG_BIN / "postgres").exists(), reason="needs PostgreSQL 15"),
]


def left_running(directory: Path) -> set[int]:
    return with_descendants(processes_under(directory))


@pytest.fixture(scope="module")
def directory() -> Iterator[Path]:
    path = Path(tempfile.mkdtemp(prefix="dr-patroni-test-", dir=scratch.scratch_base()))
    path.chmod(0o755)  # the postgres OS user runs Patroni in a directory below
    try:
        yield path
    finally:
        stop_all_under(path)
        stop_etcd_under(path)
        shutil.rmtree(path, ignore_errors=True)


@pytest.fixture(scope="module")
def etcd(directory: Path) -> Iterator[EtcdCluster]:
    with EtcdCluster(directory / "etcd") as cluster:
        yield cluster


@pytest.fixture(scope="module")
def cluster(directory: Path, etcd: EtcdCluster) -> Iterator[EvidenceCluster]:
    made = EvidenceCluster(directory / "evidence", etcd.endpoints, scope=f"test-{os.getpid()}")
    try:
        began = time.monotonic()
        made.start()
        print(f"evidence cluster started in {time.monotonic() - began:.1f} s")
        yield made
    finally:
        made.stop()


def leader_dsn(cluster: EvidenceCluster) -> str:
    """The leader as the superuser: the evidence user does not see pg_stat_replication's columns."""
    return cluster.dsn(cluster.wait_leader(None, timeout=60), dbname="postgres", user="postgres")


def test_the_url_writes_and_reads_through_the_leader_and_the_replica_streams(cluster: EvidenceCluster) -> None:
    assert cluster.leader() == "primary"
    assert cluster.streaming("backup")  # the synchronous standby
    assert "127.0.10.1" in cluster.url and "127.0.20.1" in cluster.url
    engine = make_engine(cluster.url)
    try:
        with engine.begin() as connection:
            connection.execute(text("CREATE TABLE probe (id serial PRIMARY KEY, note text NOT NULL)"))
            connection.execute(text("INSERT INTO probe (note) VALUES ('first')"))
        with engine.connect() as connection:
            assert connection.execute(text("SELECT note FROM probe")).scalars().all() == ["first"]
            assert connection.execute(text("SELECT host(inet_server_addr())")).scalar() == "127.0.10.1"
    finally:
        engine.dispose()
    # the backup site's replica holds it (read-only there)
    deadline = time.monotonic() + 10
    with psycopg.connect(cluster.dsn("backup"), autocommit=True) as replica:
        assert replica.execute("SELECT pg_is_in_recovery()").fetchone() == (True,)
        while replica.execute("SELECT count(*) FROM pg_class WHERE relname = 'probe'").fetchone() != (1,) or \
                replica.execute("SELECT note FROM probe").fetchall() != [("first",)]:
            assert time.monotonic() < deadline, "the replica did not replay the write"
            time.sleep(0.05)
    with psycopg.connect(leader_dsn(cluster), autocommit=True) as leader:
        rows = leader.execute("SELECT application_name, state, sync_state FROM pg_stat_replication").fetchall()
    assert rows == [("backup", "streaming", "sync")]


def test_the_evidence_schema_migrates_through_the_url(cluster: EvidenceCluster) -> None:
    migrate.upgrade(cluster.url)
    assert migrate.current_revisions(cluster.url) == migrate.head_revisions()
    engine = make_engine(cluster.url)
    try:
        with engine.connect() as connection:
            report = chain.verify(connection)
    finally:
        engine.dispose()
    assert report.ok and report.entries == 0 and report.records == 0


def test_the_other_site_takes_over_a_power_loss_without_losing_a_commit(cluster: EvidenceCluster) -> None:
    engine = make_engine(cluster.url)
    try:
        with engine.begin() as connection:
            connection.execute(text("CREATE TABLE IF NOT EXISTS probe (id serial PRIMARY KEY, note text NOT NULL)"))
            connection.execute(text("INSERT INTO probe (note) VALUES ('before the kill')"))
        old = cluster.leader()
        assert old is not None
        other = next(site for site in cluster.members if site != old)
        began = time.monotonic()
        cluster.kill(old)
        assert not cluster.running(old) and left_running(cluster.members[old].directory) == set()
        assert cluster.wait_leader(other, timeout=90) == other
        print(f"{other} took over {time.monotonic() - began:.1f} s after the kill of {old}")
        # the same URL finds the new leader; the pool's dead connections are replaced (pre-ping)
        with engine.begin() as connection:
            connection.execute(text("INSERT INTO probe (note) VALUES ('after the kill')"))
        with engine.connect() as connection:
            notes = connection.execute(text("SELECT note FROM probe")).scalars().all()
            served_by = connection.execute(text("SELECT host(inet_server_addr())")).scalar()
        assert served_by == cluster.members[other].address
        assert "before the kill" in notes and "after the kill" in notes

        began = time.monotonic()
        cluster.restart(old)
        cluster.wait_replica(old, timeout=60)  # rejoined (rewound when needed), synchronous again
        print(f"{old} rejoined as a replica in {time.monotonic() - began:.1f} s")
        assert cluster.leader() == other
    finally:
        engine.dispose()


def test_stopping_from_its_state_leaves_nothing_running(cluster: EvidenceCluster) -> None:
    """As `dr lab down` in another process would: from the JSON state alone."""
    assert left_running(cluster.directory)
    again = EvidenceCluster.from_state(json.loads(json.dumps(cluster.state())))
    assert again.url == cluster.url and {site: again.running(site) for site in again.members} == \
        {"primary": True, "backup": True}
    again.stop()
    assert left_running(cluster.directory) == set()
    assert cluster.leader() is None and not any(cluster.running(site) for site in cluster.members)


def test_a_failed_start_leaves_nothing_running(directory: Path) -> None:
    nowhere = f"http://127.0.10.1:{scratch.free_port()}"  # no etcd there: Patroni never bootstraps
    failing = EvidenceCluster(directory / "failing", [nowhere], scope="nowhere")
    with pytest.raises(EvidenceLabError, match="did not lead"):
        failing.start(timeout=2)
    assert left_running(failing.directory) == set()
