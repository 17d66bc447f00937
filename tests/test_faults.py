"""Faults in the middle of a real run: a shard actor, a scorer actor and the driver itself are killed.

Each disturbed run must end with exactly one row per image and the same scores as an undisturbed
run.  The kills are real (SIGKILL of the actor's process, of the driver's whole process group)
and happen after the first batch is committed and long before the last (two images per batch, so
the run has most of its batches still to go), so every test exercises recovery, never a finished run.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import ray
from image_sets import camera_folders

from spade_ray.distributed.score_job import run_score
from spade_ray.storage.results import read_results

pytestmark = pytest.mark.timeout(300)

N_IMAGES = 16
BATCH = 2


@pytest.fixture(scope="module", autouse=True)
def _own_ray():
    yield
    ray.shutdown()


@pytest.fixture(scope="module")
def many(small_bank, tmp_path_factory) -> Path:
    """16 images: the dataset's test images under four folders (enough batches to kill something mid-run)."""
    return camera_folders(small_bank, tmp_path_factory.mktemp("many") / "in", N_IMAGES)


def read_rows(out: Path) -> list[dict]:
    return read_results(str(out)).to_pylist()


def committed(out: Path) -> int:
    return len(list((out / "results").glob("*.parquet")))


def score(many: Path, bank: Path, out: Path) -> Any:
    return run_score(str(many), str(bank), str(out), batch_size=BATCH, max_actors=1)


@pytest.fixture(scope="module")
def undisturbed(small_bank, many, tmp_path_factory) -> dict[str, tuple[float, float]]:
    out = tmp_path_factory.mktemp("undisturbed")
    summary = score(many, small_bank["bank"], out)
    assert (summary.ok, summary.error) == (N_IMAGES, 0)
    return {r["relpath"]: (r["image_score"], r["pixel_max"]) for r in read_rows(out)}


def assert_complete_and_undisturbed(out: Path, undisturbed: dict[str, tuple[float, float]]) -> None:
    rows = read_rows(out)
    assert sorted(r["relpath"] for r in rows) == sorted(undisturbed)  # one row per image, none twice
    assert all(r["status"] == "ok" for r in rows), [r["error"] for r in rows if r["status"] != "ok"]
    for r in rows:
        assert (r["image_score"], r["pixel_max"]) == pytest.approx(undisturbed[r["relpath"]], rel=1e-5)


class Background:
    """Runs the job in a thread of this driver, so the test can kill one of its actors meanwhile."""

    def __init__(self, fn: Callable[[], Any]) -> None:
        self.result: Any = None
        self.error: BaseException | None = None
        self.thread = threading.Thread(target=self._run, args=(fn,), daemon=True)
        self.thread.start()

    def _run(self, fn: Callable[[], Any]) -> None:
        try:
            self.result = fn()
        except BaseException as exc:  # noqa: BLE001 - handed to the test thread
            self.error = exc

    def join(self, timeout: float) -> Any:
        self.thread.join(timeout)
        assert not self.thread.is_alive(), "the disturbed run did not finish"
        if self.error:
            raise self.error
        return self.result


def wait_for(condition: Callable[[], bool], what: str, timeout: float = 180) -> None:
    deadline = time.time() + timeout
    while not condition():
        assert time.time() < deadline, f"timed out waiting for {what}"
        time.sleep(0.02)


def alive_actors(class_name: str) -> list[dict]:
    """Live actors of a class, with their pids, from the GCS actor table.

    ``ray.util.state`` needs the dashboard, which the jobs do not start locally; the GCS table
    (``ray._private.state``) has the same facts.
    """
    from ray._private import state

    return [a for a in state.actors().values() if class_name in a["ActorClassName"] and a["State"] == "ALIVE"]


def restarts(actor_id: str) -> int:
    from ray._private import state

    return int(state.actors(actor_id)["NumRestarts"])


def kill_mid_run(class_name: str, out: Path, job: Background) -> dict:
    wait_for(lambda: committed(out) >= 1, "the first committed batch")
    victim = alive_actors(class_name)[0]
    assert job.thread.is_alive() and committed(out) < N_IMAGES // BATCH  # mid-run: most batches still to go
    os.kill(victim["Pid"], signal.SIGKILL)
    return victim


@pytest.mark.parametrize("actor", ["ShardActor", "MapWorker"], ids=["shard-actor", "scorer-actor"])
def test_a_killed_actor_restarts_and_the_run_completes_undisturbed(actor, small_bank, many, undisturbed, tmp_path) -> None:
    """A shard actor reloads its shard; a scorer actor (Ray Data's MapWorker) is restarted and its batches retried."""
    out = tmp_path / "out"
    job = Background(lambda: score(many, small_bank["bank"], out))
    victim = kill_mid_run(actor, out, job)
    summary = job.join(240)
    assert (summary.ok, summary.error) == (N_IMAGES, 0)
    assert restarts(victim["ActorID"]) >= 1
    assert_complete_and_undisturbed(out, undisturbed)


def test_a_rerun_after_the_driver_is_killed_completes_the_rest_without_duplicates(small_bank, many, undisturbed,
                                                                                   tmp_path) -> None:
    out = tmp_path / "out"  # the killed driver starts its own local Ray, next to this idle one
    proc = subprocess.Popen(
        [sys.executable, "-m", "spade_ray.apps.cli", "score", str(many), "--bank", str(small_bank["bank"]),
         "--output", str(out), "--batch-size", str(BATCH), "--max-actors", "1", "--quiet"],
        start_new_session=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
        env={k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"},
    )
    try:
        wait_for(lambda: committed(out) >= 1, "the first committed batch")
        assert proc.poll() is None
    finally:
        os.killpg(proc.pid, signal.SIGKILL)  # the driver and its local Ray die mid-run
        proc.wait()
    before = len(read_rows(out))
    assert 0 < before < N_IMAGES
    rerun = score(many, small_bank["bank"], out)
    assert rerun.skipped == before and rerun.ok == N_IMAGES - before
    assert_complete_and_undisturbed(out, undisturbed)
