"""Scoring a frame as a grid of tiles: each tile is scored as SPADE scores an image, then the frame is assembled.

The tiles of a frame go through the one :class:`~spade_ray.method.scorer.Scorer` (retrieval,
correspondence, fusion) in chunks of ``chunk`` tiles, and each chunk's maps are added into the
frame's :class:`~spade_ray.method.tiling.Stitcher` at once, so a frame's working memory is its
decoded pixels, its tiles' network-size pixels, two float32 frame-size maps and one chunk's
features, however many tiles it has.

A bank row is a tile of a normal frame, and a query tile retrieves its nearest normal tiles from
*any* position of any normal frame: frames of different sizes have different grids, and a part
that is not placed to the pixel puts the same content at different positions, so the nearest
normal tiles by content are the right gallery on any data.  The frame's image score accounts
for every tile: the kNN part is its worst tile's (the largest tile kNN score) and the map part
the largest tile-map value, combined as an untiled image's are, so the calibration (which
assembles bank frames the same way, :func:`calibrate_frames`) and the scoring agree.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from dataclasses import dataclass

import numpy as np

from spade_ray.method.calibration import Calibration, CalibrationSource, calibrate
from spade_ray.method.config import SpadeConfig
from spade_ray.method.features import FeatureBatch
from spade_ray.method.ignore import IgnoreRegion
from spade_ray.method.image_scoring import combine_image_scores
from spade_ray.method.preprocess import Preprocessor
from spade_ray.method.scorer import Prediction, Scorer
from spade_ray.method.tiling import Box, Stitcher, Tiling, frame_key, tile_index

__all__ = ["FrameTiles", "calibrate_frames", "calibration_routine", "cut_frame", "extract_tiles", "score_frames"]

Forward = Callable[[np.ndarray], FeatureBatch]  # (n, S, S, 3) uint8 network-size pixels -> their features


@dataclass
class FrameTiles:
    """A frame cut into tiles: its own size, the tiles' boxes and their network-size pixels (T, S, S, 3) uint8."""

    height: int
    width: int
    boxes: list[Box]
    pixels: np.ndarray


def cut_frame(image: np.ndarray, tiling: Tiling, preprocessor: Preprocessor) -> FrameTiles:
    """An HxWx3 uint8 frame -> its tiles, each resized to the network input as a whole image would be."""
    height, width = image.shape[:2]
    boxes = tiling.boxes(height, width)
    pixels = np.stack([preprocessor.resize_rgb(np.ascontiguousarray(image[top:bottom, left:right]))
                       for top, left, bottom, right in boxes])
    return FrameTiles(height, width, boxes, pixels)


def extract_tiles(frame: FrameTiles, forward: Forward, chunk: int) -> FeatureBatch:
    """The features of all of a frame's tiles, the network run on ``chunk`` tiles at a time."""
    return FeatureBatch.concat([forward(frame.pixels[start:start + chunk]) for start in range(0, len(frame.boxes), chunk)])


@dataclass
class _FrameScore:
    knn: float
    map_max: float
    rows: np.ndarray
    amap: np.ndarray


def _tile_regions(scorer: Scorer, height: int | None, width: int | None, boxes: list[Box]) -> list[np.ndarray] | None:
    """The ignore region of each tile in the input frame (None without an ignore mask)."""
    if scorer.ignore is None:
        return None
    return [scorer.ignore.at_tile(scorer.geometry, height, width, box) for box in boxes]


def _score_frame(scorer: Scorer, frame: FrameTiles, forward: Forward, chunk: int) -> _FrameScore:
    stitcher = Stitcher(frame.height, frame.width, scorer.config.tiling.blend_width())
    knn, map_max, rows = -np.inf, -np.inf, np.zeros(0, dtype=np.int64)
    for start in range(0, len(frame.boxes), chunk):
        boxes = frame.boxes[start:start + chunk]
        matched = scorer.match(forward(frame.pixels[start:start + chunk]),
                               regions=_tile_regions(scorer, frame.height, frame.width, boxes))
        with scorer.timer.stage("stitch"):
            for tile_map, box in zip(matched.maps, boxes):
                stitcher.add(tile_map, box)
                map_max = max(map_max, float(tile_map.max()))
        worst = int(np.argmax(matched.knn_scores))
        if matched.knn_scores[worst] > knn:
            knn, rows = float(matched.knn_scores[worst]), matched.rows[worst]
    amap = stitcher.result()
    if scorer.ignore is not None:  # blending blurs the zeros' edges: zero the frame too
        amap = IgnoreRegion.apply(amap, scorer.ignore.at_output(scorer.geometry, frame.height, frame.width))
    return _FrameScore(knn, map_max, rows, amap)


def _frame_names(names: list[str], count: int) -> list[str]:
    """The first ``count`` distinct frames among tile names, in order."""
    frames = list(dict.fromkeys(frame_key(name) for name in names))
    return frames[:count]


def score_frames(scorer: Scorer, frames: Iterable[FrameTiles], forward: Forward, chunk: int) -> Prediction:
    """Image scores, frame-size maps and nearest normal frames of tiled frames (the tiled :meth:`Scorer.score`).

    ``neighbours`` name the normal frames of the nearest normal tiles of each frame's worst tile.
    """
    scored = [_score_frame(scorer, frame, forward, chunk) for frame in frames]
    knn = np.array([s.knn for s in scored], dtype=np.float64)
    image = combine_image_scores(knn, np.array([s.map_max for s in scored]), scorer.config.image_scoring, scorer.scales)
    names = scorer.index.neighbour_names(np.array([s.rows for s in scored]).reshape(len(scored), -1))
    neighbours = [_frame_names(n, scorer.config.image_k) for n in names]
    return Prediction(np.asarray(image, dtype=np.float32), [s.amap for s in scored], neighbours,
                      knn.astype(np.float32), scorer.thresholds)


def calibrate_frames(scorer: Scorer, bank: CalibrationSource, samples: int, target_fpr: float, batch_size: int,
                     progress: Callable[[int], None] | None = None) -> Calibration:
    """Leave-one-frame-out scores of up to ``samples`` normal frames of a tiled bank -> scales and thresholds.

    A bank tile is scored with every tile of its own frame left out (overlapping tiles of the same
    frame share pixels and would match themselves), and a frame's kNN score and map maximum are
    its tiles' largest, as :func:`score_frames` makes them.
    """
    rows = bank.calibration_rows(samples)
    keys = bank.keys(rows)
    groups: dict[str, list[int]] = {}
    tile_of: dict[int, int] = {}
    for row, key in zip(rows.tolist(), keys):
        groups.setdefault(frame_key(key), []).append(row)
        tile_of[row] = tile_index(key)
    # the tiles' boxes in a bank frame, which has the mask's size (as untiled calibration assumes too)
    grid = scorer.config.tiling.boxes(*scorer.ignore.shape) if scorer.ignore is not None else None
    if grid is not None and max(tile_of.values(), default=0) >= len(grid):
        raise ValueError(f"the bank's frames have more tiles than a frame of the ignore mask's size {len(grid)}: "
                         "the bank's frames must have the mask's size")
    knn_scores: list[float] = []
    maxima: list[float] = []
    for frame_rows in groups.values():
        own = np.asarray(frame_rows, dtype=np.int64)
        knn, top = -np.inf, -np.inf
        for start in range(0, len(own), batch_size):
            part = own[start:start + batch_size]
            regions = None if grid is None else _tile_regions(scorer, None, None, [grid[tile_of[r]] for r in part.tolist()])
            matched = scorer.match(bank.features(part), exclude=np.tile(own, (len(part), 1)), aggregated=True,
                                   regions=regions)
            knn = max(knn, float(np.max(matched.knn_scores)))
            top = max(top, max(float(m.max()) for m in matched.maps))
        knn_scores.append(knn)
        maxima.append(top)
        if progress:
            progress(1)
    config = scorer.config
    return Calibration.from_scores(knn_scores, maxima, target_fpr, config.image_scoring, config.calibration_settings())


def calibration_routine(config: SpadeConfig) -> Callable[..., Calibration]:
    """How a bank made with ``config`` is calibrated: frame by frame when tiled, else image by image (``calibrate``)."""
    return calibrate_frames if config.tile else calibrate
