"""Checks before changes: no step changes the world before the runbook's checks have ended."""

from __future__ import annotations

from collections.abc import Callable

from dr_orchestrator.loading.problems import LISTED, listed
from dr_orchestrator.model.runbook import Effect, OnFailure, Runbook, Step
from dr_orchestrator.yamlsource import Problem, YamlDocument

EffectLookup = Callable[[str], Effect | None]  # an action's declared effect; None for an unknown action


def step_effect(step: Step, effect_of: EffectLookup) -> Effect | None:
    """What the step does to the world: its own ``effect``, else its action's (None: unknown action)."""
    return step.effect or effect_of(step.action)


def change_order_problems(
    runbook: Runbook, steps: list[tuple[int, Step]], document: YamlDocument, effect_of: EffectLookup
) -> list[Problem]:
    """Nothing changes before the target is known ready: every changing step needs, directly or not,
    every check that runs before any change (a read-only step none of whose needs changes anything,
    and that may not fail: ``on_failure: continue`` only records), unless it says why it may go first
    (``before_checks``). A check that fails then stops the run before the first change instead of
    after it. Linear in the steps: the checks each step has waited for are a bit set."""
    by_id = {step.id: step for step in runbook.steps}
    effects = {step.id: step_effect(step, effect_of) for step in runbook.steps}
    bits: dict[str, int] = {}  # check id -> its bit
    waited: dict[str, int] = {}  # step id -> the checks it waits for, as bits
    changed_before: dict[str, bool] = {}  # step id -> some step it waits for changes something
    for step_id in runbook.in_need_order():  # a step may need one written after it
        _wait(step_id, by_id, effects, bits, waited, changed_before)
    index_of = {step.id: index for index, step in steps}
    names = list(bits)
    problems = []
    for step in runbook.steps:
        effect = effects[step.id]
        if effect is None or not effect.changes or step.before_checks or step.id not in index_of:
            continue
        missing, count = _first_unset(waited[step.id], len(names))
        if count:
            quoted = listed([repr(names[i]) for i in missing], count)
            problems.append(document.problem(
                ("steps", index_of[step.id], "needs"),
                f"step {step.id!r} changes the world ({effect}) but can start before the check"
                f"{'s' if count > 1 else ''} {quoted} end{'' if count > 1 else 's'}",
                f"add {quoted} to its needs, or say why it may go first: before_checks: \"reason\"",
            ))
    return problems


def _first_unset(mask: int, size: int) -> tuple[list[int], int]:
    """The first few (``LISTED``) of the ``size`` low bits of ``mask`` that are 0, and how many are:
    without walking every bit of every changing step (thousands of each made it quadratic)."""
    unset = ~mask & ((1 << size) - 1)
    first: list[int] = []
    rest = unset
    while rest and len(first) < LISTED:
        lowest = rest & -rest
        first.append(lowest.bit_length() - 1)
        rest ^= lowest
    return first, unset.bit_count()


def _wait(step_id: str, by_id: dict[str, Step], effects: dict[str, Effect | None], bits: dict[str, int],
          waited: dict[str, int], changed_before: dict[str, bool]) -> None:
    """Fill ``waited`` and ``changed_before`` for the step, whose needs have been (in need order; a need
    that closes a cycle, reported elsewhere, has not and is passed over), and give it a bit if it is a
    check."""
    mask, changed = 0, False
    for need in by_id[step_id].needs:
        if need not in waited:
            continue
        mask |= waited[need]
        effect = effects[need]
        changed = changed or changed_before[need] or effect is None or effect.changes
        if need in bits:
            mask |= 1 << bits[need]
    waited[step_id] = mask
    changed_before[step_id] = changed
    # A check allowed to fail (on_failure: continue) only records; it protects nothing.
    if effects[step_id] is Effect.READ_ONLY and not changed and by_id[step_id].on_failure is not OnFailure.CONTINUE:
        bits[step_id] = len(bits)
