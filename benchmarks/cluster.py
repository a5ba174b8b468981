"""Issue 15's figures: the orchestrator cluster (`dr lab up --ha`) losing the site its leader runs at.

    .venv/bin/python -m benchmarks.cluster            # once
    .venv/bin/python -m benchmarks.cluster --runs 3   # three fresh HA labs
    .venv/bin/python -m benchmarks.cluster --client-load  # the lab's clients writing meanwhile

An HA lab (three sites, three etcd members, a node per site with the watch's `auto` policy, the evidence
PostgreSQL replicated by Patroni) starts with its leader at the primary site; an outside prober asks
every service through the front door every 20 ms. `dr lab kill-site primary` kills the site with its
node, its etcd member and the evidence database's leader. Figures, from the kill: the new leader
(target < 5 s), every service answering from the backup site as the prober saw it (< 8 s), the
evidence database back (Patroni: about its 20 s TTL), and the journal delivered (the leader's run and
incident in the database, the audit chain verified). With ``--client-load``, also the writes the
lab's clients saw acknowledged that the database serving them afterwards lacks."""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from benchmarks.watch import SERVICES, Prober  # noqa: E402
from dr_orchestrator.cluster.journal import backlog  # noqa: E402
from dr_orchestrator.lab import scratch  # noqa: E402
from dr_orchestrator.lab.ha import NODE_PROGRAM  # noqa: E402
from dr_orchestrator.lab.lab import Lab  # noqa: E402


def wait_until(condition: Any, what: str, deadline_s: float) -> Any:
    deadline = time.monotonic() + deadline_s
    while time.monotonic() < deadline:
        if value := condition():
            return value
        time.sleep(0.02)
    raise TimeoutError(f"{what}: not within {deadline_s:.0f} s")


def evidence(lab: Lab, *args: str) -> subprocess.CompletedProcess[str]:
    url_file = lab.config.nodes_dir / "evidence-url"
    return subprocess.run([*NODE_PROGRAM, "--db", f"file:{url_file}", *args], capture_output=True, text=True,
                          timeout=120)


def kill_leaders_site(lab: Lab) -> dict[str, Any]:
    """Kill the primary site (its node leads) with the prober running; the figures, in seconds from the kill."""
    cluster = lab.ha()
    assert cluster is not None
    assert cluster.leader() == "node-primary", "the HA lab should start with its leader at the primary site"
    with Prober(lab) as prober:
        wait_until(lambda: all(prober.seen[s] and prober.seen[s][-1][2] for s in SERVICES), "prober ready", 10)
        lab.kill_site("primary")
        killed = lab.killed_at
        assert killed is not None
        new_leader = wait_until(lambda: (n := cluster.leader()) not in (None, "node-primary") and n,
                                "a new leader", 30)
        led = (datetime.now(UTC) - killed).total_seconds()

        def restored() -> list[datetime] | None:
            outages = [prober.outage(service, killed, "backup") for service in SERVICES]
            return [back for _, back in outages] if all(outages) else None  # type: ignore[misc]

        back = wait_until(restored, "every service answering from the backup site", 60)
    figures: dict[str, Any] = {"new_leader": new_leader, "leader_s": led,
                               "services_back_s": max((b - killed).total_seconds() for b in back)}
    store = cluster.evidence
    assert store is not None
    if hasattr(store, "wait_leader"):
        store.wait_leader("backup", 90)
        figures["evidence_back_s"] = (datetime.now(UTC) - killed).total_seconds()
    journal = lab.config.node_dir(new_leader.removeprefix("node-")) / "journal.jsonl"
    wait_until(lambda: not journal.exists() or backlog(journal) == 0, "the leader's journal delivered", 90)
    figures["journal_delivered_s"] = (datetime.now(UTC) - killed).total_seconds()
    listed = evidence(lab, "runs", "list", "--output", "json")
    figures["runs"] = json.loads(listed.stdout) if listed.returncode == 0 else listed.stderr
    verified = evidence(lab, "evidence", "verify")
    figures["verify"] = (verified.returncode, (verified.stdout + verified.stderr).strip()[-300:])
    return figures


def measure_once(client_load: bool = False) -> dict[str, Any]:
    """A fresh HA lab, its leader's site killed: the figures of ``kill_leaders_site``. ``client_load``:
    the lab's load generator writes to every service meanwhile (`dr lab load start`, 20 requests/s each)."""
    from dr_orchestrator.lab.load.process import start_generator, stop_generator

    with scratch.lab_slot("bench-ha") as config:
        lab = Lab(config)
        try:
            lab.up(ha=True)
            if client_load:
                start_generator(config)
            figures = kill_leaders_site(lab)
            if client_load:
                stop_generator(config.root)
                figures["writes"] = writes_kept(config)
            return figures
        finally:
            if client_load:
                stop_generator(config.root)
            lab.down()


def writes_kept(config: Any) -> dict[str, tuple[int, int | None]]:
    """Per writing service: the writes the lab's clients saw acknowledged, and how many of them the
    database that serves it now lacks (`dr lab load report`; None when it could not be checked)."""
    from dr_orchestrator.lab.load import load_report

    services = load_report(config)["services"]
    return {name: (service["acknowledged_writes"],
                   service["missing_writes"]["count"] if service["missing_writes"] else None)
            for name, service in services.items() if service["acknowledged_writes"] is not None}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--runs", type=int, default=1)
    parser.add_argument("--client-load", action="store_true",
                        help="the lab's load generator writes to every service during the kill")
    options = parser.parse_args()
    for attempt in range(options.runs):
        figures = measure_once(options.client_load)
        runs = figures.pop("runs")
        made = [(r.get("runbook_name"), r.get("state"), r.get("orchestrator_host")) for r in runs] \
            if isinstance(runs, list) else runs
        print(f"run {attempt + 1}: new leader {figures['new_leader']} after {figures['leader_s']:.2f} s "
              f"(target < 5 s); every service from backup after {figures['services_back_s']:.2f} s (target < 8 s); "
              f"evidence database back after {figures.get('evidence_back_s', 0):.1f} s; journal delivered after "
              f"{figures['journal_delivered_s']:.1f} s; runs {made}; evidence verify exit {figures['verify'][0]}")
        if "writes" in figures:
            print("  acknowledged writes missing afterwards: " + ", ".join(
                f"{name} {'not checked' if missing is None else missing}/{acknowledged}"
                for name, (acknowledged, missing) in figures["writes"].items()))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
