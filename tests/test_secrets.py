"""Secrets by reference (env:NAME, file:PATH) and their redaction from everything recorded or printed.

The bar: a secret passed by reference never appears in the evidence database (SQLite file bytes, a
PostgreSQL dump), the logs, the reports or the packs, after a run whose actions echo it on stdout,
put it in an error message and in an HTTP probe detail.
"""

from __future__ import annotations

import base64
import html
import json
import logging
import os
import subprocess
import sys
import threading
import zipfile
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any
from urllib.parse import quote, quote_plus

import pytest
from pydantic import Field
from sqlalchemy.engine import make_url

from dr_orchestrator import secrets
from dr_orchestrator.actions import default_registry
from dr_orchestrator.actions.base import Action, ActionContext, ActionError, ActionResult, Params
from dr_orchestrator.engine import Engine
from dr_orchestrator.evidence import migrate
from dr_orchestrator.evidence.database import session_factory_for
from dr_orchestrator.evidence.store import EvidenceStore
from dr_orchestrator.lab.config import PG_BIN
from dr_orchestrator.model.events import Event, Observer, utcnow
from dr_orchestrator.plans import build_plan, describe_plan

REPO = Path(__file__).resolve().parent.parent
# Characters that change under URL, JSON and shell quoting, so each derived form differs.
SECRET = 'Tr0ub4dor&3 "quoted"/slash+plus=<x>'  # ASCII: it travels in an HTTP header
FILE_SECRET = "file-held-password-8f2c1e"


def forms(secret: str, html_too: bool = True) -> list[bytes]:
    """What a leak would look like in bytes: the value, JSON- or HTML-escaped, URL-encoded, base64
    (HTML escaping happens after redaction, in reports: searched for, not registered)."""
    raw = secret.encode()
    found = {raw, json.dumps(secret)[1:-1].encode(), json.dumps(secret, ensure_ascii=False)[1:-1].encode(),
             quote(secret, safe="").encode(), quote_plus(secret).encode(), base64.b64encode(raw),
             base64.b64encode(raw).rstrip(b"=")}
    if html_too:
        found |= {html.escape(secret).encode(), html.escape(secret, False).encode()}
    return sorted(found)


def assert_no_secret(data: bytes, where: str) -> None:
    for secret in (SECRET, FILE_SECRET):
        for form in forms(secret):
            assert form not in data, f"{where} holds the secret (as {form!r})"


# ---------------------------------------------------------------- references


def test_env_and_file_references_resolve_and_name_the_reference_when_missing(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("DR_TEST_TOKEN", "value-one")
    secret_file = tmp_path / "token"
    secret_file.write_text("value-two\n")
    redactor = secrets.Redactor()
    assert redactor.resolve("env:DR_TEST_TOKEN") == "value-one"
    assert redactor.resolve(f"file:{secret_file}") == "value-two"  # the newline is not part of it
    assert redactor.redact("a value-one b value-two") == "a [REDACTED] b [REDACTED]"
    with pytest.raises(secrets.SecretError, match=r"secret env:DR_TEST_UNSET: the environment variable "
                                                  r"DR_TEST_UNSET is not set"):
        redactor.resolve("env:DR_TEST_UNSET")
    with pytest.raises(secrets.SecretError, match=r"cannot read .*nothing-here: No such file"):
        redactor.resolve(f"file:{tmp_path / 'nothing-here'}")
    with pytest.raises(secrets.SecretError, match="not an environment variable name"):
        redactor.resolve("env:$(touch /tmp/x)")
    (tmp_path / "empty").write_text("\n")
    with pytest.raises(secrets.SecretError, match="is empty"):
        redactor.resolve(f"file:{tmp_path / 'empty'}")


def test_derived_forms_and_pem_lines_are_masked_and_untouched_data_is_the_same_object() -> None:
    redactor = secrets.Redactor()
    for secret in (SECRET, "pässwörd-€-ünïcode"):
        redactor.register(secret)
        for form in forms(secret, html_too=False):
            assert redactor.redact(f"<{form.decode()}>") == "<[REDACTED]>", form
    pem = "-----BEGIN KEY-----\nQUJDREVGR0hJSktMTU5PUA==\nUVJTVFVWV1hZWmFiY2RlZg==\n-----END KEY-----"
    redactor.register(pem)
    assert "QUJDREVGR0hJSktMTU5PUA" not in redactor.redact("line: QUJDREVGR0hJSktMTU5PUA==")
    data: dict[str, Any] = {"a": ["x", {"b": 1}], "c": (2, "y")}
    assert redactor.redact_data(data) is data
    leaked = {"out": [f"x {SECRET} y"], SECRET: 1, "n": 2}
    assert redactor.redact_data(leaked) == {"out": ["x [REDACTED] y"], "[REDACTED]": 1, "n": 2}
    assert redactor.redact_bytes(SECRET.encode()) == b"[REDACTED]"


def test_a_run_redactor_masks_what_the_process_knows_and_registers_there() -> None:
    run = secrets.Redactor(parent=secrets.PROCESS)
    run.register("only-known-to-this-run-5521")
    assert secrets.redact("x only-known-to-this-run-5521") == "x [REDACTED]"


def test_log_records_of_any_logger_are_masked(tmp_path: Path) -> None:
    secrets.install_log_redaction()
    secrets.PROCESS.register("logged-secret-31337")
    handler = logging.FileHandler(tmp_path / "log.txt")
    handler.setFormatter(logging.Formatter("%(name)s %(message)s"))
    library = logging.getLogger("paramiko.transport")  # a library's logger, not ours
    library.addHandler(handler)
    library.setLevel(logging.INFO)
    try:
        library.info("auth with %s", "logged-secret-31337")
        try:
            raise RuntimeError("refused logged-secret-31337")
        except RuntimeError:
            library.exception("failed")
    finally:
        library.removeHandler(handler)
        handler.close()
    text = (tmp_path / "log.txt").read_text()
    assert "logged-secret-31337" not in text
    assert "auth with [REDACTED]" in text and "RuntimeError: refused [REDACTED]" in text


# ---------------------------------------------------------------- the bar


class _EchoHandler(BaseHTTPRequestHandler):
    """Answers with the X-Token header it received, in a JSON body the check does not expect."""

    def do_GET(self) -> None:  # noqa: N802 - http.server's naming
        body = json.dumps({"token": self.headers.get("X-Token", "")}).encode()
        self.send_response(200)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, format: str, *args: Any) -> None:  # noqa: A002 - http.server's signature
        pass


@pytest.fixture
def echo_server() -> Iterator[str]:
    server = ThreadingHTTPServer(("127.0.0.1", 0), _EchoHandler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}/echo"
    finally:
        server.shutdown()
        server.server_close()


INVENTORY = """\
all:
  vars:
    dr:
      name: secrets-test
      sites: {primary: {}, backup: {}}
      services:
        quotation: {rto: 30s, rpo: 60s, sites: [primary, backup]}
      vars:
        token_ref: env:DR_TEST_SECRET
  children:
    primary: {hosts: {p1: {ansible_host: 127.0.0.1}}}
    backup: {hosts: {b1: {ansible_host: 127.0.0.1}}}
"""

RUNBOOK = """\
name: leaky
kind: rehearsal
scope: {services: [quotation]}
parameters:
  url: {required: true}
  secret_file: {required: true}
steps:
  - id: echo-it
    action: shell.run
    with:
      shell: true
      env: {TOKEN: "{{ vars.token_ref }}", FILE_TOKEN: "file:{{ params.secret_file }}"}
      command: >-
        printf '%s\\n' "stdout $TOKEN";
        printf '%s' "$TOKEN" | base64;
        python3 -c 'import os, urllib.parse; print(urllib.parse.quote(os.environ["TOKEN"], safe=""))';
        printf '%s\\n' "file $FILE_TOKEN"
    needs: []
    on_failure: continue
  - id: error-with-it
    action: shell.run
    with:
      shell: true
      env: {TOKEN: env:DR_TEST_SECRET}
      command: >-
        printf '%s\\n' "refused: $TOKEN" >&2; exit 3
    needs: []
    on_failure: continue
  - id: probe-with-it
    action: http.check
    with:
      url: "{{ params.url }}"
      headers: {X-Token: env:DR_TEST_SECRET}
      expect_json: {token: nothing}
      consecutive: 1
      interval: 50ms
      deadline: 300ms
    needs: []
    on_failure: continue
  - id: reads-output
    action: shell.run
    with:
      argv: [echo, "{{ steps['echo-it'].output.stdout }}"]
    needs: [echo-it]
    on_failure: continue
"""


@pytest.fixture
def leaky_files(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, echo_server: str) -> dict[str, Any]:
    monkeypatch.setenv("DR_TEST_SECRET", SECRET)
    secret_file = tmp_path / "file-secret"
    secret_file.write_text(FILE_SECRET + "\n")
    (tmp_path / "inventory.yml").write_text(INVENTORY)
    (tmp_path / "runbook.yml").write_text(RUNBOOK)
    return {"runbook": str(tmp_path / "runbook.yml"), "inventory": str(tmp_path / "inventory.yml"),
            "params": [f"url={echo_server}", f"secret_file={secret_file}"]}


def dr(*args: str, db: str, cwd: Path) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "DR_DATABASE_URL": db}
    return subprocess.run([sys.executable, "-m", "dr_orchestrator.cli", *args], cwd=cwd, env=env,
                          capture_output=True, text=True, timeout=120)


def database_bytes(url: str) -> bytes:
    """Every byte the database holds: the SQLite files, or a plain pg_dump."""
    parsed = make_url(url)
    if parsed.get_backend_name() == "sqlite":
        path = Path(str(parsed.database))
        found = [p for p in path.parent.glob(path.name + "*")]  # with -wal, -shm and the lock files
        files = [f for p in found for f in ([p] if p.is_file() else p.rglob("*")) if f.is_file()]
        return b"".join(f.read_bytes() for f in files)
    conninfo = parsed.set(drivername="postgresql").render_as_string(hide_password=False)
    dump = subprocess.run([str(PG_BIN / "pg_dump"), "--dbname", conninfo], capture_output=True, check=True)
    assert b"CREATE TABLE public.runs" in dump.stdout
    return dump.stdout


@pytest.mark.slow
def test_a_secret_passed_by_reference_is_in_no_record_log_report_or_pack(
        leaky_files: dict[str, Any], database_url: str, tmp_path: Path) -> None:
    assert dr("db", "upgrade", db=database_url, cwd=tmp_path).returncode == 0
    params = [arg for p in leaky_files["params"] for arg in ("-p", p)]
    planned = dr("plan", leaky_files["runbook"], "-i", leaky_files["inventory"], *params, "-o", "json",
                 db=database_url, cwd=tmp_path)
    assert planned.returncode == 0, planned.stderr
    assert "env:DR_TEST_SECRET" in planned.stdout  # the plan shows the reference, not the value
    ran = dr("run", leaky_files["runbook"], "-i", leaky_files["inventory"], *params, db=database_url, cwd=tmp_path)
    assert ran.returncode == 0, ran.stdout + ran.stderr  # two steps fail on purpose, and may
    for name, text in (("plan output", planned.stdout), ("run stdout", ran.stdout), ("run stderr", ran.stderr)):
        assert_no_secret(text.encode(), name)

    run_id = json.loads(dr("runs", "list", "-o", "json", db=database_url, cwd=tmp_path).stdout)[0]["id"]
    shown = dr("runs", "show", run_id, "-o", "json", db=database_url, cwd=tmp_path)
    detail = json.loads(shown.stdout)
    steps = {s["step_id"]: s for s in detail["steps"]}
    # The actions did leak it: each place shows the mask where the secret was.
    assert steps["echo-it"]["state"] == "succeeded"
    stdout = steps["echo-it"]["output"]["stdout"]
    assert stdout.count("[REDACTED]") == 4 and "stdout [REDACTED]" in stdout and "file [REDACTED]" in stdout
    assert "refused: [REDACTED]" in steps["error-with-it"]["error"]
    assert "[REDACTED]" in steps["probe-with-it"]["error"]
    assert "[REDACTED]" in steps["reads-output"]["output"]["stdout"]  # templates read the masked output
    assert steps["echo-it"]["rendered"]["env"]["TOKEN"] == "env:DR_TEST_SECRET"  # the reference is kept

    exported = dr("evidence", "export", "--format", "json", db=database_url, cwd=tmp_path)
    report = tmp_path / "report.html"
    reported = dr("report", "run", run_id, "--out", str(report), db=database_url, cwd=tmp_path)
    assert reported.returncode == 0, reported.stderr
    keys = tmp_path / "keys"
    assert dr("evidence", "keygen", "--out", str(keys), db=database_url, cwd=tmp_path).returncode == 0
    private = next(p for p in keys.iterdir() if p.suffix == ".key")
    pack = tmp_path / "pack.zip"
    packed = dr("evidence", "pack", "--run", run_id, "--out", str(pack), "--signing-key", f"file:{private}",
                db=database_url, cwd=tmp_path)
    assert packed.returncode == 0, packed.stderr

    assert_no_secret(shown.stdout.encode(), "runs show")
    assert_no_secret(exported.stdout.encode(), "evidence export")
    assert_no_secret(report.read_bytes(), "the run's report")
    assert "[REDACTED]" in report.read_text()
    assert_no_secret(pack.read_bytes(), "the pack's zip")
    with zipfile.ZipFile(pack) as archive:
        assert archive.namelist()
        for member in archive.namelist():
            assert_no_secret(archive.read(member), f"pack member {member}")
    assert_no_secret(database_bytes(database_url), "the evidence database")


def recorder(seen: list[Event]) -> Observer:
    def record(event: Event) -> None:
        seen.append(event)

    return record


class LeakyParams(Params):
    token: str = Field(json_schema_extra={"secret": True})
    other: str


class Leaky(Action[LeakyParams]):
    """Leaks its secrets every way an action can: report, measurement, probe, log, exception."""

    name = "test.leaky"
    Params = LeakyParams

    def run(self, params: LeakyParams, ctx: ActionContext) -> ActionResult:
        other = ctx.secret(params.other)
        ctx.report("called", token=params.token, nested={"list": [other]})
        ctx.measure("rpo_s", 0.0, f"from {params.token}", {"raw": params.token, other: other})
        ctx.probe(f"http://x/{params.token}", False, utcnow(), 1.0, f"detail {other}")
        logging.getLogger("dr_orchestrator.test").warning("token is %s and %s", params.token, other)
        raise ActionError(f"refused {params.token!r} and {other}")


def test_engine_masks_every_event_kind_and_the_logs(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture) -> None:
    monkeypatch.setenv("DR_TEST_SECRET", SECRET)
    (tmp_path / "other").write_text(FILE_SECRET)
    (tmp_path / "inventory.yml").write_text(INVENTORY)
    (tmp_path / "runbook.yml").write_text(
        "name: leaky\nsteps:\n  - id: leak\n    action: test.leaky\n"
        f"    with: {{token: env:DR_TEST_SECRET, other: 'file:{tmp_path / 'other'}'}}\n")
    registry = default_registry()
    registry.register("test.leaky", Leaky)
    plan = build_plan(str(tmp_path / "runbook.yml"), str(tmp_path / "inventory.yml"), registry=registry)
    assert_no_secret(json.dumps(describe_plan(plan, registry), default=str).encode(), "dr plan")
    url = f"sqlite:///{tmp_path / 'evidence.db'}"
    migrate.upgrade(url)
    seen: list[Event] = []
    caplog.set_level(logging.INFO)
    outcome = Engine(registry, [EvidenceStore(session_factory_for(url)), recorder(seen)]).run(plan)
    assert outcome.state == "failed"
    assert outcome.error is None or "[REDACTED]" not in outcome.error
    kinds = {type(event).__name__ for event in seen}
    assert {"ActionEvent", "Measurement", "ProbeResult", "AttemptFinished", "StepFinished"} <= kinds
    text = repr(seen)
    assert_no_secret(text.encode(), "the events")
    assert text.count("[REDACTED]") >= 8
    assert_no_secret(caplog.text.encode(), "the log")
    assert "token is [REDACTED] and [REDACTED]" in caplog.text
    assert_no_secret(database_bytes(url), "the evidence database")


def test_a_missing_secret_fails_the_step_naming_the_reference(tmp_path: Path) -> None:
    (tmp_path / "inventory.yml").write_text(INVENTORY)
    (tmp_path / "runbook.yml").write_text(
        "name: missing\nsteps:\n  - id: needs-secret\n    action: shell.run\n"
        "    with: {argv: ['true'], env: {TOKEN: env:DR_TEST_NEVER_SET_42}}\n")
    plan = build_plan(str(tmp_path / "runbook.yml"), str(tmp_path / "inventory.yml"))
    seen: list[Event] = []
    outcome = Engine(default_registry(), [recorder(seen)]).run(plan)
    assert outcome.steps["needs-secret"] == "failed"
    finished = [e for e in seen if type(e).__name__ == "StepFinished"][0]
    assert finished.error == ("secret env:DR_TEST_NEVER_SET_42: the environment variable DR_TEST_NEVER_SET_42 "  # type: ignore[union-attr]
                              "is not set")


def test_database_password_by_reference(monkeypatch: pytest.MonkeyPatch) -> None:
    from dr_orchestrator.actions.postgres import base as pgdb
    from dr_orchestrator.model.inventory import Inventory

    inventory = Inventory(name="x", sites={}, hosts={}, services={}, vars={"databases": {
        "dbname": "d", "user": "u", "hosts": {"primary": "127.0.0.1"}, "password": "env:DR_TEST_PG_PASSWORD"}})
    db = pgdb.resolve(inventory, None)
    with pytest.raises(ActionError, match="DR_TEST_PG_PASSWORD is not set"):
        db.conninfo("primary")
    monkeypatch.setenv("DR_TEST_PG_PASSWORD", "pg-password-7781")
    assert "password=pg-password-7781" in db.conninfo("primary")
    assert secrets.redact("pw pg-password-7781") == "pw [REDACTED]"
    literal = Inventory(name="x", sites={}, hosts={}, services={}, vars={"databases": {
        "dbname": "d", "user": "u", "hosts": {"primary": "h"}, "password": "hunter2"}})
    with pytest.raises(ActionError, match="must be a reference"):
        pgdb.resolve(literal, None)


@pytest.mark.slow
def test_evidence_database_url_by_reference(tmp_path: Path) -> None:
    url = f"sqlite:///{tmp_path / 'evidence.db'}"
    (tmp_path / "url").write_text(url + "\n")
    result = dr("db", "upgrade", db=f"file:{tmp_path / 'url'}", cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    assert (tmp_path / "evidence.db").exists()
    missing = dr("runs", "list", db="env:DR_TEST_NO_SUCH_URL", cwd=tmp_path)
    assert missing.returncode == 2 and "Traceback" not in missing.stderr
    assert "evidence database: secret env:DR_TEST_NO_SUCH_URL" in missing.stderr
