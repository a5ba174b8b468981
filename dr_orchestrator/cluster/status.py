"""The cluster at a glance, for `dr cluster status`: etcd's members, each endpoint's health, the leader and
the time left on its lease, the orchestrator nodes and their API addresses. Never raises for an unreachable
etcd: what could not be read says why."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from dr_orchestrator.cluster.gateway import ClusterError, Gateway, describe_error
from dr_orchestrator.cluster.leadership import DEFAULT_KEY, lease_ttl_remaining, read_leader
from dr_orchestrator.cluster.members import read_members


def _endpoint_health(gateway: Gateway, endpoint: str) -> dict[str, Any]:
    """One member's view: /health (up and sees a raft leader) and its maintenance status."""
    client = gateway.client(endpoint)
    entry: dict[str, Any] = {"endpoint": endpoint, "healthy": False}
    try:
        response = client.session.get(f"{client.base_url}/health", timeout=gateway.timeout_s)
        entry["healthy"] = response.status_code == 200 and response.json().get("health") == "true"
        status = client.status()
    except Exception as error:  # noqa: BLE001 - any failure of one endpoint is that endpoint's state
        entry["error"] = describe_error(error)
        return entry
    member_id = status.get("header", {}).get("member_id")
    entry.update({
        "member_id": member_id,
        "version": status.get("version"),
        "raft_leader": member_id is not None and status.get("leader") == member_id,
        "raft_term": int(status.get("raftTerm") or 0),
        "db_size_bytes": int(status.get("dbSize") or 0),
    })
    return entry


def cluster_status(endpoints: Sequence[str], key: str = DEFAULT_KEY, timeout_s: float = 1.0) -> dict[str, Any]:
    """{"endpoints", "members", "health", "healthy_members", "quorum", "leader", "nodes", "errors"}:

    - members: [{"id", "name", "peer_urls", "client_urls"}] from /v3/cluster/member/list;
    - health: one entry per endpoint: {"endpoint", "healthy", and "member_id", "version", "raft_leader",
      "raft_term", "db_size_bytes" when it answered, else "error"};
    - quorum: whether more than half of the members are healthy;
    - leader: {"node", "lease_id" (hex), "revision" (its fencing token), "since", "ttl_remaining_s",
      "ttl_granted_s"} or None when no node leads;
    - nodes: the orchestrator nodes registered under the members prefix: [{"node", "site", "api", "leader"}];
    - errors: sentences for what could not be read."""
    gateway = Gateway(endpoints, timeout_s=timeout_s)
    errors: list[str] = []
    health = [_endpoint_health(gateway, endpoint) for endpoint in gateway.endpoints]
    members: list[dict[str, Any]] = []
    try:
        listed = gateway.call(lambda client: client.members(), "list the etcd members")
        members = [{"id": member.get("ID"), "name": member.get("name") or "(not started)",
                    "peer_urls": list(member.get("peerURLs") or []),
                    "client_urls": list(member.get("clientURLs") or [])} for member in listed]
    except ClusterError as error:
        errors.append(str(error))
    healthy = sum(1 for entry in health if entry["healthy"])
    size = len(members) or len(gateway.endpoints)
    leader: dict[str, Any] | None = None
    nodes: list[dict[str, Any]] = []
    try:
        info = read_leader(gateway, key)
        if info is not None:
            ttl = lease_ttl_remaining(gateway, info.lease_id)
            leader = {"node": info.node, "lease_id": f"{info.lease_id:x}", "revision": info.revision,
                      "since": info.since, "ttl_remaining_s": ttl[0] if ttl else 0,
                      "ttl_granted_s": ttl[1] if ttl else None}
        nodes = [{"node": name, "site": registered.get("site"), "api": registered.get("api"),
                  "leader": leader is not None and leader["node"] == name}
                 for name, registered in sorted(read_members(gateway, key).items())]
    except ClusterError as error:
        errors.append(str(error))
    return {"endpoints": list(gateway.endpoints), "members": members, "health": health,
            "healthy_members": healthy, "quorum": healthy > size // 2, "leader": leader, "nodes": nodes,
            "errors": errors}
