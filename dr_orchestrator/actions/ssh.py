"""``ssh.run``: run a command on inventory hosts over SSH, with pinned host keys and one connection per host.

Host keys are checked strictly against the host's ``known_hosts`` file (``dr_known_hosts`` in the
inventory): a host that is missing from it, or whose key changed, is refused, never added. Each
host's connection is opened once per run and reused by every later step (closed when the run
ends); its socket sets TCP_NODELAY, without which every exec waits ~40 ms for a delayed ACK.

Other actions that work over SSH (``postgres.rebuild_standby``) use :func:`execute`.
"""

from __future__ import annotations

import os
import shlex
import socket
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any

import paramiko
from pydantic import Field, model_validator

from dr_orchestrator.actions.base import (
    Action,
    ActionCancelled,
    ActionContext,
    ActionError,
    ActionResult,
    Params,
    RunResources,
)
from dr_orchestrator.actions.shell import BoundedOutput, last_line
from dr_orchestrator.model.durations import Duration, format_duration
from dr_orchestrator.model.inventory import Host

KEEPALIVE_S = 15
# How often a running command's loop looks at cancellation and reads output; the exit status wakes it at once.
POLL_S = 0.02
# After the exit status, how long to wait for the output's end when something still holds the stream open.
DRAIN_GRACE_S = 0.2


class SshUnreachable(ActionError):
    """The host did not answer (no TCP connection or no SSH greeting): it may be down or fenced."""


class SshRunParams(Params):
    hosts: list[str] = Field(
        min_length=1,
        description="Inventory hosts to run on (in parallel, up to max_parallel at a time).",
        json_schema_extra={"refers_to": "host"},
    )
    argv: list[str] | None = Field(
        default=None, min_length=1, description="Program and arguments; quoted for the remote shell (shlex.join)."
    )
    command: str | None = Field(
        default=None,
        min_length=1,
        description="A command line for the remote user's shell, used as written.",
        json_schema_extra={"shell_command": True},
    )
    max_parallel: int = Field(default=8, ge=1, le=256, description="Hosts worked on at the same time.")
    allow_unreachable: bool = Field(
        default=False,
        description="A host that does not answer is recorded, not a failure (fencing a primary that may be dead).",
    )
    expect_exit: list[int] = Field(default=[0], min_length=1, description="Exit codes that count as success.")
    max_output: int = Field(
        default=64 * 1024, ge=64, description="Bytes kept of stdout and of stderr each, per host (start and end)."
    )
    connect_timeout: Duration = Field(
        default=5.0, description="Longest wait for a host's connection (seconds or a duration); capped by the step's."
    )

    @model_validator(mode="after")
    def _one_command(self) -> SshRunParams:
        if (self.argv is None) == (self.command is None):
            raise ValueError("give either argv (a list, quoted safely) or command (a shell command line), not both")
        return self

    def remote_command(self) -> str:
        return shlex.join(self.argv) if self.argv is not None else self.command or ""


@dataclass(frozen=True)
class ExecResult:
    exit_status: int
    stdout: str
    stderr: str
    stdout_truncated: bool
    stderr_truncated: bool
    duration_s: float

    def output(self) -> dict[str, Any]:
        return {
            "reachable": True,
            "exit_status": self.exit_status,
            "stdout": self.stdout,
            "stderr": self.stderr,
            "stdout_truncated": self.stdout_truncated,
            "stderr_truncated": self.stderr_truncated,
            "duration_s": round(self.duration_s, 6),
        }


def _where(host: Host) -> str:
    return f"host {host.name} ({host.address}:{host.port})"


def _open_socket(host: Host, timeout: float) -> socket.socket:
    try:
        sock = socket.create_connection((host.address, host.port), timeout=timeout)
    except TimeoutError:
        raise SshUnreachable(f"{_where(host)} did not accept a connection within {format_duration(timeout)}") from None
    except OSError as exc:
        raise SshUnreachable(f"{_where(host)} is unreachable: {exc.strerror or exc}") from None
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_KEEPALIVE, 1)
    return sock


def connect(host: Host, timeout: float) -> paramiko.SSHClient:
    """A new authenticated connection to ``host``, its key checked against the host's known_hosts file."""
    if not host.known_hosts:
        raise ActionError(f"{_where(host)} has no known_hosts file (set dr_known_hosts in the inventory)")
    if not os.path.isfile(host.known_hosts):
        raise ActionError(f"{_where(host)}: known_hosts file {host.known_hosts} does not exist")
    if not host.key_file:
        raise ActionError(f"{_where(host)} has no key file (set ansible_ssh_private_key_file in the inventory)")
    if not os.path.isfile(host.key_file):
        raise ActionError(f"{_where(host)}: key file {host.key_file} does not exist")
    client = paramiko.SSHClient()
    try:
        client.load_host_keys(host.known_hosts)
    except (OSError, paramiko.SSHException) as exc:
        raise ActionError(f"{_where(host)}: cannot read known_hosts file {host.known_hosts}: {exc}") from None
    client.set_missing_host_key_policy(paramiko.RejectPolicy())
    sock = _open_socket(host, timeout)
    try:
        client.connect(
            host.address,
            port=host.port,
            username=host.user,
            key_filename=host.key_file,
            sock=sock,
            look_for_keys=False,
            allow_agent=False,
            timeout=timeout,
            banner_timeout=timeout,
            auth_timeout=timeout,
            channel_timeout=timeout,
        )
    except paramiko.BadHostKeyException as exc:
        client.close()
        raise ActionError(
            f"{_where(host)} presented a {exc.key.get_name()} host key that differs from the one pinned in "
            f"{host.known_hosts}: refusing to connect (a rebuilt host, or someone in the middle)"
        ) from None
    except paramiko.AuthenticationException as exc:
        client.close()
        raise ActionError(
            f"{_where(host)} refused the login of user {host.user!r} with {host.key_file}: {exc}"
        ) from None
    except paramiko.SSHException as exc:
        client.close()
        if "not found in known_hosts" in str(exc):
            raise ActionError(
                f"{_where(host)} is not in known_hosts file {host.known_hosts}: refusing an unknown host key "
                f"(add it with ssh-keyscan -p {host.port} {host.address} after checking its fingerprint)"
            ) from None
        # No greeting or a broken handshake: the machine is there but its SSH service is not answering.
        raise SshUnreachable(f"{_where(host)} did not complete the SSH handshake: {exc}") from None
    except OSError as exc:
        client.close()
        raise SshUnreachable(f"{_where(host)} dropped the connection: {exc}") from None
    transport = client.get_transport()
    assert transport is not None  # connect() succeeded
    transport.set_keepalive(KEEPALIVE_S)
    return client


class _HostSlot:
    """One host's connection within a run (or kept across runs); its own lock, so hosts connect in
    parallel. Parallel steps share it: a connection that failed one of them is replaced for the next,
    but closed only once nothing can be using it, since another step's channel may still run on it."""

    def __init__(self, host: Host) -> None:
        self.host = host
        self.lock = threading.Lock()
        self.client: paramiko.SSHClient | None = None
        self.retired: list[paramiko.SSHClient] = []

    def transport(self, timeout: float, failed: paramiko.Transport | None = None) -> paramiko.Transport:
        """The current transport; a new one when there is none, it died, or it is ``failed``."""
        with self.lock:
            current = self.client.get_transport() if self.client is not None else None
            if current is None or not current.is_active() or (failed is not None and current is failed):
                if self.client is not None:
                    # A kept slot lives for days: close retired connections nothing uses any more.
                    self.retired = [c for c in [*self.retired, self.client] if _in_use(c)]
                self.client = None
                self.client = connect(self.host, timeout)
                current = self.client.get_transport()
            assert current is not None
            return current

    def warm(self, timeout: float) -> None:
        """Open a connection unless the current one is alive; connecting outside the lock, so a run
        never waits for a warm-up stuck on a silent host."""
        with self.lock:
            current = self.client.get_transport() if self.client is not None else None
            if current is not None and current.is_active():
                return
        fresh = connect(self.host, timeout)
        with self.lock:
            current = self.client.get_transport() if self.client is not None else None
            if current is not None and current.is_active():
                fresh.close()  # a run connected meanwhile
                return
            if self.client is not None:
                self.retired = [c for c in [*self.retired, self.client] if _in_use(c)]
            self.client = fresh

    def close(self) -> None:
        for client in [*self.retired, *([self.client] if self.client is not None else [])]:
            client.close()
        self.retired = []
        self.client = None


def _in_use(client: paramiko.SSHClient) -> bool:
    """False (and closed) when its connection is gone; an open one may still carry another step's channel."""
    transport = client.get_transport()
    if transport is not None and transport.is_active():
        return True
    client.close()
    return False


def _slot_key(host: Host) -> str:
    # Everything the connection was made with: a kept one must not serve a changed host.
    return f"ssh:{host.name}:{host.user}@{host.address}:{host.port}:{host.key_file}:{host.known_hosts}"


def _slot(resources: RunResources, host: Host) -> _HostSlot:
    slot: _HostSlot = resources.get_or_create(_slot_key(host), lambda: _HostSlot(host), lambda s: s.close(),
                                              keep=True)
    return slot


def forget(resources: RunResources, host: Host) -> None:
    """Close and drop the connection to ``host`` kept in ``resources``: the next use connects afresh. For a
    host whose site was declared down: its kept connection may look open and yet break under a command
    (an ambiguous failure), where a fresh one is refused at once (the host is plainly unreachable)."""
    slot = resources.discard(_slot_key(host))
    if isinstance(slot, _HostSlot):
        slot.close()


def transport_for(ctx: ActionContext, host: Host, timeout: float,
                  failed: paramiko.Transport | None = None) -> paramiko.Transport:
    """The run's connection to ``host``: opened on first use and closed when the run ends, or the one
    a resident process keeps open across its runs (``RunResources(kept)``)."""
    return _slot(ctx.resources, host).transport(timeout, failed)


def keep_open(resources: RunResources, host: Host, timeout: float) -> None:
    """Open the connection to ``host`` in ``resources`` unless it is open and alive (ActionError if not)."""
    _slot(resources, host).warm(timeout)


def _open_channel(ctx: ActionContext, host: Host, connect_timeout: float) -> paramiko.Channel:
    timeout = max(0.001, min(connect_timeout, ctx.remaining()))
    transport = transport_for(ctx, host, timeout)
    try:
        return transport.open_session(timeout=timeout)
    except (paramiko.SSHException, EOFError, OSError):
        pass
    # The kept connection died since its last use (host restarted) or refused a channel: one fresh try.
    try:
        return transport_for(ctx, host, timeout, failed=transport).open_session(timeout=timeout)
    except (paramiko.SSHException, EOFError, OSError) as exc:
        # Not "unreachable": it answered, so a step allowed to pass an unreachable host must not pass here.
        raise ActionError(f"{_where(host)} did not open a session: {type(exc).__name__}: {exc}") from None


def execute(
    ctx: ActionContext, host: Host, command: str, max_output: int = 64 * 1024, connect_timeout: float = 5.0
) -> ExecResult:
    """Run ``command`` on ``host``; return its exit status and bounded output.

    Raises SshUnreachable when the host does not answer, ActionCancelled at the step's deadline or on
    cancellation (the channel is closed; the remote program may keep running), ActionError otherwise.
    """
    ctx.check_cancelled()
    started = time.monotonic()
    channel = _open_channel(ctx, host, connect_timeout)
    stdout, stderr = BoundedOutput(max_output), BoundedOutput(max_output)
    try:
        channel.exec_command(command)
        channel.shutdown_write()  # no stdin: a command that reads it sees end of file
        stop = _pump(channel, stdout, stderr, ctx)
        if stop is not None:
            _signal_remote(channel, "TERM")
            raise ActionCancelled(
                f"{_where(host)}: {command!r} stopped after {format_duration(time.monotonic() - started)}: {stop} "
                "(sent SIGTERM, channel closed)"
            )
        status = channel.recv_exit_status()
    except (paramiko.SSHException, EOFError, OSError) as exc:
        # The connection broke under the command: it may or may not have run to its end on the host.
        raise ActionError(f"{_where(host)}: running {command!r} failed: {type(exc).__name__}: {exc} "
                          "(the connection broke; the command may have run on the host)") from None
    finally:
        channel.close()
    return ExecResult(
        exit_status=status,
        stdout=ctx.redact(stdout.text()),
        stderr=ctx.redact(stderr.text()),
        stdout_truncated=stdout.truncated,
        stderr_truncated=stderr.truncated,
        duration_s=time.monotonic() - started,
    )


def _signal_remote(channel: paramiko.Channel, signal_name: str) -> None:
    """Ask sshd to signal the command's process group (RFC 4254 6.9; OpenSSH kills the group).

    Closing the channel alone leaves a command without a terminal running on the host. paramiko
    has no call for this request, so the message is built here; best effort, the close follows.
    """
    message = paramiko.Message()
    message.add_byte(paramiko.common.cMSG_CHANNEL_REQUEST)
    message.add_int(channel.remote_chanid)
    message.add_string("signal")
    message.add_boolean(False)
    message.add_string(signal_name)
    try:
        channel.transport._send_user_message(message)  # noqa: SLF001 - no public API for channel requests
    except (paramiko.SSHException, EOFError, OSError):
        pass


def _pump(channel: paramiko.Channel, stdout: BoundedOutput, stderr: BoundedOutput, ctx: ActionContext) -> str | None:
    """Read output until the exit status arrives (and the output's end shortly after); why it stopped, if early."""
    exited_at: float | None = None
    while True:
        while channel.recv_ready():
            stdout.add(channel.recv(65536))
        while channel.recv_stderr_ready():
            stderr.add(channel.recv_stderr(65536))
        now = time.monotonic()
        if exited_at is None and channel.exit_status_ready():
            exited_at = now
        if exited_at is not None and (
            (channel.eof_received and not channel.recv_ready() and not channel.recv_stderr_ready())
            or now - exited_at > DRAIN_GRACE_S
        ):
            return None
        if ctx.cancelled.is_set():
            return "the run is stopping or the step was cancelled"
        if now >= ctx.deadline:
            return "the step's timeout passed"
        # The exit status (or the closing of the channel) wakes this at once; output waits a poll at most.
        wait = min(POLL_S, ctx.remaining())
        if exited_at is None:
            channel.status_event.wait(wait)
        else:
            time.sleep(min(wait, 0.005))


class SshRun(Action[SshRunParams]):
    """Runs one command on one or more inventory hosts. With ``allow_unreachable``, a host that does
    not answer (down, or already fenced) is recorded as unreachable instead of failing the step; a
    wrong host key or a refused login always fails it."""

    name = "ssh.run"
    Params = SshRunParams

    def run(self, params: SshRunParams, ctx: ActionContext) -> ActionResult:
        hosts = [ctx.host(name) for name in params.hosts]
        command = params.remote_command()
        if ctx.check_mode:
            return ActionResult(output={"check_mode": True, "would_run": command, "hosts": params.hosts})

        def one(host: Host) -> dict[str, Any]:
            try:
                return execute(ctx, host, command, params.max_output, params.connect_timeout).output()
            except SshUnreachable as exc:
                if not params.allow_unreachable:
                    raise
                return {"reachable": False, "error": str(exc)}

        workers = min(params.max_parallel, len(hosts))
        with ThreadPoolExecutor(max_workers=workers, thread_name_prefix="ssh") as pool:
            futures = {host.name: pool.submit(one, host) for host in hosts}
            results: dict[str, dict[str, Any]] = {}
            errors: list[ActionError] = []
            for name, future in futures.items():
                try:
                    results[name] = future.result()
                except ActionError as exc:
                    errors.append(exc)
        if errors:
            if len(errors) == 1:
                raise errors[0]
            cancelled = all(isinstance(error, ActionCancelled) for error in errors)
            kind = ActionCancelled if cancelled else ActionError
            raise kind(f"{len(errors)} of {len(hosts)} hosts failed: " + "; ".join(str(e) for e in errors))

        failed = {
            name: result
            for name, result in results.items()
            if result["reachable"] and result["exit_status"] not in params.expect_exit
        }
        if failed:
            expected = " or ".join(str(code) for code in params.expect_exit)
            reasons = []
            for name, result in failed.items():
                tail = last_line(result["stderr"])
                reasons.append(f"{name} exited with {result['exit_status']}" + (f" ({tail})" if tail else ""))
            raise ActionError(f"{ctx.redact(command)!r} failed (expected exit {expected}): " + "; ".join(reasons))
        unreachable = sorted(name for name, result in results.items() if not result["reachable"])
        return ActionResult(output={"command": ctx.redact(command), "hosts": results, "unreachable": unreachable})

    def hosts(self, params: SshRunParams) -> list[str]:
        return list(params.hosts)
