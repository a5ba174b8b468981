"""Membership and leadership on etcd, and fencing tokens: one orchestrator node at a time may act.

    from dr_orchestrator.cluster import Leadership
    leadership = Leadership(["http://127.0.10.1:2379", ...], node_name="primary", ttl_s=2).start()
    fence = leadership.fence_check()   # when a run starts; fence() before each changing step

This room may import `model` and `evidence` only (and etcd3gw). Names are imported lazily so that
`dr --help` does not pay for etcd3gw and requests.
"""

from __future__ import annotations

from importlib import import_module
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from dr_orchestrator.cluster.gateway import ClusterError, EtcdUnavailable, Gateway
    from dr_orchestrator.cluster.leadership import (
        Deposed,
        FenceCheck,
        FenceUnverifiable,
        FencingError,
        FencingToken,
        LeaderInfo,
        Leadership,
        NotLeader,
        read_leader,
    )
    from dr_orchestrator.cluster.status import cluster_status

_EXPORTS = {
    "ClusterError": "gateway", "EtcdUnavailable": "gateway", "Gateway": "gateway",
    "Deposed": "leadership", "FenceCheck": "leadership", "FenceUnverifiable": "leadership",
    "FencingError": "leadership", "FencingToken": "leadership", "LeaderInfo": "leadership",
    "Leadership": "leadership", "NotLeader": "leadership", "read_leader": "leadership",
    "cluster_status": "status",
}

__all__ = ["ClusterError", "Deposed", "EtcdUnavailable", "FenceCheck", "FenceUnverifiable", "FencingError",
           "FencingToken", "Gateway", "LeaderInfo", "Leadership", "NotLeader", "cluster_status", "read_leader"]


def __getattr__(name: str) -> Any:
    if name not in _EXPORTS:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    return getattr(import_module(f"{__name__}.{_EXPORTS[name]}"), name)
