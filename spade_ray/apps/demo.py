"""``spade-ray demo``: the whole distributed pipeline on a synthetic dataset, on a local Ray.

Makes an MVTec-layout dataset of textured surfaces with scratches, spots and cracks, then runs
exactly what a production run does — extract -> build-bank -> score — and finally measures the
result against the ground-truth masks, so a new user sees every output of the tool in a minute.
"""

from __future__ import annotations

import json
import os
import time
from collections.abc import Callable
from typing import Any

import numpy as np

from spade_ray.apps.synthetic import make_synthetic_dataset
from spade_ray.distributed.build_bank_job import run_build_bank
from spade_ray.distributed.extract_job import run_extract
from spade_ray.distributed.pipeline import JobSummary
from spade_ray.distributed.score_job import run_score
from spade_ray.method.metrics import compute_metrics
from spade_ray.method.timing import peak_rss_mb
from spade_ray.progress import Progress, no_progress
from spade_ray.report.report import DEFAULT_REPORT_TOP
from spade_ray.storage.artifacts import ArtifactChoice
from spade_ray.storage.datasets import MVTecDataset, load_mvtec
from spade_ray.storage.images import load_mask
from spade_ray.storage.outputs import output_key
from spade_ray.storage.results import read_results
from spade_ray.storage.sources import resolve_inputs
from spade_ray.storage.urls import write_bytes

__all__ = ["DEMO_SCORING", "run_demo"]

# The demo texture's scratches are 1-2 px wide, thinner than the default 3x3 aggregation window
# (12 px at stride 4), which fades them; the README's advice for hairline defects is raw features
# with coarse-to-fine margin 1, and the demo follows it.  Explicit options (or --method) override.
DEMO_SCORING: dict[str, Any] = {"aggregate": 1, "margin": 1}


def _measure_scored(output: str, dataset: str, data: MVTecDataset) -> dict[str, Any]:
    """Metrics of what the score job wrote (result rows, raw maps) against the ground truth; failed images are left out."""
    rows = {r["uri"]: r for r in read_results(output, ["uri", "status", "image_score"]).to_pylist()}
    relpaths = {i.uri: i.relpath for i in resolve_inputs(os.path.join(dataset, "test"))}
    scores, maps, masks, labels = [], [], [], []
    for sample in data.test:
        row = rows[sample.uri]
        if row["status"] != "ok":
            continue
        scores.append(row["image_score"])
        maps.append(np.load(os.path.join(output, "maps", output_key(relpaths[sample.uri], ".npy")), allow_pickle=False))
        masks.append(load_mask(sample.mask_uri) if sample.mask_uri else None)
        labels.append(sample.label)
    return compute_metrics(np.array(scores), np.array(labels), maps, masks)


def run_demo(output: str, *, seed: int = 0, image_size: int = 224, image_k: int | None = None, pixel_k: int | None = None,
             kappa: int | None = None, scoring: dict[str, Any] | None = None, batch_size: int = 16, shards: int = 2,
             address: str | None = None, progress: Progress = no_progress, log: Callable[[str], Any] = print,
             report_top: int = DEFAULT_REPORT_TOP, gpus_per_actor: float | None = None) -> dict[str, Any]:
    """Run the demo into the local folder ``output``; returns the metrics written to OUT/metrics.json.

    ``gpus_per_actor``: as ``extract``/``score`` take it (None: a GPU per actor when Ray has GPUs)."""
    started = time.perf_counter()
    dataset = os.path.join(output, "dataset")
    if os.path.isdir(os.path.join(dataset, "train")):
        log(f"reusing the synthetic dataset in {dataset}")
    else:
        log(f"making a synthetic inspection dataset in {dataset} ...")
        make_synthetic_dataset(dataset, seed=seed)
    data = load_mvtec(dataset)
    given = {"image_k": image_k, "pixel_k": pixel_k, "kappa": kappa}
    model_args: dict[str, Any] = {k: v for k, v in given.items() if v is not None}
    model_args["scoring"] = {**DEMO_SCORING, **(scoring or {})}
    summaries: list[JobSummary] = []
    summaries.append(run_extract(os.path.join(dataset, "train", "good"), os.path.join(output, "features"),
                                 image_size=image_size, batch_size=batch_size, address=address, progress=progress,
                                 gpus_per_actor=gpus_per_actor))
    log(summaries[-1].line())
    summaries.append(run_build_bank(os.path.join(output, "features"), os.path.join(output, "bank"), shards=shards,
                                    batch_size=batch_size, address=address, progress=progress, **model_args))
    log(summaries[-1].line())
    summaries.append(run_score(os.path.join(dataset, "test"), os.path.join(output, "bank"), output, save_maps=True,
                               artifacts=ArtifactChoice(visuals="all"),
                               overwrite=True, batch_size=batch_size, address=address, progress=progress,
                               report_top=report_top, gpus_per_actor=gpus_per_actor))
    log(summaries[-1].line())

    metrics = _measure_scored(output, dataset, data)
    build = summaries[1].extra
    result = {
        "dataset": dataset,
        "protocol": "full",
        "backbone": "lite0",
        "params": {"image_size": image_size, "shards": shards, **model_args},
        "n_train": len(data.train),
        "n_test": len(data.test),
        **metrics,
        "calibration": {"image_threshold": build.get("image_threshold"), "pixel_threshold": build.get("pixel_threshold")},
        "timing": {
            **{f"{s.job}_seconds": round(s.seconds, 2) for s in summaries},
            "score_images_per_second": round(summaries[2].images_per_second, 2),
            "total_seconds": round(time.perf_counter() - started, 2),
            "driver_peak_rss_mb": round(peak_rss_mb(), 1),
        },
    }
    write_bytes(os.path.join(output, "metrics.json"), json.dumps(result, indent=2).encode())
    return result
