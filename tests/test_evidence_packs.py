"""Evidence packs: exported from real runs, verified offline against a trusted key; one changed,
added or missing file, or a different signer, fails verification and is named."""

from __future__ import annotations

import hashlib
import io
import json
import os
import stat
import subprocess
import sys
import zipfile
from datetime import date
from pathlib import Path

import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from evidence_runs import RUNBOOK_TEXT, run_small
from sqlalchemy import select, text
from sqlalchemy.orm import Session, sessionmaker

from dr_orchestrator.evidence import annotations, packs, reports, signing
from dr_orchestrator.evidence.models import AuditEvent
from dr_orchestrator.model.approval import Identity
from dr_orchestrator.model.events import utcnow
from dr_orchestrator.model.run import RunKind

pytestmark = pytest.mark.timeout(180)


def dr(*args: str, db: str, cwd: Path, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "dr_orchestrator.cli", *args], cwd=cwd,
                          env={**os.environ, "DR_DATABASE_URL": db, **(env or {})},
                          capture_output=True, text=True, timeout=120)


def rewritten(pack: bytes, change: dict[str, bytes | None]) -> bytes:
    """The pack with files replaced (bytes), removed (None) or added (a new name)."""
    out = io.BytesIO()
    with zipfile.ZipFile(io.BytesIO(pack)) as source, zipfile.ZipFile(out, "w") as target:
        for name in source.namelist():
            if name not in change:
                target.writestr(name, source.read(name))
        for name, content in change.items():
            if content is not None:
                target.writestr(name, content)
    return out.getvalue()


@pytest.mark.slow
def test_run_pack_exported_and_verified_offline(
    database_url: str, sessions: sessionmaker[Session], tmp_path: Path
) -> None:
    run_id = run_small(sessions, fail=True)
    failback_id = run_small(sessions, kind=RunKind.FAILBACK, failback_of=run_id)
    with sessions() as session, session.begin():
        annotations.add_finding(session, run_id, "high", "bob", date(2027, 1, 31), "backup refused", "alice")
    private, public = signing.generate_keypair(tmp_path / "keys")
    assert stat.S_IMODE(private.stat().st_mode) == 0o600

    out = tmp_path / "pack.zip"
    made = dr("evidence", "pack", "--run", run_id[:8], "--out", str(out), db=database_url, cwd=tmp_path,
              env={"DR_PACK_SIGNING_KEY": f"file:{private}", "DR_ACTOR": "auditor"})
    assert made.returncode == 0, made.stderr
    checked = dr("evidence", "verify-pack", str(out), "--public-key", str(public), db="sqlite:///unused",
                 cwd=tmp_path)
    assert checked.returncode == 0, checked.stdout + checked.stderr
    assert "verified" in checked.stdout and "note:" not in checked.stdout  # checked against the trusted key

    with zipfile.ZipFile(out) as archive:
        names = set(archive.namelist())
        manifest = json.loads(archive.read("manifest.json"))
        runs = json.loads(archive.read("records/runs.json"))
        steps_csv = archive.read("records/steps.csv").decode()
        findings = json.loads(archive.read("records/findings.json"))
        runbook = archive.read(f"sources/{run_id}/runbook.yml")
        chain_section = json.loads(archive.read("audit/chain.json"))
    assert names == set(manifest["files"]) | {"manifest.json", "manifest.sig"}
    assert manifest["chain_verified"] is True
    assert [run["id"] for run in runs] == [run_id, failback_id] == manifest["runs"]
    assert "runbook_text" not in runs[0]  # the text is under sources/, whole
    assert runbook.decode() == RUNBOOK_TEXT and hashlib.sha256(runbook).hexdigest() == runs[0]["runbook_sha256"]
    assert steps_csv.splitlines()[0].startswith("id,run_id,step_id,phase,action")
    assert [f["text"] for f in findings] == ["backup refused"]
    assert {f"reports/after-action-{run_id}.html", f"reports/after-action-{failback_id}.html"} <= names
    assert chain_section["verified_at_export"]["ok"] is True and chain_section["entries"]
    with sessions() as session:  # exporting is itself recorded, with who and the chain head
        (event,) = session.scalars(select(AuditEvent)).all()
    assert (Identity.parse(event.actor).label, event.action, event.data["chain_head"]) == (
        "auditor", "evidence.pack", manifest["chain_head"])


@pytest.mark.slow
def test_changed_added_or_missing_files_and_wrong_signers_fail(
    sqlite_sessions: sessionmaker[Session], tmp_path: Path
) -> None:
    run_id = run_small(sqlite_sessions)
    key = Ed25519PrivateKey.generate()
    trusted = signing.public_pem(key.public_key())
    with sqlite_sessions() as session:
        pack, manifest = packs.build_pack(session, key, run_id=run_id)
    assert packs.verify_pack(pack, trusted).ok

    measurements = json.loads(zipfile.ZipFile(io.BytesIO(pack)).read("records/measurements.json"))
    measurements[0]["value"] = 0.5
    changed = rewritten(pack, {"records/measurements.json": json.dumps(measurements).encode()})
    result = packs.verify_pack(changed, trusted)
    assert result.problems == ["records/measurements.json: changed (its SHA-256 differs from the manifest's)"]

    assert packs.verify_pack(rewritten(pack, {"records/probes.csv": None}), trusted).problems == [
        "records/probes.csv: missing"]
    assert packs.verify_pack(rewritten(pack, {"records/extra.json": b"{}"}), trusted).problems == [
        "records/extra.json: not in the manifest (added)"]

    # Unzipped and zipped again (`zip -r` adds an entry per directory): still the signed pack.
    rezipped = io.BytesIO()
    with zipfile.ZipFile(io.BytesIO(pack)) as original, zipfile.ZipFile(rezipped, "w") as again:
        for directory in sorted({name.rsplit("/", 1)[0] + "/" for name in original.namelist() if "/" in name}):
            again.writestr(zipfile.ZipInfo(directory), b"")
        for info in original.infolist():
            again.writestr(info.filename, original.read(info))
    assert any(info.is_dir() for info in zipfile.ZipFile(io.BytesIO(rezipped.getvalue())).infolist())
    assert packs.verify_pack(rezipped.getvalue(), trusted).ok

    # Someone re-packs with their own key: the pack is self-consistent, but not signed by the trusted key.
    forger = Ed25519PrivateKey.generate()
    with sqlite_sessions() as session:
        forged, _ = packs.build_pack(session, forger, run_id=run_id)
    assert packs.verify_pack(forged).ok  # only integrity, not origin, without a trusted key
    assert packs.verify_pack(forged, trusted).problems == [
        "manifest.json: the signature does not verify with the trusted public key"]
    # Changing the manifest to match a changed file breaks the signature.
    manifest["files"]["records/measurements.json"]["sha256"] = hashlib.sha256(
        json.dumps(measurements).encode()).hexdigest()
    doctored = rewritten(changed, {"manifest.json": (json.dumps(manifest, indent=2, sort_keys=True) + "\n").encode()})
    assert packs.verify_pack(doctored, trusted).problems == [
        "manifest.json: the signature does not verify with the trusted public key"]

    (tmp_path / "changed.zip").write_bytes(changed)
    (tmp_path / "trusted.pem").write_bytes(trusted)
    cli = dr("evidence", "verify-pack", str(tmp_path / "changed.zip"), "--public-key", str(tmp_path / "trusted.pem"),
             db="sqlite:///unused", cwd=tmp_path)
    assert cli.returncode == 1
    assert "records/measurements.json: changed" in cli.stdout
    (tmp_path / "junk.zip").write_bytes(b"not a zip")
    junk = dr("evidence", "verify-pack", str(tmp_path / "junk.zip"), db="sqlite:///unused", cwd=tmp_path)
    assert junk.returncode == 2 and "cannot read the pack" in junk.stderr and "Traceback" not in junk.stderr


def test_quarter_pack_for_one_service_holds_the_quarterly_report(sqlite_sessions: sessionmaker[Session]) -> None:
    run_small(sqlite_sessions)
    quarter = reports.quarter_of(utcnow()).label
    key = Ed25519PrivateKey.generate()
    with sqlite_sessions() as session:
        pack, manifest = packs.build_pack(session, key, quarter=quarter, service="trading")
        with pytest.raises(packs.PackError, match="no runs match"):
            packs.build_pack(session, key, quarter=quarter, service="quotation")
    assert {f"reports/quarter-{quarter}.{ext}" for ext in ("html", "csv", "json")} <= set(manifest["files"])
    assert manifest["scope"] == {"run": None, "quarter": quarter, "service": "trading"}
    assert packs.verify_pack(pack, signing.public_pem(key.public_key())).ok

    with sqlite_sessions() as session:  # a pack of tampered evidence says so, signed
        session.execute(text("UPDATE probes SET ok = 0"))
        session.commit()
        _, manifest = packs.build_pack(session, key, quarter=quarter)
    assert manifest["chain_verified"] is False


def test_signing_keys_by_reference_only(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    private, public = signing.generate_keypair(tmp_path)
    with pytest.raises(signing.SigningKeyError, match="exists already"):
        signing.generate_keypair(tmp_path)
    key = signing.load_signing_key(f"file:{private}")
    assert signing.public_pem(key.public_key()) == public.read_bytes()
    monkeypatch.setenv("PACK_KEY", private.read_text())
    monkeypatch.setenv(signing.KEY_ENV, "env:PACK_KEY")
    assert signing.fingerprint(signing.load_signing_key().public_key()) == signing.fingerprint(key.public_key())
    private.chmod(0o644)
    with pytest.raises(signing.SigningKeyError, match="readable by others: chmod 600"):
        signing.load_signing_key(f"file:{private}")
    with pytest.raises(signing.SigningKeyError, match=f"{tmp_path} is a directory; give the key file in it"):
        signing.load_signing_key(f"file:{tmp_path}")  # the keygen directory instead of the key in it
    monkeypatch.delenv(signing.KEY_ENV)
    with pytest.raises(signing.SigningKeyError, match="dr evidence keygen"):
        signing.load_signing_key()
    with pytest.raises(signing.SigningKeyError, match="not file:/path or env:NAME"):
        signing.load_signing_key(str(private))
