"""The HTTP API through FastAPI's TestClient on SQLite and PostgreSQL: roles and tokens, refusals
audited in the chain, runs and drills started over HTTP, approvals, reports, packs and /metrics."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import textwrap
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
from api_support import (
    INVENTORIES,
    REPO,
    RUNBOOKS,
    bearer,
    make_api,
    prepared,
    record_run,
    token,
    write_drill,
)
from fastapi.testclient import TestClient
from sqlalchemy import select
from support.waiting import wait_for

from dr_orchestrator.api.app import ApiSettings, create_app
from dr_orchestrator.api.tokens import revoke_token
from dr_orchestrator.api.values import HOLDS_NUL
from dr_orchestrator.evidence.chain import verify_session
from dr_orchestrator.evidence.database import session_factory_for
from dr_orchestrator.evidence.models import Approval, AuditEvent
from dr_orchestrator.evidence.queries import find_run


@dataclass
class Api:
    url: str
    client: TestClient
    drills_dir: Path

    def get(self, path: str, who: str | None = None, **kwargs: Any) -> Any:
        return self.client.get(path, headers=bearer(who), **kwargs)

    def post(self, path: str, who: str | None = None, **kwargs: Any) -> Any:
        return self.client.post(path, headers=bearer(who), **kwargs)

    def audit_events(self, action: str | None = None) -> list[AuditEvent]:
        with session_factory_for(self.url)() as session:
            query = select(AuditEvent).order_by(AuditEvent.id)
            if action:
                query = query.where(AuditEvent.action == action)
            return list(session.scalars(query))

    def chain_ok(self) -> bool:
        with session_factory_for(self.url)() as session:
            return verify_session(session).ok


@pytest.fixture
def api(database_url: str, tmp_path: Path) -> Iterator[Api]:
    url = prepared(database_url)
    drills_dir = tmp_path / "drills"
    drills_dir.mkdir()
    with make_api(url, drills_dir) as client:  # the with block runs the app's shutdown: runs started stop
        yield Api(url, client, drills_dir)


def run_state(api: Api, who: str, run_id: str) -> str | None:
    answer = api.get(f"/api/runs/{run_id}", who)
    return answer.json()["run"]["state"] if answer.status_code == 200 else None


def finished(api: Api, who: str, run_id: str) -> str:
    def ended() -> str | None:
        state = run_state(api, who, run_id)
        return None if state in (None, "pending", "running", "waiting_approval") else state

    return wait_for(ended, 30, f"run {run_id} ends")


# ---------------------------------------------------------------- roles


def test_compliance_reads_evidence_but_starting_a_run_is_refused_and_audited(api: Api) -> None:
    run_id = record_run(api.url, "restore-trading.yml", incident_ago_s=4)
    carol = token(api.url, "carol-compliance", "compliance")

    runs = api.get("/api/runs", carol).json()
    assert [(r["id"], r["verdict"], r["services"]) for r in runs] == [(run_id, "passed", ["trading"])]
    detail = api.get(f"/api/runs/{run_id[:8]}", carol).json()
    assert detail["run"]["id"] == run_id and [s["step_id"] for s in detail["steps"]] == ["switch", "verify"]
    (result,) = api.get(f"/api/runs/{run_id}/measurements", carol).json()["results"]
    assert result["service"] == "trading" and 4 <= result["rto_s"] < 30 and result["rto_target_s"] == 10
    report = api.get(f"/api/runs/{run_id}/report", carol)
    assert report.status_code == 200 and report.headers["content-type"].startswith("text/html")
    assert run_id in report.text
    export = api.get("/api/evidence/export", carol, params={"format": "csv"})
    assert export.text.splitlines()[1].startswith(f"{run_id},restore-trading,failover,succeeded,trading,")
    assert api.get("/api/evidence/verify", carol).json()["ok"] is True
    assert api.get("/api/approvals", carol).json() == []
    assert api.get("/api/runs/nope-nope", carol).status_code == 404

    refused = api.post("/api/runs", carol, json={"runbook": "restore-trading.yml", "inventory": "two-services.yml"})
    assert refused.status_code == 403
    assert refused.json()["error"] == ("the token 'carol-compliance' has the role compliance; this needs engineer "
                                       "or above")
    assert len(api.get("/api/runs", carol).json()) == 1  # nothing started
    (event,) = api.audit_events("api.refused")
    assert (event.actor, event.target, event.data["status"]) == ("carol-compliance", "POST /api/runs", 403)
    assert api.chain_ok()


def test_missing_unknown_revoked_and_expired_tokens_get_401(api: Api) -> None:
    missing = api.get("/api/runs")
    assert missing.status_code == 401 and missing.headers["www-authenticate"] == "Bearer"
    assert missing.json()["error"].startswith("no API token")
    assert api.get("/api/runs", "drt_made-up").json() == {"error": "the token is not known", "status": 401}

    dave = token(api.url, "dave", "engineer")
    assert api.get("/api/runs", dave).status_code == 200
    with session_factory_for(api.url)() as session:
        revoke_token(session, 1, "admin-person")
        session.commit()
    revoked = api.get("/api/runs", dave)
    assert revoked.status_code == 401 and revoked.json()["error"] == "the token 'dave' was revoked"
    started = api.post("/api/runs", dave, json={"runbook": "restore-trading.yml", "inventory": "two-services.yml"})
    assert started.status_code == 401

    brief = token(api.url, "brief", "admin", expires_in=timedelta(milliseconds=200))
    expired = wait_for(lambda: (r := api.get("/api/runs", brief)).status_code == 401 and r, 10, "the token expires")
    assert expired.json()["error"].startswith("the token 'brief' expired at ")
    assert api.post("/api/runs", json={}).status_code == 401

    refusals = [(e.actor, e.target, e.data["status"]) for e in api.audit_events("api.refused")]
    assert refusals == [("dave", "POST /api/runs", 401), ("anonymous", "POST /api/runs", 401)]


def test_the_openapi_spec_names_the_token_scheme_and_needs_no_cdn(api: Api) -> None:
    spec = api.get("/openapi.json").json()
    assert spec["components"]["securitySchemes"]["HTTPBearer"]["scheme"] == "bearer"
    assert {"/api/runs", "/api/runs/{run_id}/steps/{step_id}/approve", "/metrics"} <= set(spec["paths"])
    assert api.get("/docs").status_code == 404  # its page would load Swagger UI from a CDN


def test_the_spec_lists_each_routes_refusals_with_their_body(api: Api) -> None:
    paths = api.get("/openapi.json").json()["paths"]

    def statuses(path: str, method: str) -> set[str]:
        return set(paths[path][method]["responses"])

    assert statuses("/api/runs", "get") == {"200", "401", "422"}
    assert statuses("/api/runs", "post") == {"202", "401", "403", "404", "409", "422"}
    assert statuses("/api/runs/{run_id}", "get") == {"200", "401", "404", "409", "422"}
    assert statuses("/api/runs/{run_id}/steps/{step_id}/reject", "post") == {"200", "401", "403", "404", "409", "422"}
    assert statuses("/api/tokens/{token_id}", "delete") == {"200", "401", "403", "404", "409", "422"}
    refusal_bodies = {json.dumps(answer["content"]["application/json"]["schema"])
                      for operations in paths.values() for operation in operations.values()
                      for status, answer in operation["responses"].items() if status.startswith("4")
                      and "application/json" in answer.get("content", {})}
    assert refusal_bodies == {'{"$ref": "#/components/schemas/ErrorBody"}'}  # never FastAPI's {"detail": ...}
    assert not [path for path, operations in paths.items() for operation in operations.values()
                if "500" in operation["responses"]]


def test_the_cookie_is_accepted_for_reads_only(api: Api) -> None:
    erin = token(api.url, "erin", "engineer")
    api.client.cookies.set("dr_token", erin)
    try:
        assert api.get("/api/runs").status_code == 200
        refused = api.post("/api/runs", json={"runbook": "restore-trading.yml", "inventory": "two-services.yml"})
        assert refused.status_code == 401  # a change needs the token in the request itself
    finally:
        api.client.cookies.clear()


# ---------------------------------------------------------------- malformed requests and probes


def test_malformed_query_values_are_422_naming_the_parameter_and_audited(api: Api) -> None:
    carol = token(api.url, "carol", "compliance")
    malformed = [
        ({"until": "0.5"}, "query.until: '0.5' is not a date (2026-10-01) or a date-time with a zone "
                           "(2026-10-01T08:00:00Z)"),
        ({"since": "2026-10-01T08:00:00"}, "query.since: '2026-10-01T08:00:00' is not a date (2026-10-01) or a "
                                           "date-time with a zone (2026-10-01T08:00:00Z)"),
        ({"since": "2026-02-30"}, "query.since: '2026-02-30' is not a valid moment: day is out of range for month"),
        ({"since": "0001-01-01T06:00:00+21:30"},  # before year 1 in UTC: the spec's pattern says UTC only
         "query.since: '0001-01-01T06:00:00+21:30': a moment on 0001-01-01 or 9999-12-31 is taken in UTC only (Z)"),
        ({"limit": "0"}, "query.limit: Input should be greater than or equal to 1"),
        ({"service": "trad\x00ing"}, f"query.service: {HOLDS_NUL}"),
        ([("kind", "failover"), ("kind", "failback")], "query.kind: given 2 times; give it once"),
    ]
    for params, error in malformed:
        answer = api.get("/api/runs", carol, params=params)
        assert (answer.status_code, answer.json()["error"]) == (422, error), params
    well_formed = {"since": "2026-10-01", "until": "2026-10-02T00:00:00+08:00"}
    assert api.get("/api/runs", carol, params=well_formed).json() == []
    assert api.get("/api/runs", carol, params={"since": "0001-01-01T00:00:00Z"}).json() == []  # Go's zero time
    assert [(e.actor, e.target, e.data["status"]) for e in api.audit_events("api.refused")] == [
        ("carol", "GET /api/runs", 422)] * len(malformed)
    assert api.chain_ok()


def test_nul_bytes_in_path_query_and_body_are_422_and_audited(api: Api) -> None:
    erin = token(api.url, "erin", "engineer")
    for path in ("/api/runs/ab%00cd", "/api/runs/ab%00cd/report", "/api/drill-runs/x%00y"):
        answer = api.get(path, erin)
        assert answer.status_code == 422 and answer.json()["error"].endswith(f": {HOLDS_NUL}"), path
    start = {"runbook": "restore-trading.yml", "inventory": "two-services.yml"}
    for body, where in [({**start, "runbook": "restore\x00.yml"}, "body.runbook"),
                        ({**start, "reason": "drill\x00"}, "body.reason"),
                        ({**start, "params": {"to\x00": 1}}, "body.params key 'to\\x00'"),
                        ({**start, "params": {"to_site": ["backup\x00"]}}, "body.params.to_site[0]")]:
        answer = api.post("/api/runs", erin, json=body)
        assert (answer.status_code, answer.json()["error"]) == (422, f"{where}: {HOLDS_NUL}"), body
    approve = api.post("/api/runs/ab%00cd/steps/go/approve", erin)
    assert (approve.status_code, approve.json()["error"]) == (422, f"path.run_id: {HOLDS_NUL}")
    assert api.get("/api/runs", erin).json() == []
    refusals = [(e.actor, e.target, e.data["status"]) for e in api.audit_events("api.refused")]
    assert refusals[0] == ("erin", "GET /api/runs/ab\\x00cd", 422) and len(refusals) == 8
    assert refusals[-1] == ("erin", "POST /api/runs/ab\\x00cd/steps/go/approve", 422)
    assert api.chain_ok()


def test_unknown_routes_and_methods_are_refused_and_audited(api: Api) -> None:
    carol = token(api.url, "carol", "compliance")
    missing = api.get("/api/run", carol)
    assert missing.status_code == 404
    assert missing.json() == {"error": "no such route: /api/run (the routes are in /openapi.json)", "status": 404}
    wrong = api.client.put("/api/runs", headers=bearer(carol))
    assert (wrong.status_code, wrong.headers["allow"]) == (405, "GET, POST")
    assert wrong.json()["error"] == "PUT is not allowed on /api/runs; allowed: GET, POST"
    assert api.client.delete("/api/runs/abcd").status_code == 405
    assert api.get("/api/runs/nope", carol).status_code == 404  # a record not found is a lookup, not a probe
    assert [(e.actor, e.target, e.data["status"]) for e in api.audit_events("api.refused")] == [
        ("carol", "GET /api/run", 404), ("carol", "PUT /api/runs", 405), ("anonymous", "DELETE /api/runs/abcd", 405)]


def test_a_fault_of_the_server_is_a_json_500_that_is_audited(database_url: str, tmp_path: Path,
                                                            monkeypatch: pytest.MonkeyPatch) -> None:
    from dr_orchestrator.api import views

    url = prepared(database_url)
    carol = token(url, "carol", "compliance")

    def broken(*_args: Any, **_kwargs: Any) -> Any:
        raise RuntimeError("a bug")

    monkeypatch.setattr(views, "filtered_runs", broken)
    settings = ApiSettings(database_url=url, runbooks_dir=str(RUNBOOKS), inventories_dir=str(INVENTORIES),
                           drills_dir=str(tmp_path))
    with TestClient(create_app(settings), raise_server_exceptions=False) as client:
        answer = client.get("/api/runs", headers=bearer(carol))
    assert answer.status_code == 500
    assert answer.json() == {"error": "the server failed to answer; its log has the cause", "status": 500}
    with session_factory_for(url)() as session:
        (event,) = session.scalars(select(AuditEvent).where(AuditEvent.action == "api.failed"))
        assert (event.actor, event.target, event.data) == ("carol", "GET /api/runs",
                                                           {"status": 500, "error": "RuntimeError"})


# ---------------------------------------------------------------- starting runs


def test_engineer_starts_a_run_that_appears_in_the_runs_list(api: Api) -> None:
    erin = token(api.url, "erin", "engineer")
    answer = api.post("/api/runs", erin, json={"runbook": "restore-quotation.yml", "inventory": "two-services.yml",
                                               "reason": "quarterly check", "kind": "rehearsal",
                                               "scenario": "quotation app stopped"})
    assert answer.status_code == 202, answer.text
    run_id = answer.json()["run_id"]
    assert answer.json()["url"] == f"/api/runs/{run_id}"
    assert finished(api, erin, run_id) == "succeeded"
    (listed,) = api.get("/api/runs", erin, params={"service": "quotation"}).json()
    assert (listed["id"], listed["started_by"], listed["kind"], listed["reason"]) == (
        run_id, "erin", "rehearsal", "quarterly check")
    assert (listed["trigger"], listed["scenario"]) == ("api", "quotation app stopped")  # as it truly was
    (event,) = api.audit_events("run.start")
    assert (event.actor, event.target, event.data["runbook"]) == ("erin", run_id, "restore-quotation.yml")
    assert api.chain_ok()


def test_a_run_started_through_the_api_joins_the_incident_it_names(api: Api) -> None:
    erin = token(api.url, "erin", "engineer")
    body = {"runbook": "restore-quotation.yml", "inventory": "two-services.yml", "incident": "INC-2026-0042"}
    first = api.post("/api/runs", erin, json=body).json()["run_id"]
    assert finished(api, erin, first) == "succeeded"
    retry = api.post("/api/runs", erin, json=body).json()["run_id"]
    assert finished(api, erin, retry) == "succeeded"
    assert [api.get(f"/api/runs/{run_id}", erin).json()["run"]["incident_id"] for run_id in (first, retry)] == [
        "INC-2026-0042", "INC-2026-0042"]
    refused = api.post("/api/runs", erin, json=body | {"incident": "INC 42; DROP"})
    assert refused.status_code == 422, refused.text
    assert len(api.get("/api/runs", erin).json()) == 2  # nothing more started
    assert api.chain_ok()


def test_runbook_and_inventory_must_be_inside_their_directories(api: Api) -> None:
    erin = token(api.url, "erin", "engineer")
    outside = [
        ({"runbook": "../inventories/two-services.yml", "inventory": "two-services.yml"}, 422,
         "body.runbook: '../inventories/two-services.yml' must be a relative path without '..' segments"),
        ({"runbook": "/etc/passwd", "inventory": "two-services.yml"}, 422,
         "body.runbook: '/etc/passwd' must be a relative path without '..' segments"),
        ({"runbook": "restore-trading.yml", "inventory": "../runbooks/restore-trading.yml"}, 422,
         "body.inventory: '../runbooks/restore-trading.yml' must be a relative path without '..' segments"),
        ({"runbook": "missing.yml", "inventory": "two-services.yml"}, 404,
         f"no runbook 'missing.yml' in {RUNBOOKS}/"),
    ]
    for body, status, error in outside:
        answer = api.post("/api/runs", erin, json=body)
        assert (answer.status_code, answer.json()["error"]) == (status, error), body
    wrong_param = api.post("/api/runs", erin, json={"runbook": "restore-trading.yml", "inventory": "two-services.yml",
                                                    "params": {"nonsense": 1}})
    assert wrong_param.status_code == 422, wrong_param.text
    assert api.get("/api/runs", erin).json() == []
    assert len(api.audit_events("api.refused")) == len(outside) + 1


def test_a_run_that_would_certainly_fail_is_refused_with_422_before_anything_runs(database_url: str,
                                                                                   tmp_path: Path) -> None:
    url = prepared(database_url)
    runbooks, inventories = tmp_path / "runbooks", tmp_path / "inventories"
    runbooks.mkdir()
    inventories.mkdir()
    (inventories / "lab.yml").write_text((REPO / "inventories" / "lab.yml").read_text())
    (runbooks / "failover-quotation.yml").write_text((REPO / "runbooks" / "failover-quotation.yml").read_text())
    (runbooks / "switch.yml").write_text(textwrap.dedent("""\
        name: switch-quotation
        scope: {services: [quotation]}
        parameters:
          to_site: {type: site, default: backup}
        steps:
          - id: switch
            action: haproxy.set_active
            with: {backends: [quotaton], site: "{{ params.to_site }}"}
        """))
    with make_api(url, tmp_path, runbooks, inventories) as client:
        api = Api(url, client, tmp_path)
        erin = token(url, "erin", "engineer")
        mars = api.post("/api/runs", erin, json={"runbook": "failover-quotation.yml", "inventory": "lab.yml",
                                                 "params": {"to_site": "mars"}})
        assert mars.status_code == 422, mars.text
        assert [(p["field"], p["message"], p["fix"]) for p in mars.json()["problems"]] == [
            ("parameters.to_site", "to_site = 'mars' (given) is not a site of inventory 'lab'",
             "use one of: primary, backup")]
        typo = api.post("/api/runs", erin, json={"runbook": "switch.yml", "inventory": "lab.yml"})
        assert typo.status_code == 422, typo.text
        [problem] = typo.json()["problems"]
        assert problem["field"] == "steps[0].with.backends" and problem["line"] == 8
        assert "backend 'quotaton' is not in the front door's backends" in problem["message"]
        assert "did you mean 'quotation'?" in problem["message"]
        assert api.get("/api/runs", erin).json() == []  # nothing ran


def test_the_shipped_example_runbook_runs_with_parameters(database_url: str, tmp_path: Path) -> None:
    url = prepared(database_url)
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    with make_api(url, tmp_path, REPO / "runbooks", REPO / "inventories") as client:
        api = Api(url, client, tmp_path)
        erin = token(url, "erin", "engineer")
        answer = api.post("/api/runs", erin, json={"runbook": "example-local.yml", "inventory": "local.yml",
                                                   "params": {"port": port}})
        assert answer.status_code == 202, answer.text
        run_id = answer.json()["run_id"]
        assert finished(api, erin, run_id) == "succeeded"
        detail = api.get(f"/api/runs/{run_id}", erin).json()
        assert detail["run"]["parameters"] == {"port": port}
        assert detail["results"][0]["service"] == "quotation" and detail["results"][0]["rto_met"] is True


@pytest.mark.slow
def test_runs_filter_by_service_kind_dates_state_and_verdict(api: Api) -> None:
    fast = record_run(api.url, "restore-trading.yml", incident_ago_s=2)
    slow = record_run(api.url, "restore-trading.yml", incident_ago_s=25)  # over trading's 10 s target
    quote = record_run(api.url, "restore-quotation.yml", incident_ago_s=1)
    carol = token(api.url, "carol", "compliance")

    def ids(**params: Any) -> set[str]:
        answer = api.get("/api/runs", carol, params=params)
        assert answer.status_code == 200, answer.text
        return {row["id"] for row in answer.json()}

    assert ids() == {fast, slow, quote}
    assert ids(service="quotation") == {quote}
    assert ids(verdict="failed") == {slow}
    assert ids(verdict="passed", service="trading") == {fast}
    assert ids(kind="failover", state="succeeded") == {fast, slow, quote}
    assert ids(kind="switchover") == set()
    assert ids(since="2999-01-01T00:00:00Z") == set()
    assert ids(until="2000-01-01T00:00:00Z") == set()
    assert ids(since="2000-01-01", until="2999-01-01") == {fast, slow, quote}
    assert len(ids(limit=2)) == 2
    assert api.get("/api/runs", carol, params={"verdict": "great"}).status_code == 422


# ---------------------------------------------------------------- approvals


def test_a_waiting_step_is_approved_by_another_engineer(api: Api) -> None:
    erin, frank = token(api.url, "erin", "engineer"), token(api.url, "frank", "engineer")
    carol = token(api.url, "carol", "compliance")
    run_id = api.post("/api/runs", erin, json={"runbook": "gated-trading.yml", "inventory": "two-services.yml"}
                      ).json()["run_id"]
    (gate,) = wait_for(lambda: api.get("/api/approvals", carol).json(), 30, "the gate waits")
    assert (gate["run_id"], gate["step_id"]) == (run_id, "go-ahead")
    assert gate["message"] == "Switch trading to the backup site?"
    approve = f"/api/runs/{run_id}/steps/go-ahead/approve"

    assert api.post(approve, carol).status_code == 403
    own = api.post(approve, erin, json={"reason": "mine"})
    assert own.status_code == 409 and "two-person rule" in own.json()["error"]
    claimed = api.post(approve, erin, json={"reason": "mine", "actor": "frank"})  # the token is who decides
    assert claimed.status_code == 422 and [p["where"] for p in claimed.json()["problems"]] == ["body.actor"]
    assert api.post(f"/api/runs/{run_id}/steps/verify/approve", frank).status_code == 409  # not waiting
    for without_reason in (None, {}, {"reason": " "}):
        refused = api.post(f"/api/runs/{run_id}/steps/go-ahead/reject", frank, json=without_reason)
        assert (refused.status_code, refused.json()["error"]) == (422, "body: reason is required to reject")
    assert api.post(f"/api/runs/{run_id[:8]}x/steps/go-ahead/approve", frank).status_code == 404

    answer = api.post(approve, frank, json={"reason": "change CHG-1 approved"})
    assert answer.status_code == 200, answer.text
    assert (answer.json()["decision"], answer.json()["actor"]) == ("approved", "frank")
    assert finished(api, erin, run_id) == "succeeded"
    assert api.get("/api/approvals", carol).json() == []
    with session_factory_for(api.url)() as session:
        (row,) = session.scalars(select(Approval).where(Approval.run_id == run_id))
        assert (row.actor, row.decision, row.reason) == ("frank", "approved", "change CHG-1 approved")
    assert [(e.actor, e.target) for e in api.audit_events("approval.approved")] == [("frank", f"{run_id} go-ahead")]
    assert {(e.actor, e.data["status"]) for e in api.audit_events("api.refused")} == {
        ("carol", 403), ("erin", 409), ("erin", 422), ("frank", 409), ("frank", 422), ("frank", 404)}
    assert api.chain_ok()


def test_a_run_is_refused_while_another_holds_its_service(api: Api) -> None:
    erin = token(api.url, "erin", "engineer")
    holder = api.post("/api/runs", erin, json={"runbook": "gated-trading.yml", "inventory": "two-services.yml"})
    wait_for(lambda: api.get("/api/approvals", erin).json(), 30, "the first run waits, holding trading")
    refused = api.post("/api/runs", erin, json={"runbook": "restore-trading.yml", "inventory": "two-services.yml"})
    assert refused.status_code == 409, refused.text
    assert holder.json()["run_id"] in refused.json()["error"] and "one failover at a time" in refused.json()["error"]
    other = api.post("/api/runs", erin, json={"runbook": "restore-quotation.yml", "inventory": "two-services.yml"})
    assert other.status_code == 202 and finished(api, erin, other.json()["run_id"]) == "succeeded"
    assert [e.data["status"] for e in api.audit_events("api.refused")] == [409]


def test_runs_started_by_a_server_stop_with_it(database_url: str, tmp_path: Path) -> None:
    url = prepared(database_url)
    with make_api(url, tmp_path) as client:
        api = Api(url, client, tmp_path)
        erin = token(url, "erin", "engineer")
        run_id = api.post("/api/runs", erin, json={"runbook": "gated-trading.yml", "inventory": "two-services.yml"}
                          ).json()["run_id"]
        wait_for(lambda: api.get("/api/approvals", erin).json(), 30, "the run waits for approval")
    # The server stopped (the with block ran its shutdown): its run was stopped, not left waiting.
    with session_factory_for(url)() as session:
        run = find_run(session, run_id)
        assert run is not None and run.state == "aborted" and run.finished_at is not None


# ---------------------------------------------------------------- tokens, drills, metrics


def test_tokens_over_the_api_are_for_admins(api: Api) -> None:
    ada, erin = token(api.url, "ada", "admin"), token(api.url, "erin", "engineer")
    assert api.get("/api/tokens", erin).status_code == 403
    created = api.post("/api/tokens", ada, json={"name": "prometheus", "role": "compliance", "expires": "90d"})
    assert created.status_code == 201, created.text
    operator = api.post("/api/tokens", ada, json={"name": "ops", "role": "engineer"}).json()
    assert datetime.fromisoformat(operator["expires_at"]) - datetime.fromisoformat(operator["created_at"]) == \
        timedelta(days=90)  # by default
    robot = api.post("/api/tokens", ada, json={"name": "robot", "role": "engineer", "expires": "never"}).json()
    assert robot["expires_at"] is None
    assert api.post("/api/tokens", ada, json={"name": "x", "role": "engineer", "expires": "forever"}).status_code == 422
    scraper = created.json()["token"]
    assert api.get("/metrics", scraper).status_code == 200
    listed = api.get("/api/tokens", ada).json()
    assert [(t["name"], t["role"], t["state"]) for t in listed] == [
        ("ada", "admin", "active"), ("erin", "engineer", "active"), ("prometheus", "compliance", "active"),
        ("ops", "engineer", "active"), ("robot", "engineer", "active")]
    assert scraper not in str(listed) and all("token" not in t and "token_sha256" not in t for t in listed)
    assert api.client.delete(f"/api/tokens/{created.json()['id']}", headers=bearer(ada)).json()["state"] == "revoked"
    assert api.get("/metrics", scraper).status_code == 401
    assert api.client.delete("/api/tokens/99", headers=bearer(ada)).status_code == 404
    assert [(e.action, e.actor) for e in api.audit_events() if e.action.startswith("token.")][-2:] == [
        ("token.create", "ada"), ("token.revoke", "ada")]


def test_drills_are_listed_with_next_fire_times_and_started_by_engineers(api: Api) -> None:
    write_drill(api.drills_dir)
    erin, carol = token(api.url, "erin", "engineer"), token(api.url, "carol", "compliance")
    (drill,) = api.get("/api/drills", carol).json()["drills"]
    assert drill["name"] == "api-quick-drill" and drill["last_run"] is None
    assert drill["next"][0]["utc"].endswith("T02:00:00+00:00") and drill["next"][0]["utc"][5:10] in (
        "01-01", "04-01", "07-01", "10-01")

    assert api.post("/api/drills/api-quick-drill/runs", carol).status_code == 403
    assert api.post("/api/drills/no-such-drill/runs", erin).status_code == 404
    assert api.post("/api/drills/..%2Fetc/runs", erin).status_code in (400, 404)
    started = api.post("/api/drills/api-quick-drill/runs", erin)
    assert started.status_code == 202, started.text
    drill_run_id = started.json()["drill_run_id"]
    done = wait_for(lambda: (d := api.get(f"/api/drill-runs/{drill_run_id}", carol).json())["drill_run"]["verdict"]
                    and d, 60, "the drill ends")
    assert done["drill_run"]["verdict"] == "passed" and done["expectations"][0]["met"] is True
    assert api.get("/api/drills", carol).json()["drills"][0]["last_run"]["id"] == drill_run_id
    assert [(e.actor, e.target) for e in api.audit_events("drill.start")] == [("erin", drill_run_id)]


def test_metrics_need_a_token_and_expose_rto_rpo_drills_and_runs(api: Api) -> None:
    carol = token(api.url, "carol", "compliance")
    assert api.get("/metrics").status_code == 401

    def scrape() -> dict[str, float]:
        answer = api.get("/metrics", carol)
        assert answer.headers["content-type"].startswith("text/plain; version=0.0.4")
        return {line.rsplit(" ", 1)[0]: float(line.rsplit(" ", 1)[1])
                for line in answer.text.splitlines() if line and not line.startswith("#")}

    record_run(api.url, "restore-trading.yml", incident_ago_s=3)
    samples = scrape()  # quotation was never exercised: its targets show, no achieved figure
    assert samples['dr_service_rto_target_seconds{service="quotation"}'] == 30
    assert samples['dr_service_rpo_target_seconds{service="quotation"}'] == 60
    assert 'dr_service_rto_seconds{service="quotation"}' not in samples
    record_run(api.url, "restore-quotation.yml", incident_ago_s=40)  # over quotation's 30 s target
    write_drill(api.drills_dir)
    answer = api.get("/metrics", carol)
    samples = scrape()
    assert 3 <= samples['dr_service_rto_seconds{service="trading"}'] < 10
    assert 40 <= samples['dr_service_rto_seconds{service="quotation"}'] < 60
    assert samples['dr_service_rto_target_seconds{service="trading"}'] == 10
    assert samples['dr_service_rto_target_seconds{service="quotation"}'] == 30
    assert samples['dr_runs{state="succeeded"}'] == 2
    # The quarterly report's rule: the latest test of each service this quarter met both targets?
    assert samples['dr_service_targets_met{service="trading"}'] == 0  # its RPO was not measured: never assumed met
    assert samples['dr_service_targets_met{service="quotation"}'] == 0  # 40 s over its 30 s RTO target
    assert samples['dr_service_tests{service="quotation"}'] == 1
    assert samples['dr_drill_next_fire_timestamp_seconds{drill="api-quick-drill"}'] > 1.7e9
    assert samples["dr_pending_approvals"] == 0
    assert "# TYPE dr_drill_last_verdict gauge" in answer.text


def test_packs_need_the_servers_signing_key(api: Api, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from dr_orchestrator.evidence.packs import verify_pack
    from dr_orchestrator.evidence.signing import generate_keypair

    run_id = record_run(api.url, "restore-trading.yml", incident_ago_s=2)
    carol = token(api.url, "carol", "compliance")
    monkeypatch.delenv("DR_PACK_SIGNING_KEY", raising=False)
    assert api.get(f"/api/runs/{run_id}/pack", carol).status_code == 503
    private, _public = generate_keypair(tmp_path / "keys")
    monkeypatch.setenv("DR_PACK_SIGNING_KEY", f"file:{private}")
    pack = api.get(f"/api/runs/{run_id}/pack", carol)
    assert pack.status_code == 200 and pack.headers["content-type"] == "application/zip"
    assert verify_pack(pack.content).ok
    assert [(e.actor, e.data["runs"]) for e in api.audit_events("evidence.pack")] == [("carol", [run_id])]


@pytest.mark.browser
@pytest.mark.slow
def test_reports_as_pdf_and_the_quarter_report(api: Api) -> None:
    from dr_orchestrator.evidence.reports import quarter_of
    from dr_orchestrator.model.events import utcnow

    run_id = record_run(api.url, "restore-trading.yml", incident_ago_s=2)
    carol = token(api.url, "carol", "compliance")
    pdf = api.get(f"/api/runs/{run_id}/report", carol, params={"format": "pdf"})
    assert pdf.status_code == 200 and pdf.headers["content-type"] == "application/pdf"
    assert pdf.content.startswith(b"%PDF")
    label = quarter_of(utcnow()).label
    data = api.get(f"/api/reports/quarter/{label}", carol, params={"format": "json"}).json()
    assert run_id in str(data)
    assert api.get("/api/reports/quarter/2026Q9", carol).status_code == 422


# ---------------------------------------------------------------- the command line


def dr(*args: str, db: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "dr_orchestrator.cli", *args], capture_output=True, text=True,
                          timeout=60, env={**os.environ, "DR_DATABASE_URL": db})


@pytest.mark.slow
def test_dr_tokens_create_list_revoke(tmp_path: Path) -> None:
    db = prepared(f"sqlite:///{tmp_path / 'evidence.db'}")
    created = dr("tokens", "create", "--name", "grafana", "--role", "compliance", "--expires", "90d", db=db)
    assert created.returncode == 0, created.stderr
    secret = created.stdout.splitlines()[-1]
    assert secret.startswith("drt_") and len(secret) > 40
    assert "shown only now" in created.stderr
    listed = dr("tokens", "list", db=db)
    assert "grafana" in listed.stdout and "compliance" in listed.stdout and secret not in listed.stdout
    assert dr("tokens", "revoke", "1", db=db).stdout == "token 1 (grafana) revoked\n"
    again = dr("tokens", "revoke", "1", db=db)
    assert again.returncode == 2 and again.stderr.startswith("Error: token 1 (grafana) was already revoked at")
    bad = dr("tokens", "create", "--name", "x", "--role", "engineer", "--expires", "soon", db=db)
    assert bad.returncode == 2 and "is not a duration" in bad.stderr and "Traceback" not in bad.stderr


@pytest.mark.slow
def test_tokens_that_can_change_things_expire_in_90_days_unless_told_otherwise(tmp_path: Path) -> None:
    db = prepared(f"sqlite:///{tmp_path / 'evidence.db'}")
    for name, role, expires in (("erin", "engineer", None), ("ada", "admin", None), ("carol", "compliance", None),
                                ("am", "alerts", None), ("robot", "engineer", "never"), ("brief", "admin", "12h")):
        created = dr("tokens", "create", "--name", name, "--role", role, *(("--expires", expires) if expires else ()),
                     "-o", "json", db=db)
        assert created.returncode == 0, created.stderr
    tokens = {t["name"]: t for t in json.loads(dr("tokens", "list", "-o", "json", db=db).stdout)}
    def lifetime(name: str) -> timedelta | None:
        token = tokens[name]
        if token["expires_at"] is None:
            return None
        return datetime.fromisoformat(token["expires_at"]) - datetime.fromisoformat(token["created_at"])
    assert lifetime("erin") == lifetime("ada") == timedelta(days=90)
    assert lifetime("carol") is lifetime("am") is lifetime("robot") is None
    assert lifetime("brief") == timedelta(hours=12)


def test_the_cli_does_not_import_fastapi() -> None:
    code = "import sys, dr_orchestrator.cli, dr_orchestrator.cli.serve; print('fastapi' in sys.modules)"
    assert subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout == "False\n"


def test_an_evidence_database_that_does_not_answer_is_503_try_again_not_a_server_fault() -> None:
    """During its failover (tens of seconds under Patroni) every request that needs it, the token check
    first, is answered 503 with Retry-After: clients and the dashboard know to try again."""
    app = create_app(ApiSettings(database_url="postgresql+psycopg://dr@127.0.0.1:1/evidence"))  # nothing on port 1
    with TestClient(app, raise_server_exceptions=False) as client:
        answer = client.get("/api/runs", headers={"Authorization": "Bearer dr_some-token"})
    assert answer.status_code == 503 and answer.headers["Retry-After"] == "5"
    assert answer.json() == {"error": "the evidence database is unreachable (it may be failing over): try again "
                                      "shortly", "status": 503}
