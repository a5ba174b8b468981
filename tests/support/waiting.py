"""Waiting for something to happen in a test: poll, with a deadline, never a fixed sleep."""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Literal, TypeVar

T = TypeVar("T")


def wait_for(condition: Callable[[], T | Literal[False] | None], timeout: float, what: str,
             interval: float = 0.05) -> T:
    """Poll ``condition`` every ``interval`` seconds until it returns something true, and return that.

    After ``timeout`` seconds the test fails with a message naming ``what`` was awaited.
    """
    deadline = time.monotonic() + timeout
    while not (value := condition()):
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout:g} s waiting for {what}")
        time.sleep(interval)
    return value
