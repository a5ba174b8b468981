"""``aws.s3.archive``: keep a file (a run's evidence pack) in an Object Lock bucket, undeletable until a date.

The object is written with its retention in one request (COMPLIANCE mode by default: nobody, the
root account included, can delete it or shorten its retention), with a SHA-256 checksum that S3
verifies on receipt, then read back with HEAD to check that the lock and the content landed.
"""

from __future__ import annotations

import base64
import hashlib
import json
import os
from datetime import UTC, date, datetime, time, timedelta
from pathlib import Path
from typing import Any, Literal

from pydantic import Field, field_validator, model_validator

from dr_orchestrator.actions.aws.common import Aws, AwsAction, AwsParams
from dr_orchestrator.actions.base import ActionContext, ActionError, ActionResult

# put_object's limit; evidence packs are far smaller.
MAX_BYTES = 5 * 1024**3
_CHUNK = 1024 * 1024


class S3ArchiveParams(AwsParams):
    bucket: str = Field(description="Bucket created with Object Lock enabled.")
    key: str | None = Field(
        default=None, description="Object key (default: dr-evidence/<run id>/<file name, or <step id>.json>)."
    )
    file: str | None = Field(default=None, description="Path of the file to archive.")
    content: str | dict[str, Any] | list[Any] | None = Field(
        default=None, description="Or the content itself: text, or a mapping/list stored as JSON."
    )
    retain_days: int | None = Field(default=None, ge=1, le=36500, description="Keep it locked this many days.")
    retain_until: datetime | None = Field(
        default=None, description="Or until this moment (ISO-8601; a bare date means midnight UTC)."
    )
    mode: Literal["COMPLIANCE", "GOVERNANCE"] = Field(
        default="COMPLIANCE", description="Object Lock mode; COMPLIANCE cannot be lifted by anyone."
    )
    content_type: str | None = Field(default=None, description="Content-Type (default: JSON for content mappings).")

    @field_validator("retain_until", mode="before")
    @classmethod
    def _date_or_time(cls, value: Any) -> Any:
        if isinstance(value, date) and not isinstance(value, datetime):
            return datetime.combine(value, time(0), UTC)
        if isinstance(value, str) and len(value) == 10:  # 2027-01-31
            return datetime.combine(date.fromisoformat(value), time(0), UTC)
        return value

    @field_validator("retain_until")
    @classmethod
    def _aware(cls, value: datetime | None) -> datetime | None:
        if value is not None and value.tzinfo is None:
            raise ValueError("give a time zone, e.g. 2027-01-31T00:00:00Z")
        return value

    @model_validator(mode="after")
    def _what_and_how_long(self) -> S3ArchiveParams:
        if (self.file is None) == (self.content is None):
            raise ValueError("give either file (a path) or content (text or a mapping), one of them")
        if (self.retain_days is None) == (self.retain_until is None):
            raise ValueError("give either retain_days or retain_until, one of them")
        return self


def retention_end(params: S3ArchiveParams) -> datetime:
    now = datetime.now(UTC)
    until = params.retain_until or now + timedelta(days=params.retain_days or 0)
    until = until.astimezone(UTC).replace(microsecond=0)  # S3 keeps whole seconds
    if until <= now:
        raise ActionError(f"retain_until {until.isoformat()} is not in the future")
    return until


def body_of(params: S3ArchiveParams) -> tuple[bytes | None, Path | None, str]:
    """The bytes to store (for content) or the file to stream, and a default object name."""
    if params.file is not None:
        path = Path(params.file)
        if not path.is_file():
            raise ActionError(f"file {params.file!r} does not exist or is not a regular file")
        if path.stat().st_size > MAX_BYTES:
            raise ActionError(f"file {params.file!r} is larger than 5 GiB, the most one PUT can store")
        return None, path, path.name
    content = params.content
    if isinstance(content, str):
        return content.encode(), None, "content.txt"
    return json.dumps(content, indent=2, sort_keys=True, default=str).encode(), None, "content.json"


def sha256_of(data: bytes | None, path: Path | None) -> tuple[str, int]:
    digest = hashlib.sha256()
    size = 0
    if data is not None:
        digest.update(data)
        size = len(data)
    elif path is not None:
        with path.open("rb") as handle:
            while chunk := handle.read(_CHUNK):
                digest.update(chunk)
                size += len(chunk)
    return digest.hexdigest(), size


def default_key(ctx: ActionContext, name: str) -> str:
    if name.startswith("content."):
        name = f"{ctx.step_id}{os.path.splitext(name)[1]}"
    return f"dr-evidence/{ctx.run_id}/{name}"


class S3Archive(AwsAction[S3ArchiveParams]):
    name = "aws.s3.archive"
    Params = S3ArchiveParams
    service = "s3"
    idempotent = True  # archiving again adds a version; nothing is lost or unlocked

    def execute(self, params: S3ArchiveParams, aws: Aws) -> ActionResult:
        client = aws.client("s3")
        until = retention_end(params)
        data, path, name = body_of(params)
        sha256, size = sha256_of(data, path)
        key = params.key or default_key(aws.ctx, name)
        content_type = params.content_type or (
            "application/json" if isinstance(params.content, (dict, list)) or name.endswith(".json") else None
        )
        extra: dict[str, Any] = {"ContentType": content_type} if content_type else {}
        checksum = base64.b64encode(bytes.fromhex(sha256)).decode()
        metadata = {"sha256": sha256, "dr-run-id": aws.ctx.run_id, "dr-step": aws.ctx.step_id}
        put = {"Bucket": params.bucket, "Key": key, "ObjectLockMode": params.mode, "ObjectLockRetainUntilDate": until,
               "ChecksumAlgorithm": "SHA256", "ChecksumSHA256": checksum, "Metadata": metadata, **extra}
        if path is not None:
            with path.open("rb") as handle:
                answer = client.put_object(Body=handle, **put)
        else:
            answer = client.put_object(Body=data, **put)
        version = answer.get("VersionId")
        # Read back what S3 holds (moto answers get_object_retention with a 500; HEAD carries the lock too).
        head = client.head_object(Bucket=params.bucket, Key=key, **({"VersionId": version} if version else {}))
        problems = []
        if head.get("ObjectLockMode") != params.mode:
            problems.append(f"lock mode is {head.get('ObjectLockMode')!r}, not {params.mode}")
        held_until = head.get("ObjectLockRetainUntilDate")
        if held_until is None or held_until < until:
            problems.append(f"retained until {held_until}, not {until.isoformat()}")
        if head.get("ContentLength") != size or (head.get("Metadata") or {}).get("sha256") != sha256:
            problems.append(f"content differs ({head.get('ContentLength')} bytes stored, {size} sent)")
        if problems:
            raise ActionError(f"s3://{params.bucket}/{key} was stored but " + "; ".join(problems))
        return ActionResult(
            output={
                "bucket": params.bucket,
                "key": key,
                "version_id": version,
                "etag": head.get("ETag"),
                "sha256": sha256,
                "bytes": size,
                "mode": params.mode,
                "retain_until": held_until.astimezone(UTC).isoformat(),
            }
        )
