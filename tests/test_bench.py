"""`spade-ray bench` measures every stage in one run and prints the ratios the README quotes."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from spade_ray.apps.procwatch import ProcessPeaks, classify

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
         "--matching", "coarse-to-fine", "--quiet"],
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
