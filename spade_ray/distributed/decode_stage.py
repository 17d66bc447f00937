"""Read + decode + resize to the network input, in Ray Data tasks (no model needed).

A batch's files are read concurrently (:func:`~spade_ray.storage.urls.read_many`): on an object
store each read is a round trip of tens of milliseconds, and one after another they would cost
the batch that many.  Each input is read once: when the score job may draw an overlay, the
encoded file travels on with the batch (compressed, as stored) so the scorer never fetches it
again; decoded full-size frames never enter the object store.

A bad image never fails its batch: it becomes a row with ``status="error"`` and a reason naming
the input, carried through to the job's results, so every input ends with exactly one row.  A
store that stays unreachable or throttling past the retry budget
(:class:`~spade_ray.storage.retry.StorageUnavailableError`) is no fact about an image, so it fails
the batch instead: the job stops, the batch has no row, and the rerun reads it again.

A tiled job (``whole_frames``) passes each frame's file on instead of network-size pixels: the
actor cuts the frame into tiles itself (:func:`~spade_ray.method.tiled_scoring.cut_frame`, as
the in-process model does), so the object store carries the compressed file rather than every
tile's pixels.  The frame is decoded here all the same, so a bad frame is an error row before any
actor sees it; the actor decodes it again, which costs little against scoring its tiles.

Each batch carries ``storage_retries``, the retries its reads needed (on its first row), for the job's summary.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from spade_ray.errors import error_reason
from spade_ray.method.preprocess import Preprocessor
from spade_ray.storage.images import DEFAULT_MAX_PIXELS, decode_image
from spade_ray.storage.retry import StorageUnavailableError, retries_so_far
from spade_ray.storage.urls import read_many

__all__ = ["Batch", "DecodeImages", "batch_retries", "decoded_file"]

Batch = dict[str, np.ndarray]


def batch_retries(n: int, retries: int) -> np.ndarray:
    """A batch's storage retries as a column (all on the first row), so they travel with its rows and add up."""
    column = np.zeros(n, dtype=np.int64)
    if n:
        column[0] = retries
    return column


def decoded_file(batch: Batch, i: int, max_pixels: int) -> np.ndarray:
    """Image ``i`` of a decoded batch, decoded again from the file the decode stage passed on (no second read)."""
    return decode_image(batch["encoded"][i], uri=str(batch["uri"][i]), max_pixels=max_pixels)


class DecodeImages:
    """Read a batch's files at once, decode and resize each; with ``keep_encoded`` also pass the files on;
    with ``whole_frames`` (tiling) pass the files on instead of the resized pixels."""

    def __init__(self, preprocessor: Preprocessor, storage_options: dict[str, Any] | None = None,
                 max_pixels: int = DEFAULT_MAX_PIXELS, keep_encoded: bool = False, whole_frames: bool = False) -> None:
        self.preprocessor = preprocessor
        self.storage_options = storage_options
        self.max_pixels = max_pixels
        self.keep_encoded = keep_encoded or whole_frames
        self.whole_frames = whole_frames

    def __call__(self, batch: Batch) -> Batch:
        n = len(batch["uri"])
        size = 0 if self.whole_frames else self.preprocessor.image_size
        pixels = np.zeros((n, size, size, 3), dtype=np.uint8)
        heights = np.zeros(n, dtype=np.int32)
        widths = np.zeros(n, dtype=np.int32)
        status = np.full(n, "ok", dtype=object)
        error = np.full(n, "", dtype=object)
        encoded = np.full(n, b"", dtype=object)
        uris = [str(uri) for uri in batch["uri"]]
        retries_before = retries_so_far()
        files = read_many(uris, self.storage_options)
        unavailable = next((data for data in files if isinstance(data, StorageUnavailableError)), None)
        if unavailable is not None:
            raise unavailable  # the store, not the image: no row (see the module docstring)
        for i, (uri, data) in enumerate(zip(uris, files)):
            if isinstance(data, Exception):  # unreadable: the reason names the input, whatever the store said
                reason = error_reason(data)
                status[i], error[i] = "error", reason if uri in reason else f"{reason} ({uri})"
                continue
            try:
                image = decode_image(data, uri=uri, max_pixels=self.max_pixels)
                heights[i], widths[i] = image.shape[:2]
                if not self.whole_frames:
                    pixels[i] = self.preprocessor.resize_rgb(image)
                if self.keep_encoded:
                    encoded[i] = data
            except Exception as exc:  # one bad image never kills the batch
                status[i], error[i] = "error", error_reason(exc)
        out = {**batch, "pixels": pixels, "height": heights, "width": widths, "status": status, "error": error,
               "storage_retries": batch_retries(n, retries_so_far() - retries_before)}
        if self.keep_encoded:
            out["encoded"] = encoded
        return out
