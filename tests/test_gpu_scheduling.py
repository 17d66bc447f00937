"""GPU actors, tested without a GPU: a local Ray started with one *logical* GPU.

Ray schedules by resources, not by devices, so a logical GPU is enough to check what matters on
a GPU cluster: the extractor and scorer actors ask for it (automatically, since the cluster has
one), the shard actors do not, Ray sets each GPU actor's CUDA_VISIBLE_DEVICES, and the actors
follow it.  Torch here has no CUDA, so the GPU actors must say so and run on the CPU, and the
job summary must show that: the same path a CPU-only torch wheel on a real GPU node takes.
Whether a real GPU is faster is not measured here (README, "GPU nodes").
"""

from __future__ import annotations

import logging
import os
from pathlib import Path

import numpy as np
import pytest
import ray

from spade_ray.distributed.devices import actor_device, gpus_per_actor, shard_gpus
from spade_ray.distributed.extract_job import run_extract
from spade_ray.distributed.pipeline import plan_actors
from spade_ray.distributed.score_job import run_score
from spade_ray.storage.results import read_results

COLUMNS = ["image_id", "status", "image_score", "knn_score", "pixel_max", "is_anomalous", "neighbours"]


@pytest.fixture(scope="module")
def gpu_ray(small_bank):
    """A local Ray with 2 CPUs and 1 logical GPU, for this module only (the jobs' init_ray keeps it)."""
    if ray.is_initialized():
        ray.shutdown()
    ray.init(num_cpus=2, num_gpus=1, include_dashboard=False, logging_level=logging.WARNING)
    ray.data.DataContext.get_current().enable_progress_bars = False
    yield small_bank
    ray.shutdown()


def _gpus_required(class_part: str) -> list[float]:
    """GPUs each actor whose class (or, for Ray Data's ``MapWorker(MapBatches(UDF))``, whose repr)
    names ``class_part`` required, from Ray's actor table, dead actors included.

    Read from the table's protos: ``ray._private.state.actors()`` leaves the resources out.
    """
    from ray.core.generated import gcs_pb2

    accessor = ray._private.state.state._connect_and_get_accessor()
    tables = [gcs_pb2.ActorTableData.FromString(raw) for raw in accessor.get_actor_table(None, None)]
    return [float(t.required_resources.get("GPU", 0.0)) for t in tables if class_part in t.class_name + t.repr_name]


@ray.remote
class _Probe:
    """An actor that reports what the device decision sees inside it, and what it logged."""

    def device(self) -> tuple[str, str | None, list[str]]:
        records: list[str] = []
        handler = logging.Handler()
        handler.emit = lambda record: records.append(record.getMessage())  # type: ignore[method-assign]
        logging.getLogger("spade_ray.distributed.devices").addHandler(handler)
        return actor_device("probe"), os.environ.get("CUDA_VISIBLE_DEVICES"), records


def test_an_actor_follows_the_gpus_ray_gave_it(gpu_ray) -> None:
    with_gpu = _Probe.options(num_gpus=1).remote()
    device, visible, said = ray.get(with_gpu.device.remote())
    assert visible == "0"  # set by Ray for the GPU it assigned
    assert device == "cpu"  # no CUDA in this torch: the actor says so, once, and runs on the CPU
    assert len(said) == 1 and "assigned GPU" in said[0] and "CUDA_VISIBLE_DEVICES='0'" in said[0], said
    without = _Probe.options(num_gpus=0).remote()
    assert ray.get(without.device.remote())[0] == "cpu" and not ray.get(without.device.remote())[2]
    ray.kill(with_gpu)
    ray.kill(without)


def test_the_pool_is_sized_by_gpus_and_requests_are_checked(gpu_ray) -> None:
    assert gpus_per_actor(None) == 1.0  # automatic: the cluster has a GPU
    assert gpus_per_actor(None, reserved=1.0) == 0.0  # the shard actors took it
    assert gpus_per_actor(0.0) == 0.0
    with pytest.raises(ValueError, match="has 1 GPUs"):
        gpus_per_actor(2.0)
    with pytest.raises(ValueError, match="needs 2 GPUs"):
        shard_gpus(1.0, n_shards=2)
    # 2 CPUs leave room for 3 actors of 0.5 CPU; one GPU holds 1 of a whole GPU, 2 of half a GPU
    assert plan_actors(100, 5, None, gpus_per_actor=0.0).pool.max_size == 3
    assert plan_actors(100, 5, None, gpus_per_actor=1.0).pool.max_size == 1
    assert plan_actors(100, 5, None, gpus_per_actor=0.5).pool.max_size == 2


def test_extractors_ask_for_the_gpu_and_the_summary_says_where_they_ran(gpu_ray, tmp_path: Path, caplog) -> None:
    dataset = gpu_ray["dataset"]
    with caplog.at_level(logging.WARNING, logger="spade_ray.distributed.pipeline"):
        summary = run_extract(str(dataset / "train" / "good"), str(tmp_path / "features"),
                              image_size=gpu_ray["image_size"], batch_size=5)
    assert summary.ok == 10 and summary.error == 0
    assert summary.extra["gpus_per_actor"] == 1.0
    assert summary.extra["devices"] == {"cpu": 10} and "on cpu (10)" in summary.line()
    assert any("ran on the CPU although each actor was given 1 GPU" in r.getMessage() for r in caplog.records)
    extractors = _gpus_required("ExtractFeatures")
    assert extractors and set(extractors) == {1.0}, extractors


def _score(bank: dict, out: Path, **kwargs) -> tuple[dict, dict]:
    summary = run_score(str(bank["dataset"] / "test"), str(bank["bank"]), str(out), batch_size=4, save_maps=True,
                        overwrite=True, **kwargs)
    rows = {r["image_id"]: r for r in read_results(str(out), COLUMNS).to_pylist()}
    maps = {p.relative_to(out / "maps").as_posix(): np.load(p) for p in sorted((out / "maps").rglob("*.npy"))}
    return {"summary": summary, "rows": rows}, maps


def test_scorers_take_the_gpu_shards_do_not_and_scores_equal_a_cpu_run(gpu_ray, tmp_path: Path) -> None:
    gpu, gpu_maps = _score(gpu_ray, tmp_path / "auto")
    summary = gpu["summary"]
    assert summary.ok == 6 and summary.error == 0
    assert summary.extra["gpus_per_actor"] == 1.0 and summary.extra["devices"] == {"cpu": 6}
    scorers, shards = _gpus_required("ScoreImages"), _gpus_required("ShardActor")
    assert scorers and set(scorers) == {1.0}, scorers
    assert shards and set(shards) == {0.0}, shards

    cpu, cpu_maps = _score(gpu_ray, tmp_path / "cpu", gpus_per_actor=0)
    assert cpu["summary"].extra["gpus_per_actor"] == 0.0 and cpu["summary"].extra["devices"] == {"cpu": 6}
    assert gpu["rows"] == cpu["rows"]  # exact: same floats, same neighbours
    assert gpu_maps.keys() == cpu_maps.keys() and len(gpu_maps) == 6
    for key in gpu_maps:
        np.testing.assert_array_equal(gpu_maps[key], cpu_maps[key])
