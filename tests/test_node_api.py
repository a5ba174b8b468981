"""What a cluster node (`dr node run`) hosts, against a real etcd and two nodes on one evidence database:
the API (the leader acts; a follower serves reads, refuses a request without a valid token at the door
and forwards the rest to the leader; 503 when no leader answers) and the drill scheduler (it fires
only on the leader, each drill fenced under the leader's term)."""

from __future__ import annotations

import contextlib
import itertools
import os
import textwrap
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from api_support import INVENTORIES, RUNBOOKS
from sqlalchemy import select
from sqlalchemy.orm import Session, sessionmaker
from support.cluster import etcd_cluster, running_node
from support.waiting import wait_for

from dr_orchestrator.api.forwarding import FORWARDED_BY, FORWARDED_TO
from dr_orchestrator.api.tokens import create_token
from dr_orchestrator.cluster import Leadership
from dr_orchestrator.cluster.members import register_member
from dr_orchestrator.engine.executor import FENCING_CHECKED
from dr_orchestrator.evidence.models import ActionEventRecord, AuditEvent, DrillRun, Run
from dr_orchestrator.lab.etcd import ETCD, EtcdCluster
from dr_orchestrator.lab.scratch import free_port
from dr_orchestrator.model.cluster import ApiBinding, NodeConfig
from dr_orchestrator.node.hosting import ApiServer, DrillScheduler
from dr_orchestrator.node.service import Node

pytestmark = [pytest.mark.etcd, pytest.mark.skipif(not os.access(ETCD, os.X_OK), reason="needs etcd-server")]

_keys = itertools.count()
RUN = {"runbook": "restore-trading.yml", "inventory": "two-services.yml"}
LEADING_S = 20  # an election on the test's etcd, and the takeover settling


@pytest.fixture(scope="module")
def etcd() -> Iterator[EtcdCluster]:
    with etcd_cluster("dr-node-api-test-") as cluster:
        yield cluster


@pytest.fixture
def engineer(sessions: sessionmaker[Session]) -> dict[str, str]:
    with sessions() as session:
        _row, secret = create_token(session, "erin", "engineer", "test", None)
        session.commit()
    return {"Authorization": f"Bearer {secret}"}


def make_node(endpoints: list[str], tmp_path: Path, sessions: sessionmaker[Session], name: str, key: str,
              drills: Path | None = None, scheduling: bool = False) -> Node:
    config = NodeConfig(node=name, site="backup", etcd=tuple(endpoints), leader_key=key,
                        journal=str(tmp_path / f"{name}.journal"), api=ApiBinding(port=free_port()),
                        runbooks=str(RUNBOOKS), inventories=str(INVENTORIES), drills=str(drills or tmp_path / "drills"))
    return Node(config, tmp_path / "node.yml", sessions, watch_factory=lambda node: None, api_factory=ApiServer,
                scheduler_factory=DrillScheduler if scheduling else None)


def api(node: Node) -> str:
    return f"http://{node.config.api.host}:{node.config.api.port}"


def serving(node: Node, headers: dict[str, str]) -> bool:
    try:
        return httpx.get(f"{api(node)}/api/runs", headers=headers, timeout=2).status_code == 200
    except httpx.HTTPError:
        return False


def refusals(sessions: sessionmaker[Session]) -> list[dict[str, Any]]:
    with sessions() as session:
        return [event.data for event in session.scalars(select(AuditEvent).where(AuditEvent.action == "api.refused"))]


def test_a_follower_forwards_a_run_to_the_leader_and_serves_reads_itself(
        etcd: EtcdCluster, sessions: sessionmaker[Session], engineer: dict[str, str], tmp_path: Path) -> None:
    key = f"/dr-node-api-test-{next(_keys)}/leader"
    leader = make_node(etcd.endpoints, tmp_path, sessions, "node-a", key)
    follower = make_node(etcd.endpoints, tmp_path, sessions, "node-b", key)
    with running_node(leader):
        wait_for(leader.is_leader, LEADING_S, "node-a leads")
        with running_node(follower):
            wait_for(lambda: serving(follower, engineer), 10, "node-b's API answers")
            started = httpx.post(f"{api(follower)}/api/runs", json=RUN, headers=engineer, timeout=30)
            assert started.status_code == 202, started.text
            assert started.headers[FORWARDED_TO] == "node-a"
            run_id = started.json()["run_id"]

            def ended() -> dict[str, Any] | None:
                answer = httpx.get(f"{api(follower)}/api/runs/{run_id}", headers=engineer, timeout=5)
                assert answer.status_code == 200 and FORWARDED_TO not in answer.headers  # read where it was asked
                run = answer.json()["run"]
                return run if run["state"] not in ("running", "pending") else None

            run = wait_for(ended, 20, "the forwarded run ends")
            assert run["state"] == "succeeded", run
            token = str(leader.leadership.token())

            # without a valid token: refused at the follower's door, never forwarded
            anonymous = httpx.post(f"{api(follower)}/api/runs", json=RUN, timeout=10)
            assert anonymous.status_code == 401 and FORWARDED_TO not in anonymous.headers
            assert anonymous.json() == {"error": anonymous.json()["error"], "status": 401}
            assert [r["status"] for r in refusals(sessions)] == [401]  # the leader never saw it

            # a request another node forwarded is not forwarded again
            again = httpx.post(f"{api(follower)}/api/runs", json=RUN, timeout=10,
                               headers={**engineer, FORWARDED_BY: "node-c"})
            assert again.status_code == 503 and "does not forward it again" in again.json()["error"]

    with sessions() as session:
        recorded = session.get_one(Run, run_id)
        fenced = list(session.scalars(select(ActionEventRecord.data).where(
            ActionEventRecord.run_id == run_id, ActionEventRecord.kind == FENCING_CHECKED)))
        started_by = session.scalars(select(AuditEvent.actor).where(AuditEvent.action == "run.start")).all()
    assert recorded.orchestrator_host == "node-a" and recorded.started_by == "erin"
    assert fenced and all(data["token"] == token for data in fenced)  # every changing step under node-a's term
    assert started_by == ["erin"]  # audited once, by the leader


def test_a_follower_answers_503_when_no_leader_can_take_the_request(
        etcd: EtcdCluster, sessions: sessionmaker[Session], engineer: dict[str, str], tmp_path: Path) -> None:
    key = f"/dr-node-api-test-{next(_keys)}/leader"
    silent_port = free_port()  # nothing listens there
    ghost = Leadership(etcd.endpoints, "dr-ghost", ttl_s=2, key_prefix=key).start()
    try:
        assert ghost.wait_until_leader(10)
        register_member(ghost.gateway, key, "dr-ghost", {"site": "witness", "api": f"127.0.0.1:{silent_port}"})
        follower = make_node(etcd.endpoints, tmp_path, sessions, "node-b", key)
        with running_node(follower):
            wait_for(lambda: serving(follower, engineer), 10, "node-b's API answers")
            answer = httpx.post(f"{api(follower)}/api/runs", json=RUN, headers=engineer, timeout=30)
    finally:
        ghost.stop()
    assert answer.status_code == 503
    assert answer.json() == {"error": answer.json()["error"], "status": 503}
    assert answer.json()["error"].startswith(f"leader dr-ghost at 127.0.0.1:{silent_port} did not answer")
    with sessions() as session:
        assert session.scalars(select(Run)).all() == []  # nothing ran anywhere


def test_without_quorum_a_node_does_not_act_and_says_there_is_no_leader(
        sessions: sessionmaker[Session], engineer: dict[str, str], tmp_path: Path) -> None:
    with etcd_cluster("dr-node-api-quorum-") as own:
        node = make_node(own.endpoints, tmp_path, sessions, "node-a", "/dr/leader")
        with running_node(node):
            wait_for(node.is_leader, LEADING_S, "node-a leads")
            own.kill("primary")
            own.kill("witness")
            wait_for(lambda: not node.is_leader(), 10, "node-a stops leading without quorum")
            answer = httpx.post(f"{api(node)}/api/runs", json=RUN, headers=engineer, timeout=30)
            assert serving(node, engineer)  # reads still served
    assert answer.status_code == 503, answer.text
    assert answer.json()["error"].startswith("no leader"), answer.json()
    with sessions() as session:
        assert session.scalars(select(Run)).all() == []


def quick_drill(directory: Path) -> Path:
    """A drill of noop steps firing every second."""
    data = Path(__file__).resolve().parent / "data" / "drills"
    directory.mkdir(parents=True, exist_ok=True)
    (directory / "every-second.yml").write_text(textwrap.dedent(f"""\
        name: every-second
        scenario: planned_maintenance
        inventory: {Path(__file__).resolve().parent.parent / 'inventories' / 'local.yml'}
        runbook:
          path: {data / 'quick-failover.yml'}
          parameters: {{hold: 0s}}
        failback: {data / 'quick-failback.yml'}
        cleanup:
          - {{id: tidy, action: noop}}
        schedule: {{cron: "* * * * * *", timezone: UTC}}
        """))
    return directory


def test_the_scheduler_fires_drills_only_on_the_leader_each_fenced_under_its_term(
        etcd: EtcdCluster, sessions: sessionmaker[Session], tmp_path: Path) -> None:
    key = f"/dr-node-api-test-{next(_keys)}/leader"
    drills = quick_drill(tmp_path / "drills")
    first = make_node(etcd.endpoints, tmp_path, sessions, "node-a", key, drills, scheduling=True)
    second = make_node(etcd.endpoints, tmp_path, sessions, "node-b", key, drills, scheduling=True)
    with contextlib.ExitStack() as still_running:
        with running_node(first):
            wait_for(first.is_leader, LEADING_S, "node-a leads")
            still_running.enter_context(running_node(second))
            wait_for(lambda: "finished" in states_of(sessions, "node-a"), 20, "a drill fired on node-a finishes")
            assert not second.is_leader() and states_of(sessions, "node-b") == []
        # node-a stopped (it resigned): node-b leads, and only from then on fires
        assert holders_of_terms(sessions) == {"node-a": {"node-a"}}
        wait_for(second.is_leader, LEADING_S, "node-b leads")
        wait_for(lambda: "finished" in states_of(sessions, "node-b"), 20, "a drill fired on node-b finishes")
    assert holders_of_terms(sessions) == {"node-a": {"node-a"}, "node-b": {"node-b"}}


def states_of(sessions: sessionmaker[Session], host: str) -> list[str]:
    with sessions() as session:
        return list(session.scalars(select(DrillRun.state).where(DrillRun.orchestrator_host == host)))


def holders_of_terms(sessions: sessionmaker[Session]) -> dict[str, set[str]]:
    """host -> the nodes whose terms its drills' changing steps acted under (a token is
    ``REVISION@NODE/lease:ID``; on a loaded machine a node may lose its lease and lead again under a new
    term of its own)."""
    found: dict[str, set[str]] = {}
    with sessions() as session:
        rows = session.execute(select(Run.orchestrator_host, ActionEventRecord.data).join(
            ActionEventRecord, ActionEventRecord.run_id == Run.id).where(ActionEventRecord.kind == FENCING_CHECKED))
        for host, data in rows:
            found.setdefault(host, set()).add(data["token"].split("@", 1)[1].split("/", 1)[0])
    return found
