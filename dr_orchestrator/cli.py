"""The `dr` command: thin; parses, composes the rooms, prints. Heavy imports stay inside commands."""

from __future__ import annotations

import json
import sys
from collections.abc import Callable
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, NoReturn

import click

USER_ERROR = 2
TAMPERED = 1
# Kept here, not imported from the evidence room: `dr --help` must stay fast.
TEST_TYPES = ["planned switchover rehearsal", "unplanned failover rehearsal", "planned switchover (production)",
              "real failover", "failback"]


class UserError(click.ClickException):
    """A mistake of the user's: one sentence, exit code 2, no traceback."""

    exit_code = USER_ERROR


def fail_with_problems(problems: list[Any], output: str) -> NoReturn:
    if output == "json":
        click.echo(json.dumps({"ok": False, "problems": [p.as_dict() for p in problems]}, indent=2))
    else:
        for problem in problems:
            click.echo(str(problem), err=True)
        warnings = sum(1 for p in problems if not getattr(p, "is_error", True))
        also = f" and {warnings} warning(s)" if warnings else ""
        click.echo(f"{len(problems) - warnings} problem(s){also} found.", err=True)
    sys.exit(USER_ERROR)


def print_warning(problem: Any) -> None:
    click.echo(str(problem), err=True)


def parse_time(value: str | None, name: str) -> datetime | None:
    if value is None:
        return None
    try:
        moment = datetime.fromisoformat(value.replace("Z", "+00:00"))
    except ValueError:
        raise UserError(f"{name} {value!r} is not an ISO-8601 time such as 2026-11-28T03:00:00Z") from None
    if moment.tzinfo is None:
        raise UserError(f"{name} {value!r} has no time zone; add Z or +08:00")
    return moment.astimezone(UTC)


output_option = click.option("--output", "-o", type=click.Choice(["text", "json"]), default="text",
                             help="text for people, json for scripts")
runbook_arguments = [
    click.argument("runbook", type=click.Path(dir_okay=False)),
    click.option("--inventory", "-i", required=True, type=click.Path(dir_okay=False), help="inventory YAML"),
    click.option("--param", "-p", "params", multiple=True, metavar="KEY=VALUE", help="runbook parameter"),
]


def with_runbook_arguments(function: Callable[..., Any]) -> Callable[..., Any]:
    for decorator in reversed(runbook_arguments):
        function = decorator(function)
    return function


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.option("--db", "database", envvar="DR_DATABASE_URL", metavar="URL",
              help="evidence database (default: sqlite:///dr-evidence.db, or $DR_DATABASE_URL)")
@click.option("--log-format", type=click.Choice(["text", "json"]), default="text", envvar="DR_LOG_FORMAT",
              show_default=True,
              help="how the services (watch run, serve, scheduler run) log: text lines, or one JSON object per "
                   "line with run, incident and step ids (or $DR_LOG_FORMAT)")
@click.version_option(package_name="dr-orchestrator")
@click.pass_context
def cli(ctx: click.Context, database: str | None, log_format: str) -> None:
    """Disaster-recovery orchestrator: run failover runbooks and keep RTO/RPO evidence."""
    ctx.obj = {"database": database, "log_format": log_format}


def log_format_of(ctx: click.Context) -> str:
    root = ctx.find_root().obj
    return str(root.get("log_format", "text")) if root else "text"


def announce(ctx: click.Context, text: str) -> None:
    """A service's news to its operator: a line on stdout, or in JSON log format a log record, so that
    a log collector reads nothing but JSON."""
    if log_format_of(ctx) == "json":
        import logging

        logging.getLogger("dr_orchestrator.cli").info(text)
    else:
        click.echo(text)
        sys.stdout.flush()


def database_of(ctx: click.Context) -> str | None:
    database = ctx.find_root().obj.get("database") if ctx.find_root().obj else None
    from dr_orchestrator import secrets

    if secrets.is_reference(database):  # --db / $DR_DATABASE_URL as env:NAME or file:/path
        try:
            return secrets.resolve(database)
        except secrets.SecretError as exc:
            raise UserError(f"evidence database: {exc}") from None
    return database


def session_factory(ctx: click.Context) -> Any:
    from dr_orchestrator.evidence import migrate
    from dr_orchestrator.evidence.database import database_url, session_factory_for

    url = database_url(database_of(ctx))
    problem = migrate.schema_problem(url)
    if problem:
        raise UserError(problem)
    factory = session_factory_for(url)
    from dr_orchestrator.cli_safety import sweep

    sweep(factory)  # runs whose process died are marked interrupted, never left running
    return factory


# ---------------------------------------------------------------- validate, plan, run


@cli.command()
@with_runbook_arguments
@output_option
@click.option("--strict", is_flag=True, help="warnings (e.g. a template put into a shell command unquoted) fail too")
def validate(runbook: str, inventory: str, params: tuple[str, ...], output: str, strict: bool) -> None:
    """Check a runbook against an inventory; exit 2 listing every problem, in one pass.

    Warnings are printed and exit 0, unless --strict."""
    warnings: list[Any] = []
    _build(runbook, inventory, params, output, strict=strict, warn=warnings.append)
    if output == "json":
        click.echo(json.dumps({"ok": True, "problems": [w.as_dict() for w in warnings]}))
        return
    for warning in warnings:
        print_warning(warning)
    click.echo(f"{runbook}: valid against {inventory}" + (f" ({len(warnings)} warning(s))" if warnings else ""))


@cli.command()
@with_runbook_arguments
@output_option
@click.option("--out", "out", type=click.Path(dir_okay=False, writable=True),
              help="also save the plan to this file, with the digests of its runbook, inventory and parameters: "
                   "`dr run --plan FILE` runs exactly it, or refuses")
def plan(runbook: str, inventory: str, params: tuple[str, ...], output: str, out: str | None) -> None:
    """Show the steps in execution order with templates rendered; runs nothing."""
    from dr_orchestrator.model.events import utcnow
    from dr_orchestrator.plans import describe_plan, parse_overrides, saved_plan

    the_plan = _build(runbook, inventory, params, output, warn=print_warning if output == "text" else None)
    described = describe_plan(the_plan)
    if out is not None:
        document = saved_plan(the_plan, parse_overrides(list(params)), utcnow())
        written = Path(out)
        partial = written.with_name(f".{written.name}.partial")
        try:
            partial.write_text(json.dumps(document, indent=2, sort_keys=True, default=str) + "\n", encoding="utf-8")
            partial.replace(written)  # whole or not at all
        except OSError as exc:
            raise UserError(f"cannot save the plan to {out}: {exc.strerror}") from None
        click.echo(f"saved the plan to {out} (SHA-256 {document['sha256']})", err=True)
    if output == "json":
        click.echo(json.dumps(described, indent=2, default=str))
        return
    click.echo(f"runbook {described['runbook']} ({described['kind']}) on inventory {described['inventory']}")
    click.echo(f"parameters: {json.dumps(described['parameters'], default=str)}")
    for group in described["groups"]:
        label = "in parallel" if group["parallel"] else ""
        click.echo(f"\n{group['group']}. {label}".rstrip())
        for step in group["steps"]:
            extras = [f"timeout {step['timeout_s']:g}s"]
            if step["retries"]:
                extras.append(f"retries {step['retries']}")
            extras.append(f"on failure {step['on_failure']}")
            if step["marks"]:
                extras.append("marks " + ",".join(step["marks"]))
            click.echo(f"   {step['id']}  [{step['action']}]  {'; '.join(extras)}")
            if step.get("when"):
                click.echo(f"      when: {step['when']}")
            if step.get("hosts") and not {"host", "hosts"} & set(step["with"]):  # else they are listed there
                click.echo(f"      hosts: {', '.join(step['hosts'])}")
            for key, value in step["with"].items():
                click.echo(f"      {key}: {json.dumps(value, default=str)}")
            if step.get("rollback"):
                click.echo(f"      rollback: {step['rollback']['action']}")
            if step.get("error"):
                click.echo(f"      ! {step['error']}")


def _build(runbook: str, inventory: str, params: tuple[str, ...], output: str = "text", **kwargs: Any) -> Any:
    from dr_orchestrator.plans import PlanError, build_plan, parse_overrides
    from dr_orchestrator.yamlsource import LoadError

    try:
        return build_plan(runbook, inventory, parse_overrides(list(params)), **kwargs)
    except LoadError as exc:
        fail_with_problems(exc.problems, output)
    except PlanError as exc:
        raise UserError(str(exc)) from None


@cli.command()
@click.argument("runbook", type=click.Path(dir_okay=False), required=False)
@click.option("--inventory", "-i", type=click.Path(dir_okay=False), help="inventory YAML")
@click.option("--param", "-p", "params", multiple=True, metavar="KEY=VALUE", help="runbook parameter")
@click.option("--plan", "saved_plan_path", metavar="FILE", type=click.Path(dir_okay=False),
              help="run exactly the plan saved by `dr plan --out` (instead of RUNBOOK, -i and -p); refused when its "
                   "runbook, inventory or parameters changed since")
@click.option("--incident-at", help="when the disruption began (ISO-8601 with zone); default: the run's start")
@click.option("--kind", type=click.Choice(["failover", "switchover", "failback", "rehearsal"]),
              help="default: the runbook's kind")
@click.option("--reason", default="", help="why this run (recorded)")
@click.option("--test-type", type=click.Choice(TEST_TYPES),
              help="what the DR test record calls the run (default: from kind, trigger and scenario; "
                   "the trigger of a run started here is always manual)")
@click.option("--scenario", default="", help="the fault injected, in words (recorded)")
@click.option("--failback-of", metavar="RUN", help="the run whose failover this run undoes (joins its incident)")
@click.option("--incident", "incident_id", metavar="ID",
              help="the incident this run belongs to, created when absent (default: a failover or switchover "
                   "opens a new one)")
@click.option("--retention-years", type=click.IntRange(min=1), envvar="DR_RETENTION_YEARS",
              help="keep the record this many years (default 6, or $DR_RETENTION_YEARS)")
@click.option("--force", "force_reason", metavar="REASON",
              help="override the inventory's safety rules that would refuse the run (recorded with rule and actor)")
@click.option("--quiet", "-q", is_flag=True, help="no live progress, only the summary")
@click.pass_context
def run(ctx: click.Context, runbook: str | None, inventory: str | None, params: tuple[str, ...],
        saved_plan_path: str | None, incident_at: str | None, kind: str | None, reason: str, test_type: str | None,
        scenario: str, failback_of: str | None, incident_id: str | None, retention_years: int | None,
        force_reason: str | None, quiet: bool) -> None:
    """Execute a runbook with live progress, then print RTO/RPO per service against targets.

    Exit 0 when the run succeeded, 1 when it failed (after rollback), 2 for bad input, 3 when another
    run holds a service or site of this runbook (nothing ran; the holder is named).
    """
    from dr_orchestrator.cli_safety import run_guarded
    from dr_orchestrator.progress import ProgressPrinter

    moment = parse_time(incident_at, "--incident-at")
    if incident_id is not None:
        from dr_orchestrator.evidence.incidents import IncidentError, check_incident_id

        try:
            check_incident_id(incident_id)
        except IncidentError as exc:
            raise UserError(f"--incident: {exc}") from None
    if force_reason is not None and not force_reason.strip():
        raise UserError('--force needs a reason, e.g. --force "primary site confirmed powered off by facilities"')
    forced = (force_reason.strip(),) if force_reason else ()
    saved = None
    if saved_plan_path is not None:
        from dr_orchestrator.plans import PlanError, read_saved_plan

        if runbook is not None or inventory is not None or params:
            raise UserError("--plan runs the saved plan's own runbook, inventory and parameters: "
                            "give no RUNBOOK, -i or -p with it")
        try:
            saved = read_saved_plan(saved_plan_path)
        except PlanError as exc:
            raise UserError(str(exc)) from None
        runbook, inventory = saved["runbook"]["path"], saved["inventory"]["path"]
        params = tuple(f"{key}={json.dumps(value)}" for key, value in saved["overrides"].items())
    elif runbook is None or inventory is None:
        raise UserError("give RUNBOOK and -i INVENTORY, or --plan FILE saved by `dr plan --out`")
    the_plan = _build(runbook, inventory, params, incident_at=moment, kind=kind, reason=reason, trigger="manual",
                      forced=forced, warn=print_warning)
    if saved is not None:
        from dr_orchestrator.plans import PlanError, check_against_saved

        try:
            check_against_saved(the_plan, saved, str(saved_plan_path))
        except PlanError as exc:
            raise UserError(str(exc)) from None
    sessions = session_factory(ctx)
    if failback_of is not None:
        failback_of = _existing_run_id(sessions, failback_of)
    the_plan = the_plan.model_copy(update={"test_type": test_type, "scenario": scenario, "failback_of": failback_of,
                                           "incident_id": incident_id})
    observers: list[Any] = [] if quiet else [ProgressPrinter()]
    outcome = run_guarded(sessions, the_plan, observers, retention_years=retention_years)
    print_run_summary(sessions, outcome.run_id)
    if outcome.error and outcome.error.startswith("safety rule "):
        click.echo(outcome.error, err=True)  # the pre-flight refused: say which rule and how to override
    sys.exit(0 if outcome.state == "succeeded" else 1)


def _existing_run_id(sessions: Any, run_id: str) -> str:
    from dr_orchestrator.evidence import queries

    with sessions() as session:
        try:
            found = queries.find_run(session, run_id)
        except queries.AmbiguousRunId as exc:
            raise UserError(str(exc)) from None
    if found is None:
        raise UserError(f"no run {run_id!r} in the evidence database (see `dr runs list`)")
    return str(found.id)


def print_run_summary(sessions: Any, run_id: str) -> None:
    from dr_orchestrator.evidence import queries
    from dr_orchestrator.progress import print_results

    with sessions() as session:
        detail = queries.run_detail(session, run_id)
    print_results(detail)


# ---------------------------------------------------------------- runs and evidence


@cli.group()
def runs() -> None:
    """Runs recorded in the evidence database."""


@runs.command("list")
@click.option("--service", help="only runs that touched this service")
@click.option("--kind", type=click.Choice(["failover", "switchover", "failback", "rehearsal"]))
@click.option("--state")
@click.option("--limit", default=50, show_default=True)
@output_option
@click.pass_context
def runs_list(ctx: click.Context, service: str | None, kind: str | None, state: str | None, limit: int,
              output: str) -> None:
    """Newest runs first."""
    from dr_orchestrator.evidence import queries
    from dr_orchestrator.progress import print_run_list

    with session_factory(ctx)() as session:
        rows = queries.list_runs(session, service=service, kind=kind, state=state, limit=limit)
    if output == "json":
        click.echo(json.dumps(rows, indent=2, default=str))
    else:
        print_run_list(rows)


@runs.command("show")
@click.argument("run_id")
@output_option
@click.pass_context
def runs_show(ctx: click.Context, run_id: str, output: str) -> None:
    """Timeline of steps and attempts, outputs, RTO/RPO with the raw timestamps behind them."""
    from dr_orchestrator.evidence import queries
    from dr_orchestrator.progress import print_run_detail

    with session_factory(ctx)() as session:
        try:
            detail = queries.run_detail(session, run_id)
        except queries.AmbiguousRunId as exc:
            raise UserError(str(exc)) from None
    if detail is None:
        raise UserError(f"no run {run_id!r} in the evidence database (see `dr runs list`)")
    if output == "json":
        click.echo(json.dumps(detail, indent=2, default=str))
    else:
        print_run_detail(detail)


@cli.group()
def evidence() -> None:
    """RTO/RPO evidence for compliance."""


@evidence.command("export")
@click.option("--format", "fmt", type=click.Choice(["json", "csv"]), default="json", show_default=True)
@click.option("--service", help="only this service")
@click.option("--since", help="only runs started at or after this ISO-8601 date or time")
@click.option("--out", type=click.Path(dir_okay=False, writable=True), help="write to a file instead of stdout")
@click.pass_context
def evidence_export(ctx: click.Context, fmt: str, service: str | None, since: str | None, out: str | None) -> None:
    """One row per run and service: achieved RTO/RPO against targets, with the method."""
    from dr_orchestrator.evidence import auditor

    moment = parse_time(since if since is None or "T" in since else since + "T00:00:00+00:00", "--since")
    with session_factory(ctx)() as session:
        text = auditor.export_evidence(session, fmt=fmt, service=service, since=moment)
    if out:
        with open(out, "w", encoding="utf-8", newline="") as handle:
            handle.write(text)
    else:
        click.echo(text, nl=False)


def _write_output(content: str | bytes, out: str | None) -> None:
    """To the file ``out``, else to stdout (binary content needs a file)."""
    if out:
        from pathlib import Path

        try:
            if isinstance(content, bytes):
                Path(out).write_bytes(content)
            else:
                Path(out).write_text(content, encoding="utf-8", newline="")
        except OSError as exc:
            raise UserError(f"cannot write {out}: {exc.strerror}") from None
    elif isinstance(content, bytes):
        raise UserError("this output is binary: give --out FILE")
    else:
        click.echo(content, nl=False)


def _binary_needs_out(fmt: str, out: str | None) -> None:
    if fmt == "pdf" and not out:
        raise UserError("PDF output is binary: give --out FILE")


@evidence.command("verify")
@click.option("--anchors", "anchors_source", metavar="SOURCE",
              help="also check the chain against signed anchors: a file, s3://bucket/prefix or a URL listing them")
@click.option("--public-key", type=click.Path(dir_okay=False),
              help="PEM of the key you trust to have signed the anchors")
@output_option
@click.pass_context
def evidence_verify(ctx: click.Context, anchors_source: str | None, public_key: str | None, output: str) -> None:
    """Walk the audit chain and check every evidence record against it; with --anchors, check that the
    chain still holds what each anchor signed (a rewrite or truncation up to the newest anchor is named).

    Exit 0 when intact, 1 when something was changed, removed or inserted (the first is named), 2 for bad input.
    """
    from dr_orchestrator.evidence.chain import verify_session

    anchored = _anchor_check(anchors_source, public_key) if anchors_source or public_key else None
    with session_factory(ctx)() as session:
        report = verify_session(session)
        anchor_report = anchored(session) if anchored else None
    if output == "json":
        click.echo(json.dumps(report.as_dict() | ({"anchors": anchor_report.as_dict()} if anchor_report else {}),
                              indent=2))
    elif report.ok:
        click.echo(f"intact: {report.entries} chain entries, {report.records} records; "
                   f"head {report.head_seq} {report.head_sha256}")
    else:
        first = report.first
        assert first is not None
        click.echo(f"TAMPERED: {first.describe()}")
        for problem in report.problems[1:20]:
            click.echo(f"  also {problem.describe()}")
        if len(report.problems) > 20:
            click.echo(f"  and {len(report.problems) - 20} more problem(s)")
    if anchor_report is not None and output != "json":
        _print_anchor_report(anchor_report)
    sys.exit(0 if report.ok and (anchor_report is None or anchor_report.ok) else TAMPERED)


def _anchor_check(source: str | None, public_key: str | None) -> Callable[[Any], Any]:
    """Read the anchors and the trusted key before touching the database (bad input: exit 2)."""
    from dr_orchestrator.anchoring import AnchorConfigError, read_source
    from dr_orchestrator.evidence.anchors import check_anchors
    from dr_orchestrator.evidence.signing import SigningKeyError, load_public_key

    if not source or not public_key:
        raise UserError("--anchors SOURCE needs --public-key PEM, the key you trust to have signed the anchors")
    try:
        with open(public_key, "rb") as handle:
            trusted = load_public_key(handle.read())
    except OSError as exc:
        raise UserError(f"cannot read the public key {public_key}: {exc.strerror}") from None
    except SigningKeyError as exc:
        raise UserError(f"{public_key}: {exc}") from None
    try:
        found = read_source(source)
    except AnchorConfigError as exc:
        raise UserError(str(exc)) from None
    return lambda session: check_anchors(session.connection(), source, found, trusted)


def _print_anchor_report(report: Any) -> None:
    if report.ok:
        newest, after = report.newest, report.uncovered
        click.echo(f"anchored: {report.anchors} anchor(s) from {report.source} match the chain; newest: entry "
                   f"{newest.seq} at {newest.at.isoformat()}; {after} {'entry' if after == 1 else 'entries'} after "
                   f"it {'is' if after == 1 else 'are'} not anchored yet")
        return
    click.echo(f"TAMPERED (anchors): {report.problems[0].describe()}")
    for problem in report.problems[1:20]:
        click.echo(f"  also {problem.describe()}")
    if len(report.problems) > 20:
        click.echo(f"  and {len(report.problems) - 20} more problem(s)")


@evidence.command("anchor")
@click.option("--sink", "sinks", multiple=True, metavar="SINK",
              help="file:/path, s3://bucket/prefix[?retain_days=N&mode=..], an http(s) URL or webhook:env:NAME; "
                   "repeatable (default: $DR_ANCHOR_SINKS)")
@click.option("--signing-key", "key_ref", metavar="REF",
              help="file:/path or env:NAME (default: $DR_ANCHOR_SIGNING_KEY)")
@output_option
@click.pass_context
def evidence_anchor(ctx: click.Context, sinks: tuple[str, ...], key_ref: str | None, output: str) -> None:
    """Sign the chain's head (entries, head hash, time, key) and write it to each sink, outside the database.

    Exit 0 when every sink took it, 1 when one failed (named; the others still have it), 2 for bad input.
    """
    import os

    from dr_orchestrator.anchoring import SINKS_ENV, AnchorConfigError, parse_sinks, signing_key
    from dr_orchestrator.evidence.anchors import anchor_chain
    from dr_orchestrator.plans import default_actor

    try:
        targets = parse_sinks(list(sinks) if sinks else os.environ.get(SINKS_ENV, ""))
        key = signing_key(key_ref)
    except AnchorConfigError as exc:
        raise UserError(str(exc)) from None
    outcome = anchor_chain(session_factory(ctx), key, targets, actor=default_actor())
    if output == "json":
        click.echo(json.dumps(outcome.as_dict(), indent=2))
    else:
        anchor = outcome.anchor
        click.echo(f"anchor: chain entry {anchor.seq} {anchor.head_sha256} at {anchor.at.isoformat()}, "
                   f"signed by {anchor.key}; {outcome.recorded}")
        for result in outcome.results:
            click.echo(f"  {'ok    ' if result.ok else 'FAILED'} {result.sink}: {result.detail}")
    sys.exit(0 if outcome.ok else TAMPERED)


@evidence.command("keygen")
@click.option("--out", "directory", required=True, type=click.Path(file_okay=False), help="directory for the pair")
def evidence_keygen(directory: str) -> None:
    """Create an Ed25519 key pair for signing packs (private key mode 600)."""
    from dr_orchestrator.evidence.signing import SigningKeyError, generate_keypair

    try:
        private, public = generate_keypair(directory)
    except SigningKeyError as exc:
        raise UserError(str(exc)) from None
    except OSError as exc:
        raise UserError(f"cannot create the key pair in {directory}: {exc.strerror}") from None
    click.echo(f"private key: {private} (keep it secret; use DR_PACK_SIGNING_KEY=file:{private})")
    click.echo(f"public key:  {public} (give it to whoever verifies packs)")


@evidence.command("pack")
@click.option("--run", "run_id", metavar="ID", help="one run (and the runs failing it back)")
@click.option("--quarter", help="every run started in a quarter, e.g. 2026Q3")
@click.option("--service", help="only runs with this service in scope")
@click.option("--out", type=click.Path(dir_okay=False), help="zip to write (default: dr-evidence-<scope>.zip)")
@click.option("--signing-key", "key_ref", metavar="REF",
              help="file:/path or env:NAME (default: $DR_PACK_SIGNING_KEY)")
@click.option("--pdf", is_flag=True, help="add PDF after-action reports (needs Chromium)")
@click.pass_context
def evidence_pack(ctx: click.Context, run_id: str | None, quarter: str | None, service: str | None, out: str | None,
                  key_ref: str | None, pdf: bool) -> None:
    """Write a signed zip of the records, reports and sources, checkable offline with verify-pack."""
    from dr_orchestrator.evidence.annotations import record_audit_event
    from dr_orchestrator.evidence.packs import PackError, build_pack
    from dr_orchestrator.evidence.pdf import PdfError
    from dr_orchestrator.evidence.queries import AmbiguousRunId
    from dr_orchestrator.evidence.reports import ReportError
    from dr_orchestrator.evidence.signing import SigningKeyError, load_signing_key
    from dr_orchestrator.plans import default_actor

    if (run_id is None) == (quarter is None):
        raise UserError("give either --run ID or --quarter YYYYQn")
    try:
        key = load_signing_key(key_ref)
    except SigningKeyError as exc:
        raise UserError(str(exc)) from None
    sessions = session_factory(ctx)
    actor = default_actor()
    try:
        with sessions() as session:
            data, manifest = build_pack(session, key, run_id=run_id, quarter=quarter, service=service,
                                        created_by=actor, with_pdf=pdf)
    except (PackError, ReportError, AmbiguousRunId, PdfError) as exc:
        raise UserError(str(exc)) from None
    scope = run_id or quarter or ""
    target = out or f"dr-evidence-{scope[:8] if run_id else scope}{'-' + service if service else ''}.zip"
    _write_output(data, target)
    with sessions() as session, session.begin():
        summary = {key: manifest[key] for key in ("scope", "runs", "signing_key", "chain_head")}
        record_audit_event(session, actor, "evidence.pack", target, summary)
    click.echo(f"{target}: {len(manifest['files'])} files, {len(manifest['runs'])} run(s), "
               f"signed by {manifest['signing_key']}")
    if not manifest["chain_verified"]:
        click.echo("warning: the audit chain did not verify at export (see audit/chain.json and "
                   "`dr evidence verify`)", err=True)


@evidence.command("verify-pack")
@click.argument("pack", type=click.Path(dir_okay=False))
@click.option("--public-key", type=click.Path(dir_okay=False), help="PEM of the key you trust to have signed it")
@output_option
def evidence_verify_pack(pack: str, public_key: str | None, output: str) -> None:
    """Check a pack offline: signature, every file's digest, nothing missing or added.

    Exit 0 when it verifies, 1 when it does not (the files at fault are named), 2 for bad input.
    """
    from dr_orchestrator.evidence.packs import PackError, verify_pack
    from dr_orchestrator.evidence.signing import SigningKeyError

    trusted = None
    if public_key:
        try:
            with open(public_key, "rb") as handle:
                trusted = handle.read()
        except OSError as exc:
            raise UserError(f"cannot read the public key {public_key}: {exc.strerror}") from None
    try:
        result = verify_pack(pack, trusted)
    except (PackError, SigningKeyError) as exc:
        raise UserError(str(exc)) from None
    if output == "json":
        click.echo(json.dumps(result.as_dict(), indent=2))
    elif result.ok:
        click.echo(f"{pack}: verified, {len(result.manifest['files'])} files, signed by {result.key}")
        if not result.key_trusted:
            click.echo("note: checked with the key inside the pack; pass --public-key to check who signed it")
    else:
        click.echo(f"{pack}: NOT verified")
        for problem in result.problems:
            click.echo(f"  {problem}")
    sys.exit(0 if result.ok else TAMPERED)


# ---------------------------------------------------------------- findings


@cli.group()
def findings() -> None:
    """Findings of runs: what must be fixed, by whom, by when; closed with evidence."""


@findings.command("add")
@click.argument("run_id", metavar="RUN")
@click.argument("text")
@click.option("--severity", required=True, type=click.Choice(["low", "medium", "high", "critical"]))
@click.option("--owner", required=True)
@click.option("--due", required=True, metavar="DATE", help="YYYY-MM-DD")
@click.pass_context
def findings_add(ctx: click.Context, run_id: str, text: str, severity: str, owner: str, due: str) -> None:
    """Record a finding on RUN (a run or drill run id, or a unique prefix; a drill run's finding goes
    on its failover run)."""
    from datetime import date

    from dr_orchestrator.evidence.annotations import AnnotationError, add_finding
    from dr_orchestrator.evidence.queries import AmbiguousRunId
    from dr_orchestrator.plans import default_actor

    try:
        due_date = date.fromisoformat(due)
    except ValueError:
        raise UserError(f"--due {due!r} is not a date such as 2026-12-31") from None
    with session_factory(ctx)() as session, session.begin():
        try:
            finding = add_finding(session, run_id, severity, owner, due_date, text, default_actor())
        except (AnnotationError, AmbiguousRunId) as exc:
            raise UserError(str(exc)) from None
        finding_id = finding.id
    click.echo(f"finding {finding_id} recorded")


@findings.command("list")
@click.option("--open", "open_only", is_flag=True, help="only findings not closed")
@click.option("--run", "run_id", metavar="RUN", help="only findings of this run")
@output_option
@click.pass_context
def findings_list(ctx: click.Context, open_only: bool, run_id: str | None, output: str) -> None:
    """Findings, oldest first; open ones past their due date are flagged OVERDUE."""
    from dr_orchestrator.evidence.annotations import list_findings

    sessions = session_factory(ctx)
    run_ids = [_existing_run_id(sessions, run_id)] if run_id else None
    with sessions() as session:
        rows = list_findings(session, open_only=open_only, run_ids=run_ids)
    if output == "json":
        click.echo(json.dumps(rows, indent=2, default=str))
        return
    if not rows:
        click.echo("no findings")
    for row in rows:
        closed = row["closed"]
        state = "open" if closed is None else (
            f"closed {closed['closed_at'][:10]} by {closed['closed_by']}: "
            f"{closed['evidence_run_id'] or closed['evidence_text']}")
        overdue = "  OVERDUE" if row["overdue"] else ""
        click.echo(f"{row['id']:>4}  {row['severity']:<8} due {row['due']}{overdue}  {row['owner']:<12} "
                   f"run {row['run_id'][:8]}  {row['text']}  [{state}]")
    overdue_count = sum(1 for row in rows if row["overdue"])
    if overdue_count:
        click.echo(f"{overdue_count} open finding(s) past their due date")


@findings.command("close")
@click.argument("finding_id", type=int, metavar="ID")
@click.option("--evidence", required=True, metavar="RUN_OR_TEXT", help="a run proving the fix, or a text")
@click.pass_context
def findings_close(ctx: click.Context, finding_id: int, evidence: str) -> None:
    """Close a finding; the closing is a new record, the finding itself never changes."""
    from dr_orchestrator.evidence.annotations import AnnotationError, close_finding
    from dr_orchestrator.evidence.queries import AmbiguousRunId
    from dr_orchestrator.plans import default_actor

    with session_factory(ctx)() as session, session.begin():
        try:
            closure = close_finding(session, finding_id, evidence, default_actor())
        except (AnnotationError, AmbiguousRunId) as exc:
            raise UserError(str(exc)) from None
        by = closure.evidence_run_id or closure.evidence_text
    click.echo(f"finding {finding_id} closed: {by}")


@cli.command()
@click.argument("run_id", metavar="RUN")
@click.option("--check", required=True, metavar="NAME", help="what was compared, e.g. 'orders row count'")
@click.option("--result", required=True, type=click.Choice(["ok", "mismatch"]))
@click.option("--detail", required=True, metavar="TEXT", help="what was found, e.g. '10482 rows at both sites'")
@click.option("--service", help="the service checked (default: the run's whole scope)")
@click.pass_context
def reconcile(ctx: click.Context, run_id: str, check: str, result: str, detail: str, service: str | None) -> None:
    """Record a data-integrity check made after recovery on RUN (a run or drill run id, or a unique
    prefix); it appears in the after-action report and the evidence export."""
    from dr_orchestrator.evidence.annotations import AnnotationError, record_check
    from dr_orchestrator.evidence.queries import AmbiguousRunId
    from dr_orchestrator.plans import default_actor

    with session_factory(ctx)() as session, session.begin():
        try:
            row = record_check(session, run_id, check, result, detail, default_actor(), service=service)
        except (AnnotationError, AmbiguousRunId) as exc:
            raise UserError(str(exc)) from None
        recorded = (row.id, row.run_id)
    click.echo(f"reconciliation {recorded[0]} recorded on run {recorded[1]}: {check}: {result}")


# ---------------------------------------------------------------- reports


@cli.group()
def report() -> None:
    """After-action and quarterly compliance reports."""


@report.command("run")
@click.argument("run_id", metavar="RUN")
@click.option("--format", "fmt", type=click.Choice(["html", "pdf"]), default="html", show_default=True)
@click.option("--out", type=click.Path(dir_okay=False), help="file to write (required for pdf)")
@click.pass_context
def report_run(ctx: click.Context, run_id: str, fmt: str, out: str | None) -> None:
    """The after-action report of one run (a run or drill run id, or a unique prefix; a drill run
    gives its failover run's report, with the drill's verdict)."""
    from dr_orchestrator.evidence import reports
    from dr_orchestrator.evidence.pdf import PdfError, html_to_pdf
    from dr_orchestrator.evidence.queries import AmbiguousRunId

    _binary_needs_out(fmt, out)
    with session_factory(ctx)() as session:
        try:
            html = reports.after_action_html(session, run_id)
        except (reports.ReportError, AmbiguousRunId) as exc:
            raise UserError(str(exc)) from None
    if fmt == "pdf":
        try:
            _write_output(html_to_pdf(html), out)
        except PdfError as exc:
            raise UserError(str(exc)) from None
    else:
        _write_output(html, out)


@report.command("quarter")
@click.argument("quarter")
@click.option("--format", "fmt", type=click.Choice(["html", "pdf", "csv", "json"]), default="html",
              show_default=True)
@click.option("--service", help="only this service")
@click.option("--inventory", "-i", type=click.Path(dir_okay=False),
              help="account for this inventory's services (default: those of the inventories the runs used)")
@click.option("--levels", type=click.Path(dir_okay=False),
              help="capability level table (default: GB/T 20988-2007 Annex A examples)")
@click.option("--out", type=click.Path(dir_okay=False), help="file to write (required for pdf)")
@click.pass_context
def report_quarter(ctx: click.Context, quarter: str, fmt: str, service: str | None, inventory: str | None,
                   levels: str | None, out: str | None) -> None:
    """The quarterly compliance report, e.g. `dr report quarter 2026Q3`."""
    from dr_orchestrator.evidence import reports
    from dr_orchestrator.evidence.levels import LevelsError, load_levels
    from dr_orchestrator.evidence.pdf import PdfError, html_to_pdf

    _binary_needs_out(fmt, out)
    services = None
    if inventory:
        from dr_orchestrator.evidence.store import target_snapshot_of
        from dr_orchestrator.loading import load_inventory
        from dr_orchestrator.yamlsource import LoadError

        try:
            services = target_snapshot_of(load_inventory(inventory)[0])
        except LoadError as exc:
            fail_with_problems(exc.problems, "text")
    try:
        table = load_levels(levels)
        with session_factory(ctx)() as session:
            data = reports.quarter_data(session, quarter, service=service, inventory_services=services, levels=table)
    except (reports.ReportError, LevelsError) as exc:
        raise UserError(str(exc)) from None
    if fmt == "json":
        _write_output(reports.quarter_json(data), out)
    elif fmt == "csv":
        _write_output(reports.quarter_csv(data), out)
    elif fmt == "pdf":
        try:
            _write_output(html_to_pdf(reports.render_quarter(data)), out)
        except PdfError as exc:
            raise UserError(str(exc)) from None
    else:
        _write_output(reports.render_quarter(data), out)


# ---------------------------------------------------------------- database and actions


@cli.group()
def db() -> None:
    """The evidence database schema (Alembic migrations)."""


@db.command("upgrade")
@click.option("--revision", default="head", show_default=True)
@click.pass_context
def db_upgrade(ctx: click.Context, revision: str) -> None:
    """Create or migrate the evidence database."""
    from dr_orchestrator.evidence import migrate
    from dr_orchestrator.evidence.database import database_url

    url = database_url(database_of(ctx))
    try:
        migrate.upgrade(url, revision)
    except migrate.MigrationError as exc:
        raise UserError(str(exc)) from None
    click.echo(f"evidence database {migrate.display_url(url)} is at revision {migrate.current_revision(url)}")


@db.command("downgrade")
@click.argument("revision")
@click.pass_context
def db_downgrade(ctx: click.Context, revision: str) -> None:
    """Migrate the evidence database down to REVISION (`base` removes every table)."""
    from dr_orchestrator.evidence import migrate
    from dr_orchestrator.evidence.database import database_url

    url = database_url(database_of(ctx))
    try:
        migrate.downgrade(url, revision)
    except migrate.MigrationError as exc:
        raise UserError(str(exc)) from None
    click.echo(f"evidence database {migrate.display_url(url)} is at revision {migrate.current_revision(url)}")


@cli.command()
@output_option
def actions(output: str) -> None:
    """List the actions a step can use, with each parameter's type, default (or "required") and description."""
    from dr_orchestrator.actions import default_registry

    registry = default_registry()
    listing: dict[str, dict[str, dict[str, Any]]] = {}
    for name in registry.names():
        model = registry.get(name).Params
        listing[name] = {}
        for field, info in model.model_fields.items():
            entry: dict[str, Any] = {"type": type_name(info.annotation), "required": info.is_required()}
            if not info.is_required():
                entry["default"] = info.get_default(call_default_factory=True)
            entry["description"] = info.description or ""
            listing[name][info.alias or field] = entry
    if output == "json":
        click.echo(json.dumps(listing, indent=2, default=str))
        return
    for name, fields in listing.items():
        click.echo(name)
        for field, entry in fields.items():
            how = "required" if entry["required"] else f"default {entry['default']!r}"
            described = f": {entry['description']}" if entry["description"] else ""
            click.echo(f"    {field} ({entry['type']}, {how}){described}")


def type_name(annotation: Any) -> str:
    """A parameter's type as a runbook author reads it: ``str | None``, ``list[str]``, ``duration``."""
    import enum
    import types
    import typing

    from dr_orchestrator.model.durations import parse_duration

    origin, args = typing.get_origin(annotation), typing.get_args(annotation)
    if origin is typing.Annotated:
        if any(getattr(meta, "func", None) is parse_duration for meta in args[1:]):
            return "duration"
        return type_name(args[0])
    if origin in (typing.Union, types.UnionType):
        return " | ".join(dict.fromkeys(type_name(arg) for arg in args))
    if origin is typing.Literal:
        return " | ".join(repr(arg) for arg in args)
    if annotation is type(None):
        return "None"
    if annotation is typing.Any:
        return "any"
    if origin is not None:
        inner = ", ".join("..." if arg is Ellipsis else type_name(arg) for arg in args)
        return f"{getattr(origin, '__name__', str(origin))}[{inner}]" if inner else getattr(origin, "__name__", "")
    if isinstance(annotation, type) and issubclass(annotation, enum.Enum):
        return " | ".join(repr(member.value) for member in annotation)
    return getattr(annotation, "__name__", str(annotation).replace("typing.", ""))


@cli.command("schema")
@click.argument("kind", type=click.Choice(["runbook", "inventory", "drill"]))
def schema_command(kind: str) -> None:
    """Print the JSON Schema (draft 2020-12) of a runbook, inventory or drill file, for editors
    (yaml-language-server) and linters; a step's `with:` is checked against its action's parameters."""
    from dr_orchestrator.actions import default_registry
    from dr_orchestrator.schemas import schema

    click.echo(json.dumps(schema(kind, default_registry()), indent=2))


@cli.command()
@click.pass_context
def demo(ctx: click.Context) -> None:
    """The lab demo: two sites, kill the primary, fail over, compare RTO/RPO with the clients' view,
    keep the evidence, fail back. Exit 0 only when every service came back within its targets."""
    from dr_orchestrator.demo import DemoError, run_demo
    from dr_orchestrator.lab import LabConfig
    from dr_orchestrator.lab.system import LabSetupError
    from dr_orchestrator.yamlsource import LoadError

    try:
        verdict = run_demo(LabConfig.from_env(), database_of(ctx))
    except LoadError as exc:
        fail_with_problems(exc.problems, "text")
    except (DemoError, LabSetupError) as exc:
        raise UserError(str(exc)) from None
    if verdict.ok:
        click.echo("demo passed: every service came back within its RTO and RPO targets, as the clients saw it")
        return
    for problem in verdict.problems:
        click.echo(f"demo failed: {problem}", err=True)
    sys.exit(1)


def _mount_lab() -> None:
    from importlib.util import find_spec

    if find_spec("dr_orchestrator.lab.cli") is None:  # an install without the lab still works
        return
    from dr_orchestrator.lab.cli import lab_group

    cli.add_command(lab_group, "lab")


def _mount_drills() -> None:
    from dr_orchestrator.cli_drills import drill, scheduler

    cli.add_command(drill, "drill")
    cli.add_command(scheduler, "scheduler")


def _mount_incidents() -> None:
    from dr_orchestrator.cli_incidents import incidents

    cli.add_command(incidents, "incidents")


def _mount_watch() -> None:
    from dr_orchestrator.cli_watch import watch

    cli.add_command(watch, "watch")


def _mount_cluster() -> None:
    from dr_orchestrator.cli_cluster import cluster

    cli.add_command(cluster, "cluster")


def _mount_api() -> None:
    from dr_orchestrator.cli_api import serve, tokens

    cli.add_command(serve, "serve")
    cli.add_command(tokens, "tokens")


def main() -> None:
    from dr_orchestrator.cli_safety import mount

    mount(cli)
    _mount_drills()
    _mount_incidents()
    _mount_watch()
    _mount_cluster()
    _mount_api()
    _mount_lab()
    cli.main(prog_name="dr")


if __name__ == "__main__":
    main()
