"""The cluster's members as etcd records them: each node writes its key under the members prefix
when it starts (its site and API address), so the leader knows which runs were a node's (their
recorded host is the node's name), a follower knows where to forward a request that changes
something (``leader_address``), and `dr cluster status` can list the nodes."""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any

from dr_orchestrator.cluster.gateway import ClusterError, Gateway, decode, encode
from dr_orchestrator.cluster.leadership import read_leader


class NoLeader(ClusterError):
    """No leader's API can be named now (one sentence saying why)."""


@dataclass(frozen=True)
class LeaderAddress:
    node: str
    api: str  # "host:port", as the leader registered it


def members_prefix(leader_key: str) -> str:
    """``/dr/leader`` -> ``/dr/members/``: beside the leader key of the same cluster."""
    parent = leader_key.rstrip("/").rpartition("/")[0]
    return f"{parent}/members/"


def _range_end(prefix: str) -> str:
    return prefix[:-1] + chr(ord(prefix[-1]) + 1)


def register_member(gateway: Gateway, leader_key: str, node: str, info: dict[str, Any]) -> None:
    gateway.post("/kv/put", {"key": encode(members_prefix(leader_key) + node),
                             "value": encode(json.dumps(info, sort_keys=True))}, f"register node {node}")


def read_members(gateway: Gateway, leader_key: str) -> dict[str, dict[str, Any]]:
    """node name -> what it registered."""
    prefix = members_prefix(leader_key)
    answer = gateway.post("/kv/range", {"key": encode(prefix), "range_end": encode(_range_end(prefix))},
                          "list the cluster's nodes")
    found: dict[str, dict[str, Any]] = {}
    for kv in answer.get("kvs") or []:
        name = decode(kv.get("key")).decode(errors="replace")[len(prefix):]
        try:
            info = json.loads(decode(kv.get("value")))
        except ValueError:
            info = {}
        found[name] = info if isinstance(info, dict) else {}
    return found


def leader_address(gateway: Gateway, leader_key: str) -> LeaderAddress:
    """The current leader and the API address it registered; NoLeader when there is none or etcd cannot say."""
    try:
        leader = read_leader(gateway, leader_key)
        members = read_members(gateway, leader_key) if leader is not None else {}
    except ClusterError as exc:
        raise NoLeader(f"no leader known: etcd did not answer (the cluster may have no quorum): {exc}") from exc
    if leader is None:
        raise NoLeader("no leader: no node leads the cluster now (an election is under way, or etcd has no quorum)")
    api = members.get(leader.node, {}).get("api")
    if not isinstance(api, str) or not api:
        raise NoLeader(f"leader {leader.node} registered no API address in etcd")
    return LeaderAddress(leader.node, api)
