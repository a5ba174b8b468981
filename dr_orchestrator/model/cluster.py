"""A cluster node's configuration: who it is, where it runs, and where the cluster's state lives.

One file per node (``dr cluster status --config FILE``; see docs/deployment.md). Secrets are never in
it: the evidence database's URL is a reference (``env:NAME`` or ``file:PATH``)."""

from __future__ import annotations

from urllib.parse import urlsplit

from pydantic import Field, field_validator

from dr_orchestrator.model.durations import Duration
from dr_orchestrator.model.inventory import Frozen

MIN_LEASE_TTL_S = 2.0  # etcd's smallest useful lease with a 1 s election timeout


class ApiBinding(Frozen):
    """Where the node serves the HTTP API (`dr serve`'s), registered in etcd for the other nodes."""

    host: str = "127.0.0.1"
    port: int = Field(8080, ge=1, le=65535)
    alert_webhook_secret: str | None = Field(None, pattern=r"^(env|file):.+",
                                             description="reference to the key signing /api/alerts/webhook")


class NodeConfig(Frozen):
    node: str = Field(min_length=1, pattern=r"^[A-Za-z0-9][A-Za-z0-9._-]*$",
                      description="this node's name, unique in the cluster; recorded with what it writes")
    site: str = Field(min_length=1, description="the site (data centre) the node runs at, or the witness")
    etcd: tuple[str, ...] = Field(min_length=1, description="etcd client URLs, one member per site")
    lease_ttl: Duration = Field(MIN_LEASE_TTL_S, description="the leader's lease: takeover takes about this + 2.6 s")
    leader_key: str = Field("/dr/leader", pattern=r"^/", description="the etcd key the leader holds")
    evidence: str | None = Field(None, pattern=r"^(env|file):.+",
                                 description="reference to the evidence database URL (env:NAME or file:PATH)")
    journal: str = Field(min_length=1, description="the local evidence journal kept while the database is away")
    inventory: str | None = Field(None, description="the inventory the node watches")
    runbooks: str = Field("runbooks", min_length=1, description="the runbooks the API may start")
    inventories: str = Field("inventories", min_length=1, description="the inventories the API may use")
    drills: str = Field("failover_tests", min_length=1, description="drill files: the API's and the scheduler's")
    api: ApiBinding = Field(default_factory=ApiBinding)

    @field_validator("etcd")
    @classmethod
    def _urls(cls, urls: tuple[str, ...]) -> tuple[str, ...]:
        for url in urls:
            parts = urlsplit(url)
            if parts.scheme not in ("http", "https") or not parts.hostname or parts.port is None:
                raise ValueError(f"{url!r} is not an etcd client URL like http://10.0.1.5:2379")
        if len(set(urls)) != len(urls):
            raise ValueError("an etcd URL is listed twice")
        return urls

    @field_validator("lease_ttl")
    @classmethod
    def _ttl(cls, seconds: float) -> float:
        if seconds < MIN_LEASE_TTL_S:
            raise ValueError(f"must be at least {MIN_LEASE_TTL_S:g}s (etcd expires shorter leases during an election)")
        return seconds
