"""``aws.rds.promote``: promote a read replica in the backup region to a standalone database, wait until available."""

from __future__ import annotations

from typing import Any

from pydantic import Field

from dr_orchestrator.actions.aws.common import Aws, AwsAction, AwsParams, PollingParams
from dr_orchestrator.actions.base import ActionResult


class RdsPromoteParams(AwsParams, PollingParams):
    db_instance: str = Field(description="DB instance identifier (or ARN) of the read replica to promote.")
    backup_retention_days: int | None = Field(
        default=None, ge=0, le=35, description="Automated backup retention of the promoted database (default: AWS's)."
    )
    poll_interval: float = Field(default=10.0, description="Time between status reads while waiting (seconds or 10s).")


def describe(client: Any, db_instance: str) -> dict[str, Any]:
    return dict(client.describe_db_instances(DBInstanceIdentifier=db_instance)["DBInstances"][0])


class RdsPromote(AwsAction[RdsPromoteParams]):
    name = "aws.rds.promote"
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
