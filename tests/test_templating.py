"""Templates in runbooks: a sandbox that holds, undefined names refused, shell quoting, native values."""

from __future__ import annotations

import shlex
import subprocess
from typing import Any

import pytest

from dr_orchestrator.templating import (
    TemplateError,
    TemplateForbidden,
    evaluate_condition,
    references,
    render_string,
    render_value,
    unquoted_in_shell,
)

CONTEXT: dict[str, Any] = {
    "params": {"site": "backup", "port": 5433, "drill": True, "hosts": ["a", "b"]},
    "steps": {"find": {"state": "succeeded", "output": {"lsn": "0/3000060", "count": 0}, "error": None}},
    "run": {"id": "r1", "kind": "failover"},
}


@pytest.mark.parametrize(
    "source",
    [
        "{{ ''.__class__.__mro__ }}",
        "{{ ''.__class__.__mro__[1].__subclasses__() }}",
        "{{ cycler.__init__.__globals__ }}",
        "{{ joiner.__init__.__globals__.os }}",
        "{{ namespace.__init__.__globals__ }}",
        "{{ params.__class__ }}",
        "{{ (1).__class__.__base__ }}",
        "{{ self.__init__ }}",
        "{{ run.id.__class__ }}",
        "{{ params['__class__'] }}",
        "{{ params|attr('__class__') }}",
        "before {{ ''.__class__ }} after",
        "{% for c in ''.__class__.__mro__ %}{{ c }}{% endfor %}",
        "{{ '{0.__class__.__mro__}'.format(params) }}",
        "{{ '{0.__init__.__globals__}'.format_map({'0': cycler}) }}",
    ],
)
def test_sandbox_escapes_are_refused(source: str) -> None:
    with pytest.raises(TemplateError):
        render_string(source, CONTEXT)


@pytest.mark.parametrize(
    "source",
    [
        "{{ params.update({'site': 'primary'}) }}",  # templates cannot change what they read
        "{{ params.hosts.append('c') }}",
        "{{ params.hosts.pop() }}",
    ],
)
def test_templates_cannot_change_their_context(source: str) -> None:
    with pytest.raises(TemplateError, match="sandbox"):
        render_string(source, CONTEXT)
    assert CONTEXT["params"] == {"site": "backup", "port": 5433, "drill": True, "hosts": ["a", "b"]}


@pytest.mark.parametrize(
    "source",
    ["{{ 'x' * 100000000 }}", "{{ [0] * 100000000 }}", "{{ 10 ** 10000000 }}", "{{ range(100000000) | list }}"],
)
def test_expressions_cannot_exhaust_memory(source: str) -> None:
    with pytest.raises(TemplateError):
        render_string(source, CONTEXT)


def test_small_arithmetic_still_works() -> None:
    assert render_string("{{ 2 ** 10 }}", CONTEXT) == 1024
    assert render_string("{{ 'ab' * 3 }}", CONTEXT) == "ababab"
    assert render_string("{{ params.port * 2 }}", CONTEXT) == 10866


@pytest.mark.parametrize(
    ("source", "missing"),
    [
        ("{{ nothing }}", "'nothing' is undefined"),
        ("{{ params.target }}", "no attribute 'target'"),
        ("{{ steps.find.output.lns }}", "no attribute 'lns'"),
        ("url http://{{ params.host }}/", "no attribute 'host'"),
        ("{% if params.missing %}x{% endif %}", "no attribute 'missing'"),
        ("{{ params.target | default(undefined_too) }}", "'undefined_too' is undefined"),
    ],
)
def test_undefined_names_are_refused(source: str, missing: str) -> None:
    with pytest.raises(TemplateError, match="undefined variable") as error:
        render_string(source, CONTEXT)
    assert missing in str(error.value)


def test_default_filter_is_the_way_to_make_a_name_optional() -> None:
    assert render_string("{{ params.target | default('primary') }}", CONTEXT) == "primary"


def test_syntax_errors_are_template_errors() -> None:
    with pytest.raises(TemplateError, match="syntax"):
        render_string("{{ params.site ", CONTEXT)
    with pytest.raises(TemplateError, match="syntax"):
        references("{{ 1 + }}")


HOSTILE = [
    "plain",
    "two words",
    "it's",
    'say "hi"',
    "$(rm -rf /)",
    "`reboot`",
    "a; shutdown -h now",
    "x && y || z",
    "line\nbreak",
    "*",
    "-rf",
    "",
    "back\\slash",
    "ünïcødé",
]


@pytest.mark.parametrize("value", HOSTILE)
def test_shquote_makes_any_string_one_inert_shell_word(value: str) -> None:
    quoted = render_string("{{ v | shquote }}", {"v": value})
    assert shlex.split(quoted) == [value]
    # The shell itself agrees: printf receives exactly the original text, nothing runs.
    shown = subprocess.run(["sh", "-c", f"printf %s {quoted}"], capture_output=True, text=True, check=True)
    assert shown.stdout == value


def test_shjoin_quotes_each_argument() -> None:
    joined = render_string("echo {{ args | shjoin }}", {"args": HOSTILE})
    assert shlex.split(joined) == ["echo", *HOSTILE]
    shown = subprocess.run(["sh", "-c", 'for a in "$@"; do printf "%s\\0" "$a"; done', "sh", *shlex.split(joined)[1:]],
                           capture_output=True, text=True, check=True)
    assert shown.stdout.split("\0")[:-1] == HOSTILE


def test_shquote_of_non_strings_quotes_their_text() -> None:
    assert render_string("{{ params.port | shquote }}", CONTEXT) == "5433"


def test_shjoin_refuses_a_single_string() -> None:
    with pytest.raises(TemplateError, match="shquote"):
        render_string("{{ 'rm -rf' | shjoin }}", CONTEXT)


def test_single_expression_renders_to_its_native_value() -> None:
    assert render_string("{{ params.port }}", CONTEXT) == 5433
    assert render_string("  {{ params.hosts }} ", CONTEXT) == ["a", "b"]
    assert render_string("{{ params.drill }}", CONTEXT) is True
    assert render_string("{{ steps.find.output.count }}", CONTEXT) == 0
    assert render_string("{{ none }}", CONTEXT) is None
    assert render_string("{{ {'a': params.port} }}", CONTEXT) == {"a": 5433}


def test_mixed_text_renders_to_text() -> None:
    assert render_string("port {{ params.port }}", CONTEXT) == "port 5433"
    assert render_string("{{ params.site }}:{{ params.port }}", CONTEXT) == "backup:5433"
    assert render_string("no template here", CONTEXT) == "no template here"


def test_render_value_walks_structures_and_names_the_failing_field() -> None:
    value = {"url": "http://{{ params.site }}:{{ params.port }}/", "hosts": ["{{ params.hosts[0] }}", 3], "n": 1}
    assert render_value(value, CONTEXT) == {"url": "http://backup:5433/", "hosts": ["a", 3], "n": 1}
    with pytest.raises(TemplateError) as error:
        render_value({"probe": {"targets": ["ok", "{{ params.nope }}"]}}, CONTEXT, "with")
    assert str(error.value).startswith("with.probe.targets[1]: undefined variable")


@pytest.mark.parametrize(
    ("condition", "expected"),
    [
        ("params.drill", True),
        ("not params.drill", False),
        ("{{ params.port > 5000 }}", True),
        ("steps.find.output.count == 0", True),
        ("true", True),
        ("false", False),
        ("{{ 'yes' }}", True),
        ("{{ 'no' }}", False),
        ("params.hosts", True),
    ],
)
def test_conditions(condition: str, expected: bool) -> None:
    assert evaluate_condition(condition, CONTEXT) is expected


def test_condition_that_is_not_a_boolean_is_refused() -> None:
    with pytest.raises(TemplateError, match="not true or false"):
        evaluate_condition("{{ params.site }}", CONTEXT)


def test_references_name_what_a_template_reads() -> None:
    found = references("{{ params.site }} {{ steps['find'].output.lsn }} {{ run.id }} {{ loose }}")
    assert found == [("params", "site"), ("steps", "find"), ("run", "id"), ("loose", None)]


def test_references_ignore_loop_and_set_variables() -> None:
    assert references("{% for h in params.hosts %}{{ h.name }}{% endfor %}{% set x = 1 %}{{ x }}") == [
        ("params", "hosts")
    ]


def test_bare_conditions_are_read_as_expressions() -> None:
    assert references("params.drill and not vars.dry") == [("params", "drill"), ("vars", "dry")]


@pytest.mark.parametrize(
    "source",
    [
        "{{ ''.__class__.__mro__ }}",
        "{{ cycler.__init__.__globals__ }}",
        "{{ params['__class__'] }}",
        "before {{ ''.__class__ }} after",
        "{% for c in ''.__class__.__mro__ %}{{ c }}{% endfor %}",
        "{{ params.update({'site': 'primary'}) }}",
        "{{ params.hosts.pop() }}",
        "{{ params.__class__.mro() }}",
        "params.hosts.append('c')",  # a bare condition
    ],
)
def test_what_the_sandbox_refuses_is_found_when_a_template_is_read(source: str) -> None:
    with pytest.raises(TemplateForbidden, match="the sandbox forbids"):
        references(source)
    with pytest.raises(TemplateError):  # and still refused when rendered
        render_string(source if "{" in source else "{{ " + source + " }}", CONTEXT)


@pytest.mark.parametrize(
    "source", ["{{ params.get('site') }}", "{{ params.hosts | list }}", "{{ steps.find.output._lsn | default(1) }}",
               "{{ params.site.upper() }}", "{{ params.hosts | select('ne', 'a') | list }}"],
)
def test_ordinary_templates_are_not_mistaken_for_escapes(source: str) -> None:
    references(source)


@pytest.mark.parametrize(
    ("source", "unquoted"),
    [
        ("echo {{ params.site }}", ["params.site"]),
        ("echo {{ params.site | shquote }} {{ params.hosts | shjoin }} {{ params.port | int }}", []),
        ("echo {{ params.site | shquote | upper }}", []),
        ("kill {{ steps.find.output.lsn | trim }}", ["steps.find.output.lsn | trim"]),
        ("{{ hosts[params.site].vars.ctl }} start {{ 'x' }}", ["hosts[...].vars.ctl"]),
        ("{% for h in params.hosts %}ping {{ h }}; {% endfor %}", ["h"]),
        ("echo {{ params.site }} {{ params.site }}", ["params.site"]),
        ("echo plain", []),
    ],
)
def test_unquoted_expressions_in_a_shell_command_are_found(source: str, unquoted: list[str]) -> None:
    assert unquoted_in_shell(source) == unquoted
