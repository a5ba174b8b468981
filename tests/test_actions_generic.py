"""The generic actions against real things: subprocesses, a local HTTP server, listening sockets."""

from __future__ import annotations

import json
import os
import socket
import sys
import threading
import time
from collections.abc import Callable, Iterator
from datetime import UTC, datetime
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import pytest
from pydantic import ValidationError
from support.waiting import wait_for

from dr_orchestrator.actions import default_registry
from dr_orchestrator.actions.base import ActionCancelled, ActionContext, ActionError, ActionResult, RunResources
from dr_orchestrator.actions.http import HttpCheck, HttpCheckParams
from dr_orchestrator.actions.shell import ShellRun, ShellRunParams
from dr_orchestrator.actions.tcp import TcpCheck, TcpCheckParams
from dr_orchestrator.actions.wait import Fail, FailParams, Noop, NoopParams, Wait, WaitParams
from dr_orchestrator.model.events import Event, ProbeResult
from dr_orchestrator.model.inventory import Inventory

# ---------------------------------------------------------------- helpers


class Harness:
    """An ActionContext built by hand, keeping what the action emits."""

    def __init__(self, timeout: float = 10.0, resources: RunResources | None = None) -> None:
        self.events: list[Event] = []
        self.cancelled = threading.Event()
        self.owns_resources = resources is None
        self.resources = resources or RunResources()
        self.ctx = ActionContext(
            run_id="run-1",
            step_id="step-1",
            attempt=1,
            inventory=Inventory(name="test", sites={}, hosts={}, services={}),
            emit=self.events.append,
            cancelled=self.cancelled,
            deadline=time.monotonic() + timeout,
            resources=self.resources,
        )

    @property
    def probes(self) -> list[ProbeResult]:
        return [e for e in self.events if isinstance(e, ProbeResult)]


def in_thread(fn: Callable[[], Any]) -> tuple[threading.Thread, dict[str, Any]]:
    box: dict[str, Any] = {}

    def call() -> None:
        try:
            box["result"] = fn()
        except BaseException as exc:  # noqa: BLE001 - handed to the test
            box["error"] = exc

    thread = threading.Thread(target=call, daemon=True)
    thread.start()
    return thread, box


def alive(pid: int) -> bool:
    """Running (a zombie nobody reaped yet counts as gone)."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except FileNotFoundError:
        return False
    return stat.rsplit(")", 1)[1].split()[0] not in ("Z", "X")


# ---------------------------------------------------------------- registry


def test_every_builtin_action_loads_with_its_params_model() -> None:
    registry = default_registry()
    for name in ["shell.run", "http.check", "tcp.check", "wait", "noop", "fail"]:
        action = registry.get(name)
        assert action.name == name
        assert action.Params.model_config.get("extra") == "forbid"
    assert registry.get("http.check").idempotent and registry.get("tcp.check").idempotent
    assert registry.get("wait").idempotent and registry.get("noop").idempotent
    assert not registry.get("shell.run").idempotent


# ---------------------------------------------------------------- shell.run


def run_shell(h: Harness, **params: Any) -> ActionResult:
    return ShellRun().run(ShellRunParams.model_validate(params), h.ctx)


def test_shell_runs_argv_without_a_shell_and_captures_output() -> None:
    result = run_shell(Harness(), argv=["echo", "$HOME", "a;b"])
    assert result.output["exit_code"] == 0
    assert result.output["stdout"] == "$HOME a;b\n"  # no shell expanded or split anything
    assert result.output["stderr"] == ""
    assert result.output["stdout_truncated"] is False
    assert result.output["duration_s"] > 0


def test_shell_command_with_shell_true_cwd_and_env(tmp_path: Path) -> None:
    result = run_shell(
        Harness(),
        command='echo "$GREETING" | tr a-z A-Z; pwd',
        shell=True,
        cwd=str(tmp_path),
        env={"GREETING": "hello"},
    )
    assert result.output["stdout"] == f"HELLO\n{tmp_path}\n"


def test_shell_unexpected_exit_names_code_and_last_stderr_line() -> None:
    with pytest.raises(ActionError) as failure:
        run_shell(Harness(), command="echo first >&2; echo 'disk full' >&2; exit 3", shell=True)
    assert "`echo first >&2; echo 'disk full' >&2; exit 3` exited with code 3 (expected 0)" in str(failure.value)
    assert str(failure.value).endswith(": disk full")


def test_shell_expect_exit_accepts_listed_codes() -> None:
    result = run_shell(Harness(), argv=["sh", "-c", "exit 3"], expect_exit=[0, 3])
    assert result.output["exit_code"] == 3


def test_shell_marks_carry_the_moment_the_program_says_it_acted() -> None:
    # the program acts, says when, then takes its time to exit: the mark is the act, not the exit
    script = ("import datetime, time; print('killed', flush=True); "
              "print('dr-marked-at:', datetime.datetime.now(datetime.UTC).isoformat(), flush=True); time.sleep(0.3)")
    before = datetime.now(UTC)
    result = run_shell(Harness(), argv=[sys.executable, "-c", script])
    assert result.marked_at is not None
    assert before < result.marked_at < datetime.now(UTC)
    assert (datetime.now(UTC) - result.marked_at).total_seconds() >= 0.3


@pytest.mark.parametrize("line", [
    "dr-marked-at: 2020-01-01T00:00:00+00:00",  # before the program started
    "dr-marked-at: 2999-01-01T00:00:00+00:00",  # after it ended
    "dr-marked-at: 2026-12-07T10:00:00",  # no zone
    "dr-marked-at: soon",
])
def test_shell_ignores_a_moment_outside_the_programs_life_or_unreadable(line: str) -> None:
    assert run_shell(Harness(), argv=["echo", line]).marked_at is None


def test_shell_missing_executable_is_named() -> None:
    with pytest.raises(ActionError, match="executable 'no-such-program-xyz' not found"):
        run_shell(Harness(), argv=["no-such-program-xyz", "--flag"])


def test_shell_missing_working_directory_is_named(tmp_path: Path) -> None:
    missing = tmp_path / "nowhere"
    with pytest.raises(ActionError, match="working directory .*nowhere.* does not exist"):
        run_shell(Harness(), argv=["true"], cwd=str(missing))


def test_shell_output_is_bounded_keeping_start_and_end() -> None:
    script = "import sys; sys.stdout.write('START' + 'x' * 1_000_000 + 'END'); sys.stderr.write('e' * 10)"
    result = run_shell(Harness(), argv=[sys.executable, "-c", script], max_output=1024)
    out = result.output
    assert out["stdout_truncated"] is True and out["stderr_truncated"] is False
    assert out["stdout_bytes"] == 1_000_008
    assert out["stdout"].startswith("START") and out["stdout"].endswith("END")
    assert "bytes dropped" in out["stdout"]
    assert len(out["stdout"]) < 1024 + 100
    assert out["stderr"] == "e" * 10


def _start_shell_with_grandchild(
    h: Harness, tmp_path: Path, script: str
) -> tuple[threading.Thread, dict[str, Any], int, int]:
    pids = tmp_path / "pids"
    command = f"{script} & echo $$ $! > {pids}.tmp; mv {pids}.tmp {pids}; wait"
    thread, box = in_thread(lambda: run_shell(h, command=command, shell=True))
    wait_for(pids.exists, 10, "the shell to start its child")
    shell_pid, child_pid = map(int, pids.read_text().split())
    assert alive(shell_pid) and alive(child_pid)
    return thread, box, shell_pid, child_pid


def test_shell_cancel_kills_the_process_and_its_children(tmp_path: Path) -> None:
    h = Harness(timeout=30)
    thread, box, shell_pid, child_pid = _start_shell_with_grandchild(h, tmp_path, "sleep 60")
    cancelled_at = time.monotonic()
    h.cancelled.set()
    thread.join(5)
    assert not thread.is_alive()
    assert time.monotonic() - cancelled_at < 1.5  # SIGTERM is enough for sleep: no kill grace needed
    assert isinstance(box.get("error"), ActionCancelled)
    assert not alive(shell_pid) and not alive(child_pid)


@pytest.mark.slow
def test_shell_deadline_kills_children_that_ignore_sigterm(tmp_path: Path) -> None:
    h = Harness(timeout=1.0)
    thread, box, shell_pid, child_pid = _start_shell_with_grandchild(h, tmp_path, "trap '' TERM; sleep 60")
    thread.join(10)
    assert not thread.is_alive()
    error = box.get("error")
    assert isinstance(error, ActionError) and not isinstance(error, ActionCancelled)
    assert "was stopped after" in str(error) and "timeout passed" in str(error)
    assert not alive(shell_pid) and not alive(child_pid)


def test_shell_does_not_hang_on_a_background_child_holding_the_pipes() -> None:
    h = Harness()
    started = time.monotonic()
    result = run_shell(h, command="sleep 30 & echo started $!", shell=True)
    assert time.monotonic() - started < 5
    child_pid = int(result.output["stdout"].split()[1])
    try:
        assert alive(child_pid)  # a daemon it started on purpose is left running
    finally:
        os.kill(child_pid, 9)


def test_shell_check_mode_runs_nothing(tmp_path: Path) -> None:
    h = Harness()
    h.ctx.check_mode = True
    marker = tmp_path / "touched"
    result = run_shell(h, argv=["touch", str(marker)])
    assert result.output == {"check_mode": True, "would_run": ["touch", str(marker)]}
    assert not marker.exists()


@pytest.mark.parametrize(
    ("params", "message"),
    [
        ({"command": "ls -l"}, "set shell: true"),
        ({"argv": ["ls"], "shell": True}, "shell: true goes with command"),
        ({}, "give argv"),
        ({"argv": ["ls"], "command": "ls"}, "not both"),
        ({"argv": ["ls"], "timeout": 3}, "Extra inputs are not permitted"),
        ({"argv": []}, "at least 1 item"),
        ({"argv": ["ls"], "expect_exit": []}, "at least 1 item"),
    ],
)
def test_shell_bad_params_are_refused_clearly(params: dict[str, Any], message: str) -> None:
    with pytest.raises(ValidationError, match=message):
        ShellRunParams.model_validate(params)


# ---------------------------------------------------------------- http.check


class HealthServer:
    """A real HTTP server whose answer the test changes; it notes when it served what."""

    def __init__(self) -> None:
        self.status = 503
        self.body: dict[str, Any] = {"db_role": "read-only", "ready": False}
        self.delay = 0.0
        self.served: list[tuple[datetime, int]] = []  # (when the answer was chosen, status)
        self.client_ports: set[int] = set()
        server = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"  # keep-alive, as a real service
            disable_nagle_algorithm = True

            def do_GET(self) -> None:
                if server.delay:
                    time.sleep(server.delay)
                status, payload = server.status, json.dumps(server.body).encode()
                server.served.append((datetime.now(UTC), status))
                server.client_ports.add(self.client_address[1])
                self.send_response(status)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(payload)))
                self.end_headers()
                try:
                    self.wfile.write(payload)
                except (BrokenPipeError, ConnectionResetError):
                    pass  # the probe gave up waiting: what a timeout test wants

            def log_message(self, *args: Any) -> None:
                pass

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.httpd.daemon_threads = True
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}/health"
        self.thread = threading.Thread(target=self.httpd.serve_forever, args=(0.02,), daemon=True)
        self.thread.start()

    def close(self) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()


@pytest.fixture
def health() -> Iterator[HealthServer]:
    server = HealthServer()
    try:
        yield server
    finally:
        server.close()


def check_http(h: Harness, **params: Any) -> ActionResult:
    try:
        return HttpCheck().run(HttpCheckParams.model_validate(params), h.ctx)
    finally:
        if h.owns_resources:
            h.resources.close()  # as the engine does at the end of a run


def test_http_marked_at_is_the_first_probe_of_the_good_streak(health: HealthServer) -> None:
    h = Harness()
    thread, box = in_thread(lambda: check_http(h, url=health.url, consecutive=3, interval="20ms"))
    wait_for(lambda: len(h.probes) >= 3, 10, "three failed probes")
    health.status = 200
    thread.join(10)
    result = box["result"]

    probes = h.probes
    assert [p.ok for p in probes[-3:]] == [True, True, True]
    assert not any(p.ok for p in probes[:-3])
    assert result.marked_at == probes[-3].at
    assert result.output["first_good_at"] == probes[-3].at.isoformat()
    assert result.output["probes"] == len(probes) and result.output["failed_probes"] == len(probes) - 3
    assert result.output["last_status"] == 200
    # Sent after the server's last bad answer, and no later than its first good one.
    last_bad = max(at for at, status in health.served if status == 503)
    first_good = min(at for at, status in health.served if status == 200)
    assert last_bad <= result.marked_at <= first_good
    assert probes[0].target == f"GET {health.url}" and probes[0].detail == "status 503, expected 200"


def test_http_a_bad_probe_restarts_the_streak(health: HealthServer) -> None:
    health.status = 200
    h = Harness()
    thread, box = in_thread(lambda: check_http(h, url=health.url, consecutive=4, interval="30ms"))
    wait_for(lambda: len(h.probes) >= 1, 10, "a first probe")
    health.status = 500
    wait_for(lambda: any(not p.ok for p in h.probes), 10, "a failed probe")
    health.status = 200
    thread.join(10)
    probes = h.probes
    last_failure = max(i for i, p in enumerate(probes) if not p.ok)
    assert box["result"].marked_at == probes[last_failure + 1].at
    assert len(probes) - last_failure - 1 == 4


def test_http_json_and_text_expectations(health: HealthServer) -> None:
    health.status = 200
    h = Harness()
    params = {
        "url": health.url,
        "expect_json": {"db_role": "read-write"},
        "expect_text": '"ready": true',
        "interval": 0.02,
    }
    thread, box = in_thread(lambda: check_http(h, **params))
    wait_for(lambda: len(h.probes) >= 2, 10, "probes")
    health.body = {"db_role": "read-write", "ready": False}
    wait_for(lambda: any("does not contain" in p.detail for p in h.probes), 10, "a text failure")
    health.body = {"db_role": "read-write", "ready": True}
    thread.join(10)
    assert "result" in box
    details = [p.detail for p in h.probes]
    assert details[0] == "status 200, but JSON field 'db_role' is 'read-only', expected 'read-write'"
    assert details[-1] == "status 200"


def test_http_nested_json_path_and_missing_field(health: HealthServer) -> None:
    health.status = 200
    health.body = {"checks": [{"name": "db", "ok": True}]}
    assert check_http(Harness(), url=health.url, expect_json={"checks.0.ok": True}).output["probes"] == 1
    with pytest.raises(ActionError, match="JSON field 'checks.0.ok' is True, expected 1"):
        check_http(Harness(), url=health.url, expect_json={"checks.0.ok": 1}, deadline="150ms")
    with pytest.raises(ActionError, match="JSON field 'checks.1.ok' is missing"):
        check_http(Harness(), url=health.url, expect_json={"checks.1.ok": True}, deadline="150ms")


def test_http_deadline_says_what_failed_and_how_many_probes(health: HealthServer) -> None:
    h = Harness()
    with pytest.raises(ActionError) as failure:
        check_http(h, url=health.url, interval="50ms", deadline="300ms")
    message = str(failure.value)
    assert f"({len(h.probes)} probes, {len(h.probes)} failed" in message
    assert "last failure: status 503, expected 200" in message
    # Sent at 0, 50, ... 250 ms (fewer if the machine is too busy to keep up); none past the deadline.
    assert 4 <= len(h.probes) <= 6
    assert all((p.at - h.probes[0].at).total_seconds() < 0.3 for p in h.probes)
    assert not isinstance(failure.value, ActionCancelled)


def test_http_deadline_reports_a_streak_cut_short(health: HealthServer) -> None:
    health.status = 200
    with pytest.raises(
        ActionError, match=r"no 5 consecutive good probes within 120ms \((\d) probes, 0 failed, the last \1 good"
    ):
        check_http(Harness(), url=health.url, consecutive=5, interval="50ms", deadline="120ms")


def test_http_gives_up_without_sleeping_past_the_deadline(health: HealthServer) -> None:
    h = Harness()
    started = time.monotonic()
    with pytest.raises(ActionError, match="no good probe within 300ms"):
        check_http(h, url=health.url, interval="10s", deadline="300ms")
    assert time.monotonic() - started < 2  # the next probe would be due after the deadline: stop now
    assert len(h.probes) == 1


def test_http_connection_refused_is_a_failed_probe() -> None:
    with socket.socket() as placeholder:
        placeholder.bind(("127.0.0.1", 0))  # bound, not listening: connections are refused
        port = placeholder.getsockname()[1]
        with pytest.raises(ActionError, match="ConnectError"):
            check_http(Harness(), url=f"http://127.0.0.1:{port}/", deadline="100ms")


def test_http_probe_timeout_bounds_a_hung_server(health: HealthServer) -> None:
    health.status, health.delay = 200, 0.5
    h = Harness()
    with pytest.raises(ActionError, match="no good probe within 250ms .* last failure: no answer within"):
        check_http(h, url=health.url, probe_timeout="100ms", deadline="250ms")
    assert h.probes[0].detail == "no answer within 100ms"
    assert all(p.latency_ms < 200 for p in h.probes)


def test_http_probes_keep_a_fixed_rate_whatever_their_latency(health: HealthServer) -> None:
    health.status, health.delay = 200, 0.02  # each probe takes ~20 ms of a 50 ms interval
    h = Harness()
    check_http(h, url=health.url, consecutive=20, interval="50ms")
    sent = [p.at for p in h.probes]
    span = (sent[-1] - sent[0]).total_seconds()
    assert len(sent) == 20
    assert abs(span - 19 * 0.05) < 0.05  # drifting by the latency would take 19 * 70 ms = 1.33 s


def test_http_reuses_one_client_and_connection_per_run(health: HealthServer) -> None:
    health.status = 200
    resources = RunResources()
    try:
        check_http(Harness(resources=resources), url=health.url, consecutive=3, interval="10ms")
        check_http(Harness(resources=resources), url=health.url, consecutive=3, interval="10ms")
    finally:
        resources.close()
    assert len(health.served) == 6
    assert len(health.client_ports) == 1


def test_http_cancel_stops_at_once(health: HealthServer) -> None:
    h = Harness()
    thread, box = in_thread(lambda: check_http(h, url=health.url, interval="1s"))
    wait_for(lambda: len(h.probes) >= 1, 10, "a probe")
    cancelled_at = time.monotonic()
    h.cancelled.set()
    thread.join(5)
    assert time.monotonic() - cancelled_at < 0.2
    assert isinstance(box["error"], ActionCancelled)
    assert "1 probe, 1 failed; last failure: status 503" in str(box["error"])


def test_http_hosts_and_params() -> None:
    action = HttpCheck()
    assert action.hosts(HttpCheckParams(url="https://front.example:8443/health")) == ["front.example:8443"]
    assert action.hosts(HttpCheckParams(url="http://10.0.0.1/")) == ["10.0.0.1:80"]
    params = HttpCheckParams.model_validate(
        {"url": "http://x/", "method": "head", "interval": "250ms", "deadline": "1m", "probe_timeout": 2}
    )
    assert (params.method, params.interval, params.deadline, params.probe_timeout) == ("HEAD", 0.25, 60.0, 2.0)


@pytest.mark.parametrize(
    ("params", "message"),
    [
        ({"url": "ftp://x/"}, "not an http:// or https:// URL"),
        ({"url": "http://x/", "interval": "soon"}, "'soon' is not a duration"),
        ({"url": "http://x/", "interval": 0}, "must be more than zero"),
        ({"url": "http://x/", "consecutive": 0}, "consecutive must be 1 or more"),
        ({"url": "http://x/", "expect_status": []}, "at least 1 item"),
        ({"url": "http://x/", "expected_status": [200]}, "Extra inputs are not permitted"),
        ({}, "url\n  Field required"),
    ],
)
def test_http_bad_params_are_refused_clearly(params: dict[str, Any], message: str) -> None:
    with pytest.raises(ValidationError, match=message):
        HttpCheckParams.model_validate(params)


# ---------------------------------------------------------------- tcp.check


def check_tcp(h: Harness, **params: Any) -> ActionResult:
    return TcpCheck().run(TcpCheckParams.model_validate(params), h.ctx)


def test_tcp_open_port_becomes_healthy_when_it_starts_listening() -> None:
    with socket.socket() as server:
        server.bind(("127.0.0.1", 0))
        port = server.getsockname()[1]
        h = Harness()
        thread, box = in_thread(lambda: check_tcp(h, host="127.0.0.1", port=port, consecutive=2, interval="20ms"))
        wait_for(lambda: len(h.probes) >= 2, 10, "refused probes")
        server.listen(16)
        listening_at = datetime.now(UTC)
        thread.join(10)
        result = box["result"]
    probes = h.probes
    assert [p.ok for p in probes[-2:]] == [True, True] and not any(p.ok for p in probes[:-2])
    assert result.marked_at == probes[-2].at
    assert result.marked_at >= probes[-3].at
    assert (result.marked_at - listening_at).total_seconds() < 0.5
    assert probes[0].detail == "closed (Connection refused), expected open"
    assert probes[0].target == f"127.0.0.1:{port}"


def test_tcp_expect_closed() -> None:
    with socket.socket() as server:
        server.bind(("127.0.0.1", 0))
        port = server.getsockname()[1]
        assert check_tcp(Harness(), host="127.0.0.1", port=port, expect="closed").output["state"] == "closed"
        server.listen(1)
        with pytest.raises(ActionError, match=r"open \(accepted\), expected closed"):
            check_tcp(Harness(), host="127.0.0.1", port=port, expect="closed", deadline="100ms")


def test_tcp_bad_params_and_hosts() -> None:
    with pytest.raises(ValidationError, match="less than or equal to 65535"):
        TcpCheckParams.model_validate({"host": "h", "port": 70000})
    with pytest.raises(ValidationError, match="'open' or 'closed'"):
        TcpCheckParams.model_validate({"host": "h", "port": 1, "expect": "up"})
    assert TcpCheck().hosts(TcpCheckParams(host="::1", port=5432)) == ["[::1]:5432"]


# ---------------------------------------------------------------- wait, noop, fail


def test_wait_waits_and_accepts_durations() -> None:
    started = time.monotonic()
    result = Wait().run(WaitParams.model_validate({"duration": "150ms"}), Harness().ctx)
    assert 0.15 <= time.monotonic() - started < 0.5
    assert result.output["waited_s"] >= 0.15
    assert WaitParams.model_validate({"seconds": 2}).duration == 2.0


def test_wait_is_interrupted_by_cancel() -> None:
    h = Harness()
    thread, box = in_thread(lambda: Wait().run(WaitParams.model_validate({"duration": "30s"}), h.ctx))
    time.sleep(0.05)
    cancelled_at = time.monotonic()
    h.cancelled.set()
    thread.join(5)
    assert time.monotonic() - cancelled_at < 0.2
    assert isinstance(box["error"], ActionCancelled)


def test_wait_longer_than_the_step_timeout_fails_at_the_deadline() -> None:
    h = Harness(timeout=0.2)
    started = time.monotonic()
    with pytest.raises(ActionCancelled, match="timeout passed"):
        Wait().run(WaitParams.model_validate({"duration": "10s"}), h.ctx)
    assert time.monotonic() - started < 0.5


def test_noop_and_fail() -> None:
    out = Noop().run(NoopParams(message="hi", output={"n": 1}), Harness().ctx).output
    assert out == {"n": 1, "message": "hi"}
    with pytest.raises(ActionError, match="^stop here$"):
        Fail().run(FailParams(message="stop here"), Harness().ctx)
    with pytest.raises(ValidationError, match="duration\n  Value error, 'x' is not a duration"):
        WaitParams.model_validate({"duration": "x"})
