"""``aws.route53.switch`` points a record set at the backup site; ``aws.route53.health`` reads a health check.

A switch UPSERTs the named record sets in one atomic change batch, keeping every attribute it is not
told to change (routing policy, health check, TTL), then waits until Route 53 reports the change
INSYNC on all its authoritative servers.
"""

from __future__ import annotations

import copy
import re
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from dr_orchestrator.actions.aws.common import Aws, AwsAction, AwsParams, PollingParams, paginate
from dr_orchestrator.actions.base import ActionContext, ActionError, ActionResult
from dr_orchestrator.actions.probing import ProbingParams, Verdict, probe_until_streak
from dr_orchestrator.model.durations import Duration
from dr_orchestrator.model.runbook import Effect

# Route 53 counts an endpoint healthy when more than 18% of its checkers report it healthy.
HEALTHY_SHARE = 0.18


class AliasTarget(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    dns_name: str = Field(description="DNS name of the target, e.g. the backup load balancer's.")
    hosted_zone_id: str = Field(description="Hosted zone id of the target (the load balancer's canonical zone).")
    evaluate_target_health: bool = Field(default=True, description="Let Route 53 judge the target's health.")

    def as_aws(self) -> dict[str, Any]:
        return {
            "DNSName": self.dns_name,
            "HostedZoneId": self.hosted_zone_id,
            "EvaluateTargetHealth": self.evaluate_target_health,
        }


class Route53SwitchParams(AwsParams, PollingParams):
    hosted_zone: str = Field(description="Hosted zone id (Z...) or name (example.com).")
    name: str = Field(description="Record name, e.g. quotation.example.com.")
    type: str = Field(default="A", description="Record type: A, AAAA, CNAME, ...")
    set_identifier: str | None = Field(
        default=None, description="SetIdentifier of the failover or weighted record set to point at `values`/`alias`."
    )
    values: list[str] | None = Field(default=None, min_length=1, description="New record values (the backup target).")
    alias: AliasTarget | None = Field(default=None, description="New alias target instead of values.")
    ttl: int | None = Field(default=None, ge=0, description="TTL in seconds (default: keep the record's, else 60).")
    failover: Literal["PRIMARY", "SECONDARY"] | None = Field(
        default=None, description="Failover role of the record set (default: keep its current role)."
    )
    health_check_id: str | None = Field(default=None, description="Health check to attach (default: keep).")
    weights: dict[str, int] | None = Field(
        default=None,
        description="Weighted routing instead: SetIdentifier -> new weight (0-255), e.g. {primary: 0, backup: 100}.",
    )

    @field_validator("type")
    @classmethod
    def _upper(cls, value: str) -> str:
        return value.upper()

    @field_validator("weights")
    @classmethod
    def _weights(cls, value: dict[str, int] | None) -> dict[str, int] | None:
        if value is not None:
            if not value:
                raise ValueError("name at least one set identifier")
            for identifier, weight in value.items():
                if not 0 <= weight <= 255:
                    raise ValueError(f"weight of {identifier!r} is {weight}; Route 53 weights are 0 to 255")
        return value

    @model_validator(mode="after")
    def _one_kind_of_switch(self) -> Route53SwitchParams:
        pointing = self.values is not None or self.alias is not None
        if self.values is not None and self.alias is not None:
            raise ValueError("give either values or alias, not both")
        if pointing == (self.weights is not None):
            raise ValueError(
                "give values or alias (point a record set at the backup target) or weights (shift weighted "
                "record sets), one of the two"
            )
        if self.weights is not None and (self.set_identifier or self.failover or self.ttl is not None):
            raise ValueError("weights name their set identifiers; set_identifier, failover and ttl do not apply")
        if self.failover is not None and self.set_identifier is None:
            raise ValueError("a failover record set needs its set_identifier")
        return self


def fqdn(name: str) -> str:
    return name.rstrip(".").lower() + "."


def resolve_zone(client: Any, hosted_zone: str) -> str:
    """A hosted zone id from an id (Z..., /hostedzone/Z...) or a zone name."""
    if hosted_zone.startswith("/hostedzone/"):
        return hosted_zone.removeprefix("/hostedzone/")
    if "." not in hosted_zone.rstrip("."):
        return hosted_zone
    wanted = fqdn(hosted_zone)
    answer = client.list_hosted_zones_by_name(DNSName=wanted, MaxItems="10")
    matches = [zone["Id"].removeprefix("/hostedzone/") for zone in answer["HostedZones"] if zone["Name"] == wanted]
    if not matches:
        raise ActionError(f"no Route 53 hosted zone is named {wanted!r}")
    if len(matches) > 1:
        raise ActionError(f"{len(matches)} hosted zones are named {wanted!r} ({', '.join(matches)}): give its id")
    return str(matches[0])


def record_sets(client: Any, zone_id: str, name: str, record_type: str) -> list[dict[str, Any]]:
    """The record sets of exactly this name and type (one per set identifier)."""
    found: list[dict[str, Any]] = []
    kwargs: dict[str, Any] = {"HostedZoneId": zone_id, "StartRecordName": name, "StartRecordType": record_type}
    while True:
        page = client.list_resource_record_sets(**kwargs)
        for record in page["ResourceRecordSets"]:
            if fqdn(record["Name"]) != name or record["Type"] != record_type:
                return found  # listed in order: past our name and type
            found.append(record)
        if not page.get("IsTruncated"):
            return found
        kwargs = {"HostedZoneId": zone_id, "StartRecordName": page["NextRecordName"],
                  "StartRecordType": page["NextRecordType"]}
        if page.get("NextRecordIdentifier"):
            kwargs["StartRecordIdentifier"] = page["NextRecordIdentifier"]


def _label(record: dict[str, Any]) -> str:
    return record.get("SetIdentifier") or "(no set identifier)"


def pointed_record(params: Route53SwitchParams, existing: list[dict[str, Any]], name: str) -> dict[str, Any]:
    """The record set after pointing it at the new values or alias, every other attribute kept."""
    current = next((r for r in existing if r.get("SetIdentifier") == params.set_identifier), None)
    if current is None:
        if params.set_identifier is not None and params.failover is None:
            known = ", ".join(_label(r) for r in existing) or "none"
            raise ActionError(
                f"{name} {params.type} has no record set {params.set_identifier!r} (set identifiers: {known}); "
                "give failover: PRIMARY or SECONDARY to create it"
            )
        current = {"Name": name, "Type": params.type}
        if params.set_identifier is not None:
            current["SetIdentifier"] = params.set_identifier
    record = copy.deepcopy(current)
    if params.values is not None:
        record.pop("AliasTarget", None)
        record["ResourceRecords"] = [{"Value": value} for value in params.values]
        record["TTL"] = params.ttl if params.ttl is not None else record.get("TTL", 60)
    elif params.alias is not None:
        record.pop("ResourceRecords", None)
        record.pop("TTL", None)  # alias records take the target's TTL
        record["AliasTarget"] = params.alias.as_aws()
    if params.failover is not None:
        record["Failover"] = params.failover
    if params.health_check_id is not None:
        record["HealthCheckId"] = params.health_check_id
    return record


def weighted_records(params: Route53SwitchParams, existing: list[dict[str, Any]], name: str) -> list[dict[str, Any]]:
    by_identifier = {r.get("SetIdentifier"): r for r in existing}
    records = []
    for identifier, weight in (params.weights or {}).items():
        current = by_identifier.get(identifier)
        if current is None or "Weight" not in current:
            weighted = ", ".join(_label(r) for r in existing if "Weight" in r) or "none"
            raise ActionError(
                f"{name} {params.type} has no weighted record set {identifier!r} (weighted set identifiers: {weighted})"
            )
        records.append({**copy.deepcopy(current), "Weight": weight})
    return records


def _summary(record: dict[str, Any]) -> dict[str, Any]:
    """What a record set points at, for the step's output and the evidence."""
    summary: dict[str, Any] = {"set_identifier": record.get("SetIdentifier")}
    if "AliasTarget" in record:
        summary["alias"] = record["AliasTarget"].get("DNSName")
    else:
        summary["values"] = [r["Value"] for r in record.get("ResourceRecords", [])]
    fields = (("Failover", "failover"), ("Weight", "weight"), ("TTL", "ttl"), ("HealthCheckId", "health_check"))
    for field, key in fields:
        if field in record:
            summary[key] = record[field]
    return summary


class Route53Switch(AwsAction[Route53SwitchParams]):
    name = "aws.route53.switch"
    effect = Effect.REVERSIBLE
    Params = Route53SwitchParams
    service = "route53"
    idempotent = True  # an UPSERT of the same values is a no-op

    def execute(self, params: Route53SwitchParams, aws: Aws) -> ActionResult:
        client = aws.client("route53")
        zone_id = resolve_zone(client, params.hosted_zone)
        name = fqdn(params.name)
        existing = record_sets(client, zone_id, name, params.type)
        if params.weights is not None:
            wanted = weighted_records(params, existing, name)
        else:
            wanted = [pointed_record(params, existing, name)]
        before = {r.get("SetIdentifier"): r for r in existing}
        changes = [r for r in wanted if before.get(r.get("SetIdentifier")) != r]
        output: dict[str, Any] = {
            "hosted_zone_id": zone_id,
            "name": name,
            "type": params.type,
            "previous": [_summary(before[r.get("SetIdentifier")]) for r in wanted if r.get("SetIdentifier") in before],
            "records": [_summary(r) for r in wanted],
            "changed": bool(changes),
        }
        if not changes:
            return ActionResult(output={**output, "change_id": None, "status": "INSYNC"})
        ctx = aws.ctx
        answer = client.change_resource_record_sets(
            HostedZoneId=zone_id,
            ChangeBatch={
                "Comment": f"dr-orchestrator run {ctx.run_id} step {ctx.step_id}",
                "Changes": [{"Action": "UPSERT", "ResourceRecordSet": r} for r in changes],
            },
        )
        change_id = answer["ChangeInfo"]["Id"].removeprefix("/change/")
        status = answer["ChangeInfo"]["Status"]
        output["change_id"] = change_id
        if params.wait and status != "INSYNC":

            def insync() -> tuple[bool, str]:
                current = client.get_change(Id=change_id)["ChangeInfo"]["Status"]
                return current == "INSYNC", current

            status, waited = aws.wait_until(f"Route 53 change {change_id}", insync, params.poll_interval)
            output["insync_after_s"] = round(waited, 3)
        output["status"] = status
        return ActionResult(output=output)


class Route53HealthParams(AwsParams, ProbingParams):
    health_check: str = Field(description="Route 53 health check: its id, or the value of its Name tag.")
    expect: Literal["healthy", "unhealthy", "any"] = Field(
        default="healthy",
        description="Read until the check reports this (N times in a row, see consecutive); `any`: read once.",
    )
    interval: Duration = Field(default=10.0, description="Time between reads (Route 53 checkers report every 10-30s).")

    @field_validator("health_check")
    @classmethod
    def _not_empty(cls, value: str) -> str:
        if not value.strip():
            raise ValueError("must name a health check")
        return value


_HEALTH_CHECK_ID = re.compile(r"^[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}$")


def resolve_health_check(client: Any, health_check: str) -> str:
    """A health check id from an id or from the value of its Name tag (ids are generated by AWS)."""
    if _HEALTH_CHECK_ID.match(health_check):
        return health_check
    ids = [check["Id"] for check in paginate(client, "list_health_checks", "HealthChecks")]
    named = []
    for start in range(0, len(ids), 10):  # the API takes ten ids at a time
        answer = client.list_tags_for_resources(ResourceType="healthcheck", ResourceIds=ids[start : start + 10])
        for tag_set in answer["ResourceTagSets"]:
            if any(t["Key"] == "Name" and t["Value"] == health_check for t in tag_set.get("Tags", [])):
                named.append(tag_set["ResourceId"])
    if len(named) != 1:
        found = "no" if not named else f"{len(named)}"
        raise ActionError(f"{found} Route 53 health checks have the Name tag {health_check!r}: give its id")
    return str(named[0])


def health_of(observations: list[dict[str, Any]]) -> tuple[bool, str]:
    """Route 53's verdict from its checkers' reports, and a one-line account of them."""
    statuses = [o.get("StatusReport", {}).get("Status", "") for o in observations]
    good = [s for s in statuses if s.startswith("Success")]
    healthy = bool(statuses) and len(good) / len(statuses) > HEALTHY_SHARE
    detail = f"{len(good)}/{len(statuses)} checkers report healthy"
    failing = next((s for s in statuses if not s.startswith("Success")), None)
    return healthy, f"{detail}; e.g. {failing}" if failing else detail


class Route53Health(AwsAction[Route53HealthParams]):
    name = "aws.route53.health"
    effect = Effect.READ_ONLY
    Params = Route53HealthParams
    service = "route53"
    idempotent = True

    def execute(self, params: Route53HealthParams, aws: Aws) -> ActionResult:
        client = aws.client("route53")
        ctx: ActionContext = aws.ctx
        check_id = resolve_health_check(client, params.health_check)
        observed: dict[str, Any] = {"health_check_id": check_id}

        def read() -> tuple[bool, str]:
            answer = client.get_health_check_status(HealthCheckId=check_id)
            healthy, detail = health_of(answer["HealthCheckObservations"])
            observed.update(healthy=healthy, detail=detail)
            return healthy, detail

        if params.expect == "any":
            healthy, detail = read()
            return ActionResult(output={"health_check_id": check_id, "healthy": healthy, "detail": detail})

        def probe(_timeout: float) -> Verdict:
            healthy, detail = read()
            return Verdict(healthy == (params.expect == "healthy"), detail)

        streak = probe_until_streak(ctx, f"route53 health check {params.health_check}", probe, params)
        return ActionResult(
            output={**observed, **streak.output()},
            marked_at=streak.first_good_at,
        )
