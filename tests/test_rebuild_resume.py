"""``postgres.rebuild_standby`` killed anywhere and resumed: a streaming standby at the end, every time.

One lab serves every phase, on contract-signing's database (its standby is asynchronous: while it is
down, the primary's commits go on). Each phase kills the backup site's standby (so there is something to
rebuild), runs a one-step runbook that rebuilds it, and SIGKILLs the ``dr run`` process at a point
inside the rebuild; then ``dr resume`` must finish it. The kill points are deterministic: the
inventory's ``pg_bin`` is a directory of the real PostgreSQL programs in which pg_rewind,
pg_basebackup and pg_ctl are wrappers that stop where a request file asks and wait there (the
wrapper, and what it started, go on running after the orchestrator dies, as on a real host).
"""

from __future__ import annotations

import os
import stat
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import psycopg
import pytest
import yaml
from support.cli import Processes, dr, query, recorded
from support.waiting import wait_for

from dr_orchestrator.actions.postgres.rebuild import WORK_SUFFIX
from dr_orchestrator.lab import scratch
from dr_orchestrator.lab.config import PG_BIN, store_name
from dr_orchestrator.lab.lab import Lab
from dr_orchestrator.lab.processes import processes_under
from dr_orchestrator.lab.system import chown

pytestmark = [pytest.mark.lab, pytest.mark.slow, pytest.mark.own_lab]
REPO = Path(__file__).resolve().parent.parent
SERVICE = "contract-signing"  # whose database is rebuilt

RUNBOOK = """
name: rebuild-backup
description: Make the backup site's database a standby of the primary again.
kind: rehearsal
scope: {sites: [backup]}
steps:
  - id: rebuild
    action: postgres.rebuild_standby
    with: {database: contract-signing, site: backup, primary_site: primary, flush: false}
    timeout: 120s
    rollback: {none: the old standby is gone either way; only a rebuild brings it back}
"""

# $1: the program's name. A request file in $PAUSES says where to stop: before-POINT, during-POINT
# (pg_basebackup only: once the copy has begun, the copy is frozen with SIGSTOP) or after-POINT,
# POINT being the program's name, or pg_ctl-ACTION; fail-PROGRAM makes it fail at once.
# The Ansible twin (runbooks/playbooks/rebuild-standby.yml), as site-failback.yml runs it.
PLAYBOOK_RUNBOOK = """
name: rebuild-backup-with-ansible
description: Make the backup site's database a standby of the primary again, through Ansible.
kind: rehearsal
scope: {sites: [backup]}
steps:
  - id: rebuild
    action: ansible.playbook
    with:
      playbook: rebuild-standby.yml
      limit: backup
      extra_vars: {database: contract-signing, site: backup, primary_site: primary, flush: false}
    timeout: 300s
    rollback: {none: the old standby is gone either way; only a rebuild brings it back}
"""

WRAPPER = """#!/bin/sh
PAUSES={pauses}
program={program}
real={real}
point=$program
if [ "$program" = pg_ctl ]; then for arg; do action=$arg; done; point="pg_ctl-$action"; fi
# Waits until released, the lab is gone, or 120 s (a test that failed does not leave it behind).
pause() {{
    touch "$PAUSES/paused-$1"
    tries=0
    while [ ! -e "$PAUSES/release" ] && [ -d "$PAUSES" ] && [ $tries -lt 2400 ]; do
        sleep 0.05; tries=$((tries + 1))
    done
}}
if [ -e "$PAUSES/fail-$program" ]; then echo "$program failed on purpose (test wrapper)" >&2; exit 1; fi
[ -e "$PAUSES/before-$point" ] && pause "before-$point"
if [ -e "$PAUSES/during-$point" ]; then
    target=; previous=
    for arg; do [ "$previous" = -D ] && target=$arg; previous=$arg; done
    "$real" "$@" --max-rate=32 &
    child=$!
    while [ -z "$(ls -A "$target" 2>/dev/null)" ]; do sleep 0.01; done
    kill -STOP "$child"
    pause "during-$point"
    wait "$child"
    exit $?
fi
"$real" "$@"
status=$?
[ -e "$PAUSES/after-$point" ] && pause "after-$point"
exit $status
"""
WRAPPED = ("pg_rewind", "pg_basebackup", "pg_ctl")


class RebuildBench:
    """One lab, an inventory whose pg_bin is the wrapper directory, a runbook and an evidence database."""

    def __init__(self, lab: Lab, tmp: Path) -> None:
        self.lab, self.tmp = lab, tmp
        config = lab.config
        self.pg_bin = config.root / "test-pg-bin"
        self.work = Path(f"{config.pgdata('backup', SERVICE)}{WORK_SUFFIX}")
        self.pauses = config.root / "test-pauses"
        for directory in (self.pg_bin, self.pauses):
            directory.mkdir()
            chown(directory, config.os_user)
        for program in sorted(os.listdir(PG_BIN)):
            target = self.pg_bin / program
            if program in WRAPPED:
                target.write_text(WRAPPER.format(pauses=self.pauses, program=program, real=PG_BIN / program))
                target.chmod(target.stat().st_mode | stat.S_IXUSR | stat.S_IXGRP | stat.S_IXOTH)
            else:
                target.symlink_to(PG_BIN / program)
        inventory = yaml.safe_load(config.inventory_path.read_text())
        inventory["all"]["vars"]["dr"]["vars"]["databases"][SERVICE]["pg_bin"] = str(self.pg_bin)
        self.inventory = tmp / "inventory.yml"
        self.inventory.write_text(yaml.safe_dump(inventory, sort_keys=False))
        self.runbook = tmp / "rebuild.yml"
        self.runbook.write_text(RUNBOOK)
        self.playbook_runbook = tmp / "rebuild-with-ansible.yml"
        self.playbook_runbook.write_text(PLAYBOOK_RUNBOOK)
        (tmp / "playbooks").symlink_to(REPO / "runbooks" / "playbooks")
        self.db = f"sqlite:///{tmp / 'evidence.db'}"
        dr("db", "upgrade", db=self.db, cwd=tmp, check=True)

    def request(self, *names: str) -> None:
        for name in os.listdir(self.pauses):
            (self.pauses / name).unlink()
        for name in names:
            (self.pauses / name).touch()

    def paused(self) -> list[str]:
        return [name.removeprefix("paused-") for name in os.listdir(self.pauses) if name.startswith("paused-")]


@pytest.fixture(scope="module")
def bench(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RebuildBench]:
    with scratch.running_lab("own") as lab:
        yield RebuildBench(lab, tmp_path_factory.mktemp("rebuild-resume"))


def streaming(bench: RebuildBench) -> dict[str, Any]:
    """What both ends say about the backup's replication: the primary's walsender, the standby's receiver."""
    config = bench.lab.config
    with psycopg.connect(config.dsn("primary", SERVICE), autocommit=True) as primary:
        sender = primary.execute(
            "SELECT state FROM pg_stat_replication WHERE application_name = 'backup'").fetchall()
    with psycopg.connect(config.dsn("backup", SERVICE), autocommit=True) as standby:
        receiver = standby.execute("SELECT status FROM pg_stat_wal_receiver").fetchall()
        in_recovery, listening, port = standby.execute(
            "SELECT pg_is_in_recovery(), current_setting('listen_addresses'), current_setting('port')").fetchone()
    return {"sender": sender, "receiver": receiver, "in_recovery": in_recovery, "listen_addresses": listening,
            "port": port}


# Each phase: the request files that stop the rebuild inside it, what the resumed attempt finds of the
# killed one (its marks; "killed": its wrapper, still waiting on the host, had to be ended), and how the
# resumed attempt gets its copy.
PHASES: dict[str, tuple[list[str], set[str], str | None]] = {
    # pg_rewind has rewritten the data directory, with the primary's postgresql.conf: the reported case.
    # A rewind cut short is never trusted: the resumed attempt takes a base backup.
    "rewound, before its configuration": (["after-pg_rewind"], {"killed", "config", "rewinding"}, "pg_basebackup"),
    "during the base backup's copy": (
        ["fail-pg_rewind", "during-pg_basebackup"], {"killed", "config", "rewinding"}, "pg_basebackup"),
    "copied, before its configuration and the swap": (
        ["fail-pg_rewind", "after-pg_basebackup"], {"killed", "config", "rewinding"}, "pg_basebackup"),
    "swapped in, before the start": (
        ["fail-pg_rewind", "before-pg_ctl-start"], {"killed", "config", "ready"},
        "resumed: the rebuilt data directory is in place"),
    # By the resume it streams: only the killed attempt's leftovers are removed.
    "started, before it streams": (["fail-pg_rewind", "after-pg_ctl-start"], {"killed", "config", "ready"}, None),
}


def killed_inside(bench: RebuildBench, runbook: Path, requests: list[str], started: Processes) -> str:
    """Kill the standby, run ``runbook`` until the wrapper stops where ``requests`` say, SIGKILL the
    run there, and lift the stop (a failure asked for stays asked for); the run's id."""
    bench.lab.kill_service(store_name(SERVICE), "backup")  # a standby to rebuild: nothing streams to the primary
    bench.request(*requests)
    point = next(name for name in requests if not name.startswith("fail-"))
    run = started.start("run", str(runbook), "-i", str(bench.inventory), "-q", db=bench.db)
    wait_for(lambda: point in bench.paused() or run.poll() is not None, 60, f"the rebuild to reach {point}")
    assert run.poll() is None, run.communicate()
    started.kill(run)
    assert (bench.work / "config" / "postgresql.conf").exists()  # the site's own settings, kept across attempts
    bench.request(*[name for name in requests if name.startswith("fail-")])
    return str(query(bench.db, "SELECT id FROM runs ORDER BY started_at DESC LIMIT 1")[0][0])


def assert_a_streaming_standby_and_nothing_left(bench: RebuildBench) -> None:
    config = bench.lab.config
    state = streaming(bench)
    assert state["sender"] == [("streaming",)] and state["receiver"] == [("streaming",)], state
    assert state["in_recovery"] is True
    assert (state["listen_addresses"], state["port"]) == (config.address("backup"), str(config.postgres_port(SERVICE)))
    assert not bench.work.exists()  # nothing of the attempts is left behind
    # Only contract-signing's store was touched: trading's standby went on streaming, synchronous.
    with psycopg.connect(config.dsn("primary", "trading"), autocommit=True) as other:
        assert other.execute("SELECT state, sync_state FROM pg_stat_replication").fetchall() == [("streaming", "sync")]
    assert not [pid for pid in processes_under(config.root) if str(bench.pg_bin) in _command(pid)]


@pytest.mark.parametrize("phase", PHASES)
def test_a_rebuild_killed_in_each_phase_ends_streaming_after_resume(
    phase: str, bench: RebuildBench, processes: Processes
) -> None:
    requests, found, method = PHASES[phase]
    run_id = killed_inside(bench, bench.runbook, requests, processes)

    resumed = dr("resume", run_id, "-q", db=bench.db, cwd=bench.tmp, actor="bob")

    assert resumed.returncode == 0, resumed.stdout + resumed.stderr
    assert_a_streaming_standby_and_nothing_left(bench)
    detail, _ = recorded(bench.db, run_id)
    [rebuild] = [s for s in detail["steps"] if s["step_id"] == "rebuild" and s["state"] == "succeeded"]
    output = rebuild["output"]
    if method is None:
        assert output["already_streaming"] is True and set(output["leftovers"]) >= found, output
    else:
        assert set(output["resumed"]) >= found and output["method"] == method, output


def test_the_playbook_killed_during_its_copy_ends_streaming_when_retried(
    bench: RebuildBench, processes: Processes
) -> None:
    requests, _, _ = PHASES["during the base backup's copy"]
    run_id = killed_inside(bench, bench.playbook_runbook, requests, processes)

    # A playbook is not idempotent for the engine: the engineer says to run it again.
    resumed = dr("resume", run_id, "-q", "--retry", "rebuild", db=bench.db, cwd=bench.tmp, actor="bob")

    assert resumed.returncode == 0, resumed.stdout + resumed.stderr
    assert_a_streaming_standby_and_nothing_left(bench)


def leave_attempt(bench: RebuildBench, marks: dict[str, str], data_dir_to: str | None = None) -> None:
    """The work directory a killed attempt would have left: the site's saved configuration, the given
    marks, and the data directory moved to ``data_dir_to`` inside it (a swap cut between its renames)."""
    config = bench.lab.config
    bench.lab.kill_service(store_name(SERVICE), "backup")
    data_dir, work = config.pgdata("backup", SERVICE), bench.work
    (work / "config").mkdir(parents=True)
    for name in ("postgresql.conf", "pg_hba.conf", "pg_ident.conf", "postgresql.auto.conf"):
        (work / "config" / name).write_bytes((data_dir / name).read_bytes())
    for mark, content in marks.items():
        (work / mark).write_text(content)
    for path in (work, *work.iterdir(), *(work / "config").iterdir()):
        chown(path, config.os_user)
    if data_dir_to is not None:
        # As the killed attempt found it: the old server stopped and gone (its socket's lock file
        # names its pid); the copy, a base backup, without a postmaster.pid.
        postmaster = (data_dir / "postmaster.pid").read_text().split()[0]
        wait_for(lambda: not Path(f"/proc/{postmaster}").exists(), 60, "the killed postmaster to be reaped")
        (data_dir / "postmaster.pid").unlink()
        data_dir.rename(work / data_dir_to)


def run_rebuild(bench: RebuildBench) -> dict[str, Any]:
    bench.request()
    ran = dr("run", str(bench.runbook), "-i", str(bench.inventory), "-q", db=bench.db, cwd=bench.tmp)
    run_id = str(query(bench.db, "SELECT id FROM runs ORDER BY started_at DESC LIMIT 1")[0][0])
    detail, _ = recorded(bench.db, run_id)
    [rebuild] = [s for s in detail["steps"] if s["step_id"] == "rebuild"]
    log = bench.lab.config.postgres_log("backup", SERVICE)
    assert ran.returncode == 0, (rebuild["error"], log.read_text()[-1500:])
    output: dict[str, Any] = rebuild["output"]
    return output


def test_a_swap_cut_between_its_two_renames_is_finished(bench: RebuildBench) -> None:
    leave_attempt(bench, {"copy_complete": ""}, data_dir_to="copy")

    output = run_rebuild(bench)

    assert output["server_found"] == "missing" and output["method"] == "resumed: pg_basebackup", output
    assert_a_streaming_standby_and_nothing_left(bench)


def test_a_ready_mark_whose_data_directory_ran_since_is_not_trusted(bench: RebuildBench) -> None:
    leave_attempt(bench, {"ready": "Database system identifier: 1\nLatest checkpoint location: 0/1\n"})

    output = run_rebuild(bench)

    assert output["resumed"] == ["config", "stale_ready"] and output["method"] == "pg_basebackup", output
    assert output["rewind_error"] == "an earlier attempt's rebuilt data directory has run since it was marked ready"
    assert_a_streaming_standby_and_nothing_left(bench)


def test_a_rebuild_of_a_streaming_standby_changes_nothing(bench: RebuildBench) -> None:
    before = streaming(bench)
    postmaster = (bench.lab.config.pgdata("backup", SERVICE) / "postmaster.pid").read_text().split()[0]
    assert run_rebuild(bench)["already_streaming"] is True
    assert streaming(bench) == before
    assert (bench.lab.config.pgdata("backup", SERVICE) / "postmaster.pid").read_text().split()[0] == postmaster


def _command(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode()
    except OSError:
        return ""
