"""Durations as people write them in YAML: ``30s``, ``5m``, ``100ms``, ``1h``, or plain seconds."""

from __future__ import annotations

import re
from typing import Annotated

from pydantic import BeforeValidator

_UNITS = {"ms": 0.001, "s": 1.0, "m": 60.0, "h": 3600.0, "d": 86400.0}
_PATTERN = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*(ms|s|m|h|d)?\s*$")


def parse_duration(value: object) -> float:
    """Return seconds; raise ValueError with the accepted forms when ``value`` is not a duration."""
    if isinstance(value, bool):
        raise ValueError(f"{value!r} is not a duration (use e.g. 30s, 5m, 100ms)")
    if isinstance(value, (int, float)):
        if value < 0:
            raise ValueError(f"{value!r} is negative; durations are zero or more")
        return float(value)
    if isinstance(value, str):
        match = _PATTERN.match(value)
        if match:
            return float(match.group(1)) * _UNITS[match.group(2) or "s"]
    raise ValueError(f"{value!r} is not a duration (use e.g. 30s, 5m, 100ms)")


# Every parameter that is a time (timeouts, intervals, deadlines, delays) takes the same forms:
# `Duration` in a pydantic model reads ``2m``, ``500ms`` or plain seconds into seconds.
Duration = Annotated[float, BeforeValidator(parse_duration)]


def format_duration(seconds: float) -> str:
    """Human form used in summaries: ``850ms``, ``1.234s``, ``12.5m``."""
    if seconds < 1:
        return f"{seconds * 1000:.0f}ms"
    if seconds < 120:
        return f"{seconds:.3f}s"
    return f"{seconds / 60:.1f}m"
