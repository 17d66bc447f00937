"""Check that the distributed job gives the in-process model's numbers on an MVTec-layout dataset.

    python benchmarks/compare_distributed.py DATASET --work runs/compare --shards 3 [--protocol full] [--method spade]

Runs `Spade.fit/predict` in process, and extract -> build-bank (N shards) -> score on a local Ray
with the same settings (a method preset, default the default one, and the same normal-only
calibration); prints the largest relative differences of image scores and maps, the calibrated
thresholds and the metrics of both, and writes them to WORK/compare.json.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

from spade_ray import Spade
from spade_ray.bank.store import open_bank
from spade_ray.distributed.build_bank_job import run_build_bank
from spade_ray.distributed.extract_job import run_extract
from spade_ray.distributed.pipeline import JobSummary
from spade_ray.distributed.score_job import run_score
from spade_ray.method.config import DEFAULT_IMAGE_K, DEFAULT_PIXEL_K, METHODS
from spade_ray.method.matching import DEFAULT_KAPPA
from spade_ray.method.metrics import compute_metrics
from spade_ray.storage.datasets import MVTecDataset, load_mvtec
from spade_ray.storage.images import load_mask
from spade_ray.storage.outputs import output_key
from spade_ray.storage.results import read_results
from spade_ray.storage.sources import resolve_inputs


def _thresholds(calibration: dict | None) -> dict | None:
    if not calibration:
        return None
    return {k: calibration[k] for k in ("image_threshold", "pixel_threshold", "knn_scale", "map_scale") if k in calibration}


def _parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("dataset")
    parser.add_argument("--work", required=True)
    parser.add_argument("--shards", type=int, default=3)
    parser.add_argument("--protocol", default="paper", choices=["full", "paper"])
    parser.add_argument("--image-k", type=int, default=DEFAULT_IMAGE_K)
    parser.add_argument("--pixel-k", type=int, default=DEFAULT_PIXEL_K)
    parser.add_argument("--kappa", type=int, default=DEFAULT_KAPPA)
    parser.add_argument("--method", default="spade-ray", choices=sorted(METHODS))
    parser.add_argument("--calibration-samples", type=int, default=64)
    parser.add_argument("--threads", type=int, default=None,
                        help="torch threads of the in-process run (default: torch's). The backbone's features do not "
                             "depend on it (spade_ray.method.batch_invariance), so neither should the comparison")
    return parser.parse_args()


def _run_distributed(args: argparse.Namespace, work: Path, settings: dict[str, int], scoring: dict[str, Any]) -> JobSummary:
    """extract -> build-bank -> score on a local Ray; thresholds so high that every image writes its raw map."""
    run_extract(str(Path(args.dataset) / "train" / "good"), str(work / "features"), protocol=args.protocol)
    run_build_bank(str(work / "features"), str(work / "bank"), shards=args.shards, scoring=scoring,
                   calibration_samples=args.calibration_samples, **settings)
    return run_score(str(Path(args.dataset) / "test"), str(work / "bank"), str(work / "scored"), save_maps=True,
                     threshold=1e9, image_threshold=1e9, overwrite=True)


def _distributed_outputs(args: argparse.Namespace, work: Path, data: MVTecDataset, pred: Any) -> dict[str, Any]:
    """The score job's image scores and maps, in test order, and their largest relative differences to ``pred``."""
    rows = {r["uri"]: r for r in read_results(str(work / "scored"), ["uri", "image_score"]).to_pylist()}
    rel = {i.uri: i.relpath for i in resolve_inputs(str(Path(args.dataset) / "test"))}
    d_scores, d_maps, score_diff, map_diff, worst = [], [], 0.0, 0.0, ""
    for sample, score, amap in zip(data.test, pred.image_scores, pred.maps):
        row = rows[sample.uri]
        dmap = np.load(work / "scored" / "maps" / output_key(rel[sample.uri], ".npy"), allow_pickle=False)
        d_scores.append(row["image_score"])
        d_maps.append(dmap)
        score_diff = max(score_diff, abs(row["image_score"] - float(score)) / abs(float(score)))
        diff = float(np.abs(dmap - amap).max()) / float(np.abs(amap).max())
        if diff > map_diff:
            map_diff, worst = diff, sample.uri
    return {"scores": np.array(d_scores), "maps": d_maps, "score_diff": score_diff, "map_diff": map_diff, "worst": worst}


def main() -> None:
    args = _parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    work = Path(args.work)
    settings = {"image_k": args.image_k, "pixel_k": args.pixel_k, "kappa": args.kappa}
    scoring = METHODS[args.method]

    data = load_mvtec(args.dataset)
    t0 = time.perf_counter()
    model = Spade("lite0", protocol=args.protocol, **settings, **scoring).fit(
        [s.uri for s in data.train], calibration_samples=args.calibration_samples)
    pred = model.predict([s.uri for s in data.test])
    t_local = time.perf_counter() - t0

    t0 = time.perf_counter()
    summary = _run_distributed(args, work, settings, scoring)
    t_dist = time.perf_counter() - t0

    labels = np.array([s.label for s in data.test])
    masks = [model.preprocessor.mask_to_output(load_mask(s.mask_uri)) if s.mask_uri else None for s in data.test]
    dist = _distributed_outputs(args, work, data, pred)
    local_metrics = compute_metrics(pred.image_scores, labels, pred.maps, masks)
    dist_metrics = compute_metrics(dist["scores"], labels, dist["maps"], masks)
    report = {
        "dataset": args.dataset, "protocol": args.protocol, "shards": args.shards, **settings,
        "method": args.method, "calibration_samples": args.calibration_samples,
        "in_process_torch_threads": torch.get_num_threads(),
        "bank_dtype": "float16 pyramids, float32 global vectors (both paths)",
        "max_relative_image_score_difference": dist["score_diff"],
        "max_relative_map_difference": dist["map_diff"],
        "max_relative_map_difference_image": dist["worst"],
        "calibrated_thresholds": {
            "in_process": _thresholds(model.calibration.__dict__ if model.calibration else None),
            "distributed": _thresholds(open_bank(str(work / "bank"))[1].calibration),
        },
        "in_process": {k: round(v, 3) if v is not None else None for k, v in local_metrics.items()},
        "distributed": {k: round(v, 3) if v is not None else None for k, v in dist_metrics.items()},
        "seconds": {"in_process_fit_predict": round(t_local, 1), "distributed_extract_build_score": round(t_dist, 1)},
        "score_summary": summary.line(),
    }
    report["metrics_identical_to_3_decimals"] = report["in_process"] == report["distributed"]
    (work / "compare.json").write_text(json.dumps(report, indent=2))
    print(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
