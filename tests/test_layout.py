"""Imports run one way: a package imports only packages below it (the order of README's layout
section), and no project import hides inside a function."""

import ast
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
# bottom to top; the entry points (main_*.py, scripts/) may import every package
LAYERS = ["utils", "vocab", "datasets", "models", "metrics", "engine"]
ENTRY = len(LAYERS)


def layer_of(path: Path) -> int:
    top = path.relative_to(REPO).parts[0]
    return LAYERS.index(top) if top in LAYERS else ENTRY


def project_files() -> list[Path]:
    files = [p for layer in LAYERS for p in (REPO / layer).rglob("*.py")]
    return sorted(files + list(REPO.glob("main_*.py")) + list((REPO / "scripts").glob("*.py")))


def imported_packages(tree: ast.AST):
    """(line, top-level package, inside a function?) of every import of the module."""
    functions = [
        n for n in ast.walk(tree) if isinstance(n, (ast.FunctionDef, ast.AsyncFunctionDef))
    ]
    local = {
        id(n) for f in functions for n in ast.walk(f) if isinstance(n, (ast.Import, ast.ImportFrom))
    }
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom) and node.level == 0:
            names = [node.module]
        else:
            continue
        for name in names:
            yield node.lineno, name.split(".")[0], id(node) in local


@pytest.mark.parametrize("path", project_files(), ids=lambda p: str(p.relative_to(REPO)))
def test_imports_run_one_way(path):
    tree = ast.parse(path.read_text())
    own = layer_of(path)
    for line, package, in_function in imported_packages(tree):
        if package not in LAYERS:
            continue
        where = f"{path.relative_to(REPO)}:{line} imports {package}"
        assert LAYERS.index(package) <= own, f"{where}, a layer above {LAYERS[min(own, ENTRY - 1)]}"
        assert not in_function, f"{where} inside a function"


def test_no_relative_imports():
    for path in project_files():
        tree = ast.parse(path.read_text())
        relative = [n.lineno for n in ast.walk(tree) if isinstance(n, ast.ImportFrom) and n.level]
        assert not relative, f"{path.relative_to(REPO)}: relative import at line(s) {relative}"


def test_the_layer_rule_catches_an_upward_import(tmp_path):
    tree = ast.parse("def f():\n    from engine.train import train_one_epoch\n")
    ((line, package, in_function),) = list(imported_packages(tree))
    assert (line, package, in_function) == (2, "engine", True)
    assert LAYERS.index(package) > LAYERS.index("models")
