"""The package's shape (docs/design.md 2): every module of mdarts sits in a layer, and no import
runs from a layer up to one above it; mdarts_kernels never imports mdarts; no function is
longer than 80 lines."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest
from helpers import REPO_ROOT

LAYERS = (
    ("command line", ("cli", "__main__")),
    ("experiment", ("experiment", "report")),
    ("search", ("search",)),
    ("training and decoding", ("train", "translate", "evaluate")),
    ("run", ("runloop", "checkpoint", "progress", "reduction", "loss", "arguments")),
    ("data", ("prepare", "batching", "tokenizer", "data")),
    ("memory and sizing", ("plan", "memory", "sizing")),
    ("search space", ("model", "evolved", "genotype", "reversible", "ops")),
    ("settings, files, processes", ("config", "files", "processes")),
)
"""Top down: a module may import from its own layer and the layers below it."""


def module_name(path: Path, root: Path) -> str:
    parts = path.relative_to(root).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def imported(path: Path, root: Path) -> set[str]:
    """The modules of the package that ``path`` imports anywhere (also inside functions)."""
    name = module_name(path, root)
    package = name.split(".") if path.name == "__init__.py" else name.split(".")[:-1]
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom) and node.level:
            base = package[: len(package) - node.level + 1]
            if node.module:
                found.add(".".join([*base, node.module]))
            else:
                found.update(".".join([*base, alias.name]) for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module:
            found.add(node.module)
        elif isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
    return found


def layer_of(module: str) -> int:
    """The layer of ``mdarts.x.y`` (by its first part below the package)."""
    first = module.split(".")[1] if "." in module else "__init__"
    for index, (_, members) in enumerate(LAYERS):
        if first in members:
            return index
    raise AssertionError(f"{module} is in no layer of tests/test_layout.py; place it")


def test_no_import_runs_up_the_layers():
    root = REPO_ROOT
    upward = []
    for path in sorted((root / "mdarts").rglob("*.py")):
        module = module_name(path, root)
        if module == "mdarts":
            continue
        mine = layer_of(module)
        for target in imported(path, root):
            if target.startswith("mdarts.") and layer_of(target) < mine:
                upward.append(f"{module} ({LAYERS[mine][0]}) imports {target} ({LAYERS[layer_of(target)][0]})")
    assert not upward, "\n".join(upward)


def test_the_kernels_know_nothing_of_the_engine():
    for path in sorted((REPO_ROOT / "mdarts_kernels").rglob("*.py")):
        assert not any(t == "mdarts" or t.startswith("mdarts.") for t in imported(path, REPO_ROOT)), path


@pytest.mark.parametrize("package", ["mdarts", "mdarts_kernels"])
def test_no_function_is_longer_than_80_lines(package):
    long = []
    for path in sorted((REPO_ROOT / package).rglob("*.py")):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                lines = node.end_lineno - node.lineno + 1
                if lines > 80:
                    long.append(f"{path.relative_to(REPO_ROOT)}:{node.lineno} {node.name} ({lines} lines)")
    assert not long, "\n".join(long)
