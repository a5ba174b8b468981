"""The dashboard in a real browser: `dr serve` as its own process (uvicorn) on a free port, a
database holding real runs with RTO figures, a drill and a run waiting for approval, and Debian's
headless Chromium rendering the page (its DOM after rendering, and a screenshot)."""

from __future__ import annotations

import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass
from functools import partial
from html import unescape
from pathlib import Path

import httpx
import pytest
from api_support import INVENTORIES, RUNBOOKS, prepared, record_run, token, write_drill
from support.waiting import wait_for

from dr_orchestrator.lab.scratch import free_port

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
pytestmark = pytest.mark.browser


@dataclass
class Server:
    base: str
    log: Path


@pytest.fixture
def served(tmp_path: Path) -> Iterator[tuple[Server, str]]:
    """`dr serve` on a free port over a fresh SQLite database; yields the server and the database URL."""
    url = prepared(f"sqlite:///{tmp_path / 'evidence.db'}")
    drills = tmp_path / "drills"
    drills.mkdir()
    write_drill(drills)
    log = tmp_path / "serve.log"
    for _ in range(5):  # another process may take the free port before uvicorn binds it
        port = free_port()
        with log.open("w") as out:
            process = subprocess.Popen(
                [sys.executable, "-m", "dr_orchestrator.cli", "--db", url, "serve", "--port", str(port),
                 "--runbooks", str(RUNBOOKS), "--inventories", str(INVENTORIES), "--drills", str(drills)],
                stdout=out, stderr=subprocess.STDOUT, start_new_session=True)
        try:
            wait_for(partial(_up_or_gone, process, f"http://127.0.0.1:{port}/login"), 60, "dr serve answers")
            if process.poll() is None:
                yield Server(f"http://127.0.0.1:{port}", log), url
                return
        finally:
            _stop(process)
    raise RuntimeError(f"dr serve did not start: {log.read_text()[-2000:]}")


def _up_or_gone(process: subprocess.Popen[bytes], url: str) -> bool:
    return process.poll() is not None or _answers(url)


def _answers(url: str) -> bool:
    try:
        return httpx.get(url, timeout=2).status_code == 200
    except httpx.HTTPError:
        return False


def _stop(process: subprocess.Popen[bytes]) -> None:
    if process.poll() is None:
        os.killpg(process.pid, signal.SIGTERM)
        try:
            process.wait(30)
        except subprocess.TimeoutExpired:
            os.killpg(process.pid, signal.SIGKILL)
            process.wait(10)


def chromium(*args: str) -> subprocess.CompletedProcess[str]:
    assert CHROMIUM, "the dashboard test needs Debian's chromium package (scripts/debian-packages.txt)"
    profile = tempfile.mkdtemp(prefix="dr-chromium-")
    try:
        argv = [CHROMIUM, "--headless", "--disable-gpu", "--disable-dev-shm-usage", f"--user-data-dir={profile}",
                "--disable-background-networking", "--disable-component-update", "--disable-sync", "--no-first-run",
                "--disable-quic", "--hide-scrollbars", *args]
        if os.geteuid() == 0:
            argv.insert(1, "--no-sandbox")  # Chromium refuses to run as root with its sandbox
        return subprocess.run(argv, capture_output=True, text=True, timeout=120, start_new_session=True)
    finally:
        shutil.rmtree(profile, ignore_errors=True)


def figures(dom: str) -> dict[str, str]:
    return {m.group(1): m.group(0) for m in re.finditer(r'<figure class="rto-trend" data-service="([^"]+)".*?</figure>',
                                                         dom, re.S)}


@pytest.mark.slow
def test_the_dashboard_renders_in_chromium_with_rto_charts_drills_and_pending_approvals(
        served: tuple[Server, str], tmp_path: Path) -> None:
    server, url = served
    trading = [record_run(url, "restore-trading.yml", s) for s in (2, 4, 14)]  # 14 s misses the 10 s target
    quotation = [record_run(url, "restore-quotation.yml", s) for s in (5, 12)]
    erin, frank = token(url, "erin", "engineer"), token(url, "frank", "compliance")
    with httpx.Client(base_url=server.base, headers={"Authorization": f"Bearer {erin}"}, timeout=30) as api:
        drill = api.post("/api/drills/api-quick-drill/runs").json()["drill_run_id"]
        wait_for(lambda: api.get(f"/api/drill-runs/{drill}").json()["drill_run"]["verdict"], 60, "the drill ends")
        gated = api.post("/api/runs", json={"runbook": "gated-trading.yml", "inventory": "two-services.yml"})
        waiting = gated.json()["run_id"]
        wait_for(lambda: api.get("/api/approvals").json(), 30, "the run waits for approval")

        # The one-time link signs in (cookie), then the page renders from the cookie alone.
        page = f"{server.base}/dashboard?token={frank}"
        shown = chromium("--virtual-time-budget=5000", "--dump-dom", page)
        assert shown.returncode == 0, shown.stderr[-2000:]
        dom = shown.stdout
        screenshot = tmp_path / "dashboard.png"
        shot = chromium("--window-size=1400,1300", f"--screenshot={screenshot}", page)
        assert shot.returncode == 0 and screenshot.stat().st_size > 10_000, shot.stderr[-2000:]
        keep = os.environ.get("DR_DASHBOARD_SCREENSHOT")  # for a person to look at
        if keep:
            shutil.copy(screenshot, keep)

        api.post(f"/api/runs/{waiting}/steps/go-ahead/reject", json={"reason": "test over"})

    assert "frank (compliance)" in dom  # signed in through the cookie the link set
    charts = figures(dom)
    assert set(charts) == {"trading", "quotation"}
    assert 'data-points="3"' in charts["trading"] and 'data-target-s="10.0"' in charts["trading"]
    # quotation: the two runs recorded and the drill's failover
    assert 'data-points="3"' in charts["quotation"] and 'data-target-s="30.0"' in charts["quotation"]
    for service, count in (("trading", 3), ("quotation", 3)):
        assert charts[service].count('<circle class="run"') == count
        assert '<line class="target"' in charts[service]
    # Each point carries its measured RTO; the run over target is drawn red.
    rtos = sorted(float(v) for v in re.findall(r": ([0-9.]+) s</title></circle>", charts["trading"]))
    # (the RTO runs from the declared incident to the restore: a little more than the time ago declared)
    assert len(rtos) == 3 and all(ago <= rto < ago + 5 for rto, ago in zip(rtos, (2, 4, 14), strict=True))
    assert len(re.findall(r'<circle class="run"[^>]*fill="#c0392b"', charts["trading"])) == 1
    approvals = dom[dom.index('id="pending-approvals"'):dom.index('id="drills"')]
    assert f'data-run="{waiting}"' in approvals and "Switch trading to the backup site?" in unescape(approvals)
    drills = dom[dom.index('id="drills"'):dom.index('id="runs"')]
    assert 'data-drill="api-quick-drill"' in drills and '<td class="passed">passed</td>' in drills
    for run_id in trading + quotation:
        assert f'data-run="{run_id}"' in dom
    assert frank not in server.log.read_text()  # the sign-in link's token is never logged


@pytest.mark.slow
def test_the_dashboard_without_a_token_asks_for_one(served: tuple[Server, str]) -> None:
    server, url = served
    answer = httpx.get(f"{server.base}/dashboard")
    assert answer.status_code == 401 and 'name="token"' in answer.text
    revoked = token(url, "gone", "compliance")
    from dr_orchestrator.api.tokens import revoke_token
    from dr_orchestrator.evidence.database import session_factory_for

    with session_factory_for(url)() as session:
        revoke_token(session, 1, "test")
        session.commit()
    refused = httpx.post(f"{server.base}/login", data={"token": revoked})
    assert refused.status_code == 401 and "the token &#39;gone&#39; was revoked" in refused.text
    signed_in = httpx.post(f"{server.base}/login", data={"token": token(url, "ok", "compliance")})
    assert signed_in.status_code == 303 and signed_in.headers["location"] == "/dashboard"
    cookie = signed_in.headers["set-cookie"]
    assert "HttpOnly" in cookie and "SameSite=strict" in cookie


@pytest.mark.slow
def test_the_status_page_renders_a_message_as_text_without_a_token(served: tuple[Server, str]) -> None:
    from datetime import timedelta

    from dr_orchestrator.evidence import incidents
    from dr_orchestrator.evidence.database import session_factory_for
    from dr_orchestrator.model.events import utcnow

    server, url = served
    with session_factory_for(url)() as session, session.begin():
        incident_id = incidents.open_or_update_incident(
            session, target_kind="service", target_name="trading", impact_start=utcnow() - timedelta(seconds=5),
            detected_at=utcnow(), source="watch", level="serious", title="trading down", actor="dr watch", labels={})
        incidents.say(session, incident_id, "<script>document.title = 'ran'</script>Trading is down.", "erin",
                      utcnow())
    shown = chromium("--virtual-time-budget=2000", "--dump-dom", f"{server.base}/status")
    assert shown.returncode == 0, shown.stderr[-2000:]
    dom = shown.stdout
    assert "<title>Service status</title>" in dom  # the message's script never ran
    assert "&lt;script&gt;document.title = 'ran'&lt;/script&gt;Trading is down." in dom
    assert re.search(r'<td>trading</td><td class="outage">outage</td>', dom)
