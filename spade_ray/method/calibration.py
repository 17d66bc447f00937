"""Normal-only calibration: leave-one-out scores of bank images -> score scales and thresholds.

Written once for every bank: the in-process model and the served, sharded bank both hand their
images to :func:`calibrate` through the small :class:`CalibrationSource` interface, and both score
them with the same :class:`~spade_ray.method.scorer.Scorer`.
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Protocol

import numpy as np

from spade_ray.method.config import LEGACY_SCORING, SpadeConfig
from spade_ray.method.features import FeatureBatch
from spade_ray.method.image_scoring import combine_image_scores, normal_scales
from spade_ray.method.tiling import frame_key

if TYPE_CHECKING:
    from spade_ray.method.scorer import Scorer

__all__ = ["Calibration", "CalibrationSource", "calibrate", "calibration_rows"]


@dataclass(frozen=True)
class Calibration:
    """Normal-only thresholds and score scales from leave-one-out scoring of the bank's own images.

    ``knn_scores`` and ``pixel_maxima`` are the leave-one-out kNN scores and map maxima of up to
    ``n_images`` bank images, scored with ``settings`` (the calibration settings in force; scores
    made with other settings need another calibration).  Their medians are the scales of the
    ``knn+map`` image score; ``image_threshold`` is the (1 - target_fpr) quantile of the normal
    image scores under ``image_scoring`` and ``pixel_threshold`` the same quantile of the map
    maxima, so a normal image is flagged, and its mask is non-empty, with probability about
    ``target_fpr``.
    """

    target_fpr: float
    n_images: int
    image_threshold: float
    pixel_threshold: float
    image_scores: list[float] = field(default_factory=list)
    pixel_maxima: list[float] = field(default_factory=list)
    knn_scores: list[float] = field(default_factory=list)
    image_scoring: str = "knn"
    knn_scale: float | None = None
    map_scale: float | None = None
    settings: dict[str, Any] | None = None

    @classmethod
    def from_scores(cls, knn_scores: Sequence[float], pixel_maxima: Sequence[float], target_fpr: float,
                    image_scoring: str = "knn", settings: dict[str, Any] | None = None) -> Calibration:
        """Scales and thresholds from leave-one-out normal kNN scores and map maxima."""
        knn = [float(v) for v in knn_scores]
        maxima = [float(v) for v in pixel_maxima]
        scales = normal_scales(knn, maxima)
        image = combine_image_scores(np.asarray(knn), np.asarray(maxima), image_scoring, scales)
        q = 1.0 - target_fpr
        return cls(target_fpr, len(knn), float(np.quantile(image, q)), float(np.quantile(maxima, q)),
                   [float(v) for v in image], maxima, knn, image_scoring, scales[0], scales[1],
                   dict(settings) if settings is not None else None)

    @property
    def scales(self) -> tuple[float, float] | None:
        return (self.knn_scale, self.map_scale) if self.knn_scale and self.map_scale else None

    def for_image_scoring(self, image_scoring: str) -> Calibration:
        """The same leave-one-out scores with the image threshold of another image scoring."""
        if image_scoring == self.image_scoring:
            return self
        if not self.knn_scores:
            raise ValueError("this calibration predates image scorings (no leave-one-out kNN scores); rebuild the bank")
        return Calibration.from_scores(self.knn_scores, self.pixel_maxima, self.target_fpr, image_scoring, self.settings)

    def matches(self, config: SpadeConfig) -> bool:
        """Whether these normal scores were made with ``config``'s calibration settings."""
        if self.settings is None:
            return False
        return all(self.settings.get(name, LEGACY_SCORING.get(name)) == value
                   for name, value in config.calibration_settings().items())


def calibration_rows(keys: Sequence[str], samples: int) -> np.ndarray:
    """Rows (ascending) of the up to ``samples`` bank images to score leave-one-out: those whose
    ``sha256(key)`` is smallest.

    A hash order is a uniform sample that depends on nothing but the images themselves: the same
    bank fitted in process or built into any number of shards, in any order, calibrates on the
    same images and so gets the same thresholds and score scales.  Choosing among the candidates
    each shard proposes (its own smallest ``samples``) gives the bank-wide choice.  In a tiled
    bank (keys ``frame#tileN``) the sample is of frames: every tile row of the chosen frames.
    """
    frames = [frame_key(str(key)) for key in keys]
    digests = {frame: hashlib.sha256(frame.encode("utf-8")).digest() for frame in frames}
    chosen = set(sorted(digests, key=digests.__getitem__)[: max(0, samples)])
    return np.asarray([row for row, frame in enumerate(frames) if frame in chosen], dtype=np.int64)


class CalibrationSource(Protocol):
    """A bank as calibration sees it: which images to score, and those images as queries."""

    def calibration_rows(self, samples: int) -> np.ndarray:
        """Bank rows (ascending) of the up to ``samples`` images to score leave-one-out."""
        ...

    def keys(self, rows: np.ndarray) -> list[str]:
        """The bank keys (image ids; a tiled bank's ``frame#tileN``) of ``rows``, in that order."""
        ...

    def features(self, rows: np.ndarray) -> FeatureBatch:
        """The images of ``rows``, in that order, as queries: global vectors and float32 pyramids in the
        served feature space (already aggregated), exactly as the bank holds them."""
        ...


def calibrate(scorer: Scorer, bank: CalibrationSource, samples: int, target_fpr: float, batch_size: int,
              progress: Callable[[int], None] | None = None) -> Calibration:
    """Score up to ``samples`` bank images leave-one-out (each without itself) -> scales and thresholds.

    Each image is scored as the bank holds it, so an in-process model and a sharded bank of the
    same images calibrate on identical inputs and reach identical thresholds.
    """
    rows = bank.calibration_rows(samples)
    knn_scores: list[float] = []
    maxima: list[float] = []
    for begin in range(0, len(rows), batch_size):
        batch_rows = rows[begin:begin + batch_size]
        matched = scorer.match(bank.features(batch_rows), exclude=batch_rows, aggregated=True)
        knn_scores.extend(float(v) for v in matched.knn_scores)
        maxima.extend(float(m.max()) for m in matched.maps)
        if progress:
            progress(len(batch_rows))
    config = scorer.config
    return Calibration.from_scores(knn_scores, maxima, target_fpr, config.image_scoring, config.calibration_settings())
