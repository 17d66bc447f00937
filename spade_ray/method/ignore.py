"""Ignore regions: parts of the camera frame that must never count (printed serials, fixtures, timestamps).

An :class:`IgnoreRegion` is a bool mask at the camera's frame size (True = ignore).  Anomaly-map
values under it are set to zero, the smallest distance there is, before anything reads the map:
the image score's map maximum, the calibration's normal maxima, the thresholded mask, heatmaps and
overlays.  The scorer applies it twice with one rule, in the two frames a map lives in:

* the network-input frame (:meth:`IgnoreRegion.at_input`): the mask goes through the same geometry
  as the image (``full``: the whole frame to S x S; ``paper``: shorter side to 256, centre crop 224);
* an image's output frame (:meth:`IgnoreRegion.at_output`): the frame of its saved mask and heatmap.

Resizing is conservative: a pixel of the resized mask is ignored when *any* frame pixel whose
centre falls in it is ignored (nearest neighbour when enlarging), so every ignored frame pixel
stays ignored and a thin painted stroke (a 2 px timestamp line on a 2k frame) survives the
reduction to 224 px; plain nearest-neighbour reduction would drop it.

Cameras have fixed frames, so an image of another size than the mask is taken to show the same
field of view: the mask is resized to the image's size first (the same conservative rule).  Pure
numpy and PIL: no storage here (the bank reads and verifies the PNG, :mod:`spade_ray.bank.ignore_mask`).
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass, field

import numpy as np
from PIL import Image

from spade_ray.method.preprocess import PAPER_CROP, PAPER_RESIZE, Preprocessor, _center_crop_box, _shorter_side_size

__all__ = ["IgnoreRegion", "resize_any"]


def resize_any(mask: np.ndarray, height: int, width: int) -> np.ndarray:
    """A bool mask resized to (height, width): a pixel is set when any source pixel centred in it is set.

    Per axis, enlarging is nearest neighbour and reducing keeps any covered pixel (PIL's box filter
    averages the source pixels whose centres it covers, then ``> 0``): no set pixel is ever lost.
    """
    mask = np.asarray(mask, dtype=bool)
    if mask.shape == (height, width):
        return mask
    out = Image.fromarray(mask.astype(np.uint8) * 255)
    h, w = mask.shape
    if height > h or width > w:  # enlarge the growing axes first, by nearest neighbour
        out = out.resize((max(w, width), max(h, height)), Image.Resampling.NEAREST)
    if out.size != (width, height):
        out = out.resize((width, height), Image.Resampling.BOX)
    return np.asarray(out) > 0


@dataclass(frozen=True, eq=False)
class IgnoreRegion:
    """A bool (H, W) mask at the camera's frame size; True marks pixels whose map values never count."""

    mask: np.ndarray
    _cache: dict = field(default_factory=dict, repr=False)

    def __post_init__(self) -> None:
        mask = np.array(self.mask, dtype=bool, copy=True)
        if mask.ndim != 2 or min(mask.shape) < 1:
            raise ValueError(f"an ignore mask is a 2-D (height, width) array; got shape {np.shape(self.mask)}")
        if mask.all():
            raise ValueError("the ignore mask covers the whole frame: nothing would ever be scored")
        mask.setflags(write=False)
        object.__setattr__(self, "mask", mask)

    @property
    def shape(self) -> tuple[int, int]:
        return int(self.mask.shape[0]), int(self.mask.shape[1])

    @property
    def sha256(self) -> str:
        """Identity of the region (shape and pixels): what a calibration was made with."""
        digest = hashlib.sha256(f"{self.shape}".encode())
        digest.update(np.packbits(self.mask).tobytes())
        return digest.hexdigest()

    def _frame(self, height: int | None, width: int | None) -> np.ndarray:
        """The mask on an image of this size (the mask's own frame when the size is not known)."""
        return self.mask if height is None or width is None else resize_any(self.mask, height, width)

    def at_input(self, preprocessor: Preprocessor, height: int | None = None, width: int | None = None) -> np.ndarray:
        """The region in the network-input frame (S x S) for an image of (height, width).

        ``full`` maps the whole frame to S x S whatever the image's size; ``paper``'s crop depends on
        the aspect ratio, so there the image's size matters (None: the mask's own frame, e.g. for
        the bank's images in calibration, which come from the same camera).
        """
        if preprocessor.protocol != "paper":
            height = width = None
        key = ("input", preprocessor.protocol, preprocessor.image_size, height, width)
        if key not in self._cache:
            frame = self._frame(height, width)
            if preprocessor.protocol == "paper":
                w, h = _shorter_side_size(frame.shape[1], frame.shape[0], PAPER_RESIZE)
                left, top, right, bottom = _center_crop_box(w, h, PAPER_CROP)
                inside = resize_any(frame, h, w)[top:bottom, left:right]
            else:
                inside = resize_any(frame, preprocessor.image_size, preprocessor.image_size)
            self._cache[key] = inside
        return self._cache[key]

    def at_tile(self, preprocessor: Preprocessor, height: int | None, width: int | None,
                box: tuple[int, int, int, int]) -> np.ndarray:
        """The region in the network-input frame (S x S) of one tile ``box`` of a (height, width) frame.

        The mask is put on the frame first (None: the mask's own frame, e.g. a bank frame in
        calibration), then the tile's part of it goes to S x S as the tile's pixels do.
        """
        key = ("tile", preprocessor.image_size, height, width, box)
        if key not in self._cache:
            frame = self._frame(height, width)
            top, left, bottom, right = box
            if bottom > frame.shape[0] or right > frame.shape[1]:
                raise ValueError(f"tile {box} lies outside the ignore mask's frame {frame.shape}: the bank's frames "
                                 "must have the mask's size")
            self._cache[key] = resize_any(frame[top:bottom, left:right], preprocessor.image_size, preprocessor.image_size)
        return self._cache[key]

    def at_output(self, preprocessor: Preprocessor, height: int, width: int) -> np.ndarray:
        """The region in the output frame of an image of (height, width): its own size (``full``), the crop (``paper``)."""
        if preprocessor.protocol == "paper":
            return self.at_input(preprocessor, height, width)
        key = ("output", height, width)
        if key not in self._cache:
            self._cache[key] = resize_any(self.mask, height, width)
        return self._cache[key]

    @staticmethod
    def apply(amap: np.ndarray, ignored: np.ndarray) -> np.ndarray:
        """``amap`` with zero where ``ignored`` (same shape): ignored pixels never count."""
        if amap.shape != ignored.shape:
            raise ValueError(f"anomaly map {amap.shape} and ignore region {ignored.shape} differ in size")
        return np.where(ignored, np.float32(0), amap).astype(np.float32, copy=False)
