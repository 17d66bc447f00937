"""High-resolution frames as a grid of network-size tiles, and tile maps stitched back into one frame map.

Resizing a 5000 x 4000 frame to the network's 224 px input divides its resolution by 20, and a
defect of a few hundred pixels becomes a pixel or two that no feature can see.  With a
:class:`Tiling`, a frame (optionally rescaled by ``scale`` first) is cut into tiles of ``tile``
pixels that overlap by ``overlap`` pixels; each tile is resized to the network input, so it is
seen at (nearly) native resolution, and it is scored as SPADE scores an image.  The tiles' maps
are put back where they came from with weights that fall linearly towards each tile's edges over
the overlap (normalised by the summed weights), so neighbouring tiles blend with no seam and the
edge pixels of a tile, whose features see zero padding, count least.

Everything is computed in the frame's own pixel coordinates (a tile box is ``tile / scale``
source pixels wide), so maps, masks, heatmaps and overlays come out at the frame's own size and
nothing at the scaled size is ever materialised.  A side no longer than one tile is one span over
the whole side, so a frame no larger than one tile is exactly one tile: the whole frame resized to
the input, which is the untiled path.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

__all__ = ["NO_TILING", "TILE_SEPARATOR", "Box", "Stitcher", "Tiling", "frame_key", "stitch", "tile_index", "tile_key"]

Box = tuple[int, int, int, int]  # (top, left, bottom, right) in the frame's own pixels

# A tile's bank key is its frame's key, this separator and the tile's number; the frame's key is
# everything before the last separator (so a frame's own key may contain it).
TILE_SEPARATOR = "#tile"


def tile_key(frame: str, index: int) -> str:
    """The bank key (id / name) of tile ``index`` of ``frame``."""
    return f"{frame}{TILE_SEPARATOR}{index}"


def frame_key(key: str) -> str:
    """The frame a tile key belongs to (a key with no tile part is its own frame)."""
    head, sep, tail = key.rpartition(TILE_SEPARATOR)
    return head if sep and tail.isdigit() else key


def tile_index(key: str) -> int:
    """The number of a tile key's tile in its frame's grid (:meth:`Tiling.boxes` order)."""
    head, sep, tail = key.rpartition(TILE_SEPARATOR)
    if not (sep and tail.isdigit()):
        raise ValueError(f"{key!r} is not a tile key (frame{TILE_SEPARATOR}N)")
    return int(tail)


def _spans(length: int, extent: int, overlap: int) -> list[tuple[int, int]]:
    """Evenly spread windows of ``extent`` covering ``length``, adjacent ones sharing at least ``overlap``."""
    if length <= extent:
        return [(0, length)]
    count = math.ceil((length - overlap) / (extent - overlap))
    starts = [round(i * (length - extent) / (count - 1)) for i in range(count)]
    return [(s, s + extent) for s in starts]


@dataclass(frozen=True)
class Tiling:
    """How frames are cut: tiles of ``tile`` px (0: no tiling) overlapping by ``overlap`` px, after scaling by ``scale``."""

    tile: int = 0
    overlap: int = 0
    scale: float = 1.0

    def __post_init__(self) -> None:
        if self.tile != 0 and self.tile < 32:
            raise ValueError(f"tile must be 0 (no tiling) or >= 32 px; got {self.tile}")
        if not 0 <= self.overlap <= self.tile // 2:
            raise ValueError(f"tile overlap must be between 0 and half the tile ({self.tile // 2} px); got {self.overlap}")
        if not (self.scale > 0 and math.isfinite(self.scale)):
            raise ValueError(f"scale must be a positive number; got {self.scale}")

    @property
    def enabled(self) -> bool:
        return self.tile > 0

    def boxes(self, height: int, width: int) -> list[Box]:
        """The tiles of a (height, width) frame, row by row, in its own pixels."""
        if height < 1 or width < 1:
            raise ValueError(f"cannot tile an empty frame ({height}x{width})")
        extent = max(1, round(self.tile / self.scale))
        overlap = min(round(self.overlap / self.scale), extent - 1)
        return [(top, left, bottom, right)
                for top, bottom in _spans(height, extent, overlap)
                for left, right in _spans(width, extent, overlap)]

    def settings(self) -> dict[str, Any]:
        """The tiling as the named settings of configs, feature metadata and manifests (``tile``, ``tile_overlap``, ``scale``)."""
        return {"tile": self.tile, "tile_overlap": self.overlap, "scale": self.scale}

    @classmethod
    def from_settings(cls, settings: Mapping[str, Any]) -> Tiling:
        """The tiling of :meth:`settings` (as read back from JSON)."""
        return cls(int(settings["tile"]), int(settings["tile_overlap"]), float(settings["scale"]))

    def blend_width(self) -> int:
        """Over how many frame pixels a tile's weight ramps up from its edge."""
        return max(1, round(self.overlap / self.scale))


NO_TILING = Tiling()  # every frame resized whole to the network input: one bank row per image


def _ramp(length: int, width: int) -> np.ndarray:
    """1 in the middle, falling linearly to 1/(width+1) at both ends (never 0: a frame border has one tile)."""
    position = np.minimum(np.arange(length), np.arange(length)[::-1]).astype(np.float32)
    return np.minimum(1.0, (position + 1.0) / (width + 1.0)).astype(np.float32)


class Stitcher:
    """Accumulates tile maps into one float32 map of a (height, width) frame (weighted sum and summed weights)."""

    def __init__(self, height: int, width: int, blend: int) -> None:
        self.shape = (height, width)
        self.blend = blend
        self.total = np.zeros(self.shape, dtype=np.float32)
        self.weight = np.zeros(self.shape, dtype=np.float32)

    def add(self, tile_map: np.ndarray, box: Box) -> None:
        """Put one tile's map (any size; resized bilinearly to the box) in its place."""
        top, left, bottom, right = box
        size = (bottom - top, right - left)
        values = np.asarray(tile_map, dtype=np.float32)
        if values.shape != size:
            tensor = torch.from_numpy(np.ascontiguousarray(values))[None, None]
            values = F.interpolate(tensor, size=size, mode="bilinear", align_corners=False)[0, 0].numpy()
        weight = np.outer(_ramp(size[0], self.blend), _ramp(size[1], self.blend))
        self.total[top:bottom, left:right] += values * weight
        self.weight[top:bottom, left:right] += weight

    def result(self) -> np.ndarray:
        """The stitched map (every pixel is covered by some tile, so every weight is positive)."""
        return np.divide(self.total, self.weight, out=self.total)


def stitch(tile_maps: Sequence[np.ndarray], boxes: Sequence[Box], height: int, width: int, blend: int) -> np.ndarray:
    """The frame map of a whole frame's tile maps (see :class:`Stitcher`)."""
    stitcher = Stitcher(height, width, blend)
    for tile_map, box in zip(tile_maps, boxes, strict=True):
        stitcher.add(tile_map, box)
    return stitcher.result()
