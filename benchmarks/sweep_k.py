"""Measure SPADE's image_k / pixel_k trade-off on an MVTec-layout dataset.

Features are extracted once; the image score is recomputed for each image_k and the anomaly maps
for each pixel_k, so the sweep costs one extraction plus one correspondence pass per pixel_k.

    python benchmarks/sweep_k.py DATASET --protocol paper --image-k 1 3 5 10 20 50 --pixel-k 1 5 10 20 50
"""

from __future__ import annotations

import argparse
import json
import time
from dataclasses import replace

import numpy as np

from spade_ray.method.image_scoring import knn_score
from spade_ray.method.metrics import compute_metrics
from spade_ray.method.scorer import Scorer
from spade_ray.model import Spade
from spade_ray.storage.datasets import load_mvtec
from spade_ray.storage.images import load_mask


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("dataset")
    parser.add_argument("--protocol", default="paper", choices=["full", "paper"])
    parser.add_argument("--backbone", default="lite0")
    parser.add_argument("--image-k", type=int, nargs="+", default=[1, 3, 5, 10, 20, 50])
    parser.add_argument("--pixel-k", type=int, nargs="+", default=[1, 5, 10, 20, 50])
    parser.add_argument("--kappa", type=int, default=1)
    parser.add_argument("--json", help="also write the table here")
    args = parser.parse_args()

    data = load_mvtec(args.dataset)
    model = Spade(args.backbone, protocol=args.protocol, image_k=1, pixel_k=1, kappa=args.kappa)
    model.fit([s.uri for s in data.train], calibration_samples=0)
    query, sizes = model.extract([s.uri for s in data.test])
    labels = np.array([s.label for s in data.test])
    masks = [model.preprocessor.mask_to_output(load_mask(s.mask_uri)) if s.mask_uri else None for s in data.test]
    kmax = max(args.image_k + args.pixel_k)
    dists, _ = model.bank.search(query.global_, kmax)
    rows_out = []
    for k in args.image_k:
        m = compute_metrics(knn_score(dists, k), labels)
        rows_out.append({"image_k": k, "image_auroc": m["image_auroc"], "image_f1_max": m["image_f1_max"]})
        print(json.dumps(rows_out[-1]), flush=True)
    for k in args.pixel_k:
        start = time.perf_counter()
        maps = Scorer(replace(model.config, pixel_k=k, aggregate=1), model.bank, model.bank).match(query).maps  # raw features
        seconds = (time.perf_counter() - start) / len(maps)
        maps = [model.preprocessor.map_to_output(m, h, w) for m, (h, w) in zip(maps, sizes)]
        m = compute_metrics(knn_score(dists, 1), labels, maps, masks)
        rows_out.append({"pixel_k": k, "pixel_auroc": m["pixel_auroc"], "aupro": m["aupro"], "pixel_f1_max": m["pixel_f1_max"],
                         "seconds_per_image": round(seconds, 4)})
        print(json.dumps(rows_out[-1]), flush=True)
    if args.json:
        with open(args.json, "w") as fh:
            json.dump({"dataset": args.dataset, "protocol": args.protocol, "backbone": args.backbone, "rows": rows_out},
                      fh, indent=1)


if __name__ == "__main__":
    main()
