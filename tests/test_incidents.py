"""Incidents as users run them (`dr run --incident`, `dr incidents list|show`): attempts, a retry and
the failback linked; the retry's RTO counted from the first attempt's impact; a failover counted
from its own start says it may understate the outage in the summary, the export and the report."""

from __future__ import annotations

import csv
import io
import json
import os
import socket
import subprocess
import sys
import threading
from collections.abc import Iterator
from datetime import datetime
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest
from notify_servers import start_webhook_receiver

from dr_orchestrator.evidence.rto import RUN_START_WARNING

REPO = Path(__file__).resolve().parent.parent
RUNBOOK = str(REPO / "tests" / "data" / "verify-quotation.yml")
INVENTORY = str(REPO / "inventories" / "local.yml")


def dr(*args: str, db: str, cwd: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "dr_orchestrator.cli", *args], cwd=cwd,
                          env={**os.environ, "DR_DATABASE_URL": db}, capture_output=True, text=True, timeout=120)


def dr_json(*args: str, db: str, cwd: Path) -> object:
    result = dr(*args, "-o", "json", db=db, cwd=cwd)
    assert result.returncode == 0, result.stdout + result.stderr
    return json.loads(result.stdout)


class _Healthy(BaseHTTPRequestHandler):
    def do_GET(self) -> None:  # noqa: N802 - the name http.server calls
        self.send_response(200)
        self.send_header("Content-Length", "2")
        self.end_headers()
        self.wfile.write(b"ok")

    def log_message(self, *args: object) -> None:
        pass


@pytest.fixture
def live_url() -> Iterator[str]:
    """A health URL that answers 200, served by this process until the test ends."""
    server = ThreadingHTTPServer(("127.0.0.1", 0), _Healthy)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}/health"
    finally:
        server.shutdown()
        server.server_close()
        thread.join(timeout=10)


@pytest.fixture
def dead_url() -> Iterator[str]:
    """A health URL nobody answers: the port is bound (so nobody takes it) but not listening."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        yield f"http://127.0.0.1:{sock.getsockname()[1]}/health"


@pytest.fixture
def db(database_url: str, tmp_path: Path) -> str:
    result = dr("db", "upgrade", db=database_url, cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    return database_url


def start(url: str, *options: str, db: str, cwd: Path, exit_code: int = 0) -> str:
    """Run the runbook against ``url``; the run's id."""
    result = dr("run", RUNBOOK, "-i", INVENTORY, "-p", f"health_url={url}", "-q", *options, db=db, cwd=cwd)
    assert result.returncode == exit_code, result.stdout + result.stderr
    runs = dr_json("runs", "list", db=db, cwd=cwd)
    assert isinstance(runs, list)
    return str(runs[0]["id"])


def moment(text: str) -> datetime:
    return datetime.fromisoformat(text)


@pytest.mark.slow
def test_attempt_retry_and_failback_share_the_incident_and_the_retry_counts_from_the_first_failure(
        db: str, tmp_path: Path, live_url: str, dead_url: str) -> None:
    first = start(dead_url, "--incident", "INC-2026-0042", db=db, cwd=tmp_path, exit_code=1)
    retry = start(live_url, "--incident", "INC-2026-0042", db=db, cwd=tmp_path)
    failback = start(live_url, "--kind", "failback", "--failback-of", retry[:8], db=db, cwd=tmp_path)

    shown = dr_json("incidents", "show", "INC-2026-0042", db=db, cwd=tmp_path)
    assert isinstance(shown, dict)
    runs = shown["runs"]
    assert [(r["id"], r["kind"], r["state"]) for r in runs] == [
        (first, "failover", "failed"), (retry, "failover", "succeeded"), (failback, "failback", "succeeded")]
    assert runs[2]["failback_of"] == retry

    first_detail = dr_json("runs", "show", first, db=db, cwd=tmp_path)
    assert isinstance(first_detail, dict)
    first_failure = min(moment(p["at"]) for p in first_detail["probes"] if not p["ok"])
    (result,) = runs[1]["results"]
    assert moment(result["incident_at"]) == first_failure
    assert result["rto_s"] == pytest.approx((moment(result["restored_at"]) - first_failure).total_seconds())
    assert result["rto_s"] > (moment(result["restored_at"]) - moment(runs[1]["started_at"])).total_seconds()
    assert f"measured first failure: failed probe of step 'verify' of run {first[:8]}" in result["rto_method"]
    assert RUN_START_WARNING not in result["rto_method"]
    # The failback is measured from its own disruption (its start here), not from the incident's.
    (back,) = runs[2]["results"]
    assert moment(back["incident_at"]) == moment(runs[2]["started_at"])

    incident = shown["incident"]
    assert moment(incident["impact_start"]) == first_failure
    assert incident["impact_start_method"].startswith("measured first failure")
    assert incident["declared_at"] is None
    listed = dr_json("incidents", "list", db=db, cwd=tmp_path)
    assert isinstance(listed, list)
    assert [(i["id"], i["runs"], i["latest_state"]) for i in listed] == [("INC-2026-0042", 3, "succeeded")]
    text = dr("incidents", "show", "INC-2026-0042", db=db, cwd=tmp_path)
    assert text.returncode == 0 and "impact start" in text.stdout and first[:8] in text.stdout
    # The incident's impact start changed as the attempts ended: every state of it is in the chain.
    verified = dr("evidence", "verify", db=db, cwd=tmp_path)
    assert verified.returncode == 0, verified.stdout + verified.stderr


@pytest.mark.slow
def test_failover_counted_from_its_start_warns_in_summary_export_and_report(
        db: str, tmp_path: Path, live_url: str) -> None:
    result = dr("run", RUNBOOK, "-i", INVENTORY, "-p", f"health_url={live_url}", "-q", db=db, cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    assert f"warning: {RUN_START_WARNING}" in result.stdout
    runs = dr_json("runs", "list", db=db, cwd=tmp_path)
    assert isinstance(runs, list)
    run_id = runs[0]["id"]
    detail = dr_json("runs", "show", run_id, db=db, cwd=tmp_path)
    assert isinstance(detail, dict)
    assert detail["run"]["incident_id"] == f"INC-{detail['run']['started_at'][:10].replace('-', '')}-{run_id[:8]}"

    exported = dr("evidence", "export", "--format", "json", db=db, cwd=tmp_path)
    (row,) = json.loads(exported.stdout)
    assert row["rto_method"].endswith(RUN_START_WARNING)
    table = list(csv.DictReader(io.StringIO(dr("evidence", "export", "--format", "csv", db=db, cwd=tmp_path).stdout)))
    assert RUN_START_WARNING in table[0]["rto_method"]
    report = tmp_path / "report.html"
    assert dr("report", "run", run_id, "--out", str(report), db=db, cwd=tmp_path).returncode == 0
    assert RUN_START_WARNING in report.read_text()

    declared = dr("run", RUNBOOK, "-i", INVENTORY, "-p", f"health_url={live_url}", "-q",
                  "--incident-at", detail["run"]["started_at"], db=db, cwd=tmp_path)
    assert declared.returncode == 0 and RUN_START_WARNING not in declared.stdout
    rows = json.loads(dr("evidence", "export", "--format", "json", db=db, cwd=tmp_path).stdout)
    assert [RUN_START_WARNING in r["rto_method"] for r in rows] == [True, False]


@pytest.mark.slow
def test_incident_mistakes_are_one_sentence(tmp_path: Path) -> None:
    db = f"sqlite:///{tmp_path / 'e.db'}"
    assert dr("db", "upgrade", db=db, cwd=tmp_path).returncode == 0
    bad = dr("run", RUNBOOK, "-i", INVENTORY, "-p", "health_url=http://127.0.0.1:9/", "--incident", "INC 42",
             db=db, cwd=tmp_path)
    assert bad.returncode == 2
    assert bad.stderr.strip() == ("Error: --incident: incident id 'INC 42' is not usable: give letters, digits and "
                                  ". _ : - (at most 64, starting with a letter or digit), e.g. INC-2026-0042")
    unknown = dr("incidents", "show", "INC-404", db=db, cwd=tmp_path)
    assert unknown.returncode == 2
    assert unknown.stderr.strip() == "Error: no incident 'INC-404' in the evidence database (see `dr incidents list`)"


@pytest.mark.slow
def test_the_incident_names_who_its_runs_notified_and_whether_it_reached_them(
        db: str, tmp_path: Path, live_url: str) -> None:
    receiver, stop = start_webhook_receiver()
    try:
        runbook = tmp_path / "notify-and-verify.yml"
        runbook.write_text(Path(RUNBOOK).read_text() + (
            "  - id: tell-the-desk\n"
            "    action: notify.webhook\n"
            f"    with: {{url: '{receiver.url}', text: quotation is back, attempts: 1}}\n"
            "    needs: [verify]\n"))
        result = dr("run", str(runbook), "-i", INVENTORY, "-p", f"health_url={live_url}", "-q",
                    "--incident", "INC-2026-0043", db=db, cwd=tmp_path)
        assert result.returncode == 0, result.stdout + result.stderr
    finally:
        stop()
    shown = dr_json("incidents", "show", "INC-2026-0043", db=db, cwd=tmp_path)
    assert isinstance(shown, dict)
    (note,) = shown["notifications"]
    assert (note["step_id"], note["channel"], note["delivered"]) == ("tell-the-desk", "webhook", True)
    assert note["target"] == f"http://127.0.0.1:{receiver.port}/…"  # never the path: it may hold a token
    text = dr("incidents", "show", "INC-2026-0043", db=db, cwd=tmp_path).stdout
    assert "notified webhook" in text and "delivered" in text
