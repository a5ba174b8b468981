"""Secrets by reference: ``env:NAME`` (an environment variable) or ``file:/path`` (a file's text).

A parameter that holds a secret accepts only a reference, so the secret never sits in a runbook,
a drill or the evidence database; the reference is what gets recorded. The work is done by
``dr_orchestrator.secrets``, which also registers every resolved value for redaction.
"""

from __future__ import annotations

from dr_orchestrator import secrets
from dr_orchestrator.secrets import PREFIXES, is_reference, must_be_reference

__all__ = ["PREFIXES", "is_reference", "must_be_reference", "resolve"]


def resolve(value: str) -> str:
    """The value a reference points at (a plain value is returned as is), registered for
    redaction; ValueError (SecretError) names the reference and what is missing."""
    return secrets.resolve(value) if is_reference(value) else value
