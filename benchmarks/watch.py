"""Issue 14's figures: `dr watch` with policy auto against the lab, an outside prober at the front door.

    .venv/bin/python -m benchmarks.watch                      # kill-site, kill trading, 10 min of glitches
    .venv/bin/python -m benchmarks.watch --glitch-minutes 1   # a shorter glitch period

1. `dr lab kill-site primary` and no other command: how long the prober saw each service fail (target
   < 3 s), the incident's impact start against the prober's first failure (target within 0.1 s), the
   incident's RTO against the prober's (within 0.25 s), detection and decision, and execution (decision
   to restored) against the site failover's critical path timed alone (target <= 1.25x).
2. `dr lab kill trading@primary`: how long the prober saw trading fail (target < 2 s).
3. Glitches for N minutes (a service SIGSTOPped 300 ms, a front-door server in maintenance 200 ms, a
   service's port resetting every connection for 100 ms, one probe round: the dropped probe, by an
   nftables rule, when nft can be used): incidents and runs opened per hour (target 0).
"""

from __future__ import annotations

import argparse
import json
import os
import random
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import httpx

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from benchmarks.common import Figure, running_lab, sqlite_database  # noqa: E402
from benchmarks.failover import RUNBOOK, VERIFICATIONS, critical_path, longest_chain  # noqa: E402

SERVICES = ("trading", "contract-signing", "quotation")


class Prober:
    """Every service's /health through the front door every 20 ms, as a customer sees it."""

    def __init__(self, lab: Any) -> None:
        self.lab = lab
        # (sent, answered, ok, site): a failure counts from when its request was sent, a good answer
        # from when it arrived (a request caught by the switch may be sent before it and served after)
        self.seen: dict[str, list[tuple[datetime, datetime, bool, str | None]]] = {s: [] for s in SERVICES}
        self.stop = threading.Event()
        self.threads = [threading.Thread(target=self.probe, args=(s,), daemon=True) for s in SERVICES]

    def __enter__(self) -> Prober:
        for thread in self.threads:
            thread.start()
        return self

    def __exit__(self, *_: object) -> None:
        self.stop.set()
        for thread in self.threads:
            thread.join(timeout=10)

    def probe(self, service: str) -> None:
        with httpx.Client(timeout=2.0) as client:
            while not self.stop.is_set():
                at = datetime.now(UTC)
                try:
                    response = client.get(f"{self.lab.config.frontend_url(service)}/health")
                    ok, site = response.status_code == 200, response.json().get("site")
                except (httpx.HTTPError, ValueError):
                    ok, site = False, None
                self.seen[service].append((at, datetime.now(UTC), ok, site))
                self.stop.wait(0.02)

    def outage(self, service: str, after: datetime, site: str) -> tuple[datetime, datetime] | None:
        """First failure after ``after`` and the first good answer from ``site`` after it."""
        readings = [r for r in self.seen[service] if r[0] >= after]
        first_bad = next((sent for sent, _, ok, _ in readings if not ok), None)
        if first_bad is None:
            return None
        back = next((answered for sent, answered, ok, where in readings
                     if sent > first_bad and ok and where == site), None)
        return (first_bad, back) if back else None


def start_watch(lab: Any, db: str, work: Path) -> subprocess.Popen[bytes]:
    log = (work / "watch.log").open("wb")
    process = subprocess.Popen(
        [sys.executable, "-m", "dr_orchestrator.cli", "watch", "run", "-i", str(lab.config.inventory_path)],
        env={**os.environ, "DR_DATABASE_URL": db}, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    deadline = time.monotonic() + 60
    while "first round" not in (work / "watch.log").read_text():
        if process.poll() is not None or time.monotonic() > deadline:
            raise RuntimeError(f"the watch did not start: {(work / 'watch.log').read_text()[-2000:]}")
        time.sleep(0.1)
    return process


def stop_watch(process: subprocess.Popen[bytes]) -> None:
    process.send_signal(signal.SIGTERM)
    try:
        process.wait(timeout=120)
    except subprocess.TimeoutExpired:
        os.killpg(process.pid, signal.SIGKILL)
        process.wait()


def incidents(db: str) -> list[dict[str, Any]]:
    listed = subprocess.run([sys.executable, "-m", "dr_orchestrator.cli", "incidents", "list", "-o", "json"],
                            env={**os.environ, "DR_DATABASE_URL": db}, capture_output=True, text=True, check=True)
    return [i for i in json.loads(listed.stdout) if i.get("source") == "watch"]


def timeline(db: str, incident_id: str) -> dict[str, Any]:
    shown = subprocess.run([sys.executable, "-m", "dr_orchestrator.cli", "incidents", "show", incident_id, "-o",
                            "json"], env={**os.environ, "DR_DATABASE_URL": db}, capture_output=True, text=True,
                           check=True)
    return dict(json.loads(shown.stdout)["timeline"])


def wait_for(condition: Any, what: str, deadline_s: float = 60.0) -> None:
    deadline = time.monotonic() + deadline_s
    while not condition():
        if time.monotonic() > deadline:
            raise RuntimeError(f"gave up waiting for {what}")
        time.sleep(0.05)


def own_critical_path(db: str, run_id: str) -> float:
    """The run's critical path from its own evidence: each step's attempts as they took in this run
    (with the warm path's connections), a verification up to the send of its first good probe (what
    restored counts), along the longest chain of needs to the last service verified."""
    import yaml
    from sqlalchemy import select

    from dr_orchestrator.evidence.database import session_factory_for
    from dr_orchestrator.evidence.models import Attempt, Marker

    needs = {step["id"]: step.get("needs", []) for step in yaml.safe_load(RUNBOOK.read_text())["steps"]}
    own: dict[str, float] = dict.fromkeys(needs, 0.0)  # a skipped step took no time
    with session_factory_for(db)() as session:
        attempts = session.scalars(select(Attempt).where(Attempt.run_id == run_id, Attempt.phase == "forward"))
        started: dict[str, datetime] = {}
        for attempt in attempts:
            own[attempt.step_id] += attempt.duration_s or 0.0
            if attempt.started_at is not None:
                started[attempt.step_id] = attempt.started_at
        for marker in session.scalars(select(Marker).where(Marker.run_id == run_id)):
            if marker.step_id in VERIFICATIONS:
                own[marker.step_id] = (_utc(marker.at) - _utc(started[marker.step_id])).total_seconds()
    return max(longest_chain(step_id, needs, own) for step_id in VERIFICATIONS)


def _utc(moment: datetime) -> datetime:
    return moment if moment.tzinfo else moment.replace(tzinfo=UTC)  # SQLite keeps no zone


def kill_site(work: Path) -> tuple[list[Figure], float]:
    with running_lab() as lab, sqlite_database() as db:
        subprocess.run([sys.executable, "-m", "dr_orchestrator.cli", "db", "upgrade"], check=True,
                       env={**os.environ, "DR_DATABASE_URL": db}, capture_output=True)
        watch = start_watch(lab, db, work)
        try:
            with Prober(lab) as prober:
                time.sleep(1.0)  # a steady state for the prober (not a wait for a condition: a baseline)
                before = datetime.now(UTC)
                lab.kill_site("primary")
                wait_for(lambda: all(prober.outage(s, before, "backup") for s in SERVICES), "the failover")
        finally:
            stop_watch(watch)
        outages = {s: prober.outage(s, before, "backup") for s in SERVICES}
        (incident,) = incidents(db)
        moments = timeline(db, incident["id"])
        (run_id,) = moments["run_ids"]
        own_path = own_critical_path(db, run_id)
    first_bad = min(o[0] for o in outages.values() if o)
    last_back = max(o[1] for o in outages.values() if o)
    prober_rto = (last_back - first_bad).total_seconds()
    impact = datetime.fromisoformat(moments["impact_start"])
    return [
        Figure("kill-site: slowest service back, as the prober saw it", prober_rto, "s", 3.0),
        Figure("impact start vs the prober's first failure", abs((impact - first_bad).total_seconds()), "s", 0.1),
        Figure("incident RTO vs the prober's", abs(moments["rto_s"] - prober_rto), "s", 0.25,
               note=f"incident RTO {moments['rto_s']:.3f} s"),
        Figure("detection (impact start -> down)", moments["detection_s"], "s"),
        Figure("decision (down -> decided)", moments["decision_s"], "s"),
        Figure("execution (decided -> restored) / the run's own critical path", moments["execution_s"] / own_path,
               "x", 1.25, note=f"execution {moments['execution_s']:.3f} s, its actions {own_path:.3f} s"),
    ], moments["execution_s"]


def kill_trading(work: Path) -> list[Figure]:
    with running_lab() as lab, sqlite_database() as db:
        subprocess.run([sys.executable, "-m", "dr_orchestrator.cli", "db", "upgrade"], check=True,
                       env={**os.environ, "DR_DATABASE_URL": db}, capture_output=True)
        watch = start_watch(lab, db, work)
        try:
            with Prober(lab) as prober:
                time.sleep(1.0)
                before = datetime.now(UTC)
                lab.kill_service("trading", "primary")
                wait_for(lambda: prober.outage("trading", before, "backup"), "trading's failover")
        finally:
            stop_watch(watch)
        outage = prober.outage("trading", before, "backup")
    assert outage is not None
    return [Figure("kill trading@primary: trading back, as the prober saw it",
                   (outage[1] - outage[0]).total_seconds(), "s", 2.0)]


def glitches(work: Path, minutes: float) -> list[Figure]:
    from dr_orchestrator.lab import haproxy

    with running_lab() as lab, sqlite_database() as db:
        subprocess.run([sys.executable, "-m", "dr_orchestrator.cli", "db", "upgrade"], check=True,
                       env={**os.environ, "DR_DATABASE_URL": db}, capture_output=True)
        watch = start_watch(lab, db, work)
        count = 0
        kinds = ("stop", "maint", "drop") if shutil.which("nft") and os.geteuid() == 0 else ("stop", "maint")
        try:
            end = time.monotonic() + minutes * 60
            while time.monotonic() < end:
                kind = random.choice(kinds)
                service = random.choice(SERVICES)
                if kind == "drop":
                    refuse_connections(lab.config.address("primary"), lab.config.service_port(service), 0.1)
                elif kind == "stop":
                    pid = lab.running()[f"{service}@primary"]
                    os.kill(pid, signal.SIGSTOP)
                    time.sleep(0.3)
                    os.kill(pid, signal.SIGCONT)
                else:
                    haproxy.command(lab.config, f"set server {service}/primary state maint")
                    time.sleep(0.2)
                    haproxy.command(lab.config, f"set server {service}/primary state ready")
                count += 1
                time.sleep(random.uniform(2.0, 5.0))
        finally:
            stop_watch(watch)
        opened = incidents(db)
    per_hour = len(opened) / (minutes / 60)
    return [Figure(f"false incidents per hour ({count} glitches in {minutes:g} min)", per_hour, "/h", 0.0,
                   note="glitches: " + ", ".join(kinds))]


def refuse_connections(address: str, port: int, seconds: float) -> None:
    """Every packet to ``address:port`` answered by a TCP reset for ``seconds``: probes dropped."""
    table = f"dr_bench_glitch_{os.getpid()}"
    rule = f"ip daddr {address} tcp dport {port} reject with tcp reset"
    subprocess.run(["nft", "-f", "-"], check=True, text=True, input=(
        f"table inet {table} {{\n chain out {{\n type filter hook output priority 0;\n {rule}\n }}\n}}\n"))
    try:
        time.sleep(seconds)
    finally:
        subprocess.run(["nft", "delete", "table", "inet", table], check=True)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--glitch-minutes", type=float, default=10.0)
    options = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="dr-bench-watch-") as tmp:
        work = Path(tmp)
        figures, execution_s = kill_site(work)
        path_s, _ = critical_path(work)
        figures.append(Figure("execution / the critical path timed alone (cold connections)", execution_s / path_s,
                              "x", note=f"execution {execution_s:.3f} s, critical path {path_s:.3f} s"))
        figures += kill_trading(work)
        figures += glitches(work, options.glitch_minutes)
    for figure in figures:
        print(figure.line(), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
