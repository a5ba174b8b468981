"""Jinja2 templates in runbooks: sandboxed, strict about undefined names, with shell quoting.

A value that is exactly one ``{{ expression }}`` renders to the expression's native value (a list
stays a list); anything else renders to text.
"""

from __future__ import annotations

import functools
import re
import shlex
from collections.abc import Callable, Iterable, Iterator
from functools import lru_cache
from typing import Any

from jinja2 import StrictUndefined, TemplateSyntaxError, Undefined, nodes
from jinja2.environment import TemplateExpression
from jinja2.exceptions import SecurityError, UndefinedError
from jinja2.sandbox import (
    UNSAFE_ASYNC_GENERATOR_ATTRIBUTES,
    UNSAFE_COROUTINE_ATTRIBUTES,
    UNSAFE_FUNCTION_ATTRIBUTES,
    UNSAFE_GENERATOR_ATTRIBUTES,
    UNSAFE_METHOD_ATTRIBUTES,
    ImmutableSandboxedEnvironment,
)

# Names a template may use; loading checks templates against these.
CONTEXT_NAMES = ("params", "inventory", "vars", "services", "sites", "hosts", "steps", "run", "service", "site")
# What ``run`` holds while a run executes.
RUN_KEYS = ("id", "kind", "incident_at", "started_at", "started_by", "forced", "runbook_path", "inventory_path",
            "approvals", "pre_approved_by", "saved_plan_sha256")

_SINGLE_EXPRESSION = re.compile(r"^\s*\{\{(?P<expr>.*?)\}\}\s*$", re.DOTALL)


class TemplateError(Exception):
    """A template could not be parsed or rendered; the message says why in one sentence."""


class TemplateForbidden(TemplateError):
    """A template reaches for something the sandbox refuses at run time (``''.__class__``)."""


def _shquote(value: Any) -> str:
    return shlex.quote(str(value))


def _shjoin(values: Iterable[Any]) -> str:
    if isinstance(values, (str, bytes, dict)):  # a string would be split into characters
        raise TypeError("shjoin takes a list of arguments; use shquote for a single value")
    return shlex.join(str(v) for v in values)


# Bounds on what one expression may build, so a runbook typo cannot exhaust memory or CPU.
_MAX_REPEAT = 1_000_000
_MAX_POWER_BITS = 100_000
# Numbers given to a call or filter (a width, a count) and widths in format strings stay below
# this: `'x'.ljust(10**9)`, `'%09999999d' % 1` or `center(10**9)` would build gigabytes.
_MAX_SIZE_ARGUMENT = 100_000
_MAX_OUTPUT = 1_000_000  # characters one template may render to
_PERCENT_SPEC = re.compile(r"%(?:\([^)]*\))?[-#0 +]*(\*|\d+)?(?:\.(\*|\d+))?")
_FORMAT_SPEC = re.compile(r"\{[^{}]*:[^{}]*\}")


def _check_sizes(args: Iterable[Any], where: str) -> None:
    for value in args:
        if isinstance(value, int) and not isinstance(value, bool) and abs(value) > _MAX_SIZE_ARGUMENT:
            raise SecurityError(f"{where} was given {value}, more than {_MAX_SIZE_ARGUMENT}")


def _check_format(text: str) -> None:
    widths = [w for m in _PERCENT_SPEC.finditer(text) for w in m.groups() if w]
    widths += re.findall(r"\d+", " ".join(_FORMAT_SPEC.findall(text)))
    if "*" in widths or any(int(w) > _MAX_SIZE_ARGUMENT for w in widths if w.isdigit()):
        raise SecurityError(f"a format width above {_MAX_SIZE_ARGUMENT} (or given by *)")


def _bounded_filter(function: Callable[..., Any], name: str) -> Callable[..., Any]:
    skip = 2 if getattr(function, "jinja_pass_arg", None) else 1  # the context or environment, then the value

    @functools.wraps(function)  # keeps jinja_pass_arg
    def bounded(*args: Any, **kwargs: Any) -> Any:
        _check_sizes([*args[skip:], *kwargs.values()], f"filter {name}")
        return function(*args, **kwargs)

    return bounded


# Template constructs that make a small template do unbounded work (recursion, loops in loops),
# refused when a template is read: runbook templates pick and format values, they do not compute.
_REFUSED_NODES: dict[type[nodes.Node], str] = {
    nodes.Macro: "{% macro %}", nodes.CallBlock: "{% call %}", nodes.Include: "{% include %}",
    nodes.Import: "{% import %}", nodes.FromImport: "{% from ... import %}", nodes.Extends: "{% extends %}",
}


def _every_node(tree: nodes.Node) -> list[nodes.Node]:
    """The nodes under ``tree`` in the order ``find_all`` gives them, from one walk: the checks and
    ``references`` filter this list instead of walking the tree once each (most of the time spent
    reading a runbook's templates)."""
    found: list[nodes.Node] = []
    todo = list(tree.iter_child_nodes())[::-1]
    while todo:
        node = todo.pop()
        found.append(node)
        todo.extend(list(node.iter_child_nodes())[::-1])
    return found


def _check_shape(every: list[nodes.Node]) -> None:
    """``every``: the template's nodes, from ``_every_node``."""
    refused = [node for node in every if isinstance(node, tuple(_REFUSED_NODES))]
    for node_type, shown in _REFUSED_NODES.items():
        if any(isinstance(node, node_type) for node in refused):
            raise TemplateError(f"templates may not use {shown}")
    for loop in every:
        if isinstance(loop, nodes.For) and any(True for _ in loop.find_all(nodes.For)):
            raise TemplateError("templates may not nest one {% for %} loop in another")
    _check_sandbox(every)


# Attributes the sandbox refuses to read whatever the object (its rule: names starting with `__`,
# plus these internals of functions, methods, classes and generators).
_UNSAFE_ATTRIBUTES = (UNSAFE_FUNCTION_ATTRIBUTES | UNSAFE_METHOD_ATTRIBUTES | UNSAFE_GENERATOR_ATTRIBUTES
                      | UNSAFE_COROUTINE_ATTRIBUTES | UNSAFE_ASYNC_GENERATOR_ATTRIBUTES | {"mro"})
# Methods that change a list, dict, set or deque in place, which the immutable sandbox refuses to call.
_MUTATING_METHODS = frozenset({
    "append", "appendleft", "extend", "extendleft", "insert", "pop", "popleft", "popitem", "remove", "reverse",
    "rotate", "sort", "clear", "update", "setdefault", "add", "discard", "difference_update",
    "symmetric_difference_update",
})


def _check_sandbox(every: list[nodes.Node]) -> None:
    """Refuse, when a template is read, what the sandbox would refuse when it renders."""
    for node in every:
        if not isinstance(node, (nodes.Getattr, nodes.Getitem)):
            continue
        name = node.attr if isinstance(node, nodes.Getattr) else getattr(getattr(node, "arg", None), "value", None)
        if isinstance(name, str) and (name.startswith("__") or name in _UNSAFE_ATTRIBUTES):
            raise TemplateForbidden(f"templates may not read {name!r}: the sandbox forbids internal attributes")
    for call in every:
        if (isinstance(call, nodes.Call) and isinstance(call.node, nodes.Getattr)
                and call.node.attr in _MUTATING_METHODS):
            raise TemplateForbidden(f"templates may not call {call.node.attr}(): the sandbox forbids changing "
                                    "values in place")


class _Sandbox(ImmutableSandboxedEnvironment):
    intercepted_binops = frozenset(["*", "**", "%"])

    def call_binop(self, context: Any, operator: str, left: Any, right: Any) -> Any:
        if operator == "**" and isinstance(left, int) and isinstance(right, int):
            if max(abs(left).bit_length(), 1) * right > _MAX_POWER_BITS:
                raise SecurityError(f"a power of more than {_MAX_POWER_BITS} bits")
        if operator == "*":
            for sequence, count in ((left, right), (right, left)):
                if isinstance(sequence, (str, bytes, list, tuple)) and isinstance(count, int):
                    if len(sequence) * count > _MAX_REPEAT:
                        raise SecurityError(f"repeating a sequence to more than {_MAX_REPEAT} items")
        if operator == "%" and isinstance(left, str):
            _check_format(left)
        return super().call_binop(context, operator, left, right)

    def call(__self, __context: Any, __obj: Any, *args: Any, **kwargs: Any) -> Any:  # noqa: N805 - jinja's
        _check_sizes([*args, *kwargs.values()], f"{getattr(__obj, '__name__', 'a call')}()")
        method = getattr(__obj, "__wrapped__", __obj)  # the sandbox wraps str.format
        if isinstance(getattr(method, "__self__", None), str) and getattr(method, "__name__", "") in (
                "format", "format_map"):
            _check_format(method.__self__)
        return super().call(__context, __obj, *args, **kwargs)


@lru_cache(maxsize=1)
def environment() -> ImmutableSandboxedEnvironment:
    env = _Sandbox(undefined=StrictUndefined, autoescape=False, keep_trailing_newline=True)
    env.filters["shquote"] = _shquote
    env.filters["shjoin"] = _shjoin
    env.globals.pop("lipsum", None)  # generates text of any size; nothing a runbook needs
    env.globals.pop("namespace", None)  # a mutable object: loops could double a string in it each turn
    env.filters = {name: _bounded_filter(function, name) for name, function in env.filters.items()}
    return env


def is_template(value: str) -> bool:
    return "{{" in value or "{%" in value


def parse(source: str) -> nodes.Template:
    """Parse a template (or a single expression); raise TemplateError on bad syntax."""
    return _parse(source)[0]


def _parse(source: str) -> tuple[nodes.Template, list[nodes.Node]]:
    """The template's tree and every node under it."""
    try:
        tree = environment().parse(source)
    except TemplateSyntaxError as exc:
        raise TemplateError(f"template syntax error: {exc.message}") from None
    every = _every_node(tree)
    _check_shape(every)
    return tree, every


def render_value(value: Any, context: dict[str, Any], path: str = "") -> Any:
    """Render every string inside ``value`` (dicts and lists walked recursively).

    ``path`` names ``value`` in errors (``with.url: undefined variable ...``)."""
    if isinstance(value, str):
        try:
            return render_string(value, context)
        except TemplateError as exc:
            raise TemplateError(f"{path}: {exc}" if path else str(exc)) from None
    if isinstance(value, dict):
        return {k: render_value(v, context, f"{path}.{k}" if path else str(k)) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [render_value(v, context, f"{path}[{i}]") for i, v in enumerate(value)]
    return value


# What a template that only places values in text is made of (`http://{{ hosts[h].address }}/x`,
# most templates of a runbook).
_PLACING_NODES = (nodes.Output, nodes.TemplateData, nodes.Name, nodes.Getattr, nodes.Getitem, nodes.Const)


# The same template renders for every step that holds it (a fan-out of thousands, `dr plan`, each
# retry): read it once. A template that only places values is evaluated on its tree, through the
# sandbox's getattr and getitem as its compiled code would be: compiling each of 20,000 distinct
# templates to Python was most of `dr plan`'s time.
@lru_cache(maxsize=256)
def _renderer(source: str) -> Callable[[dict[str, Any]], Iterator[str]]:
    tree, every = _parse(source)
    if all(isinstance(node, _PLACING_NODES) for node in every):
        return functools.partial(_place, tree)
    template = environment().from_string(tree)
    return lambda context: template.generate(**context)


def _place(tree: nodes.Template, context: dict[str, Any]) -> Iterator[str]:
    for output in tree.body:
        assert isinstance(output, nodes.Output)
        for child in output.nodes:
            yield child.data if isinstance(child, nodes.TemplateData) else str(_value(child, context))


def _value(node: nodes.Node, context: dict[str, Any]) -> Any:
    env = environment()
    if isinstance(node, nodes.Const):
        return node.value
    if isinstance(node, nodes.Name):  # as a template's context resolves it: its variables, then globals
        if node.name in context:
            return context[node.name]
        return env.globals[node.name] if node.name in env.globals else env.undefined(name=node.name)
    if isinstance(node, nodes.Getattr):
        return env.getattr(_value(node.node, context), node.attr)
    assert isinstance(node, nodes.Getitem)
    return env.getitem(_value(node.node, context), _value(node.arg, context))


@lru_cache(maxsize=256)
def _compiled_expression(expression: str) -> TemplateExpression:
    return environment().compile_expression(expression, undefined_to_none=False)


def render_string(source: str, context: dict[str, Any]) -> Any:
    if not is_template(source):
        return source
    try:
        single = _SINGLE_EXPRESSION.match(source)
        if single and "{{" not in single.group("expr") and "}}" not in single.group("expr"):
            value = _compiled_expression(single.group("expr"))(**context)
            if isinstance(value, Undefined):
                value._fail_with_undefined_error()
            return value
        rendered, size = [], 0
        for chunk in _renderer(source)(context):
            size += len(chunk)
            if size > _MAX_OUTPUT:
                raise SecurityError(f"it renders to more than {_MAX_OUTPUT} characters")
            rendered.append(chunk)
        return "".join(rendered)
    except TemplateError as exc:
        raise TemplateError(f"template {source!r}: {exc}") from None
    except UndefinedError as exc:
        raise TemplateError(f"undefined variable in template {source!r}: {exc.message}") from None
    except SecurityError as exc:
        raise TemplateError(f"template {source!r} tried something the sandbox forbids: {exc}") from None
    except TemplateSyntaxError as exc:
        raise TemplateError(f"template syntax error in {source!r}: {exc.message}") from None
    except Exception as exc:  # noqa: BLE001 - any error inside a user's expression is the user's to fix
        raise TemplateError(f"template {source!r} failed: {type(exc).__name__}: {exc}") from None


def evaluate_condition(source: str, context: dict[str, Any]) -> bool:
    """A step's ``when``: a bare expression or a ``{{ }}`` template; must come out boolean."""
    expression = source if is_template(source) else "{{ " + source + " }}"
    value = render_string(expression, context)
    if isinstance(value, str):
        lowered = value.strip().lower()
        if lowered in ("true", "yes", "1"):
            return True
        if lowered in ("false", "no", "0", ""):
            return False
        raise TemplateError(f"condition {source!r} gave {value!r}, which is not true or false")
    return bool(value)


def references(source: str) -> list[tuple[str, str | None]]:
    """Top-level names a template uses, each with the attribute or key read from it (if constant).

    ``{{ params.site }}`` gives ``[("params", "site")]``. Raises TemplateError on bad syntax.
    """
    return list(_references(source))


# Validation asks this of each template several times (syntax, what it reads, what it renders
# from), and a runbook may hold tens of thousands of them: parse each once.
@lru_cache(maxsize=65536)
def _references(source: str) -> tuple[tuple[str, str | None], ...]:
    expression = source if is_template(source) else "{{ " + source + " }}"
    every = _parse(expression)[1]
    names = [node for node in every if isinstance(node, nodes.Name)]
    assigned = {n.name for n in names if n.ctx in ("store", "param")}
    found: list[tuple[str, str | None]] = []
    seen_names: set[int] = set()
    for node in every:
        if not isinstance(node, (nodes.Getattr, nodes.Getitem)):
            continue
        inner = node.node
        if isinstance(inner, nodes.Name) and inner.ctx == "load" and inner.name not in assigned:
            key: str | None = None
            if isinstance(node, nodes.Getattr):
                key = node.attr
            elif isinstance(node.arg, nodes.Const) and isinstance(node.arg.value, str):
                key = node.arg.value
            found.append((inner.name, key))
            seen_names.add(id(inner))
    for name_node in names:
        if name_node.ctx == "load" and name_node.name not in assigned and id(name_node) not in seen_names:
            found.append((name_node.name, None))
    return tuple(found)


# Filters whose output a shell reads as one word whatever the value.
_SHELL_SAFE_FILTERS = frozenset({"shquote", "shjoin", "int", "float", "length", "count"})


def unquoted_in_shell(source: str) -> list[str]:
    """The expressions of a shell command line template that are put in without ``| shquote``
    (``params.site`` for ``echo {{ params.site }}``): a value with a space or ``;`` would change the command.

    Raises TemplateError on bad syntax."""
    found = []
    for output in parse(source).find_all(nodes.Output):
        for expression in output.nodes:
            if isinstance(expression, nodes.TemplateData):
                continue
            node: nodes.Expr | None = expression
            while isinstance(node, nodes.Filter) and node.name not in _SHELL_SAFE_FILTERS:
                node = node.node
            if not isinstance(node, (nodes.Filter, nodes.Const)):  # a safe filter, or a constant
                found.append(_shown(expression))
    return list(dict.fromkeys(found))


def _shown(node: nodes.Node) -> str:
    """``params.site``, ``hosts[...].vars`` or ``f(...)``: the expression, briefly."""
    if isinstance(node, nodes.Name):
        return node.name
    if isinstance(node, nodes.Getattr):
        return f"{_shown(node.node)}.{node.attr}"
    if isinstance(node, nodes.Getitem):
        key = repr(node.arg.value) if isinstance(node.arg, nodes.Const) else "..."
        return f"{_shown(node.node)}[{key}]"
    if isinstance(node, nodes.Call):
        return f"{_shown(node.node)}(...)"
    if isinstance(node, nodes.Filter) and node.node is not None:
        return f"{_shown(node.node)} | {node.name}"
    return "..."
