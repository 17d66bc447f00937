"""Shared fixtures: the real data folder (when present) and small datasets made by the project."""

from __future__ import annotations

import logging
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
MAGNETIC_TILE = REPO.parent / "shared" / "datasets" / "magnetic_tile"


@pytest.fixture(scope="session")
def magnetic_tile() -> Path:
    if not (MAGNETIC_TILE / "train" / "good").is_dir():
        pytest.skip(f"real dataset not present at {MAGNETIC_TILE}")
    return MAGNETIC_TILE


@pytest.fixture(scope="session")
def synthetic_dataset(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from spade_ray.apps.synthetic import make_synthetic_dataset

    return make_synthetic_dataset(tmp_path_factory.mktemp("synthetic") / "ds", n_train=16, n_test_good=4,
                                  n_test_per_defect=3, size=128, seed=1)


@pytest.fixture(scope="session")
def lite0():
    from spade_ray.method.backbones import load_backbone

    return load_backbone("lite0", device="cpu")
pytest_plugins = ["spade_ray.testing.fixtures"]


@pytest.fixture(scope="session")
def evaluated(synthetic_dataset, tmp_path_factory):
    """One `spade-ray evaluate` run as a user's pipeline starts it: a subprocess whose stderr is not a
    terminal, JSON logs, every output on; returns (output folder, finished process)."""
    import subprocess
    import sys

    out = tmp_path_factory.mktemp("evaluated") / "ev"
    proc = subprocess.run(
        [sys.executable, "-m", "spade_ray.apps.cli", "evaluate", str(synthetic_dataset), "--output", str(out),
         "--protocol", "paper", "--image-k", "2", "--pixel-k", "3", "--calibration-samples", "4",
         "--save-maps", "--report-top", "6", "--log-format", "json"],
        capture_output=True, text=True, timeout=600,
    )
    assert proc.returncode == 0, proc.stderr
    return out, proc
@pytest.fixture(scope="session")
def demo_run(tmp_path_factory):
    """One small `spade-ray demo` as a new user runs it, in a subprocess with stdout and stderr captured.

    Shared by the test of its outputs (test_cli) and the test that a successful run prints no
    error or warning (test_quiet_run): the run takes a minute, so it is made once.  Returns
    (output folder, finished process).
    """
    import os
    import subprocess
    import sys

    out = tmp_path_factory.mktemp("demo") / "demo"
    # Ray sets RAY_AUTH_MODE in a process that started a local Ray (this one, after other tests): not a new user's
    env = {k: v for k, v in os.environ.items() if k != "RAY_AUTH_MODE"}
    proc = subprocess.run([sys.executable, "-m", "spade_ray.apps.cli", "demo", "--output", str(out), "--pixel-k", "5",
                           "--image-size", "128", "--quiet"], capture_output=True, text=True, timeout=600, env=env)
    return out, proc


SMALL_IMAGE_SIZE = 64
SMALL_SETTINGS = {"image_k": 2, "pixel_k": 3, "kappa": 1}


@pytest.fixture(scope="session")
def small_bank(tmp_path_factory: pytest.TempPathFactory) -> dict:
    """A small normal bank built by the distributed jobs (64 px network input, 2 shards), and its dataset.

    Shared by the reliability, fault and security tests, which need a real bank but not a good one.
    Leaves no Ray running: modules that start their own (e.g. with S3 variables) are undisturbed.
    """
    import ray

    from spade_ray.apps.synthetic import make_synthetic_dataset
    from spade_ray.distributed.build_bank_job import run_build_bank
    from spade_ray.distributed.extract_job import run_extract

    work = tmp_path_factory.mktemp("small-bank")
    dataset = make_synthetic_dataset(work / "ds", n_train=10, n_test_good=3, n_test_per_defect=1, size=64, seed=5)
    was_running = ray.is_initialized()
    run_extract(str(dataset / "train" / "good"), str(work / "features"), image_size=SMALL_IMAGE_SIZE, batch_size=5)
    run_build_bank(str(work / "features"), str(work / "bank"), shards=2, calibration_samples=4, **SMALL_SETTINGS)
    if not was_running:
        ray.shutdown()
    return {"dataset": dataset, "bank": work / "bank", "image_size": SMALL_IMAGE_SIZE}


@pytest.fixture(autouse=True)
def _spade_ray_logger_restored():
    """Each test starts with the ``spade_ray`` logger as the session had it.

    The CLI's ``main()`` (run in process by some tests) points the logger at that test's captured
    stderr and stops propagation; left so, a later test's ``caplog`` would see nothing and the
    handler would write to a closed stream.
    """
    logger = logging.getLogger("spade_ray")
    handlers, propagate, level = list(logger.handlers), logger.propagate, logger.level
    yield
    logger.handlers[:] = handlers
    logger.propagate = propagate
    logger.setLevel(level)


@pytest.fixture(scope="module")
def ray_with_s3_env(s3_server):
    """A local Ray whose workers get the S3 endpoint and credentials only from the environment."""
    import os

    import ray

    from spade_ray.distributed.runtime import init_ray

    saved = {k: os.environ.get(k) for k in s3_server.env}
    os.environ.update(s3_server.env)  # before ray.init: the local Ray's workers inherit the driver's environment
    ray.shutdown()
    init_ray(num_cpus=2)
    yield s3_server
    ray.shutdown()
    for k, v in saved.items():
        if v is None:
            os.environ.pop(k, None)
        else:
            os.environ[k] = v
