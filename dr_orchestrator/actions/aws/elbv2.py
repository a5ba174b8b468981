"""``aws.elbv2.shift``: move an application load balancer's traffic to the backup site.

Two ways, as the load balancer is built: change the weights of a listener's (or rule's) forward
action between target groups, or register the backup site's targets in a target group (and
deregister the primary's), waiting until the new targets are healthy.
"""

from __future__ import annotations

import copy
from typing import Any

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from dr_orchestrator.actions.aws.common import Aws, AwsAction, AwsParams, PollingParams, paginate
from dr_orchestrator.actions.base import ActionError, ActionResult
from dr_orchestrator.model.runbook import Effect


class TargetSpec(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    id: str = Field(description="Instance id, IP address, Lambda ARN or ALB ARN.")
    port: int | None = Field(default=None, ge=1, le=65535, description="Port (default: the target group's).")
    availability_zone: str | None = Field(default=None, description="For IP targets outside the VPC: `all`.")

    def as_aws(self) -> dict[str, Any]:
        target: dict[str, Any] = {"Id": self.id}
        if self.port is not None:
            target["Port"] = self.port
        if self.availability_zone is not None:
            target["AvailabilityZone"] = self.availability_zone
        return target

    def label(self) -> str:
        return self.id if self.port is None else f"{self.id}:{self.port}"


def _target(value: Any) -> Any:
    """``i-0abc``, ``10.1.2.3:8080`` or a mapping {id, port, availability_zone}."""
    if isinstance(value, str):
        host, sep, port = value.rpartition(":")
        if sep and port.isdigit() and ":" not in host:
            return {"id": host, "port": int(port)}
        return {"id": value}
    return value


class Elbv2ShiftParams(AwsParams, PollingParams):
    listener_arn: str | None = Field(default=None, description="Listener whose default forward action to change.")
    load_balancer: str | None = Field(default=None, description="Load balancer name or ARN (with `port`).")
    port: int | None = Field(default=None, description="Listener port on `load_balancer`.")
    rule_arn: str | None = Field(default=None, description="Change this listener rule's forward action instead.")
    weights: dict[str, int] | None = Field(
        default=None, description="Target group name or ARN -> weight (0-999), e.g. {quotation-onprem: 0, ...}."
    )
    target_group: str | None = Field(default=None, description="Target group (name or ARN) to change the targets of.")
    register_targets: list[TargetSpec] = Field(
        default_factory=list, description="Targets to add (the backup site's): i-0abc, 10.1.2.3:8080 or {id, port}."
    )
    deregister_targets: list[TargetSpec] = Field(default_factory=list, description="Targets to remove (the primary's).")
    wait_healthy: bool = Field(default=True, description="Wait until the registered targets are healthy.")

    @field_validator("register_targets", "deregister_targets", mode="before")
    @classmethod
    def _targets(cls, value: Any) -> Any:
        return [_target(v) for v in value] if isinstance(value, list) else value

    @field_validator("weights")
    @classmethod
    def _weights(cls, value: dict[str, int] | None) -> dict[str, int] | None:
        if value is not None:
            if not value:
                raise ValueError("name at least one target group")
            for group, weight in value.items():
                if not 0 <= weight <= 999:
                    raise ValueError(f"weight of {group!r} is {weight}; forward weights are 0 to 999")
        return value

    @model_validator(mode="after")
    def _one_kind_of_shift(self) -> Elbv2ShiftParams:
        by_targets = self.target_group is not None
        if by_targets == (self.weights is not None):
            raise ValueError(
                "give weights (with a listener) or target_group (with register_targets/deregister_targets), one of them"
            )
        if by_targets:
            if not self.register_targets and not self.deregister_targets:
                raise ValueError("target_group needs register_targets and/or deregister_targets")
            if self.listener_arn or self.load_balancer or self.rule_arn:
                raise ValueError("listener_arn, load_balancer and rule_arn go with weights, not target_group")
        elif self.rule_arn is None:
            if (self.listener_arn is None) == (self.load_balancer is None):
                raise ValueError("name the listener: listener_arn, or load_balancer with port")
            if self.load_balancer is not None and self.port is None:
                raise ValueError("load_balancer needs the listener's port")
        return self


def target_group_arns(client: Any, names_or_arns: list[str]) -> dict[str, str]:
    arns = {n: n for n in names_or_arns if n.startswith("arn:")}
    names = [n for n in names_or_arns if not n.startswith("arn:")]
    if names:
        for group in client.describe_target_groups(Names=names)["TargetGroups"]:
            arns[group["TargetGroupName"]] = group["TargetGroupArn"]
    return arns


def listener_arn(client: Any, params: Elbv2ShiftParams) -> str:
    if params.listener_arn is not None:
        return params.listener_arn
    balancer = params.load_balancer or ""
    if not balancer.startswith("arn:"):
        answer = client.describe_load_balancers(Names=[balancer])
        balancer = answer["LoadBalancers"][0]["LoadBalancerArn"]
    for listener in paginate(client, "describe_listeners", "Listeners", LoadBalancerArn=balancer):
        if listener["Port"] == params.port:
            return str(listener["ListenerArn"])
    raise ActionError(f"load balancer {params.load_balancer!r} has no listener on port {params.port}")


def reweighted(actions: list[dict[str, Any]], weights: dict[str, int]) -> tuple[list[dict[str, Any]], dict[str, int]]:
    """The actions with the forward action's weights changed, and the weights it had before (by ARN)."""
    new_actions = copy.deepcopy(actions)
    forward = next((a for a in new_actions if a["Type"] == "forward"), None)
    if forward is None:
        raise ActionError("the listener has no forward action to reweight")
    config = forward.setdefault("ForwardConfig", {})
    groups = config.get("TargetGroups") or [{"TargetGroupArn": forward["TargetGroupArn"], "Weight": 1}]
    before = {g["TargetGroupArn"]: int(g.get("Weight", 1)) for g in groups}
    after = {**before, **weights}
    if not any(after.values()):
        raise ActionError("every target group would get weight 0: no traffic would be served")
    config["TargetGroups"] = [{"TargetGroupArn": arn, "Weight": weight} for arn, weight in after.items()]
    forward.pop("TargetGroupArn", None)  # with several groups, only ForwardConfig may name them
    return new_actions, before


class Elbv2Shift(AwsAction[Elbv2ShiftParams]):
    name = "aws.elbv2.shift"
    effect = Effect.REVERSIBLE
    Params = Elbv2ShiftParams
    service = "elbv2"
    idempotent = True  # setting weights or registering targets again changes nothing

    def execute(self, params: Elbv2ShiftParams, aws: Aws) -> ActionResult:
        client = aws.client("elbv2")
        if params.weights is not None:
            return self.shift_weights(client, params)
        return self.move_targets(client, params, aws)

    def shift_weights(self, client: Any, params: Elbv2ShiftParams) -> ActionResult:
        weights = params.weights or {}
        arns = target_group_arns(client, list(weights))
        by_arn = {arns[group]: weight for group, weight in weights.items()}
        if params.rule_arn is not None:
            rule = client.describe_rules(RuleArns=[params.rule_arn])["Rules"][0]
            actions, before = reweighted(rule["Actions"], by_arn)
            client.modify_rule(RuleArn=params.rule_arn, Actions=actions)
            where = {"rule_arn": params.rule_arn}
        else:
            arn = listener_arn(client, params)
            listener = client.describe_listeners(ListenerArns=[arn])["Listeners"][0]
            actions, before = reweighted(listener["DefaultActions"], by_arn)
            client.modify_listener(ListenerArn=arn, DefaultActions=actions)
            where = {"listener_arn": arn}
        forward = next(a for a in actions if a["Type"] == "forward")
        after = {g["TargetGroupArn"]: g["Weight"] for g in forward["ForwardConfig"]["TargetGroups"]}
        return ActionResult(output={**where, "previous_weights": before, "weights": after})

    def move_targets(self, client: Any, params: Elbv2ShiftParams, aws: Aws) -> ActionResult:
        group = params.target_group or ""
        arn = target_group_arns(client, [group])[group]
        if params.register_targets:
            client.register_targets(TargetGroupArn=arn, Targets=[t.as_aws() for t in params.register_targets])
        if params.deregister_targets:
            client.deregister_targets(TargetGroupArn=arn, Targets=[t.as_aws() for t in params.deregister_targets])
        output: dict[str, Any] = {
            "target_group_arn": arn,
            "registered": [t.label() for t in params.register_targets],
            "deregistered": [t.label() for t in params.deregister_targets],
        }
        if params.register_targets and params.wait and params.wait_healthy:
            wanted = {t.id for t in params.register_targets}

            targets = [t.as_aws() for t in params.register_targets]

            def healthy() -> tuple[bool, str]:
                answer = client.describe_target_health(TargetGroupArn=arn, Targets=targets)
                states = {d["Target"]["Id"]: d["TargetHealth"]["State"] for d in answer["TargetHealthDescriptions"]}
                good = [t for t in wanted if states.get(t) == "healthy"]
                others = sorted({s for t, s in states.items() if t in wanted and s != "healthy"})
                detail = f"{len(good)} of {len(wanted)} healthy" + (f" (others: {', '.join(others)})" if others else "")
                return len(good) == len(wanted), detail

            _, waited = aws.wait_until(f"targets in {group}", healthy, params.poll_interval)
            output["healthy_after_s"] = round(waited, 3)
        return ActionResult(output=output)
