"""Inventory: the sites, their hosts and the services they serve, with RTO/RPO targets."""

from __future__ import annotations

from typing import Any

from pydantic import BaseModel, ConfigDict, Field

from dr_orchestrator.model.names import Label, Name


class Frozen(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")


class Site(Frozen):
    name: Name
    description: str = ""
    region: str | None = None
    vars: dict[str, Any] = Field(default_factory=dict)


class Host(Frozen):
    name: Name
    site: Name
    address: str
    port: int = 22
    user: str | None = None
    key_file: str | None = None
    known_hosts: str | None = None
    roles: tuple[str, ...] = ()
    vars: dict[str, Any] = Field(default_factory=dict)


# GB/T 20988-2007's seven elements of disaster-recovery capability (section 6.2).
CAPABILITY_ELEMENTS = (
    "data_backup_system",
    "backup_data_processing_system",
    "backup_network",
    "backup_infrastructure",
    "technical_support",
    "operation_and_maintenance_management",
    "dr_plan",
)


class Capability(Frozen):
    """For each element the inventory declares, the highest GB/T 20988 level (1-6) whose requirement
    for that element is met; an element not declared meets no level."""

    data_backup_system: int | None = Field(default=None, ge=1, le=6)
    backup_data_processing_system: int | None = Field(default=None, ge=1, le=6)
    backup_network: int | None = Field(default=None, ge=1, le=6)
    backup_infrastructure: int | None = Field(default=None, ge=1, le=6)
    technical_support: int | None = Field(default=None, ge=1, le=6)
    operation_and_maintenance_management: int | None = Field(default=None, ge=1, le=6)
    dr_plan: int | None = Field(default=None, ge=1, le=6)

    def declared(self) -> dict[str, int]:
        return {name: level for name in CAPABILITY_ELEMENTS if (level := getattr(self, name)) is not None}


class Service(Frozen):
    name: Name
    rto: float = Field(description="recovery time objective, seconds")
    rpo: float = Field(description="recovery point objective, seconds")
    tier: Label = "standard"
    criticality: Label = "high"
    sites: tuple[str, ...] = Field(description="sites that serve it, the normal active one first")
    health: str | None = Field(default=None, description="its health URL as clients reach it (the front door); "
                               "answers 2xx only while the service can do its job (a writing service: write)")
    capability: Capability | None = Field(default=None, description="elements that differ from the inventory's")
    vars: dict[str, Any] = Field(default_factory=dict)

    @property
    def primary_site(self) -> str:
        return self.sites[0]


class Inventory(Frozen):
    name: Name
    sites: dict[str, Site]
    hosts: dict[str, Host]
    services: dict[str, Service]
    vars: dict[str, Any] = Field(default_factory=dict)
    safety: dict[str, Any] = Field(default_factory=dict)
    watch: dict[str, Any] = Field(default_factory=dict, description="dr.watch, read by model.watch.settings_of")
    capability: Capability | None = Field(default=None, description="GB/T 20988 elements, for every service")

    def capability_of(self, service: str) -> dict[str, int]:
        """The service's capability elements: the inventory's, each overridden by the service's own."""
        common = self.capability.declared() if self.capability else {}
        own = self.services[service].capability
        return common | (own.declared() if own else {})

    def site_hosts(self, site: str, role: str | None = None) -> list[Host]:
        return [h for h in self.hosts.values() if h.site == site and (role is None or role in h.roles)]

    def host(self, name: str) -> Host:
        return self.hosts[name]
