"""YAML read with the line of every value kept, so each error can name where it is."""

from __future__ import annotations

import errno
import hashlib
import os
import re
import stat
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, cast

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


MAX_BYTES = 2 * 1024 * 1024  # a runbook or inventory this large is a mistake, not a plan
# Deeper nesting is a mistake or an attack: PyYAML's scanner is quadratic in the depth of flow
# collections (5000 levels of `[` take half a minute), so it is counted before parsing.
MAX_DEPTH = 64
_BRACKETS = re.compile(r"[\[\]{}]")
_NOT_A_FILE = ((stat.S_ISDIR, "a directory"), (stat.S_ISFIFO, "a FIFO (named pipe)"),
               (stat.S_ISCHR, "a character device"), (stat.S_ISBLK, "a block device"), (stat.S_ISSOCK, "a socket"))


class _Loader(yaml.SafeLoader):
    pass


# libyaml parses ten times faster than PyYAML's Python parser, and bounds nesting itself (1000
# levels); without it, the Python one (a state machine: no recursion either).
_Parser: type = getattr(yaml, "CSafeLoader", _Loader)


def read_file(path: str | Path) -> bytes:
    """The bytes of a regular file of at most MAX_BYTES; LoadError naming the path otherwise.

    Opened without blocking (a FIFO would wait for a writer forever), checked on the opened
    descriptor (a check of the path could be raced), and read to at most one byte past the limit
    whatever size the file claims (a device claims 0 and never ends)."""
    shown = str(path)
    try:
        descriptor = os.open(path, os.O_RDONLY | os.O_NONBLOCK | os.O_NOCTTY | os.O_CLOEXEC)
    except OSError as exc:
        kind = _kind_at(path) if exc.errno == errno.ENXIO else None  # a socket cannot be opened at all
        raise LoadError([_not_a_file(shown, kind) if kind else
                         Problem(shown, None, "", f"cannot read the file: {exc.strerror}")]) from None
    chunks, size = [], 0
    try:
        kind = _kind(os.fstat(descriptor).st_mode)
        if kind:
            raise LoadError([_not_a_file(shown, kind)])
        while size <= MAX_BYTES:
            chunk = os.read(descriptor, MAX_BYTES + 1 - size)
            if not chunk:
                break
            chunks.append(chunk)
            size += len(chunk)
    except OSError as exc:
        raise LoadError([Problem(shown, None, "", f"cannot read the file: {exc.strerror}")]) from None
    finally:
        os.close(descriptor)
    raw = b"".join(chunks)
    if len(raw) > MAX_BYTES:
        raise LoadError([Problem(shown, None, "",
                                 f"the file is larger than the limit of {MAX_BYTES} bytes ({MAX_BYTES // 2**20} MiB)",
                                 "no runbook, inventory or drill is that long; is it the right file?")])
    return raw


def _kind(mode: int) -> str | None:
    """What a file of ``mode`` is when it is not a regular file: "a directory", "a FIFO (named pipe)"..."""
    return next((name for test, name in _NOT_A_FILE if test(mode)), None)


def _kind_at(path: str | Path) -> str | None:
    try:
        return _kind(os.stat(path).st_mode)
    except OSError:
        return None


def _not_a_file(shown: str, kind: str) -> Problem:
    return Problem(shown, None, "", f"{kind}, not a regular file; nothing was read",
                   "give the path of a runbook, inventory or drill YAML file")


def read_yaml(path: str | Path, text: str | None = None) -> YamlDocument:
    """Parse one YAML document; raise LoadError naming the line on bad YAML."""
    shown = str(path)
    if text is None:
        try:
            text = read_file(path).decode("utf-8")
        except UnicodeDecodeError:
            raise LoadError([Problem(shown, None, "", "the file is not UTF-8 text")]) from None
    document = YamlDocument(shown, text, None)
    too_deep = _flow_too_deep(text)
    if too_deep is not None:
        raise LoadError([Problem(shown, too_deep, "", f"nested more than {MAX_DEPTH} levels deep",
                                 "flatten it; no runbook, inventory or drill needs that")])
    parser, constructor = _Parser(text), _Loader("")
    converter = _Converter(document, constructor)
    try:
        document.data = converter.convert(parser)
    except yaml.MarkedYAMLError as exc:
        mark = exc.problem_mark or exc.context_mark
        line = mark.line + 1 if mark else None
        raise LoadError([Problem(shown, line, "", f"not valid YAML: {exc.problem or exc.context}")]) from None
    except yaml.YAMLError as exc:
        raise LoadError([Problem(shown, None, "", f"not valid YAML: {exc}")]) from None
    finally:
        parser.dispose()
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


_STR_TAG = "tag:yaml.org,2002:str"
_MERGE_TAG = "tag:yaml.org,2002:merge"


def _line(event: yaml.Event) -> int:
    return event.start_mark.line + 1 if event.start_mark else 0


@dataclass
class _Collection:
    """A mapping or sequence being read: where it is and what it holds so far; for a mapping, where
    its next value goes (None: a key comes next) or that it is dropped (its key was refused)."""

    key: PathKey
    value: dict[str, Any] | list[Any] | None  # None: skipped, with everything inside
    child: PathKey | None = None
    drop_value: bool = False
    placed: bool = True  # when skipped: whether None takes its place


class _Converter:
    """Plain data from the parser's events, with the line of every value: iterative (no recursion
    on deep files) and without the node graph a compose builds (ten times the file in memory)."""

    def __init__(self, document: YamlDocument, constructor: _Loader) -> None:
        self.document = document
        self.constructor = constructor
        self.problems: list[Problem] = []  # every one found, not just the first

    def convert(self, parser: Any) -> Any:
        """The document's data; raises the parser's MarkedYAMLError on bad YAML."""
        root: list[Any] = [None]
        stack: list[_Collection] = []
        documents = 0
        while parser.check_event():
            event = parser.get_event()
            if isinstance(event, yaml.DocumentStartEvent):
                documents += 1
                if documents > 1:
                    raise yaml.composer.ComposerError("expected a single document in the stream", None,
                                                      "but found another document", cast(Any, event.start_mark))
            elif isinstance(event, yaml.CollectionEndEvent):
                done = stack.pop()
                if done.placed:
                    self.place(stack, root, done.key, done.value)
            elif isinstance(event, yaml.NodeEvent):
                self.node(event, stack, root)
        return root[0]

    def node(self, event: yaml.NodeEvent, stack: list[_Collection], root: list[Any]) -> None:
        """A scalar, an alias or the start of a collection, wherever it stands."""
        starts = isinstance(event, yaml.CollectionStartEvent)
        parent = stack[-1] if stack else None
        if parent is not None and (parent.value is None or parent.drop_value):  # skipped: inside or whole
            parent.drop_value = False
            if starts:
                stack.append(_Collection((), None, placed=False))
            return
        if parent is not None and isinstance(parent.value, dict) and parent.child is None:
            self.mapping_key(event, parent, stack)
            return
        if parent is None:
            key: PathKey = ()
        elif isinstance(parent.value, list):
            key = parent.key + (len(parent.value),)
        else:
            assert parent.child is not None
            key = parent.child
        line = _line(event)
        if len(key) > MAX_DEPTH:
            self.report(line, key[:MAX_DEPTH], f"nested more than {MAX_DEPTH} levels deep", "flatten it")
        elif isinstance(event, yaml.AliasEvent):  # aliases would let a small file expand without bound
            self.report(self.document.lines.get(key, line), key,
                        "YAML anchors and aliases are not supported; write it out")
        elif isinstance(event, yaml.ScalarEvent):
            self.document.lines[key] = line
            self.place(stack, root, key, self.scalar(event, key))
            return
        else:
            self.document.lines[key] = line
            stack.append(_Collection(key, {} if isinstance(event, yaml.MappingStartEvent) else []))
            return
        if starts:  # too deep: skipped with all it holds, None in its place
            stack.append(_Collection(key, None))
        else:
            self.place(stack, root, key, None)

    def mapping_key(self, event: yaml.NodeEvent, mapping: _Collection, stack: list[_Collection]) -> None:
        assert isinstance(mapping.value, dict)
        line = _line(event)
        mapping.drop_value = True  # unless the key is a good one
        if isinstance(event, yaml.CollectionStartEvent):
            stack.append(_Collection((), None, placed=False))  # the key itself is skipped too
            self.report(line, mapping.key, "a mapping key must be a plain scalar")
        elif not isinstance(event, yaml.ScalarEvent):
            self.report(line, mapping.key, "YAML anchors and aliases are not supported; write it out")
        elif self.tag(event) == _MERGE_TAG:
            self.report(line, mapping.key, "YAML merge keys (<<) are not supported; write the keys out")
        else:
            name = str(self.scalar(event, mapping.key))
            child = mapping.key + (name,)
            if name in mapping.value:
                self.report(line, child, "this key appears twice", "keep one")
                return
            self.document.lines[child] = line  # until its value says better: an alias has no line of its own
            mapping.child, mapping.drop_value = child, False

    @staticmethod
    def place(stack: list[_Collection], root: list[Any], key: PathKey, value: Any) -> None:
        """Put a value read at ``key`` into the collection being read (or make it the document)."""
        if not stack:
            root[0] = value
            return
        parent = stack[-1]
        if isinstance(parent.value, dict):
            parent.value[str(key[-1])] = value
            parent.child = None
        elif isinstance(parent.value, list):
            parent.value.append(value)

    def tag(self, event: yaml.ScalarEvent) -> str:
        if event.tag is None or event.tag == "!":
            return str(self.constructor.resolve(yaml.ScalarNode, event.value, event.implicit))
        return str(event.tag)

    def scalar(self, event: yaml.ScalarEvent, key: PathKey) -> Any:
        tag = self.tag(event)
        if tag == _STR_TAG:  # most values: as the constructor would, without its bookkeeping
            return event.value
        node = yaml.ScalarNode(tag, event.value, style=event.style)
        try:
            return self.constructor.construct_object(node, deep=True)
        except yaml.YAMLError as exc:
            reason = exc.problem if isinstance(exc, yaml.MarkedYAMLError) and exc.problem else str(exc)
            self.report(_line(event), key, f"bad value: {reason}")
            return None

    def report(self, line: int, key: PathKey, message: str, fix: str = "") -> None:
        self.problems.append(Problem(self.document.path, line, dotted(key), message, fix))
