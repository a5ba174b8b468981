"""The cluster node (`dr node run`) against a real etcd: a node that comes to lead resumes what the
cluster's nodes left interrupted (each step once, fenced under its own term), leaves a run that needs an
engineer's decision alone with the refusal recorded, and lets its watch decide only once that is done."""

from __future__ import annotations

import itertools
import os
from collections.abc import Iterator
from datetime import timedelta
from pathlib import Path

import pytest
from sqlalchemy import select
from sqlalchemy.orm import Session, sessionmaker
from support.cluster import etcd_cluster, running_node
from support.plans import make_plan
from support.waiting import wait_for

from dr_orchestrator.cluster.members import read_members, register_member
from dr_orchestrator.evidence import queries
from dr_orchestrator.evidence.models import ActionEventRecord, AuditEvent, RunProcess
from dr_orchestrator.evidence.store import EvidenceStore
from dr_orchestrator.lab.etcd import ETCD, EtcdCluster
from dr_orchestrator.model.cluster import NodeConfig
from dr_orchestrator.model.events import RunStarted, StepStarted, utcnow
from dr_orchestrator.node.service import TAKEOVER_ACTION, TAKEOVER_REFUSED_ACTION, Node
from dr_orchestrator.runs.execute import execute

pytestmark = [pytest.mark.etcd, pytest.mark.skipif(not os.access(ETCD, os.X_OK), reason="needs etcd-server")]

_keys = itertools.count()
RUNBOOK = """
    name: switchover
    steps:
      - {id: fence-old, action: noop, effect: reversible}
      - {id: promote, action: noop, effect: irreversible, needs: [fence-old]}
      - {id: switch, action: noop, effect: reversible, needs: [promote], marks: [service_restored]}
"""
UNDECIDABLE = """
    name: needs-an-engineer
    steps:
      - {id: promote, action: noop, effect: irreversible, idempotent: false}
      - {id: switch, action: noop, needs: [promote]}
"""


@pytest.fixture(scope="module")
def etcd() -> Iterator[EtcdCluster]:
    with etcd_cluster("dr-node-test-") as cluster:
        yield cluster


def node_config(etcd: EtcdCluster, tmp_path: Path, name: str, key: str) -> NodeConfig:
    return NodeConfig(node=name, site="backup", etcd=tuple(etcd.endpoints), leader_key=key,
                      journal=str(tmp_path / f"{name}.journal"))


def crashed_live_run(sessions: sessionmaker[Session], host: str, runbook: str, in_flight: str, run_id: str) -> str:
    """A run of ``host`` whose process died with ``in_flight`` started, its heartbeat long gone."""
    plan = make_plan(runbook)
    store = EvidenceStore(sessions)
    store(RunStarted(run_id, utcnow(), plan, host))
    store(StepStarted(run_id, in_flight, utcnow()))
    store.flush()
    long_ago = utcnow() - timedelta(minutes=5)
    with sessions() as session, session.begin():
        session.add(RunProcess(run_id=run_id, host=host, pid=2 ** 22 + 1, process_start=None, started_at=long_ago,
                               heartbeat_at=long_ago))
    return run_id


def steps_of(sessions: sessionmaker[Session], run_id: str) -> list[tuple[str, str]]:
    with sessions() as session:
        detail = queries.run_detail(session, run_id)
    assert detail is not None
    return [(s["step_id"], s["state"]) for s in detail["steps"] if s["state"] != "pending"]


def test_the_new_leader_resumes_what_the_old_one_left_and_only_then_decides(
        etcd: EtcdCluster, sessions: sessionmaker[Session], tmp_path: Path) -> None:
    key = f"/dr-node-test-{next(_keys)}/leader"
    node_b = Node(node_config(etcd, tmp_path, "node-b", key), tmp_path / "node.yml", sessions,
                  watch_factory=lambda node: None)
    register_member(node_b.leadership.gateway, key, "node-a", {"site": "primary"})

    # node-a was deposed before its second change: the refusal is recorded and the run interrupted
    deposed = execute(sessions, make_plan(RUNBOOK), host="node-a",
                      fence=iter(["3@node-a"]).__next__)
    assert deposed.state == "interrupted"
    # node-a died in the middle of a step that may run again, and of one that may not
    crashed = crashed_live_run(sessions, "node-a", RUNBOOK, "fence-old", "a11ce000-0000-4000-8000-00000000dead")
    undecidable = crashed_live_run(sessions, "node-a", UNDECIDABLE, "promote", "a11ce000-0000-4000-8000-0000000dec1d")
    # and an engineer's own run on a machine outside the cluster is none of the cluster's business
    outsider = execute(sessions, make_plan(RUNBOOK), host="laptop-of-bob", fence=iter(["1@x"]).__next__)
    assert outsider.state == "interrupted"

    with running_node(node_b):
        wait_for(node_b.is_leader, 20, "node-b leads with its takeover settled")
        wait_for(lambda: not node_b.resuming and steps_of(sessions, crashed)[-1] == ("switch", "succeeded"),
                 30, "the resumed runs end")
        token = str(node_b.leadership.token())
        assert set(read_members(node_b.leadership.gateway, key)) == {"node-a", "node-b"}

    for run_id in (deposed.run_id, crashed):
        with sessions() as session:
            detail = queries.run_detail(session, run_id)
            fenced = [(e.step_id, e.data.get("token")) for e in session.scalars(
                select(ActionEventRecord).where(ActionEventRecord.run_id == run_id,
                                                ActionEventRecord.kind == "fencing.checked")
                .order_by(ActionEventRecord.id))]
        assert detail is not None and detail["run"]["state"] == "succeeded", detail["run"]["error"]
        succeeded = [s["step_id"] for s in detail["steps"] if s["state"] == "succeeded"]
        assert sorted(succeeded) == ["fence-old", "promote", "switch"]  # each step once
        assert fenced[-2:] == [("promote", token), ("switch", token)]
    with sessions() as session:
        audit = [(a.action, a.target, a.data) for a in session.scalars(
            select(AuditEvent).where(AuditEvent.action.in_([TAKEOVER_ACTION, TAKEOVER_REFUSED_ACTION])))]
    assert sorted((action, target) for action, target, _ in audit) == sorted([
        (TAKEOVER_ACTION, deposed.run_id), (TAKEOVER_ACTION, crashed),
        (TAKEOVER_REFUSED_ACTION, undecidable)])
    refusal = next(data for action, _, data in audit if action == TAKEOVER_REFUSED_ACTION)
    assert refusal["from_node"] == "node-a" and "'promote'" in refusal["reason"]
    assert steps_of(sessions, undecidable) == [("promote", "interrupted")]
    assert steps_of(sessions, outsider.run_id) == [("fence-old", "succeeded")]  # left to bob


def test_a_node_that_does_not_lead_never_acts(etcd: EtcdCluster, sessions: sessionmaker[Session],
                                              tmp_path: Path) -> None:
    key = f"/dr-node-test-{next(_keys)}/leader"
    first = Node(node_config(etcd, tmp_path, "node-1", key), tmp_path / "node.yml", sessions,
                 watch_factory=lambda node: None)
    second = Node(node_config(etcd, tmp_path, "node-2", key), tmp_path / "node.yml", sessions,
                  watch_factory=lambda node: None)
    with running_node(first):
        wait_for(first.is_leader, 20, "the first node leads")
        with running_node(second):
            wait_for(lambda: second.leadership.current_leader() is not None, 5, "a leader is known")
            assert not second.is_leader()
            with pytest.raises(Exception, match="not the leader"):
                second.fence_check()
        # the first stops: it resigns and the second leads at once
    with running_node(second):
        wait_for(second.is_leader, 10, "the second node leads")
