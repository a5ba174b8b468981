"""Small actions with no integration: ``wait``, ``noop`` and ``fail``."""

from __future__ import annotations

import time
from typing import Any

from pydantic import AliasChoices, Field

from dr_orchestrator.actions.base import Action, ActionCancelled, ActionContext, ActionError, ActionResult, Params
from dr_orchestrator.model.durations import Duration, format_duration
from dr_orchestrator.model.runbook import Effect


class WaitParams(Params):
    duration: Duration = Field(
        validation_alias=AliasChoices("duration", "seconds"),
        description="How long to wait: seconds (also accepted as `seconds`) or a duration such as 30s, 5m, 100ms.",
    )


class Wait(Action[WaitParams]):
    """Let something settle (replication catching up, caches expiring); stops at once when cancelled."""

    name = "wait"
    effect = Effect.READ_ONLY
    Params = WaitParams
    idempotent = True

    def run(self, params: WaitParams, ctx: ActionContext) -> ActionResult:
        start = time.monotonic()
        end = start + params.duration
        while (left := end - time.monotonic()) > 0:
            if ctx.remaining() <= 0:
                raise ActionCancelled(
                    f"the step's timeout passed {format_duration(time.monotonic() - start)} into a "
                    f"{format_duration(params.duration)} wait"
                )
            ctx.sleep(left)
        return ActionResult(output={"waited_s": round(time.monotonic() - start, 6)})


class NoopParams(Params):
    message: str = Field(default="", description="Returned as output.message.")
    output: dict[str, Any] = Field(
        default_factory=dict, description="Further output fields, for later steps' templates to read."
    )


class Noop(Action[NoopParams]):
    """Does nothing and succeeds: placeholders, tests, benchmarks of the engine itself."""

    name = "noop"
    effect = Effect.READ_ONLY
    Params = NoopParams
    idempotent = True

    def run(self, params: NoopParams, ctx: ActionContext) -> ActionResult:
        return ActionResult(output={**params.output, "message": params.message})


class FailParams(Params):
    message: str = Field(default="the runbook asked this step to fail", description="The error to fail with.")


class Fail(Action[FailParams]):
    """Always fails with its message: a runbook's deliberate stop, and tests of failure handling."""

    name = "fail"
    effect = Effect.READ_ONLY
    Params = FailParams
    idempotent = True  # changes nothing, so repeating it is safe

    def run(self, params: FailParams, ctx: ActionContext) -> ActionResult:
        raise ActionError(params.message)
