"""Issue 15's bar, against the real parts (`dr lab up --ha`: three sites, etcd, a node per site, the
evidence PostgreSQL under Patroni): the site its leader runs at is lost. Another node leads, every
service answers from the backup site, and once the evidence database is back the journaled evidence is
delivered and the audit chain verifies. The figures are printed by `python -m benchmarks.cluster`."""

from __future__ import annotations

import os
import shutil
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # the repository: its benchmarks/

from benchmarks.cluster import measure_once  # noqa: E402
from dr_orchestrator.lab.etcd import ETCD  # noqa: E402

pytestmark = [
    pytest.mark.lab, pytest.mark.etcd, pytest.mark.slow,
    pytest.mark.skipif(os.geteuid() != 0, reason="the HA lab runs its nodes with per-site groups (root)"),
    pytest.mark.skipif(shutil.which("nft") is None, reason="needs nftables"),
    pytest.mark.skipif(not os.access(ETCD, os.X_OK), reason="needs etcd-server"),
]


def test_losing_the_leaders_site_fails_over_by_another_node_and_its_evidence_arrives_whole() -> None:
    figures = measure_once()
    print(f"\nmeasured: {figures}")
    assert figures["new_leader"] in ("node-backup", "node-witness")
    runs = figures["runs"]
    assert isinstance(runs, list) and runs, runs
    assert {run["orchestrator_host"] for run in runs} == {figures["new_leader"]}  # only the leader acted
    # The site's runbook alone: no service's own runbook beside it on the same services.
    assert [(run["runbook_name"], run["state"]) for run in runs] == [("site-failover", "succeeded")]
    assert figures["verify"][0] == 0, figures["verify"]
