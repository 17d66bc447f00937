"""Security: nothing on a load path can execute code from a file, and credentials never leak.

Banks, features, maps and weights come from buckets that more people can write to than should run
code on the cluster, so every loader must be data-only (JSON, ``.npy`` without pickle, Parquet,
FAISS, ``torch.load(weights_only=True)``).  Credentials reach the job through the environment or
``--storage-options``; they must not come back out in logs, result rows or error messages.
"""

from __future__ import annotations

import ast
import io
import json
import os
import secrets
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import pyarrow.parquet as pq
import pytest

REPO = Path(__file__).resolve().parents[1]
SCANNED = ("spade_ray", "jobs", "benchmarks")
PICKLING_MODULES = {"pickle", "cPickle", "_pickle", "dill", "cloudpickle", "joblib", "shelve", "marshal"}


def _is_const(node: ast.AST | None, value: object) -> bool:
    return isinstance(node, ast.Constant) and node.value is value


def unsafe_loads(source: str, where: str = "<source>") -> list[str]:
    """Places in Python source that could unpickle data: pickle-family imports and unsafe load calls.

    ``np.load`` must say ``allow_pickle=False`` and ``torch.load`` ``weights_only=True`` explicitly,
    so the safety never depends on a library default; ``read_pickle`` and ``PIL.Image.MAX_IMAGE_PIXELS
    = None`` (bomb guard off) are refused outright.
    """
    found = []
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, (ast.Import, ast.ImportFrom)):
            names = [alias.name for alias in node.names]
            if isinstance(node, ast.ImportFrom) and node.module:
                names.append(node.module)
            if any(name.split(".")[0] in PICKLING_MODULES for name in names):
                found.append(f"{where}:{node.lineno}: imports {', '.join(names)}")
        elif isinstance(node, ast.Call):
            func = ast.unparse(node.func)
            kwargs = {kw.arg: kw.value for kw in node.keywords}
            if func in ("np.load", "numpy.load") and not _is_const(kwargs.get("allow_pickle"), False):
                found.append(f"{where}:{node.lineno}: {func} without allow_pickle=False")
            elif func == "torch.load" and not _is_const(kwargs.get("weights_only"), True):
                found.append(f"{where}:{node.lineno}: torch.load without weights_only=True")
            elif func.endswith("read_pickle"):
                found.append(f"{where}:{node.lineno}: {func}")
        elif (isinstance(node, ast.Assign) and _is_const(node.value, None)
              and any(ast.unparse(t).endswith("MAX_IMAGE_PIXELS") for t in node.targets)):
            found.append(f"{where}:{node.lineno}: PIL decompression-bomb guard switched off")
    return found


def test_the_scanner_finds_every_unsafe_form() -> None:
    bad = """
import pickle
from joblib import load
import numpy as np, torch, pandas as pd
from PIL import Image
a = np.load("x.npy")
b = np.load("x.npy", allow_pickle=True)
c = torch.load("w.pth")
d = torch.load("w.pth", weights_only=False)
e = pd.read_pickle("x.pkl")
Image.MAX_IMAGE_PIXELS = None
ok1 = np.load("x.npy", allow_pickle=False)
ok2 = torch.load("w.pth", map_location="cpu", weights_only=True)
"""
    assert len(unsafe_loads(bad)) == 8


def test_no_load_path_can_unpickle() -> None:
    files = [p for folder in SCANNED for p in sorted((REPO / folder).rglob("*.py"))]
    assert len(files) > 20
    found = [f for p in files for f in unsafe_loads(p.read_text(), str(p.relative_to(REPO)))]
    assert found == []


# ----------------------------------------------------------------------------- credentials


def _everything_under(folder: Path) -> dict[str, bytes]:
    return {str(p): p.read_bytes() for p in folder.rglob("*") if p.is_file() and not p.is_symlink()}


@pytest.mark.timeout(300)
def test_credentials_never_appear_in_outputs_logs_or_errors(s3_server, small_bank, tmp_path) -> None:
    bucket = s3_server.make_bucket()
    fs = s3_server.filesystem()
    images = sorted((small_bank["dataset"] / "test").glob("*/*.png"))[:3]
    for image in images:
        fs.put(str(image), f"{bucket}/in/{image.parent.name}-{image.name}")
    fs.pipe(f"{bucket}/in/broken.png", b"\x89PNG\r\n\x1a\n not an image")
    uris = [f"s3://{bucket}/in/{p.parent.name}-{p.name}" for p in images]
    uris += [f"s3://{bucket}/in/broken.png", f"s3://{bucket}/in/missing.png"]  # an object that is not there
    fs.pipe(f"{bucket}/in/list.txt", "\n".join(uris).encode())

    secret = s3_server.secret_key  # the real one: the job must work with it
    wrong = "wrong-" + secrets.token_hex(16)  # planted in a run that must fail on access
    ray_tmp = Path(tempfile.mkdtemp(prefix="sr-", dir="/tmp"))  # short: Ray puts sockets in there
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS" and not k.startswith("AWS_")}
    env.update(s3_server.env, RAY_TMPDIR=str(ray_tmp))
    assert env["AWS_SECRET_ACCESS_KEY"] == secret

    def score(secret_key: str, output: str) -> subprocess.CompletedProcess:
        options = {"endpoint_url": s3_server.endpoint_url, "key": s3_server.access_key, "secret": secret_key}
        return subprocess.run(
            [sys.executable, "-m", "spade_ray.apps.cli", "score", f"s3://{bucket}/in/list.txt", "--bank",
             str(small_bank["bank"]), "--output", output, "--storage-options", json.dumps(options), "--quiet"],
            env={**env, "AWS_SECRET_ACCESS_KEY": secret_key}, capture_output=True, timeout=240, cwd=REPO, check=False,
        )

    try:
        good = score(secret, f"s3://{bucket}/out")
        denied = score(wrong, f"s3://{bucket}/out-denied")
        logs = _everything_under(ray_tmp)
    finally:
        shutil.rmtree(ray_tmp, ignore_errors=True)

    assert good.returncode == 0, good.stderr.decode()[-2000:]
    assert b"3 ok, 2 error" in good.stdout
    rows = [row for key in fs.find(f"{bucket}/out/results") for row in pq.read_table(io.BytesIO(fs.cat_file(key))).to_pylist()]
    errors = {row["uri"].rsplit("/", 1)[-1]: row["error"] for row in rows if row["status"] == "error"}
    assert set(errors) == {"broken.png", "missing.png"} and all(name in errors[name] for name in errors)
    assert denied.returncode == 1 and denied.stderr.decode().count("\n") == 1  # a one-line reason
    assert sum(map(len, logs.values())) > 10_000, "the Ray logs of the runs were not where the test looks"

    seen = {"stdout": good.stdout, "stderr": good.stderr, "denied stdout": denied.stdout,
            "denied stderr": denied.stderr, "result rows": json.dumps(rows).encode(), **logs,
            **{key: fs.cat_file(key) for key in fs.find(f"{bucket}/out")}, **_everything_under(small_bank["bank"])}
    leaks = [(name, planted[:6] + "...") for name, data in seen.items() for planted in (secret, wrong)
             if planted.encode() in data]
    assert leaks == []


def test_workers_get_storage_settings_but_never_credentials_through_the_runtime_env() -> None:
    from spade_ray.distributed.runtime import forwarded_env

    environ = {"AWS_ENDPOINT_URL": "http://minio:9000", "AWS_REGION": "eu-central-1", "AWS_PROFILE": "line3",
               "SPADE_RAY_DEBUG": "1", "AWS_ACCESS_KEY_ID": "AKIA...", "AWS_SECRET_ACCESS_KEY": "s3cr3t",
               "AWS_SESSION_TOKEN": "tok", "GOOGLE_APPLICATION_CREDENTIALS": "/keys/sa.json", "HOME": "/root"}
    assert forwarded_env(environ) == {"AWS_ENDPOINT_URL": "http://minio:9000", "AWS_REGION": "eu-central-1",
                                      "AWS_PROFILE": "line3", "SPADE_RAY_DEBUG": "1"}
