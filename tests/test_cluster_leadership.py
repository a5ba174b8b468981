"""Leadership on a real 3-member etcd cluster (dr_orchestrator.cluster): one leader, takeover, fencing tokens.

Nodes are `Leadership` objects in this process (one takeover test runs the leader in a process of its own,
to SIGKILL it). Tests that kill etcd members get a cluster of their own; the others share one per module,
each with a leader key of its own. No fixed sleeps: every wait is for a condition, with a deadline.
"""

from __future__ import annotations

import itertools
import math
import os
import signal
import subprocess
import sys
import textwrap
import threading
import time
from collections.abc import Callable, Iterator

import pytest
from support.cluster import etcd_cluster
from support.waiting import wait_for

from dr_orchestrator.cluster import (
    Deposed,
    EtcdUnavailable,
    FenceUnverifiable,
    FencingToken,
    Leadership,
    NotLeader,
    cluster_status,
    read_leader,
)
from dr_orchestrator.cluster.gateway import Gateway, encode
from dr_orchestrator.lab import scratch
from dr_orchestrator.lab.etcd import ETCD, EtcdCluster

pytestmark = [pytest.mark.etcd, pytest.mark.skipif(not os.access(ETCD, os.X_OK), reason="needs etcd-server")]

TTL_S = 2  # etcd's smallest lease with the lab's raft timing
_keys = itertools.count()


def seconds_until(condition: Callable[[], object], timeout: float, what: str) -> float:
    """The seconds `condition` took to become true (polled every 10 ms); fails the test after `timeout`."""
    start = time.monotonic()
    wait_for(condition, timeout, what, interval=0.01)
    return time.monotonic() - start


@pytest.fixture(scope="module")
def shared_cluster() -> Iterator[EtcdCluster]:
    """One cluster for the tests that leave every member running."""
    with etcd_cluster() as cluster:
        yield cluster


@pytest.fixture
def own_cluster() -> Iterator[EtcdCluster]:
    """A cluster for a test that kills members."""
    with etcd_cluster() as cluster:
        yield cluster


NodeFactory = Callable[..., Leadership]


@pytest.fixture
def nodes() -> Iterator[NodeFactory]:
    """`nodes(endpoints, name, key, ttl_s=TTL_S, start=True)`: a Leadership, stopped (resigning) after the test."""
    made: list[Leadership] = []

    def make(endpoints: list[str], name: str, key: str, ttl_s: int = TTL_S, start: bool = True) -> Leadership:
        node = Leadership(endpoints, name, ttl_s=ttl_s, key_prefix=key)
        made.append(node)
        return node.start() if start else node

    yield make
    for node in made:
        node.stop()


def new_key() -> str:
    return f"/dr/test-{os.getpid()}-{next(_keys)}/leader"


def assert_one_leader_at_a_time(*nodes: Leadership) -> None:
    """No two terms of any of `nodes` overlap (a term ends at its deadline at the latest)."""
    spans = sorted((term.elected_at, term.ended_at if term.ended_at is not None else math.inf, node.node)
                   for node in nodes for term in node.terms())
    for (_, end, first), (start, _, second) in itertools.pairwise(spans):
        assert end <= start, f"{first}'s term overlaps {second}'s by {end - start:.3f} s"


def test_one_node_wins_the_others_follow(shared_cluster: EtcdCluster, nodes: NodeFactory) -> None:
    key = new_key()
    endpoints = shared_cluster.endpoints
    group = [nodes(endpoints[i:] + endpoints[:i], name, key) for i, name in enumerate(("primary", "backup", "witness"))]
    wait_for(lambda: any(node.is_leader() for node in group), 5, "a leader")
    leaders = [node for node in group if node.is_leader()]
    assert len(leaders) == 1
    leader, followers = leaders[0], [node for node in group if not node.is_leader()]
    token = leader.token()
    for follower in followers:
        with pytest.raises(NotLeader, match=f"node {follower.node} is not the leader"):
            follower.token()
        seen = follower.current_leader()  # readable from any node
        assert seen is not None and (seen.node, seen.revision, seen.lease_id) == \
            (leader.node, token.revision, token.lease_id)
    assert leader.fence_check()() == token

    status = cluster_status(endpoints, key=key)
    assert sorted(member["name"] for member in status["members"]) == ["backup", "primary", "witness"]
    assert status["healthy_members"] == 3 and status["quorum"] and not status["errors"]
    assert sum(entry["raft_leader"] for entry in status["health"]) == 1
    assert status["leader"]["node"] == leader.node and status["leader"]["revision"] == token.revision
    assert 0 < status["leader"]["ttl_remaining_s"] <= TTL_S
    assert_one_leader_at_a_time(*group)


def test_lease_revoked_the_other_node_takes_over_and_the_old_token_is_refused(
        shared_cluster: EtcdCluster, nodes: NodeFactory) -> None:
    key = new_key()
    first = nodes(shared_cluster.endpoints, "primary", key)
    assert first.wait_until_leader(5)
    second = nodes(shared_cluster.endpoints, "backup", key)
    old = first.token()
    fence = first.fence_check()
    lost: list[tuple[FencingToken, str]] = []
    first.on_lost(lambda token, reason: lost.append((token, reason)))

    Gateway(shared_cluster.endpoints).post("/lease/revoke", {"ID": old.lease_id}, "revoke")  # expiry, at once
    took = seconds_until(second.is_leader, 5, "the backup node leading")
    assert took < 1.0  # it polls the key every 0.1 s
    wait_for(first.lost.is_set, TTL_S, "the primary node noticing its loss")
    assert not first.is_leader()
    wait_for(lambda: lost, 1, "the on_lost callback")  # it runs just after the event is set
    assert lost[0][0] == old

    new = second.token()
    assert new.revision > old.revision
    with pytest.raises(Deposed) as refused:
        fence()
    assert refused.value.leader is not None and refused.value.leader.node == "backup"
    message = str(refused.value)
    assert f"node primary is not the leader under fencing token {old}" in message
    assert f"backup leads now (fencing token {new.revision}" in message
    assert second.fence_check()() == new


def test_a_new_term_of_the_same_node_never_honours_the_old_token(shared_cluster: EtcdCluster,
                                                               nodes: NodeFactory) -> None:
    key = new_key()
    node = nodes(shared_cluster.endpoints, "primary", key)
    assert node.wait_until_leader(5)
    old = node.token()
    old_fence = node.fence_check()
    Gateway(shared_cluster.endpoints).post("/kv/deleterange", {"key": encode(key)}, "delete")  # an operator's mistake
    wait_for(lambda: node.is_leader() and node.token() != old, 5, "a new term")
    first_term = node.terms()[0]
    assert first_term.token == old and "leader key is gone" in (first_term.reason or "")
    with pytest.raises(Deposed, match="term under it ended"):
        old_fence()
    assert node.fence_check()().revision > old.revision


def test_assert_current_asks_etcd_not_only_the_local_term(shared_cluster: EtcdCluster, nodes: NodeFactory) -> None:
    key = new_key()
    node = nodes(shared_cluster.endpoints, "primary", key, start=False)  # no keep-alive: its term lives locally
    token = node.campaign_once()
    assert token is not None and node.is_leader() and node.token() == token
    node.assert_current(token)
    Gateway(shared_cluster.endpoints).post("/lease/revoke", {"ID": token.lease_id}, "revoke")
    assert node.is_leader()  # it cannot know yet; etcd can
    with pytest.raises(Deposed, match="etcd's leader key is another term's; no node leads now"):
        node.assert_current(token)
    assert not node.is_leader() and node.terms()[0].reason == "etcd's leader key is no longer this term's"


def test_resigning_on_stop_hands_over_at_once(shared_cluster: EtcdCluster, nodes: NodeFactory) -> None:
    key = new_key()
    first = nodes(shared_cluster.endpoints, "primary", key)
    assert first.wait_until_leader(5)
    second = nodes(shared_cluster.endpoints, "backup", key)
    reasons: list[str] = []
    first.on_lost(lambda token, reason: reasons.append(reason))
    first.stop()
    assert reasons == ["resigned"]
    assert seconds_until(second.is_leader, 5, "the backup node leading") < 1.0  # no wait for the lease's TTL
    assert_one_leader_at_a_time(first, second)


@pytest.mark.slow
def test_a_killed_leader_process_is_replaced_after_its_lease(shared_cluster: EtcdCluster,
                                                              nodes: NodeFactory) -> None:
    key = new_key()
    script = textwrap.dedent("""
        import sys
        from dr_orchestrator.cluster import Leadership
        node = Leadership(sys.argv[4:], sys.argv[1], ttl_s=int(sys.argv[2]), key_prefix=sys.argv[3]).start()
        if not node.wait_until_leader(10):
            sys.exit(3)
        print(node.token().revision, flush=True)
        sys.stdin.read()
    """)
    process = subprocess.Popen([sys.executable, "-c", script, "primary", str(TTL_S), key, *shared_cluster.endpoints],
                               stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    try:
        assert process.stdout is not None
        revision = int(process.stdout.readline() or 0)
        assert revision > 0, f"the leader process did not lead (exit {process.poll()})"
        follower = nodes(shared_cluster.endpoints, "backup", key)
        leader = read_leader(follower.gateway, key)
        assert leader is not None and (leader.node, leader.revision) == ("primary", revision)
        assert not follower.is_leader()

        killed_at = time.monotonic()
        process.send_signal(signal.SIGKILL)
        took = seconds_until(follower.is_leader, TTL_S + 3, "the backup node leading")
        # it waited for the dead leader's lease (refreshed at most ttl/3 before the kill), no longer than
        # the TTL plus etcd's expiry check (every 0.5 s) plus a poll
        assert TTL_S * 2 / 3 - 0.1 <= took <= TTL_S + 2.0
        assert follower.terms()[0].elected_at > killed_at
        assert follower.token().revision > revision
    finally:
        process.kill()
        process.wait(timeout=10)


@pytest.mark.slow
def test_killing_the_etcd_member_the_leader_talks_to_keeps_one_leader(own_cluster: EtcdCluster,
                                                                      nodes: NodeFactory) -> None:
    key = new_key()
    primary_first = own_cluster.endpoints  # primary, backup, witness
    first = nodes(primary_first, "primary", key)
    assert first.wait_until_leader(5)
    second = nodes(primary_first[1:] + primary_first[:1], "backup", key)
    both: list[float] = []
    watching = threading.Event()

    def sample() -> None:  # the two nodes' own beliefs, side by side
        while not watching.wait(0.005):
            if first.is_leader() and second.is_leader():
                both.append(time.monotonic())

    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    try:
        killed_at = time.monotonic()
        own_cluster.kill("primary")

        def led_through_the_kill() -> bool:  # a live term with a refresh (or grant) sent after the kill
            term = first.term() or second.term()
            return term is not None and term.deadline - term.ttl_s > killed_at + 0.5
        wait_for(led_through_the_kill, 3 * TTL_S + 3, "a leader refreshed after the kill")
    finally:
        watching.set()
        sampler.join()
    assert not both, "both nodes believed they led at once"
    assert_one_leader_at_a_time(first, second)
    leader = first if first.is_leader() else second
    assert leader.fence_check()() == leader.token()

    status = cluster_status(own_cluster.endpoints, key=key, timeout_s=0.5)
    down = [entry for entry in status["health"] if not entry["healthy"]]
    assert [entry["endpoint"] for entry in down] == [own_cluster.endpoint("primary")] and down[0]["error"]
    assert status["quorum"] and status["leader"]["node"] == leader.node


@pytest.mark.slow
def test_with_all_etcd_down_the_leader_stops_within_its_ttl(own_cluster: EtcdCluster, nodes: NodeFactory) -> None:
    ttl_s = 3
    key = new_key()
    leader = nodes(own_cluster.endpoints, "primary", key, ttl_s=ttl_s)
    assert leader.wait_until_leader(5)
    fence = leader.fence_check()
    lost_seen: list[float] = []
    leader.on_lost(lambda token, reason: lost_seen.append(time.monotonic()))

    outage_at = time.monotonic()
    for site in own_cluster.sites:
        own_cluster.kill(site)
    with pytest.raises(FenceUnverifiable, match="cannot prove fencing token .* no etcd endpoint answered"):
        fence()  # still within its lease, but etcd cannot confirm: no action either
    wait_for(leader.lost.is_set, ttl_s + 1, "the leader giving up")
    assert lost_seen and lost_seen[0] - outage_at <= ttl_s + 0.3  # its lease was refreshed before the outage
    assert not leader.is_leader()
    term = leader.terms()[-1]
    assert "no lease refresh reached etcd" in (term.reason or "") and "connection refused" in (term.reason or "")
    with pytest.raises(Deposed, match="who leads now is unknown"):
        fence()
    with pytest.raises(EtcdUnavailable, match="could not grant a leader lease: no etcd endpoint answered"):
        leader.campaign_once()
    wait_for(lambda: leader.last_error, 2, "the follower loop reporting etcd unreachable")


def test_unreachable_etcd_and_bad_settings_are_clear_errors() -> None:
    closed = [f"http://127.0.0.1:{scratch.free_port()}", f"127.0.0.1:{scratch.free_port()}"]
    node = Leadership(closed, "primary", ttl_s=TTL_S)
    with pytest.raises(EtcdUnavailable, match=r"no etcd endpoint answered \(http://127.0.0.1:\d+: connection refused; "
                                              r"http://127.0.0.1:\d+: connection refused\)"):
        node.campaign_once()
    assert not node.is_leader()
    with pytest.raises(ValueError, match="TTL must be at least 2 s"):
        Leadership(closed, "primary", ttl_s=1)
    with pytest.raises(ValueError, match="an etcd endpoint must look like"):
        Leadership(["http://no-port"], "primary", ttl_s=TTL_S)
    status = cluster_status(closed, timeout_s=0.2)
    assert status["healthy_members"] == 0 and not status["quorum"] and status["leader"] is None
    assert len(status["errors"]) == 2
