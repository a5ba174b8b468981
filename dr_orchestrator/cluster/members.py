"""The cluster's members as etcd records them: each node writes its key under the members prefix
when it starts (its site and API address), so the leader knows which runs were a node's (their
recorded host is the node's name) and `dr cluster status` can list the nodes."""

from __future__ import annotations

import json
from typing import Any

from dr_orchestrator.cluster.gateway import Gateway, decode, encode


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
