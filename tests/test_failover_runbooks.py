"""The lab runbooks end to end, against real sites: what issue #4 promises an engineer."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import httpx
import psycopg
import pytest
from notify_servers import wait_until

from dr_orchestrator.demo import AGREEMENT_S, RPO_AGREEMENT_S, run_demo
from dr_orchestrator.evidence import queries
from dr_orchestrator.evidence.database import session_factory_for
from dr_orchestrator.lab import Lab, LabConfig
from dr_orchestrator.lab.load import load_report, start_load, stop_load

pytestmark = [pytest.mark.lab, pytest.mark.slow]

SERVICES = ("trading", "contract-signing", "quotation")
REPO = Path(__file__).resolve().parent.parent
RUNBOOKS = REPO / "runbooks"


def dr(*args: str, db: str, cwd: Path) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "DR_DATABASE_URL": db}
    return subprocess.run([sys.executable, "-m", "dr_orchestrator.cli", *args], cwd=cwd, env=env,
                          capture_output=True, text=True, timeout=600)


def run_runbook(name: str, lab: Lab, db: str, cwd: Path, *extra: str) -> tuple[int, dict[str, Any]]:
    """`dr run` of a lab runbook as an engineer types it; returns its exit code and evidence."""
    result = dr("run", "-q", str(RUNBOOKS / name), "-i", str(lab.config.inventory_path), *extra, db=db, cwd=cwd)
    if "Traceback" in result.stderr or "refused" in result.stderr:
        raise AssertionError(f"dr run {name} exited {result.returncode}:\n{result.stderr}")
    listing = dr("runs", "list", "-o", "json", "--limit", "1", db=db, cwd=cwd)
    assert listing.returncode == 0, listing.stderr
    run_id = json.loads(listing.stdout)[0]["id"]
    shown = dr("runs", "show", run_id, "-o", "json", db=db, cwd=cwd)
    assert shown.returncode == 0, shown.stderr
    return result.returncode, json.loads(shown.stdout)


@pytest.fixture
def evidence_db(tmp_path: Path) -> str:
    url = f"sqlite:///{tmp_path / 'evidence.db'}"
    assert dr("db", "upgrade", db=url, cwd=tmp_path).returncode == 0
    return url


def failures(detail: dict[str, Any]) -> str:
    """What went wrong in a run, for assertion messages."""
    return "; ".join(f"{s['step_id']} {s['state']}: {s['error']}" for s in detail["steps"]
                     if s["state"] not in ("succeeded", "skipped")) or str(detail["run"]["error"])


def steps_by_id(detail: dict[str, Any]) -> dict[tuple[str, str], dict[str, Any]]:
    return {(s["step_id"], s["phase"]): s for s in detail["steps"]}


def wait_for_replicated_heartbeat(config: LabConfig, service: str = "trading", deadline_s: float = 30.0) -> None:
    deadline = time.monotonic() + deadline_s
    while time.monotonic() < deadline:
        try:
            with psycopg.connect(config.dsn("backup", service), connect_timeout=2) as connection:
                if connection.execute("SELECT count(*) FROM dr_heartbeat").fetchone()[0]:  # type: ignore[index]
                    return
        except psycopg.Error:
            pass
        time.sleep(0.1)
    raise AssertionError("no heartbeat reached the standby")


def front_door_site(config: LabConfig, service: str) -> str | None:
    try:
        return str(httpx.get(f"{config.frontend_url(service)}/health", timeout=2).json().get("site"))
    except (httpx.HTTPError, ValueError):
        return None


def test_demo_fails_over_within_targets_and_agrees_with_the_clients(lab_config: LabConfig, tmp_path: Path) -> None:
    url = f"sqlite:///{tmp_path / 'demo.db'}"
    verdict = run_demo(lab_config, url)
    assert verdict.ok, verdict.problems
    with session_factory_for(url)() as session:
        failover = queries.run_detail(session, verdict.failover_run)
        failback = queries.run_detail(session, verdict.failback_run)
    assert failover is not None and failback is not None
    results = {row["service"]: row for row in failover["results"]}
    for row in results.values():
        assert row["rto_met"] and row["rpo_met"], row
        assert 0 < row["rto_s"] < 5.0, row  # the lab's bar: seconds, not minutes
        assert row["rpo_s"] is not None, row  # measured, never assumed
    # Trading's own database replicates synchronously: no acknowledged write may be lost. The others
    # replicate asynchronously; the demo's verdict holds their RPO against the ledger's lost writes.
    assert results["trading"]["rpo_s"] == 0
    assert failover["run"]["incident_at"] < failover["run"]["started_at"]  # the kill, declared
    assert failback["run"]["state"] == "succeeded"
    assert not Lab(lab_config).is_up()  # the demo takes its lab down
    assert AGREEMENT_S == 0.5


def test_switchover_loses_nothing_and_failback_restores_the_original_direction(
    lab_factory: Any, evidence_db: str, tmp_path: Path
) -> None:
    with lab_factory() as lab:
        code, detail = run_runbook("site-switchover.yml", lab, evidence_db, tmp_path)
        assert code == 0, failures(detail)
        results = {row["service"]: row for row in detail["results"]}
        for row in results.values():
            assert row["rpo_s"] == 0, row
            assert row["rto_met"], row
        assert "LSN equality" in results["trading"]["rpo_method"]
        assert "LSN equality" in results["contract-signing"]["rpo_method"]
        assert {front_door_site(lab.config, s) for s in ("trading", "contract-signing", "quotation")} == {"backup"}

        code, detail = run_runbook("site-failback.yml", lab, evidence_db, tmp_path)
        assert code == 0, failures(detail)
        assert all(row["rpo_s"] == 0 for row in detail["results"])
        assert {front_door_site(lab.config, s) for s in ("trading", "contract-signing", "quotation")} == {"primary"}
        stores = lab.status()["stores"]
        for service in ("trading", "contract-signing"):  # replication in the original direction again
            assert stores[service]["active_site"] == "primary", stores[service]
            assert [row["state"] for row in stores[service]["replication"]] == ["streaming"], stores[service]
            restored = steps_by_id(detail)[(f"replication-restored-{service}", "forward")]
            assert restored["state"] == "succeeded"
            assert restored["output"]["sites"]["backup"]["role"] == "standby"
        assert [row["sync_state"] for row in stores["trading"]["replication"]] == ["sync"]
        assert stores["quotation"]["active_site"] == "primary"
        assert stores["quotation"]["sites"]["backup"] == {**stores["quotation"]["sites"]["backup"],
                                                          "role": "replica", "link": "up"}


def test_dead_primary_is_fenced_as_unreachable_and_a_lagging_standby_needs_force(
    lab_factory: Any, evidence_db: str, tmp_path: Path
) -> None:
    with lab_factory() as lab:
        wait_for_replicated_heartbeat(lab.config)
        lab.break_replication("trading")
        # Trading's standby's newest heartbeat now ages; the run declares a limit it is already past.
        lab.kill_site("primary")
        code, detail = run_runbook("site-failover.yml", lab, evidence_db, tmp_path, "-p", "max_staleness=1ms")
        assert code == 1
        steps = steps_by_id(detail)
        assert steps[("precheck-trading", "forward")]["state"] == "failed"
        assert "--force" in steps[("precheck-trading", "forward")]["error"]
        for promote in ("promote-trading", "promote-contract-signing", "promote-quotation"):
            assert steps[(promote, "forward")]["state"] in ("skipped", "cancelled")  # nothing was promoted

        reason = "primary site confirmed powered off; accepting the standby's data loss"
        code, detail = run_runbook("site-failover.yml", lab, evidence_db, tmp_path, "-p", "max_staleness=1ms",
                                   "--force", reason)
        assert code == 0, failures(detail)
        steps = steps_by_id(detail)
        assert steps[("fence-old-site", "forward")]["state"] == "succeeded"  # unreachable is fenced enough
        assert reason in json.dumps(steps[("precheck-trading", "forward")]["output"])
        assert reason in json.dumps(detail["run"])  # the override is evidence of the run
        assert {front_door_site(lab.config, s) for s in ("trading", "contract-signing", "quotation")} == {"backup"}


def test_backup_that_never_becomes_healthy_fails_the_run_and_rolls_the_switch_back(
    lab_factory: Any, evidence_db: str, tmp_path: Path
) -> None:
    with lab_factory() as lab:
        # Quotation at the backup site hangs (SIGSTOP): it still "runs", so nothing restarts it, but it
        # never answers. The switch happens, the check gives up, and the switch must be rolled back.
        stopped = lab.running()["quotation@backup"]
        os.kill(stopped, signal.SIGSTOP)
        try:
            code, detail = run_runbook("failover-quotation.yml", lab, evidence_db, tmp_path)
        finally:
            os.kill(stopped, signal.SIGCONT)
        assert code == 1
        steps = steps_by_id(detail)
        verify = steps[("verify", "forward")]
        assert verify["state"] == "failed"  # the check gave up before the step timeout, saying why
        assert steps[("switch", "rollback")]["state"] == "rolled_back"
        servers = lab.status()["front_door"]["quotation"]["servers"]
        assert servers["backup"] == "MAINT" and servers["primary"] != "MAINT", servers  # routed back where it was
        assert front_door_site(lab.config, "quotation") == "primary"


def test_an_unreachable_target_store_stops_a_single_service_failover_before_any_change(
    lab_factory: Any, evidence_db: str, tmp_path: Path
) -> None:
    with lab_factory() as lab:
        lab.kill_service("redis-quotation", "backup")
        code, detail = run_runbook("failover-quotation.yml", lab, evidence_db, tmp_path)
        assert code == 1
        steps = steps_by_id(detail)
        assert steps[("precheck", "forward")]["state"] == "failed", steps[("precheck", "forward")]
        for changing in ("fence-service", "promote", "start-at-backup", "switch"):
            assert steps[(changing, "forward")]["started_at"] is None, steps[(changing, "forward")]
        assert front_door_site(lab.config, "quotation") == "primary"


class FrontDoorProber:
    """An outside client at the front door: every service's /health every 50 ms, as customers see it."""

    SERVICES = ("trading", "contract-signing", "quotation")

    def __init__(self, config: LabConfig) -> None:
        self.config = config
        self.seen: dict[str, list[tuple[float, bool, str | None]]] = {s: [] for s in self.SERVICES}
        self.stop = threading.Event()
        self.thread = threading.Thread(target=self.probe, daemon=True)

    def __enter__(self) -> FrontDoorProber:
        self.thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop.set()
        self.thread.join(timeout=10)

    def probe(self) -> None:
        with httpx.Client(timeout=2.0) as client:
            while not self.stop.is_set():
                for service in self.SERVICES:
                    at = time.monotonic()
                    try:
                        response = client.get(f"{self.config.frontend_url(service)}/health")
                        ok, site = response.status_code == 200, response.json().get("site")
                    except (httpx.HTTPError, ValueError):
                        ok, site = False, None
                    self.seen[service].append((at, ok, site))
                self.stop.wait(0.05)

    def outage_s(self, service: str) -> float:
        """How long the service answered badly (or from another site than it started at) in total."""
        readings = self.seen[service]
        home = readings[0][2]
        bad = 0.0
        for (at, ok, site), (next_at, _, _) in zip(readings, readings[1:], strict=False):
            if not ok or site != home:
                bad += next_at - at
        return bad


def test_a_dead_standby_stops_the_site_failover_before_it_touches_the_healthy_primary(
    lab_factory: Any, evidence_db: str, tmp_path: Path
) -> None:
    with lab_factory() as lab:
        lab.kill_service("postgres-trading", "backup")
        with FrontDoorProber(lab.config) as prober:
            code, detail = run_runbook("site-failover.yml", lab, evidence_db, tmp_path)
            # the prober keeps watching a moment after the run: nothing is left to go wrong later
            deadline = time.monotonic() + 1.0
            while time.monotonic() < deadline and not prober.stop.wait(0.05):
                pass
        assert code == 1
        steps = steps_by_id(detail)
        assert steps[("precheck-trading", "forward")]["state"] == "failed"
        for changing in ("fence-old-site", "promote-trading", "promote-contract-signing", "promote-quotation",
                         "start-backup-services", "switch-trading", "switch-contract-signing", "switch-quotation"):
            assert steps[(changing, "forward")]["state"] in ("skipped", "cancelled"), steps[(changing, "forward")]
            assert steps[(changing, "forward")]["started_at"] is None  # never began: nothing was touched
        for service in FrontDoorProber.SERVICES:
            assert prober.seen[service] and all(site == "primary" for _, ok, site in prober.seen[service] if ok)
            assert prober.seen[service][-1][1:] == (True, "primary"), service
            assert prober.outage_s(service) < 2.0, (service, prober.outage_s(service))
        verdict = [e for e in detail["events"] if e["kind"] == "blast_radius.verdict"]
        assert verdict and verdict[0]["data"]["left_as_found"] is True, verdict


def test_failing_trading_over_leaves_the_other_services_writing_throughout(
    lab_factory: Any, evidence_db: str, tmp_path: Path
) -> None:
    """Each service keeps its own store: fencing and promoting trading's database touches nothing of
    contract-signing or quotation. The load generator's ledger shows not one failed request for them."""
    with lab_factory() as lab:
        wait_for_replicated_heartbeat(lab.config)
        start_load(lab.config)
        try:
            wait_until(lambda: all(load_report(lab.config)["services"][s]["ok"] >= 20 for s in SERVICES),
                       60, "the load's first answers")
            code, detail = run_runbook("failover-trading.yml", lab, evidence_db, tmp_path)
            ok_at_end = {s: load_report(lab.config)["services"][s]["ok"] for s in SERVICES}
            wait_until(lambda: all(load_report(lab.config)["services"][s]["ok"] > ok_at_end[s] + 5 for s in SERVICES),
                       60, "more answers after the run")
        finally:
            stop_load(lab.config)
        assert code == 0, failures(detail)
        assert front_door_site(lab.config, "trading") == "backup"
        truth = load_report(lab.config)["services"]
        for other in ("contract-signing", "quotation"):
            assert truth[other]["failed"] == 0 and not truth[other]["outage_windows"], truth[other]
            assert front_door_site(lab.config, other) == "primary"
        assert truth["contract-signing"]["missing_writes"]["count"] == 0
        assert truth["trading"]["missing_writes"]["count"] == 0  # synchronous: nothing acknowledged is lost
        verdict = next(e["data"] for e in detail["events"] if e["kind"] == "blast_radius.verdict")
        assert verdict["left_as_found"] is True, verdict
        stores = lab.status()["stores"]
        assert {service: store["active_site"] for service, store in stores.items()} == {
            "trading": "backup", "contract-signing": "primary", "quotation": "primary"}


def test_asynchronous_contract_signing_loses_no_more_than_its_recorded_rpo(
    lab_factory: Any, evidence_db: str, tmp_path: Path
) -> None:
    """Under load, SIGKILL of contract-signing's primary, then its failover: every acknowledged contract
    the promoted database lacks was acknowledged inside the recorded RPO window before the kill."""
    with lab_factory() as lab:
        wait_for_replicated_heartbeat(lab.config, "contract-signing")
        start_load(lab.config, rate=200)
        try:
            wait_until(lambda: load_report(lab.config)["services"]["contract-signing"]["ok"] >= 100, 60,
                       "the load's first contracts")
            lab.kill_service("postgres-contract-signing", "primary")
            killed_at = datetime.now(UTC)
            code, detail = run_runbook("failover-contract-signing.yml", lab, evidence_db, tmp_path,
                                       "--incident-at", killed_at.isoformat())
        finally:
            stop_load(lab.config)
        assert code == 0, failures(detail)
        (row,) = [r for r in detail["results"] if r["service"] == "contract-signing"]
        assert row["rpo_s"] is not None and row["rpo_s"] >= 0, row
        lost = load_report(lab.config)["services"]["contract-signing"]["missing_writes"]
        assert lost["checked_site"] == "backup"
        if lost["count"]:
            oldest_s = (killed_at - datetime.fromisoformat(lost["first_acked_at"])).total_seconds()
            assert oldest_s <= row["rpo_s"] + RPO_AGREEMENT_S, (lost, row)
        print(f"contract-signing: {lost['count']} of {lost['acknowledged']} acknowledged writes lost, "
              f"RPO recorded {row['rpo_s']:.3f} s ({row['rpo_method']})")


def test_quotation_fails_over_to_its_redis_replica_and_failback_restores_replication(
    lab_factory: Any, evidence_db: str, tmp_path: Path
) -> None:
    with lab_factory() as lab:
        lab.kill_service("quotation", "primary")
        code, detail = run_runbook("failover-quotation.yml", lab, evidence_db, tmp_path)
        assert code == 0, failures(detail)
        (row,) = detail["results"]
        assert row["service"] == "quotation" and row["rpo_s"] == 0, row  # its Redis was alive: nothing lost
        assert row["rto_met"] and row["rpo_met"], row
        stores = lab.status()["stores"]["quotation"]
        assert stores["active_site"] == "backup"
        assert stores["sites"]["primary"]["role"] == "replica"  # the old primary follows the new one
        assert httpx.get(f"{lab.config.frontend_url('quotation')}/quotes/ACME", timeout=2).json()["symbol"] == "ACME"

        code, detail = run_runbook("failback-quotation.yml", lab, evidence_db, tmp_path)
        assert code == 0, failures(detail)
        assert front_door_site(lab.config, "quotation") == "primary"
        stores = lab.status()["stores"]["quotation"]
        assert stores["active_site"] == "primary"
        assert stores["sites"]["backup"] == {**stores["sites"]["backup"], "role": "replica", "link": "up"}
        assert not [p for p in lab.status()["problems"] if "quotation" in p]
