"""Templates that only place values in text are rendered from their tree, not compiled (what made
`dr plan` of 20,000 steps slow): they must render exactly as Jinja's compiled template does, errors
included."""

from __future__ import annotations

from typing import Any

import pytest
from jinja2.exceptions import SecurityError, UndefinedError

from dr_orchestrator.templating import TemplateError, environment, render_string


class Host:
    def __init__(self) -> None:
        self.address = "10.0.0.7"
        self._private = "hidden"


CONTEXT: dict[str, Any] = {
    "params": {"to_site": "backup", "port": 5432, "nothing": None, "items": "a key named like a method"},
    "hosts": {"db-1": Host()},
    "sites": ["primary", "backup"],
}

SAME_AS_JINJA = [
    "http://{{ hosts['db-1'].address }}:{{ params.port }}/health",
    "{{ params.to_site }} and {{ params['to_site'] }}",
    "site {{ sites[1] }}, first {{ sites.0 }}",
    "{{ params.nothing }}|{{ 3 }}|{{ 'text' }}|{{ none }}",
    "{{ params.items }} / {{ params['items'] }}",  # attribute first for `.`, key first for `[]`
    "line one\r\nline two {{ params.port }}\n",
    "{{ range }} is a global",
]

FAILS_AS_IN_JINJA = [
    "{{ missing }} here",
    "x {{ params.nope }}",
    "x {{ hosts['db-1']._private }}",  # the sandbox refuses private attributes when rendering
    "x {{ sites[7] }}",
]


@pytest.mark.parametrize("source", SAME_AS_JINJA)
def test_renders_as_jinja(source: str) -> None:
    assert render_string(source, CONTEXT) == environment().from_string(source).render(**CONTEXT)


@pytest.mark.parametrize("source", FAILS_AS_IN_JINJA)
def test_fails_as_in_jinja(source: str) -> None:
    with pytest.raises((UndefinedError, SecurityError)) as expected:
        environment().from_string(source).render(**CONTEXT)
    with pytest.raises(TemplateError) as error:
        render_string(source, CONTEXT)
    assert expected.value.message and expected.value.message in str(error.value)
