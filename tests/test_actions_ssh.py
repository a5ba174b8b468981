"""ssh.run against the lab's real OpenSSH servers: pinned host keys, reuse, fan-out, timeouts."""

from __future__ import annotations

import socket
import subprocess
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest
from actionctx import Harness, lab_inventory

from dr_orchestrator.actions import default_registry
from dr_orchestrator.actions.base import ActionCancelled, ActionError, RunResources
from dr_orchestrator.actions.ssh import SshRun, SshRunParams, SshUnreachable, execute, transport_for
from dr_orchestrator.lab import Lab
from dr_orchestrator.model.inventory import Host, Inventory

pytestmark = pytest.mark.lab


@pytest.fixture
def harness(lab: Lab) -> Iterator[Harness]:
    harness = Harness(lab_inventory(lab))
    yield harness
    harness.close()


def with_hosts(inventory: Inventory, **hosts: Host) -> Inventory:
    return inventory.model_copy(update={"hosts": {**inventory.hosts, **hosts}})


def run(harness: Harness, timeout: float = 20.0, **params: object) -> dict[str, object]:
    return SshRun().run(SshRunParams.model_validate(params), harness.ctx(timeout)).output


def closed_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def test_runs_a_command_as_the_inventory_user_with_the_pinned_host_key(harness: Harness, lab: Lab) -> None:
    output = run(harness, hosts=["primary-app"], argv=["sh", "-c", "id -un; echo $SSH_CONNECTION; echo oops >&2"])

    result = output["hosts"]["primary-app"]  # type: ignore[index]
    assert result["exit_status"] == 0
    user, connection = result["stdout"].split("\n")[:2]
    assert user == lab.config.os_user
    assert connection.split()[2:] == ["127.0.10.1", str(lab.config.sshd_port)]
    assert result["stderr"] == "oops\n"
    assert output["unreachable"] == []


def test_argv_is_quoted_for_the_remote_shell(harness: Harness) -> None:
    output = run(harness, hosts=["backup-app"], argv=["printf", "%s|", "two words", "$HOME", "a;b"])

    assert output["hosts"]["backup-app"]["stdout"] == "two words|$HOME|a;b|"  # type: ignore[index]


def test_a_changed_host_key_is_refused_naming_host_and_file(harness: Harness, lab: Lab, tmp_path: Path) -> None:
    wrong = tmp_path / "known_hosts"
    # The backup site's key pinned for the primary's address: what a man in the middle would present.
    pins = lab.config.known_hosts.read_text().splitlines()
    backup_key = next(line for line in pins if line.startswith("[127.0.20.1]")).split(" ", 1)[1]
    wrong.write_text(f"[127.0.10.1]:{lab.config.sshd_port} {backup_key}\n")
    host = harness.inventory.hosts["primary-app"].model_copy(update={"known_hosts": str(wrong)})
    harness.inventory = with_hosts(harness.inventory, **{"primary-app": host})

    with pytest.raises(ActionError, match="differs from the one pinned in") as refused:
        run(harness, hosts=["primary-app"], command="true")

    assert "primary-app" in str(refused.value) and str(wrong) in str(refused.value)


def test_an_unknown_host_is_refused_and_never_added(harness: Harness, lab: Lab, tmp_path: Path) -> None:
    only_backup = tmp_path / "known_hosts"
    pins = lab.config.known_hosts.read_text().splitlines()
    only_backup.write_text("\n".join(line for line in pins if line.startswith("[127.0.20.1]")) + "\n")
    before = only_backup.read_text()
    host = harness.inventory.hosts["primary-app"].model_copy(update={"known_hosts": str(only_backup)})
    harness.inventory = with_hosts(harness.inventory, **{"primary-app": host})

    with pytest.raises(ActionError, match="is not in known_hosts file") as refused:
        run(harness, hosts=["primary-app"], command="true")

    assert "primary-app" in str(refused.value) and str(only_backup) in str(refused.value)
    assert only_backup.read_text() == before


def test_a_missing_known_hosts_file_is_a_clear_error(harness: Harness, tmp_path: Path) -> None:
    missing = tmp_path / "nowhere" / "known_hosts"
    host = harness.inventory.hosts["primary-app"].model_copy(update={"known_hosts": str(missing)})
    harness.inventory = with_hosts(harness.inventory, **{"primary-app": host})

    with pytest.raises(ActionError, match=f"primary-app .*known_hosts file {missing} does not exist"):
        run(harness, hosts=["primary-app"], command="true")


def test_fans_out_to_several_hosts_with_a_parallel_limit(harness: Harness) -> None:
    # Four inventory entries over the two sshd's: each answers from its own address.
    primary, backup = harness.inventory.hosts["primary-app"], harness.inventory.hosts["backup-app"]
    harness.inventory = with_hosts(
        harness.inventory,
        **{
            "primary-2": primary.model_copy(update={"name": "primary-2"}),
            "backup-2": backup.model_copy(update={"name": "backup-2"}),
        },
    )
    names = ["primary-app", "backup-app", "primary-2", "backup-2"]

    started = time.monotonic()
    output = run(harness, hosts=names, max_parallel=2, command="sleep 0.3; echo $SSH_CONNECTION")
    elapsed = time.monotonic() - started

    results = output["hosts"]
    assert set(results) == set(names)  # type: ignore[arg-type]
    for name in names:
        assert results[name]["exit_status"] == 0  # type: ignore[index]
        assert results[name]["stdout"].split()[2] == harness.inventory.hosts[name].address  # type: ignore[index]
    assert 0.6 <= elapsed < 1.2 + 1.0  # two rounds of two, not four in a row (1.2 s) nor all at once (0.3 s)


def test_a_failing_exit_status_fails_the_step_naming_the_host(harness: Harness) -> None:
    with pytest.raises(ActionError, match=r"backup-app exited with 3 \(bad thing\)"):
        run(harness, hosts=["backup-app"], command="echo bad thing >&2; exit 3")

    output = run(harness, hosts=["backup-app"], command="exit 3", expect_exit=[0, 3])
    assert output["hosts"]["backup-app"]["exit_status"] == 3  # type: ignore[index]


def test_output_is_bounded_per_stream(harness: Harness) -> None:
    output = run(harness, hosts=["primary-app"], command="head -c 300000 /dev/zero | tr '\\0' x", max_output=1000)

    result = output["hosts"]["primary-app"]  # type: ignore[index]
    assert result["stdout_truncated"] is True
    assert result["stdout"].startswith("x" * 500) and result["stdout"].endswith("x" * 500)
    assert "bytes dropped" in result["stdout"]


def test_an_unreachable_host_fails_unless_allowed_then_it_is_recorded(harness: Harness) -> None:
    dead = harness.inventory.hosts["primary-app"].model_copy(update={"name": "dead", "port": closed_port()})
    harness.inventory = with_hosts(harness.inventory, dead=dead)

    with pytest.raises(SshUnreachable, match="host dead .* is unreachable"):
        run(harness, hosts=["dead", "backup-app"], command="true")

    output = run(harness, hosts=["dead", "backup-app"], command="true", allow_unreachable=True)
    assert output["unreachable"] == ["dead"]
    assert output["hosts"]["dead"]["reachable"] is False  # type: ignore[index]
    assert output["hosts"]["backup-app"]["exit_status"] == 0  # type: ignore[index]


def test_the_step_deadline_stops_the_command_and_the_remote_program(harness: Harness) -> None:
    marker = f"{30 + uuid.uuid4().int % 1000 / 1000:.3f}"  # a sleep no one else runs
    started = time.monotonic()

    with pytest.raises(ActionCancelled, match="timeout passed .*channel closed"):
        run(harness, timeout=0.5, hosts=["primary-app"], argv=["sleep", marker])

    assert time.monotonic() - started < 1.5
    # The sites are this machine: the remote sleep must be gone too (sshd signalled its process group).
    end = time.monotonic() + 3
    while subprocess.run(["pgrep", "-f", f"sleep {marker}"], capture_output=True).returncode == 0:
        assert time.monotonic() < end, "the remote command outlived the step"
        time.sleep(0.02)
    # The connection survives for the next step.
    assert run(harness, hosts=["primary-app"], command="echo still")["hosts"]["primary-app"]["stdout"] == "still\n"  # type: ignore[index]


def test_one_connection_per_host_is_reused_within_a_run(harness: Harness) -> None:
    host = harness.inventory.hosts["primary-app"]
    cold_started = time.monotonic()
    execute(harness.ctx(), host, "true")
    cold = time.monotonic() - cold_started
    first = transport_for(harness.ctx(), host, 5.0)
    warm = min(execute(harness.ctx(), host, "true").duration_s for _ in range(5))

    assert transport_for(harness.ctx(), host, 5.0) is first
    assert warm < cold
    print(f"ssh exec: cold {cold * 1000:.1f} ms, warm {warm * 1000:.1f} ms")

    # A connection that died since its last use (the host restarted) is replaced, once, quietly.
    first.close()
    assert execute(harness.ctx(), host, "echo again").stdout == "again\n"
    second = transport_for(harness.ctx(), host, 5.0)
    assert second is not first and second.is_active()

    harness.resources.close()  # the run's end
    assert not second.is_active()


def test_is_registered_and_declares_hosts_for_validation() -> None:
    registry = default_registry()
    assert registry.get("ssh.run") is SshRun
    extra = SshRunParams.model_fields["hosts"].json_schema_extra
    assert extra == {"refers_to": "host"}
    params = SshRunParams.model_validate({"hosts": ["a", "b"], "argv": ["true"]})
    assert SshRun().hosts(params) == ["a", "b"]
    with pytest.raises(ValueError, match="either argv"):
        SshRunParams.model_validate({"hosts": ["a"], "argv": ["true"], "command": "true"})


def test_a_kept_connection_outlives_the_run_and_serves_the_next(lab: Lab) -> None:
    """The warm path: a resident process (the watch) keeps its runs' SSH connections, so a decided run
    does not connect first; each run's own resources still close at its end."""
    from dr_orchestrator.runs.execute import KeptConnections

    kept = KeptConnections()
    try:
        assert kept.refresh(lab_inventory(lab)) == {}
        host = lab_inventory(lab).hosts["backup-app"]
        first_run, second_run = Harness(lab_inventory(lab)), Harness(lab_inventory(lab))
        first_run.resources = RunResources(kept.pool)
        second_run.resources = RunResources(kept.pool)
        warm = transport_for(first_run.ctx(), host, 5.0)
        assert execute(first_run.ctx(), host, "echo one").stdout == "one\n"
        first_run.close()  # the first run ends
        assert warm.is_active()
        assert transport_for(second_run.ctx(), host, 5.0) is warm
        assert execute(second_run.ctx(), host, "echo two").stdout == "two\n"

        # The host restarted between runs: the next run reconnects once, quietly, and refresh too.
        warm.close()
        assert execute(second_run.ctx(), host, "echo three").stdout == "three\n"
        replaced = transport_for(second_run.ctx(), host, 5.0)
        assert replaced is not warm and replaced.is_active()
        replaced.close()
        assert kept.refresh(lab_inventory(lab)) == {}
        reopened = transport_for(second_run.ctx(), host, 5.0)
        assert reopened.is_active()
    finally:
        kept.close()
    assert not reopened.is_active()  # the pool's owner closes what it kept


def test_forgetting_a_lost_sites_hosts_closes_their_kept_connections_and_the_next_use_connects_afresh(
        lab: Lab) -> None:
    from dr_orchestrator.runs.execute import KeptConnections

    inventory = lab_inventory(lab)
    kept = KeptConnections()
    try:
        assert kept.refresh(inventory) == {}
        run = Harness(inventory)
        run.resources = RunResources(kept.pool)
        primary, backup = inventory.hosts["primary-app"], inventory.hosts["backup-app"]
        old_primary, old_backup = transport_for(run.ctx(), primary, 5.0), transport_for(run.ctx(), backup, 5.0)
        kept.forget(inventory.site_hosts("primary"))  # the watch declared the primary site down
        assert not old_primary.is_active() and old_backup.is_active()  # only the lost site's
        fresh = transport_for(run.ctx(), primary, 5.0)
        assert fresh is not old_primary and fresh.is_active()
        assert transport_for(run.ctx(), backup, 5.0) is old_backup
        kept.forget(inventory.site_hosts("primary"))
        kept.forget(inventory.site_hosts("primary"))  # nothing kept any more: nothing to do, no error
    finally:
        kept.close()


def test_refresh_names_the_hosts_it_cannot_reach_and_a_run_still_connects_itself(lab: Lab) -> None:
    from dr_orchestrator.runs.execute import KeptConnections

    inventory = lab_inventory(lab)
    gone = inventory.hosts["primary-app"].model_copy(update={"port": closed_port()})
    kept = KeptConnections()
    try:
        failed = kept.refresh(with_hosts(inventory, **{"primary-app": gone}), timeout=1.0)
        assert list(failed) == ["primary-app"]
        assert "unreachable" in failed["primary-app"] and str(gone.port) in failed["primary-app"]
        run = Harness(inventory)
        run.resources = RunResources(kept.pool)
        assert execute(run.ctx(), inventory.hosts["primary-app"], "echo here").stdout == "here\n"
    finally:
        kept.close()


def test_a_kept_connection_is_keyed_by_how_it_was_made(lab: Lab) -> None:
    """A host whose address or key changed in a reloaded inventory gets a connection of its own."""
    from dr_orchestrator.runs.execute import KeptConnections

    inventory = lab_inventory(lab)
    host = inventory.hosts["backup-app"]
    kept = KeptConnections()
    try:
        kept.refresh(inventory)
        run = Harness(inventory)
        run.resources = RunResources(kept.pool)
        moved = host.model_copy(update={"port": closed_port()})
        with pytest.raises(SshUnreachable, match=str(moved.port)):
            execute(run.ctx(), moved, "true", connect_timeout=1.0)
        assert execute(run.ctx(), host, "echo same").stdout == "same\n"
    finally:
        kept.close()
