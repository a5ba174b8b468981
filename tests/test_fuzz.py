"""Hostile input: runbooks, inventories and drills fuzzed with Hypothesis (random YAML structures,
wrong types, huge values, deep nesting, long strings, templates that try to leave the sandbox or
inject shell, YAML bombs). Loading, `dr validate` and `dr plan` must always answer with a clear
error (a Problem naming the file) or a plan, never a traceback, and never execute anything: a
canary file that every hostile payload tries to create must never appear.

Fixed seed (derandomize) and bounded examples, so the suite stays fast and repeatable.
"""

from __future__ import annotations

import copy
import json
import os
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import yaml
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from dr_orchestrator import templating
from dr_orchestrator.actions import default_registry
from dr_orchestrator.drills.load import load_drill
from dr_orchestrator.engine import Engine
from dr_orchestrator.loading import load_inventory
from dr_orchestrator.model.events import Event, Observer
from dr_orchestrator.plans import PlanError, build_plan, describe_plan, validate_files
from dr_orchestrator.yamlsource import LoadError, Problem

REPO = Path(__file__).resolve().parent.parent
DRILL_RUNBOOK = REPO / "tests" / "data" / "drills" / "quick-failover.yml"
WORK = Path(tempfile.mkdtemp(prefix="dr-fuzz-"))
CANARY = WORK / "pwned"
FUZZ = settings(derandomize=True, max_examples=50, deadline=None, database=None,
                suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])

HOSTILE = [
    "{{ ''.__class__.__mro__[1].__subclasses__() }}",
    f"{{{{ cycler.__init__.__globals__.os.system('touch {CANARY}') }}}}",
    f"{{{{ joiner.__init__.__globals__['os'].popen('touch {CANARY}').read() }}}}",
    f"{{{{ lipsum.__globals__['os'].system('touch {CANARY}') }}}}",
    f"{{{{ namespace.__init__.__globals__['os'].system('touch {CANARY}') }}}}",
    f"{{{{ inventory.site_hosts.__func__.__globals__['os'].system('touch {CANARY}') }}}}",
    f"{{{{ params.__class__.__init__.__globals__['__builtins__']['__import__']('os').system('touch {CANARY}') }}}}",
    "{{ self._TemplateReference__context }}",
    "{% for c in [].__class__.__base__.__subclasses__() %}{{ c }}{% endfor %}",
    "{{ params | attr('__class__') | attr('__mro__') }}",
    "{{ inventory.model_config }}",
    "{{ '{0.__class__.__mro__}'.format(params) }}",
    "{{ 'a' * 100000000 }}",
    "{{ 9 ** 9999999 }}",
    "{{ range(10 ** 9) | list | length }}",
    "{% include '/etc/passwd' %}",
    "{% import 'os' as os %}{{ os.system('x') }}",
    "{% extends '/etc/passwd' %}",
    "{{ steps }}", "{{", "}}", "{%", "{{ x }", "{% if %}", "{# unclosed",
    f"$(touch {CANARY})", f"`touch {CANARY}`", f"; touch {CANARY}", f"&& touch {CANARY}", f"| touch {CANARY}",
    f"'; touch {CANARY}; '", f"\"; touch {CANARY}; \"", "; rm -rf /tmp/dr-fuzz-nothing-here",
    f"{{{{ 'x' | shquote }}}}; touch {CANARY}",
]
# Small templates that would do enormous work: each is refused, quickly.
AMPLIFIERS = [
    "{{ '%0100000000d' % 1 }}", "{{ '%*d' % (100000000, 1) }}", "{{ '{:>100000000}'.format(1) }}",
    "{{ '{:{}}'.format(1, 100000000) }}", "{{ 'x'.ljust(100000000) }}", "{{ 'x' | center(100000000) }}",
    "{{ 'x' | indent(100000000, true) }}",
    "{% set ns = namespace(a='x') %}{% for i in range(40) %}{% set ns.a = ns.a ~ ns.a %}{% endfor %}",
    "{% macro f(s, n) %}{{ f(s ~ s, n - 1) }}{% endmacro %}{{ f('x', 40) }}",
    "{% for i in range(100000) %}{% for j in range(100000) %}{% endfor %}{% endfor %}",
    "{% for i in range(100000) %}{{ 'x' * 100 }}{% endfor %}",
]
HOSTILE += AMPLIFIERS
SPECIAL = ["env:DR_FUZZ_UNSET", "file:/nonexistent/secret", "30s", "-1s", "0s", "1e400", "primary", "backup",
           "nowhere", "noop", "shell.run", "http.check", "quotation", "trading", "rollback", "continue", "abort",
           "service_restored", "x" * 5_000, "\x00", "\ufeff", "é" * 1000, "127.0.0.1:1", "http://127.0.0.1:1/"]
KEYS = ["name", "steps", "id", "action", "with", "needs", "when", "timeout", "retries", "on_failure", "rollback",
        "marks", "service", "site", "parameters", "scope", "kind", "max_parallel", "approvals", "default",
        "required", "choices", "count", "delay", "all", "vars", "dr", "children", "hosts", "sites", "services",
        "rto", "rpo", "safety", "readiness", "rules", "ansible_host", "ansible_port", "fault", "runbook",
        "expectations", "schedule", "cron", "notify", "failback", "cleanup", "path", "inventory", "message"]

scalars = st.one_of(
    st.none(), st.booleans(),
    st.integers(min_value=-(10**30), max_value=10**30),
    st.floats(allow_nan=True, allow_infinity=True),
    st.text(max_size=20),
    st.sampled_from(HOSTILE), st.sampled_from(SPECIAL),
)
keys = st.one_of(st.sampled_from(KEYS), st.text(min_size=1, max_size=10))
values = st.recursive(scalars, lambda inner: st.one_of(st.lists(inner, max_size=4),
                                                       st.dictionaries(keys, inner, max_size=4)), max_leaves=12)


def paths(document: Any, at: tuple[Any, ...] = ()) -> list[tuple[Any, ...]]:
    """Every place in a document: keys of mappings and indexes of lists, the root included."""
    found = [at]
    if isinstance(document, dict):
        for key, value in document.items():
            found += paths(value, at + (key,))
    elif isinstance(document, list):
        for index, value in enumerate(document):
            found += paths(value, at + (index,))
    return found


@st.composite
def mutated(draw: st.DrawFn, original: Any) -> Any:
    """``original`` with one to three places replaced, removed or given an extra key."""
    document = copy.deepcopy(original)
    for _ in range(draw(st.integers(1, 3))):
        where = draw(st.sampled_from(paths(document)))
        if not where:
            document = draw(values) if draw(st.integers(0, 9)) == 0 else document
            continue
        parent = document
        for part in where[:-1]:
            parent = parent[part]
        last = where[-1]
        operation = draw(st.sampled_from(["replace", "replace", "delete", "extra"]))
        if operation == "replace":
            parent[last] = draw(values)
        elif operation == "delete":
            del parent[last]
        elif isinstance(parent[last], dict):
            parent[last][draw(keys)] = draw(values)
        elif isinstance(parent[last], list):
            parent[last].append(draw(values))
    return document


FRAGMENTS = [
    "name: x\n", "steps:\n", "  - id: a\n", "    action: noop\n", "    with: {message: hi}\n", "- ", ": ", "? ",
    "&a ", "*a ", "<<: *a\n", "a: &a [x, x, x]\nb: [*a, *a, *a]\n",
    f"!!python/object/apply:os.system ['touch {CANARY}']\n",
    "!!python/name:os.system\n", "!!binary aGVsbG8=\n", "!!set {a, b}\n", "!!timestamp 2001-12-14\n", "%YAML 1.1\n",
    "%TAG ! tag:x,2000:\n", "---\n", "...\n", "\t", "\x00", "\ufeff", "{", "[", "]", "}", "'", '"', "|\n", ">-\n",
    "#", "\n", "  ", "{{ x }}", "\\", "\r", "\u2028", "key: value\n", "[" * 200, "- " * 150 + "x\n",
]
raw_texts = st.one_of(
    st.lists(st.sampled_from(FRAGMENTS), max_size=12).map("".join),
    st.text(max_size=200),
    st.binary(max_size=200).map(lambda data: data.decode("latin-1")),
)


def write(name: str, content: Any) -> Path:
    path = WORK / name
    if isinstance(content, str):
        path.write_bytes(content.encode("utf-8", "surrogatepass"))
    else:
        try:
            path.write_text(yaml.safe_dump(content, allow_unicode=True, sort_keys=False))
        except yaml.YAMLError:
            path.write_text(repr(content))
    return path


def assert_clear(problems: list[Problem], *files: Path) -> None:
    assert problems
    for problem in problems:
        assert isinstance(problem, Problem)
        assert problem.file in {str(f) for f in files}, problem
        assert problem.message and "Traceback" not in problem.message
        assert problem.line is None or problem.line >= 1
        assert str(problem)  # prints


def plan_everything(runbook: Path, inventory: Path) -> None:
    """What `dr validate` and `dr plan` do, through the Python API: clear problems or a plan."""
    problems = validate_files(str(runbook), str(inventory))
    if problems:
        assert_clear(problems, runbook, inventory)
    try:
        plan = build_plan(str(runbook), str(inventory))
    except LoadError as exc:
        assert problems, "build_plan refused what validate accepted"
        assert_clear(exc.problems, runbook, inventory)
    except PlanError as exc:
        assert str(exc)
    else:
        assert not problems
        json.dumps(describe_plan(plan), default=str)
    assert not CANARY.exists(), "a hostile input executed something"


# ---------------------------------------------------------------- the valid starting points

RUNBOOK: dict[str, Any] = {
    "name": "fuzz-target",
    "kind": "failover",
    "scope": {"services": ["quotation"]},
    "parameters": {"to_site": {"default": "backup"}, "port": 8080, "token": {"default": "env:DR_FUZZ_UNSET"}},
    "steps": [
        {"id": "check", "action": "tcp.check", "with": {"host": "127.0.0.1", "port": "{{ params.port }}"},
         "timeout": "5s", "on_failure": "continue", "needs": []},
        {"id": "switch", "action": "shell.run", "site": "{{ params.to_site }}",
         "with": {"argv": ["echo", "{{ params.to_site | shquote }}"], "env": {"T": "{{ params.token }}"}},
         "retries": {"count": 2, "delay": "100ms"}, "needs": ["check"],
         "rollback": {"action": "noop", "with": {"message": "undo {{ steps.switch.output.stdout }}"}}},
        {"id": "verify", "action": "http.check", "with": {"url": "http://127.0.0.1:{{ params.port }}/",
                                                          "consecutive": 2, "deadline": "1s"},
         "marks": ["service_restored"], "when": "params.port > 0", "needs": ["switch"]},
    ],
}
INVENTORY: dict[str, Any] = {"all": {
    "vars": {"dr": {
        "name": "fuzz", "sites": {"primary": {"description": "a"}, "backup": {"region": "b"}},
        "services": {"quotation": {"rto": "30s", "rpo": "1m", "tier": "critical", "sites": ["primary", "backup"],
                                   "vars": {"port": 8080}}},
        "vars": {"databases": {"dbname": "d", "user": "u", "hosts": {"primary": "127.0.0.1"},
                               "password": "env:DR_FUZZ_UNSET"}},
        "safety": {"rules": {"target_ready": True}, "readiness": {"backup": [{"tcp": "127.0.0.1:1", "timeout": "1s"}]}},
    }},
    "children": {"primary": {"hosts": {"p1": {"ansible_host": "127.0.0.1", "ansible_port": 22, "dr_roles": ["app"]}}},
                 "backup": {"hosts": {"b1": {"ansible_host": "127.0.0.1"}}}},
}}


def drill(inventory: Path) -> dict[str, Any]:
    return {
        "name": "fuzz-drill", "scenario": "service_failure", "inventory": str(inventory),
        "fault": {"description": "x", "steps": [{"id": "break", "action": "noop", "with": {"message": "x"}}]},
        "runbook": {"path": str(DRILL_RUNBOOK), "parameters": {"hold": "0s"}},
        "expectations": {"quotation": {"rto": "30s", "health": [{"id": "h", "action": "noop"}]}},
        "failback": str(DRILL_RUNBOOK),
        "schedule": {"cron": "0 2 1 1,4,7,10 *", "timezone": "UTC"},
        "pre_approved": True,
        "notify": [{"webhook": {"url": "env:DR_FUZZ_UNSET", "attempts": 1}}],
        "cleanup": [{"id": "tidy", "action": "noop"}],
    }


def test_the_starting_points_are_valid() -> None:
    inventory = write("inventory.yml", INVENTORY)
    runbook = write("runbook.yml", RUNBOOK)
    assert validate_files(str(runbook), str(inventory)) == []
    load_drill(write("drill.yml", drill(inventory)))


# ---------------------------------------------------------------- the properties


@FUZZ
@given(mutated(RUNBOOK))
def test_mutated_runbooks_give_clear_errors_or_plans(document: Any) -> None:
    plan_everything(write("runbook.yml", document), write("inventory.yml", INVENTORY))


@FUZZ
@given(mutated(INVENTORY))
def test_mutated_inventories_give_clear_errors_or_plans(document: Any) -> None:
    inventory = write("inventory.yml", document)
    try:
        load_inventory(str(inventory))
    except LoadError as exc:
        assert_clear(exc.problems, inventory)
    plan_everything(write("runbook.yml", RUNBOOK), inventory)


@FUZZ
@given(st.data())
def test_mutated_drills_give_clear_errors(data: st.DataObject) -> None:
    inventory = write("inventory.yml", INVENTORY)
    path = write("drill.yml", data.draw(mutated(drill(inventory))))
    try:
        load_drill(path)
    except LoadError as exc:
        assert_clear(exc.problems, path, inventory, DRILL_RUNBOOK)
    assert not CANARY.exists()


@FUZZ
@given(raw_texts, st.sampled_from(["runbook", "inventory", "drill"]))
def test_random_text_gives_clear_errors(text: str, kind: str) -> None:
    path = write(f"{kind}.yml", text)
    inventory = write("inventory.yml", INVENTORY) if kind != "inventory" else path
    if kind == "drill":
        try:
            load_drill(path)
        except LoadError as exc:
            assert_clear(exc.problems, path)
    else:
        plan_everything(path if kind == "runbook" else write("runbook.yml", RUNBOOK), inventory)
    assert not CANARY.exists()


@FUZZ
@given(st.sampled_from(HOSTILE), st.sampled_from(["with", "when", "site", "default"]))
def test_hostile_templates_in_any_templated_place_never_run_anything(payload: str, place: str) -> None:
    document = copy.deepcopy(RUNBOOK)
    step = document["steps"][2]
    if place == "with":
        step["with"]["url"] = payload
    elif place == "when":
        step["when"] = payload
    elif place == "site":
        step["site"] = payload
    else:
        document["parameters"]["to_site"]["default"] = payload
    plan_everything(write("runbook.yml", document), write("inventory.yml", INVENTORY))


# ---------------------------------------------------------------- running hostile templates


@pytest.mark.parametrize("payload", AMPLIFIERS)
def test_amplifying_templates_are_refused_at_once(payload: str) -> None:
    started = time.monotonic()
    with pytest.raises(templating.TemplateError, match="may not|forbids|undefined"):
        templating.render_string(payload, {"params": {}})
    assert time.monotonic() - started < 2.0


def recorder(seen: list[Event]) -> Observer:
    def record(event: Event) -> None:
        seen.append(event)

    return record


@pytest.mark.parametrize("payload", HOSTILE, ids=[f"hostile-{i}" for i in range(len(HOSTILE))])  # stable: no tmp path
def test_the_engine_renders_hostile_templates_without_executing_them(payload: str) -> None:
    """At run time too: a noop's message and a shell.run's argv carrying the payload as one argument."""
    document = {"name": "hostile", "steps": [
        {"id": "say", "action": "noop", "with": {"message": payload}, "on_failure": "continue", "needs": []},
        {"id": "argv", "action": "shell.run", "with": {"argv": ["echo", payload]}, "on_failure": "continue",
         "needs": []},
    ]}
    runbook = write("engine-runbook.yml", document)
    try:
        plan = build_plan(str(runbook), str(write("inventory.yml", INVENTORY)))
    except LoadError as exc:
        assert_clear(exc.problems, runbook)
        return
    seen: list[Event] = []
    outcome = Engine(default_registry(), [recorder(seen)]).run(plan)
    assert outcome.error is None or "internal error" not in outcome.error
    assert set(outcome.steps) == {"say", "argv"}
    assert not CANARY.exists()


# ---------------------------------------------------------------- the real command


CLI_CASES: dict[str, Callable[[], str]] = {
    "deep-nesting": lambda: "name: x\nsteps: " + "[" * 5000 + "]" * 5000 + "\n",
    "block-nesting": lambda: "name: x\nsteps:\n" + "".join("  " * i + "- \n" for i in range(1, 400)) + "\n",
    "billion-laughs": lambda: "a: &a [lol, lol, lol, lol, lol, lol, lol, lol, lol]\n"
                              "b: &b [*a, *a, *a, *a, *a, *a, *a, *a, *a]\n"
                              "c: &c [*b, *b, *b, *b, *b, *b, *b, *b, *b]\n",
    "python-tag": lambda: f"name: !!python/object/apply:os.system ['touch {CANARY}']\nsteps: []\n",
    "huge-values": lambda: "name: x\nmax_parallel: 1e999\nsteps:\n  - {id: a, action: noop, "
                           "timeout: 99999999999999999d, retries: {count: 99999999999999999999}}\n",
    "long-strings": lambda: yaml.safe_dump({"name": "x" * 300_000, "steps": [
        {"id": "a" * 100_000, "action": "noop", "with": {"message": "m" * 1_000_000}}]}),
    "hostile-template": lambda: yaml.safe_dump({"name": "x", "steps": [
        {"id": "a", "action": "noop", "with": {"message": HOSTILE[1]}}]}),
    "shell-injection-in-parameter": lambda: yaml.safe_dump({"name": "x", "parameters": {"p": f"$(touch {CANARY})"},
                                                            "steps": [{"id": "a", "action": "noop",
                                                                       "with": {"message": "{{ params.p }}"}}]}),
    "not-utf8": lambda: "name: \udcff\udcfe\n",
}


@pytest.mark.parametrize("case", sorted(CLI_CASES))
def test_dr_validate_and_plan_on_hostile_files(case: str, tmp_path: Path) -> None:
    runbook = tmp_path / f"{case}.yml"
    runbook.write_bytes(CLI_CASES[case]().encode("utf-8", "surrogateescape"))
    inventory = write("inventory.yml", INVENTORY)
    for command in ("validate", "plan"):
        result = subprocess.run([sys.executable, "-m", "dr_orchestrator.cli", command, str(runbook), "-i",
                                 str(inventory)], capture_output=True, text=True, timeout=60, cwd=tmp_path,
                                env={**os.environ, "DR_DATABASE_URL": f"sqlite:///{tmp_path / 'e.db'}"})
        assert "Traceback" not in result.stderr, result.stderr
        if case == "shell-injection-in-parameter":
            assert result.returncode == 0, result.stderr  # a valid file; the plan shows what would run
            if command == "plan":
                assert "$(touch" in result.stdout
        else:
            assert result.returncode == 2, (result.stdout, result.stderr)
            assert str(runbook) in result.stderr and "problem(s) found" in result.stderr
            assert case != "hostile-template" or "the sandbox forbids" in result.stderr  # refused before running
    assert not CANARY.exists()
