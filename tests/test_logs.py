"""Structured logs (`dr --log-format json`): one JSON object per line, with the run, incident and step
ids, tracebacks, and no secret the redactor knows."""

from __future__ import annotations

import io
import json
import logging
import os
import signal
import subprocess
import sys
from collections.abc import Iterator
from datetime import datetime
from pathlib import Path
from typing import Any

import pytest
from click.testing import CliRunner
from support.waiting import wait_for

from dr_orchestrator import secrets
from dr_orchestrator.actions import default_registry
from dr_orchestrator.actions.base import Action, ActionContext, ActionError, ActionResult, Params
from dr_orchestrator.cli import cli
from dr_orchestrator.engine import Engine
from dr_orchestrator.evidence import migrate
from dr_orchestrator.logs import JsonFormatter
from dr_orchestrator.plans import build_plan

SECRET = 'logged-s3cret "quoted"/+='
INVENTORY = """\
all:
  vars:
    dr:
      name: logs-test
      sites: {primary: {}, backup: {}}
      services:
        quotation: {rto: 30s, rpo: 60s, sites: [primary, backup]}
  children:
    primary: {hosts: {p1: {ansible_host: 127.0.0.1}}}
    backup: {hosts: {b1: {ansible_host: 127.0.0.1}}}
"""


def lines_of(text: str) -> list[dict[str, Any]]:
    """Every line parsed as a JSON object (json.loads fails the test on any other line)."""
    parsed = [json.loads(line) for line in text.splitlines() if line.strip()]
    assert all(isinstance(entry, dict) for entry in parsed)
    return parsed


@pytest.fixture
def json_log() -> Iterator[io.StringIO]:
    """What the project's loggers write, as the JSON formatter writes it."""
    stream = io.StringIO()
    handler = logging.StreamHandler(stream)
    handler.setFormatter(JsonFormatter())
    logger = logging.getLogger("dr_orchestrator")
    previous = logger.level
    logger.addHandler(handler)
    logger.setLevel(logging.INFO)
    try:
        yield stream
    finally:
        logger.removeHandler(handler)
        logger.setLevel(previous)


def test_a_record_is_one_json_object_with_time_level_logger_and_message(json_log: io.StringIO) -> None:
    logging.getLogger("dr_orchestrator.test").info("hello %s", "world")
    (entry,) = lines_of(json_log.getvalue())
    assert entry.keys() == {"time", "level", "logger", "message"}
    assert (entry["level"], entry["logger"], entry["message"]) == ("INFO", "dr_orchestrator.test", "hello world")
    assert entry["time"].endswith("Z") and len(entry["time"]) == len("2026-01-01T00:00:00.000Z")
    assert datetime.fromisoformat(entry["time"]).utcoffset() is not None


def test_ids_given_as_extra_are_fields_and_unknown_ones_are_left_out(json_log: io.StringIO) -> None:
    log = logging.getLogger("dr_orchestrator.test")
    log.warning("step ended", extra={"run_id": "r-1", "incident_id": "i-2", "step_id": "s-3"})
    log.warning("run ended", extra={"run_id": "r-1", "incident_id": None, "step_id": None})
    step, run = lines_of(json_log.getvalue())
    assert (step["run_id"], step["incident_id"], step["step_id"]) == ("r-1", "i-2", "s-3")
    assert run["run_id"] == "r-1" and "incident_id" not in run and "step_id" not in run


def test_an_exception_is_its_traceback_in_one_line(json_log: io.StringIO) -> None:
    try:
        raise RuntimeError("broken on purpose")
    except RuntimeError:
        logging.getLogger("dr_orchestrator.test").exception("it failed")
    (entry,) = lines_of(json_log.getvalue())
    assert entry["level"] == "ERROR" and entry["message"] == "it failed"
    assert entry["exception"].startswith("Traceback") and "RuntimeError: broken on purpose" in entry["exception"]
    assert len(json_log.getvalue().splitlines()) == 1


def test_extra_fields_are_masked_too() -> None:
    """The record factory masks messages; ``extra`` is set after it, so the formatter masks again."""
    redactor = secrets.Redactor()
    redactor.register(SECRET)
    record = logging.LogRecord("dr_orchestrator.test", logging.INFO, __file__, 1, "token %s", (SECRET,), None)
    record.step_id = f"step-{SECRET}"
    entry = json.loads(JsonFormatter(redactor).format(record))
    assert entry["message"] == "token [REDACTED]" and entry["step_id"] == "step-[REDACTED]"


class TellsParams(Params):
    token: str  # a reference, resolved by the action


class Tells(Action[TellsParams]):
    """Fails with its secret in the error, as a careless tool would."""

    name = "test.tells"
    Params = TellsParams

    def run(self, params: TellsParams, ctx: ActionContext) -> ActionResult:
        raise ActionError(f"refused token {ctx.secret(params.token)}")


def test_a_run_logs_its_steps_with_ids_and_without_the_secret(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch, json_log: io.StringIO) -> None:
    monkeypatch.setenv("DR_TEST_LOG_SECRET", SECRET)
    (tmp_path / "inventory.yml").write_text(INVENTORY)
    (tmp_path / "runbook.yml").write_text(
        "name: telling\nsteps:\n  - id: first\n    action: noop\n"
        "  - id: tell\n    action: test.tells\n    needs: [first]\n    with: {token: env:DR_TEST_LOG_SECRET}\n")
    registry = default_registry()
    registry.register("test.tells", Tells)
    plan = build_plan(str(tmp_path / "runbook.yml"), str(tmp_path / "inventory.yml"), registry=registry)
    plan = plan.model_copy(update={"incident_id": "incident-7"})
    outcome = Engine(registry, []).run(plan, run_id="run-42")
    assert outcome.state == "failed"
    text = json_log.getvalue()
    assert SECRET not in text and json.dumps(SECRET)[1:-1] not in text
    entries = [e for e in lines_of(text) if e["logger"] == "dr_orchestrator.engine.executor"]
    assert all(e["run_id"] == "run-42" and e["incident_id"] == "incident-7" for e in entries)
    steps = {(e.get("step_id"), e["message"].split()[-1]) for e in entries}
    assert {("first", "started"), ("first", "succeeded"), ("tell", "started")} <= steps
    (told,) = [e for e in entries if e.get("step_id") == "tell" and "failed" in e["message"]]
    assert told["message"] == "step tell failed: refused token [REDACTED]"
    assert entries[0]["message"] == "run run-42 started: telling (failover)" and "step_id" not in entries[0]
    assert entries[-1]["message"].startswith("run run-42 failed")


@pytest.mark.slow
def test_the_scheduler_logs_only_json_in_json_format(tmp_path: Path) -> None:
    database = f"sqlite:///{tmp_path / 'evidence.db'}"
    migrate.upgrade(database)
    (tmp_path / "drills").mkdir()
    stdout, stderr = tmp_path / "stdout", tmp_path / "stderr"
    env = {key: value for key, value in os.environ.items() if key != "DR_LOG_FORMAT"}
    with stdout.open("w") as out, stderr.open("w") as err:
        process = subprocess.Popen(
            [sys.executable, "-m", "dr_orchestrator.cli", "--log-format", "json", "scheduler", "run",
             "--drills", str(tmp_path / "drills"), "--retry", "0.3s"],
            env={**env, "DR_DATABASE_URL": database}, stdout=out, stderr=err)
    try:
        wait_for(lambda: "leader on" in stderr.read_text(), 60, "the scheduler to lead")
        process.send_signal(signal.SIGTERM)
        assert process.wait(timeout=60) == 0
    finally:
        if process.poll() is None:
            process.kill()
            process.wait(timeout=30)
    assert stdout.read_text() == ""
    entries = lines_of(stderr.read_text())
    messages = [entry["message"] for entry in entries]
    assert any(message.startswith("leader on") for message in messages)
    assert messages[-1] == "scheduler stopped"
    assert all({"time", "level", "logger", "message"} <= entry.keys() for entry in entries)


@pytest.mark.parametrize("how", ["option", "environment"])
def test_an_unknown_log_format_is_a_usage_error(how: str) -> None:
    args = ["--log-format", "xml"] if how == "option" else []
    result = CliRunner().invoke(cli, [*args, "scheduler", "run"], env={"DR_LOG_FORMAT": "xml"})
    assert result.exit_code == 2
    assert "Invalid value for '--log-format': 'xml' is not one of 'text', 'json'." in result.output


@pytest.mark.slow
def test_dr_run_in_json_logs_its_steps_figures_and_refusals_as_json_only(tmp_path: Path) -> None:
    database = f"sqlite:///{tmp_path / 'evidence.db'}"
    migrate.upgrade(database)
    (tmp_path / "inventory.yml").write_text(INVENTORY)
    (tmp_path / "runbook.yml").write_text(
        "name: marked\nscope: {services: [quotation]}\nsteps:\n"
        "  - id: switch\n    action: noop\n    marks: [service_restored]\n")
    env = {**{k: v for k, v in os.environ.items() if k != "DR_LOG_FORMAT"}, "DR_DATABASE_URL": database}

    def dr_json(*args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run([sys.executable, "-m", "dr_orchestrator.cli", "--log-format", "json", *args],
                              env=env, cwd=tmp_path, capture_output=True, text=True, timeout=120)

    ran = dr_json("run", "runbook.yml", "-i", "inventory.yml")
    assert ran.returncode == 0, ran.stderr
    assert ran.stdout == ""  # no progress, no table: a collector reads only JSON
    entries = lines_of(ran.stderr)
    run_id = entries[0]["run_id"]
    assert all(entry["run_id"] == run_id for entry in entries if entry["logger"] != "dr_orchestrator.cli"
               or "data" in entry)
    steps = {(e.get("step_id"), e["message"].split()[-1]) for e in entries if e.get("step_id")}
    assert {("switch", "started"), ("switch", "succeeded")} <= steps
    (summary,) = [e for e in entries if e.get("data", {}).get("service") == "quotation"]
    figures = summary["data"]
    assert figures["rto_target_s"] == 30 and figures["rpo_target_s"] == 60 and figures["rto_s"] >= 0
    assert summary["message"].endswith("/ target 30.000s met, RPO not measured")  # as the table says it
    assert entries[-1]["message"] == f"run {run_id} succeeded" and entries[-1]["data"]["state"] == "succeeded"

    refused = dr_json("run", "missing.yml", "-i", "inventory.yml")
    assert refused.returncode == 2 and refused.stdout == ""
    (error,) = lines_of(refused.stderr)
    assert error["level"] == "ERROR" and error["data"]["file"] == "missing.yml"
    assert error["message"] == "missing.yml: cannot read the file: No such file or directory"

    unknown = dr_json("run", "runbook.yml", "-i", "inventory.yml", "--failback-of", "no-such-run")
    assert unknown.returncode == 2 and unknown.stdout == ""
    (error,) = lines_of(unknown.stderr)
    assert error["level"] == "ERROR" and "no-such-run" in error["message"]
