"""The project's style rules, checked like any other behaviour.

The lint rules are ruff's, configured in pyproject.toml (``[tool.ruff]``).  The size limits are
checked here: a module past MAX_MODULE_LINES or a function past MAX_FUNCTION_LINES has usually
started doing two jobs, and is split by what it does.
"""

from __future__ import annotations

import ast
import importlib.util
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
LINTED = ("spade_ray", "jobs", "benchmarks", "tests")
SIZE_LIMITED = ("spade_ray", "benchmarks")
MAX_MODULE_LINES = 400
MAX_FUNCTION_LINES = 60  # from the ``def`` line to the function's last line, docstring included


@pytest.mark.skipif(importlib.util.find_spec("ruff") is None,
                    reason="ruff is not installed: pip install -e '.[test]' (or pip install ruff)")
def test_ruff_reports_nothing() -> None:
    # --no-cache: a test run leaves no .ruff_cache behind in the checkout
    proc = subprocess.run([sys.executable, "-m", "ruff", "check", "--no-cache", "--output-format", "concise", *LINTED],
                          cwd=REPO, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, f"ruff check {' '.join(LINTED)}:\n{proc.stdout}{proc.stderr}"


def functions(tree: ast.AST, prefix: str = "") -> Iterator[tuple[str, ast.FunctionDef | ast.AsyncFunctionDef]]:
    """Every function and method of a module, nested ones included, with its qualified name (``Class.method``)."""
    for node in ast.iter_child_nodes(tree):
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
            yield f"{prefix}{node.name}", node
            yield from functions(node, f"{prefix}{node.name}.")
        elif isinstance(node, ast.ClassDef):
            yield from functions(node, f"{prefix}{node.name}.")
        else:
            yield from functions(node, prefix)


def size_offenders(path: Path) -> list[str]:
    """What in ``path`` is over the limits, one line each with its count."""
    text = path.read_text()
    where = path.relative_to(REPO)
    found = []
    module_lines = len(text.splitlines())
    if module_lines > MAX_MODULE_LINES:
        found.append(f"{where}: module of {module_lines} lines (at most {MAX_MODULE_LINES})")
    for name, node in functions(ast.parse(text)):
        lines = node.end_lineno - node.lineno + 1
        if lines > MAX_FUNCTION_LINES:
            found.append(f"{where}:{node.lineno} {name}: {lines} lines (at most {MAX_FUNCTION_LINES})")
    return found


def test_modules_and_functions_stay_small() -> None:
    offenders = [line for root in SIZE_LIMITED for path in sorted((REPO / root).rglob("*.py")) for line in size_offenders(path)]
    assert not offenders, "over the size limits (split by what the code does):\n" + "\n".join(offenders)
