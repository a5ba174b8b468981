"""``tcp.check``: probe a TCP port until it is open (or closed) N times in a row."""

from __future__ import annotations

import socket
from typing import Literal

from pydantic import Field

from dr_orchestrator.actions.base import Action, ActionContext, ActionResult
from dr_orchestrator.actions.probing import ProbingParams, Verdict, probe_until_streak
from dr_orchestrator.model.runbook import Effect


class TcpCheckParams(ProbingParams):
    host: str = Field(min_length=1, description="Address or DNS name to connect to.")
    port: int = Field(ge=1, le=65535, description="TCP port.")
    expect: Literal["open", "closed"] = Field(
        default="open",
        description="open: a connection is accepted. closed: none can be made within probe_timeout "
        "(refused, unreachable or no answer), e.g. to confirm an old primary is fenced.",
    )


def connect_once(host: str, port: int, timeout: float) -> tuple[bool, str]:
    """Whether a connection was accepted, and what happened, in a few words."""
    try:
        with socket.create_connection((host, port), timeout=timeout):
            return True, "accepted"
    except TimeoutError:
        return False, f"no answer within {timeout * 1000:.0f}ms"
    except OSError as exc:
        return False, exc.strerror or type(exc).__name__


class TcpCheck(Action[TcpCheckParams]):
    name = "tcp.check"
    effect = Effect.READ_ONLY
    Params = TcpCheckParams
    idempotent = True

    def run(self, params: TcpCheckParams, ctx: ActionContext) -> ActionResult:
        want_open = params.expect == "open"

        def probe(timeout: float) -> Verdict:
            accepted, what = connect_once(params.host, params.port, timeout)
            if accepted == want_open:
                return Verdict(True, f"{params.expect}: {what}")
            return Verdict(False, f"{'closed' if want_open else 'open'} ({what}), expected {params.expect}")

        streak = probe_until_streak(ctx, self.hosts(params)[0], probe, params)
        return ActionResult(output={**streak.output(), "state": params.expect}, marked_at=streak.first_good_at)

    def hosts(self, params: TcpCheckParams) -> list[str]:
        host = f"[{params.host}]" if ":" in params.host else params.host
        return [f"{host}:{params.port}"]
