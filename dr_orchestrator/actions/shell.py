"""``shell.run``: run a local program (no shell unless asked), capture bounded output, never leak a child."""

from __future__ import annotations

import os
import selectors
import shlex
import signal
import subprocess
import time
from datetime import UTC, datetime
from typing import IO

from pydantic import Field, model_validator

from dr_orchestrator.actions.base import Action, ActionCancelled, ActionContext, ActionError, ActionResult, Params
from dr_orchestrator.model.durations import format_duration
from dr_orchestrator.model.marks import MARKED_AT_PREFIX

CANCELLED = "the run is stopping or the step was cancelled"
TIMED_OUT = "the step's timeout passed"

# How long a cancelled process group gets to exit on SIGTERM before SIGKILL.
TERM_GRACE_S = 1.0
# How long to wait for SIGKILLed processes to vanish.
KILL_WAIT_S = 0.5
# After the program exits, how long to keep reading output a background child may still be writing.
DRAIN_GRACE_S = 0.5
# How often the loop looks at cancellation and the deadline while the program is quiet.
POLL_S = 0.02


class ShellRunParams(Params):
    argv: list[str] | None = Field(
        default=None, min_length=1, description="Program and arguments, run directly without a shell."
    )
    command: str | None = Field(
        default=None,
        min_length=1,
        description="A command line for /bin/sh -c; needs `shell: true`.",
        json_schema_extra={"shell_command": True},
    )
    shell: bool = Field(default=False, description="Run `command` through /bin/sh (pipes, redirections, globs).")
    cwd: str | None = Field(default=None, description="Working directory (default: the orchestrator's).")
    env: dict[str, str] = Field(
        default_factory=dict,
        description="Variables added to the orchestrator's environment; env:NAME / file:PATH values are secrets, "
        "resolved just before the program starts and masked in everything recorded.",
        json_schema_extra={"secret": True},
    )
    expect_exit: list[int] = Field(default=[0], min_length=1, description="Exit codes that count as success.")
    max_output: int = Field(
        default=64 * 1024,
        ge=64,
        description="Bytes kept of stdout and of stderr each (its start and its end); the rest is dropped.",
    )

    @model_validator(mode="after")
    def _one_way_to_run(self) -> ShellRunParams:
        if self.argv is not None and self.command is not None:
            raise ValueError("give either argv (a list, no shell) or command (with shell: true), not both")
        if self.argv is None and self.command is None:
            raise ValueError("give argv (a list, run without a shell) or command (with shell: true)")
        if self.command is not None and not self.shell:
            raise ValueError("command runs through a shell: set shell: true, or give argv as a list instead")
        if self.argv is not None and self.shell:
            raise ValueError("shell: true goes with command (a string), not argv")
        return self

    def program(self) -> list[str]:
        return self.argv if self.argv is not None else ["/bin/sh", "-c", self.command or ""]


def marked_at(stdout: str, spawned_at: datetime, exited_at: datetime) -> datetime | None:
    """The moment the program said it acted (its last `dr-marked-at:` line). Only a moment within the
    program's life counts: a program cannot move its step's marks before it started or after it ended."""
    lines = [line for line in stdout.splitlines() if line.startswith(MARKED_AT_PREFIX)]
    if not lines:
        return None
    try:
        moment = datetime.fromisoformat(lines[-1].removeprefix(MARKED_AT_PREFIX).strip())
    except ValueError:
        return None
    if moment.tzinfo is None or not spawned_at <= moment <= exited_at:
        return None
    return moment.astimezone(UTC)


class BoundedOutput:
    """Keeps the first and last bytes of a stream (the start says what ran, the end why it failed)."""

    def __init__(self, limit: int) -> None:
        self._head_limit = limit - limit // 2
        self._tail_limit = limit // 2
        self._head = bytearray()
        self._tail = bytearray()
        self.total = 0

    def add(self, data: bytes) -> None:
        self.total += len(data)
        room = self._head_limit - len(self._head)
        if room > 0:
            self._head += data[:room]
            data = data[room:]
        if data:
            self._tail += data
            del self._tail[: max(0, len(self._tail) - self._tail_limit)]

    @property
    def truncated(self) -> bool:
        return self.total > self._head_limit + self._tail_limit

    def text(self) -> str:
        if not self.truncated:
            return (self._head + self._tail).decode("utf-8", errors="replace")
        dropped = self.total - len(self._head) - len(self._tail)
        return (
            self._head.decode("utf-8", errors="replace")
            + f"\n[... {dropped} bytes dropped ...]\n"
            + self._tail.decode("utf-8", errors="replace")
        )


def last_line(text: str) -> str:
    lines = [line.strip() for line in text.splitlines() if line.strip()]
    return lines[-1] if lines else ""


def stop_group(process: subprocess.Popen[bytes]) -> None:
    """SIGTERM the whole process group, SIGKILL whatever is left after a grace period, and return
    once the group is gone (or after a bounded wait, should a zombie linger unreaped)."""
    group = process.pid  # start_new_session made the program the leader of its own group
    try:
        os.killpg(group, signal.SIGTERM)
        try:
            process.wait(timeout=TERM_GRACE_S)
        except subprocess.TimeoutExpired:
            pass
        # Even with the leader gone, children that ignore SIGTERM may live on.
        os.killpg(group, signal.SIGKILL)
    except ProcessLookupError:
        pass  # the group is already empty
    process.wait()
    end = time.monotonic() + KILL_WAIT_S
    while time.monotonic() < end:
        try:
            os.killpg(group, 0)
        except ProcessLookupError:
            return
        time.sleep(0.005)


class ShellRun(Action[ShellRunParams]):
    """Runs a program on the orchestrator's machine. When the step is cancelled or times out, the
    program's whole process group is stopped; background programs it starts and leaves running
    when it exits on its own (daemons) are left alone."""

    name = "shell.run"
    Params = ShellRunParams

    def run(self, params: ShellRunParams, ctx: ActionContext) -> ActionResult:
        argv = params.program()
        shown = params.command if params.command is not None else shlex.join(argv)
        if len(shown) > 200:
            shown = shown[:197] + "..."
        if ctx.check_mode:
            return ActionResult(output={"check_mode": True, "would_run": argv})
        if params.cwd is not None and not os.path.isdir(params.cwd):
            raise ActionError(f"working directory {params.cwd!r} does not exist")
        ctx.check_cancelled()

        start = time.monotonic()
        spawned_at = datetime.now(UTC)
        try:
            process = subprocess.Popen(
                argv,
                stdin=subprocess.DEVNULL,
                stdout=subprocess.PIPE,
                stderr=subprocess.PIPE,
                cwd=params.cwd,
                env={**os.environ, **params.env},
                start_new_session=True,  # its own process group, so a stop reaches its children too
            )
        except FileNotFoundError:
            raise ActionError(f"executable {argv[0]!r} not found") from None
        except PermissionError:
            raise ActionError(f"executable {argv[0]!r} is not executable (permission denied)") from None

        stdout, stderr = BoundedOutput(params.max_output), BoundedOutput(params.max_output)
        pipes = {process.stdout: stdout, process.stderr: stderr}
        try:
            stop_reason = self._pump(process, pipes, ctx)
            duration = time.monotonic() - start
            if stop_reason is not None:
                stop_group(process)
        except BaseException:
            stop_group(process)  # e.g. KeyboardInterrupt in the engine's thread: leave nothing behind
            raise
        finally:
            for pipe in pipes:
                if pipe is not None:
                    pipe.close()

        stderr_text = ctx.redact(stderr.text())
        if stop_reason is not None:
            tail = last_line(stderr_text)
            message = f"`{ctx.redact(shown)}` was stopped after {format_duration(duration)}: {stop_reason}" + (
                f"; last stderr line: {tail}" if tail else ""
            )
            # At the timeout the engine marks the step timed out and keeps this message as the detail.
            raise ActionCancelled(message) if stop_reason == CANCELLED else ActionError(message)

        exit_code = process.returncode
        output = {
            "exit_code": exit_code,
            "stdout": ctx.redact(stdout.text()),
            "stderr": stderr_text,
            "stdout_truncated": stdout.truncated,
            "stderr_truncated": stderr.truncated,
            "stdout_bytes": stdout.total,
            "stderr_bytes": stderr.total,
            "duration_s": round(duration, 6),
        }
        if exit_code not in params.expect_exit:
            if exit_code < 0:
                how = f"was killed by {signal.Signals(-exit_code).name}"
            else:
                expected = " or ".join(str(code) for code in params.expect_exit)
                how = f"exited with code {exit_code} (expected {expected})"
            tail = last_line(stderr_text)
            raise ActionError(f"`{ctx.redact(shown)}` {how}" + (f": {tail}" if tail else ", stderr empty"))
        return ActionResult(output=output, marked_at=marked_at(stdout.text(), spawned_at, datetime.now(UTC)))

    @staticmethod
    def _pump(
        process: subprocess.Popen[bytes], sinks: dict[IO[bytes] | None, BoundedOutput], ctx: ActionContext
    ) -> str | None:
        """Read output until the program exits and its pipes close; the reason to stop it, if any."""
        with selectors.DefaultSelector() as selector:
            for pipe, sink in sinks.items():
                if pipe is not None:
                    selector.register(pipe, selectors.EVENT_READ, sink)
            exited_at: float | None = None
            while True:
                now = time.monotonic()
                if ctx.cancelled.is_set():
                    return CANCELLED
                if now >= ctx.deadline:
                    return TIMED_OUT
                if exited_at is None and process.poll() is not None:
                    exited_at = now
                if exited_at is not None and (not selector.get_map() or now - exited_at > DRAIN_GRACE_S):
                    # Done; past the grace, a background child holding the pipes open is not waited for.
                    break
                if not selector.get_map():
                    ctx.cancelled.wait(min(POLL_S, ctx.remaining()))
                    continue
                for key, _ in selector.select(timeout=min(POLL_S, ctx.remaining())):
                    data = os.read(key.fd, 65536)
                    if data:
                        key.data.add(data)
                    else:
                        selector.unregister(key.fileobj)
        return None

    def hosts(self, params: ShellRunParams) -> list[str]:
        return ["localhost"]
