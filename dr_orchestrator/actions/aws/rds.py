"""``aws.rds.promote``: promote a read replica in the backup region to a standalone database, wait until available.

Just before promoting, the replica's lag behind its source (CloudWatch ``AWS/RDS ReplicaLag``) is
recorded as the service's RPO measurement, with the datapoints behind it.
"""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from typing import Any

from pydantic import Field

from dr_orchestrator.actions.aws.common import Aws, AwsAction, AwsParams, PollingParams
from dr_orchestrator.actions.base import ActionResult
from dr_orchestrator.model.durations import Duration, format_duration

LAG_PERIOD_S = 60  # RDS publishes ReplicaLag every minute


class RdsPromoteParams(AwsParams, PollingParams):
    db_instance: str = Field(description="DB instance identifier (or ARN) of the read replica to promote.")
    backup_retention_days: int | None = Field(
        default=None, ge=0, le=35, description="Automated backup retention of the promoted database (default: AWS's)."
    )
    poll_interval: Duration = Field(
        default=10.0, description="Time between status reads while waiting (seconds or 10s)."
    )
    measure_rpo: bool = Field(
        default=True, description="Record the replica's lag (CloudWatch ReplicaLag) before promotion as the RPO."
    )
    rpo_window: Duration = Field(
        default=600.0, description="How far back to look for the newest ReplicaLag datapoint (seconds or 10m)."
    )


def describe(client: Any, db_instance: str) -> dict[str, Any]:
    return dict(client.describe_db_instances(DBInstanceIdentifier=db_instance)["DBInstances"][0])


def measure_replica_lag(aws: Aws, db_instance: str, window_s: float) -> float | None:
    """The newest 1-minute maximum of ReplicaLag, recorded as ``rpo_s``; None (and why, as an event) if none."""
    end = datetime.now(UTC)
    start = end - timedelta(seconds=window_s)
    query = {
        "Namespace": "AWS/RDS",
        "MetricName": "ReplicaLag",
        "Dimensions": [{"Name": "DBInstanceIdentifier", "Value": db_instance}],
        "StartTime": start,
        "EndTime": end,
        "Period": LAG_PERIOD_S,
        "Statistics": ["Maximum"],
    }
    points = sorted(aws.client("cloudwatch").get_metric_statistics(**query)["Datapoints"], key=lambda p: p["Timestamp"])
    raw = {
        "metric": "AWS/RDS ReplicaLag",
        "db_instance": db_instance,
        "statistic": "Maximum",
        "period_s": LAG_PERIOD_S,
        "window": [start.isoformat(), end.isoformat()],
        "datapoints": [{"at": p["Timestamp"].astimezone(UTC).isoformat(), "lag_s": p["Maximum"]} for p in points],
    }
    if not points or points[-1]["Maximum"] < 0:  # -1: replication is not running
        why = "no ReplicaLag datapoint" if not points else "ReplicaLag is -1 (replication not running)"
        aws.ctx.report("aws.rds.rpo_not_measured", reason=f"{why} in the last {format_duration(window_s)}", **raw)
        return None
    lag = float(points[-1]["Maximum"])
    aws.ctx.measure(
        "rpo_s",
        lag,
        method=f"newest 1-minute maximum of CloudWatch AWS/RDS ReplicaLag of {db_instance} before promotion",
        raw=raw,
    )
    return lag


class RdsPromote(AwsAction[RdsPromoteParams]):
    name = "aws.rds.promote"
    bars_rollback = True  # the old primary must stay fenced once a standby may have been promoted
    Params = RdsPromoteParams
    service = "rds"
    # A second run finds a standalone instance and only waits for it.
    idempotent = True

    def execute(self, params: RdsPromoteParams, aws: Aws) -> ActionResult:
        client = aws.client("rds")
        instance = describe(client, params.db_instance)
        source = instance.get("ReadReplicaSourceDBInstanceIdentifier")
        output: dict[str, Any] = {
            "db_instance": instance["DBInstanceIdentifier"],
            "arn": instance.get("DBInstanceArn"),
            "source": source,
            "promoted": source is not None,
        }
        status = instance["DBInstanceStatus"]
        if source is not None and params.measure_rpo:
            output["rpo_s"] = measure_replica_lag(aws, params.db_instance, params.rpo_window)
        if source is not None:
            kwargs: dict[str, Any] = {"DBInstanceIdentifier": params.db_instance}
            if params.backup_retention_days is not None:
                kwargs["BackupRetentionPeriod"] = params.backup_retention_days
            status = client.promote_read_replica(**kwargs)["DBInstance"]["DBInstanceStatus"]
        if params.wait and status != "available":
            # Promotion goes modifying -> (rebooting) -> available; AWS answers the call with the first.
            def available() -> tuple[bool, str]:
                current = describe(client, params.db_instance)["DBInstanceStatus"]
                return current == "available", current

            status, waited = aws.wait_until(
                f"RDS instance {params.db_instance} promotion", available, params.poll_interval
            )
            output["available_after_s"] = round(waited, 3)
        final = describe(client, params.db_instance)
        output["status"] = final["DBInstanceStatus"]
        output["endpoint"] = (final.get("Endpoint") or {}).get("Address")
        # Empty on AWS once promoted; the local stand-in (moto) keeps naming the old source.
        output["still_names_source"] = final.get("ReadReplicaSourceDBInstanceIdentifier")
        return ActionResult(output=output)
