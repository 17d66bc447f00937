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
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image

from spade_ray.apps.evaluate import _ground_truth_masks
from spade_ray.method.image_scoring import combine_image_scores, knn_score
from spade_ray.method.metrics import compute_metrics
from spade_ray.method.scorer import Scorer
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


@dataclass
class _Bank:
    """Where each bank row (a train frame's tile) lies: its frame, its centre; each frame's mean tile vector."""

    frame_of_row: np.ndarray
    centres_of_row: np.ndarray
    frame_vectors: np.ndarray
    frame_scale: float  # the frame-level kNN score's normal scale: its median over the bank's frames, each without itself


def _bank_layout(model: Spade, train: list) -> _Bank:
    frame_of, centre_of = [], []
    for f, sample in enumerate(train):  # bank rows are the train frames' tiles, in order
        width, height = Image.open(sample.uri).size
        centres, _ = _positions(model.config.tiling, height, width)
        frame_of += [f] * len(centres)
        centre_of.append(centres)
    frame_of_row = np.array(frame_of)
    vectors = np.stack([model.bank.global_[frame_of_row == f].astype(np.float64).mean(0) for f in range(len(train))])
    between = np.linalg.norm(vectors[:, None, :] - vectors[None, :, :], axis=2)
    np.fill_diagonal(between, np.inf)
    scale = float(np.median(knn_score(np.sort(between, axis=1), model.config.image_k)))
    return _Bank(frame_of_row, np.concatenate(centre_of), vectors, scale)


def _allowed(variant: str, offsets: np.ndarray, in_frames: np.ndarray) -> list[np.ndarray]:
    """Per query tile, the bank rows its gallery may come from (offsets: (T, rows, 2) in strides)."""
    n_tiles, n_rows = offsets.shape[:2]
    if variant in ("same", "frame-same"):
        allowed = [np.flatnonzero((offsets[t] <= 0.5).all(1)) for t in range(n_tiles)]
    elif variant == "near":
        allowed = [np.flatnonzero((offsets[t] <= 1.5).all(1)) for t in range(n_tiles)]
    else:
        allowed = [np.arange(n_rows)] * n_tiles
    return [a[in_frames[a]] for a in allowed] if variant.startswith("frame") else allowed


def _score_frame(model: Spade, scorer: Scorer, bank: _Bank, uri: str, results: dict[str, dict]) -> None:
    """One test frame scored every way, into ``results``."""
    config, tiling = model.config, model.config.tiling
    frame = cut_frame(_as_image(uri, None, DEFAULT_MAX_PIXELS), tiling, model.preprocessor)
    features = extract_tiles(frame, model._forward, model.batch_size)
    centres, stride = _positions(tiling, frame.height, frame.width)
    offsets = np.abs(bank.centres_of_row[None, :, :] - centres[:, None, :]) / stride
    frame_d = np.linalg.norm(bank.frame_vectors - features.global_.astype(np.float64).mean(0), axis=1)
    in_frames = np.isin(bank.frame_of_row, np.argsort(frame_d)[:config.pixel_k])
    frame_knn = float(knn_score(np.sort(frame_d)[None, :], config.image_k)[0])
    n_rows = len(bank.frame_of_row)
    for variant in VARIANTS:
        exclude = None
        if variant != "any":
            lists = [_excluded(a, n_rows) for a in _allowed(variant, offsets, in_frames)]
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
    bank = _bank_layout(model, data.train)
    scorer = model._scorer(model._calibration_for_scoring())
    results: dict[str, dict] = {v: {"knn": [], "max": [], "maps": []} for v in VARIANTS}
    for sample in data.test:
        _score_frame(model, scorer, bank, sample.uri, results)
    labels = np.array([s.label for s in data.test], dtype=np.int64)
    masks = _ground_truth_masks(data, model, None, DEFAULT_MAX_PIXELS)
    report = {"dataset": args.dataset, "tile": args.tile, "overlap": model.config.tiling.overlap,
              "n_train": len(data.train), "n_test": len(data.test), "bank_tiles": len(bank.frame_of_row),
              "seconds": None, "variants": {}}
    for variant in VARIANTS:
        out = results[variant]
        scales = (bank.frame_scale, scorer.scales[1]) if variant.startswith("frame") and scorer.scales else scorer.scales
        scores = combine_image_scores(np.array(out["knn"]), np.array(out["max"]), model.config.image_scoring, scales)
        metrics = compute_metrics(scores, labels, out["maps"] if masks else None, masks)
        report["variants"][variant] = {k: round(float(metrics[k]), 4) for k in ("image_auroc", "pixel_auroc", "aupro")
                                       if metrics.get(k) is not None}
        print(variant, report["variants"][variant], flush=True)
    report["seconds"] = round(time.perf_counter() - started, 1)
    if args.json:
        Path(args.json).write_text(json.dumps(report, indent=1) + "\n")


if __name__ == "__main__":
    main()
