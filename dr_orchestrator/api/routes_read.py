"""Reading evidence: runs and their records, measurements, reports, packs, findings, the chain's
state, drills with their next fire times, waiting approvals, and /metrics. Any role may read."""

from __future__ import annotations

import os
from collections.abc import Iterator
from typing import Annotated, Any, Literal

from fastapi import APIRouter, Depends, Path, Query, Request, Response
from sqlalchemy.orm import Session

from dr_orchestrator.api import metrics, views
from dr_orchestrator.api.auditing import audit
from dr_orchestrator.api.auth import ApiError, Principal, reader
from dr_orchestrator.api.responses import refusals
from dr_orchestrator.api.values import Moment, Quarter, Segment, Text
from dr_orchestrator.evidence import auditor, queries
from dr_orchestrator.evidence import drills as drill_records

router = APIRouter()
MOMENT = "a date (its midnight UTC) or a date-time with its zone, e.g. 2026-10-01 or 2026-10-01T08:00:00+08:00"
RunId = Annotated[Segment, Path(description="a run or drill run id, or a unique prefix of one (4 characters or more)")]
RunKindName = Literal["failover", "switchover", "failback", "rehearsal"]
Verdict = Literal["passed", "failed", "in_progress"]


def session_of(request: Request) -> Iterator[Session]:
    with request.app.state.sessions() as session:
        yield session


def one_run(session: Session, run_id: str) -> dict[str, Any]:
    try:
        detail = queries.run_detail(session, run_id)
    except queries.AmbiguousRunId as exc:
        raise ApiError(409, str(exc)) from None
    if detail is None:
        raise ApiError(404, f"no run {run_id!r} in the evidence database")
    return detail


# -- runs ------------------------------------------------------------------------------------------


@router.get("/api/runs", tags=["runs"], summary="Runs, newest first, filtered", responses=refusals(401, 422))
def list_runs(service: Text | None = None, kind: RunKindName | None = None,
              state: Text | None = Query(None, description="e.g. succeeded, failed, running, waiting_approval"),
              verdict: Verdict | None = Query(None, description="passed: succeeded with every target met"),
              since: Moment | None = Query(None, description=f"started at or after; {MOMENT}"),
              until: Moment | None = Query(None, description=f"started before; {MOMENT}"),
              limit: int = Query(50, ge=1, le=1000), _: Principal = Depends(reader),
              session: Session = Depends(session_of)) -> list[dict[str, Any]]:
    return views.filtered_runs(session, service=service, kind=kind, state=state, verdict=verdict, since=since,
                               until=until, limit=limit)


@router.get("/api/runs/{run_id}", tags=["runs"], summary="A run's whole evidence record",
            responses=refusals(401, 404, 409, 422))
def run_evidence(run_id: RunId, _: Principal = Depends(reader),
                 session: Session = Depends(session_of)) -> dict[str, Any]:
    """Run, services with targets, steps with attempts, probes, markers, measurements, action events and
    RTO/RPO results with the raw timestamps (a unique prefix of the run id is enough)."""
    return one_run(session, run_id)


@router.get("/api/runs/{run_id}/measurements", tags=["runs"], summary="A run's measurements and RTO/RPO results",
            responses=refusals(401, 404, 409, 422))
def run_measurements(run_id: RunId, _: Principal = Depends(reader),
                     session: Session = Depends(session_of)) -> dict[str, Any]:
    detail = one_run(session, run_id)
    return {"run_id": detail["run"]["id"], "measurements": detail["measurements"], "results": detail["results"]}


@router.get("/api/runs/{run_id}/report", tags=["reports"], summary="After-action report (HTML or PDF)",
            response_class=Response, responses={200: {"content": {"text/html": {}, "application/pdf": {}}},
                                                **refusals(401, 404, 409, 422, 503)})
def run_report(run_id: RunId, format: Literal["html", "pdf"] = "html", _: Principal = Depends(reader),
               session: Session = Depends(session_of)) -> Response:
    from dr_orchestrator.evidence import reports

    try:
        html = reports.after_action_html(session, run_id)
    except (reports.ReportError, queries.AmbiguousRunId) as exc:
        raise ApiError(409 if isinstance(exc, queries.AmbiguousRunId) else 404, str(exc)) from None
    if format == "html":
        return Response(html, media_type="text/html; charset=utf-8")
    return _pdf(html, f"after-action-{run_id[:8]}.pdf")


def _pdf(html: str, filename: str) -> Response:
    from dr_orchestrator.evidence.pdf import PdfError, html_to_pdf

    try:
        data = html_to_pdf(html)
    except PdfError as exc:
        raise ApiError(503, str(exc)) from None
    return Response(data, media_type="application/pdf",
                    headers={"Content-Disposition": f'attachment; filename="{filename}"'})


@router.get("/api/reports/quarter/{quarter}", tags=["reports"], summary="Quarterly compliance report",
            response_class=Response, responses={200: {"content": {"text/html": {}, "application/pdf": {},
                                                                  "text/csv": {}, "application/json": {}}},
                                                **refusals(401, 422, 503)})
def quarter_report(quarter: Quarter, format: Literal["html", "pdf", "csv", "json"] = "html",
                   service: Text | None = None,
                   _: Principal = Depends(reader), session: Session = Depends(session_of)) -> Response:
    """Per service: every rehearsal and real failover of the quarter (e.g. ``2026Q3``) against targets, the
    capability level reached, services not exercised, open findings, an RTO chart."""
    from dr_orchestrator.evidence import reports

    data = reports.quarter_data(session, quarter, service=service)
    if format == "json":
        return Response(reports.quarter_json(data), media_type="application/json")
    if format == "csv":
        return Response(reports.quarter_csv(data), media_type="text/csv; charset=utf-8",
                        headers={"Content-Disposition": f'attachment; filename="quarter-{data["quarter"]}.csv"'})
    html = reports.render_quarter(data)
    if format == "pdf":
        return _pdf(html, f"quarter-{data['quarter']}.pdf")
    return Response(html, media_type="text/html; charset=utf-8")


# -- packs -----------------------------------------------------------------------------------------


def _pack(request: Request, session: Session, principal: Principal, *, run_id: str | None = None,
          quarter: str | None = None, service: str | None = None) -> Response:
    from dr_orchestrator.evidence.packs import PackError, build_pack
    from dr_orchestrator.evidence.reports import ReportError
    from dr_orchestrator.evidence.signing import SigningKeyError, load_signing_key

    reference = request.app.state.settings.signing_key or os.environ.get("DR_PACK_SIGNING_KEY")
    try:
        key = load_signing_key(reference)
    except SigningKeyError as exc:
        raise ApiError(503, f"packs cannot be signed here: {exc}") from None
    try:
        data, manifest = build_pack(session, key, run_id=run_id, quarter=quarter, service=service,
                                    created_by=principal.name)
    except queries.AmbiguousRunId as exc:
        raise ApiError(409, str(exc)) from None
    except (PackError, ReportError) as exc:
        raise ApiError(404, str(exc)) from None
    scope = run_id[:8] if run_id else f"{quarter}{'-' + service if service else ''}"
    filename = f"dr-evidence-{scope}.zip"
    summary = {key: manifest[key] for key in ("scope", "runs", "signing_key", "chain_head")}
    audit(request.app.state.sessions, principal.name, "evidence.pack", f"api {filename}", summary)
    return Response(data, media_type="application/zip",
                    headers={"Content-Disposition": f'attachment; filename="{filename}"'})


@router.get("/api/runs/{run_id}/pack", tags=["packs"], summary="Signed evidence pack of one run (zip)",
            response_class=Response, responses={200: {"content": {"application/zip": {}}},
                                                **refusals(401, 404, 409, 422, 503)})
def run_pack(run_id: RunId, request: Request, principal: Principal = Depends(reader),
             session: Session = Depends(session_of)) -> Response:
    """Records (JSON, CSV), reports, the runbook and inventory that ran, the audit chain section and a
    manifest signed with Ed25519 (`dr evidence verify-pack` checks it offline). Needs the server's
    signing key ($DR_PACK_SIGNING_KEY); each download is an audit event."""
    return _pack(request, session, principal, run_id=run_id)


@router.get("/api/packs/quarter/{quarter}", tags=["packs"], summary="Signed evidence pack of a quarter (zip)",
            response_class=Response, responses={200: {"content": {"application/zip": {}}},
                                                **refusals(401, 404, 422, 503)})
def quarter_pack(quarter: Quarter, request: Request, service: Text | None = None,
                 principal: Principal = Depends(reader), session: Session = Depends(session_of)) -> Response:
    return _pack(request, session, principal, quarter=quarter, service=service)


# -- evidence as a whole ---------------------------------------------------------------------------


@router.get("/api/evidence/export", tags=["evidence"], summary="One row per run and service: RTO/RPO against targets",
            response_class=Response, responses={200: {"content": {"application/json": {}, "text/csv": {}}},
                                                **refusals(401, 422)})
def export(format: Literal["json", "csv"] = "json", service: Text | None = None,
           since: Moment | None = Query(None, description=f"runs started at or after; {MOMENT}"),
           _: Principal = Depends(reader), session: Session = Depends(session_of)) -> Response:
    text = auditor.export_evidence(session, fmt=format, service=service, since=since)
    return Response(text, media_type="text/csv; charset=utf-8" if format == "csv" else "application/json")


@router.get("/api/evidence/verify", tags=["evidence"], summary="Walk the audit chain", responses=refusals(401))
def verify(_: Principal = Depends(reader), session: Session = Depends(session_of)) -> dict[str, Any]:
    """``ok`` false names the first record or chain entry changed, removed or inserted."""
    from dr_orchestrator.evidence.chain import verify_session

    return verify_session(session).as_dict()


@router.get("/api/findings", tags=["evidence"], summary="Findings with their closing", responses=refusals(401, 422))
def findings(open: bool = False, _: Principal = Depends(reader),
             session: Session = Depends(session_of)) -> list[dict[str, Any]]:
    from dr_orchestrator.evidence.annotations import list_findings

    return list_findings(session, open_only=open)


# -- drills and approvals --------------------------------------------------------------------------


@router.get("/api/drills", tags=["drills"], summary="Drills with their schedule, next fire times and last verdict",
            responses=refusals(401))
def drills(request: Request, _: Principal = Depends(reader), session: Session = Depends(session_of)) -> dict[str, Any]:
    listing = metrics.drill_schedules(request.app.state.settings.drills_dir)
    last = views.last_drill_verdicts(session)
    for entry in listing["drills"]:
        record = last.get(entry["name"])
        entry["last_run"] = drill_records.summary(record) if record else None
    return listing


@router.get("/api/drill-runs", tags=["drills"], summary="Drill runs, newest first", responses=refusals(401, 422))
def drill_runs(drill: Text | None = None, limit: int = Query(50, ge=1, le=1000), _: Principal = Depends(reader),
               session: Session = Depends(session_of)) -> list[dict[str, Any]]:
    return [drill_records.summary(r) for r in drill_records.drill_run_rows(session, drill, limit)]


@router.get("/api/drill-runs/{drill_run_id}", tags=["drills"], summary="One drill run: expectations, notifications",
            responses=refusals(401, 404, 422))
def drill_run(drill_run_id: Segment, _: Principal = Depends(reader),
              session: Session = Depends(session_of)) -> dict[str, Any]:
    detail = drill_records.drill_run_detail(session, drill_run_id)
    if detail is None:
        raise ApiError(404, f"no drill run {drill_run_id!r}")
    return detail


@router.get("/api/approvals", tags=["approvals"], summary="Steps waiting for approval", responses=refusals(401))
def approvals(_: Principal = Depends(reader), session: Session = Depends(session_of)) -> list[dict[str, Any]]:
    from dr_orchestrator.evidence.approvals import waiting_gates

    return waiting_gates(session)


# -- metrics ---------------------------------------------------------------------------------------


@router.get("/metrics", tags=["metrics"], summary="Prometheus metrics (any role's token)", response_class=Response,
            responses={200: {"content": {"text/plain": {}, "application/openmetrics-text": {}}}, **refusals(401)})
def prometheus(request: Request, _: Principal = Depends(reader)) -> Response:
    """Scrape with `authorization: {credentials: TOKEN}` (a compliance token is enough). Text format
    0.0.4, or OpenMetrics when the scraper asks for it (`Accept`)."""
    body, content_type = request.app.state.metrics.exposition(request.headers.get("accept"))
    return Response(body, headers={"Content-Type": content_type})
