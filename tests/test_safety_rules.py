"""Safety rules of the inventory (dr.safety): checked before the first step (readiness of the target
site, every service still served) and during the run (no promotion of a standby while the old
primary takes writes); overridden only with --force "reason", and every override is evidence."""

from __future__ import annotations

import json
import os
import socket
import sqlite3
import subprocess
import sys
import threading
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import pytest
from actionctx import Harness

from dr_orchestrator.actions import default_registry
from dr_orchestrator.actions.base import ActionError
from dr_orchestrator.engine import Engine
from dr_orchestrator.evidence import migrate
from dr_orchestrator.evidence.database import session_factory_for
from dr_orchestrator.evidence.locks import resources_for
from dr_orchestrator.evidence.store import EvidenceStore
from dr_orchestrator.loading import load_inventory
from dr_orchestrator.model.events import ActionEvent, Event, Observer
from dr_orchestrator.model.safety import PROMOTE_FENCED
from dr_orchestrator.plans import build_plan
from dr_orchestrator.yamlsource import LoadError


def closed_port() -> int:
    """A port nothing listens on (bound then released; the kernel does not reuse it at once)."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


@pytest.fixture
def listening() -> Iterator[int]:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        sock.listen(16)
        yield int(sock.getsockname()[1])


class _Health(BaseHTTPRequestHandler):
    def do_GET(self) -> None:  # noqa: N802 - http.server's naming
        self.send_response(200 if self.path == "/ready" else 503)
        self.send_header("Content-Length", "0")
        self.end_headers()

    def log_message(self, format: str, *args: Any) -> None:  # noqa: A002 - http.server's signature
        pass


@pytest.fixture
def health_url() -> Iterator[str]:
    server = ThreadingHTTPServer(("127.0.0.1", 0), _Health)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}"
    finally:
        server.shutdown()
        server.server_close()


def inventory_text(safety: str, quotation_sites: str = "[primary, backup]") -> str:
    return f"""\
all:
  vars:
    dr:
      name: safety-test
      sites: {{primary: {{}}, backup: {{}}}}
      services:
        quotation: {{rto: 30s, rpo: 60s, sites: {quotation_sites}}}
      safety:
{safety}
  children:
    primary: {{hosts: {{p1: {{ansible_host: 127.0.0.1}}}}}}
    backup: {{hosts: {{b1: {{ansible_host: 127.0.0.1}}}}}}
"""


RUNBOOK = """\
name: move-quotation
kind: failover
scope: {services: [quotation]}
parameters:
  to_site: {default: backup}
steps:
  - id: switch
    action: shell.run
    with: {argv: [touch, "MARKER"]}
"""


def write(tmp_path: Path, safety: str, quotation_sites: str = "[primary, backup]") -> tuple[str, str, Path]:
    marker = tmp_path / "switched"
    (tmp_path / "runbook.yml").write_text(RUNBOOK.replace("MARKER", str(marker)))
    (tmp_path / "inventory.yml").write_text(inventory_text(safety, quotation_sites))
    return str(tmp_path / "runbook.yml"), str(tmp_path / "inventory.yml"), marker


def recorder(seen: list[Event]) -> Observer:
    def record(event: Event) -> None:
        seen.append(event)

    return record


def run(runbook: str, inventory: str, forced: tuple[str, ...] = (), url: str | None = None) -> tuple[Any, list[Event]]:
    plan = build_plan(runbook, inventory, forced=forced, started_by="alice")
    seen: list[Event] = []
    observers: list[Observer] = [recorder(seen)]
    if url:
        observers.append(EvidenceStore(session_factory_for(url)))
    return Engine(default_registry(), observers).run(plan), seen


def safety_events(seen: list[Event], kind: str) -> list[dict[str, Any]]:
    return [e.data for e in seen if isinstance(e, ActionEvent) and e.kind == kind and e.step_id == "preflight"]


# ---------------------------------------------------------------- the rules in the inventory


def test_safety_mistakes_are_problems_with_lines(tmp_path: Path) -> None:
    safety = """\
        rules: {target_ready: on, no_such_rule: off}
        readiness:
          backup:
            - {tcp: "127.0.0.1:notaport"}
            - {http: "http://x/health", tcp: "x:1"}
            - {http: "http://x/health", service: trading}
          nowhere:
            - {tcp: "127.0.0.1:1"}"""
    (tmp_path / "inventory.yml").write_text(inventory_text(safety))
    with pytest.raises(LoadError) as error:
        load_inventory(str(tmp_path / "inventory.yml"))
    shown = [str(p) for p in error.value.problems]
    assert any("unknown rule 'no_such_rule'" in p and ".yml:9:" in p for p in shown), shown
    assert any("'127.0.0.1:notaport' is not host:port" in p for p in shown), shown
    assert any("either http: URL or tcp: host:port" in p for p in shown), shown
    (tmp_path / "inventory.yml").write_text(inventory_text(safety.replace(", no_such_rule: off", "")
                                                           .replace('"127.0.0.1:notaport"', '"127.0.0.1:1"')
                                                           .replace(', tcp: "x:1"', "")))
    with pytest.raises(LoadError) as error:
        load_inventory(str(tmp_path / "inventory.yml"))
    shown = [str(p) for p in error.value.problems]
    assert any("safety.readiness.nowhere: site 'nowhere' is not in dr.sites" in p for p in shown), shown
    assert any("service 'trading' is not in dr.services" in p for p in shown), shown


# ---------------------------------------------------------------- pre-flight


def test_a_target_site_failing_its_readiness_check_refuses_the_run_before_any_step(tmp_path: Path) -> None:
    port = closed_port()
    runbook, inventory, marker = write(tmp_path, f"""\
        readiness:
          backup: [{{tcp: "127.0.0.1:{port}", timeout: 300ms}}]""")
    outcome, seen = run(runbook, inventory)
    assert outcome.state == "failed"
    assert outcome.error.startswith(f"safety rule target_ready refused the run: site backup, where the run moves "
                                    f"quotation, is not ready (127.0.0.1:{port}: ")
    assert 'to override, run again with --force "reason"' in outcome.error
    assert not marker.exists()  # nothing ran
    assert outcome.steps["switch"] == "cancelled"
    finished = [e for e in seen if type(e).__name__ == "StepFinished"]
    assert [e.error for e in finished] == ["a safety rule refused the run"]  # type: ignore[union-attr]
    checks = safety_events(seen, "safety.readiness")
    assert [(c["site"], c["check"], c["ok"]) for c in checks] == [("backup", f"127.0.0.1:{port}", False)]
    rules = {r["rule"] for r in safety_events(seen, "safety.rule")}
    assert rules == {"target_ready", "service_served"}  # the only serving site is not ready either
    assert safety_events(seen, "safety.override") == []


def test_force_overrides_and_the_override_is_evidence(tmp_path: Path) -> None:
    runbook, inventory, marker = write(tmp_path, f"""\
        readiness:
          backup: [{{tcp: "127.0.0.1:{closed_port()}", timeout: 300ms}}]""")
    url = f"sqlite:///{tmp_path / 'evidence.db'}"
    migrate.upgrade(url)
    outcome, seen = run(runbook, inventory, forced=("facilities confirmed the backup network is up",), url=url)
    assert outcome.state == "succeeded" and marker.exists()
    overrides = safety_events(seen, "safety.override")
    assert {o["rule"] for o in overrides} == {"target_ready", "service_served"}
    assert all(o["actor"] == "alice" and o["reason"] == "facilities confirmed the backup network is up"
               for o in overrides)
    with sqlite3.connect(tmp_path / "evidence.db") as db:
        rows = db.execute("SELECT step_id, data FROM action_events WHERE kind = 'safety.override'").fetchall()
        forced = db.execute("SELECT forced FROM runs").fetchone()[0]
    assert len(rows) == 2 and all(step == "preflight" for step, _ in rows)
    assert {json.loads(data)["rule"] for _, data in rows} == {"target_ready", "service_served"}
    assert json.loads(forced) == ["facilities confirmed the backup network is up"]


def test_a_ready_target_passes_http_and_tcp_checks(tmp_path: Path, listening: int, health_url: str) -> None:
    runbook, inventory, marker = write(tmp_path, f"""\
        readiness:
          backup:
            - {{tcp: "127.0.0.1:{listening}"}}
            - {{http: "{health_url}/ready", service: quotation}}
          primary:
            - {{http: "{health_url}/down"}}   # not the target: never checked""")
    outcome, seen = run(runbook, inventory)
    assert outcome.state == "succeeded" and marker.exists()
    checks = safety_events(seen, "safety.readiness")
    assert [(c["site"], c["ok"]) for c in checks] == [("backup", True), ("backup", True)]


def test_a_target_that_does_not_serve_the_service_breaks_service_served(tmp_path: Path) -> None:
    runbook, inventory, marker = write(tmp_path, "        rules: {}", quotation_sites="[primary]")
    outcome, _ = run(runbook, inventory)
    assert outcome.error.startswith("safety rule service_served refused the run: after this run quotation would be "
                                    "served at backup, and the inventory says only primary serve it")
    assert not marker.exists()


def test_a_rule_turned_off_in_the_inventory_is_not_applied_and_that_is_recorded(tmp_path: Path) -> None:
    runbook, inventory, marker = write(tmp_path, f"""\
        rules: {{target_ready: off, service_served: off}}
        readiness:
          backup: [{{tcp: "127.0.0.1:{closed_port()}", timeout: 300ms}}]""")
    outcome, seen = run(runbook, inventory)
    assert outcome.state == "succeeded" and marker.exists()
    assert {(r["rule"], r["enabled"]) for r in safety_events(seen, "safety.rule")} == {
        ("target_ready", False), ("service_served", False)}
    assert safety_events(seen, "safety.readiness") == []  # nothing needed checking


def test_a_target_from_a_restored_step_site(tmp_path: Path) -> None:
    runbook, inventory, _ = write(tmp_path, f"""\
        readiness:
          primary: [{{tcp: "127.0.0.1:{closed_port()}", timeout: 300ms}}]""")
    Path(runbook).write_text("""\
name: back-home
scope: {services: [quotation]}
parameters:
  home: {default: primary}
steps:
  - {id: verify, action: noop, site: "{{ params.home }}", marks: [service_restored]}
""")
    outcome, _ = run(runbook, inventory)
    assert outcome.error.startswith("safety rule target_ready refused the run: site primary")


def test_a_runbook_scoped_by_sites_alone_is_checked_for_the_services_it_locks_and_records(tmp_path: Path) -> None:
    port = closed_port()
    runbook, inventory, marker = write(tmp_path, f"""\
        readiness:
          backup: [{{tcp: "127.0.0.1:{port}", timeout: 300ms, service: quotation}}]""")
    sites_alone = Path(runbook).read_text().replace("scope: {services: [quotation]}", "scope: {sites: [backup]}")
    Path(runbook).write_text(sites_alone)
    plan = build_plan(runbook, inventory, started_by="alice")
    # one scope: the services served at the runbook's sites, for the locks, the evidence and the safety checks
    assert plan.services_in_scope() == ["quotation"]
    assert [r.name for r in resources_for(plan)] == ["service:quotation", "site:backup"]
    url = f"sqlite:///{tmp_path / 'evidence.db'}"
    migrate.upgrade(url)
    outcome, seen = run(runbook, inventory, url=url)
    assert outcome.state == "failed" and not marker.exists()
    assert outcome.error.startswith(f"safety rule target_ready refused the run: site backup, where the run moves "
                                    f"quotation, is not ready (127.0.0.1:{port}: ")
    checks = safety_events(seen, "safety.readiness")
    assert [(c["site"], c["service"], c["ok"]) for c in checks] == [("backup", "quotation", False)]
    with sqlite3.connect(tmp_path / "evidence.db") as db:
        recorded = [service for (service,) in db.execute("SELECT service FROM run_services")]
    assert recorded == ["quotation"]


# ---------------------------------------------------------------- during the run (actions)


def test_enforce_refuses_names_the_rule_and_records_overrides(tmp_path: Path) -> None:
    (tmp_path / "inventory.yml").write_text(inventory_text("        rules: {}"))
    inventory, _ = load_inventory(str(tmp_path / "inventory.yml"))
    harness = Harness(inventory, {"started_by": "bob"})
    with pytest.raises(ActionError, match=r"old primary takes writes \(safety rule promote_fenced\); to override, "
                                          r'run again with --force "reason"'):
        harness.ctx().enforce(PROMOTE_FENCED, "old primary takes writes")
    harness.run_info["forced"] = ["split brain drill"]
    assert harness.ctx().enforce(PROMOTE_FENCED, "old primary takes writes") == ["split brain drill"]
    override = [e for e in harness.events if isinstance(e, ActionEvent)][-1]
    assert override.kind == "safety.override"
    assert override.data == {"rule": "promote_fenced", "problem": "old primary takes writes", "actor": "bob",
                             "reason": "split brain drill"}
    (tmp_path / "inventory.yml").write_text(inventory_text("        rules: {promote_fenced: off}"))
    relaxed = Harness(load_inventory(str(tmp_path / "inventory.yml"))[0])
    assert relaxed.ctx().enforce(PROMOTE_FENCED, "old primary takes writes") == []
    assert [e.kind for e in relaxed.events if isinstance(e, ActionEvent)] == ["safety.rule"]


# ---------------------------------------------------------------- the dr command


def dr(*args: str, cwd: Path, db: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "dr_orchestrator.cli", *args], cwd=cwd, capture_output=True,
                          text=True, timeout=120, env={**os.environ, "DR_DATABASE_URL": db})


@pytest.mark.slow
def test_dr_run_refused_exits_1_with_the_rule_and_force_overrides(tmp_path: Path) -> None:
    runbook, inventory, marker = write(tmp_path, f"""\
        readiness:
          backup: [{{tcp: "127.0.0.1:{closed_port()}", timeout: 300ms}}]""")
    db = f"sqlite:///{tmp_path / 'evidence.db'}"
    assert dr("db", "upgrade", cwd=tmp_path, db=db).returncode == 0
    refused = dr("run", runbook, "-i", inventory, "-q", cwd=tmp_path, db=db)
    assert refused.returncode == 1, refused.stdout + refused.stderr
    last = refused.stderr.strip().splitlines()[-1]
    assert last.startswith("safety rule target_ready refused the run: site backup") and "--force" in last
    assert "Traceback" not in refused.stderr and not marker.exists()
    empty = dr("run", runbook, "-i", inventory, "--force", " ", cwd=tmp_path, db=db)
    assert empty.returncode == 2 and "--force needs a reason" in empty.stderr
    forced = dr("run", runbook, "-i", inventory, "-q", "--force", "backup checked by hand", cwd=tmp_path, db=db)
    assert forced.returncode == 0, forced.stdout + forced.stderr
    assert marker.exists()
