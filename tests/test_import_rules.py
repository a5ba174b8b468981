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
