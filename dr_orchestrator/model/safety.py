"""Safety rules of an inventory (``dr.safety``): what a run must never do unless an engineer forces it.

```yaml
safety:
  rules: {service_served: on, promote_fenced: on, target_ready: on}   # every rule is on unless turned off
  target_site_parameters: [to_site, target_site, home_site]           # runbook parameters naming the target
  readiness:                                                          # checked before the first step
    backup:
      - {http: "http://127.0.20.1:8101/health", expect_status: [200], service: trading}
      - {tcp: "127.0.20.1:15432", timeout: 2s}
```

A rule that would refuse a run is overridden with ``dr run ... --force "reason"``; each override
is recorded (rule, actor, reason, what was wrong) in the run's evidence.
"""

from __future__ import annotations

from typing import Any

from pydantic import Field, field_validator, model_validator

from dr_orchestrator.model.durations import parse_duration
from dr_orchestrator.model.inventory import Frozen, Inventory

SERVICE_SERVED = "service_served"
PROMOTE_FENCED = "promote_fenced"
TARGET_READY = "target_ready"
RULES = {
    SERVICE_SERVED: "after the run's change, at least one site serves each service in its scope",
    PROMOTE_FENCED: "never promote a standby while the old primary is writable and not fenced",
    TARGET_READY: "never fail over to a site whose readiness checks fail",
}
PREFLIGHT = "preflight"  # the step id under which pre-flight checks and overrides are recorded


class ReadinessCheck(Frozen):
    """One check of a site's readiness: an HTTP endpoint answering, or a TCP port accepting."""

    http: str | None = Field(default=None, description="URL that must answer with one of expect_status")
    tcp: str | None = Field(default=None, description="host:port that must accept a connection")
    expect_status: tuple[int, ...] = (200,)
    timeout: float = Field(default=2.0, gt=0, le=60, description="seconds (or a duration) for the check")
    service: str | None = Field(default=None, description="the service it is about (default: the whole site)")

    @field_validator("timeout", mode="before")
    @classmethod
    def _duration(cls, value: Any) -> Any:
        return parse_duration(value) if isinstance(value, str) else value

    @field_validator("tcp")
    @classmethod
    def _host_port(cls, value: str | None) -> str | None:
        if value is not None:
            host, sep, port = value.rpartition(":")
            if not sep or not host or not port.isdigit() or not 0 < int(port) < 65536:
                raise ValueError(f"{value!r} is not host:port")
        return value

    @field_validator("http")
    @classmethod
    def _url(cls, value: str | None) -> str | None:
        if value is not None and not value.startswith(("http://", "https://")):
            raise ValueError(f"{value!r} is not an http:// or https:// URL")
        return value

    @model_validator(mode="after")
    def _one_kind(self) -> ReadinessCheck:
        if (self.http is None) == (self.tcp is None):
            raise ValueError("a readiness check is either http: URL or tcp: host:port")
        return self

    @property
    def target(self) -> str:
        return self.http or self.tcp or ""


class SafetyPolicy(Frozen):
    rules: dict[str, bool] = Field(default_factory=dict)
    target_site_parameters: tuple[str, ...] = ("to_site", "target_site", "home_site")
    readiness: dict[str, tuple[ReadinessCheck, ...]] = Field(default_factory=dict)

    @field_validator("rules")
    @classmethod
    def _known_rules(cls, value: dict[str, bool]) -> dict[str, bool]:
        unknown = sorted(set(value) - set(RULES))
        if unknown:
            raise ValueError(f"unknown rule {unknown[0]!r}; the rules: {', '.join(RULES)}")
        return value

    def enabled(self, rule: str) -> bool:
        return self.rules.get(rule, True)


def policy_of(inventory: Inventory) -> SafetyPolicy:
    """The inventory's policy (loading has checked it; an unchecked one fails here loudly)."""
    return SafetyPolicy.model_validate(inventory.safety)


def override_text(rule: str) -> str:
    return f'to override, run again with --force "reason" (recorded as evidence), or turn {rule} off in dr.safety'
