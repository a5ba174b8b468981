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
    "evidence": {"model"},
    "actions": {"model", "yamlsource"},
    "engine": {"model", "templating", "actions.base"},
    "cluster": {"model", "evidence"},
    "lab": {"model"},
}
# nothing outside these imports the CLI or the lab
CLI_ROOMS = ("cli", "cli_")
LAB_USERS = ("lab", "cli", "demo")  # `dr lab` and `dr demo` drive the lab; product code never does


def module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def imports_of(path: Path) -> set[str]:
    """Every dr_orchestrator module ``path`` imports, as a dotted name (``from X import y`` gives X.y)."""
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
            found |= {f"{base}.{alias.name}" for alias in node.names} | {base}
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
        if target_room.startswith(CLI_ROOMS) and not room.startswith(CLI_ROOMS):
            broken.append(f"{target} (nothing imports the CLI)")
        elif target_room == "lab" and not room.startswith(LAB_USERS):
            broken.append(f"{target} (product code never imports the lab)")
        elif rules is not None and not allowed(target, rules):
            broken.append(f"{target} (room {room} may import {', '.join(sorted(rules)) or 'nothing of the project'})")
    assert not broken, f"{module} imports " + "; ".join(broken)


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
