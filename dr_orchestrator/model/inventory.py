"""Inventory: the sites, their hosts and the services they serve, with RTO/RPO targets."""

from __future__ import annotations

from typing import Any

from pydantic import BaseModel, ConfigDict, Field


class Frozen(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")


class Site(Frozen):
    name: str
    description: str = ""
    region: str | None = None
    vars: dict[str, Any] = Field(default_factory=dict)


class Host(Frozen):
    name: str
    site: str
    address: str
    port: int = 22
    user: str | None = None
    key_file: str | None = None
    known_hosts: str | None = None
    roles: tuple[str, ...] = ()
    vars: dict[str, Any] = Field(default_factory=dict)


class Service(Frozen):
    name: str
    rto: float = Field(description="recovery time objective, seconds")
    rpo: float = Field(description="recovery point objective, seconds")
    tier: str = "standard"
    criticality: str = "high"
    sites: tuple[str, ...] = Field(description="sites that serve it, the normal active one first")
    health: str | None = Field(default=None, description="its health URL as clients reach it (the front door); "
                               "answers 2xx only while the service can do its job (a writing service: write)")
    vars: dict[str, Any] = Field(default_factory=dict)

    @property
    def primary_site(self) -> str:
        return self.sites[0]


class Inventory(Frozen):
    name: str
    sites: dict[str, Site]
    hosts: dict[str, Host]
    services: dict[str, Service]
    vars: dict[str, Any] = Field(default_factory=dict)
    safety: dict[str, Any] = Field(default_factory=dict)

    def site_hosts(self, site: str, role: str | None = None) -> list[Host]:
        return [h for h in self.hosts.values() if h.site == site and (role is None or role in h.roles)]

    def host(self, name: str) -> Host:
        return self.hosts[name]
