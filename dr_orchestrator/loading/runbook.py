"""A runbook file to a ``Runbook``: its structure, ids, needs, durations and template syntax, read as
far as it is well-formed by the passes of ``checks``, with every problem found on the way."""

from __future__ import annotations

from dataclasses import dataclass

from dr_orchestrator.loading.checks import PASSES, Reading
from dr_orchestrator.loading.problems import by_line
from dr_orchestrator.model.runbook import Runbook, Step
from dr_orchestrator.yamlsource import LoadError, Problem, YamlDocument, read_yaml


@dataclass
class ParsedRunbook:
    runbook: Runbook | None  # None when even a lenient reading of its top-level fields fails
    steps: list[tuple[int, Step]]  # the well-formed steps, with their index in the file
    problems: list[Problem]


def load_runbook(path: str, text: str | None = None) -> tuple[Runbook, YamlDocument]:
    """Parse and check a runbook on its own (structure, ids, needs, durations, template syntax)."""
    document = read_yaml(path, text)
    return parse_runbook(document), document


def parse_runbook(document: YamlDocument) -> Runbook:
    """A runbook from an already read document: one held inside another file (a drill's fault,
    checks and cleanup), whose line map points into that file."""
    parsed = read_runbook(document)
    if parsed.problems or parsed.runbook is None:
        raise LoadError(by_line(parsed.problems))
    return parsed.runbook


def read_runbook(document: YamlDocument) -> ParsedRunbook:
    """Read as much of a runbook as is well-formed, with every problem found on the way: each of the
    ``checks.PASSES`` in turn."""
    if not isinstance(document.data, dict):
        return ParsedRunbook(None, [], [document.problem((), "a runbook is a mapping with name and steps")])
    reading = Reading(document, document.data)
    problems = [problem for check in PASSES for problem in check(reading)]
    return ParsedRunbook(reading.runbook, reading.steps, problems)
