"""YAML read with the line of every value kept, so each error can name where it is."""

from __future__ import annotations

import hashlib
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

PathKey = tuple[str | int, ...]


@dataclass(frozen=True)
class Problem:
    """One thing wrong with a file: where, what, and what to do about it."""

    file: str
    line: int | None
    field: str
    message: str
    fix: str = ""
    # "error": the run would certainly fail, so nothing runs; "warning": risky but runnable
    # (`dr validate --strict` treats it as an error).
    severity: str = "error"

    def __str__(self) -> str:
        where = f"{self.file}:{self.line}" if self.line else self.file
        if self.severity != "error":
            where = f"{where}: {self.severity}"
        text = f"{where}: {self.field}: {self.message}" if self.field else f"{where}: {self.message}"
        return f"{text} ({self.fix})" if self.fix else text

    @property
    def is_error(self) -> bool:
        return self.severity == "error"

    def as_dict(self) -> dict[str, Any]:
        return {"file": self.file, "line": self.line, "field": self.field, "message": self.message, "fix": self.fix,
                "severity": self.severity}


class LoadError(Exception):
    """Raised with every problem found, not just the first."""

    def __init__(self, problems: list[Problem]) -> None:
        super().__init__("\n".join(str(p) for p in problems))
        self.problems = problems


@dataclass
class YamlDocument:
    path: str
    text: str
    data: Any
    lines: dict[PathKey, int] = field(default_factory=dict)

    @property
    def sha256(self) -> str:
        return hashlib.sha256(self.text.encode()).hexdigest()

    def line(self, key: PathKey) -> int | None:
        """Line of the value at ``key``, or of its nearest parent that has one."""
        while True:
            if key in self.lines:
                return self.lines[key]
            if not key:
                return None
            key = key[:-1]

    def problem(self, key: PathKey, message: str, fix: str = "", severity: str = "error") -> Problem:
        return Problem(self.path, self.line(key), dotted(key), message, fix, severity)


def dotted(key: PathKey) -> str:
    text = ""
    for part in key:
        text += f"[{part}]" if isinstance(part, int) else (f".{part}" if text else str(part))
    return text


_MAX_BYTES = 2 * 1024 * 1024  # a runbook or inventory this large is a mistake, not a plan
# Deeper nesting is a mistake or an attack: PyYAML's scanner is quadratic in the depth of flow
# collections (5000 levels of `[` take half a minute) and its composer recursive (a traceback).
MAX_DEPTH = 64
_BRACKETS = re.compile(r"[\[\]{}]")


class _Loader(yaml.SafeLoader):
    pass


def read_yaml(path: str | Path, text: str | None = None) -> YamlDocument:
    """Parse one YAML document; raise LoadError naming the line on bad YAML."""
    shown = str(path)
    if text is None:
        try:
            raw = Path(path).read_bytes()
        except OSError as exc:
            raise LoadError([Problem(shown, None, "", f"cannot read the file: {exc.strerror}")]) from None
        if len(raw) > _MAX_BYTES:
            raise LoadError([Problem(shown, None, "", f"the file is {len(raw)} bytes; the limit is {_MAX_BYTES}")])
        try:
            text = raw.decode("utf-8")
        except UnicodeDecodeError:
            raise LoadError([Problem(shown, None, "", "the file is not UTF-8 text")]) from None
    document = YamlDocument(shown, text, None)
    too_deep = _flow_too_deep(text)
    if too_deep is not None:
        raise LoadError([Problem(shown, too_deep, "", f"nested more than {MAX_DEPTH} levels deep",
                                 "flatten it; no runbook, inventory or drill needs that")])
    try:
        node = yaml.compose(text, Loader=_Loader)
    except RecursionError:
        raise LoadError([Problem(shown, None, "", "nested too deeply to read",
                                 "flatten it; no runbook, inventory or drill needs that")]) from None
    except yaml.MarkedYAMLError as exc:
        mark = exc.problem_mark or exc.context_mark
        line = mark.line + 1 if mark else None
        raise LoadError([Problem(shown, line, "", f"not valid YAML: {exc.problem or exc.context}")]) from None
    except yaml.YAMLError as exc:
        raise LoadError([Problem(shown, None, "", f"not valid YAML: {exc}")]) from None
    constructor = _Loader("")
    converter = _Converter(document, constructor)
    try:
        document.data = converter.convert(node, ()) if node is not None else None
    finally:
        constructor.dispose()
    if converter.problems:
        raise LoadError(converter.problems)
    return document


def _flow_too_deep(text: str) -> int | None:
    """The line where brackets open more than MAX_DEPTH levels, counted before parsing (quotes
    and comments not told apart: only absurd files get near the limit)."""
    depth = 0
    for match in _BRACKETS.finditer(text):
        depth = depth + 1 if match.group() in "[{" else max(0, depth - 1)
        if depth > MAX_DEPTH:
            return text.count("\n", 0, match.start()) + 1
    return None


class _Converter:
    def __init__(self, document: YamlDocument, constructor: _Loader) -> None:
        self.document = document
        self.constructor = constructor
        self.seen: set[int] = set()
        self.problems: list[Problem] = []  # every one found, not just the first

    def convert(self, node: yaml.Node, key: PathKey) -> Any:
        document = self.document
        if len(key) > MAX_DEPTH:
            self.report(node.start_mark.line + 1, key[:MAX_DEPTH], f"nested more than {MAX_DEPTH} levels deep",
                        "flatten it")
            return None
        if id(node) in self.seen:  # aliases would let a small file expand without bound
            line = document.lines.get(key, node.start_mark.line + 1)  # an alias node is its anchor's node
            self.report(line, key, "YAML anchors and aliases are not supported; write it out")
            return None
        self.seen.add(id(node))
        document.lines[key] = node.start_mark.line + 1
        if isinstance(node, yaml.MappingNode):
            result: dict[Any, Any] = {}
            for key_node, value_node in node.value:
                line = key_node.start_mark.line + 1
                if key_node.tag == "tag:yaml.org,2002:merge":
                    self.report(line, key, "YAML merge keys (<<) are not supported; write the keys out")
                    continue
                if not isinstance(key_node, yaml.ScalarNode):
                    self.report(line, key, "a mapping key must be a plain scalar")
                    continue
                name = self.scalar(key_node, key)
                child = key + (str(name),)
                if str(name) in result:
                    self.report(line, child, "this key appears twice", "keep one")
                    continue
                document.lines[child] = line  # until its value says better: an alias has no line of its own
                result[str(name)] = self.convert(value_node, child)
            return result
        if isinstance(node, yaml.SequenceNode):
            return [self.convert(item, key + (i,)) for i, item in enumerate(node.value)]
        return self.scalar(node, key)

    def scalar(self, node: yaml.Node, key: PathKey) -> Any:
        try:
            return self.constructor.construct_object(node, deep=True)
        except yaml.YAMLError as exc:
            reason = exc.problem if isinstance(exc, yaml.MarkedYAMLError) and exc.problem else str(exc)
            self.report(node.start_mark.line + 1, key, f"bad value: {reason}")
            return None

    def report(self, line: int, key: PathKey, message: str, fix: str = "") -> None:
        self.problems.append(Problem(self.document.path, line, dotted(key), message, fix))
