"""Measure scoring options side by side on an MVTec-layout dataset, features extracted once.

Each ``--variant NAME:key=value,...`` starts from a method preset (``method=spade`` for the
published method, else ``spade-ray``, the default) and sets SpadeConfig scoring settings on top
(image_k, pixel_k, kappa, sigma, matching, coarse_k, margin, aggregate, image_scoring); every
variant scores the same test features against the same bank, with its own leave-one-out
calibration, so the table isolates the option's effect.  ``levels=1+2`` (an experiment, not a
package option) scores with a subset of the pyramid levels.

    python benchmarks/ablate.py DATASET --protocol paper --cache runs/paper.npz \
        --variant spade:method=spade --variant default: --variant c2f-m1:matching=coarse-to-fine,margin=1
"""

from __future__ import annotations

import argparse
import json
import os
import time
from typing import Any

import numpy as np
import torch

from spade_ray.method.aggregation import aggregate_level
from spade_ray.method.config import METHODS
from spade_ray.method.features import FeatureBatch
from spade_ray.method.image_scoring import combine_image_scores
from spade_ray.method.metrics import compute_metrics
from spade_ray.model import Spade
from spade_ray.storage.datasets import MVTecDataset, load_mvtec
from spade_ray.storage.images import load_mask


def _smooth(level: np.ndarray, how: str) -> np.ndarray:
    """Experiment: "3" box 3x3 (aggregate_level), "b3" binomial 3x3, "h3" half raw + half box."""
    if how.isdigit():
        return aggregate_level(level, int(how))
    x = np.asarray(level, np.float32)
    if how == "h3":
        return (0.5 * x + 0.5 * aggregate_level(x, 3)).astype(level.dtype)
    if how == "b3":
        x = torch.from_numpy(x)
        k = torch.tensor([1.0, 2.0, 1.0])
        k2 = (k[:, None] * k[None, :])[None, None].repeat(x.shape[1], 1, 1, 1)
        ones = torch.ones(1, 1, *x.shape[2:])
        norm = torch.nn.functional.conv2d(ones, k2[:1], padding=1)
        out = []
        for i in range(0, x.shape[0], 64):
            out.append(torch.nn.functional.conv2d(x[i:i + 64], k2, padding=1, groups=x.shape[1]) / norm)
        return torch.cat(out).numpy().astype(level.dtype)
    raise ValueError(how)


def parse_variant(text: str) -> tuple[str, dict[str, str]]:
    name, _, spec = text.partition(":")
    settings = dict(item.split("=", 1) for item in spec.split(",") if item)
    return name, settings


def _parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("dataset")
    parser.add_argument("--protocol", default="paper", choices=["full", "paper"])
    parser.add_argument("--backbone", default="lite0")
    parser.add_argument("--variant", action="append", required=True, help="NAME:key=value,... (repeatable)")
    parser.add_argument("--calibration-samples", type=int, default=64,
                        help="leave-one-out bank images for the normal scales and thresholds (default 64, as evaluate)")
    parser.add_argument("--threads", type=int, help="torch threads (default: torch's own)")
    parser.add_argument("--json", help="also write the table here")
    parser.add_argument("--cache", help="a .npz file keeping the extracted features between runs (same dataset/protocol)")
    return parser.parse_args()


def _extract_once(model: Spade, data: MVTecDataset, cache: str | None) -> tuple[FeatureBatch, list[tuple[int, int]]]:
    """Bank and test features, from ``cache`` when it exists (then saved there): extraction is the slow part of a run."""
    if cache and os.path.exists(cache):
        with np.load(cache, allow_pickle=False) as saved:
            n_levels = int(saved["n_levels"])
            model.set_bank([s.relpath for s in data.train], saved["bank_global"],
                           [saved[f"bank_level{i}"] for i in range(n_levels)])
            query = FeatureBatch(saved["query_global"], [saved[f"query_level{i}"] for i in range(n_levels)])
            sizes = [tuple(map(int, hw)) for hw in saved["sizes"]]
        return query, sizes
    model.fit([s.uri for s in data.train], calibration_samples=0)
    query, sizes = model.extract([s.uri for s in data.test])
    if cache:
        np.savez(cache, n_levels=len(query.levels), bank_global=model.bank.global_, sizes=np.array(sizes),
                 query_global=query.global_, **{f"bank_level{i}": lvl for i, lvl in enumerate(model.bank.levels)},
                 **{f"query_level{i}": lvl for i, lvl in enumerate(query.levels)})
    return query, sizes


def _set_variant_bank(model: Spade, query: FeatureBatch, all_levels: list[np.ndarray], levels: list[int] | None,
                      per_level: list[str] | None) -> FeatureBatch:
    """Give ``model`` the variant's bank levels and return the query features to score with them."""
    if levels is not None:  # experiment: score with a subset of the pyramid levels, e.g. levels=1+2
        model.set_bank(model.bank_ids, model.bank.global_, [all_levels[i] for i in levels])
        return FeatureBatch(query.global_, [query.levels[i] for i in levels])
    if per_level is not None:  # experiment: a window size per level, e.g. agg=1+3+3
        model.set_bank(model.bank_ids, model.bank.global_, [_smooth(lvl, n) for lvl, n in zip(all_levels, per_level)])
        return FeatureBatch(query.global_, [_smooth(lvl, n) for lvl, n in zip(query.levels, per_level)])
    model.set_bank(model.bank_ids, model.bank.global_, all_levels)
    return query


def _score_variant(model: Spade, name: str, settings: dict[str, str], query: FeatureBatch, all_levels: list[np.ndarray],
                   sizes: list[tuple[int, int]], labels: np.ndarray, masks: list, calibration_samples: int) -> dict[str, Any]:
    """One row of the table: the variant's metrics and its seconds per image, on the shared features."""
    levels = [int(x) for x in settings.pop("levels").split("+")] if "levels" in settings else None
    per_level = settings.pop("agg").split("+") if "agg" in settings else None
    model.config = model.config.with_scoring({**METHODS[settings.pop("method", "spade-ray")], **settings})
    config = model.config
    q = _set_variant_bank(model, query, all_levels, levels, per_level)
    model.bank.pyramids(config.aggregate)  # aggregated and laid out once per bank, like a served shard, not timed per image
    model.calibration = model.calibrate(calibration_samples) if calibration_samples else None
    scales = model.calibration.scales if model.calibration else None
    start = time.perf_counter()
    matched = model._scorer().match(q)
    knn, maps = matched.knn_scores, matched.maps
    scores = combine_image_scores(knn, np.array([m.max() for m in maps]), config.image_scoring, scales)
    seconds = (time.perf_counter() - start) / len(maps)
    maps = [model.preprocessor.map_to_output(m, h, w) for m, (h, w) in zip(maps, sizes)]
    metrics = compute_metrics(scores, labels, maps, masks)
    metrics["image_auroc_knn_only"] = compute_metrics(knn, labels)["image_auroc"]
    return {"variant": name, **{k: v for k, v in config.scoring().items()}, **({"levels": levels} if levels else {}),
            **({"agg": per_level} if per_level else {}),
            **{k: round(v, 4) for k, v in metrics.items() if v is not None},
            "seconds_per_image_retrieval_correspondence_fusion": round(seconds, 4)}


def main() -> None:
    args = _parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)

    data = load_mvtec(args.dataset)
    model = Spade(args.backbone, protocol=args.protocol)
    query, sizes = _extract_once(model, data, args.cache)
    labels = np.array([s.label for s in data.test])
    masks = [model.preprocessor.mask_to_output(load_mask(s.mask_uri)) if s.mask_uri else None for s in data.test]
    table = []
    all_levels = model.bank.levels
    for name, settings in map(parse_variant, args.variant):
        row = _score_variant(model, name, settings, query, all_levels, sizes, labels, masks, args.calibration_samples)
        table.append(row)
        print(json.dumps(row), flush=True)
    if args.json:
        with open(args.json, "w") as fh:
            json.dump({"dataset": args.dataset, "protocol": args.protocol, "backbone": args.backbone, "rows": table},
                      fh, indent=1)


if __name__ == "__main__":
    main()
