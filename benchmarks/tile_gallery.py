"""Which normal tiles a query tile is compared with, measured: any position, the same position, or its neighbours;
retrieval per tile or per frame.

The tiled model (``spade_ray.method.tiled_scoring``) retrieves each query tile's nearest normal tiles
from any position of any normal frame.  SPADE's own wording, taken literally at tile level, is
"compare a tile with the same-position tiles of its nearest normal frames".  This script fits one
tiled model and scores the dataset's test frames five ways, in one run on the same features, and
prints image AUROC, pixel AUROC and AUPRO of each:

- ``any``: the shipped scoring (nearest normal tiles by the tile's global vector, any position);
- ``same``: nearest normal tiles among those at the same place of their frame (tile centres, in
  frame-relative coordinates, within half a tile stride of the query's);
- ``near``: the same within one and a half strides (the query's position and its neighbours);
- ``frame-any``: the K nearest normal *frames* by the frame's mean tile vector (the kNN score is
  their mean distance), each tile matched against every tile of those frames;
- ``frame-same``: those frames' tiles at the same place only (the literal reading).

Positions are relative so frames of different sizes compare; the restriction is applied as the
retrieval's exclusion list, so correspondence, fusion and stitching are the shipped code.  Image
scores combine kNN and map maximum with the fitted model's normal scales (for the frame-level kNN
score: its median over the bank's frames, each scored without itself).

    python benchmarks/tile_gallery.py ../shared/datasets/kolektorsdd --json benchmarks/results/tile-gallery-kolektorsdd.json
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np
from PIL import Image

from spade_ray.apps.evaluate import _ground_truth_masks
from spade_ray.method.image_scoring import combine_image_scores, knn_score
from spade_ray.method.metrics import compute_metrics
from spade_ray.method.tiled_scoring import cut_frame, extract_tiles
from spade_ray.method.tiling import Stitcher, Tiling
from spade_ray.model import Spade, _as_image
from spade_ray.storage.datasets import load_mvtec
from spade_ray.storage.images import DEFAULT_MAX_PIXELS

VARIANTS = ("any", "same", "near", "frame-any", "frame-same")


def _positions(tiling: Tiling, height: int, width: int) -> tuple[np.ndarray, np.ndarray]:
    """Tile centres (T, 2) and strides (2,) in frame-relative coordinates."""
    boxes = np.array(tiling.boxes(height, width), dtype=np.float64)
    centres = np.stack([(boxes[:, 0] + boxes[:, 2]) / 2 / height, (boxes[:, 1] + boxes[:, 3]) / 2 / width], axis=1)
    extent = boxes[0, 2] - boxes[0, 0], boxes[0, 3] - boxes[0, 1]
    step = tiling.overlap / tiling.scale
    return centres, np.array([max(extent[0] - step, 1) / height, max(extent[1] - step, 1) / width])


def _excluded(allowed: np.ndarray, n_rows: int) -> np.ndarray:
    """The rows outside ``allowed`` as one exclusion row (padded with its first entry; never empty)."""
    out = np.setdiff1d(np.arange(n_rows), allowed)
    return out if len(out) else np.array([-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("dataset")
    parser.add_argument("--tile", type=int, default=224)
    parser.add_argument("--json", default=None)
    args = parser.parse_args()
    data = load_mvtec(args.dataset)
    model = Spade("lite0", tile=args.tile)
    started = time.perf_counter()
    model.fit([s.uri for s in data.train], calibration_samples=64)
    tiling, config = model.config.tiling, model.config
    frame_of, centre_of = [], []
    for f, sample in enumerate(data.train):  # bank rows are the train frames' tiles, in order
        width, height = Image.open(sample.uri).size
        centres, _ = _positions(tiling, height, width)
        frame_of += [f] * len(centres)
        centre_of.append(centres)
    frame_of_row, centres_of_row = np.array(frame_of), np.concatenate(centre_of)
    n_rows = len(frame_of_row)
    bank = model.bank
    frame_vectors = np.stack([bank.global_[frame_of_row == f].astype(np.float64).mean(0) for f in range(len(data.train))])
    scorer = model._scorer(model._calibration_for_scoring())
    # the frame-level kNN score's normal scale: its median over the bank's frames, each without itself
    between = np.linalg.norm(frame_vectors[:, None, :] - frame_vectors[None, :, :], axis=2)
    np.fill_diagonal(between, np.inf)
    frame_scale = float(np.median(knn_score(np.sort(between, axis=1), config.image_k)))
    tile_scales = scorer.scales
    k_frames = config.pixel_k
    results: dict[str, dict] = {v: {"knn": [], "max": [], "maps": []} for v in VARIANTS}
    for sample in data.test:
        image = _as_image(sample.uri, None, DEFAULT_MAX_PIXELS)
        frame = cut_frame(image, tiling, model.preprocessor)
        features = extract_tiles(frame, model._forward, model.batch_size)
        centres, stride = _positions(tiling, frame.height, frame.width)
        offsets = np.abs(centres_of_row[None, :, :] - centres[:, None, :]) / stride  # (T, rows, 2) in strides
        query_frame = features.global_.astype(np.float64).mean(0)
        frame_d = np.linalg.norm(frame_vectors - query_frame, axis=1)
        nearest_frames = np.argsort(frame_d)[:k_frames]
        frame_knn = float(knn_score(np.sort(frame_d)[None, :], config.image_k)[0])
        in_frames = np.isin(frame_of_row, nearest_frames)
        for variant in VARIANTS:
            if variant == "any":
                allowed = [np.arange(n_rows)] * len(centres)
            elif variant in ("same", "frame-same"):
                allowed = [np.flatnonzero((offsets[t] <= 0.5).all(1)) for t in range(len(centres))]
            elif variant == "near":
                allowed = [np.flatnonzero((offsets[t] <= 1.5).all(1)) for t in range(len(centres))]
            else:
                allowed = [np.arange(n_rows)] * len(centres)
            if variant.startswith("frame"):
                allowed = [a[in_frames[a]] for a in allowed]
            exclude = None
            if variant != "any":
                lists = [_excluded(a, n_rows) for a in allowed]
                width = max(len(x) for x in lists)
                exclude = np.stack([np.pad(x, (0, width - len(x)), mode="edge") for x in lists])
            stitcher = Stitcher(frame.height, frame.width, tiling.blend_width())
            matched = scorer.match(features, exclude=exclude)
            for tile_map, box in zip(matched.maps, frame.boxes):
                stitcher.add(tile_map, box)
            out = results[variant]
            out["knn"].append(frame_knn if variant.startswith("frame") else float(np.max(matched.knn_scores)))
            out["max"].append(max(float(m.max()) for m in matched.maps))
            out["maps"].append(stitcher.result())
    labels = np.array([s.label for s in data.test], dtype=np.int64)
    masks = _ground_truth_masks(data, model, None, DEFAULT_MAX_PIXELS)
    report = {"dataset": args.dataset, "tile": args.tile, "overlap": tiling.overlap, "n_train": len(data.train),
              "n_test": len(data.test), "bank_tiles": n_rows, "seconds": None, "variants": {}}
    for variant in VARIANTS:
        out = results[variant]
        scales = (frame_scale, tile_scales[1]) if variant.startswith("frame") and tile_scales else tile_scales
        scores = combine_image_scores(np.array(out["knn"]), np.array(out["max"]), config.image_scoring, scales)
        metrics = compute_metrics(scores, labels, out["maps"] if masks else None, masks)
        report["variants"][variant] = {k: round(float(metrics[k]), 4) for k in ("image_auroc", "pixel_auroc", "aupro")
                                       if metrics.get(k) is not None}
        print(variant, report["variants"][variant], flush=True)
    report["seconds"] = round(time.perf_counter() - started, 1)
    if args.json:
        Path(args.json).write_text(json.dumps(report, indent=1) + "\n")


if __name__ == "__main__":
    main()
