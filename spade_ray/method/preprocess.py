"""Geometry between an image as stored and the square tensor the backbone sees.

Two protocols:

* ``full`` (default): the whole image is resized to ``image_size`` x ``image_size`` with no crop,
  because a defect at the border of a part must not be cut away.  The anomaly map is resized back
  to the image's own size, and metrics are computed at full frame.
* ``paper``: the published SPADE protocol, for comparison with published numbers: resize the
  shorter side to 256 (Lanczos, as PIL's ANTIALIAS in the reference code), centre-crop 224; the
  map stays in the 224 x 224 crop frame and masks get the same resize (nearest) and crop.

The geometry is a plain value (:class:`Preprocessor`), so the in-process model, the Ray extract
and score jobs and the evaluator all transform images and masks identically.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

Protocol = Literal["full", "paper"]
PROTOCOLS: tuple[str, ...] = ("full", "paper")

PAPER_RESIZE = 256
PAPER_CROP = 224


def _center_crop_box(width: int, height: int, crop: int) -> tuple[int, int, int, int]:
    # torchvision's CenterCrop rounding, so the crop matches the reference implementation
    left = int(round((width - crop) / 2.0))
    top = int(round((height - crop) / 2.0))
    return left, top, left + crop, top + crop


def _shorter_side_size(width: int, height: int, size: int) -> tuple[int, int]:
    # torchvision's Resize(int) semantics: the shorter side becomes `size`, aspect ratio kept
    if width <= height:
        return size, int(size * height / width)
    return int(size * width / height), size


def _is_grey(image: np.ndarray) -> bool:
    return bool(np.array_equal(image[:, :, 0], image[:, :, 1]) and np.array_equal(image[:, :, 1], image[:, :, 2]))


@dataclass(frozen=True)
class Preprocessor:
    """Turns decoded RGB images into normalised network input, and maps back into output frames."""

    image_size: int = 224
    protocol: Protocol = "full"
    mean: tuple[float, float, float] = (0.5, 0.5, 0.5)
    std: tuple[float, float, float] = (0.5, 0.5, 0.5)

    def __post_init__(self) -> None:
        if self.protocol not in PROTOCOLS:
            raise ValueError(f"unknown protocol {self.protocol!r}; choose one of {', '.join(PROTOCOLS)}")
        if self.protocol == "paper" and self.image_size != PAPER_CROP:
            raise ValueError(f"--protocol paper fixes the input at {PAPER_CROP} px; got image_size={self.image_size}")
        if self.image_size < 32 or self.image_size % 16:
            raise ValueError(f"image_size must be a multiple of 16 and >= 32; got {self.image_size}")

    def resize_rgb(self, image: np.ndarray) -> np.ndarray:
        """HxWx3 uint8 -> image_size x image_size x 3 uint8, the pixels the network will see.

        A grey image (three equal channels: most inspection cameras are monochrome) is resized as
        one channel and repeated: PIL filters each band alike, so the pixels are bitwise the same
        (tested) for a third of the filtering (the paper protocol's Lanczos: 2.0 -> 1.2 ms per
        magnetic_tile image).
        """
        if _is_grey(image):
            return np.repeat(self._resize(Image.fromarray(np.ascontiguousarray(image[:, :, 0])))[:, :, None], 3, axis=2)
        return self._resize(Image.fromarray(image))

    def _resize(self, pil: Image.Image) -> np.ndarray:
        if self.protocol == "paper":
            pil = pil.resize(_shorter_side_size(*pil.size, PAPER_RESIZE), Image.Resampling.LANCZOS)
            return np.asarray(pil.crop(_center_crop_box(*pil.size, PAPER_CROP)))
        return np.asarray(pil.resize((self.image_size, self.image_size), Image.Resampling.BILINEAR, reducing_gap=None))

    def to_tensor(self, images: list[np.ndarray]) -> torch.Tensor:
        """A batch of HxWx3 uint8 images -> normalised float tensor (B, 3, S, S)."""
        return self.normalize(np.stack([self.resize_rgb(im) for im in images]))

    def normalize(self, resized: np.ndarray) -> torch.Tensor:
        """(B, S, S, 3) uint8 from :meth:`resize_rgb` -> normalised float tensor (B, 3, S, S).

        Split from resizing so a distributed job can resize where it decodes and ship small
        fixed-size arrays to the feature extractors.
        """
        tensor = torch.from_numpy(np.ascontiguousarray(resized)).permute(0, 3, 1, 2).float() / 255.0
        mean = torch.tensor(self.mean, dtype=torch.float32).view(1, 3, 1, 1)
        std = torch.tensor(self.std, dtype=torch.float32).view(1, 3, 1, 1)
        return (tensor - mean) / std

    def output_shape(self, height: int, width: int) -> tuple[int, int]:
        """Shape of the anomaly map (and the frame metrics use) for an image of this size."""
        if self.protocol == "paper":
            return PAPER_CROP, PAPER_CROP
        return height, width

    def map_to_output(self, amap: np.ndarray, height: int, width: int) -> np.ndarray:
        """An anomaly map at network resolution -> the output frame of an image of this size."""
        out_h, out_w = self.output_shape(height, width)
        if amap.shape == (out_h, out_w):
            return amap.astype(np.float32, copy=False)
        tensor = torch.from_numpy(np.ascontiguousarray(amap, dtype=np.float32))[None, None]
        return F.interpolate(tensor, size=(out_h, out_w), mode="bilinear", align_corners=False)[0, 0].numpy()

    def image_to_output(self, image: np.ndarray) -> np.ndarray:
        """An HxWx3 image -> the frame of its anomaly map, so overlays line up pixel for pixel.

        ``full``: the image itself; ``paper``: the same resize and centre crop the network saw.
        """
        return image if self.protocol != "paper" else self.resize_rgb(image)

    def mask_to_output(self, mask: np.ndarray) -> np.ndarray:
        """A ground-truth mask at image size -> the same frame as :meth:`map_to_output` (bool)."""
        if self.protocol != "paper":
            return mask.astype(bool, copy=False)
        pil = Image.fromarray(mask.astype(np.uint8) * 255)
        pil = pil.resize(_shorter_side_size(*pil.size, PAPER_RESIZE), Image.Resampling.NEAREST)
        return np.asarray(pil.crop(_center_crop_box(*pil.size, PAPER_CROP))) > 127
