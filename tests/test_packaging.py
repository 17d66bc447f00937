"""The package as others get it: the sdist and wheel that `python -m build` makes, installed (not editable).

- The sdist carries what a build from it needs (LICENSE, README.md, pyproject.toml) and the
  wheel built from that sdist carries py.typed, the license and the metadata of pyproject.toml.
- The wheel installed into a fresh virtual environment, run from a folder outside the checkout:
  `spade-ray --version`, `python -m spade_ray --version` and a tiny `spade-ray demo`. A file the
  package needs at run time but the wheel lacks fails here, and nowhere else.
- Its dependencies are ranges: Ray versions other than the tested one (constraints.txt) satisfy
  them, and pip, asked to install the wheel next to an installed in-range Ray, changes nothing.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
import sysconfig
import tarfile
import zipfile
from email.message import Message
from email.parser import Parser
from pathlib import Path

import pytest
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name
from packaging.version import Version

REPO = Path(__file__).resolve().parents[1]
# what a checkout may hold besides its sources; none of it belongs in a build
NOT_SOURCES = shutil.ignore_patterns(".git", "build", "dist", "*.egg-info", "__pycache__", ".pytest_cache", ".venv",
                                     "runs", "out", ".ruff_cache")


def source_version() -> str:
    """spade_ray.__version__ as written in the checkout (the single source of the version)."""
    text = (REPO / "spade_ray" / "__init__.py").read_text()
    return re.search(r'^__version__ = "([^"]+)"$', text, flags=re.MULTILINE).group(1)


def clean_env() -> dict[str, str]:
    """The environment without anything that would let a child import the checkout instead of the install."""
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "PYTHONHOME", "PYTHONSTARTUP")}
    env["PIP_DISABLE_PIP_VERSION_CHECK"] = "1"
    return env


def test_the_tested_set_pins_every_dependency_within_its_range() -> None:
    """constraints.txt: an exact, in-range version of each dependency and test dependency; never spade-ray itself."""
    tomllib = pytest.importorskip("tomllib")  # Python >= 3.11
    project = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]
    for text in project["dependencies"] + project["optional-dependencies"]["test"]:
        req = Requirement(text)
        assert req.specifier.contains(constraint_pin(canonicalize_name(req.name))), f"constraints.txt is outside {req}"
    with pytest.raises(AssertionError):
        constraint_pin("spade-ray")


def test_setup_commands_install_the_tested_set() -> None:
    """The README's two set-up commands, and CI's install, use constraints.txt."""
    readme = (REPO / "README.md").read_text()
    block = re.search(r"## Set up and try it\s+```bash\n(.*?)```", readme, flags=re.DOTALL).group(1)
    commands = [line.split("#", 1)[0].strip() for line in block.splitlines() if line.strip()]
    assert commands == ["pip install -c constraints.txt -e . && spade-ray demo",
                        'pip install -c constraints.txt -e ".[test]" && python -m pytest -q'], commands
    assert 'python -m pip install -c constraints.txt -e ".[test]"' in (REPO / ".ci" / "run").read_text()


@pytest.fixture(scope="module")
def dists(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """The sdist and the wheel, built as a release is built, from a copy of the checkout."""
    work = tmp_path_factory.mktemp("build")
    src = work / "src"
    shutil.copytree(REPO, src, ignore=NOT_SOURCES)
    out = work / "dist"
    # no isolation: the build backend (setuptools, a test dependency) is already installed, nothing is downloaded.
    # `python -m build` builds the sdist, then the wheel from the unpacked sdist.
    proc = subprocess.run([sys.executable, "-m", "build", "--no-isolation", "--outdir", str(out), str(src)],
                          capture_output=True, text=True, timeout=300, env=clean_env(), cwd=work)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    sdists, wheels = list(out.glob("*.tar.gz")), list(out.glob("*.whl"))
    assert len(sdists) == 1 and len(wheels) == 1, sorted(p.name for p in out.iterdir())
    return {"sdist": sdists[0], "wheel": wheels[0]}


def wheel_metadata(wheel: Path) -> tuple[list[str], Message]:
    with zipfile.ZipFile(wheel) as zf:
        names = zf.namelist()
        meta = next(n for n in names if n.endswith(".dist-info/METADATA"))
        return names, Parser().parsestr(zf.read(meta).decode())


def test_the_sdist_holds_what_a_build_from_it_needs(dists) -> None:
    version = source_version()
    assert dists["sdist"].name == f"spade_ray-{version}.tar.gz"
    with tarfile.open(dists["sdist"]) as tf:
        names = {n.split("/", 1)[1] for n in tf.getnames() if "/" in n}
    for needed in ("LICENSE", "README.md", "pyproject.toml", "spade_ray/py.typed", "spade_ray/__init__.py",
                   "spade_ray/__main__.py", "spade_ray/apps/cli.py"):
        assert needed in names, f"{needed} missing from the sdist"
    assert not [n for n in names if n.startswith((".git/", "runs/", "build/", "dist/"))]


def test_the_wheel_carries_py_typed_the_license_and_one_version(dists) -> None:
    import spade_ray

    names, meta = wheel_metadata(dists["wheel"])
    assert "spade_ray/py.typed" in names and "spade_ray/__main__.py" in names
    assert any(n.endswith(".dist-info/licenses/LICENSE") for n in names), "LICENSE missing from the wheel"
    assert not [n for n in names if n.startswith("tests/")]
    # one version: the checkout's spade_ray.__version__, the wheel's metadata and file name
    assert meta["Version"] == source_version() == spade_ray.__version__
    assert dists["wheel"].name.startswith(f"spade_ray-{meta['Version']}-py3-none-any")
    assert meta["License-Expression"] == "Apache-2.0" and "License" not in meta
    assert "Typing :: Typed" in meta.get_all("Classifier")
    # scikit-learn only for the tests; `build` (this test) only in the test extra
    requires = [Requirement(r) for r in meta.get_all("Requires-Dist")]
    runtime = {canonicalize_name(r.name) for r in requires if r.marker is None}
    assert "scikit-learn" not in runtime and "build" not in runtime and "ray" in runtime and "torch" in runtime


def wheel_requirement(wheel: Path, name: str) -> Requirement:
    _, meta = wheel_metadata(wheel)
    found = [Requirement(r) for r in meta.get_all("Requires-Dist") if canonicalize_name(Requirement(r).name) == name]
    assert len(found) == 1, found
    return found[0]


def constraint_pin(name: str) -> str:
    for line in (REPO / "constraints.txt").read_text().splitlines():
        m = re.match(r"^([A-Za-z0-9_.-]+)==(\S+)$", line.strip())
        if m and canonicalize_name(m.group(1)) == name:
            return m.group(2)
    raise AssertionError(f"{name} has no pin in constraints.txt")


def test_ray_is_a_range_not_a_pin(dists) -> None:
    from importlib.metadata import version

    ray = wheel_requirement(dists["wheel"], "ray")
    assert {"data", "default"} <= ray.extras
    admitted = [version("ray"), constraint_pin("ray"), "2.55.0", "2.60.1", "2.70.0", "2.99.0"]
    assert all(ray.specifier.contains(v) for v in admitted), f"{ray} rejects one of {admitted}"
    assert not any(ray.specifier.contains(v) for v in ("3.0.0", "3.1.0", "1.13.0")), ray
    # torch/torchvision: a floor only, met by the tested versions
    for name in ("torch", "torchvision"):
        req = wheel_requirement(dists["wheel"], name)
        assert not any(s.operator in ("<", "<=", "==", "~=") for s in req.specifier), req
        assert req.specifier.contains(constraint_pin(name)) and req.specifier.contains(Version(version(name)).public)


def _fake_environment(root: Path, versions: dict[str, str]) -> Path:
    """A virtual environment whose site-packages holds only metadata: distributions that look installed."""
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(root)], check=True, timeout=120)
    python = root / "bin" / "python"
    purelib = Path(subprocess.run([str(python), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
                                  check=True, capture_output=True, text=True, env=clean_env()).stdout.strip())
    for name, ver in versions.items():
        info = purelib / f"{name.replace('-', '_')}-{ver}.dist-info"
        info.mkdir(parents=True)
        extras = "".join(f"Provides-Extra: {e}\n" for e in ("data", "default")) if name == "ray" else ""
        (info / "METADATA").write_text(f"Metadata-Version: 2.1\nName: {name}\nVersion: {ver}\n{extras}")
        (info / "INSTALLER").write_text("pip\n")
        (info / "RECORD").write_text("")
    return python


def _dry_run(wheel: Path, root: Path, ray_version: str) -> tuple[subprocess.CompletedProcess, Path]:
    """pip (this interpreter's) asked to install the wheel, offline, into an application's environment that
    already has every runtime dependency at the installed version, but Ray at ``ray_version``."""
    from importlib.metadata import version

    _, meta = wheel_metadata(wheel)
    requires = [Requirement(r) for r in meta.get_all("Requires-Dist") if Requirement(r).marker is None]
    installed = {canonicalize_name(r.name): Version(version(r.name)).public for r in requires}
    installed["ray"] = ray_version
    python = _fake_environment(root / "app", installed)
    report = root / "report.json"
    proc = subprocess.run([sys.executable, "-m", "pip", "--python", str(python), "install", "--dry-run", "--no-index",
                           "--report", str(report), str(wheel)], capture_output=True, text=True, timeout=300,
                          env=clean_env())
    return proc, report


@pytest.mark.parametrize("ray_version", ["2.55.0", "2.70.0"])
def test_pip_installs_the_wheel_next_to_another_ray_without_touching_it(dists, tmp_path, ray_version) -> None:
    """An application with its own in-range Ray (and every other dependency) installed: only spade-ray is added."""
    proc, report = _dry_run(dists["wheel"], tmp_path, ray_version)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    to_install = {(i["metadata"]["name"], i["metadata"]["version"]) for i in json.loads(report.read_text())["install"]}
    assert to_install == {("spade-ray", source_version())}, to_install


def test_pip_refuses_a_ray_outside_the_range(dists, tmp_path) -> None:
    """The same with Ray 3 installed: the wheel needs another Ray, none is offered offline, so pip fails on ray."""
    proc, _ = _dry_run(dists["wheel"], tmp_path, "3.0.0")
    assert proc.returncode != 0
    assert re.search(r"ray\[data,default\]<3,>=2\.\d+|requirement ray", proc.stdout + proc.stderr, flags=re.I), proc.stderr


@pytest.fixture(scope="module")
def installed(dists, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A fresh virtual environment with the wheel installed (not editable); its bin folder.

    The heavy dependencies (torch, Ray, ...) are this interpreter's, not downloaded again: the
    environment's .pth adds this interpreter's site-packages after its own, which is what
    `--system-site-packages` does, also when the tests themselves run in a virtual environment.
    """
    venv = tmp_path_factory.mktemp("venv") / "env"
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(venv)], check=True, timeout=120)
    python = venv / "bin" / "python"
    purelib = Path(subprocess.run([str(python), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
                                  check=True, capture_output=True, text=True, env=clean_env()).stdout.strip())
    ours = dict.fromkeys(sysconfig.get_paths()[k] for k in ("purelib", "platlib"))
    (purelib / "zz_parent_environment.pth").write_text(
        "import site; " + "; ".join(f"site.addsitedir({p!r})" for p in ours) + "\n")
    proc = subprocess.run([str(python), "-m", "pip", "install", "--no-deps", "--no-index", "--ignore-installed",
                           str(dists["wheel"])], capture_output=True, text=True, timeout=300, env=clean_env(),
                          cwd=venv)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return venv / "bin"


def test_the_installed_package_is_the_wheel(installed, tmp_path) -> None:
    proc = subprocess.run([str(installed / "python"), "-c", "import spade_ray, sys; print(spade_ray.__file__); "
                           "print(spade_ray.__version__)"], capture_output=True, text=True, timeout=300,
                          env=clean_env(), cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    where, version = proc.stdout.split()
    assert Path(where).is_relative_to(installed.parent / "lib"), f"spade_ray imported from {where}, not the venv"
    assert not Path(where).is_relative_to(REPO)
    assert version == source_version()
    assert (Path(where).parent / "py.typed").is_file()


def test_spade_ray_version(installed, tmp_path) -> None:
    for cmd in ([str(installed / "spade-ray"), "--version"], [str(installed / "python"), "-m", "spade_ray", "--version"]):
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=300, env=clean_env(), cwd=tmp_path)
        assert proc.returncode == 0, proc.stderr
        assert proc.stdout.strip() == f"spade-ray {source_version()}", proc.stdout


@pytest.mark.slow  # the whole pipeline on a local Ray: about a minute on 2 idle cores
def test_a_tiny_demo_runs_from_the_wheel(installed, tmp_path) -> None:
    out = tmp_path / "demo"
    proc = subprocess.run([str(installed / "spade-ray"), "demo", "--output", str(out), "--image-size", "64",
                           "--shards", "1", "--pixel-k", "3", "--batch-size", "17", "--report-top", "4", "--quiet"],
                          capture_output=True, text=True, timeout=600, env=clean_env(), cwd=tmp_path)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "score: 34 ok, 0 error, 0 skipped" in proc.stdout, proc.stdout
    assert (out / "metrics.json").is_file() and (out / "report.html").is_file()
