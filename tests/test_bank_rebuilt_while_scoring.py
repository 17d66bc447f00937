"""A bank gets a new version (``build-bank --add-to``) while a score job is using it.

The job that started on v0001 must keep v0001 (its shard actors loaded v0001's files; nothing
looks up "the latest" again mid-run), a job started once v0002's manifest is written uses v0002,
and a reader never gets a version whose files are still being written.  The running job is held
mid-run for the whole build by a real slow store: its output goes to the SeaweedFS server through
the fault proxy, whose latency is raised while the build runs.
"""

from __future__ import annotations

import shutil
import threading
import time
from pathlib import Path

import pytest
import ray
from image_sets import camera_folders

from spade_ray.bank.shard_loader import load_shard
from spade_ray.bank.store import MANIFEST, open_bank
from spade_ray.distributed.build_bank_job import run_build_bank
from spade_ray.distributed.runtime import init_ray
from spade_ray.distributed.score_job import run_score
from spade_ray.storage.results import read_results
from spade_ray.testing.s3server import S3Server
from spade_ray.testing.tcpproxy import FaultProxy

pytestmark = pytest.mark.timeout(600)

N_IMAGES = 24
BATCH = 2
SETTINGS = {"image_k": 2, "pixel_k": 3, "kappa": 1}


@pytest.fixture(scope="module", autouse=True)
def _own_ray():
    """One Ray for the module, with room for a score job and a build at once (as a cluster would have)."""
    ray.shutdown()
    init_ray(num_cpus=8)
    yield
    ray.shutdown()


class Background:
    """Runs a job in a thread of this driver while the test does something else."""

    def __init__(self, fn) -> None:
        self.result = None
        self.error: BaseException | None = None
        self.thread = threading.Thread(target=self._run, args=(fn,), daemon=True)
        self.thread.start()

    def _run(self, fn) -> None:
        try:
            self.result = fn()
        except BaseException as exc:  # noqa: BLE001 - handed to the test thread
            self.error = exc

    def join(self, timeout: float):
        self.thread.join(timeout)
        assert not self.thread.is_alive(), "the job did not finish"
        if self.error:
            raise self.error
        return self.result


class VersionWatcher:
    """Opens the bank over and over as a new job would, and loads every shard the answer names, verified.

    A half-written version served to a reader would show up as a missing or mismatching file.
    """

    def __init__(self, bank: Path) -> None:
        self.bank = bank
        self.seen: list[int] = []
        self.failures: list[str] = []
        self.stop = threading.Event()
        self.thread = threading.Thread(target=self._run, daemon=True)
        self.thread.start()

    def _run(self) -> None:
        while not self.stop.is_set():
            root, manifest = open_bank(str(self.bank))
            try:
                for entry in manifest.shards:
                    load_shard(root, entry, verify=True)
            except Exception as exc:  # noqa: BLE001 - reported by the test
                self.failures.append(f"v{manifest.version}: {exc}")
            self.seen.append(manifest.version)
            time.sleep(0.05)

    def close(self) -> None:
        self.stop.set()
        self.thread.join(60)


def many_images(small_bank: dict, root: Path) -> Path:
    return camera_folders(small_bank, root, N_IMAGES)


def test_a_running_job_keeps_its_version_and_a_new_job_takes_the_new_one(small_bank, s3_server: S3Server,
                                                                        s3_bucket: str, fault_proxy: FaultProxy,
                                                                        tmp_path: Path) -> None:
    bank = tmp_path / "bank"
    shutil.copytree(small_bank["bank"], bank)  # the session's bank stays as it is
    features = small_bank["bank"].parent / "features"
    images = many_images(small_bank, tmp_path / "in")
    v1 = open_bank(str(bank))[1].bank_id
    options = {**s3_server.storage_options, "endpoint_url": fault_proxy.endpoint_url}
    output = f"{s3_bucket}/during"
    job = Background(lambda: run_score(str(images), str(bank), output, batch_size=BATCH, max_actors=1,
                                       storage_options=options))
    deadline = time.time() + 300
    while not read_results(output, ["image_id"], s3_server.storage_options).num_rows:
        assert job.thread.is_alive() and time.time() < deadline, job.error
        time.sleep(0.1)
    fault_proxy.latency_ms = 4000  # every write now takes many seconds: the job stays mid-run through the build
    watcher = VersionWatcher(bank)
    try:
        build = run_build_bank(str(features), None, add_to=str(bank), calibration_samples=4, **SETTINGS)
        still_scoring = job.thread.is_alive()
        time.sleep(0.5)  # let the watcher open the finished v0002 too
    finally:
        watcher.close()
        fault_proxy.latency_ms = 0
    summary = job.join(300)  # before any assertion: the job's thread must not outlive the test's Ray
    assert build.extra["version"] == "v0002"
    assert still_scoring  # the build finished while the job was still scoring

    assert (bank / "v0002" / MANIFEST).is_file()
    assert not watcher.failures, watcher.failures
    assert set(watcher.seen) <= {1, 2} and watcher.seen[0] == 1 and watcher.seen[-1] == 2
    assert watcher.seen == sorted(watcher.seen)  # once v0002 was served, never v0001 again
    rows = read_results(output, storage_options=s3_server.storage_options).to_pylist()
    assert (summary.ok, len(rows)) == (N_IMAGES, N_IMAGES)
    assert summary.extra["bank_id"] == v1 and {r["bank_id"] for r in rows} == {v1}

    after = run_score(str(images), str(bank), str(tmp_path / "after"), batch_size=8, max_actors=1)
    v2 = open_bank(str(bank))[1].bank_id
    assert v2.startswith("v0002-") and after.extra["bank_id"] == v2
    assert {r["bank_id"] for r in read_results(str(tmp_path / "after"), ["bank_id"]).to_pylist()} == {v2}


def test_a_version_without_its_manifest_is_never_served(small_bank, tmp_path: Path) -> None:
    """What a build that is still running (or crashed) leaves: shard files, maybe a manifest's temp file."""
    bank = tmp_path / "bank"
    shutil.copytree(small_bank["bank"], bank)
    partial = bank / "v0002"
    shutil.copytree(bank / "v0001", partial)
    manifest = (partial / MANIFEST).read_bytes()
    (partial / MANIFEST).unlink()
    (partial / f"{MANIFEST}.tmp-0badc0de").write_bytes(manifest[: len(manifest) // 2])  # a write cut short
    assert open_bank(str(bank))[1].version == 1
    with pytest.raises(FileNotFoundError, match="no complete bank version"):
        open_bank(str(partial))
