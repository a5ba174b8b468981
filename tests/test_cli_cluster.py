"""`dr cluster status` against a real three-member etcd, and a node's configuration file."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
from support.cluster import etcd_cluster

from dr_orchestrator.cluster import Leadership
from dr_orchestrator.cluster.members import register_member
from dr_orchestrator.lab.etcd import ETCD, EtcdCluster
from dr_orchestrator.loading import load_node_config
from dr_orchestrator.yamlsource import LoadError

pytestmark = [pytest.mark.etcd, pytest.mark.skipif(not os.access(ETCD, os.X_OK), reason="needs etcd-server")]
EXAMPLE = Path(__file__).resolve().parent.parent / "deploy" / "cluster" / "node.example.yml"


@pytest.fixture(scope="module")
def etcd() -> Iterator[EtcdCluster]:
    with etcd_cluster("dr-etcd-cli-") as members:
        yield members


def dr(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "dr_orchestrator.cli", *args], capture_output=True, text=True,
                          timeout=60)


def node_config(path: Path, endpoints: list[str], key: str, journal: Path) -> Path:
    path.write_text("node: dr-backup-1\nsite: backup\netcd:\n" + "".join(f"  - {e}\n" for e in endpoints)
                    + f"leader_key: {key}\njournal: {journal}\n")
    return path


@pytest.mark.slow
def test_status_names_the_members_the_leader_and_its_lease(etcd: EtcdCluster, tmp_path: Path) -> None:
    key = f"/dr/test-cli-{os.getpid()}/leader"
    config = node_config(tmp_path / "node.yml", etcd.endpoints, key, tmp_path / "journal.jsonl")
    before = dr("cluster", "status", "--config", str(config), "-o", "json")
    assert before.returncode == 0, before.stderr
    status = json.loads(before.stdout)
    assert status["healthy_members"] == 3 and status["quorum"] and status["leader"] is None
    assert status["journal"]["backlog"] == 0

    leader = Leadership(etcd.endpoints, "dr-primary-1", ttl_s=2, key_prefix=key).start()
    try:
        assert leader.wait_until_leader(10)
        register_member(leader.gateway, key, "dr-primary-1", {"site": "primary", "api": "10.10.0.21:8080"})
        register_member(leader.gateway, key, "dr-backup-1", {"site": "backup", "api": "10.20.0.21:8080"})
        shown = dr("cluster", "status", "--config", str(config))
        assert shown.returncode == 0, shown.stderr
        assert "3 of 3 members healthy, quorum" in shown.stdout
        token = leader.token()
        assert f"leader: dr-primary-1 (fencing token {token.revision}," in shown.stdout
        assert "node dr-backup-1 at site backup: API 10.20.0.21:8080\n" in shown.stdout
        assert "node dr-primary-1 at site primary: API 10.10.0.21:8080 (leader)\n" in shown.stdout
    finally:
        leader.stop()


@pytest.mark.slow
def test_without_quorum_the_status_says_so_and_exits_1(tmp_path: Path) -> None:
    with etcd_cluster("dr-etcd-cli-") as members:
        members.kill("primary")
        members.kill("witness")
        shown = dr("cluster", "status", *[arg for e in members.endpoints for arg in ("--etcd", e)])
    assert shown.returncode == 1, shown.stdout + shown.stderr
    assert "NO QUORUM: no node can lead" in shown.stdout


def test_a_bad_node_configuration_is_named_by_line_and_field(tmp_path: Path) -> None:
    bad = tmp_path / "node.yml"
    bad.write_text("node: dr-backup-1\nsite: backup\netcd:\n  - 10.0.0.1\nlease_ttl: 1s\njournal: /tmp/j\n"
                   "evidence: postgresql://dr:secret@db/dr\n")
    with pytest.raises(LoadError) as raised:
        load_node_config(str(bad))
    problems = {(p.field, p.line) for p in raised.value.problems}
    assert problems == {("etcd", 4), ("lease_ttl", 5), ("evidence", 7)}, raised.value.problems
    shown = dr("cluster", "status", "--config", str(bad))
    assert shown.returncode == 2
    assert "node.yml" in shown.stderr and "lease_ttl" in shown.stderr and "secret" not in shown.stderr


def test_the_shipped_example_configuration_loads() -> None:
    config = load_node_config(str(EXAMPLE))
    assert config.site == "backup" and len(config.etcd) == 3 and config.evidence == "env:DR_DATABASE_URL"


def test_status_wants_a_configuration_or_endpoints() -> None:
    shown = dr("cluster", "status")
    assert shown.returncode == 2 and "--config FILE" in shown.stderr
