#!/usr/bin/env python3
"""Write constraints.txt: the exact versions, installed here, of spade_ray[test]'s dependency closure.

    python .ci/freeze_constraints.py > constraints.txt

Run it in the environment the test suite passed in. It walks pyproject.toml's dependencies and
the test extra through the installed distributions' own requirements (extras and environment
markers included), like a filtered `pip freeze`: spade-ray itself and packages nothing requires
are left out. Local version labels (torch 2.14.1+cu130) are dropped, so that the pins match the
same release from PyPI or from PyTorch's CPU index, and so is the CUDA runtime (nvidia-*, cuda-*):
each torch build pins its own exactly, and a pin of this build's would conflict with the same torch
release built for another CUDA line. Python >= 3.11 (tomllib).
"""

from __future__ import annotations

import sys
from importlib import metadata
from pathlib import Path

import tomllib
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name
from packaging.version import Version

REPO = Path(__file__).resolve().parents[1]
CUDA_RUNTIME = ("nvidia-", "cuda-")  # pinned by torch itself, per build


def closure(roots: list[str]) -> dict[str, str]:
    """{canonical name: installed version} of every installed distribution the roots need."""
    found: dict[str, str] = {}
    seen: set[tuple[str, frozenset[str]]] = set()
    todo = [(Requirement(r), "") for r in roots]
    while todo:
        req, extra = todo.pop()
        if req.marker is not None and not req.marker.evaluate({"extra": extra}):
            continue
        name = canonicalize_name(req.name)
        key = (name, frozenset(req.extras))
        if key in seen:
            continue
        seen.add(key)
        try:
            dist = metadata.distribution(req.name)
        except metadata.PackageNotFoundError:
            sys.exit(f"{req.name} is required but not installed: install spade_ray[test] first")
        if not req.specifier.contains(dist.version, prereleases=True):
            sys.exit(f"installed {req.name} {dist.version} does not satisfy {req}")
        found[name] = dist.version
        for text in dist.requires or []:
            sub = Requirement(text)
            for e in sorted(req.extras) or [""]:
                todo.append((sub, e))
    return found


def main() -> None:
    project = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]
    roots = project["dependencies"] + project["optional-dependencies"]["test"]
    pins = closure(roots)
    pins.pop(canonicalize_name(project["name"]), None)
    pins = {name: v for name, v in pins.items() if not name.startswith(CUDA_RUNTIME)}
    py = f"{sys.version_info.major}.{sys.version_info.minor}"
    print("# The tested set: exact versions of spade_ray[test]'s dependencies, on Linux, CPython " + py + ".")
    print("# `pip install -c constraints.txt -e \".[test]\"`; pyproject.toml keeps ranges for those who depend on spade_ray.")
    print("# Regenerate in the environment the tests passed in: python .ci/freeze_constraints.py > constraints.txt")
    for name in sorted(pins):
        print(f"{name}=={Version(pins[name]).public}")


if __name__ == "__main__":
    main()
