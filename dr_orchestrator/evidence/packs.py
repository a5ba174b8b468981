"""Evidence packs: a zip an auditor can check offline.

Contents: ``records/<table>.json`` and ``.csv`` (the runs in scope and every row about them; the
drill runs they were stages of, with expectations and notifications), ``records/auditor_fields``
``.json`` and ``.csv`` (the fifteen auditor fields per run and service, as ``dr evidence export``),
``reports/`` (after-action report per run; for a quarter, the quarterly report in HTML, CSV and
JSON), ``sources/<run>/`` (the runbook and inventory text that ran), ``audit/chain.json`` (the chain
entries of the packed records and the chain head), ``signing-key.pub.pem``; then ``manifest.json``
(SHA-256 and size of every other file) and ``manifest.sig`` (Ed25519 signature of manifest.json).

The public key inside the pack shows the files are as signed; who signed them is shown only by
checking against a key the verifier already trusts (``trusted_public_key``).
"""

from __future__ import annotations

import base64
import csv
import hashlib
import io
import json
import zipfile
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from sqlalchemy import Table, or_, select
from sqlalchemy.orm import Session

from dr_orchestrator.evidence import auditor, chain, reports
from dr_orchestrator.evidence.drills import RUN_STAGES
from dr_orchestrator.evidence.models import (
    ActionEventRecord,
    Approval,
    Attempt,
    AuditEntry,
    Base,
    DrillExpectation,
    DrillRun,
    Finding,
    FindingClosure,
    Marker,
    MeasurementRecord,
    Notification,
    Probe,
    Reconciliation,
    Run,
    RunService,
    ServiceResult,
    StepRecord,
)
from dr_orchestrator.evidence.queries import as_dict, find_run
from dr_orchestrator.evidence.signing import (
    SigningKeyError,
    fingerprint,
    load_public_key,
    public_pem,
    signature_valid,
)
from dr_orchestrator.model.events import utcnow

FORMAT = "dr-evidence-pack/1"
MANIFEST = "manifest.json"
SIGNATURE = "manifest.sig"
PUBLIC_KEY = "signing-key.pub.pem"
# Tables packed, with the column that ties a row to a run.
RUN_TABLES: tuple[tuple[type[Base], str], ...] = (
    (RunService, "run_id"),
    (StepRecord, "run_id"),
    (Attempt, "run_id"),
    (Probe, "run_id"),
    (Marker, "run_id"),
    (MeasurementRecord, "run_id"),
    (ActionEventRecord, "run_id"),
    (ServiceResult, "run_id"),
    (Approval, "run_id"),
    (Reconciliation, "run_id"),
    (Finding, "run_id"),
)
RUN_TEXT_COLUMNS = ("runbook_text", "inventory_text")  # packed whole under sources/


class PackError(ValueError):
    """The pack cannot be made or read; one sentence."""


# -- building -------------------------------------------------------------------------------------


def select_runs(
    session: Session, run_id: str | None = None, quarter: str | None = None, service: str | None = None
) -> list[Run]:
    """The runs a pack covers: one run (and the runs failing it back), or every run started in a
    quarter; either narrowed to runs with ``service`` in scope."""
    if (run_id is None) == (quarter is None):
        raise PackError("give either a run or a quarter")
    if run_id is not None:
        run = find_run(session, run_id)
        if run is None:
            raise PackError(f"no run {run_id!r} in the evidence database (see `dr runs list`)")
        runs = [run, *session.scalars(select(Run).where(Run.failback_of == run.id).order_by(Run.started_at))]
    else:
        period = reports.parse_quarter(quarter or "")
        runs = list(
            session.scalars(
                select(Run)
                .where(Run.started_at >= period.start, Run.started_at < period.end)
                .order_by(Run.started_at, Run.id)
            )
        )
    if service is not None:
        with_service = set(session.scalars(select(RunService.run_id).where(RunService.service == service)))
        runs = [run for run in runs if run.id in with_service]
    return runs


def _cell(value: Any) -> Any:
    if value is None:
        return ""
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, (dict, list)):
        return json.dumps(value, sort_keys=True)
    return value


def _csv(table: Table, rows: Sequence[dict[str, Any]], exclude: Sequence[str] = ()) -> str:
    fields = [column.name for column in table.columns if column.name not in exclude]
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=fields, lineterminator="\n", extrasaction="ignore")
    writer.writeheader()
    for row in rows:
        writer.writerow({key: _cell(row.get(key)) for key in fields})
    return buffer.getvalue()


def _json(data: Any) -> bytes:
    return (json.dumps(data, indent=2, sort_keys=True, default=str) + "\n").encode()


def _records(session: Session, runs: Sequence[Run]) -> dict[str, tuple[Table, list[dict[str, Any]], tuple[str, ...]]]:
    ids = [run.id for run in runs]
    records: dict[str, tuple[Table, list[dict[str, Any]], tuple[str, ...]]] = {
        "runs": (Run.__table__, [as_dict(run, exclude=RUN_TEXT_COLUMNS) for run in runs], RUN_TEXT_COLUMNS),  # type: ignore[dict-item]
    }
    for model, column in RUN_TABLES:
        table: Table = model.__table__  # type: ignore[assignment]
        rows = [
            as_dict(row)
            for row in session.scalars(select(model).where(getattr(model, column).in_(ids)).order_by(table.c.id))
        ]
        records[table.name] = (table, rows, ())
    finding_ids = [row["id"] for row in records["findings"][1]]
    closures = [
        as_dict(row)
        for row in session.scalars(
            select(FindingClosure).where(FindingClosure.finding_id.in_(finding_ids)).order_by(FindingClosure.id)
        )
    ]
    records["finding_closures"] = (FindingClosure.__table__, closures, ())  # type: ignore[assignment]
    _add_drill_records(session, ids, records)
    return records


def _add_drill_records(session: Session, run_ids: list[str],
                       records: dict[str, tuple[Table, list[dict[str, Any]], tuple[str, ...]]]) -> None:
    """The drill runs the packed runs were stages of (their verdicts), their expectations, and the
    notifications sent about them (who was told, and whether it was delivered)."""
    stages = [getattr(DrillRun, f"{stage}_run_id").in_(run_ids) for stage in RUN_STAGES]
    drill_runs = list(session.scalars(select(DrillRun).where(or_(*stages)).order_by(DrillRun.started_at)))
    drill_ids = [drill.id for drill in drill_runs]
    records["drill_runs"] = (DrillRun.__table__, [as_dict(d) for d in drill_runs], ())  # type: ignore[assignment]
    for model in (DrillExpectation, Notification):
        table: Table = model.__table__  # type: ignore[assignment]
        rows = [as_dict(row) for row in session.scalars(
            select(model).where(model.drill_run_id.in_(drill_ids)).order_by(table.c.id))]
        records[table.name] = (table, rows, ())


def _chain_section(session: Session, records: dict[str, tuple[Table, list[dict[str, Any]], tuple[str, ...]]]) -> Any:
    wanted = {(name, str(row[chain.primary_key(table).name])) for name, (table, rows, _) in records.items()
              for row in rows}
    entries = [
        as_dict(entry)
        for entry in session.scalars(select(AuditEntry).order_by(AuditEntry.seq))
        if (entry.table_name, entry.record_id) in wanted
    ]
    report = chain.verify_session(session)
    return {
        "head": {"seq": report.head_seq, "sha256": report.head_sha256},
        "verified_at_export": {"ok": report.ok, "problems": [p.describe() for p in report.problems[:20]]},
        "entries": entries,
    }


def pack_files(
    session: Session,
    run_id: str | None = None,
    quarter: str | None = None,
    service: str | None = None,
    with_pdf: bool = False,
) -> dict[str, bytes]:
    """Every file of the pack but the manifest and signature, by path."""
    runs = select_runs(session, run_id, quarter, service)
    if not runs:
        raise PackError("no runs match: the pack would be empty")
    files: dict[str, bytes] = {}
    records = _records(session, runs)
    for name, (table, rows, exclude) in records.items():
        files[f"records/{name}.json"] = _json(rows)
        files[f"records/{name}.csv"] = _csv(table, rows, exclude).encode()
    for run in runs:
        html = reports.after_action_html(session, run.id)
        files[f"reports/after-action-{run.id}.html"] = html.encode()
        if with_pdf:
            from dr_orchestrator.evidence.pdf import html_to_pdf

            files[f"reports/after-action-{run.id}.pdf"] = html_to_pdf(html)
        files[f"sources/{run.id}/runbook{Path(run.runbook_path).suffix or '.yml'}"] = run.runbook_text.encode()
        files[f"sources/{run.id}/inventory{Path(run.inventory_path).suffix or '.yml'}"] = run.inventory_text.encode()
        files[f"sources/{run.id}/digests.json"] = _json(
            {
                "runbook": {"path": run.runbook_path, "sha256": run.runbook_sha256},
                "inventory": {"path": run.inventory_path, "sha256": run.inventory_sha256},
                "parameters_sha256": run.parameters_sha256,
            }
        )
    auditor_rows = auditor.auditor_rows(session, run_ids=[run.id for run in runs])
    files["records/auditor_fields.json"] = auditor.rows_as_json(auditor_rows).encode()
    files["records/auditor_fields.csv"] = auditor.rows_as_csv(auditor_rows).encode()
    if quarter is not None:
        data = reports.quarter_data(session, quarter, service=service)
        label = data["quarter"]
        files[f"reports/quarter-{label}.html"] = reports.render_quarter(data).encode()
        files[f"reports/quarter-{label}.csv"] = reports.quarter_csv(data).encode()
        files[f"reports/quarter-{label}.json"] = reports.quarter_json(data).encode()
    files["audit/chain.json"] = _json(_chain_section(session, records))
    return files


def build_pack(
    session: Session,
    signing_key: Ed25519PrivateKey,
    *,
    run_id: str | None = None,
    quarter: str | None = None,
    service: str | None = None,
    created_by: str = "",
    with_pdf: bool = False,
) -> tuple[bytes, dict[str, Any]]:
    """The pack as zip bytes, and its manifest. Reads only."""
    files = pack_files(session, run_id, quarter, service, with_pdf)
    files[PUBLIC_KEY] = public_pem(signing_key.public_key())
    runs = json.loads(files["records/runs.json"])
    chain_section = json.loads(files["audit/chain.json"])
    manifest = {
        "format": FORMAT,
        "created_at": utcnow().isoformat(),
        "created_by": created_by,
        "scope": {"run": run_id, "quarter": quarter, "service": service},
        "runs": [run["id"] for run in runs],
        "chain_head": chain_section["head"],
        "chain_verified": chain_section["verified_at_export"]["ok"],
        "signing_key": fingerprint(signing_key.public_key()),
        "files": {
            path: {"sha256": hashlib.sha256(content).hexdigest(), "bytes": len(content)}
            for path, content in sorted(files.items())
        },
    }
    manifest_bytes = _json(manifest)
    signature = base64.b64encode(signing_key.sign(manifest_bytes)) + b"\n"
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w", compression=zipfile.ZIP_DEFLATED) as archive:
        for path, content in sorted(files.items()):
            archive.writestr(path, content)
        archive.writestr(MANIFEST, manifest_bytes)
        archive.writestr(SIGNATURE, signature)
    return buffer.getvalue(), manifest


# -- verifying ------------------------------------------------------------------------------------


@dataclass
class PackVerification:
    ok: bool = False
    key: str = ""  # fingerprint of the key the signature was checked with
    key_trusted: bool = False  # checked against a key given by the verifier, not the pack's own
    problems: list[str] = field(default_factory=list)
    manifest: dict[str, Any] = field(default_factory=dict)

    def as_dict(self) -> dict[str, Any]:
        return {
            "ok": self.ok,
            "key": self.key,
            "key_trusted": self.key_trusted,
            "problems": self.problems,
            "runs": self.manifest.get("runs", []),
            "files": len(self.manifest.get("files", {})),
        }


def verify_pack(source: str | Path | bytes, trusted_public_key: bytes | None = None) -> PackVerification:
    """Check a pack offline: the manifest's signature, every file's digest, no file missing or added.
    ``trusted_public_key``: a PEM the verifier trusts; without it, the pack's own key is used, which
    proves the files are as signed but not by whom. PackError: not a readable pack at all."""
    result = PackVerification()
    try:
        archive = zipfile.ZipFile(io.BytesIO(source) if isinstance(source, bytes) else source)
    except (OSError, zipfile.BadZipFile) as exc:
        raise PackError(f"cannot read the pack: {exc}") from None
    with archive:
        # Directory entries carry nothing (a pack unzipped and zipped again with `zip -r` has them).
        names = [info.filename for info in archive.infolist() if not (info.is_dir() and info.file_size == 0)]
        contents = {name: archive.read(name) for name in set(names)}
    for name in sorted({n for n in names if names.count(n) > 1}):
        result.problems.append(f"{name}: stored more than once")
    if MANIFEST not in contents or SIGNATURE not in contents:
        result.problems.append(f"{MANIFEST} or {SIGNATURE} missing: not a signed evidence pack")
        return result
    manifest_bytes = contents[MANIFEST]
    try:
        result.manifest = json.loads(manifest_bytes)
        listed: dict[str, Any] = result.manifest["files"]
        signature = base64.b64decode(contents[SIGNATURE], validate=False)
    except (ValueError, KeyError, TypeError):
        result.problems.append(f"{MANIFEST}: unreadable")
        return result

    key_pem = trusted_public_key if trusted_public_key is not None else contents.get(PUBLIC_KEY)
    if key_pem is None:
        result.problems.append(f"{PUBLIC_KEY}: missing, and no trusted public key given")
    else:
        try:
            key = load_public_key(key_pem)
        except SigningKeyError:
            if trusted_public_key is not None:
                raise  # the verifier's own mistake
            result.problems.append(f"{PUBLIC_KEY}: not an Ed25519 public key")
        else:
            result.key, result.key_trusted = fingerprint(key), trusted_public_key is not None
            if not signature_valid(key, signature, manifest_bytes):
                who = "the trusted public key" if result.key_trusted else "the pack's own public key"
                result.problems.append(f"{MANIFEST}: the signature does not verify with {who}")

    for path, expected in sorted(listed.items()):
        if path not in contents:
            result.problems.append(f"{path}: missing")
        elif hashlib.sha256(contents[path]).hexdigest() != expected.get("sha256"):
            result.problems.append(f"{path}: changed (its SHA-256 differs from the manifest's)")
    for path in sorted(set(contents) - set(listed) - {MANIFEST, SIGNATURE}):
        result.problems.append(f"{path}: not in the manifest (added)")
    result.ok = not result.problems
    return result
