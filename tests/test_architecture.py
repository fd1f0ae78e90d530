"""The package's import layers (docs/architecture.md): imports only go down, and no module
imports the front door (``attnmerge/__init__.py``)."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

SRC = Path(__file__).resolve().parents[1] / "src"
PACKAGE = SRC / "attnmerge"

# Layer of each module or subpackage, lowest first (docs/architecture.md, "Layout").
LAYERS = {
    "attnmerge.version": 0,
    "attnmerge.formats": 0,
    "attnmerge.call": 1,
    "attnmerge.devices": 1,
    "attnmerge.reference": 2,
    "attnmerge.triton": 2,
    "attnmerge.cuda": 2,
    "attnmerge.dispatch": 3,
    "attnmerge.api": 4,
    "attnmerge.ops": 5,
    "attnmerge.compat": 5,
    "attnmerge.distributed": 5,
    "attnmerge.integrations": 5,
    "attnmerge": 6,
    "attnmerge.bench": 7,
    "attnmerge.demo": 7,
    "attnmerge.progress": 6,
    "attnmerge.cli": 8,
    "attnmerge.__main__": 9,
}


def _module_name(path: Path) -> str:
    parts = path.relative_to(SRC).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _is_module(name: str) -> bool:
    path = SRC.joinpath(*name.split("."))
    return path.with_suffix(".py").exists() or (path / "__init__.py").exists()


def _unit(name: str) -> str:
    """The entry of LAYERS a module belongs to (a subpackage counts as one unit)."""
    while name not in LAYERS:
        name = name.rpartition(".")[0]
    return name


def _imports(path: Path) -> set[str]:
    """The attnmerge modules a file imports, at module level or inside functions."""
    name = _module_name(path)
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            found.update(a.name for a in node.names if a.name.split(".")[0] == "attnmerge")
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")[: len(package.split(".")) - node.level + 1]
                target = ".".join(base + ([node.module] if node.module else []))
            else:
                target = node.module or ""
            if target.split(".")[0] != "attnmerge":
                continue
            for alias in node.names:
                sub = f"{target}.{alias.name}"
                found.add(sub if _is_module(sub) else target)
    return found


FILES = sorted(PACKAGE.rglob("*.py"))


@pytest.mark.parametrize("path", FILES, ids=lambda p: str(p.relative_to(SRC)))
def test_imports_go_down(path):
    name = _module_name(path)
    unit = _unit(name)
    for imported in _imports(path):
        assert imported != "attnmerge" or name == "attnmerge", (
            f"{name} imports the package front door"
        )
        other = _unit(imported)
        if other == unit:
            continue  # within one module or subpackage
        assert LAYERS[other] < LAYERS[unit], f"{name} (layer {LAYERS[unit]}) imports {imported}"


def test_every_module_has_a_layer():
    for path in FILES:
        assert _unit(_module_name(path)) in LAYERS
