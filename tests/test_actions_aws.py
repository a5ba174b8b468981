"""The aws.* actions against a local AWS endpoint: moto's server as a separate process, the real boto3 client.

Faults AWS would produce (throttling, a change that never gets in sync) come from a small HTTP proxy
between the client and moto that answers or rewrites chosen operations; an access-denied error comes
from moto's own IAM enforcement. Credentials are fake ones set for these tests only.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from http.client import HTTPConnection
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs, urlsplit

import pytest
import yaml
from botocore.exceptions import ClientError
from pydantic import ValidationError
from support.aws import REGION, Moto, moto_api

from dr_orchestrator.actions import default_registry
from dr_orchestrator.actions.aws.elbv2 import Elbv2ShiftParams
from dr_orchestrator.actions.aws.route53 import Route53SwitchParams
from dr_orchestrator.actions.aws.s3 import S3ArchiveParams
from dr_orchestrator.actions.base import ActionContext, ActionError, ActionResult, RunResources
from dr_orchestrator.engine import Engine, RunOutcome
from dr_orchestrator.lab.scratch import free_port
from dr_orchestrator.loading import load_inventory
from dr_orchestrator.model.events import ActionEvent, Event, MarkerReached, Measurement, StepFinished
from dr_orchestrator.plans import build_plan

pytestmark = pytest.mark.aws

REPO = Path(__file__).resolve().parent.parent
RUNBOOK = REPO / "runbooks" / "cloud-failover-quotation.yml"
INVENTORY = REPO / "inventories" / "aws-example.yml"


# ---------------------------------------------------------------- the world of inventories/aws-example.yml


def quotation_vars() -> dict[str, Any]:
    inventory, _ = load_inventory(str(INVENTORY))
    return dict(inventory.services["quotation"].vars["aws"]) | {"bucket": inventory.vars["evidence_bucket"]}


@dataclass
class Seeded:
    zone_id: str
    instance_ids: list[str]
    bystander_id: str  # a stopped instance without the tags: must stay stopped
    listener_arn: str
    target_groups: dict[str, str]  # name -> ARN
    health_checks: dict[str, str]  # Name tag -> id


def seed_quotation(aws: Moto) -> Seeded:
    """Everything the example inventory names, as a pilot-light backup before failover."""
    v = quotation_vars()
    r53 = aws.client("route53")
    zone_id = r53.create_hosted_zone(Name=v["hosted_zone"], CallerReference="zone")["HostedZone"]["Id"]
    health_checks = {}
    for tag, host in ((v["primary_health_check"], v["onprem_target"]), (v["backup_health_check"], v["cloud_target"])):
        check = r53.create_health_check(
            CallerReference=tag,
            HealthCheckConfig={"Type": "HTTPS", "FullyQualifiedDomainName": host, "Port": 443,
                               "ResourcePath": "/health"},
        )["HealthCheck"]["Id"]
        r53.change_tags_for_resource(ResourceType="healthcheck", ResourceId=check,
                                     AddTags=[{"Key": "Name", "Value": tag}])
        health_checks[tag] = check
    r53.change_resource_record_sets(HostedZoneId=zone_id, ChangeBatch={"Changes": [
        {"Action": "CREATE", "ResourceRecordSet": {
            "Name": v["record"], "Type": "CNAME", "SetIdentifier": v["primary_set_identifier"], "Failover": "PRIMARY",
            "TTL": 300, "ResourceRecords": [{"Value": v["onprem_target"]}],
            "HealthCheckId": health_checks[v["primary_health_check"]]}},
        {"Action": "CREATE", "ResourceRecordSet": {
            "Name": v["record"], "Type": "CNAME", "SetIdentifier": "quotation-secondary", "Failover": "SECONDARY",
            "TTL": 300, "ResourceRecords": [{"Value": v["cloud_target"]}]}},
    ]})

    rds = aws.client("rds")
    rds.create_db_instance(DBInstanceIdentifier="quotation-db-source", Engine="postgres", DBInstanceClass="db.t3.micro",
                           MasterUsername="quotation", MasterUserPassword="not-a-real-password", AllocatedStorage=20)
    rds.create_db_instance_read_replica(DBInstanceIdentifier=v["db_replica"],
                                        SourceDBInstanceIdentifier="quotation-db-source")
    # What RDS publishes every minute: the replica was 2.5 s behind, then 1.5 s (the newest counts).
    now = datetime.now(UTC)
    aws.client("cloudwatch").put_metric_data(Namespace="AWS/RDS", MetricData=[
        {"MetricName": "ReplicaLag", "Dimensions": [{"Name": "DBInstanceIdentifier", "Value": v["db_replica"]}],
         "Timestamp": now - timedelta(seconds=age), "Value": lag, "Unit": "Seconds"}
        for age, lag in ((150, 2.5), (30, 1.5))])

    ec2 = aws.client("ec2")
    vpc = ec2.create_vpc(CidrBlock="10.20.0.0/16")["Vpc"]["VpcId"]
    subnets = [ec2.create_subnet(VpcId=vpc, CidrBlock=f"10.20.{n}.0/24", AvailabilityZone=f"{REGION}{az}")
               ["Subnet"]["SubnetId"] for n, az in ((1, "a"), (2, "b"))]
    tags = [{"Key": k, "Value": val} for k, val in v["instance_tags"].items()]
    reservation = ec2.run_instances(ImageId="ami-12c6146b", MinCount=2, MaxCount=2, InstanceType="t3.small",
                                    SubnetId=subnets[0], TagSpecifications=[{"ResourceType": "instance", "Tags": tags}])
    instance_ids = sorted(i["InstanceId"] for i in reservation["Instances"])
    bystander = ec2.run_instances(ImageId="ami-12c6146b", MinCount=1, MaxCount=1, SubnetId=subnets[0],
                                  TagSpecifications=[{"ResourceType": "instance",
                                                      "Tags": [{"Key": "service", "Value": "quotation"}]}])
    bystander_id = bystander["Instances"][0]["InstanceId"]
    ec2.stop_instances(InstanceIds=[*instance_ids, bystander_id])

    elb = aws.client("elbv2")
    balancer = elb.create_load_balancer(Name=v["load_balancer"], Subnets=subnets)["LoadBalancers"][0]["LoadBalancerArn"]
    target_groups = {
        name: elb.create_target_group(Name=name, Protocol="HTTP", Port=8080, VpcId=vpc, TargetType=kind,
                                      HealthCheckPath="/health")["TargetGroups"][0]["TargetGroupArn"]
        for name, kind in (("quotation-onprem", "ip"), (v["cloud_target_group"], "instance"))
    }
    normal = v["normal_weights"]
    listener_arn = elb.create_listener(
        LoadBalancerArn=balancer, Protocol="HTTP", Port=v["listener_port"],
        DefaultActions=[{"Type": "forward", "ForwardConfig": {"TargetGroups": [
            {"TargetGroupArn": target_groups[name], "Weight": weight} for name, weight in normal.items()]}}],
    )["Listeners"][0]["ListenerArn"]

    aws.client("s3").create_bucket(Bucket=v["bucket"], ObjectLockEnabledForBucket=True,
                                   CreateBucketConfiguration={"LocationConstraint": REGION})
    return Seeded(zone_id, instance_ids, bystander_id, listener_arn, target_groups, health_checks)


def record_values(aws: Moto, zone_id: str, name: str) -> dict[str, list[str]]:
    """Set identifier -> values of the record sets called ``name``."""
    sets = aws.client("route53").list_resource_record_sets(HostedZoneId=zone_id)["ResourceRecordSets"]
    return {r.get("SetIdentifier", ""): [x["Value"] for x in r.get("ResourceRecords", [])]
            for r in sets if r["Name"] == name.rstrip(".") + "."}


def instance_states(aws: Moto, ids: list[str]) -> dict[str, str]:
    answer = aws.client("ec2").describe_instances(InstanceIds=ids)
    return {i["InstanceId"]: i["State"]["Name"] for r in answer["Reservations"] for i in r["Instances"]}


def listener_weights(aws: Moto, listener_arn: str) -> dict[str, int]:
    listener = aws.client("elbv2").describe_listeners(ListenerArns=[listener_arn])["Listeners"][0]
    forward = next(a for a in listener["DefaultActions"] if a["Type"] == "forward")
    return {g["TargetGroupArn"].split("/")[-2]: g["Weight"] for g in forward["ForwardConfig"]["TargetGroups"]}


# ---------------------------------------------------------------- running runbooks and single actions


@dataclass
class Run:
    outcome: RunOutcome
    events: list[Event]

    def calls(self, operation: str | None = None) -> list[dict[str, Any]]:
        return [e.data for e in self.events if isinstance(e, ActionEvent) and e.kind == "aws.call"
                and (operation is None or e.data["operation"] == operation)]

    def problems(self) -> dict[str, tuple[str, str | None]]:
        return {e.step_id: (e.state, e.error) for e in self.events if isinstance(e, StepFinished) and e.error}

    def finished(self, step_id: str) -> StepFinished:
        return next(e for e in self.events if isinstance(e, StepFinished) and e.step_id == step_id
                    and e.phase == "forward")


def run_plan(runbook: Path, inventory: Path, overrides: dict[str, Any] | None = None) -> Run:
    events: list[Event] = []
    plan = build_plan(str(runbook), str(inventory), overrides or {})

    def observe(event: Event) -> None:
        events.append(event)

    outcome = Engine(default_registry(), [observe]).run(plan)
    return Run(outcome, events)


def inventory_with_endpoint(tmp_path: Path, endpoint: str) -> Path:
    """The example inventory with the backup site's aws_endpoint_url set (how one points a site elsewhere)."""
    data = yaml.safe_load(INVENTORY.read_text())
    data["all"]["vars"]["dr"]["sites"]["backup"]["vars"]["aws_endpoint_url"] = endpoint
    path = tmp_path / "inventory.yml"
    path.write_text(yaml.safe_dump(data))
    return path


def one_step_runbook(tmp_path: Path, action: str, params: dict[str, Any], timeout: str = "30s") -> Path:
    path = tmp_path / "runbook.yml"
    path.write_text(yaml.safe_dump({
        "name": "one-step", "scope": {"services": ["quotation"]},
        "steps": [{"id": "step", "action": action, "site": "backup", "with": params, "timeout": timeout}],
    }))
    return path


class Harness:
    """An ActionContext by hand (no engine), keeping what the action emits."""

    def __init__(self, timeout: float = 30.0, site: str | None = "backup") -> None:
        inventory, _ = load_inventory(str(INVENTORY))
        self.events: list[Event] = []
        self.resources = RunResources()
        self.ctx = ActionContext(run_id="run-1", step_id="step-1", attempt=1, inventory=inventory,
                                 emit=self.events.append, cancelled=threading.Event(),
                                 deadline=time.monotonic() + timeout, resources=self.resources, site=site)

    def run(self, action: str, **params: Any) -> ActionResult:
        action_class = default_registry().get(action)
        try:
            return action_class().run(action_class.Params.model_validate(params), self.ctx)
        finally:
            self.resources.close()

    def calls(self) -> list[dict[str, Any]]:
        return [e.data for e in self.events if isinstance(e, ActionEvent) and e.kind == "aws.call"]


# ---------------------------------------------------------------- a proxy that plays AWS's faults


@dataclass
class Fault:
    operation: str
    times: int | None = None  # None: every time
    status: int = 400
    code: str = "Throttling"
    message: str = "Rate exceeded"
    rewrite: Callable[[bytes], bytes] | None = None  # instead of an error: forward and change the answer
    hits: int = 0

    def takes(self, operation: str) -> bool:
        if operation != self.operation or (self.times is not None and self.hits >= self.times):
            return False
        self.hits += 1
        return True


_ROUTE53_OPERATIONS = [
    ("POST", re.compile(r"^/2013-04-01/hostedzone/[^/]+/rrset/?$"), "ChangeResourceRecordSets"),
    ("GET", re.compile(r"^/2013-04-01/change/[^/]+$"), "GetChange"),
]


def operation_of(method: str, path: str, body: bytes) -> str:
    for verb, pattern, name in _ROUTE53_OPERATIONS:
        if method == verb and pattern.match(path.split("?")[0]):
            return name
    action = parse_qs(body.decode(errors="replace")).get("Action")
    return action[0] if action else f"{method} {path}"


@dataclass
class FaultProxy:
    upstream: str
    faults: list[Fault] = field(default_factory=list)
    seen: list[str] = field(default_factory=list)

    def __post_init__(self) -> None:
        proxy = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, format: str, *args: Any) -> None:  # noqa: A002 - the base class's name
                pass

            def handle_one(self) -> None:
                body = self.rfile.read(int(self.headers.get("Content-Length") or 0))
                operation = operation_of(self.command, self.path, body)
                proxy.seen.append(operation)
                fault = next((f for f in proxy.faults if f.takes(operation)), None)
                if fault is not None and fault.rewrite is None:
                    error = (f'<?xml version="1.0"?><ErrorResponse><Error><Type>Sender</Type><Code>{fault.code}'
                             f"</Code><Message>{fault.message}</Message></Error>"
                             f"<RequestId>proxy-{len(proxy.seen)}</RequestId></ErrorResponse>").encode()
                    headers = {"Content-Type": "text/xml", "x-amzn-RequestId": f"proxy-{len(proxy.seen)}"}
                    self.reply(fault.status, headers, error)
                    return
                target = urlsplit(proxy.upstream)
                connection = HTTPConnection(target.hostname or "127.0.0.1", target.port, timeout=30)
                try:
                    headers = {k: v for k, v in self.headers.items() if k.lower() not in ("connection",)}
                    connection.request(self.command, self.path, body=body, headers=headers)
                    response = connection.getresponse()
                    answer = response.read()
                    answer_headers = {k: v for k, v in response.getheaders()
                                      if k.lower() not in ("content-length", "transfer-encoding", "connection")}
                finally:
                    connection.close()
                if fault is not None and fault.rewrite is not None:
                    answer = fault.rewrite(answer)
                self.reply(response.status, answer_headers, answer)

            def reply(self, status: int, headers: dict[str, str], body: bytes) -> None:
                self.send_response(status)
                for key, value in headers.items():
                    self.send_header(key, value)
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                if self.command != "HEAD":
                    self.wfile.write(body)

            do_GET = do_POST = do_PUT = do_DELETE = do_HEAD = handle_one

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.thread = threading.Thread(target=self.server.serve_forever, name="fault-proxy", daemon=True)
        self.thread.start()

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.server.server_address[1]}"

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()
        self.thread.join(5)


@pytest.fixture
def proxy(aws: Moto) -> Iterator[FaultProxy]:
    faulty = FaultProxy(aws.url)
    try:
        yield faulty
    finally:
        faulty.close()


# ---------------------------------------------------------------- the example runbook, for real


@pytest.mark.slow
def test_example_runbook_fails_quotation_over_to_the_cloud_region(aws: Moto) -> None:
    world = seed_quotation(aws)
    v = quotation_vars()
    assert record_values(aws, world.zone_id, v["record"])[v["primary_set_identifier"]] == [v["onprem_target"]]

    run = run_plan(RUNBOOK, INVENTORY, {"health_interval": "100ms"})

    assert run.outcome.state == "succeeded", run.problems()
    assert set(run.outcome.steps.values()) == {"succeeded"}
    # DNS: the PRIMARY failover record now sends users to the load balancer; the rest is untouched.
    records = record_values(aws, world.zone_id, v["record"])
    assert records == {v["primary_set_identifier"]: [v["cloud_target"]], "quotation-secondary": [v["cloud_target"]]}
    primary = next(r for r in aws.client("route53").list_resource_record_sets(HostedZoneId=world.zone_id)
                   ["ResourceRecordSets"] if r.get("SetIdentifier") == v["primary_set_identifier"])
    assert primary["Failover"] == "PRIMARY" and primary["TTL"] == 60
    assert primary["HealthCheckId"] == world.health_checks[v["primary_health_check"]]
    # The database was promoted and is available.
    replica = aws.client("rds").describe_db_instances(DBInstanceIdentifier=v["db_replica"])["DBInstances"][0]
    assert replica["DBInstanceStatus"] == "available"
    assert run.finished("promote-db").output["promoted"] is True
    [rpo] = [e for e in run.events if isinstance(e, Measurement)]
    assert (rpo.metric, rpo.value, rpo.service) == ("rpo_s", 1.5, "quotation")
    assert "ReplicaLag" in rpo.method and [p["lag_s"] for p in rpo.raw["datapoints"]] == [2.5, 1.5]
    assert run.calls("PromoteReadReplica")
    # The tagged instances run, registered and healthy behind the load balancer; the bystander still sleeps.
    assert instance_states(aws, world.instance_ids) == dict.fromkeys(world.instance_ids, "running")
    assert instance_states(aws, [world.bystander_id]) == {world.bystander_id: "stopped"}
    health = aws.client("elbv2").describe_target_health(TargetGroupArn=world.target_groups[v["cloud_target_group"]])
    assert sorted(d["Target"]["Id"] for d in health["TargetHealthDescriptions"]) == world.instance_ids
    assert listener_weights(aws, world.listener_arn) == v["failover_weights"]
    # Service restored at the first of the good health readings of the backup.
    marks = [e for e in run.events if isinstance(e, MarkerReached)]
    assert [(m.marker, m.service, m.site) for m in marks] == [("service_restored", "quotation", "backup")]
    # The run's record is in the evidence bucket, locked in compliance mode for seven years.
    archived = run.finished("archive-evidence").output
    s3 = aws.client("s3")
    head = s3.head_object(Bucket=v["bucket"], Key=archived["key"], VersionId=archived["version_id"])
    assert head["ObjectLockMode"] == "COMPLIANCE"
    assert head["ObjectLockRetainUntilDate"] > datetime.now(UTC) + timedelta(days=2556)
    pack = json.loads(s3.get_object(Bucket=v["bucket"], Key=archived["key"])["Body"].read())
    assert pack["run"]["id"] == run.outcome.run_id
    assert pack["steps"]["switch-dns"]["output"]["change_id"] == run.finished("switch-dns").output["change_id"]
    with pytest.raises(ClientError) as refused:
        s3.delete_object(Bucket=v["bucket"], Key=archived["key"], VersionId=archived["version_id"])
    assert refused.value.response["Error"]["Code"] == "AccessDenied"
    # Every API call is in the evidence with its request id and status.
    calls = run.calls()
    operations = {c["operation"] for c in calls}
    assert {"ChangeResourceRecordSets", "PromoteReadReplica", "StartInstances", "RegisterTargets", "ModifyListener",
            "PutObject", "HeadObject", "GetHealthCheckStatus", "DescribeInstances"} <= operations
    assert all(c["request_id"] and c["http_status"] == 200 and c["retries"] == 0 for c in calls), calls
    assert {c["region"] for c in calls} == {REGION}


@pytest.mark.slow
def test_cli_runs_the_example_against_the_local_endpoint(aws: Moto, tmp_path: Path) -> None:
    world = seed_quotation(aws)
    v = quotation_vars()
    database = f"sqlite:///{tmp_path / 'evidence.db'}"
    env = {**os.environ, "DR_DATABASE_URL": database}

    def dr(*args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run([sys.executable, "-m", "dr_orchestrator.cli", *args], cwd=REPO, env=env,
                              capture_output=True, text=True, timeout=120)

    upgraded = dr("db", "upgrade")
    assert upgraded.returncode == 0, upgraded.stderr
    result = dr("run", "runbooks/cloud-failover-quotation.yml", "-i", "inventories/aws-example.yml",
                "-p", "health_interval=100ms", "--quiet")
    assert result.returncode == 0, result.stdout + result.stderr

    assert record_values(aws, world.zone_id, v["record"])[v["primary_set_identifier"]] == [v["cloud_target"]]
    replica = aws.client("rds").describe_db_instances(DBInstanceIdentifier=v["db_replica"])["DBInstances"][0]
    assert replica["DBInstanceStatus"] == "available"
    assert instance_states(aws, world.instance_ids) == dict.fromkeys(world.instance_ids, "running")
    listed = aws.client("s3").list_object_versions(Bucket=v["bucket"], Prefix="dr-evidence/")["Versions"]
    assert len(listed) == 1
    # The evidence database holds every AWS call with its request id, and the RTO the run achieved.
    run_id = json.loads(dr("runs", "list", "-o", "json").stdout)[0]["id"]
    detail = json.loads(dr("runs", "show", run_id, "-o", "json").stdout)
    calls = [e["data"] for e in detail["events"] if e["kind"] == "aws.call"]
    changes = [c for c in calls if c["operation"] == "ChangeResourceRecordSets"]
    assert len(changes) == 1 and changes[0]["request_id"] and changes[0]["http_status"] == 200
    assert {"PromoteReadReplica", "StartInstances", "ModifyListener", "PutObject"} <= {c["operation"] for c in calls}
    assert listed[0]["Key"] == f"dr-evidence/{run_id}/archive-evidence.json"
    [result] = detail["results"]
    assert (result["service"], result["rto_met"], result["rpo_s"], result["rpo_met"]) == ("quotation", True, 1.5, True)
    with pytest.raises(ClientError) as refused:
        aws.client("s3").delete_object(Bucket=v["bucket"], Key=listed[0]["Key"], VersionId=listed[0]["VersionId"])
    assert refused.value.response["Error"]["Code"] == "AccessDenied"


# ---------------------------------------------------------------- failure paths


@pytest.mark.slow
def test_throttling_is_retried_and_the_retries_are_in_evidence(aws: Moto, proxy: FaultProxy, tmp_path: Path) -> None:
    world = seed_quotation(aws)
    v = quotation_vars()
    proxy.faults.append(Fault("ChangeResourceRecordSets", times=2))
    runbook = one_step_runbook(tmp_path, "aws.route53.switch", {
        "hosted_zone": v["hosted_zone"], "name": v["record"], "type": "CNAME",
        "set_identifier": v["primary_set_identifier"], "values": ["standby.example-bank.com"]})

    run = run_plan(runbook, inventory_with_endpoint(tmp_path, proxy.url))

    assert run.outcome.state == "succeeded", run.finished("step").error
    assert proxy.seen.count("ChangeResourceRecordSets") == 3
    [change] = run.calls("ChangeResourceRecordSets")
    assert change["retries"] == 2 and change["retried_errors"] == ["Throttling", "Throttling"]
    assert change["http_status"] == 200 and change["request_id"]
    assert record_values(aws, world.zone_id, v["record"])[v["primary_set_identifier"]] == ["standby.example-bank.com"]


@pytest.mark.slow
def test_throttling_that_outlasts_the_retries_fails_the_step_clearly(aws: Moto, proxy: FaultProxy,
                                                                     tmp_path: Path) -> None:
    seed_quotation(aws)
    v = quotation_vars()
    proxy.faults.append(Fault("StartInstances"))
    runbook = one_step_runbook(tmp_path, "aws.ec2.start", {"tags": v["instance_tags"], "max_attempts": 2})

    run = run_plan(runbook, inventory_with_endpoint(tmp_path, proxy.url))

    assert run.outcome.steps == {"step": "failed"}
    assert run.finished("step").error == (
        "AWS ec2 StartInstances failed with Throttling: Rate exceeded (after 1 retry)")
    [start] = run.calls("StartInstances")
    assert start["http_status"] == 400 and start["error_code"] == "Throttling" and start["retries"] == 1


def test_access_denied_fails_the_step_naming_operation_code_and_message(
    aws: Moto, monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    seed_quotation(aws)
    v = quotation_vars()
    iam = aws.client("iam")
    iam.create_user(UserName="dr-operator")
    iam.put_user_policy(UserName="dr-operator", PolicyName="no-promotion", PolicyDocument=json.dumps({
        "Version": "2012-10-17",
        "Statement": [{"Effect": "Allow", "Action": "*", "Resource": "*"},
                      {"Effect": "Deny", "Action": "rds:PromoteReadReplica", "Resource": "*"}]}))
    key = iam.create_access_key(UserName="dr-operator")["AccessKey"]
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", key["AccessKeyId"])
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", key["SecretAccessKey"])
    runbook = one_step_runbook(tmp_path, "aws.rds.promote", {"db_instance": v["db_replica"]})
    moto_api(aws.url, "reset-auth", b"0")  # from now on moto checks every request against IAM
    try:
        run = run_plan(runbook, INVENTORY)
    finally:
        moto_api(aws.url, "reset-auth", b"inf")

    assert run.outcome.steps == {"step": "failed"}
    assert run.finished("step").error == (
        "AWS rds PromoteReadReplica failed with AccessDenied: User: arn:aws:iam::123456789012:user/dr-operator "
        "is not authorized to perform: rds:PromoteReadReplica")
    [denied] = run.calls("PromoteReadReplica")
    assert denied["http_status"] == 403 and denied["error_code"] == "AccessDenied"  # moto gives it no request id
    assert run.calls("DescribeDBInstances")[0]["http_status"] == 200  # reading was allowed


@pytest.mark.slow
def test_a_change_that_never_gets_in_sync_hits_the_step_timeout(aws: Moto, proxy: FaultProxy,
                                                                 tmp_path: Path) -> None:
    seed_quotation(aws)
    v = quotation_vars()

    def pending(answer: bytes) -> bytes:
        return answer.replace(b"<Status>INSYNC</Status>", b"<Status>PENDING</Status>")

    proxy.faults += [Fault("ChangeResourceRecordSets", rewrite=pending), Fault("GetChange", rewrite=pending)]
    runbook = one_step_runbook(tmp_path, "aws.route53.switch", {
        "hosted_zone": v["hosted_zone"], "name": v["record"], "type": "CNAME",
        "set_identifier": v["primary_set_identifier"], "values": [v["cloud_target"]], "poll_interval": "200ms",
    }, timeout="5s")

    started = time.monotonic()
    run = run_plan(runbook, inventory_with_endpoint(tmp_path, proxy.url))
    took = time.monotonic() - started

    assert run.outcome.steps == {"step": "timed_out"}
    assert "timed out after 5s" in (run.finished("step").error or "")
    assert "abandoned" not in (run.finished("step").error or "")  # the wait stopped when told
    assert took < 9
    assert len(run.calls("GetChange")) >= 2
    waits = [e.data for e in run.events if isinstance(e, ActionEvent) and e.kind == "aws.wait"]
    assert waits and waits[0]["state"] == "PENDING"


def test_archived_file_cannot_be_deleted_before_its_retention_date(aws: Moto, tmp_path: Path) -> None:
    seed_quotation(aws)
    bucket = quotation_vars()["bucket"]
    pack = tmp_path / "evidence-pack.json"
    pack.write_text(json.dumps({"run": "run-1", "rto_s": 412.5}))
    until = (datetime.now(UTC) + timedelta(days=3)).date().isoformat()

    output = Harness().run("aws.s3.archive", bucket=bucket, file=str(pack), retain_until=until).output

    assert output["key"] == "dr-evidence/run-1/evidence-pack.json"
    assert output["retain_until"] == f"{until}T00:00:00+00:00" and output["mode"] == "COMPLIANCE"
    s3 = aws.client("s3")
    with pytest.raises(ClientError) as refused:
        s3.delete_object(Bucket=bucket, Key=output["key"], VersionId=output["version_id"])
    assert refused.value.response["Error"]["Code"] == "AccessDenied"
    s3.delete_object(Bucket=bucket, Key=output["key"])  # only hides it behind a delete marker
    kept = s3.get_object(Bucket=bucket, Key=output["key"], VersionId=output["version_id"])
    assert json.loads(kept["Body"].read()) == {"run": "run-1", "rto_s": 412.5}
    assert kept["Metadata"]["sha256"] == output["sha256"]


def test_archiving_to_a_bucket_without_object_lock_fails_clearly(aws: Moto, tmp_path: Path) -> None:
    aws.client("s3").create_bucket(Bucket="plain", CreateBucketConfiguration={"LocationConstraint": REGION})
    with pytest.raises(ActionError, match="AWS s3 PutObject failed with InvalidRequest: Bucket is missing"):
        Harness().run("aws.s3.archive", bucket="plain", content={"a": 1}, retain_days=1)


# ---------------------------------------------------------------- the actions one by one


def test_weighted_records_shift_and_a_second_run_changes_nothing(aws: Moto) -> None:
    zone = aws.client("route53").create_hosted_zone(Name="example-bank.com", CallerReference="z")["HostedZone"]["Id"]
    aws.client("route53").change_resource_record_sets(HostedZoneId=zone, ChangeBatch={"Changes": [
        {"Action": "CREATE", "ResourceRecordSet": {"Name": "api.example-bank.com", "Type": "A", "SetIdentifier": site,
                                                   "Weight": weight, "TTL": 30, "ResourceRecords": [{"Value": ip}]}}
        for site, weight, ip in (("dc1", 100, "192.0.2.10"), ("eu-west-1", 0, "198.51.100.10"))]})
    params = {"hosted_zone": "example-bank.com", "name": "api.example-bank.com",
              "weights": {"dc1": 0, "eu-west-1": 100}}

    first = Harness()
    output = first.run("aws.route53.switch", **params).output
    second = Harness()
    again = second.run("aws.route53.switch", **params).output

    assert output["changed"] is True and output["status"] == "INSYNC"
    assert [(r["set_identifier"], r["weight"]) for r in output["previous"]] == [("dc1", 100), ("eu-west-1", 0)]
    sets = aws.client("route53").list_resource_record_sets(HostedZoneId=zone)["ResourceRecordSets"]
    assert {r["SetIdentifier"]: r["Weight"] for r in sets if "Weight" in r} == {"dc1": 0, "eu-west-1": 100}
    assert again["changed"] is False
    assert "ChangeResourceRecordSets" not in {c["operation"] for c in second.calls()}


@pytest.mark.slow
def test_switching_a_record_set_that_does_not_exist_names_the_ones_that_do(aws: Moto) -> None:
    seed_quotation(aws)
    with pytest.raises(ActionError, match=r"has no record set 'quotation-primry' \(set identifiers: "
                                          r"quotation-primary, quotation-secondary\)"):
        Harness().run("aws.route53.switch", hosted_zone="example-bank.com", name="quotation.example-bank.com",
                      type="CNAME", set_identifier="quotation-primry", values=["x.example.com"])


def test_health_check_that_never_turns_unhealthy_fails_at_the_deadline(aws: Moto) -> None:
    world = seed_quotation(aws)
    check = world.health_checks["quotation-dc1"]
    with pytest.raises(ActionError, match=r"no good probe within 300ms \(\d+ probes"):
        Harness().run("aws.route53.health", health_check=check, expect="unhealthy", interval="50ms", deadline="300ms")


@pytest.mark.slow
def test_ec2_start_by_ids_skips_running_ones_and_refuses_terminated_ones(aws: Moto) -> None:
    world = seed_quotation(aws)
    ec2 = aws.client("ec2")
    ec2.start_instances(InstanceIds=[world.instance_ids[0]])

    harness = Harness()
    output = harness.run("aws.ec2.start", instance_ids=world.instance_ids, wait_for="status_ok",
                         poll_interval="100ms").output

    assert output["started"] == [world.instance_ids[1]] and output["already_up"] == [world.instance_ids[0]]
    assert set(output["states"].values()) == {"running"}
    ec2.terminate_instances(InstanceIds=[world.bystander_id])
    with pytest.raises(ActionError, match=f"cannot start EC2 instances: {world.bystander_id} is (terminated|shutting)"):
        Harness().run("aws.ec2.start", instance_ids=[world.bystander_id])
    with pytest.raises(ActionError, match="no EC2 instances match team=nobody"):
        Harness().run("aws.ec2.start", tags={"team": "nobody"})


def test_elbv2_weights_by_listener_arn_and_targets_moved_between_sites(aws: Moto) -> None:
    world = seed_quotation(aws)
    onprem, cloud = world.target_groups["quotation-onprem"], world.target_groups["quotation-cloud"]
    aws.client("elbv2").register_targets(TargetGroupArn=onprem, Targets=[{"Id": "10.20.1.21", "Port": 8080}])

    shifted = Harness().run("aws.elbv2.shift", listener_arn=world.listener_arn, weights={cloud: 70})
    moved = Harness().run("aws.elbv2.shift", target_group="quotation-onprem", register_targets=["10.20.1.99:8080"],
                          deregister_targets=["10.20.1.21:8080"], poll_interval="100ms")

    assert shifted.output["previous_weights"] == {onprem: 100, cloud: 0}
    assert listener_weights(aws, world.listener_arn) == {"quotation-onprem": 100, "quotation-cloud": 70}
    assert moved.output["registered"] == ["10.20.1.99:8080"] and moved.output["deregistered"] == ["10.20.1.21:8080"]
    health = aws.client("elbv2").describe_target_health(TargetGroupArn=onprem)["TargetHealthDescriptions"]
    assert [(d["Target"]["Id"], d["Target"]["Port"]) for d in health] == [("10.20.1.99", 8080)]
    with pytest.raises(ActionError, match="every target group would get weight 0"):
        Harness().run("aws.elbv2.shift", load_balancer="quotation-alb", port=80,
                      weights={"quotation-onprem": 0, "quotation-cloud": 0})


@pytest.mark.slow
def test_promotion_without_lag_datapoints_says_why_no_rpo_was_measured(aws: Moto) -> None:
    aws.client("rds").create_db_instance(DBInstanceIdentifier="src", Engine="postgres", DBInstanceClass="db.t3.micro",
                                         MasterUsername="u", MasterUserPassword="not-a-real-password",
                                         AllocatedStorage=20)
    aws.client("rds").create_db_instance_read_replica(DBInstanceIdentifier="replica", SourceDBInstanceIdentifier="src")
    harness = Harness()

    output = harness.run("aws.rds.promote", db_instance="replica", rpo_window="5m").output

    assert output["promoted"] is True and output["rpo_s"] is None and output["status"] == "available"
    assert not [e for e in harness.events if isinstance(e, Measurement)]
    [why] = [e.data for e in harness.events if isinstance(e, ActionEvent) and e.kind == "aws.rds.rpo_not_measured"]
    assert why["reason"] == "no ReplicaLag datapoint in the last 5.0m" and why["datapoints"] == []
    again = Harness().run("aws.rds.promote", db_instance="replica").output
    assert again["status"] == "available"


@pytest.mark.slow
def test_endpoint_comes_from_the_parameter_then_the_site_then_the_environment(
    aws: Moto, monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    seed_quotation(aws)
    dead = f"http://127.0.0.1:{free_port()}"
    monkeypatch.setenv("AWS_ENDPOINT_URL", dead)
    db = {"db_instance": quotation_vars()["db_replica"], "max_attempts": 1}

    by_param = run_plan(one_step_runbook(tmp_path, "aws.rds.promote", {**db, "endpoint_url": aws.url}),
                        inventory_with_endpoint(tmp_path, dead))
    by_site = run_plan(one_step_runbook(tmp_path, "aws.rds.promote", db), inventory_with_endpoint(tmp_path, aws.url))
    by_env = run_plan(one_step_runbook(tmp_path, "aws.rds.promote", db), INVENTORY)

    assert by_param.outcome.steps == by_site.outcome.steps == {"step": "succeeded"}
    assert by_env.outcome.steps == {"step": "failed"}
    assert (by_env.finished("step").error or "").startswith(
        f'AWS rds call failed: Could not connect to the endpoint URL: "{dead}')
    [unreachable] = by_env.calls()
    assert unreachable["operation"] == "DescribeDBInstances" and unreachable["error_code"] == "EndpointConnectionError"


def test_without_credentials_the_step_says_where_they_come_from(aws: Moto, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("AWS_ACCESS_KEY_ID")
    monkeypatch.delenv("AWS_SECRET_ACCESS_KEY")
    with pytest.raises(ActionError, match="no AWS credentials found in the standard chain"):
        Harness().run("aws.rds.promote", db_instance="quotation-db-replica")


def test_region_comes_from_the_site_and_an_unknown_site_is_named(aws: Moto) -> None:
    with pytest.raises(ActionError, match="site 'moon' is not in inventory 'aws-example' \\(sites: primary, backup\\)"):
        Harness(site="moon").run("aws.rds.promote", db_instance="x")
    with pytest.raises(ActionError, match="no AWS region: give the site a region"):
        Harness(site="primary").run("aws.rds.promote", db_instance="x")  # on-premises: no region


@pytest.mark.parametrize(
    ("model", "params", "message"),
    [
        (Route53SwitchParams, {"hosted_zone": "z", "name": "n"}, "give values or alias"),
        (Route53SwitchParams, {"hosted_zone": "z", "name": "n", "values": ["a"], "weights": {"a": 1}},
         "give values or alias"),
        (Route53SwitchParams, {"hosted_zone": "z", "name": "n", "weights": {"a": 300}}, "weights are 0 to 255"),
        (Route53SwitchParams, {"hosted_zone": "z", "name": "n", "values": ["a"], "failover": "PRIMARY"},
         "needs its set_identifier"),
        (Elbv2ShiftParams, {"weights": {"tg": 1}}, "name the listener"),
        (Elbv2ShiftParams, {"target_group": "tg"}, "needs register_targets and/or deregister_targets"),
        (S3ArchiveParams, {"bucket": "b", "content": "x"}, "give either retain_days or retain_until"),
        (S3ArchiveParams, {"bucket": "b", "retain_days": 1}, "give either file"),
        (S3ArchiveParams, {"bucket": "b", "content": "x", "retain_until": "2030-01-01T00:00:00"},
         "give a time zone"),
    ],
)
def test_parameters_that_cannot_work_are_refused_before_any_call(model: Any, params: dict[str, Any],
                                                                 message: str) -> None:
    with pytest.raises(ValidationError, match=re.escape(message)):
        model.model_validate(params)


def test_dr_help_does_not_import_boto3() -> None:
    probe = "import sys, dr_orchestrator.cli, dr_orchestrator.plans; print('boto3' in sys.modules)"
    result = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, timeout=60, check=True)
    assert result.stdout.strip() == "False"
