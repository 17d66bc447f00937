"""The package's folders are its layers, and data flows down: these tests keep it that way.

The method (``spade_ray/method``) is SPADE's math on numpy, torch and FAISS: it must import with
Ray and fsspec unavailable, so a notebook or another engine can use it without either.  And no
module imports from a layer above its own (docs/DESIGN.md draws the layers).
"""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[1] / "spade_ray"

# lowest first; a module may import from its own layer and the ones before it
LAYERS = [
    ("base", ["spade_ray/errors.py", "spade_ray/progress.py"]),
    ("method", ["spade_ray/method"]),
    ("storage", ["spade_ray/storage"]),
    ("model and bank", ["spade_ray/model.py", "spade_ray/model_files.py", "spade_ray/bank"]),
    ("report", ["spade_ray/report"]),
    ("distributed", ["spade_ray/distributed"]),
    ("testing services", ["spade_ray/testing"]),
    ("apps", ["spade_ray/apps", "spade_ray/__main__.py"]),
]


def _layer_of(path: Path) -> int | None:
    rel = path.relative_to(PACKAGE.parent).as_posix()
    for rank, (_, prefixes) in enumerate(LAYERS):
        if any(rel == p or rel.startswith(p + "/") for p in prefixes):
            return rank
    return None


def _module_path(dotted: str) -> Path | None:
    parts = dotted.split(".")
    for n in range(len(parts), 1, -1):
        base = PACKAGE.parent.joinpath(*parts[:n])
        if base.with_suffix(".py").is_file():
            return base.with_suffix(".py")
        if (base / "__init__.py").is_file():
            return base / "__init__.py"
    return None


def test_the_method_imports_without_ray_or_fsspec() -> None:
    modules = sorted(f"spade_ray.method.{p.stem}" for p in (PACKAGE / "method").glob("*.py") if p.stem != "__init__")
    script = (
        "import sys\n"
        "class Blocked:\n"
        "    def find_spec(self, name, path=None, target=None):\n"
        "        if name.split('.')[0] in ('ray', 'fsspec', 's3fs', 'gcsfs', 'pyarrow'):\n"
        "            raise ImportError(f'{name} is not for the method layer')\n"
        "sys.meta_path.insert(0, Blocked())\n"
        f"import importlib\nfor m in {modules!r}:\n    importlib.import_module(m)\n"
        "print('imported', len(sys.modules))\n"
    )
    run = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300,
                         cwd=PACKAGE.parent)
    assert run.returncode == 0, run.stderr[-3000:]
    assert len(modules) > 10


def test_no_module_imports_from_a_layer_above_its_own() -> None:
    upward = []
    for path in sorted(PACKAGE.rglob("*.py")):
        own = _layer_of(path)
        if own is None:
            continue
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("spade_ray."):
                names = [node.module]
            elif isinstance(node, ast.Import):
                names = [a.name for a in node.names if a.name.startswith("spade_ray.")]
            else:
                continue
            for name in names:
                target = _module_path(name)
                theirs = _layer_of(target) if target else None
                if theirs is not None and theirs > own:
                    upward.append(f"{path.relative_to(PACKAGE.parent)} ({LAYERS[own][0]}) imports {name} "
                                  f"({LAYERS[theirs][0]})")
    assert not upward, "imports from a higher layer:\n" + "\n".join(upward)


def test_every_module_belongs_to_a_layer() -> None:
    loose = [str(p.relative_to(PACKAGE.parent)) for p in PACKAGE.rglob("*.py")
             if _layer_of(p) is None and p != PACKAGE / "__init__.py"]
    assert not loose, f"modules outside every layer (add them to LAYERS and docs/DESIGN.md): {loose}"


def test_only_the_apps_use_the_testing_services() -> None:
    """spade_ray/testing (a local S3 server, a fault proxy) is for tests and the benchmark, never for the jobs."""
    users = []
    for path in sorted(PACKAGE.rglob("*.py")):
        rel = path.relative_to(PACKAGE.parent).as_posix()
        if rel.startswith(("spade_ray/testing/", "spade_ray/apps/")):
            continue
        for node in ast.walk(ast.parse(path.read_text())):
            names = [node.module or ""] if isinstance(node, ast.ImportFrom) else (
                [a.name for a in node.names] if isinstance(node, ast.Import) else [])
            users += [f"{rel} imports {n}" for n in names if n == "spade_ray.testing" or n.startswith("spade_ray.testing.")]
    assert not users, "\n".join(users)
