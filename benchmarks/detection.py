"""Figure 3: detection. An HTTP service that turns healthy at a known moment, a run that probes it with
http.check every 50 ms; how long after the flip the orchestrator marks the service restored
(``marked_at``, what RTO counts) and records the first good probe in the evidence database."""

from __future__ import annotations

import random
import statistics
import tempfile
import threading
import time
from datetime import UTC, datetime
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

from benchmarks.common import REPO, Figure, sqlite_database

NAME = "detection"
TITLE = "3. detection: backup service healthy -> orchestrator records it (http.check, interval 50 ms)"
TARGET_MS = 150.0
INTERVAL = "50ms"


class FlippingService:
    """Answers 503 until ``flip_at`` (wall clock, set by the benchmark), 200 from then on."""

    def __init__(self) -> None:
        self.flip_at = float("inf")
        service = self

        class Handler(BaseHTTPRequestHandler):
            disable_nagle_algorithm = True  # else keep-alive answers wait for a delayed ACK

            def do_GET(self) -> None:  # noqa: N802 - http.server's name
                healthy = time.time() >= service.flip_at
                body = b"ok" if healthy else b"starting"
                self.send_response(200 if healthy else 503)
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def log_message(self, *_: object) -> None:
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.server.server_address[1]}/health"

    def __enter__(self) -> FlippingService:
        self.thread.start()
        return self

    def __exit__(self, *_: object) -> None:
        self.server.shutdown()
        self.server.server_close()


def runbook_text(url: str) -> str:
    return f"""\
name: bench-detection
kind: rehearsal
scope: {{services: [quotation], sites: [backup]}}
steps:
  - id: verify
    action: http.check
    with: {{url: "{url}", interval: {INTERVAL}, consecutive: 1, probe_timeout: 1s}}
    timeout: 30s
    marks: [service_restored]
"""


def one_detection(url: str, service: FlippingService, work: Path) -> tuple[float, float]:
    """Milliseconds from the flip to marked_at, and to the first good probe's evidence row."""
    from sqlalchemy import select

    from dr_orchestrator.evidence.database import session_factory_for
    from dr_orchestrator.evidence.migrate import upgrade
    from dr_orchestrator.evidence.models import Marker, Probe
    from dr_orchestrator.plans import build_plan
    from dr_orchestrator.runs import execute as runs

    runbook = work / "detection.yml"
    runbook.write_text(runbook_text(service.url))
    plan = build_plan(str(runbook), str(REPO / "inventories" / "local.yml"), kind="rehearsal")
    upgrade(url)
    sessions = session_factory_for(url)
    # The flip lands at a random phase of the probe interval, a little after the run has started.
    service.flip_at = time.time() + 0.3 + random.uniform(0, 0.05)
    outcome = runs.execute(sessions, plan)
    if outcome.state.value != "succeeded":
        raise RuntimeError(f"the detection run ended {outcome.state.value}")
    flip = datetime.fromtimestamp(service.flip_at, UTC)
    service.flip_at = float("inf")
    with sessions() as session:
        marked = session.scalars(select(Marker.at).where(Marker.run_id == outcome.run_id)).one()
        recorded = session.scalars(select(Probe.recorded_at).where(Probe.run_id == outcome.run_id, Probe.ok)
                                   .order_by(Probe.at)).first()
    if recorded is None:
        raise RuntimeError("no good probe was recorded")
    return (marked - flip).total_seconds() * 1000, (recorded - flip).total_seconds() * 1000


def measure(quick: bool) -> list[Figure]:
    rounds = 3 if quick else 20
    marked, recorded = [], []
    with FlippingService() as service, tempfile.TemporaryDirectory(prefix="dr-bench-detect-") as tmp:
        for _ in range(rounds):
            with sqlite_database() as url:
                to_mark, to_record = one_detection(url, service, Path(tmp))
            marked.append(to_mark)
            recorded.append(to_record)
    note = f"{rounds} runs, max {{:.1f}} ms"
    return [
        Figure("flip -> marked_at (first good probe sent), median", statistics.median(marked), "ms", TARGET_MS,
               note=note.format(max(marked))),
        Figure("flip -> first good probe recorded in evidence, median", statistics.median(recorded), "ms", TARGET_MS,
               note=note.format(max(recorded))),
    ]
