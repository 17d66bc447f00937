"""SIGTERM to the driver mid-run (a KubeRay job deleted or preempted, ``ray job stop``): a clean, bounded stop.

The real ``spade-ray score`` runs as a subprocess on its own local Ray; it gets SIGTERM once some
batches are committed and most are still to go.  It must exit 143 within the documented bound,
leave only whole batches (every row's artifacts stored, every result file readable), leave no
process of its own running and nothing still writing, and the rerun of the same command must
finish with exactly one row per image.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pyarrow.parquet as pq
import pytest
import ray
from image_sets import camera_folders

from spade_ray.apps.memseries import session_pids
from spade_ray.distributed.preemption import EXIT_PREEMPTED, STOP_SECONDS
from spade_ray.distributed.score_job import run_score
from spade_ray.storage.results import read_results
from spade_ray.storage.sources import resolve_inputs

pytestmark = pytest.mark.timeout(600)  # the stopped run, then its rerun: two Ray start-ups

N_IMAGES = 40
BATCH = 2


@pytest.fixture(scope="module", autouse=True)
def _own_ray():
    yield
    ray.shutdown()


@pytest.fixture(scope="module")
def inbox(small_bank, tmp_path_factory) -> Path:
    """40 images in 20 batches of 2: most batches are still to go when the first is committed."""
    return camera_folders(small_bank, tmp_path_factory.mktemp("preempt") / "in", N_IMAGES)


def result_files(out: Path) -> list[Path]:
    return sorted((out / "results").glob("*.parquet"))


def wait_for(condition, what: str, timeout: float = 180) -> None:
    deadline = time.time() + timeout
    while not condition():
        assert time.time() < deadline, f"timed out waiting for {what}"
        time.sleep(0.05)


def test_sigterm_stops_the_driver_cleanly_and_the_rerun_finishes(small_bank, inbox, tmp_path) -> None:
    out = tmp_path / "out"
    proc = subprocess.Popen(
        [sys.executable, "-m", "spade_ray.apps.cli", "score", str(inbox), "--bank", str(small_bank["bank"]),
         "--output", str(out), "--batch-size", str(BATCH), "--max-actors", "1", "--quiet"],
        start_new_session=True, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
        env={k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"},
    )
    try:
        wait_for(lambda: len(result_files(out)) >= 1 or proc.poll() is not None, "the first committed batch")
        assert proc.poll() is None, proc.communicate()[1][-3000:]
        assert len(result_files(out)) < N_IMAGES // BATCH  # mid-run
        sent = time.monotonic()
        proc.send_signal(signal.SIGTERM)  # to the driver alone, as kubelet and `ray job stop` do
        stdout, stderr = proc.communicate(timeout=STOP_SECONDS + 30)
        took = time.monotonic() - sent
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
        for pid in session_pids(proc.pid):  # Ray workers lead process groups of their own
            os.kill(pid, signal.SIGKILL)
    assert proc.returncode == EXIT_PREEMPTED, stderr[-3000:]
    assert "spade-ray score: stopped by SIGTERM" in stderr and "run the same command again" in stderr, stderr[-3000:]
    assert took < STOP_SECONDS, f"the stop took {took:.1f} s"  # the clean path, not the watchdog
    # nothing of the job is left running: its local Ray and every actor are gone, nothing still writes
    # its session: the driver, its local Ray and every Ray worker (a worker may take a moment to see its raylet gone)
    wait_for(lambda: not session_pids(proc.pid), "every process of the job to exit", timeout=15)
    files = result_files(out)
    time.sleep(1.0)
    assert result_files(out) == files

    # only whole batches: each result file is readable and each of its rows points at stored artifacts
    rows = [r for f in files for r in pq.read_table(f).to_pylist()]
    assert all(1 <= pq.read_metadata(f).num_rows <= BATCH for f in files)
    assert 0 < len(rows) < N_IMAGES
    for r in rows:
        assert r["status"] == "ok", r["error"]
        assert Path(r["mask_uri"].removeprefix("file://")).is_file(), r["mask_uri"]

    rerun = run_score(str(inbox), str(small_bank["bank"]), str(out), batch_size=4 * BATCH, max_actors=1)
    assert (rerun.skipped, rerun.ok, rerun.error) == (len(rows), N_IMAGES - len(rows), 0)
    ids = read_results(str(out), ["image_id"]).column("image_id").to_pylist()
    assert sorted(ids) == sorted(it.image_id for it in resolve_inputs(str(inbox)))  # one row per image


HUNG_STOP = textwrap.dedent("""
    import sys, time
    from spade_ray.distributed import preemption
    preemption.STOP_SECONDS = float(sys.argv[1])
    with preemption.graceful_sigterm():
        try:
            print("ready", flush=True)
            time.sleep(60)
        finally:  # a stop that hangs (a cleanup waiting on a dead node)
            print("stopping", flush=True)
            time.sleep(60)
""")


def _hung_driver(stop_seconds: float) -> subprocess.Popen:
    proc = subprocess.Popen([sys.executable, "-c", HUNG_STOP, str(stop_seconds)], stdout=subprocess.PIPE, text=True)
    assert proc.stdout.readline().strip() == "ready"
    proc.send_signal(signal.SIGTERM)
    assert proc.stdout.readline().strip() == "stopping"
    return proc


def test_a_stop_that_hangs_is_ended_by_the_watchdog_with_the_same_code() -> None:
    proc = _hung_driver(stop_seconds=1.0)
    stopping = time.monotonic()  # the watchdog started just before: with the signal
    assert proc.wait(timeout=30) == EXIT_PREEMPTED
    assert time.monotonic() - stopping < 10  # the cleanup would have slept 60 s


@pytest.mark.parametrize("second", [signal.SIGTERM, signal.SIGINT], ids=["sigterm", "sigint"])
def test_a_second_signal_during_the_stop_exits_at_once(second) -> None:
    proc = _hung_driver(stop_seconds=120.0)
    sent = time.monotonic()
    proc.send_signal(second)
    assert proc.wait(timeout=30) == EXIT_PREEMPTED
    assert time.monotonic() - sent < 10
