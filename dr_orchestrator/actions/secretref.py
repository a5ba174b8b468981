"""Secrets by reference: ``env:NAME`` (an environment variable) or ``file:/path`` (a file's text).

A parameter that holds a secret accepts only a reference, so the secret never sits in a runbook,
a drill or the evidence database; the reference is what gets recorded.
"""

from __future__ import annotations

import os
from pathlib import Path

PREFIXES = ("env:", "file:")


def is_reference(value: str) -> bool:
    return value.startswith(PREFIXES)


def must_be_reference(value: str | None) -> str | None:
    """For pydantic validators of secret fields: refuse literal secrets."""
    if value is not None and not is_reference(value):
        raise ValueError("secrets are given by reference only: env:NAME or file:/path")
    return value


def resolve(value: str) -> str:
    """The value a reference points at (a plain value is returned as is); ValueError says what is missing."""
    if value.startswith("env:"):
        name = value[4:]
        if name not in os.environ:
            raise ValueError(f"environment variable {name} (from {value!r}) is not set")
        return os.environ[name]
    if value.startswith("file:"):
        path = Path(value[5:])
        try:
            return path.read_text(encoding="utf-8").strip()
        except OSError as exc:
            raise ValueError(f"cannot read {path} (from {value!r}): {exc.strerror}") from None
    return value
