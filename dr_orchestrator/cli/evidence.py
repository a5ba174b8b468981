"""`dr evidence ...`: the RTO/RPO evidence, its audit chain, anchors and signed packs."""

from __future__ import annotations

import json
import sys
from collections.abc import Callable
from typing import Any

import click

from dr_orchestrator.cli.common import TAMPERED, UserError, output_option, parse_time, session_factory, write_output


@click.group()
def evidence() -> None:
    """RTO/RPO evidence for compliance."""


@evidence.command("export")
@click.option("--format", "fmt", type=click.Choice(["json", "csv"]), default="json", show_default=True)
@click.option("--service", help="only this service")
@click.option("--since", help="only runs started at or after this ISO-8601 date or time (UTC unless it names its "
                              "zone)")
@click.option("--out", type=click.Path(dir_okay=False, writable=True), help="write to a file instead of stdout")
@click.pass_context
def evidence_export(ctx: click.Context, fmt: str, service: str | None, since: str | None, out: str | None) -> None:
    """One row per run and service: achieved RTO/RPO against targets, with the method."""
    from dr_orchestrator.evidence import auditor

    moment = parse_time(since, "--since", zone_required=False)
    with session_factory(ctx)() as session:
        text = auditor.export_evidence(session, fmt=fmt, service=service, since=moment)
    if out:
        with open(out, "w", encoding="utf-8", newline="") as handle:
            handle.write(text)
    else:
        click.echo(text, nl=False)


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
    write_output(data, target)
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
