"""`dr lab up --ha`, `dr lab partition SITE` / `dr lab heal` and an HA lab's kill-site, against the real parts:
the two-site lab, a real 3-member etcd, the orchestrator node processes (`dr node run`), the evidence
PostgreSQL under Patroni and real nftables rules (root).

One HA lab for the whole module (its tests run in file order: the kill-site test breaks it last); a second
lab slot, with only its etcd, shows that parallel labs' partitions do not touch each other.
"""

from __future__ import annotations

import json
import os
import shutil
import socket
import stat
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
from click.testing import CliRunner
from sqlalchemy import func, select
from support.waiting import wait_for

from dr_orchestrator.cluster.gateway import ClusterError, Gateway
from dr_orchestrator.cluster.journal import read_journal
from dr_orchestrator.cluster.leadership import Leadership, read_leader
from dr_orchestrator.cluster.status import cluster_status
from dr_orchestrator.evidence.database import make_engine
from dr_orchestrator.evidence.models import Run
from dr_orchestrator.lab import partition, scratch
from dr_orchestrator.lab.cli import lab_group
from dr_orchestrator.lab.config import HA_SITES, SERVICES, LabConfig
from dr_orchestrator.lab.etcd import ETCD, EtcdCluster, member_health
from dr_orchestrator.lab.ha import LEADER_KEY, NODE_PROGRAM, HaCluster, node_name
from dr_orchestrator.lab.lab import Lab
from dr_orchestrator.lab.processes import is_running, processes_under
from dr_orchestrator.loading import load_node_config

pytestmark = [
    pytest.mark.lab, pytest.mark.etcd, pytest.mark.slow,
    pytest.mark.skipif(os.geteuid() != 0, reason="partitions need root (nftables, per-site groups)"),
    pytest.mark.skipif(shutil.which("nft") is None, reason="needs nftables"),
    pytest.mark.skipif(not os.access(ETCD, os.X_OK), reason="needs etcd-server"),
]

MEASURED: dict[str, float] = {}


def invoke(lab: Lab, *args: str) -> tuple[int, str]:
    result = CliRunner().invoke(lab_group, ["--root", str(lab.config.root), *args])
    return result.exit_code, result.output


def leader_via(endpoints: list[str]) -> str | None:
    try:
        info = read_leader(Gateway(endpoints, timeout_s=0.5), LEADER_KEY)
    except ClusterError:
        return None
    return info.node if info else None


def gid_of(pid: int) -> tuple[int, str]:
    """(effective gid, supplementary groups) of a running process."""
    fields = dict(line.split(":", 1) for line in Path(f"/proc/{pid}/status").read_text().splitlines() if ":" in line)
    return int(fields["Gid"].split()[1]), fields["Groups"].strip()


def our_tables() -> set[str]:
    listed = subprocess.run(["nft", "list", "tables"], capture_output=True, text=True, check=True).stdout
    return {line.split()[-1] for line in listed.splitlines() if line.strip()}


@pytest.fixture(scope="module")
def ha_lab() -> Iterator[Lab]:
    """One HA lab for the module; always taken down (nodes, etcd, the partition table) however tests end."""
    with scratch.lab_slot("own") as config:
        lab = Lab(config)
        try:
            started = time.monotonic()
            lab.up(ha=True)
            MEASURED["lab up --ha"] = time.monotonic() - started
            yield lab
        finally:
            lab.down()
            assert partition.table_name(config.root) not in our_tables()
    print("\nmeasured: "
          + ", ".join(f"{what} {seconds:.2f} s" for what, seconds in MEASURED.items()))


def cluster_of(lab: Lab) -> HaCluster:
    cluster = lab.ha()
    assert cluster is not None
    return cluster


# --- up --ha ---------------------------------------------------------------------------------------------


def test_up_ha_runs_a_node_and_an_etcd_member_per_site_with_the_primary_node_leading(ha_lab: Lab) -> None:
    cluster = cluster_of(ha_lab)
    config = ha_lab.config
    code, output = invoke(ha_lab, "status", "--output", "json")
    report = json.loads(output)
    assert code == 0, report["problems"]
    ha = report["ha"]
    assert [(n["node"], n["site"], n["pid"] is not None) for n in ha["nodes"]] == \
        [(node_name(site), site, True) for site in HA_SITES]
    assert all(member["healthy"] for member in ha["etcd"]) and ha["quorum"]
    assert ha["leader"]["node"] == "node-primary" and ha["partition"] is None

    # Each site's node and etcd member run with the site's own group and no other.
    for site in HA_SITES:
        for pid in (cluster.etcd.pid(site), report["ha"]["nodes"][HA_SITES.index(site)]["pid"]):
            assert pid is not None and gid_of(pid) == (config.site_gid(site), "")
    assert len({config.site_gid(site) for site in HA_SITES}) == 3

    # The node configurations the lab wrote load as the product reads them.
    for site in HA_SITES:
        node = load_node_config(str(config.node_config(site)))
        assert (node.node, node.site, node.lease_ttl, node.leader_key) == (node_name(site), site, 2.0, LEADER_KEY)
        assert list(node.etcd) == cluster.etcd.endpoints
        assert node.api.host == config.address(site) and node.inventory == str(config.inventory_path)
        assert node.journal == str(config.node_dir(site) / "journal.jsonl")
        assert node.evidence == f"file:{config.nodes_dir / 'evidence-url'}"
    url_file = config.nodes_dir / "evidence-url"
    assert stat.S_IMODE(url_file.stat().st_mode) == 0o600
    assert "target_session_attrs=read-write" in url_file.read_text()  # both Patroni members: the leader

    code, output = invoke(ha_lab, "status")
    assert "node-primary leads" in output and "partition: none" in output


# --- partition / heal ------------------------------------------------------------------------------------


def test_partition_primary_moves_leadership_to_the_majority_and_heal_lets_the_member_rejoin(ha_lab: Lab) -> None:
    cluster = cluster_of(ha_lab)
    endpoints = {site: cluster.etcd.endpoint(site) for site in HA_SITES}
    majority = [endpoints["backup"], endpoints["witness"]]
    assert leader_via(list(endpoints.values())) == "node-primary"

    started = time.monotonic()
    code, output = invoke(ha_lab, "partition", "primary")
    assert code == 0, output
    try:
        leader = wait_for(lambda: (node := leader_via(majority)) in ("node-backup", "node-witness") and node,
                          timeout=20, what="a node at backup or witness to take the leader key")
        MEASURED["partition primary -> new leader"] = time.monotonic() - started
        assert leader in ("node-backup", "node-witness")

        # The primary member lost the quorum: it sees no raft leader, and nothing is written through it.
        wait_for(lambda: not member_health(endpoints["primary"], timeout=0.5), timeout=10,
                 what="the primary member to report unhealthy")
        status = cluster_status(list(endpoints.values()), LEADER_KEY, timeout_s=0.5)
        health = {entry["endpoint"]: entry["healthy"] for entry in status["health"]}
        assert health == {endpoints["primary"]: False, endpoints["backup"]: True, endpoints["witness"]: True}
        assert status["quorum"] and status["leader"]["node"] == leader
        cut_off = Leadership([endpoints["primary"]], "probe-at-primary", 2, "/dr/test-probe", request_timeout_s=0.5)
        with pytest.raises(ClusterError):
            cut_off.campaign_once()
        # The majority still hands out leader keys (an in-process campaign on the backup and witness members).
        majority_side = Leadership(majority, "probe-at-backup", 2, "/dr/test-probe")
        try:
            assert majority_side.campaign_once() is not None
        finally:
            majority_side.stop()
        code, output = invoke(ha_lab, "status", "--output", "json")
        report = json.loads(output)
        assert code == 1 and report["ha"]["partition"] == "primary"
        # The cut-off node and member keep running (cut off, not dead).
        assert all(node["pid"] and is_running(node["pid"]) for node in report["ha"]["nodes"])
        assert any("partition is in force" in problem for problem in report["problems"])
        # Only the sites' groups are cut: a process in none (the front door, the services, this test) still
        # reaches the primary site, and clients are served from it.
        with socket.create_connection((ha_lab.config.address("primary"), ha_lab.config.sshd_port), timeout=2):
            pass
        # The new leader's watch finds the primary site down (its own probes are cut), but every service it
        # serves still answers at the front door: it holds back instead of failing the site over.
        leader_log = ha_lab.config.node_dir(leader.removeprefix("node-")) / "node.log"
        try:
            wait_for(lambda: "clients are still served through the front door: no failover" in leader_log.read_text(),
                     timeout=30, what="the new leader's watch to hold the cut-off site back")
        except AssertionError as failure:
            raise AssertionError(f"{failure}; its log ends:\n{leader_log.read_text()[-6000:]}") from None
        wait_for(lambda: all(serving_site(ha_lab, service) == "primary" for service in SERVICES), timeout=10,
                 what="every service served from the primary through the front door")
    finally:
        code, output = invoke(ha_lab, "heal")
    assert code == 0 and "healed" in output
    assert partition.table_name(ha_lab.config.root) not in our_tables()

    # The primary member rejoins and sees the same leader as the others; the leader stays where it is.
    wait_for(lambda: member_health(endpoints["primary"], timeout=0.5), timeout=15,
             what="the primary member to rejoin after heal")
    wait_for(lambda: leader_via([endpoints["primary"]]) == leader, timeout=10,
             what="the primary member to serve the new leader key")
    assert invoke(ha_lab, "heal")[1].strip() == "No partition was in force."
    # Nothing was failed over: no node ran or journaled a run, and clients are still served from the primary.
    for site in HA_SITES:
        journal = ha_lab.config.node_dir(site) / "journal.jsonl"
        assert not [r for r in read_journal(journal).records if r.event is not None], site
    url = (ha_lab.config.nodes_dir / "evidence-url").read_text().strip()
    engine = make_engine(url)
    try:
        with engine.connect() as connection:
            assert connection.scalar(select(func.count()).select_from(Run)) == 0
    finally:
        engine.dispose()
    assert all(serving_site(ha_lab, service) == "primary" for service in SERVICES)


def serving_site(lab: Lab, service: str) -> str | None:
    """The site that answers the service's /health through the front door, as a client sees it."""
    answer = httpx.get(f"{lab.config.frontend_url(service)}/health", timeout=2.0)
    return answer.json().get("site") if answer.status_code == 200 else None


def test_parallel_labs_partitions_do_not_touch_each_other(ha_lab: Lab) -> None:
    """Another lab's etcd, with its own groups and table, through a cut of ours and a cut of its own."""
    ours = cluster_of(ha_lab)
    with scratch.lab_slot("own") as other_config:
        gids = {site: other_config.site_gid(site) for site in HA_SITES}
        assert not set(gids.values()) & set(ours.gids.values())
        other_table = partition.table_name(other_config.root)
        assert other_table != ours.table
        other = EtcdCluster(other_config.etcd_dir, gids=gids)
        addresses = {site: other_config.address(site) for site in HA_SITES}
        try:
            other.start()
            ha_lab.partition("primary")
            # while our primary member goes unhealthy, every member of the other lab stays healthy
            def ours_cut() -> bool:
                assert all(member_health(url, timeout=1.0) for url in other.endpoints), "the other lab was cut"
                return not member_health(ours.etcd.endpoint("primary"), timeout=0.5)
            wait_for(ours_cut, timeout=10, what="our primary member to be cut off")
            ha_lab.heal()
            wait_for(lambda: member_health(ours.etcd.endpoint("primary"), timeout=0.5), timeout=15,
                     what="our primary member to rejoin")

            partition.cut(other_table, "primary", gids, addresses)
            def theirs_cut() -> bool:
                assert all(member_health(url, timeout=1.0) for url in ours.etcd.endpoints), "our lab was cut"
                return not member_health(other.endpoint("primary"), timeout=0.5)
            wait_for(theirs_cut, timeout=10, what="the other lab's primary member to be cut off")
            assert ha_lab.status()["ha"]["partition"] is None
        finally:
            partition.heal(other_table)
            other.stop()
        assert other_table not in our_tables()


def test_partition_refusals_are_one_sentence(ha_lab: Lab, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    result = CliRunner().invoke(lab_group, ["--root", str(tmp_path / "no-lab"), "partition", "primary"])
    assert result.exit_code == 2 and "is not an HA lab" in result.output and "Traceback" not in result.output

    monkeypatch.setattr(partition, "NFT_CANDIDATES", ("/nonexistent/nft",))
    code, output = invoke(ha_lab, "partition", "backup")
    assert code == 2 and "install it with `sudo apt-get install nftables`" in output
    assert partition.table_name(ha_lab.config.root) not in our_tables()


# --- kill-site and down (last: they break the lab) ------------------------------------------------------------


def test_kill_site_takes_the_sites_node_and_etcd_member_and_down_removes_everything(ha_lab: Lab) -> None:
    cluster = cluster_of(ha_lab)
    config = ha_lab.config
    majority = [cluster.etcd.endpoint("backup"), cluster.etcd.endpoint("witness")]
    leader_before = leader_via(majority)
    node_pid = json.loads(invoke(ha_lab, "status", "--output", "json")[1])["ha"]["nodes"][0]["pid"]
    etcd_pid = cluster.etcd.pid("primary")

    code, output = invoke(ha_lab, "kill-site", "primary")
    assert code == 0, output
    assert "node@primary" in output and "etcd@primary" in output and "sshd@primary" in output
    assert not is_running(node_pid) and etcd_pid is not None and not is_running(etcd_pid)
    if leader_before == "node-primary":
        wait_for(lambda: leader_via(majority) in ("node-backup", "node-witness"), timeout=20,
                 what="leadership to leave the dead primary site")

    # Power back: its etcd member rejoins and its node runs again.
    code, output = invoke(ha_lab, "start-site", "primary")
    assert code == 0, output
    wait_for(lambda: member_health(cluster.etcd.endpoint("primary"), timeout=0.5), timeout=15,
             what="the primary member to rejoin after start-site")

    # `dr lab down` from another process: heals the partition in force, stops nodes and etcd, leaves nothing.
    ha_lab.partition("witness")
    assert partition.table_name(config.root) in our_tables()
    pids = [pid for pid in (cluster.etcd.pid(site) for site in HA_SITES) if pid]
    result = subprocess.run([*NODE_PROGRAM, "lab", "--root", str(config.root), "down"], capture_output=True,
                            text=True, timeout=60)
    assert result.returncode == 0, result.stderr
    assert "node@witness" in result.stdout and "etcd@backup" in result.stdout
    assert partition.table_name(config.root) not in our_tables()
    assert not [pid for pid in pids if is_running(pid)] and processes_under(config.root) == set()
    assert not config.root.exists()


def test_gids_are_distinct_across_port_offsets() -> None:
    seen: dict[int, tuple[int, str]] = {}
    for offset in [*range(-1198, -1190), *range(0, 20), *scratch.LAB_PORT_OFFSETS, 47432]:
        for site in HA_SITES:
            gid = LabConfig(root=Path("/tmp/x"), port_offset=offset).site_gid(site)
            assert gid not in seen and gid > 65535, (offset, site, seen.get(gid))
            seen[gid] = (offset, site)
