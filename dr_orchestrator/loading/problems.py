"""What every loader shares: pydantic's errors as problems with lines, problems in file order,
names not found (with a guess and what there is), and long lists of names cut short."""

from __future__ import annotations

import difflib
import itertools
from collections.abc import Callable
from typing import Any

from pydantic import ValidationError

from dr_orchestrator.yamlsource import PathKey, Problem, YamlDocument


def pydantic_problems(document: YamlDocument, base: PathKey, error: ValidationError,
                      skip: Callable[[Any], bool] = lambda item: False, name_is_key: bool = False) -> list[Problem]:
    """One problem per error pydantic found, but those ``skip`` says are reported otherwise.
    ``name_is_key``: the entry at ``base`` is named by its key (a site, service or host), so a problem
    with its ``name`` is one with that key."""
    problems = []
    for item in error.errors():
        if skip(item):
            continue
        loc = () if name_is_key and tuple(item["loc"]) == ("name",) else item["loc"]
        key = base + tuple(p for p in loc if isinstance(p, (str, int)))
        key = tuple("with" if p == "with_" else p for p in key)
        # Our own checks' sentences without pydantic's "Value error, " before them.
        message = str(item["ctx"]["error"]) if item["type"] == "value_error" and "error" in item.get("ctx", {}) \
            else item["msg"]
        fix = ""
        if item["type"] == "missing":
            message, fix = "is required", "add it"
        elif item["type"] == "extra_forbidden":
            message, fix = "is not a known field", "remove it or check its spelling"
        elif item["type"] == "string_too_long":  # a model.names limit
            message, fix = f"is {len(item['input'])} characters long; the limit is {item['ctx']['max_length']}", \
                "shorten it"
        problems.append(document.problem(key, message, fix))
    return problems


def by_line(problems: list[Problem]) -> list[Problem]:
    return sorted(problems, key=lambda p: (p.file, p.line if p.line is not None else 0))


_WHERE = {"site": "dr.sites", "host": "the inventory", "service": "dr.services",
          "backend": "the front door's backends (dr.vars.front_door.backends)", "database": "dr.vars.databases",
          "redis": "dr.vars.redis"}
_CLOSE_AMONG = 1000


def not_known(document: YamlDocument, key: PathKey, kind: str, name: str, known: Any,
               where: str | None = None) -> Problem:
    """``backend 'quotaton' is not in ... (did you mean 'quotation'?)``, naming what there is. Among
    more than _CLOSE_AMONG names no guess: thousands of typos against thousands of hosts took minutes."""
    close = difflib.get_close_matches(name, [str(n) for n in known], n=1) if len(known) <= _CLOSE_AMONG else []
    guess = f" (did you mean {close[0]!r}?)" if close else ""
    shown = listed([str(n) for n in itertools.islice(known, LISTED)], len(known)) if known else "none defined"
    return document.problem(key, f"{kind} {name!r} is not in {where or _WHERE.get(kind, 'the inventory')}{guess}",
                            f"use one of: {shown}")


LISTED = 12  # names a fix offers: 20,000 problems each listing 20,000 steps would take gigabytes


def listed(names: list[str], total: int | None = None) -> str:
    """``a, b, c``, or the first few and how many there are in all (``total``, when ``names`` holds
    only the first ones)."""
    total = len(names) if total is None else total
    if total > len(names[:LISTED]):
        return f"{', '.join(names[:LISTED])}, ... ({total} in all)"
    return ", ".join(names) or "none"

