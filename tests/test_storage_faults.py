"""The object store fails under a running score job: an outage, a long outage, throttling.

Real components only: the SeaweedFS server the tests start, the fault-injecting proxy in front of
it (:class:`~spade_ray.testing.tcpproxy.FaultProxy`), and ``spade-ray score`` run as an operator
runs it (a subprocess with its own local Ray), reading a few hundred images from the store and
writing its results back to it.  What must hold: a short outage is ridden out by the retries; a
long one ends the job with exit 1 and a line naming the storage; every committed row's objects
exist whole; the rerun completes with exactly one row per image; throttling costs retries (counted
in the summary), never a row.
"""

from __future__ import annotations

import io
import json
import os
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from PIL import Image

from spade_ray.storage.results import read_results
from spade_ray.storage.urls import read_bytes
from spade_ray.testing.s3server import S3Server
from spade_ray.testing.tcpproxy import FaultProxy

pytestmark = pytest.mark.timeout(600)

N_IMAGES = 200
BATCH = 8


@pytest.fixture(scope="module")
def inputs(small_bank: dict, s3_server: S3Server) -> str:
    """``s3://.../in``: N_IMAGES small images (the small bank's test images, repeated under new names)."""
    bucket = s3_server.make_bucket()
    sources = sorted((small_bank["dataset"] / "test").glob("*/*.png"))
    fs = s3_server.filesystem()
    fs.pipe({f"{bucket}/in/cam{n % 4}/{n:04d}.png": sources[n % len(sources)].read_bytes() for n in range(N_IMAGES)})
    return f"s3://{bucket}/in"


class ScoreRun:
    """``spade-ray score`` in a subprocess (its own local Ray), through the proxy; JSON logs on stdout."""

    def __init__(self, inputs: str, bank: Path, output: str, server: S3Server, proxy: FaultProxy, *options: str) -> None:
        storage = {**server.storage_options, "endpoint_url": proxy.endpoint_url}
        env = {k: v for k, v in os.environ.items() if k not in ("RAY_ADDRESS", "RAY_AUTH_MODE")}
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "spade_ray.apps.cli", "score", inputs, "--bank", str(bank), "--output", output,
             "--batch-size", str(BATCH), "--max-actors", "1", "--visuals", "all", "--report-top", "4",
             "--storage-options", json.dumps(storage), "--log-format", "json", *options],
            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env, start_new_session=True)

    def wait(self, timeout: float = 300) -> tuple[int, list[dict[str, Any]], str]:
        """(exit code, JSON records on stdout, stderr)."""
        out, err = self.proc.communicate(timeout=timeout)
        records = [json.loads(line) for line in out.splitlines() if line.startswith("{")]
        return self.proc.returncode, records, err


def result_rows(server: S3Server, output: str) -> list[dict[str, Any]]:
    """Every committed row, read past the proxy (what is really in the store)."""
    return read_results(output, storage_options=server.storage_options).to_pylist()


def committed_files(server: S3Server, output: str) -> int:
    fs = server.filesystem()
    path = f"{output.removeprefix('s3://')}/results"
    return len([p for p in fs.find(path) if p.endswith(".parquet")]) if fs.exists(path) else 0


def wait_for_first_commit(server: S3Server, output: str, run: ScoreRun, timeout: float = 240) -> None:
    deadline = time.time() + timeout
    while committed_files(server, output) < 1:
        assert run.proc.poll() is None, run.proc.communicate()
        assert time.time() < deadline, "no batch was committed"
        time.sleep(0.1)


def summary_of(records: list[dict[str, Any]]) -> dict[str, Any]:
    return next(r for r in records if r.get("stage") == "score" and "ok" in r)


def assert_rows_point_at_whole_objects(server: S3Server, rows: list[dict[str, Any]]) -> None:
    """Each committed row's mask, heatmap and overlay exist, whole (they decode)."""
    for row in rows:
        for column in ("mask_uri", "heatmap_uri", "overlay_uri"):
            if row[column]:
                Image.open(io.BytesIO(read_bytes(row[column], server.storage_options))).load()


def assert_one_ok_row_per_image(rows: list[dict[str, Any]]) -> None:
    assert len(rows) == N_IMAGES and len({r["image_id"] for r in rows}) == N_IMAGES
    assert all(r["status"] == "ok" for r in rows), {r["error"] for r in rows if r["status"] != "ok"}


def test_a_short_outage_mid_run_is_ridden_out_by_retries(small_bank, inputs, s3_server, s3_bucket,
                                                         fault_proxy) -> None:
    output = f"{s3_bucket}/out"
    run = ScoreRun(inputs, small_bank["bank"], output, s3_server, fault_proxy, "--storage-retry-seconds", "60")
    wait_for_first_commit(s3_server, output, run)
    assert committed_files(s3_server, output) < N_IMAGES // BATCH  # mid-run: most batches still to go
    fault_proxy.outage(3.0)
    code, records, err = run.wait()
    assert code == 0, err
    summary = summary_of(records)
    assert (summary["ok"], summary["error"]) == (N_IMAGES, 0)
    assert summary["storage_retries"] > 0  # the outage was met, and ridden out
    assert fault_proxy.counts().reset > 0
    rows = result_rows(s3_server, output)
    assert_one_ok_row_per_image(rows)
    assert_rows_point_at_whole_objects(s3_server, rows)


def test_a_long_outage_fails_the_job_clearly_and_the_rerun_completes(small_bank, inputs, s3_server, s3_bucket,
                                                                     fault_proxy) -> None:
    output = f"{s3_bucket}/out"
    run = ScoreRun(inputs, small_bank["bank"], output, s3_server, fault_proxy,
                   "--storage-retries", "3", "--storage-retry-seconds", "2")
    wait_for_first_commit(s3_server, output, run)
    fault_proxy.set_down(True)
    try:
        code, records, err = run.wait()
    finally:
        fault_proxy.set_down(False)
    assert code == 1, err
    [line] = [r["message"] for r in records if r["message"].startswith("spade-ray score: error: ")]
    assert "storage unavailable: s3://" in line and "--storage-retries 3" in line, line
    rows = result_rows(s3_server, output)
    assert 0 < len(rows) < N_IMAGES  # committed batches stay; the rest have no row, not an error row
    assert all(r["status"] == "ok" for r in rows)
    assert_rows_point_at_whole_objects(s3_server, rows)

    code, records, err = ScoreRun(inputs, small_bank["bank"], output, s3_server, fault_proxy).wait()
    assert code == 0, err
    summary = summary_of(records)
    assert (summary["skipped"], summary["ok"]) == (len(rows), N_IMAGES - len(rows))
    rows = result_rows(s3_server, output)
    assert_one_ok_row_per_image(rows)
    assert_rows_point_at_whole_objects(s3_server, rows)


def test_throttling_costs_retries_never_a_row(small_bank, inputs, s3_server, s3_bucket, fault_proxy) -> None:
    output = f"{s3_bucket}/out"
    fault_proxy.throttle(0.3)
    code, records, err = ScoreRun(inputs, small_bank["bank"], output, s3_server, fault_proxy).wait()
    assert code == 0, err
    summary = summary_of(records)
    assert (summary["ok"], summary["error"]) == (N_IMAGES, 0)
    throttled = fault_proxy.counts().throttled
    assert throttled > N_IMAGES // 2
    # every 503 the job's own reads and writes met was retried and counted (listings retry in the client)
    assert 0 < summary["storage_retries"] <= throttled
    assert_one_ok_row_per_image(result_rows(s3_server, output))


@pytest.fixture
def small_disk(tmp_path: Path) -> Iterator[Path]:
    """A 1 MiB tmpfs: an output disk that fills up mid-run (needs the right to mount; skips without it)."""
    mount = tmp_path / "disk"
    mount.mkdir()
    made = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=1m", "tmpfs", str(mount)], capture_output=True, text=True)
    if made.returncode != 0:
        pytest.skip(f"cannot mount a small tmpfs here: {made.stderr.strip()}")
    try:
        yield mount
    finally:
        subprocess.run(["umount", str(mount)], check=True)


def test_a_full_output_disk_fails_the_job_naming_the_output_and_the_rerun_completes(small_bank, inputs, s3_server,
                                                                                    fault_proxy, small_disk) -> None:
    output = str(small_disk / "out")
    code, records, err = ScoreRun(inputs, small_bank["bank"], output, s3_server, fault_proxy).wait()
    assert code == 1, err
    [line] = [r["message"] for r in records if r["message"].startswith("spade-ray score: error: ")]
    assert f"cannot write the output {output}: " in line and "No space left on device" in line, line
    rows = read_results(output).to_pylist()
    assert 0 < len(rows) < N_IMAGES and all(r["status"] == "ok" for r in rows)
    assert_rows_point_at_whole_objects(s3_server, rows)
    assert not list(small_disk.rglob("*.tmp-*"))  # no half-written file left behind

    subprocess.run(["mount", "-o", "remount,size=64m", str(small_disk)], check=True)  # the operator frees space
    code, records, err = ScoreRun(inputs, small_bank["bank"], output, s3_server, fault_proxy).wait()
    assert code == 0, err
    assert summary_of(records)["skipped"] == len(rows)
    rows = read_results(output).to_pylist()
    assert_one_ok_row_per_image(rows)
    assert_rows_point_at_whole_objects(s3_server, rows)
