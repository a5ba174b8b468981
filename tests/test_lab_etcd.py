"""The lab's etcd cluster (dr_orchestrator.lab.etcd): real etcd members, one per site, started, killed,
restarted and always stopped."""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest
from etcd3gw.client import Etcd3Client

from dr_orchestrator.lab import scratch
from dr_orchestrator.lab.etcd import ETCD, ETCD_SITES, EtcdCluster, member_health, stop_all_under
from dr_orchestrator.lab.processes import command_line

pytestmark = [pytest.mark.etcd, pytest.mark.skipif(not os.access(ETCD, os.X_OK), reason="needs etcd-server")]


@pytest.fixture
def directory() -> Iterator[Path]:
    path = Path(tempfile.mkdtemp(prefix="dr-etcd-test-", dir=scratch.scratch_base()))
    try:
        yield path
    finally:
        stop_all_under(path)
        shutil.rmtree(path, ignore_errors=True)


def etcd_pids_under(directory: Path) -> set[int]:
    needle = f"--data-dir={directory}/"
    return {int(pid) for pid in os.listdir("/proc") if pid.isdigit()
            and needle in (command_line(int(pid)) or "") and (command_line(int(pid)) or "").startswith(ETCD)}


def client(url: str) -> Etcd3Client:
    host, port = url.removeprefix("http://").split(":")
    return Etcd3Client(host=host, port=int(port), timeout=5, api_path="/v3/")


def test_a_member_per_site_killed_restarted_and_stopped(directory: Path) -> None:
    with EtcdCluster(directory) as cluster:
        assert [member.address for member in cluster.members.values()] == \
            ["127.0.10.1", "127.0.20.1", "127.0.30.1"] == [ETCD_SITES[site] for site in cluster.sites]
        cluster.wait_healthy()  # start waited for it; asked again, bounded (under load an election may be running)
        names = sorted(member["name"] for member in client(cluster.endpoint("backup")).members())
        assert names == ["backup", "primary", "witness"]
        assert all(member.data_dir.is_relative_to(directory) for member in cluster.members.values())
        assert len(etcd_pids_under(directory)) == 3

        client(cluster.endpoint("primary")).put("/probe", "before the kill")
        killed = cluster.pid("witness")
        cluster.kill("witness")
        assert not cluster.running("witness") and killed not in etcd_pids_under(directory)
        assert not member_health(cluster.endpoint("witness"))
        # two of three keep the quorum (after an election, when the witness led raft): writes go on
        cluster.wait_healthy(timeout=10, sites=["primary", "backup"])
        client(cluster.endpoint("backup")).put("/probe", "while the witness is down")

        cluster.restart("witness")
        assert cluster.running("witness")
        cluster.wait_healthy(sites=["witness"])
        # it rejoined with its own data and caught up with what it missed
        assert client(cluster.endpoint("witness")).get("/probe") == [b"while the witness is down"]
    assert etcd_pids_under(directory) == set()


def test_every_member_is_stopped_when_the_body_fails(directory: Path) -> None:
    with pytest.raises(RuntimeError, match="a failing test"), EtcdCluster(directory, sites=("primary", "witness")):
        assert len(etcd_pids_under(directory)) == 2
        raise RuntimeError("a failing test")
    assert etcd_pids_under(directory) == set()


def test_members_left_by_a_killed_session_are_found_and_stopped(directory: Path) -> None:
    cluster = EtcdCluster(directory, sites=("backup",))
    cluster.start()
    pid = cluster.pid("backup")
    assert pid is not None
    child = cluster._children.pop("backup")  # as if the process that started it had died without stopping it
    assert stop_all_under(directory) == {pid}
    assert etcd_pids_under(directory) == set()
    assert child.wait(timeout=5) == -9


@pytest.mark.slow
def test_another_process_finds_kills_and_restarts_members_from_the_state(directory: Path) -> None:
    with EtcdCluster(directory) as cluster:
        state = json.loads(json.dumps(cluster.state()))
        other = EtcdCluster.from_state(state)  # e.g. `dr lab kill-site` after `dr lab up`
        assert other.endpoints == cluster.endpoints
        pid = cluster.pid("primary")
        assert pid is not None and other.pid("primary") == pid
        other.kill("primary")
        assert not cluster.running("primary") and pid not in etcd_pids_under(directory)
        other.restart("primary")
        assert other.running("primary")
        cluster.wait_healthy(sites=["primary"])  # the first object sees it answer too (an election may be under way)
        assert cluster.pid("primary") == other.pid("primary") != pid  # both see the new process
    assert etcd_pids_under(directory) == set()  # the first object's stop took the restarted member too


def test_a_site_without_an_address_is_refused(directory: Path) -> None:
    with pytest.raises(ValueError, match="etcd sites must be among"):
        EtcdCluster(directory, sites=("primary", "mars"))


@pytest.mark.skipif(os.geteuid() != 0, reason="members run with groups of their own only when started as root")
def test_members_run_with_their_sites_group_and_the_raft_leader_moves_to_the_witness(directory: Path) -> None:
    gids = {"primary": 3_999_990, "backup": 3_999_991, "witness": 3_999_992}
    with EtcdCluster(directory, gids=gids) as cluster:
        for site, gid in gids.items():
            status = dict(line.split(":", 1) for line in Path(f"/proc/{cluster.pid(site)}/status").read_text()
                          .splitlines() if ":" in line)
            assert int(status["Gid"].split()[1]) == gid and status["Groups"].strip() == ""
        assert EtcdCluster.from_state(json.loads(json.dumps(cluster.state()))).gids == gids  # restarts keep them
        cluster.move_raft_leader("witness")
        assert cluster.raft_leader() == "witness"
        cluster.kill("backup")
        cluster.restart("backup")
        status = Path(f"/proc/{cluster.pid('backup')}/status").read_text()
        assert f"\t{gids['backup']}\t" in next(line for line in status.splitlines() if line.startswith("Gid:"))
