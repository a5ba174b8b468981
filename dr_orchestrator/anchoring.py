"""Anchoring composed: the sinks that reach out through actions (an S3 bucket under Object Lock with
``aws.s3.archive``, a webhook with ``notify.webhook``'s delivery), reading anchors back from a file,
a bucket or a URL, and the anchor made after every run's end when anchoring is configured.

Configuration (read when a run ends; ``dr evidence anchor`` takes the same as options):

- ``DR_ANCHOR_SINKS``: sinks separated by spaces or commas: ``file:/path/anchors.jsonl``,
  ``s3://bucket/prefix?retain_days=2557&mode=COMPLIANCE&region=eu-west-1&endpoint_url=URL``,
  ``https://receiver/path`` or ``webhook:env:NAME`` (a URL holding a token, by reference).
- ``DR_ANCHOR_SIGNING_KEY``: the Ed25519 private key by reference (``file:/path``, ``env:NAME``).

At a run's end the anchor is made on a background thread once the run's end is recorded and its
locks are free: it never delays or fails the run. A sink's failure is logged (a warning on stderr for
``dr run``) and recorded in the ``evidence.anchor`` audit event; a process exiting waits up to
``EXIT_WAIT_S`` for anchors still being written.
"""

from __future__ import annotations

import atexit
import json
import logging
import os
import re
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs, urlsplit

from sqlalchemy.orm import Session

from dr_orchestrator.evidence.anchors import (
    AUDIT_ACTION,
    Anchor,
    FileSink,
    Found,
    Sink,
    anchor_chain,
    parse_anchor,
    read_file,
    record_anchoring,
)
from dr_orchestrator.evidence.signing import SigningKeyError, load_signing_key

SINKS_ENV = "DR_ANCHOR_SINKS"
KEY_ENV = "DR_ANCHOR_SIGNING_KEY"
DEFAULT_RETAIN_DAYS = 2557  # seven years: longer than the evidence's default six
EXIT_WAIT_S = 30.0
_S3_OPTIONS = {"retain_days", "mode", "region", "endpoint_url"}
_CALL_TIMEOUT_S = 60.0

log = logging.getLogger(__name__)


class AnchorConfigError(ValueError):
    """A sink, a source or the key is given wrongly: one sentence naming it."""


# -- sinks ------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class S3Location:
    bucket: str
    prefix: str
    region: str | None = None
    endpoint_url: str | None = None

    def key_for(self, anchor: Anchor) -> str:
        return f"{self.prefix}{anchor.seq:012d}-{anchor.at:%Y%m%dT%H%M%S%fZ}.json"


@dataclass(frozen=True)
class S3Sink:
    """Each anchor an object of its own, written under Object Lock by ``aws.s3.archive`` (which reads
    the lock back)."""

    where: S3Location
    retain_days: int = DEFAULT_RETAIN_DAYS
    mode: str = "COMPLIANCE"

    @property
    def name(self) -> str:
        return f"s3://{self.where.bucket}/{self.where.prefix}"

    def write(self, anchor: Anchor) -> str:
        from dr_orchestrator.actions.aws.s3 import S3Archive, S3ArchiveParams
        from dr_orchestrator.actions.base import ActionContext, RunResources
        from dr_orchestrator.model.inventory import Inventory

        key = self.where.key_for(anchor)
        params = S3ArchiveParams(bucket=self.where.bucket, key=key, content=anchor.as_dict(),
                                 retain_days=self.retain_days, mode=self.mode,
                                 region=self.where.region, endpoint_url=self.where.endpoint_url, max_attempts=3)
        resources = RunResources()
        ctx = ActionContext(run_id=anchor.run_id or "anchor", step_id=f"anchor-{anchor.seq}", attempt=1,
                            inventory=Inventory(name="anchors", sites={}, hosts={}, services={}),
                            emit=lambda _event: None, cancelled=threading.Event(),
                            deadline=time.monotonic() + _CALL_TIMEOUT_S, resources=resources)
        try:
            output = S3Archive().run(params, ctx).output
        finally:
            resources.close()
        return (f"stored s3://{self.where.bucket}/{key} version {output['version_id']}, "
                f"{output['mode']} lock until {output['retain_until']}")


@dataclass(frozen=True)
class WebhookSink:
    """POSTs the anchor as JSON, with notify.webhook's retries."""

    url: str  # or a reference (env:NAME, file:/path) when the URL holds a token

    @property
    def name(self) -> str:
        from dr_orchestrator.actions.notify import shown_url

        return f"webhook {shown_url(self.url)}"

    def write(self, anchor: Anchor) -> str:
        from dr_orchestrator.actions.notify import WebhookParams, deliver_webhook

        delivery = deliver_webhook(WebhookParams(url=self.url, payload=anchor.as_dict(), attempts=3, timeout=5.0))
        if not delivery.delivered:
            raise RuntimeError(f"not delivered after {delivery.attempts} tries: {delivery.detail}")
        return f"delivered ({delivery.detail})"


def _s3_location(spec: str) -> tuple[S3Location, dict[str, str]]:
    parts = urlsplit(spec)
    if not parts.netloc:
        raise AnchorConfigError(f"{spec!r} names no bucket: write s3://BUCKET/PREFIX")
    options = {name: values[-1] for name, values in parse_qs(parts.query, keep_blank_values=True).items()}
    unknown = sorted(set(options) - _S3_OPTIONS)
    if unknown:
        raise AnchorConfigError(f"{spec!r}: unknown option {unknown[0]!r} (known: {', '.join(sorted(_S3_OPTIONS))})")
    prefix = parts.path.lstrip("/")
    prefix = prefix if not prefix or prefix.endswith("/") else prefix + "/"
    where = S3Location(parts.netloc, prefix, options.get("region") or None, options.get("endpoint_url") or None)
    return where, options


def parse_sink(spec: str) -> Sink:
    if spec.startswith("file:") and len(spec) > len("file:"):
        return FileSink(Path(spec[len("file:"):]))
    if spec.startswith("s3://"):
        where, options = _s3_location(spec)
        mode = options.get("mode", "COMPLIANCE").upper()
        if mode not in ("COMPLIANCE", "GOVERNANCE"):
            raise AnchorConfigError(f"{spec!r}: mode {mode!r} is not COMPLIANCE or GOVERNANCE")
        days = options.get("retain_days", str(DEFAULT_RETAIN_DAYS))
        if not days.isdigit() or not 1 <= int(days) <= 36500:
            raise AnchorConfigError(f"{spec!r}: retain_days {days!r} is not a number of days from 1 to 36500")
        return S3Sink(where, int(days), mode)
    if spec.startswith(("http://", "https://")):
        return WebhookSink(spec)
    if spec.startswith(("webhook:env:", "webhook:file:")):
        return WebhookSink(spec[len("webhook:"):])
    raise AnchorConfigError(f"anchor sink {spec!r} is not file:/path, s3://bucket/prefix, an http(s) URL "
                            "or webhook:env:NAME")


def parse_sinks(specs: str | list[str] | tuple[str, ...]) -> list[Sink]:
    """Sinks from specs (a string: separated by spaces or commas)."""
    items = re.split(r"[\s,]+", specs.strip()) if isinstance(specs, str) else list(specs)
    sinks = [parse_sink(item) for item in items if item]
    if not sinks:
        raise AnchorConfigError(f"no anchor sink given: pass --sink or set {SINKS_ENV}")
    return sinks


def signing_key(reference: str | None) -> Any:
    """The anchor signing key (``reference``, else $DR_ANCHOR_SIGNING_KEY). AnchorConfigError when unusable."""
    reference = reference or os.environ.get(KEY_ENV)
    if not reference:
        raise AnchorConfigError(f"no anchor signing key: pass --signing-key or set {KEY_ENV}=file:/path/to/key.pem "
                                "(create a pair with `dr evidence keygen`)")
    try:
        return load_signing_key(reference)
    except SigningKeyError as exc:
        raise AnchorConfigError(str(exc)) from None


# -- sources --------------------------------------------------------------------------------------


def _read_s3(source: str) -> list[Found]:
    """Every version under the prefix, those hidden behind a delete marker too: hiding an anchor
    must not shrink what it vouches for."""
    from botocore.exceptions import BotoCoreError, ClientError

    from dr_orchestrator.actions.aws.common import Target, new_client, paginate

    where, options = _s3_location(source)
    if set(options) - {"region", "endpoint_url"}:
        raise AnchorConfigError(f"{source!r}: reading takes only region and endpoint_url")
    client = new_client("s3", Target(None, where.region, where.endpoint_url), 3)
    try:
        versions = paginate(client, "list_object_versions", "Versions", Bucket=where.bucket, Prefix=where.prefix)
        found = []
        for version in sorted(versions, key=lambda v: (v["Key"], str(v.get("LastModified")))):
            key, version_id = version["Key"], version.get("VersionId")
            extra = {"VersionId": version_id} if version_id and version_id != "null" else {}
            body = client.get_object(Bucket=where.bucket, Key=key, **extra)["Body"].read()
            found.append(parse_anchor(f"s3://{where.bucket}/{key} version {version_id}", body))
        return found
    except (BotoCoreError, ClientError) as exc:
        raise AnchorConfigError(f"cannot read the anchors in {source}: {exc}") from None
    finally:
        client.close()


def _read_url(source: str) -> list[Found]:
    """A URL answering a JSON array of anchors, or JSON lines."""
    import httpx

    try:
        response = httpx.get(source, timeout=30.0)
    except httpx.HTTPError as exc:
        raise AnchorConfigError(f"cannot read the anchors at {source}: {exc}") from None
    if response.status_code != 200:
        raise AnchorConfigError(f"{source} answered HTTP {response.status_code}, not a list of anchors")
    text = response.text.strip()
    if text.startswith("["):
        try:
            items = response.json()
        except ValueError:
            raise AnchorConfigError(f"{source} answered something that is not JSON") from None
        return [parse_anchor(f"{source} item {n}", json.dumps(item)) for n, item in enumerate(items, 1)]
    return [parse_anchor(f"{source} line {n}", line) for n, line in enumerate(text.splitlines(), 1) if line.strip()]


def read_source(source: str) -> list[Found]:
    """The anchors of a file path (or file:PATH), an s3://bucket/prefix, or an http(s) URL that lists them.
    AnchorConfigError when the source cannot be read at all."""
    if source.startswith("s3://"):
        return _read_s3(source)
    if source.startswith(("http://", "https://")):
        return _read_url(source)
    path = Path(source[len("file:"):] if source.startswith("file:") else source)
    try:
        return read_file(path)
    except OSError as exc:
        raise AnchorConfigError(f"cannot read the anchors file {path}: {exc.strerror}") from None


# -- at every run's end -----------------------------------------------------------------------------

_pending: list[threading.Thread] = []
_pending_lock = threading.Lock()
_exit_wait_registered = False


def after_run(sessions: Callable[[], Session], run_id: str, actor: str) -> threading.Thread | None:
    """When $DR_ANCHOR_SINKS is set, anchor the chain on a background thread (the run's end is already
    recorded); None when anchoring is not configured."""
    global _exit_wait_registered
    specs = os.environ.get(SINKS_ENV, "").strip()
    if not specs:
        return None
    thread = threading.Thread(target=_anchor_run_end, args=(sessions, run_id, actor, specs),
                              name=f"anchor-{run_id[:8]}", daemon=True)
    with _pending_lock:
        _pending[:] = [t for t in _pending if t.is_alive()]
        _pending.append(thread)
        if not _exit_wait_registered:
            atexit.register(wait_for_pending, EXIT_WAIT_S)
            _exit_wait_registered = True
    thread.start()
    return thread


def _anchor_run_end(sessions: Callable[[], Session], run_id: str, actor: str, specs: str) -> None:
    try:
        sinks = parse_sinks(specs)
        key = signing_key(None)
    except AnchorConfigError as exc:
        recorded = record_anchoring(sessions, actor, "not made", {"run_id": run_id, "error": str(exc)})
        log.warning("anchor after run %s not made: %s (%s)", run_id, exc, recorded)
        return
    try:
        outcome = anchor_chain(sessions, key, sinks, actor=actor, run_id=run_id)
    except Exception as exc:  # noqa: BLE001 - a background thread: say it, never raise into nothing
        log.warning("anchor after run %s not made: %s: %s", run_id, type(exc).__name__, exc)
        return
    for result in outcome.results:
        if not result.ok:
            log.warning("anchor of chain entry %d (end of run %s) not written to %s: %s (%s)",
                        outcome.anchor.seq, run_id, result.sink, result.detail, outcome.recorded)


def wait_for_pending(timeout: float) -> bool:
    """Wait until the run-end anchors being made are done; False when some still run at ``timeout``."""
    deadline = time.monotonic() + timeout
    with _pending_lock:
        threads = list(_pending)
    for thread in threads:
        thread.join(max(0.0, deadline - time.monotonic()))
    return not any(thread.is_alive() for thread in threads)


__all__ = ["AUDIT_ACTION", "AnchorConfigError", "after_run", "parse_sinks", "read_source", "signing_key",
           "wait_for_pending"]
