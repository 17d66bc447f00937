"""Measure scoring options side by side on an MVTec-layout dataset, features extracted once.

Each ``--variant NAME:key=value,key=value`` sets SpadeConfig scoring settings (image_k, pixel_k,
kappa, sigma, matching, coarse_k, margin) on top of the defaults; every variant scores the same
test features against the same bank, so the table isolates the option's effect.

    python benchmarks/ablate.py DATASET --protocol paper \\
        --variant exact: --variant c2f:matching=coarse-to-fine --variant c2f-m1:matching=coarse-to-fine,margin=1
"""

from __future__ import annotations

import argparse
import json
import os
import time

import numpy as np
import torch

from spade_ray.datasets import load_mvtec
from spade_ray.features import FeatureBatch
from spade_ray.fusion import image_score
from spade_ray.images import load_mask
from spade_ray.metrics import compute_metrics
from spade_ray.model import Spade, anomaly_maps


def parse_variant(text: str) -> tuple[str, dict[str, str]]:
    name, _, spec = text.partition(":")
    settings = dict(item.split("=", 1) for item in spec.split(",") if item)
    return name, settings


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("dataset")
    parser.add_argument("--protocol", default="paper", choices=["full", "paper"])
    parser.add_argument("--backbone", default="lite0")
    parser.add_argument("--variant", action="append", required=True, help="NAME:key=value,... (repeatable)")
    parser.add_argument("--threads", type=int, help="torch threads (default: torch's own)")
    parser.add_argument("--json", help="also write the table here")
    parser.add_argument("--cache", help="a .npz file keeping the extracted features between runs (same dataset/protocol)")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)

    data = load_mvtec(args.dataset)
    model = Spade(args.backbone, protocol=args.protocol)
    if args.cache and os.path.exists(args.cache):
        with np.load(args.cache, allow_pickle=False) as saved:
            n_levels = int(saved["n_levels"])
            model.set_bank([s.relpath for s in data.train], saved["bank_global"], [saved[f"bank_level{i}"] for i in range(n_levels)])
            query = FeatureBatch(saved["query_global"], [saved[f"query_level{i}"] for i in range(n_levels)])
            sizes = [tuple(map(int, hw)) for hw in saved["sizes"]]
    else:
        model.fit([s.uri for s in data.train], calibration_samples=0)
        query, sizes = model.extract([s.uri for s in data.test])
        if args.cache:
            np.savez(args.cache, n_levels=len(query.levels), bank_global=model.bank_global, sizes=np.array(sizes),
                     query_global=query.global_, **{f"bank_level{i}": lvl for i, lvl in enumerate(model.bank_levels)},
                     **{f"query_level{i}": lvl for i, lvl in enumerate(query.levels)})
    labels = np.array([s.label for s in data.test])
    masks = [model.preprocessor.mask_to_output(load_mask(s.mask_uri)) if s.mask_uri else None for s in data.test]
    table = []
    for name, settings in map(parse_variant, args.variant):
        config = model.config.with_scoring(settings)
        start = time.perf_counter()
        dists, rows = model.index.search(query.global_, max(config.image_k, config.pixel_k))
        bank_levels, q = model.bank_levels, query
        if "aggregate" in settings:  # experiment: each pixel feature averaged over its n x n neighbourhood
            n = int(settings["aggregate"])
            pool = lambda a: torch.nn.functional.avg_pool2d(torch.from_numpy(a).float(), n, 1, n // 2, count_include_pad=False).numpy()  # noqa: E731
            bank_levels = [pool(level).astype(np.float16) for level in model.bank_levels]
            q = FeatureBatch(query.global_, [pool(level) for level in query.levels])
        maps = anomaly_maps(q, bank_levels, rows[:, : config.pixel_k], config)
        seconds = (time.perf_counter() - start) / len(maps)
        maps = [model.preprocessor.map_to_output(m, h, w) for m, (h, w) in zip(maps, sizes)]
        metrics = compute_metrics(image_score(dists, config.image_k), labels, maps, masks)
        row = {"variant": name, **settings, **{k: round(v, 4) for k, v in metrics.items() if v is not None},
               "seconds_per_image_retrieval_correspondence_fusion": round(seconds, 4)}
        table.append(row)
        print(json.dumps(row), flush=True)
    if args.json:
        with open(args.json, "w") as fh:
            json.dump({"dataset": args.dataset, "protocol": args.protocol, "backbone": args.backbone, "rows": table}, fh, indent=1)


if __name__ == "__main__":
    main()
