"""Secrets by reference, and their redaction from everything the orchestrator records or prints.

A secret is never written in a runbook, an inventory or a drill: they hold a reference,
``env:NAME`` (an environment variable of the orchestrator) or ``file:PATH`` (a file's text, with
surrounding whitespace stripped). A reference is resolved at the last moment (by the engine just
before an action's attempt, for parameters the action marks as secret, or by an action through
``ActionContext.secret``); the plan, ``dr plan`` and the evidence only ever see the reference.

Every resolved value is registered with a ``Redactor``, which replaces it with ``[REDACTED]``
wherever it turns up: step outputs, errors, probe details, action events, measurements (the
engine filters every event before its observers see it) and log records (``install_log_redaction``).
Covered forms of a secret: as is; URL-encoded (``quote``, ``quote_plus``); base64 (standard and
URL-safe, with or without padding); JSON- and Python-escaped (``"`` and ``\\`` escaped, as in a
``repr``); and each line of a multi-line secret (a PEM key) of at least 8 characters. Not covered:
a secret transformed in other ways (hashed, hex, split, encrypted, base64 of a longer string that
contains it, e.g. HTTP basic auth of ``user:password``), or cut in two by an output tail.

A leaf module: it imports nothing of the project, so every room may use it.
"""

from __future__ import annotations

import base64
import enum
import json
import logging
import os
import re
import threading
from collections.abc import Callable
from pathlib import Path
from typing import Any, TypeGuard
from urllib.parse import quote, quote_plus

from pydantic import BaseModel

MASK = "[REDACTED]"  # upper case: rich reads [lower-case words] as markup and would hide it
PREFIXES = ("env:", "file:")
_ENV_NAME = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*$")
_MAX_FILE_BYTES = 1024 * 1024
_MIN_LINE = 8  # lines of a multi-line secret registered on their own from this length


class SecretError(ValueError):
    """A reference that cannot be resolved; the message names the reference, never a value."""


def is_reference(value: object) -> TypeGuard[str]:
    return isinstance(value, str) and value.startswith(PREFIXES)


def must_be_reference(value: str | None) -> str | None:
    """For pydantic validators of secret fields: refuse literal secrets."""
    if value is not None and not is_reference(value):
        raise ValueError("secrets are given by reference only: env:NAME or file:/path")
    return value


def read_reference(reference: str) -> str:
    """The text ``reference`` points at, not registered anywhere (use ``Redactor.resolve``)."""
    if reference.startswith("env:"):
        name = reference[4:]
        if not _ENV_NAME.match(name):
            raise SecretError(f"secret reference {reference!r}: {name!r} is not an environment variable name")
        value = os.environ.get(name)
        if value is None:
            raise SecretError(f"secret {reference}: the environment variable {name} is not set")
    elif reference.startswith("file:"):
        path = Path(reference[5:]).expanduser()
        if not reference[5:]:
            raise SecretError(f"secret reference {reference!r} names no file (file:/path/to/secret)")
        try:
            with path.open("rb") as handle:
                raw = handle.read(_MAX_FILE_BYTES + 1)
        except OSError as exc:
            raise SecretError(f"secret {reference}: cannot read {path}: {exc.strerror or type(exc).__name__}") from None
        if len(raw) > _MAX_FILE_BYTES:
            raise SecretError(f"secret {reference}: {path} is larger than {_MAX_FILE_BYTES} bytes")
        try:
            value = raw.decode("utf-8").strip()
        except UnicodeDecodeError:
            raise SecretError(f"secret {reference}: {path} is not UTF-8 text") from None
    else:
        raise SecretError("a secret is given by reference: env:NAME or file:/path")
    if not value:
        raise SecretError(f"secret {reference} is empty")
    return value


def derived_forms(secret: str) -> set[str]:
    """The secret and the encodings of it that tools commonly print."""
    forms = {secret, quote(secret, safe=""), quote(secret), quote_plus(secret),
             json.dumps(secret)[1:-1], json.dumps(secret, ensure_ascii=False)[1:-1], repr(secret)[1:-1]}
    raw = secret.encode("utf-8")
    for encoded in (base64.b64encode(raw), base64.urlsafe_b64encode(raw)):
        text = encoded.decode("ascii")
        forms.update((text, text.rstrip("=")))
    if "\n" in secret:
        forms.update(line.strip() for line in secret.splitlines() if len(line.strip()) >= _MIN_LINE)
    return {form for form in forms if form}


class Redactor:
    """Secrets seen so far, and ``redact`` to mask them. Thread-safe; a child also registers
    with (and masks what is known to) its parent, e.g. a run's redactor and the process's."""

    def __init__(self, parent: Redactor | None = None) -> None:
        self._parent = parent
        self._lock = threading.Lock()
        self._forms: set[str] = set()
        self._pattern: re.Pattern[str] | None = None

    def register(self, secret: str) -> None:
        if not secret:
            return
        forms = derived_forms(secret)
        with self._lock:
            if not forms <= self._forms:
                self._forms |= forms
                # Longest first, so that a secret containing another is masked whole.
                ordered = sorted(self._forms, key=lambda f: (-len(f), f))
                self._pattern = re.compile("|".join(re.escape(f) for f in ordered))
        if self._parent is not None:
            self._parent.register(secret)

    def resolve(self, reference: str) -> str:
        """The secret ``reference`` points at, registered for redaction; SecretError if missing."""
        value = read_reference(reference)
        self.register(value)
        return value

    @property
    def active(self) -> bool:
        return self._pattern is not None or (self._parent is not None and self._parent.active)

    def redact(self, text: str) -> str:
        pattern = self._pattern
        if pattern is not None and pattern.search(text):
            text = pattern.sub(MASK, text)
        return self._parent.redact(text) if self._parent is not None else text

    def redact_bytes(self, data: bytes) -> bytes:
        for redactor in self._chain():
            with redactor._lock:
                forms = sorted(redactor._forms, key=len, reverse=True)
            for form in forms:
                data = data.replace(form.encode("utf-8"), MASK.encode())
        return data

    def redact_data(self, value: Any) -> Any:
        """``value`` with every string inside masked; the same object when nothing needed masking."""
        if not self.active:
            return value
        return self._walk(value)

    def _walk(self, value: Any) -> Any:
        if isinstance(value, enum.Enum):
            return value
        if isinstance(value, str):
            masked = self.redact(value)
            return value if masked == value else masked
        if isinstance(value, bytes):
            masked_bytes = self.redact_bytes(value)
            return value if masked_bytes == value else masked_bytes
        if isinstance(value, dict):
            items = [(self._walk(k), self._walk(v)) for k, v in value.items()]
            if all(k is k0 and v is v0 for (k, v), (k0, v0) in zip(items, value.items(), strict=True)):
                return value
            return dict(items)
        if isinstance(value, (list, tuple)):
            walked = [self._walk(item) for item in value]
            if all(a is b for a, b in zip(walked, value, strict=True)):
                return value
            return type(value)(walked) if isinstance(value, list) else tuple(walked)
        if isinstance(value, BaseException):
            return self.redact(str(value))
        return value

    def _chain(self) -> list[Redactor]:
        chain: list[Redactor] = []
        node: Redactor | None = self
        while node is not None:
            chain.append(node)
            node = node._parent
        return chain


# Every secret resolved in this process; run redactors are its children, log records go through it.
PROCESS = Redactor()


def resolve(reference: str, redactor: Redactor | None = None) -> str:
    """The value ``reference`` points at, registered with ``redactor`` (default: the process's)."""
    return (redactor or PROCESS).resolve(reference)


def redact(text: str) -> str:
    return PROCESS.redact(text)


# ---------------------------------------------------------------- parameters marked secret


def secret_fields(model: type[BaseModel]) -> list[str]:
    """Parameters an action marks ``Field(json_schema_extra={"secret": True})``: any ``env:``/``file:``
    string in them (also inside lists and dicts) is resolved just before the action runs."""
    found = []
    for name, info in model.model_fields.items():
        extra = info.json_schema_extra
        if isinstance(extra, dict) and extra.get("secret") is True:
            found.append(name)
    return found


def resolve_references(value: Any, resolver: Callable[[str], str]) -> Any:
    if is_reference(value):
        return resolver(value)
    if isinstance(value, dict):
        return {k: resolve_references(v, resolver) for k, v in value.items()}
    if isinstance(value, list):
        return [resolve_references(v, resolver) for v in value]
    if isinstance(value, tuple):
        return tuple(resolve_references(v, resolver) for v in value)
    return value


def with_secrets(params: BaseModel, redactor: Redactor) -> BaseModel:
    """A copy of ``params`` with the references in its secret fields resolved (not re-validated:
    validators that insist on references have already passed). SecretError when one is missing."""
    update = {}
    for name in secret_fields(type(params)):
        value = getattr(params, name)
        resolved = resolve_references(value, redactor.resolve)
        if resolved is not value and resolved != value:
            update[name] = resolved
    return params.model_copy(update=update) if update else params


# ---------------------------------------------------------------- logging


class RedactingFilter(logging.Filter):
    """Masks known secrets in a record's message and traceback (for handlers that want it
    explicitly; ``install_log_redaction`` already does it for every record created)."""

    def __init__(self, redactor: Redactor | None = None) -> None:
        super().__init__()
        self.redactor = redactor or PROCESS

    def filter(self, record: logging.LogRecord) -> bool:
        scrub(record, self.redactor)
        return True


def scrub(record: logging.LogRecord, redactor: Redactor) -> None:
    if not redactor.active:
        return
    try:
        message = record.getMessage()
    except Exception:  # noqa: BLE001 - a broken format string is the handler's to report
        return
    record.msg, record.args = redactor.redact(message), None
    if record.exc_info and not record.exc_text:
        record.exc_text = redactor.redact(logging.Formatter().formatException(record.exc_info))
    elif record.exc_text:
        record.exc_text = redactor.redact(record.exc_text)
    if record.stack_info:
        record.stack_info = redactor.redact(record.stack_info)


_installed = threading.Lock()
_previous_factory: Callable[..., logging.LogRecord] | None = None


def install_log_redaction() -> None:
    """Mask known secrets in every log record of the process, whichever logger or handler
    (idempotent). A record factory rather than a logger filter: filters on a logger do not see
    records of its child loggers, nor those of libraries (paramiko, httpx, ansible-runner)."""
    global _previous_factory
    with _installed:
        if _previous_factory is not None:
            return
        previous = logging.getLogRecordFactory()
        _previous_factory = previous

        def factory(*args: Any, **kwargs: Any) -> logging.LogRecord:
            record = previous(*args, **kwargs)
            scrub(record, PROCESS)
            return record

        logging.setLogRecordFactory(factory)
