"""The decision: from an image's scores and its thresholds to "anomalous", a mask and a severity.

One rule, used by every place that decides or ranks (the score job's rows, ``evaluate``'s rates,
both reports), so a flagged image means the same thing everywhere.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

__all__ = ["Thresholds"]

_TINY = 1e-12  # a zero threshold still ranks by severity instead of dividing by zero


@dataclass(frozen=True)
class Thresholds:
    """The image-score and anomaly-map thresholds an image is judged by.

    An image is anomalous when its image score exceeds ``image`` or its map maximum exceeds
    ``pixel``; its mask is the map above ``pixel``.  Thresholds come from normal images only (the
    bank's calibration) unless the user sets them.
    """

    image: float
    pixel: float

    def is_anomalous(self, image_score: float | np.ndarray, pixel_max: float | np.ndarray) -> bool | np.ndarray:
        """Either rule: image score over the image threshold, or map maximum over the pixel threshold."""
        flagged = (np.asarray(image_score) > self.image) | (np.asarray(pixel_max) > self.pixel)
        return bool(flagged) if flagged.ndim == 0 else flagged

    def severity(self, image_score: float | np.ndarray, pixel_max: float | np.ndarray) -> float | np.ndarray:
        """How far past its thresholds an image is: max(score / image threshold, map max / pixel threshold).

        It exceeds 1 exactly when :meth:`is_anomalous` holds, so ranking by it puts every flagged
        image before every unflagged one, whichever rule flagged it.
        """
        value = np.maximum(np.asarray(image_score, dtype=np.float64) / max(self.image, _TINY),
                           np.asarray(pixel_max, dtype=np.float64) / max(self.pixel, _TINY))
        return float(value) if value.ndim == 0 else value

    def mask(self, anomaly_map: np.ndarray) -> np.ndarray:
        """The pixels whose anomaly score exceeds the pixel threshold (bool, the map's shape)."""
        return anomaly_map > self.pixel

    @property
    def heat_max(self) -> float:
        """The top of the heatmap colour scale: twice the pixel threshold (the same scale for every image)."""
        return 2.0 * self.pixel
