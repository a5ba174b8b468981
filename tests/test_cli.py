"""The `dr` command as users run it: a real process, a real evidence database, exit codes."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
import uuid
from datetime import UTC, datetime, timedelta, timezone
from pathlib import Path
from typing import Any

import pytest

REPO = Path(__file__).resolve().parent.parent
DATA = Path(__file__).resolve().parent / "data"
LOCAL_INVENTORY = str(REPO / "inventories" / "local.yml")


def dr(*args: str, db: str, cwd: Path, check: bool = False) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "DR_DATABASE_URL": db}
    result = subprocess.run([sys.executable, "-m", "dr_orchestrator.cli", *args], cwd=cwd, env=env,
                            capture_output=True, text=True, timeout=120)
    if check and result.returncode != 0:
        raise AssertionError(f"dr {' '.join(args)} exited {result.returncode}:\n{result.stdout}\n{result.stderr}")
    return result


@pytest.fixture
def migrated(database_url: str, tmp_path: Path) -> str:
    dr("db", "upgrade", db=database_url, cwd=tmp_path, check=True)
    return database_url


@pytest.mark.slow
def test_run_with_mixed_outcomes_records_exactly_what_happened(migrated: str, tmp_path: Path) -> None:
    counter = tmp_path / "attempts"
    result = dr("run", str(DATA / "mixed-outcomes.yml"), "-i", LOCAL_INVENTORY, "-p", f"counter={counter}",
                db=migrated, cwd=tmp_path)
    assert result.returncode == 1, result.stdout + result.stderr  # failed, after rollback

    run_id = json.loads(dr("runs", "list", "-o", "json", db=migrated, cwd=tmp_path, check=True).stdout)[0]["id"]
    detail = json.loads(dr("runs", "show", run_id, "-o", "json", db=migrated, cwd=tmp_path, check=True).stdout)
    assert detail["run"]["state"] == "failed"
    assert detail["run"]["kind"] == "rehearsal"
    states = {(s["step_id"], s["phase"]): s["state"] for s in detail["steps"]}
    assert states == {
        ("prepare", "forward"): "succeeded",
        ("flaky", "forward"): "succeeded",
        ("slow", "forward"): "timed_out",
        ("after-slow", "forward"): "skipped",
        ("switch", "forward"): "succeeded",
        ("switch", "rollback"): "rolled_back",
        ("break", "forward"): "failed",
        ("never", "forward"): "skipped",  # its need failed
    }
    by_step = {(s["step_id"], s["phase"]): s for s in detail["steps"]}
    flaky_attempts = by_step[("flaky", "forward")]["attempts"]
    assert [a["state"] for a in flaky_attempts] == ["failed", "failed", "succeeded"]
    assert counter.read_text().strip() == "3"
    assert [a["state"] for a in by_step[("slow", "forward")]["attempts"]] == ["timed_out"]
    assert "timed out after 0.3s" in by_step[("slow", "forward")]["error"]
    assert "the backup refused the change" in by_step[("break", "forward")]["error"]
    assert by_step[("after-slow", "forward")]["attempts"] == []
    # The parallel branches overlapped: the slow step started before the flaky one finished.
    slow_start = by_step[("slow", "forward")]["started_at"]
    flaky_end = by_step[("flaky", "forward")]["finished_at"]
    assert slow_start < flaky_end
    # Rollback happened after the failure, and every step ended.
    assert by_step[("switch", "rollback")]["started_at"] >= by_step[("break", "forward")]["finished_at"]
    assert all(s["finished_at"] for s in detail["steps"])


def test_validate_reports_every_problem_with_lines(tmp_path: Path) -> None:
    result = dr("validate", str(DATA / "five-mistakes.yml"), "-i", LOCAL_INVENTORY, "-o", "json",
                db="sqlite:///unused.db", cwd=tmp_path)
    assert result.returncode == 2
    problems = json.loads(result.stdout)["problems"]
    found = {(p["line"], p["message"].split(" ")[0]) for p in problems}
    messages = " | ".join(f"{p['line']}: {p['field']}: {p['message']}" for p in problems)
    assert len(problems) == 5, messages
    assert any("unknown action 'ssh.runn'" in p["message"] and p["line"] == 9 for p in problems), messages
    assert any("missing required parameter 'url'" in p["message"] and p["line"] == 14 for p in problems), messages
    assert any("used twice" in p["message"] and p["line"] == 15 for p in problems), messages
    assert any("cycle" in p["message"] for p in problems), messages
    assert any("params.target_site" in p["message"] and p["line"] == 23 for p in problems), messages
    assert found


def test_validate_clean_runbook_exits_zero(tmp_path: Path) -> None:
    result = dr("validate", str(REPO / "runbooks" / "example-local.yml"), "-i", LOCAL_INVENTORY,
                db="sqlite:///unused.db", cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    assert "valid" in result.stdout


def test_plan_shows_parallel_groups_and_rendered_templates(tmp_path: Path) -> None:
    result = dr("plan", str(REPO / "runbooks" / "example-local.yml"), "-i", LOCAL_INVENTORY, "-p", "port=18999",
                "-o", "json", db="sqlite:///unused.db", cwd=tmp_path, check=True)
    plan = json.loads(result.stdout)
    first = plan["groups"][0]
    assert first["parallel"] is True
    assert {s["id"] for s in first["steps"]} == {"check-primary", "start-backup"}
    verify = plan["groups"][1]["steps"][0]
    assert verify["with"]["url"] == "http://127.0.0.1:18999/"
    assert verify["hosts"] == ["127.0.0.1:18999"]
    assert not (tmp_path / "dr-evidence.db").exists()  # planning runs and records nothing


def test_plan_lists_a_steps_hosts_once(tmp_path: Path) -> None:
    shown = dr("plan", str(REPO / "runbooks" / "failover-trading.yml"), "-i", str(REPO / "inventories" / "lab.yml"),
               db="sqlite:///unused.db", cwd=tmp_path, check=True).stdout
    backup_host = shown[shown.index("   backup-host  [ssh.run]"):shown.index("   front-door  [")]
    assert backup_host.count("backup-app") == 1, backup_host  # its `hosts` parameter, not a summary as well
    verify = dr("plan", str(REPO / "runbooks" / "example-local.yml"), "-i", LOCAL_INVENTORY, "-p", "port=18999",
                db="sqlite:///unused.db", cwd=tmp_path, check=True).stdout
    assert "      hosts: 127.0.0.1:18999\n" in verify  # a URL's host and port: said once, as the summary


SAVED_NOOP = """\
name: saved-noop
kind: failover
scope:
  services: [quotation]
parameters:
  note: {default: first, description: a text}
steps:
  - id: say
    action: noop
    with: {message: "{{ params.note }}"}
"""


@pytest.mark.slow
def test_a_saved_plan_runs_exactly_as_saved_or_is_refused(tmp_path: Path) -> None:
    db = f"sqlite:///{tmp_path / 'evidence.db'}"
    dr("db", "upgrade", db=db, cwd=tmp_path, check=True)
    book, saved = tmp_path / "book.yml", tmp_path / "reviewed.plan"
    book.write_text(SAVED_NOOP)
    dr("plan", str(book), "-i", LOCAL_INVENTORY, "-p", "note=second", "--out", str(saved), db=db, cwd=tmp_path,
       check=True)
    ran = dr("run", "--plan", str(saved), "-q", db=db, cwd=tmp_path)
    assert ran.returncode == 0, ran.stderr
    (listed,) = json.loads(dr("runs", "list", "-o", "json", db=db, cwd=tmp_path, check=True).stdout)
    shown = json.loads(dr("runs", "show", listed["id"], "-o", "json", db=db, cwd=tmp_path, check=True).stdout)
    assert shown["run"]["parameters"] == {"note": "second"}  # the saved parameters, not the runbook's default
    assert shown["run"]["runbook_sha256"] == json.loads(saved.read_text())["runbook"]["sha256"]

    book.write_text(SAVED_NOOP.replace("action: noop", "action: noop\n    timeout: 1s"))  # changed after review
    refused = dr("run", "--plan", str(saved), db=db, cwd=tmp_path)
    assert refused.returncode == 2 and f"the runbook {book} (SHA-256" in refused.stderr, refused.stderr
    assert "save the plan again (dr plan --out)" in refused.stderr
    book.write_text(SAVED_NOOP)
    edited = json.loads(saved.read_text())
    edited["overrides"]["note"] = "third"  # the file itself edited: its digest no longer matches
    saved.write_text(json.dumps(edited))
    tampered = dr("run", "--plan", str(saved), db=db, cwd=tmp_path)
    assert tampered.returncode == 2 and "was edited after it was saved" in tampered.stderr, tampered.stderr
    both = dr("run", str(book), "--plan", str(saved), db=db, cwd=tmp_path)
    assert both.returncode == 2 and "give no RUNBOOK, -i or -p with it" in both.stderr
    assert len(json.loads(dr("runs", "list", "-o", "json", db=db, cwd=tmp_path, check=True).stdout)) == 1


def test_run_refuses_unmigrated_database_in_one_sentence(tmp_path: Path) -> None:
    result = dr("run", str(REPO / "runbooks" / "example-local.yml"), "-i", LOCAL_INVENTORY,
                db=f"sqlite:///{tmp_path}/fresh.db", cwd=tmp_path)
    assert result.returncode == 2
    assert "dr db upgrade" in result.stderr
    assert "Traceback" not in result.stderr


@pytest.mark.slow
def test_export_since_a_time_without_a_zone_takes_it_as_utc(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("TZ", "Asia/Shanghai")  # `dr` runs 8 hours east of UTC: a local reading would show
    db = f"sqlite:///{tmp_path / 'evidence.db'}"
    dr("db", "upgrade", db=db, cwd=tmp_path, check=True)
    runbook = tmp_path / "marked.yml"
    runbook.write_text("name: marked\nscope: {services: [quotation]}\nsteps:\n"
                       "  - id: switch\n    action: noop\n    marks: [service_restored]\n")
    before = datetime.now(UTC) - timedelta(seconds=2)
    dr("run", str(runbook), "-i", LOCAL_INVENTORY, "-q", db=db, cwd=tmp_path, check=True)
    after = datetime.now(UTC) + timedelta(seconds=2)

    def exported(since: str) -> list[Any]:
        return list(json.loads(dr("evidence", "export", "--since", since, db=db, cwd=tmp_path, check=True).stdout))

    zoneless = "%Y-%m-%dT%H:%M:%S"
    assert len(exported(before.strftime(zoneless))) == 1  # UTC, not the machine's zone
    assert exported(after.strftime(zoneless)) == []
    assert len(exported(before.astimezone(timezone(timedelta(hours=8))).isoformat())) == 1  # a zone is honoured
    assert exported((after + timedelta(hours=8)).strftime(zoneless) + "+08:00") == []
    assert len(exported(before.date().isoformat())) == 1  # a date: its midnight UTC
    refused = dr("evidence", "export", "--since", "last week", db=db, cwd=tmp_path)
    assert refused.returncode == 2 and "--since 'last week' is not an ISO-8601 time" in refused.stderr


def test_bad_input_is_a_user_error(tmp_path: Path) -> None:
    bad = tmp_path / "bad.yml"
    bad.write_text("name: x\nsteps:\n  - id: a\n    action: noop\n   oops: [\n")
    result = dr("validate", str(bad), "-i", LOCAL_INVENTORY, db="sqlite:///unused.db", cwd=tmp_path)
    assert result.returncode == 2
    assert f"{bad}:" in result.stderr and "not valid YAML" in result.stderr
    result = dr("run", str(REPO / "runbooks" / "example-local.yml"), "-i", LOCAL_INVENTORY, "-p", "nope=1",
                "--incident-at", "yesterday", db="sqlite:///unused.db", cwd=tmp_path)
    assert result.returncode == 2 and "ISO-8601" in result.stderr


def test_help_is_fast_and_imports_nothing_heavy(tmp_path: Path) -> None:
    code = ("import sys, time; t = time.monotonic(); sys.argv = ['dr', '--help']\n"
            "from dr_orchestrator import cli\n"
            "try:\n    cli.main()\nexcept SystemExit:\n    pass\n"
            "heavy = [m for m in ('boto3', 'ansible_runner', 'fastapi', 'sqlalchemy', 'paramiko', 'pydantic')"
            " if m in sys.modules]\n"
            "print('HEAVY', heavy)")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60, cwd=tmp_path)
    assert "HEAVY []" in result.stdout, result.stdout + result.stderr


@pytest.mark.slow
def test_interrupted_run_ends_aborted_and_nothing_is_left_running(migrated: str, tmp_path: Path) -> None:
    runbook = tmp_path / "long.yml"
    # A command line no other process has: the other database's run of this test may be running too.
    sleep = f"{6061 + uuid.uuid4().int % 100000 / 100000:.5f}"
    runbook.write_text(
        "name: long\nscope: {services: [quotation]}\nsteps:\n"
        "  - id: first\n    action: noop\n"
        f"  - id: long-wait\n    action: shell.run\n    with: {{argv: [sleep, '{sleep}']}}\n    timeout: 120s\n"
        "  - id: never\n    action: noop\n"
    )
    env = {**os.environ, "DR_DATABASE_URL": migrated}
    process = subprocess.Popen([sys.executable, "-m", "dr_orchestrator.cli", "run", str(runbook), "-i",
                                LOCAL_INVENTORY], cwd=tmp_path, env=env, stdout=subprocess.PIPE,
                               stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            listing = dr("runs", "show", "--output", "json", _latest_run(migrated, tmp_path), db=migrated,
                         cwd=tmp_path) if _latest_run(migrated, tmp_path) else None
            if listing and listing.returncode == 0 and any(
                s["step_id"] == "long-wait" and s["state"] == "running" for s in json.loads(listing.stdout)["steps"]
            ):
                break
            time.sleep(0.05)
        else:
            raise AssertionError("the long step never started")
        process.send_signal(2)  # Ctrl-C
        process.wait(timeout=30)
    finally:
        if process.poll() is None:
            process.kill()
            process.wait()
    assert process.returncode == 1
    detail = json.loads(dr("runs", "show", _latest_run(migrated, tmp_path), "-o", "json", db=migrated,
                           cwd=tmp_path, check=True).stdout)
    assert detail["run"]["state"] == "aborted"
    states = {s["step_id"]: s["state"] for s in detail["steps"]}
    assert states == {"first": "succeeded", "long-wait": "cancelled", "never": "cancelled"}
    leftover = subprocess.run(["pgrep", "-f", f"sleep {sleep}"], capture_output=True, text=True)
    assert leftover.stdout.strip() == "", "the step's child process outlived the run"


def _latest_run(db: str, cwd: Path) -> str | None:
    result = dr("runs", "list", "-o", "json", db=db, cwd=cwd)
    if result.returncode != 0:
        return None
    rows = json.loads(result.stdout)
    return rows[0]["id"] if rows else None


@pytest.mark.lab
def test_plan_live_shows_what_serves_each_service_now_and_what_the_run_would_change(lab: Any, tmp_path: Path) -> None:
    """`dr plan --live` probes the lab as the watch does and changes nothing: each service in scope is
    served from the primary site now, and the site failover would move it to the backup site."""
    inventory = str(lab.config.inventory_path)
    db = f"sqlite:///{tmp_path / 'evidence.db'}"
    shown = dr("plan", str(REPO / "runbooks" / "site-failover.yml"), "-i", inventory, "--live", "-o", "json",
               db=db, cwd=tmp_path, check=True)
    live = json.loads(shown.stdout)["live"]
    assert set(live["services"]) == {"trading", "contract-signing", "quotation"}
    for name, state in live["services"].items():
        assert state["served_by"] == "primary" and state["after_run"] == ["backup"], (name, state)
        assert state["change"] == "moves from primary to backup"
        assert state["servers"]["primary"].startswith("ready/") and state["servers"]["backup"].startswith("maint/")
        assert state["stores"]["primary"].endswith("primary (writable)"), state["stores"]
        assert " of primary (" in state["stores"]["backup"], state["stores"]  # a standby or replica of it
    text = dr("plan", str(REPO / "runbooks" / "failover-trading.yml"), "-i", inventory, "--live", db=db, cwd=tmp_path,
              check=True).stdout
    assert "live now (probed at" in text and "   trading: moves from primary to backup" in text
    assert "contract-signing:" not in text.split("live now", 1)[1]  # only the run's scope
    assert lab.status()["stores"]["trading"]["active_site"] == "primary"  # nothing changed
