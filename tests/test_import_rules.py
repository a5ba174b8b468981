"""The house's import rules (docs/architecture.md), checked on every module's imports, lazy ones too."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parent.parent / "dr_orchestrator"
LEAVES = {"secrets"}  # every room may import these (docs/architecture.md)

# room -> the rooms it may import (besides itself and the leaves); None: anything but what NEVER says
MAY_IMPORT: dict[str, set[str] | None] = {
    "model": set(),
    "yamlsource": set(),
    "templating": set(),
    "loading": {"model", "yamlsource", "templating"},
    "evidence": {"model"},
    "actions": {"model", "yamlsource"},
    "engine": {"model", "templating", "actions.base"},
    "cluster": {"model", "evidence"},
    "node": {"model", "loading", "evidence", "runs", "watch", "cluster", "api", "scheduling"},
    "lab": {"model"},
}
# nothing outside the CLI's package imports it; nothing outside these imports the lab
CLI_ROOM = "cli"
LAB_USERS = ("lab", "cli", "demo")  # `dr lab` and `dr demo` drive the lab; product code never does


def module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def imports_of(path: Path, modules: set[str] | None = None) -> set[str]:
    """Every dr_orchestrator module ``path`` imports, as a dotted name (``from X import y`` gives X.y and X).

    Given the set of ``modules`` that exist, each import is resolved to the module it loads instead:
    ``from X import y`` to X.y when X.y is a module, else to X; ``import X.y`` to X.y."""
    found: set[str] = set()
    package = module_name(path) if path.name == "__init__.py" else module_name(path).rpartition(".")[0]
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            found |= {alias.name for alias in node.names}
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join([*anchor, base] if base else anchor)
            if modules is None:
                found |= {f"{base}.{alias.name}" for alias in node.names} | {base}
            else:
                found |= {f"{base}.{alias.name}" if f"{base}.{alias.name}" in modules else base
                          for alias in node.names}
    return {name for name in found if name == "dr_orchestrator" or name.startswith("dr_orchestrator.")}


def room_of(module: str) -> str:
    parts = module.split(".")
    return parts[1] if len(parts) > 1 else ""


def allowed(target: str, rules: set[str]) -> bool:
    inner = target.removeprefix("dr_orchestrator.")
    if target == "dr_orchestrator" or room_of(target) in LEAVES:
        return True
    return any(inner == rule or inner.startswith(rule + ".") for rule in rules)


MODULES = sorted(PACKAGE.rglob("*.py"))


@pytest.mark.parametrize("path", MODULES, ids=lambda p: str(p.relative_to(PACKAGE)))
def test_each_module_imports_only_what_its_room_may(path: Path) -> None:
    module = module_name(path)
    room = room_of(module)
    rules = MAY_IMPORT.get(room)
    broken = []
    for target in sorted(imports_of(path)):
        target_room = room_of(target)
        if target_room == room:
            continue
        if target_room == CLI_ROOM:
            broken.append(f"{target} (nothing imports the CLI)")
        elif target_room == "lab" and room not in LAB_USERS:
            broken.append(f"{target} (product code never imports the lab)")
        elif rules is not None and not allowed(target, rules):
            broken.append(f"{target} (room {room} may import {', '.join(sorted(rules)) or 'nothing of the project'})")
    assert not broken, f"{module} imports " + "; ".join(broken)


# An integration with several action modules keeps them in a subpackage around one base module, which
# they share; they import no one another (issue 17: `postgres.py`, `postgres_rebuild.py`, `pgdb.py`).
INTEGRATION_BASES = {"dr_orchestrator.actions.aws": "common", "dr_orchestrator.actions.postgres": "base"}
INTEGRATION_MODULES = [path for path in MODULES if module_name(path).rpartition(".")[0] in INTEGRATION_BASES]


@pytest.mark.parametrize("path", INTEGRATION_MODULES, ids=lambda p: str(p.relative_to(PACKAGE)))
def test_an_integrations_action_modules_share_its_base_not_one_another(path: Path) -> None:
    module = module_name(path)
    package = module.rpartition(".")[0]
    base = f"{package}.{INTEGRATION_BASES[package]}"
    siblings = {target for target in imports_of(path, MODULE_NAMES)
                if target.startswith(package + ".") and target != module}
    if module == base:
        assert not siblings, f"{module}, the base, imports action modules: {', '.join(sorted(siblings))}"
    else:
        assert siblings <= {base}, f"{module} imports {', '.join(sorted(siblings - {base}))}: share it through {base}"


def test_the_checker_sees_lazy_and_relative_imports(tmp_path: Path) -> None:
    """A rule checker that missed imports inside functions would pass everything."""
    engine_module = PACKAGE / "engine" / "executor.py"
    assert "dr_orchestrator.actions.base.RunResources" in imports_of(engine_module)
    lazy = PACKAGE / "watch" / "service.py"
    assert "dr_orchestrator.evidence.incidents" in imports_of(lazy)  # imported inside a method
    assert not allowed("dr_orchestrator.evidence.store", MAY_IMPORT["engine"] or set())
    assert allowed("dr_orchestrator.actions.base", MAY_IMPORT["engine"] or set())
    assert not allowed("dr_orchestrator.actions.ssh", MAY_IMPORT["engine"] or set())


# --- The tests' own rule (issue 17 item 6): test modules import helpers (tests/support/, conftest.py
# for fixtures), never each other; neither does a helper import a test module.
TESTS = Path(__file__).resolve().parent
TEST_MODULES = {path.stem for path in TESTS.glob("test_*.py")}


def imported_test_modules(path: Path) -> set[str]:
    """The test modules (tests/test_*.py) ``path`` imports, lazily or not, under any spelling."""
    found: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            found |= {alias.name for alias in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module:
            found |= {node.module, *(f"{node.module}.{alias.name}" for alias in node.names)}
        elif isinstance(node, ast.ImportFrom):  # from . import test_x
            found |= {alias.name for alias in node.names}
        elif (isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute | ast.Name)
              and (node.func.attr if isinstance(node.func, ast.Attribute) else node.func.id) == "import_module"
              and node.args and isinstance(node.args[0], ast.Constant) and isinstance(node.args[0].value, str)):
            found.add(node.args[0].value)
    return {part for name in found for part in name.split(".") if part in TEST_MODULES}


TEST_CODE = sorted(p for p in TESTS.rglob("*.py") if "__pycache__" not in p.parts)


@pytest.mark.parametrize("path", TEST_CODE, ids=lambda p: str(p.relative_to(TESTS)))
def test_no_test_module_is_imported_by_another_module_of_the_tests(path: Path) -> None:
    imported = imported_test_modules(path) - {path.stem}
    assert not imported, (f"tests/{path.relative_to(TESTS)} imports the test module(s) {', '.join(sorted(imported))}: "
                          "move what they share to tests/support/ (or a fixture to tests/conftest.py)")


def test_the_tests_checker_sees_every_spelling(tmp_path: Path) -> None:
    """A checker that missed an import inside a function, or `import test_x as y`, would pass everything."""
    assert {"test_engine", "test_watch_service"} <= TEST_MODULES
    probe = tmp_path / "probe.py"
    probe.write_text("import json\nfrom support.engine import Bench\n\n\ndef helper():\n"
                     "    from test_engine import Bench\n    import test_watch_service as w\n"
                     "    return importlib.import_module('test_evidence_audit')\n")
    assert imported_test_modules(probe) == {"test_engine", "test_watch_service", "test_evidence_audit"}
    probe.write_text("from support.engine import Bench\nfrom support.watch import steps\nimport pytest\n")
    assert imported_test_modules(probe) == set()


# --- No import cycle between modules of dr_orchestrator (issue 17 item 3), lazy imports included: a
# cycle is one tangle however it is spelled, and a lazy import only hides it until the day it runs first.
MODULE_NAMES = {module_name(path) for path in MODULES}


def import_graph() -> dict[str, set[str]]:
    """Each module of dr_orchestrator -> the modules of dr_orchestrator it imports (itself left out)."""
    graph: dict[str, set[str]] = {}
    for path in MODULES:
        module = module_name(path)
        graph[module] = {target for target in imports_of(path, MODULE_NAMES)
                         if target in MODULE_NAMES and target != module}
    return graph


def cycles_of(graph: dict[str, set[str]]) -> list[list[str]]:
    """The strongly connected components of more than one module (Tarjan's algorithm), each sorted."""
    index: dict[str, int] = {}
    lowlink: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found: list[list[str]] = []

    def visit(node: str) -> None:
        index[node] = lowlink[node] = len(index)
        stack.append(node)
        on_stack.add(node)
        for target in sorted(graph.get(node, ())):
            if target not in index:
                visit(target)
                lowlink[node] = min(lowlink[node], lowlink[target])
            elif target in on_stack:
                lowlink[node] = min(lowlink[node], index[target])
        if lowlink[node] == index[node]:
            component = []
            while True:
                member = stack.pop()
                on_stack.discard(member)
                component.append(member)
                if member == node:
                    break
            if len(component) > 1:
                found.append(sorted(component))

    for node in sorted(graph):
        if node not in index:
            visit(node)
    return sorted(found)


def test_no_import_cycle_between_modules_of_the_package() -> None:
    cycles = cycles_of(import_graph())
    assert not cycles, "import cycles (lazy imports included): " + "; ".join(
        " <-> ".join(component) for component in cycles)


def test_the_cycle_finder_finds_cycles_and_resolves_imports() -> None:
    """A finder that missed a cycle through a lazy import, or saw one in `from package import module`,
    would be no check."""
    assert cycles_of({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}, "e": {"e"}}) == [["a", "b", "c"]]
    assert cycles_of({"a": {"b"}, "b": {"c"}, "c": set()}) == []
    assert cycles_of({"a": {"b"}, "b": {"a"}, "c": {"d"}, "d": {"c"}}) == [["a", "b"], ["c", "d"]]
    graph = import_graph()
    assert "dr_orchestrator.evidence.incidents" in graph["dr_orchestrator.watch.service"]  # a lazy import
    # `from dr_orchestrator.evidence import queries` is the module queries, not the package's __init__
    assert any("dr_orchestrator.evidence.queries" in targets for targets in graph.values())


CLI_PACKAGE = "dr_orchestrator.cli"
CLI_MODULES = [path for path in MODULES if module_name(path).startswith(CLI_PACKAGE + ".")]


@pytest.mark.parametrize("path", CLI_MODULES, ids=lambda p: str(p.relative_to(PACKAGE)))
def test_the_cli_modules_import_common_never_the_package(path: Path) -> None:
    """The `dr` command's modules share what they need through cli/common.py; only the entry point
    (__main__) imports the package's __init__, which mounts them; common imports no other of them."""
    module = module_name(path)
    targets = imports_of(path, MODULE_NAMES)
    if module != f"{CLI_PACKAGE}.__main__":
        assert CLI_PACKAGE not in targets, f"{module} imports {CLI_PACKAGE} (its __init__): import cli.common instead"
    if module == f"{CLI_PACKAGE}.common":
        inner = sorted(target for target in targets if target.startswith(CLI_PACKAGE))
        assert not inner, f"{module} imports {', '.join(inner)}: what the commands share imports none of them"


LOADING_PACKAGE = "dr_orchestrator.loading"
LOADING_MODULES = [path for path in MODULES if module_name(path).startswith(LOADING_PACKAGE + ".")]


@pytest.mark.parametrize("path", LOADING_MODULES, ids=lambda p: str(p.relative_to(PACKAGE)))
def test_the_loading_modules_import_one_another_never_the_package(path: Path) -> None:
    """loading/__init__.py re-exports what the rest of the product uses; its own modules import the
    module that holds a name, so the package's __init__ stays a list of names and no cycle goes through it."""
    module = module_name(path)
    assert LOADING_PACKAGE not in imports_of(path, MODULE_NAMES), (
        f"{module} imports {LOADING_PACKAGE} (its __init__): import the module that holds the name")
