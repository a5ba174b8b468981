"""What the watch does with an outage (``dr.watch`` in the inventory): severity levels, a policy per
level (and per service or site), the runbook each kind of incident runs, approvals, anti-flapping,
maintenance windows and silences. Absent, the watch observes and notifies but runs nothing.

```yaml
watch:
  interval: 100ms          # one probe round
  confirm: 500ms           # how long independent observers must agree before "down"
  quorum: 2                # how many independent observers must agree
  automation: true         # the default; `dr watch automation off|on --reason` overrides it (audited)
  levels:                  # 1-4, most severe first: the first whose conditions match wins
    particularly-serious: {scope: site}
    serious: {tiers: [critical], data_integrity: true}   # any of the listed conditions
    major: {tiers: [critical, important]}
    general: {}                                          # no condition: everything
  policies:                # auto, approve or notify per level; a level not listed notifies
    default: {particularly-serious: auto, serious: approve, major: approve, general: notify}
    services: {quotation: {major: auto, general: auto}}
    sites: {backup: {particularly-serious: notify}}
  runbooks:                # paths relative to the inventory file
    site: {path: ../runbooks/site-failover.yml, parameters: {from_site: "{site}"}}
    services: {trading: {path: ../runbooks/failover-trading.yml}}
  approval: {approvers: 2, timeout: 10m, escalate: [oncall-manager]}
  anti_flapping: 30m
  maintenance: [{services: [quotation], start: "2026-12-24T00:00:00Z", end: "2026-12-26T00:00:00Z", reason: ...}]
  silences: [{target: "service:quotation", until: "2026-12-08T00:00:00Z", reason: ...}]
  notify:                  # structured notifications at each incident transition and new or cleared warning
    - webhook: {url: env:DR_CHAT_WEBHOOK, secret: env:DR_WEBHOOK_KEY}
    - email: {to: [dr-team@example.com], from: dr@example.com, host: smtp.example.com}
      events: [detected, restored, warning]
  base_url: https://dr.example.com   # where `dr serve` answers: notifications link to its dashboard
```
"""

from __future__ import annotations

import difflib
import re
from datetime import datetime
from typing import Annotated, Any, Literal, get_args

from pydantic import AfterValidator, BeforeValidator, Field, field_validator, model_validator

from dr_orchestrator.model.durations import Duration
from dr_orchestrator.model.inventory import Frozen, Inventory

POLICIES = ("auto", "approve", "notify")
Policy = Literal["auto", "approve", "notify"]
TargetKind = Literal["service", "site"]
MAX_LEVELS = 4
# What a runbook parameter may say about the incident: "{site}" the failed site, "{service}" the
# failed service (service runbooks only).
PLACEHOLDER = re.compile(r"\{(\w*)\}")


def _policy(value: Any) -> Any:
    if isinstance(value, str) and value not in POLICIES:
        close = difflib.get_close_matches(value, POLICIES, n=1)
        guess = f" (did you mean {close[0]!r}?)" if close else ""
        raise ValueError(f"{value!r} is not one of {', '.join(POLICIES)}{guess}")
    return value


PolicyName = Annotated[Policy, BeforeValidator(_policy)]


def _aware(value: datetime) -> datetime:
    if value.tzinfo is None:
        raise ValueError(f"{value.isoformat()} has no time zone; add Z (UTC) or +08:00")
    return value


AwareTime = Annotated[datetime, AfterValidator(_aware)]


class LevelRule(Frozen):
    """When a level applies: any one of its conditions (none at all: always)."""

    scope: TargetKind | None = Field(default=None, description="site: a whole site is down; service: one service")
    tiers: tuple[str, ...] = Field(default=(), description="a service of one of these tiers is hit "
                                   "(a site: one of the services it serves)")
    services: tuple[str, ...] = Field(default=(), description="one of these services is hit")
    data_integrity: bool = Field(default=False, description="data integrity is in doubt (a cyber-attack suspicion)")

    @property
    def unconditional(self) -> bool:
        return self.scope is None and not self.tiers and not self.services and not self.data_integrity


DEFAULT_LEVELS = {
    "particularly-serious": LevelRule(scope="site"),
    "serious": LevelRule(tiers=("critical",), data_integrity=True),
    "major": LevelRule(tiers=("critical", "important")),
    "general": LevelRule(),
}

LevelPolicies = dict[str, PolicyName]


class Policies(Frozen):
    default: LevelPolicies = Field(default_factory=dict, description="per level; a level not listed notifies")
    services: dict[str, LevelPolicies] = Field(default_factory=dict, description="per service, over the default")
    sites: dict[str, LevelPolicies] = Field(default_factory=dict, description="per site, over the default")


class RunbookMapping(Frozen):
    path: str = Field(min_length=1, description="relative to the inventory file's directory")
    parameters: dict[str, Any] = Field(default_factory=dict, description='values; "{site}" is the failed site')


class Runbooks(Frozen):
    site: RunbookMapping | None = Field(default=None, description="what a site that is down runs")
    services: dict[str, RunbookMapping] = Field(default_factory=dict)


class ApprovalSettings(Frozen):
    approvers: int = Field(default=2, ge=1, le=10, description="distinct people who must approve")
    timeout: Duration = Field(default=600.0, gt=0, description="then the escalation list is notified")
    escalate: tuple[str, ...] = ()


class MaintenanceWindow(Frozen):
    """While it lasts, nothing of its services and sites runs automatically (they notify)."""

    services: tuple[str, ...] = ()
    sites: tuple[str, ...] = ()
    start: AwareTime
    end: AwareTime
    reason: str = Field(min_length=1)

    @model_validator(mode="after")
    def _sensible(self) -> MaintenanceWindow:
        if not self.services and not self.sites:
            raise ValueError("a maintenance window names its services or sites (or both)")
        if self.end <= self.start:
            raise ValueError(f"ends ({self.end.isoformat()}) before it starts ({self.start.isoformat()})")
        return self

    def covers(self, kind: str, name: str, site: str | None, now: datetime) -> bool:
        """``site``: where a service failed (it is in maintenance when that site is)."""
        if not self.start <= now < self.end:
            return False
        return name in (self.services if kind == "service" else self.sites) or (site is not None and site in self.sites)


class Silence(Frozen):
    """Until it ends, incidents of its target notify nobody and run nothing."""

    target: str = Field(description='"service:NAME" or "site:NAME"')
    until: AwareTime
    reason: str = Field(min_length=1)

    @field_validator("target")
    @classmethod
    def _kind_and_name(cls, value: str) -> str:
        kind, sep, name = value.partition(":")
        if not sep or kind not in ("service", "site") or not name:
            raise ValueError(f"{value!r} is not service:NAME or site:NAME")
        return value

    @property
    def kind(self) -> str:
        return self.target.partition(":")[0]

    @property
    def name(self) -> str:
        return self.target.partition(":")[2]


NoticeEvent = Literal["detected", "decided", "executing", "restored", "closed", "warning", "warning-cleared"]
NOTICE_EVENTS: tuple[NoticeEvent, ...] = get_args(NoticeEvent)


class NotificationTarget(Frozen):
    """One of ``webhook`` (notify.webhook's parameters: url, secret - the HMAC key - by reference, headers),
    ``email`` (notify.email's: to, from, host, ...) or ``apprise`` (notify.apprise's: urls by reference,
    e.g. DingTalk, WeCom, Feishu, Slack, Teams), without the message; checked against those actions when
    the watch starts (``watch.notify.setup_problems``)."""

    webhook: dict[str, Any] | None = None
    email: dict[str, Any] | None = None
    apprise: dict[str, Any] | None = None
    events: tuple[NoticeEvent, ...] = Field(default=NOTICE_EVENTS, description="what it is told (default: all)")

    @model_validator(mode="after")
    def _one_channel(self) -> NotificationTarget:
        if sum(channel is not None for channel in (self.webhook, self.email, self.apprise)) != 1:
            raise ValueError("a target names exactly one of webhook, email or apprise, "
                             "e.g. - webhook: {url: env:DR_HOOK}")
        return self

    @property
    def channel(self) -> Literal["webhook", "email", "apprise"]:
        if self.webhook is not None:
            return "webhook"
        return "email" if self.email is not None else "apprise"

    @property
    def settings(self) -> dict[str, Any]:
        return dict(getattr(self, self.channel) or {})


class WatchSettings(Frozen):
    interval: Duration = Field(default=1.0, gt=0, description="one probe round")
    confirm: Duration = Field(default=3.0, gt=0, description="how long observers must agree before down")
    quorum: int = Field(default=2, ge=1, description="independent observers that must agree")
    automation: bool = Field(default=True, description="the default of the audited automation switch")
    levels: dict[str, LevelRule] = Field(default_factory=lambda: dict(DEFAULT_LEVELS))
    policies: Policies = Field(default_factory=Policies)
    runbooks: Runbooks = Field(default_factory=Runbooks)
    approval: ApprovalSettings = Field(default_factory=ApprovalSettings)
    anti_flapping: Duration = Field(default=1800.0, description="no second automatic run of a target within it")
    maintenance: tuple[MaintenanceWindow, ...] = ()
    silences: tuple[Silence, ...] = ()
    notify: tuple[NotificationTarget, ...] = ()
    base_url: str | None = Field(default=None, description="where `dr serve` answers, for links in notifications")

    @field_validator("levels")
    @classmethod
    def _one_to_four(cls, value: dict[str, LevelRule]) -> dict[str, LevelRule]:
        if not 1 <= len(value) <= MAX_LEVELS:
            raise ValueError(f"has {len(value)} levels; an emergency plan has 1 to {MAX_LEVELS}, most severe first "
                             f"(e.g. {', '.join(DEFAULT_LEVELS)})")
        return value


def settings_of(inventory: Inventory) -> WatchSettings:
    """The inventory's ``dr.watch`` (loading has checked it); without one, defaults that run nothing."""
    return WatchSettings.model_validate(inventory.watch)
