"""Anchors: signed checkpoints of the chain head, kept outside the database, catch what the chain alone
cannot: a database rewritten with every hash recomputed by the project's own functions, and a chain
cut short with its newest run. Sinks: a local append-only file, an S3 bucket under Object Lock
(moto's server), a webhook; the anchor made at a run's end; `dr evidence anchor` and
`dr evidence verify --anchors`."""

from __future__ import annotations

import json
import logging
import threading
from collections.abc import Iterator
from functools import partial
from http.server import SimpleHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import pytest
from botocore.exceptions import ClientError
from evidence_runs import Restore, run_small, small_plan
from notify_servers import start_webhook_receiver
from sqlalchemy import Connection, select, text
from sqlalchemy.engine import make_url
from sqlalchemy.orm import Session, sessionmaker
from support.aws import REGION, Moto
from support.evidence import dr

from dr_orchestrator import anchoring
from dr_orchestrator.actions import default_registry
from dr_orchestrator.evidence import anchors, chain, migrate
from dr_orchestrator.evidence.database import make_engine, make_session_factory
from dr_orchestrator.evidence.models import AuditEvent, Run, ServiceResult
from dr_orchestrator.evidence.signing import generate_keypair, load_public_key, load_signing_key
from dr_orchestrator.runs.execute import execute

pytestmark = pytest.mark.timeout(180)


@pytest.fixture
def keys(tmp_path: Path) -> tuple[Path, Path]:
    return generate_keypair(tmp_path / "keys")


def anchor_to(sessions: sessionmaker[Session], private: Path, *sinks: anchors.Sink,
              run_id: str | None = None) -> anchors.AnchorOutcome:
    outcome = anchors.anchor_chain(sessions, load_signing_key(f"file:{private}"), sinks, actor="test", run_id=run_id)
    assert outcome.ok, outcome.as_dict()
    return outcome


def check(sessions: sessionmaker[Session], source: Path, public: Path) -> anchors.AnchorReport:
    with sessions() as session:
        return anchors.check_anchors(session.connection(), str(source), anchors.read_file(source),
                                     load_public_key(public.read_bytes()))


def as_attacker(url: str, change: Any) -> None:
    """Change the database behind the store's back (on PostgreSQL with the evidence triggers off, as a
    superuser could), then leave the chain consistent again."""
    engine = make_engine(url)
    try:
        with engine.begin() as conn:
            if conn.dialect.name == "postgresql":
                conn.execute(text("SET LOCAL session_replication_role = replica"))
            change(conn)
    finally:
        engine.dispose()


def relink_from(conn: Connection, first: int) -> None:
    """Recompute every entry's hash and link from ``first`` on, with the chain's own functions."""
    entries = chain.ENTRIES
    prev = conn.execute(select(entries.c.entry_sha256).where(entries.c.seq == first - 1)).scalar() or chain.GENESIS
    for entry in conn.execute(select(entries).where(entries.c.seq >= first).order_by(entries.c.seq)).mappings().all():
        relinked = dict(entry) | {"prev_sha256": prev}
        prev = chain.entry_sha256(relinked)
        conn.execute(entries.update().where(entries.c.seq == entry["seq"]).values(prev_sha256=relinked["prev_sha256"],
                                                                                   entry_sha256=prev))


def rewrite_as_succeeded(run_id: str) -> Any:
    """The failed run becomes a success restored in a millisecond; its rows' newest entries get the new
    content hashes and the chain is relinked from the earliest of them."""
    def change(conn: Connection) -> None:
        entries = chain.ENTRIES
        runs, results = chain.CHAINED_TABLES["runs"], chain.CHAINED_TABLES["service_results"]
        conn.execute(runs.update().where(runs.c.id == run_id).values(state="succeeded", error=None))
        conn.execute(results.update().where(results.c.run_id == run_id).values(rto_s=0.001, rto_met=True))
        rewritten = [(runs, conn.execute(select(runs).where(runs.c.id == run_id)).mappings().one())]
        rewritten += [(results, row) for row in conn.execute(select(results).where(results.c.run_id == run_id))
                      .mappings()]
        first = None
        for table, row in rewritten:
            key = str(row[chain.primary_key(table).name])
            newest = conn.execute(select(entries.c.seq).where(entries.c.table_name == table.name,
                                                              entries.c.record_id == key)
                                  .order_by(entries.c.seq.desc()).limit(1)).scalar_one()
            conn.execute(entries.update().where(entries.c.seq == newest)
                         .values(content_sha256=chain.content_sha256(table, dict(row))))
            first = newest if first is None else min(first, newest)
        assert first is not None
        relink_from(conn, first)
    return change


def cut_off_from(first: int) -> Any:
    """Delete every record whose entries start at ``first`` or later, and those entries."""
    def change(conn: Connection) -> None:
        entries = chain.ENTRIES
        tail = set(conn.execute(select(entries.c.table_name, entries.c.record_id).where(entries.c.seq >= first)))
        for name, table in reversed(chain.CHAINED_TABLES.items()):  # rows referring to others go first
            key = chain.primary_key(table)
            ids = [key.type.python_type(record_id) for table_name, record_id in tail if table_name == name]
            conn.execute(table.delete().where(key.in_(ids)))
        conn.execute(entries.delete().where(entries.c.seq >= first))
    return change


def first_entry_of(sessions: sessionmaker[Session], run_id: str) -> int:
    entries = chain.ENTRIES
    with sessions() as session:
        return int(session.execute(select(entries.c.seq).where(entries.c.table_name == "runs",
                                                               entries.c.record_id == run_id)
                                   .order_by(entries.c.seq).limit(1)).scalar_one())


@pytest.mark.slow
def test_untampered_database_verifies_against_its_anchors(
    database_url: str, sessions: sessionmaker[Session], keys: tuple[Path, Path], tmp_path: Path
) -> None:
    private, public = keys
    sink = anchors.FileSink(tmp_path / "anchors.jsonl")
    first = anchor_to(sessions, private, sink)  # an empty chain anchors too
    run_small(sessions)
    second = anchor_to(sessions, private, sink)
    run_small(sessions, fail=True)

    lines = sink.path.read_text().splitlines()
    assert [json.loads(line)["seq"] for line in lines] == [first.anchor.seq, second.anchor.seq]
    assert first.anchor.seq == 0 < second.anchor.seq
    report = check(sessions, sink.path, public)
    assert report.ok and report.anchors == 2, report.as_dict()
    assert report.newest == second.anchor and report.uncovered == report.head_seq - second.anchor.seq > 0
    with sessions() as session:  # each anchoring is an audit event, with what each sink said
        event = session.scalars(select(AuditEvent).where(AuditEvent.action == anchors.AUDIT_ACTION)
                                .order_by(AuditEvent.id.desc())).first()
    assert event is not None and event.data["seq"] == second.anchor.seq
    assert event.data["sinks"] == [{"sink": sink.name, "ok": True, "detail": f"appended to {sink.path}"}]

    ok = dr("evidence", "verify", "--anchors", str(sink.path), "--public-key", str(public), db=database_url,
            cwd=tmp_path)
    assert ok.returncode == 0, ok.stdout + ok.stderr
    assert f"anchored: 2 anchor(s) from {sink.path} match the chain; newest: entry {second.anchor.seq}" in ok.stdout

    # The same anchors listed by a URL (JSON lines here; a JSON array is read too).
    server = ThreadingHTTPServer(("127.0.0.1", 0), partial(SimpleHTTPRequestHandler, directory=str(tmp_path)))
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        listed = anchoring.read_source(f"http://127.0.0.1:{server.server_address[1]}/{sink.path.name}")
    finally:
        server.shutdown()
        server.server_close()
        thread.join(5)
    assert [found.anchor for found in listed] == [first.anchor, second.anchor]


def failed_run_anchored(sessions: sessionmaker[Session], private: Path,
                        sink: anchors.Sink) -> tuple[anchors.Anchor, str, anchors.Anchor]:
    """A run and an anchor, then a failed run anchored at its end: (the anchor before it, its id, its anchor)."""
    run_small(sessions)
    before = anchor_to(sessions, private, sink).anchor
    failed = run_small(sessions, fail=True)
    return before, failed, anchor_to(sessions, private, sink, run_id=failed).anchor


@pytest.mark.slow
def test_consistent_rewrite_is_named_by_the_anchors(
    database_url: str, sessions: sessionmaker[Session], keys: tuple[Path, Path], tmp_path: Path
) -> None:
    private, public = keys
    sink = anchors.FileSink(tmp_path / "anchors.jsonl")
    before, failed, covering = failed_run_anchored(sessions, private, sink)
    run_small(sessions)
    anchor_to(sessions, private, sink)

    as_attacker(database_url, rewrite_as_succeeded(failed))

    with sessions() as session:
        assert session.get(Run, failed).state == "succeeded"  # type: ignore[union-attr]
        assert session.scalars(select(ServiceResult.rto_s).where(ServiceResult.run_id == failed)).all() == [0.001]
        assert chain.verify_session(session).ok  # the chain alone is fooled: that is the attack
    report = check(sessions, sink.path, public)
    assert [(p.kind, p.seq) for p in report.problems] == [("rewritten", covering.seq),
                                                          ("rewritten", report.newest.seq)]  # type: ignore[union-attr]
    named = report.problems[0].detail
    assert f"the change lies in entries {before.seq + 1} to {covering.seq}" in named
    assert f"runs id {failed}" in named and covering.head_sha256 in named
    assert f"made at the end of run {failed}" in named

    tampered = dr("evidence", "verify", "--anchors", f"file:{sink.path}", "--public-key", str(public),
                  db=database_url, cwd=tmp_path)
    assert tampered.returncode == 1, tampered.stdout + tampered.stderr
    assert tampered.stdout.startswith("intact:")  # the chain's own check passes ...
    assert (f"TAMPERED (anchors): rewritten: {sink.path} line 2 (chain entry {covering.seq}): "
            in tampered.stdout)  # ... the anchor does not
    as_json = json.loads(dr("evidence", "verify", "--anchors", str(sink.path), "--public-key", str(public), "-o",
                            "json", db=database_url, cwd=tmp_path).stdout)
    assert as_json["ok"] and not as_json["anchors"]["ok"]
    assert as_json["anchors"]["problems"][0]["kind"] == "rewritten"


@pytest.mark.slow
def test_truncation_of_the_newest_run_is_named(
    database_url: str, sessions: sessionmaker[Session], keys: tuple[Path, Path], tmp_path: Path
) -> None:
    private, public = keys
    sink = anchors.FileSink(tmp_path / "anchors.jsonl")
    kept, newest, cut = failed_run_anchored(sessions, private, sink)

    as_attacker(database_url, cut_off_from(first_entry_of(sessions, newest)))

    with sessions() as session:
        assert session.get(Run, newest) is None
        verified = chain.verify_session(session)
    assert verified.ok and verified.head_seq == kept.seq + 1  # gone without a trace in the chain
    report = check(sessions, sink.path, public)
    assert [(p.kind, p.seq) for p in report.problems] == [("truncated", cut.seq)]
    assert (f"with {cut.seq} entries; the chain ends at {verified.head_seq}: entries "
            f"{verified.head_seq + 1} to {cut.seq} removed; made at the end of run {newest}, which is no "
            f"longer in the database") in report.problems[0].detail

    result = dr("evidence", "verify", "--anchors", str(sink.path), "--public-key", str(public), db=database_url,
                cwd=tmp_path)
    assert result.returncode == 1 and "TAMPERED (anchors): truncated:" in result.stdout, result.stdout


def test_forged_unreadable_and_foreign_anchors_are_reported(
    sessions: sessionmaker[Session], keys: tuple[Path, Path], tmp_path: Path
) -> None:
    private, public = keys
    path = tmp_path / "anchors.jsonl"
    run_small(sessions)
    genuine = anchor_to(sessions, private, anchors.FileSink(path)).anchor
    # Someone without the key moves the checkpoint back, keeping the signature; another signs with their own key.
    forged = genuine.as_dict() | {"seq": genuine.seq - 1}
    other_private, _ = generate_keypair(tmp_path / "other")
    with sessions() as session:
        foreign = anchors.make_anchor(session.connection(), load_signing_key(f"file:{other_private}"))
    with path.open("a") as handle:
        handle.write(json.dumps(forged) + "\n" + foreign.line().decode() + "{not json\n")

    report = check(sessions, path, public)
    assert [(p.kind, p.origin) for p in report.problems] == [
        ("forged", f"{path} line 2"), ("untrusted key", f"{path} line 3"), ("unreadable", f"{path} line 4")]
    assert report.anchors == 1 and not report.ok

    empty = tmp_path / "empty.jsonl"
    empty.write_text("")
    assert [p.kind for p in check(sessions, empty, public).problems] == ["no anchors"]


@pytest.mark.slow
def test_cli_refuses_bad_input_with_one_sentence(
    database_url: str, sessions: sessionmaker[Session], keys: tuple[Path, Path], tmp_path: Path
) -> None:
    private, public = keys
    missing = dr("evidence", "verify", "--anchors", str(tmp_path / "nowhere.jsonl"), "--public-key", str(public),
                 db=database_url, cwd=tmp_path)
    assert missing.returncode == 2 and "cannot read the anchors file" in missing.stderr
    no_key = dr("evidence", "verify", "--anchors", str(tmp_path / "a.jsonl"), db=database_url, cwd=tmp_path)
    assert no_key.returncode == 2 and "--anchors SOURCE needs --public-key" in no_key.stderr
    bad_sink = dr("evidence", "anchor", "--sink", "ftp://x", "--signing-key", f"file:{private}", db=database_url,
                  cwd=tmp_path)
    assert bad_sink.returncode == 2 and "anchor sink 'ftp://x' is not" in bad_sink.stderr
    no_signing_key = dr("evidence", "anchor", "--sink", f"file:{tmp_path}/a.jsonl", db=database_url, cwd=tmp_path)
    assert no_signing_key.returncode == 2 and "no anchor signing key" in no_signing_key.stderr
    for result in (missing, no_key, bad_sink, no_signing_key):
        assert "Traceback" not in result.stderr


@pytest.mark.slow
def test_cli_anchor_writes_every_sink_and_names_the_one_that_failed(
    database_url: str, sessions: sessionmaker[Session], keys: tuple[Path, Path], tmp_path: Path
) -> None:
    private, public = keys
    run_small(sessions)
    receiver, stop = start_webhook_receiver()
    try:
        path = tmp_path / "anchors.jsonl"
        made = dr("evidence", "anchor", "--sink", f"file:{path}", "--sink", receiver.url, "--signing-key",
                  f"file:{private}", "-o", "json", db=database_url, cwd=tmp_path)
        assert made.returncode == 0, made.stdout + made.stderr
        outcome = json.loads(made.stdout)
        (line,) = path.read_text().splitlines()
        assert json.loads(line) == outcome["anchor"] == json.loads(receiver.wait_for(1)[0].body)
        assert [s["ok"] for s in outcome["sinks"]] == [True, True]

        receiver.fail_first = 10  # answers 503 to every try
        failed = dr("evidence", "anchor", "--sink", f"file:{path}", "--sink", receiver.url, "--signing-key",
                    f"file:{private}", db=database_url, cwd=tmp_path)
        assert failed.returncode == 1, failed.stdout + failed.stderr
        assert "FAILED webhook http://127.0.0.1:" in failed.stdout and "not delivered after 3 tries" in failed.stdout
        assert len(path.read_text().splitlines()) == 2  # the file sink still has it
    finally:
        stop()
    assert check(sessions, path, public).ok


@pytest.mark.aws
@pytest.mark.slow
def test_s3_sink_under_object_lock(
    aws: Moto, database_url: str, sessions: sessionmaker[Session],
    keys: tuple[Path, Path], tmp_path: Path,
) -> None:
    private, public = keys
    s3 = aws.client("s3")
    s3.create_bucket(Bucket="dr-anchors", ObjectLockEnabledForBucket=True,
                     CreateBucketConfiguration={"LocationConstraint": REGION})
    (sink,) = anchoring.parse_sinks(f"s3://dr-anchors/prod?retain_days=30&region={REGION}")
    failed = run_small(sessions, fail=True)
    outcome = anchor_to(sessions, private, sink, run_id=failed)
    run_small(sessions)
    anchor_to(sessions, private, sink)

    listed = s3.list_object_versions(Bucket="dr-anchors", Prefix="prod/")["Versions"]
    assert len(listed) == 2 and all(v["Key"].endswith(".json") for v in listed)
    first = min(listed, key=lambda v: v["Key"])
    assert first["Key"] == f"prod/{outcome.anchor.seq:012d}-{outcome.anchor.at:%Y%m%dT%H%M%S%fZ}.json"
    head = s3.head_object(Bucket="dr-anchors", Key=first["Key"], VersionId=first["VersionId"])
    assert head["ObjectLockMode"] == "COMPLIANCE"
    with pytest.raises(ClientError, match="AccessDenied"):
        s3.delete_object(Bucket="dr-anchors", Key=first["Key"], VersionId=first["VersionId"])
    s3.delete_object(Bucket="dr-anchors", Key=first["Key"])  # a delete marker hides it from a plain listing ...

    source = f"s3://dr-anchors/prod?region={REGION}"
    ok = dr("evidence", "verify", "--anchors", source, "--public-key", str(public), db=database_url, cwd=tmp_path)
    assert ok.returncode == 0 and "anchored: 2 anchor(s)" in ok.stdout, ok.stdout + ok.stderr  # ... not from us

    as_attacker(database_url, rewrite_as_succeeded(failed))
    tampered = dr("evidence", "verify", "--anchors", source, "--public-key", str(public), db=database_url,
                  cwd=tmp_path)
    assert tampered.returncode == 1
    assert f"rewritten: s3://dr-anchors/{first['Key']} version {first['VersionId']}" in tampered.stdout


@pytest.fixture
def anchored_runs(tmp_path: Path, keys: tuple[Path, Path], monkeypatch: pytest.MonkeyPatch) -> Iterator[Any]:
    """Anchoring configured as an operator would, to a file and a webhook receiver."""
    receiver, stop = start_webhook_receiver()
    path = tmp_path / "run-anchors.jsonl"
    monkeypatch.setenv(anchoring.SINKS_ENV, f"file:{path}, {receiver.url}")
    monkeypatch.setenv(anchoring.KEY_ENV, f"file:{keys[0]}")
    try:
        yield path, receiver
    finally:
        anchoring.wait_for_pending(30)
        stop()


def execute_small(sessions: sessionmaker[Session], **options: Any) -> str:
    registry = default_registry()
    registry.register("test.restore", f"{Restore.__module__}:Restore")
    outcome = execute(sessions, small_plan(**options), registry=registry)
    assert anchoring.wait_for_pending(30), "the run-end anchor was not written within 30 s"
    return outcome.run_id


def anchor_events(sessions: sessionmaker[Session]) -> list[AuditEvent]:
    with sessions() as session:
        return list(session.scalars(select(AuditEvent).where(AuditEvent.action == anchors.AUDIT_ACTION)
                                    .order_by(AuditEvent.id)))


@pytest.mark.slow
def test_every_run_end_is_anchored(
    anchored_runs: Any, sessions: sessionmaker[Session], keys: tuple[Path, Path],
    monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    path, receiver = anchored_runs
    run_id = execute_small(sessions)

    (line,) = path.read_text().splitlines()
    anchor = json.loads(line)
    assert anchor["run_id"] == run_id and json.loads(receiver.wait_for(1)[0].body) == anchor
    with sessions() as session:
        run = session.get(Run, run_id)
        assert run is not None and run.state == "succeeded"
        entries = chain.ENTRIES
        run_end = session.execute(select(entries.c.seq).where(entries.c.table_name == "runs",
                                                              entries.c.record_id == run_id)
                                  .order_by(entries.c.seq.desc()).limit(1)).scalar_one()
        head = chain.verify_session(session).head_seq
    assert anchor["seq"] >= run_end  # the run's end is covered ...
    assert head == anchor["seq"] + 1  # ... and the anchoring's own audit event came after it
    (event,) = anchor_events(sessions)
    assert event.data["run_id"] == run_id and [s["ok"] for s in event.data["sinks"]] == [True, True]
    with sessions() as session:  # what a record's integrity field names
        assert anchors.recorded_anchor_covering(session, run_end) == {
            "seq": anchor["seq"], "head_sha256": anchor["head_sha256"], "at": event.at.isoformat(),
            "key": anchor["key"], "sinks": [f"file:{path}", f"webhook http://127.0.0.1:{receiver.port}/…"]}
        assert anchors.recorded_anchor_covering(session, head) is None  # the anchoring's own event: not yet
    assert check(sessions, path, keys[1]).ok

    # A sink that fails: the run is not failed nor held up; the failure is recorded and logged.
    monkeypatch.setenv(anchoring.SINKS_ENV, f"file:{path} http://127.0.0.1:9/nobody-listens")
    with caplog.at_level(logging.WARNING, logger="dr_orchestrator.anchoring"):
        second = execute_small(sessions, fail=True)
    assert len(path.read_text().splitlines()) == 2
    failure = anchor_events(sessions)[-1]
    assert failure.data["run_id"] == second
    assert [(s["ok"], s["sink"]) for s in failure.data["sinks"]] == [
        (True, f"file:{path}"), (False, "webhook http://127.0.0.1:9/…")]
    assert f"(end of run {second}) not written to webhook http://127.0.0.1:9/…" in caplog.text

    # Misconfigured: no key. The run still ends as it would; the anchor not made is recorded.
    monkeypatch.delenv(anchoring.KEY_ENV)
    third = execute_small(sessions)
    with sessions() as session:
        assert session.get(Run, third).state == "succeeded"  # type: ignore[union-attr]
    assert anchor_events(sessions)[-1].data == {
        "run_id": third, "error": "no anchor signing key: pass --signing-key or set DR_ANCHOR_SIGNING_KEY="
                                  "file:/path/to/key.pem (create a pair with `dr evidence keygen`)"}


@pytest.mark.postgres
def test_a_separate_host_with_a_read_only_role_anchors(
    postgres_database_url: str, keys: tuple[Path, Path], tmp_path: Path
) -> None:
    """The key kept off the evidence host: another host reads the database with a role that cannot
    write and anchors from there; the refused audit event is said, the anchor is made all the same."""
    migrate.upgrade(postgres_database_url)
    writer = make_engine(postgres_database_url)
    role = f"anchorer_{tmp_path.name[-8:].replace('-', '_')}".lower()
    with writer.begin() as conn:
        conn.execute(text(f"CREATE ROLE {role} LOGIN"))
        conn.execute(text(f"GRANT SELECT ON ALL TABLES IN SCHEMA public TO {role}"))
    reader = make_engine(str(make_url(postgres_database_url).set(username=role)))
    try:
        sessions = make_session_factory(writer)
        run_small(sessions)
        sink = anchors.FileSink(tmp_path / "anchors.jsonl")
        outcome = anchor_to(make_session_factory(reader), keys[0], sink)
        assert outcome.recorded.startswith("not recorded in the database (ProgrammingError: ")
        with sessions() as session:
            assert outcome.anchor.seq == chain.verify_session(session).head_seq
        assert check(sessions, sink.path, keys[1]).ok
    finally:
        reader.dispose()
        with writer.begin() as conn:
            conn.execute(text(f"DROP OWNED BY {role}"))
            conn.execute(text(f"DROP ROLE {role}"))
        writer.dispose()
