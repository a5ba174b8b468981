"""Drills: loading with line-numbered problems, `dr drill run` end to end (fault, failover, checks,
failback, cleanup that always runs), the evidence it leaves, and notifications to a real local
webhook receiver and SMTP server."""

from __future__ import annotations

import hashlib
import hmac
import json
import os
import signal
import subprocess
import sys
import textwrap
from collections.abc import Callable, Iterator
from contextlib import AbstractContextManager
from pathlib import Path

import pytest
from notify_servers import (
    SmtpServer,
    WebhookReceiver,
    free_port,
    start_smtp_server,
    start_webhook_receiver,
)
from sqlalchemy import select
from support.waiting import wait_for

from dr_orchestrator.evidence import drills as records
from dr_orchestrator.evidence import migrate
from dr_orchestrator.evidence.database import session_factory_for
from dr_orchestrator.evidence.models import DrillRun, Notification, Run, StepRecord
from dr_orchestrator.lab.lab import Lab
from dr_orchestrator.yamlsource import LoadError

REPO = Path(__file__).resolve().parent.parent
DRILL_DATA = REPO / "tests" / "data" / "drills"
LOCAL_INVENTORY = REPO / "inventories" / "local.yml"


@pytest.fixture
def evidence_url(tmp_path: Path) -> str:
    url = f"sqlite:///{tmp_path / 'evidence.db'}"
    migrate.upgrade(url)
    return url


@pytest.fixture
def webhook() -> Iterator[WebhookReceiver]:
    receiver, stop = start_webhook_receiver()
    try:
        yield receiver
    finally:
        stop()


@pytest.fixture
def smtp() -> Iterator[SmtpServer]:
    server, stop = start_smtp_server()
    try:
        yield server
    finally:
        stop()


def local_drill(tmp_path: Path, *, fail: bool = False, notify: str = "", cleanup: str = "",
                failover: str | None = None, name: str = "local-quotation-drill") -> Path:
    """A drill of generic actions against inventories/local.yml: the "fault" writes a marker, the
    failover starts a small HTTP service, checks probe it, the failback stops it. ``failover``,
    ``cleanup`` (more cleanup steps) and ``notify`` are YAML blocks put in as written."""
    work = tmp_path / "work"
    work.mkdir(exist_ok=True)
    port = free_port()
    failover = failover or f"""
        runbook:
          path: {DRILL_DATA / 'local-failover.yml'}
          parameters: {{port: {port}, workdir: "{work}", fail: {str(fail).lower()}}}
        """
    parts = [
        f"""
        name: {name}
        description: the quotation service fails at the primary site
        scenario: service_failure
        inventory: {LOCAL_INVENTORY}
        fault:
          description: quotation stops at the primary site
          steps:
            - id: stop-primary
              action: shell.run
              with: {{argv: [touch, "{work}/primary-down"]}}
        """,
        failover,
        f"""
        expectations:
          quotation:
            rto: 30s
            health:
              - id: quotation-answers
                action: http.check
                with: {{url: "http://127.0.0.1:{port}/", consecutive: 2, interval: 50ms, deadline: 5s}}
            data:
              - action: shell.run
                with: {{argv: [test, -f, "{work}/primary-down"]}}
        failback:
          path: {DRILL_DATA / 'local-failback.yml'}
          parameters: {{workdir: "{work}"}}
        schedule: {{cron: "0 2 1 1,4,7,10 *", timezone: Asia/Shanghai}}
        pre_approved: true
        cleanup:
          - id: remove-marker
            action: shell.run
            with: {{argv: [rm, -f, "{work}/primary-down"]}}
        """,
    ]
    text = "".join(textwrap.dedent(part).strip("\n") + "\n" for part in parts)
    if cleanup:  # more items of the cleanup list
        text += textwrap.indent(textwrap.dedent(cleanup).strip("\n"), "  ") + "\n"
    if notify:
        text += textwrap.dedent(notify).strip("\n") + "\n"
    path = tmp_path / f"{name}.yml"
    path.write_text(text)
    return path


def dr(*args: str, db: str, cwd: Path, timeout: float = 120, env: dict[str, str] | None = None
       ) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "dr_orchestrator.cli", *args], cwd=cwd, capture_output=True,
                          text=True, timeout=timeout, env={**os.environ, "DR_DATABASE_URL": db, **(env or {})})


def notify_block(webhook: WebhookReceiver, smtp: SmtpServer, events: str = "") -> str:
    on = f"\n    events: [{events}]" if events else ""
    return f"""
        notify:
          - webhook: {{url: "{webhook.url}", secret: env:DRILL_HOOK_SECRET, attempts: 3, backoff: 0.05}}{on}
          - email: {{to: [dr-team@bank.example], from: dr@bank.example, host: 127.0.0.1, port: {smtp.port},
                     username: drbot, password: env:DRILL_SMTP_PASSWORD, attempts: 3, backoff: 0.05}}{on}
        """


# ---------------------------------------------------------------- loading


def test_a_drill_with_mistakes_lists_every_problem_with_its_line_and_field(tmp_path: Path) -> None:
    path = tmp_path / "bad.yml"
    path.write_text(textwrap.dedent(f"""\
        name: bad
        scenario: earthquake
        inventory: {LOCAL_INVENTORY}
        fault:
          steps:
            - id: kill
              action: lab.kill_site
        runbook: {DRILL_DATA / 'quick-failover.yml'}
        expectations:
          trading:
            rto: soon
        schedule: {{cron: "0 2 31 2 * *  *", timezone: Mars/Olympus}}
        notify:
          - email: {{to: [a@b.example], from: c@d.example, password: hunter2}}
        colour: blue
        """))
    with pytest.raises(LoadError) as caught:
        from dr_orchestrator.drills.load import load_drill

        load_drill(path)
    found = {(p.line, p.field): p.message for p in caught.value.problems}
    assert all(p.file == str(path) for p in caught.value.problems)
    assert "is not a scenario category" in found[(2, "scenario")]
    assert "unknown action 'lab.kill_site'" in found[(7, "fault.steps[0].action")]
    assert "not in inventory" in found[(11, "expectations.trading")]
    assert "is not a duration" in found[(11, "expectations.trading.rto")]
    assert "is not a time zone" in found[(12, "schedule.timezone")]
    assert "by reference only" in found[(14, "notify[0].email.password")]
    assert found[(15, "colour")] == "is not a known field"


def test_cron_fields_and_paths_are_checked(tmp_path: Path) -> None:
    from dr_orchestrator.drills.load import load_drill

    path = tmp_path / "bad-cron.yml"
    path.write_text(textwrap.dedent(f"""\
        name: bad-cron
        scenario: planned_maintenance
        inventory: ../nowhere/inventory.yml
        runbook: {DRILL_DATA / 'quick-failover.yml'}
        schedule: {{cron: "61 2 * * *", timezone: UTC}}
        """))
    with pytest.raises(LoadError) as caught:
        load_drill(path)
    fields = {p.field: p for p in caught.value.problems}
    assert fields["inventory"].line == 3 and "does not exist" in fields["inventory"].message
    assert fields["schedule.cron"].line == 5 and "is not a cron expression" in fields["schedule.cron"].message


def test_the_shipped_drills_load() -> None:
    from dr_orchestrator.drills.load import load_drills

    drills, problems = load_drills(REPO / "failover_tests")
    assert problems == []
    categories = {d.scenario.value for d in drills}
    assert categories == {"site_loss", "service_failure", "cyber_attack", "planned_maintenance"}
    assert all(d.schedule is not None for d in drills)


# ---------------------------------------------------------------- running


@pytest.mark.slow
def test_a_drill_run_in_json_logs_logs_only_json_and_its_verdict_with_the_expectations(
        tmp_path: Path, evidence_url: str) -> None:
    drill = local_drill(tmp_path)
    env = {key: value for key, value in os.environ.items() if key != "DR_LOG_FORMAT"}
    result = subprocess.run([sys.executable, "-m", "dr_orchestrator.cli", "--log-format", "json", "drill", "run",
                             str(drill)], cwd=tmp_path, capture_output=True, text=True, timeout=120,
                            env={**env, "DR_DATABASE_URL": evidence_url})
    assert result.returncode == 0, result.stdout + result.stderr
    assert result.stdout == ""  # no progress and no table: a collector reads only JSON
    entries = [json.loads(line) for line in result.stderr.splitlines()]
    assert {entry["logger"] for entry in entries} >= {"dr_orchestrator.engine.executor", "dr_orchestrator.cli"}
    verdict = entries[-1]
    assert verdict["message"] == f"drill run {verdict['data']['drill_run_id']}: PASSED (finished)"
    assert {(e["kind"], e["met"]) for e in verdict["data"]["expectations"]} >= {("rto", True), ("health", True)}
    run_ids = {entry["run_id"] for entry in entries if "run_id" in entry}
    assert run_ids == set(verdict["data"]["runs"].values())  # every engine record names its run


@pytest.mark.slow
def test_drill_run_end_to_end_passes_records_everything_and_notifies(
        tmp_path: Path, evidence_url: str, webhook: WebhookReceiver, smtp: SmtpServer) -> None:
    webhook.fail_first = 1  # the first delivery is retried
    drill = local_drill(tmp_path, notify=notify_block(webhook, smtp))
    secrets = {"DRILL_HOOK_SECRET": "s3cret", "DRILL_SMTP_PASSWORD": "pa55"}
    result = dr("drill", "run", str(drill), "-o", "json", db=evidence_url, cwd=tmp_path, env=secrets)
    assert result.returncode == 0, result.stdout + result.stderr
    outcome = json.loads(result.stdout)
    assert outcome["verdict"] == "passed" and outcome["cleanup_state"] == "done"
    assert set(outcome["runs"]) == {"fault", "failover", "checks", "failback", "cleanup"}
    kinds = {(e["kind"], e["check_id"]): e for e in outcome["expectations"]}
    assert set(kinds) == {("rto", None), ("health", "quotation-answers"), ("data", "quotation-data-1")}
    assert all(e["met"] for e in outcome["expectations"])
    assert 0 < kinds[("rto", None)]["measured"] < 30

    sessions = session_factory_for(evidence_url)
    with sessions() as session:
        record = session.get_one(DrillRun, outcome["drill_run_id"])
        assert (record.state, record.verdict, record.scenario, record.trigger) == (
            "finished", "passed", "service_failure", "manual")
        assert record.drill_sha256 == hashlib.sha256(drill.read_bytes()).hexdigest()
        runs = {stage: session.get_one(Run, outcome["runs"][stage]) for stage in outcome["runs"]}
        assert all(run.state == "succeeded" for run in runs.values())
        assert runs["failover"].kind == "rehearsal" and runs["failback"].kind == "failback"
        assert runs["failback"].failback_of == runs["failover"].id
        # the fault's end is the failover's incident time, and the drill's
        fault_end = max(s.finished_at for s in records.forward_steps(session, runs["fault"].id).values())
        assert runs["failover"].incident_at == fault_end == record.incident_at
        assert runs["fault"].runbook_path == f"{drill}#fault" and runs["fault"].runbook_text == drill.read_text()

    # started and completed, by webhook and by mail; each delivery is evidence with its time
    calls = webhook.wait_for(2)
    events = [json.loads(c.body)["event"] for c in calls]
    assert events == ["started", "completed"]
    for call in calls:  # the HMAC signature a receiver can check
        expected = hmac.new(b"s3cret", call.headers["X-DR-Timestamp"].encode() + b"." + call.body,
                            hashlib.sha256).hexdigest()
        assert call.headers["X-DR-Signature"] == f"sha256={expected}"
    mails = smtp.wait_for(2)
    assert [m.message["Subject"] for m in mails] == [
        "DR drill local-quotation-drill: started", "DR drill local-quotation-drill: passed"]
    assert mails[0].auth == "\0drbot\0pa55" and mails[0].recipients == ["dr-team@bank.example"]
    with sessions() as session:
        notes = list(session.scalars(select(Notification).order_by(Notification.id)))
    assert {(n.event, n.channel, n.delivered) for n in notes} == {
        ("started", "webhook", True), ("started", "email", True),
        ("completed", "webhook", True), ("completed", "email", True)}
    first_hook = next(n for n in notes if n.channel == "webhook")
    assert first_hook.attempts == 2 and first_hook.tries[0]["ok"] is False
    assert "T0KEN" not in first_hook.target  # the webhook URL's token is not evidence
    shown = dr("drill", "show", outcome["drill_run_id"][:8], db=evidence_url, cwd=tmp_path)
    assert "PASSED" in shown.stdout and "notified completed by email" in shown.stdout


@pytest.mark.slow
def test_a_missed_expectation_fails_the_drill_notifies_and_still_fails_back_and_cleans_up(
        tmp_path: Path, evidence_url: str, webhook: WebhookReceiver) -> None:
    # The failover "succeeds" only in part: the health check of the drill is pointed elsewhere.
    chat, stop_chat = start_webhook_receiver()  # a chat tool, reached through Apprise's JSON webhook
    drill = local_drill(tmp_path, notify=f"""
        notify:
          - webhook: {{url: "{webhook.url}"}}
            events: [expectation_missed, failed]
          - apprise: {{urls: ["{chat.url.replace('http://', 'json://')}"]}}
            events: [failed]
        """)
    text = drill.read_text().replace('url: "http://127.0.0.1:', 'url: "http://127.0.0.1:1', 1)
    served = tmp_path / "served-inventory.yml"  # names where `dr serve` answers, for the notices' links
    served.write_text(Path(LOCAL_INVENTORY).read_text().replace(
        "      vars:\n        workdir: /tmp\n",
        "      vars:\n        workdir: /tmp\n      watch: {base_url: 'https://dr.bank.example/'}\n"))
    text = text.replace(f"inventory: {LOCAL_INVENTORY}", f"inventory: {served}")
    drill.write_text(text.replace("deadline: 5s", "deadline: 300ms"))
    result = dr("drill", "run", str(drill), db=evidence_url, cwd=tmp_path)
    assert result.returncode == 1, result.stdout + result.stderr
    assert "MISSED quotation health quotation-answers" in result.stdout
    assert "cleanup done" in result.stdout
    sessions = session_factory_for(evidence_url)
    with sessions() as session:
        (record,) = records.drill_run_rows(session)
        assert record.verdict == "failed" and record.failback_run_id is not None and record.cleanup_state == "done"
    bodies = [json.loads(c.body) for c in webhook.wait_for(2)]
    assert [body["event"] for body in bodies] == ["expectation_missed", "failed"]
    assert "health quotation-answers" in bodies[0]["text"]
    failed = bodies[1]  # the structured fields beside the text: what a receiver routes and files on
    assert (failed["drill"], failed["drill_run"], failed["verdict"]) == ("local-quotation-drill", record.id, "failed")
    assert failed["runs"]["failover"] == record.failover_run_id and failed["details"] == f"dr drill show {record.id}"
    assert (bodies[0]["severity"], failed["severity"]) == ("warning", "critical")
    assert failed["link"] == f"https://dr.bank.example/api/drill-runs/{record.id}"
    assert failed["report"] == f"https://dr.bank.example/api/runs/{record.failover_run_id}/report"
    quotation = failed["services"]["quotation"]  # its RTO judged against the drill's target, as a receiver files it
    assert quotation["rto_target_s"] == 30 and quotation["rto_met"] is True and quotation["rto_s"] > 0
    (health,) = [e for e in failed["expectations"] if e["kind"] == "health"]
    assert (health["service"], health["check_id"], health["met"]) == ("quotation", "quotation-answers", False)
    try:
        (call,) = chat.wait_for(1)
    finally:
        stop_chat()
    chat_body = json.loads(call.body)
    assert chat_body["title"] == "DR drill local-quotation-drill: failed" and chat_body["verdict"] == "failed"
    assert f"drill_run: {record.id}" in chat_body["message"].splitlines()


@pytest.mark.slow
def test_a_failed_failover_skips_the_failback_but_the_cleanup_runs_and_reports_what_is_left(
        tmp_path: Path, evidence_url: str) -> None:
    drill = local_drill(tmp_path, fail=True, cleanup="""
          - id: restore-primary
            action: fail
            with: {message: the primary would not start}
          - id: after-restore
            action: noop
        """)
    result = dr("drill", "run", str(drill), "-o", "json", db=evidence_url, cwd=tmp_path)
    assert result.returncode == 1, result.stdout + result.stderr
    outcome = json.loads(result.stdout)
    assert "failback" not in outcome["runs"]
    assert outcome["cleanup_state"] == "incomplete"
    # every cleanup step is tried; what did not succeed is what is left
    assert outcome["cleanup_left"] == ["restore-primary (failed)", "after-restore (skipped)"]
    assert "the failover runbook did not succeed: verify-backup failed: " in outcome["error"]  # which step, why
    assert (tmp_path / "work" / "primary-down").exists() is False  # the first cleanup step ran
    # the service the failed failover started is still running: stop it
    pid = (tmp_path / "work" / "backup.pid").read_text().strip()
    os.kill(int(pid), signal.SIGTERM)


@pytest.mark.slow
def test_ctrl_c_during_the_failover_stops_the_drill_and_the_cleanup_still_runs(
        tmp_path: Path, evidence_url: str) -> None:
    drill = local_drill(tmp_path, failover=f"""
        runbook:
          path: {DRILL_DATA / 'quick-failover.yml'}
          parameters: {{hold: 60s}}""")
    process = subprocess.Popen([sys.executable, "-m", "dr_orchestrator.cli", "drill", "run", str(drill)],
                               cwd=tmp_path, env={**os.environ, "DR_DATABASE_URL": evidence_url},
                               stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        sessions = session_factory_for(evidence_url)

        def failover_running() -> bool:
            with sessions() as session:
                rows = records.drill_run_rows(session)
                run = session.get(Run, rows[0].failover_run_id) if rows and rows[0].failover_run_id else None
                return run is not None and run.state == "running"

        wait_for(failover_running, 30, "the failover run to start")
        process.send_signal(signal.SIGINT)
        out, err = process.communicate(timeout=60)
    finally:
        if process.poll() is None:
            process.kill()
            process.wait()
    assert process.returncode == 1, out + err
    with sessions() as session:
        (record,) = records.drill_run_rows(session)
        assert (record.state, record.verdict, record.cleanup_state) == ("aborted", "failed", "done")
        assert session.get_one(Run, record.failover_run_id).state == "aborted"
        assert session.get_one(Run, record.cleanup_run_id).state == "succeeded"
        assert record.failback_run_id is None
    assert not (tmp_path / "work" / "primary-down").exists()


@pytest.mark.slow
def test_notifications_that_cannot_be_delivered_are_recorded_and_do_not_fail_the_drill(
        tmp_path: Path, evidence_url: str) -> None:
    dead = free_port()
    drill = local_drill(tmp_path, notify=f"""
        notify:
          - webhook: {{url: "http://127.0.0.1:{dead}/hook", attempts: 2, backoff: 0.05, timeout: 1}}
            events: [started]
          - email: {{to: [x@bank.example], from: dr@bank.example, host: 127.0.0.1, port: {dead}, attempts: 2,
                     backoff: 0.05, timeout: 1}}
            events: [completed]
          - apprise: {{urls: ["json://127.0.0.1:{dead}/hooks/T0KEN"], attempts: 2, backoff: 0.05, timeout: 1}}
            events: [completed]
        """)
    result = dr("drill", "run", str(drill), db=evidence_url, cwd=tmp_path)
    assert result.returncode == 0, result.stdout + result.stderr
    with session_factory_for(evidence_url)() as session:
        notes = list(session.scalars(select(Notification).order_by(Notification.id)))
    assert [(n.event, n.channel, n.delivered, n.attempts) for n in notes] == [
        ("started", "webhook", False, 2), ("completed", "email", False, 2), ("completed", "apprise", False, 2)]
    assert all(n.at is not None and n.detail for n in notes)
    assert "Connection error" in notes[2].detail and "T0KEN" not in notes[2].detail + notes[2].target
    assert "PASSED" in result.stdout and f"NOT DELIVERED ({notes[2].detail})" in result.stdout  # next to the verdict
    shown = dr("drill", "show", notes[2].drill_run_id, db=evidence_url, cwd=tmp_path)
    assert f"NOT DELIVERED ({notes[2].detail})" in shown.stdout  # the reason, next to the verdict


def test_a_drill_already_running_is_not_started_twice(tmp_path: Path, evidence_url: str) -> None:
    drill = local_drill(tmp_path)
    sessions = session_factory_for(evidence_url)
    records.start_drill_run(sessions, records.DrillRunStart(
        "d1", "local-quotation-drill", "service_failure", "manual", None, "me", "elsewhere", str(drill), "x", "", ""))
    result = dr("drill", "run", str(drill), db=evidence_url, cwd=tmp_path)
    assert result.returncode == 2
    assert "is already running (drill run d1" in result.stderr


def test_drill_runs_left_running_by_a_dead_process_are_closed_as_interrupted(evidence_url: str) -> None:
    sessions = session_factory_for(evidence_url)
    dead = subprocess.Popen(["true"])
    dead.wait()
    records.start_drill_run(sessions, records.DrillRunStart(
        "crashed", "d", "site_loss", "schedule", None, "scheduler", "this-host", "d.yml", "x", "", ""))
    records.start_drill_run(sessions, records.DrillRunStart(
        "alive", "e", "site_loss", "schedule", None, "scheduler", "other-host", "e.yml", "x", "", ""))
    with records.writing(sessions) as session:
        session.get_one(DrillRun, "crashed").pid = dead.pid
    closed = records.close_interrupted(sessions, "this-host", stale_after=120)
    assert closed == ["crashed"]
    with sessions() as session:
        crashed = session.get_one(DrillRun, "crashed")
        assert (crashed.state, crashed.verdict, crashed.cleanup_state) == ("interrupted", "failed", "incomplete")
        assert f"process {dead.pid} on this-host died" in (crashed.error or "")
        assert session.get_one(DrillRun, "alive").state == "running"  # its heartbeat is fresh
    # a node that stopped beating (another host) is closed once the heartbeat is stale
    assert records.close_interrupted(sessions, "this-host", stale_after=0) == ["alive"]


# ---------------------------------------------------------------- notify.* as runbook steps


@pytest.mark.slow
def test_notify_actions_as_runbook_steps_deliver_and_leave_evidence(
        tmp_path: Path, evidence_url: str, webhook: WebhookReceiver, smtp: SmtpServer) -> None:
    runbook = tmp_path / "notice.yml"
    runbook.write_text(textwrap.dedent(f"""\
        name: customer-notice
        kind: rehearsal
        scope: {{services: [quotation]}}
        steps:
          - id: chat
            action: notify.webhook
            with: {{url: env:HOOK_URL, text: "quotation moves to the backup site", payload: {{channel: "#dr"}}}}
            needs: []
          - id: mail
            action: notify.email
            with:
              to: [clients@bank.example]
              from: dr@bank.example
              subject: "Quotation service notice"
              body: "Quotes come from the backup site for now."
              host: 127.0.0.1
              port: {smtp.port}
            needs: []
        """))
    smtp.fail_first = 1
    result = subprocess.run([sys.executable, "-m", "dr_orchestrator.cli", "run", str(runbook), "-i",
                             str(LOCAL_INVENTORY), "-q"], cwd=tmp_path, capture_output=True, text=True, timeout=60,
                            env={**os.environ, "DR_DATABASE_URL": evidence_url, "HOOK_URL": webhook.url})
    assert result.returncode == 0, result.stdout + result.stderr
    (call,) = webhook.wait_for(1)
    assert json.loads(call.body) == {"text": "quotation moves to the backup site", "channel": "#dr"}
    (mail,) = smtp.wait_for(1)
    assert mail.message["Subject"] == "Quotation service notice"
    assert "backup site" in mail.message.get_payload()
    with session_factory_for(evidence_url)() as session:
        from dr_orchestrator.evidence.models import ActionEventRecord

        reported = {e.step_id: e.data for e in session.scalars(select(ActionEventRecord))}
    # the URL came by reference and its path (an incoming webhook's token) is not evidence
    assert reported["chat"]["delivered"] is True and reported["chat"]["target"] == f"http://127.0.0.1:{webhook.port}/…"
    assert reported["mail"]["delivered"] is True and reported["mail"]["attempts"] == 2


# ---------------------------------------------------------------- against the lab


def lab_dr(lab: Lab, *args: str, db: str, cwd: Path, timeout: float = 600) -> subprocess.CompletedProcess[str]:
    """`dr` with the lab's own inventory and `dr` on PATH (the drills' faults are `dr lab ...`)."""
    path = f"{Path(sys.executable).parent}:{os.environ.get('PATH', '')}"
    return subprocess.run([sys.executable, "-m", "dr_orchestrator.cli", *args], cwd=cwd, capture_output=True,
                          text=True, timeout=timeout, env={**os.environ, "DR_DATABASE_URL": db, "PATH": path})


@pytest.mark.lab
@pytest.mark.slow
def test_every_shipped_drill_passes_against_the_lab(
        lab_factory: Callable[..., AbstractContextManager[Lab]], tmp_path: Path, evidence_url: str) -> None:
    """The four shipped drills, one after the other on one lab: each leaves it as it found it."""
    with lab_factory() as lab:
        outcomes = {}
        for name in ("quotation-service-failure", "cyber-attack-trading", "quarterly-site-failover",
                     "monthly-switchover"):
            result = lab_dr(lab, "drill", "run", str(REPO / "failover_tests" / f"{name}.yml"), "--inventory",
                            str(lab.config.inventory_path), "-o", "json", db=evidence_url, cwd=tmp_path)
            assert result.returncode == 0, f"{name}: {result.stdout}{result.stderr}"
            outcomes[name] = json.loads(result.stdout)
            assert outcomes[name]["verdict"] == "passed" and outcomes[name]["cleanup_state"] == "done"
            assert lab.status()["healthy"], name
    measured = {(name, e["service"], e["kind"], e["check_id"]): e
                for name, outcome in outcomes.items() for e in outcome["expectations"]}
    # one service: its RTO from the kill of its process
    assert 0 < measured[("quotation-service-failure", "quotation", "rto", None)]["measured"] <= 30
    # cyber attack: restored to just before the attack; the order placed before it is back
    cyber_rpo = measured[("cyber-attack-trading", "trading", "restore_point", None)]
    assert 0 <= cyber_rpo["measured"] <= 5 and "heartbeat" in cyber_rpo["detail"]
    assert measured[("cyber-attack-trading", "trading", "data", "canary-order-restored")]["met"]
    # site loss: trading replicates synchronously to its own standby, nothing acknowledged is lost
    assert measured[("quarterly-site-failover", "trading", "rpo", None)]["measured"] == 0
    assert measured[("quarterly-site-failover", "trading", "data", "canary-order-survived")]["met"]
    # planned switchover: RPO 0 proven by WAL positions
    assert "LSN equality" in measured[("monthly-switchover", "trading", "rpo", None)]["detail"]
    with session_factory_for(evidence_url)() as session:
        for outcome in outcomes.values():
            record = session.get_one(DrillRun, outcome["drill_run_id"])
            failover = session.get_one(Run, record.failover_run_id)
            assert failover.kind == "rehearsal" and failover.state == "succeeded"
            if record.fault_run_id is not None:  # the fault's time is the failover's incident time
                assert failover.incident_at == record.incident_at is not None
        # a kill's incident time is the SIGKILL that `dr lab` printed, before its command ended
        for name, step_id in (("quarterly-site-failover", "power-loss"), ("quotation-service-failure",
                                                                           "kill-quotation")):
            record = session.get_one(DrillRun, outcomes[name]["drill_run_id"])
            kill = session.scalars(select(StepRecord).where(StepRecord.run_id == record.fault_run_id,
                                                            StepRecord.step_id == step_id)).one()
            assert kill.started_at < record.incident_at < kill.finished_at, name
