"""Each service keeps its own store (issue 16), end to end on the lab: a single-service failover touches
only its own store, asynchronous loss stays inside the recorded RPO, quotation's Redis fails over and back."""

from __future__ import annotations

from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import httpx
import pytest
from runbook_support import (
    SERVICES,
    evidence_db,
    failures,
    front_door_site,
    run_runbook,
    wait_for_replicated_heartbeat,
)
from support.waiting import wait_for

from dr_orchestrator.demo import RPO_AGREEMENT_S
from dr_orchestrator.lab.load import load_report, start_load, stop_load

pytestmark = [pytest.mark.lab, pytest.mark.slow]
__all__ = ["evidence_db"]  # a fixture, used by name


def test_failing_trading_over_leaves_the_other_services_writing_throughout(
    lab_factory: Any, evidence_db: str, tmp_path: Path
) -> None:
    """Each service keeps its own store: fencing and promoting trading's database touches nothing of
    contract-signing or quotation. The load generator's ledger shows not one failed request for them."""
    with lab_factory() as lab:
        wait_for_replicated_heartbeat(lab.config)
        start_load(lab.config)
        try:
            wait_for(lambda: all(load_report(lab.config)["services"][s]["ok"] >= 20 for s in SERVICES),
                       60, "the load's first answers")
            code, detail = run_runbook("failover-trading.yml", lab, evidence_db, tmp_path)
            ok_at_end = {s: load_report(lab.config)["services"][s]["ok"] for s in SERVICES}
            wait_for(lambda: all(load_report(lab.config)["services"][s]["ok"] > ok_at_end[s] + 5 for s in SERVICES),
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
        start_load(lab.config, rate=100)
        try:
            wait_for(lambda: load_report(lab.config)["services"]["contract-signing"]["ok"] >= 50, 60,
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
