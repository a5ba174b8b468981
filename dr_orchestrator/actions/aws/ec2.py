"""``aws.ec2.start``: start the backup site's instances (by id or by tags) and wait until they run."""

from __future__ import annotations

from typing import Any, Literal

from pydantic import Field, model_validator

from dr_orchestrator.actions.aws.common import Aws, AwsAction, AwsParams, PollingParams, paginate
from dr_orchestrator.actions.base import ActionError, ActionResult
from dr_orchestrator.model.runbook import Effect

# States an instance passes through on its way up; anything else cannot be started.
_STARTABLE = {"stopped", "stopping", "pending", "running"}


class Ec2StartParams(AwsParams, PollingParams):
    instance_ids: list[str] = Field(default_factory=list, description="Instances to start.")
    tags: dict[str, str] = Field(
        default_factory=dict, description="Start every instance carrying all these tags, e.g. {dr-site: backup}."
    )
    wait_for: Literal["running", "status_ok"] = Field(
        default="running", description="running, or status_ok (EC2's instance and system status checks pass)."
    )

    @model_validator(mode="after")
    def _some_instances(self) -> Ec2StartParams:
        if not self.instance_ids and not self.tags:
            raise ValueError("name the instances: instance_ids, tags, or both (both = the ids that carry the tags)")
        return self


def find_instances(client: Any, params: Ec2StartParams) -> dict[str, str]:
    """Instance id -> state name, of the instances the step is about (terminated ones excluded)."""
    kwargs: dict[str, Any] = {}
    if params.instance_ids:
        kwargs["InstanceIds"] = params.instance_ids
    filters = [{"Name": f"tag:{key}", "Values": [value]} for key, value in params.tags.items()]
    if filters:
        kwargs["Filters"] = filters
    states = {}
    for reservation in paginate(client, "describe_instances", "Reservations", **kwargs):
        for instance in reservation["Instances"]:
            states[instance["InstanceId"]] = instance["State"]["Name"]
    if params.tags:
        states = {i: s for i, s in states.items() if s != "terminated"}
    if not states:
        wanted = ", ".join(params.instance_ids) or ", ".join(f"{k}={v}" for k, v in params.tags.items())
        raise ActionError(f"no EC2 instances match {wanted}")
    return states


def status_checks_ok(client: Any, instance_ids: list[str]) -> tuple[bool, str]:
    statuses = paginate(client, "describe_instance_status", "InstanceStatuses",
                        InstanceIds=instance_ids, IncludeAllInstances=True)
    pending = [
        s["InstanceId"] for s in statuses
        if s.get("InstanceStatus", {}).get("Status") != "ok" or s.get("SystemStatus", {}).get("Status") != "ok"
    ]
    return not pending and len(statuses) == len(instance_ids), f"status checks pending on {len(pending)}"


class Ec2Start(AwsAction[Ec2StartParams]):
    name = "aws.ec2.start"
    effect = Effect.REVERSIBLE
    Params = Ec2StartParams
    service = "ec2"
    idempotent = True  # starting a running instance changes nothing

    def execute(self, params: Ec2StartParams, aws: Aws) -> ActionResult:
        client = aws.client("ec2")
        states = find_instances(client, params)
        ids = sorted(states)
        stuck = {i: s for i, s in states.items() if s not in _STARTABLE}
        if stuck:
            listed = ", ".join(f"{i} is {s}" for i, s in sorted(stuck.items()))
            raise ActionError(f"cannot start EC2 instances: {listed}")
        stopping = [i for i in ids if states[i] == "stopping"]
        if stopping:
            # EC2 refuses to start an instance until it has stopped.
            def stopped() -> tuple[bool, str]:
                now = find_instances(client, params.model_copy(update={"instance_ids": stopping, "tags": {}}))
                still = [i for i in stopping if now[i] == "stopping"]
                return not still, f"{len(still)} of {len(stopping)} still stopping"

            aws.wait_until("EC2 instances to finish stopping", stopped, params.poll_interval)
            states = find_instances(client, params)
        to_start = [i for i in ids if states[i] == "stopped"]
        if to_start:
            client.start_instances(InstanceIds=to_start)
        output: dict[str, Any] = {"instance_ids": ids, "started": to_start,
                                  "already_up": [i for i in ids if i not in to_start]}
        if params.wait:
            exact = params.model_copy(update={"instance_ids": ids, "tags": {}})

            def running() -> tuple[bool, str]:
                now = find_instances(client, exact)
                up = [i for i in ids if now[i] == "running"]
                fallen = {i: now[i] for i in ids if now[i] not in _STARTABLE}
                if fallen:
                    listed = ", ".join(f"{i} is {s}" for i, s in sorted(fallen.items()))
                    raise ActionError(f"EC2 instances did not come up: {listed}")
                return len(up) == len(ids), f"{len(up)} of {len(ids)} running"

            _, waited = aws.wait_until("EC2 instances to run", running, params.poll_interval)
            output["running_after_s"] = round(waited, 3)
            if params.wait_for == "status_ok":
                _, waited = aws.wait_until(
                    "EC2 status checks", lambda: status_checks_ok(client, ids), params.poll_interval
                )
                output["status_ok_after_s"] = round(waited, 3)
        output["states"] = find_instances(client, params.model_copy(update={"instance_ids": ids, "tags": {}}))
        return ActionResult(output=output)
