"""Read + decode + resize to the network input, in Ray Data tasks (no model needed).

A bad image never fails its batch: it becomes a row with ``status="error"`` and a reason naming
the input, carried through to the job's results, so every input ends with exactly one row.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from spade_ray.method.preprocess import Preprocessor
from spade_ray.storage.images import DEFAULT_MAX_PIXELS, load_image

__all__ = ["Batch", "DecodeImages", "error_reason"]

Batch = dict[str, np.ndarray]


def error_reason(exc: BaseException) -> str:
    text = str(exc).splitlines()[0] if str(exc) else ""
    return f"{type(exc).__name__}: {text}" if text else type(exc).__name__


class DecodeImages:
    """Read + decode + resize to the network input, in Ray Data read tasks (no model needed)."""

    def __init__(self, preprocessor: Preprocessor, storage_options: dict[str, Any] | None = None,
                 max_pixels: int = DEFAULT_MAX_PIXELS) -> None:
        self.preprocessor = preprocessor
        self.storage_options = storage_options
        self.max_pixels = max_pixels

    def __call__(self, batch: Batch) -> Batch:
        n = len(batch["uri"])
        size = self.preprocessor.image_size
        pixels = np.zeros((n, size, size, 3), dtype=np.uint8)
        heights = np.zeros(n, dtype=np.int32)
        widths = np.zeros(n, dtype=np.int32)
        status = np.full(n, "ok", dtype=object)
        error = np.full(n, "", dtype=object)
        for i, uri in enumerate(batch["uri"]):
            try:
                image = load_image(str(uri), self.storage_options, max_pixels=self.max_pixels)
                heights[i], widths[i] = image.shape[:2]
                pixels[i] = self.preprocessor.resize_rgb(image)
            except Exception as exc:  # one bad image never kills the batch
                status[i], error[i] = "error", error_reason(exc)
        return {**batch, "pixels": pixels, "height": heights, "width": widths, "status": status, "error": error}


