"""How an image's score is made from its retrieval distances and its anomaly map.

``knn`` is SPADE as published: the mean distance of the image's pooled vector to its nearest
normal images.  A pooled vector averages the whole image, so a defect covering a few percent of
it barely moves the score; the anomaly map sees it clearly.  ``knn+map`` adds the map's maximum
(the most anomalous pixel, PatchCore's image score) to the kNN distance, each divided by its
median over leave-one-out scores of normal bank images.  Dividing by normal statistics makes the
two terms unit-free and equally weighted on any data and backbone, without labels: a value of 1
is "as far as a typical normal image", and an image is scored by how far beyond typical it is in
either sense.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

__all__ = ["IMAGE_SCORINGS", "combine_image_scores", "knn_score", "normal_scales"]

IMAGE_SCORINGS = ("knn", "knn+map")


def knn_score(knn_distances: np.ndarray, image_k: int) -> np.ndarray:
    """Image-level SPADE score: mean distance to the ``image_k`` nearest normal global vectors.

    ``knn_distances`` is (B, k >= image_k) ascending.
    """
    if knn_distances.shape[1] < image_k:
        raise ValueError(f"need {image_k} neighbour distances, got {knn_distances.shape[1]}")
    return knn_distances[:, :image_k].mean(axis=1)


def normal_scales(knn_scores: Sequence[float], map_maxima: Sequence[float]) -> tuple[float, float]:
    """Medians of leave-one-out normal kNN scores and map maxima (the divisors of ``knn+map``).

    The median, not the mean, so that one odd image among the normal ones cannot set the scale.
    """
    knn_scale, map_scale = float(np.median(knn_scores)), float(np.median(map_maxima))
    if not (knn_scale > 0 and map_scale > 0):
        raise ValueError(f"normal score scales must be positive; got kNN {knn_scale}, map {map_scale}")
    return knn_scale, map_scale


def combine_image_scores(knn_scores: np.ndarray, map_maxima: np.ndarray, scoring: str,
                         scales: tuple[float, float] | None) -> np.ndarray:
    """Final image scores under ``scoring`` (one of :data:`IMAGE_SCORINGS`).

    ``scales`` are :func:`normal_scales` of the bank; ``knn+map`` cannot be computed without them.
    """
    knn_scores = np.asarray(knn_scores, dtype=np.float64)
    if scoring == "knn":
        return knn_scores.astype(np.float32)
    if scoring == "knn+map":
        if scales is None:
            raise ValueError("image scoring 'knn+map' needs the bank's normal score scales (a calibrated bank: "
                             "fit/build-bank with calibration samples > 0), or use image scoring 'knn'")
        knn_scale, map_scale = scales
        return (knn_scores / knn_scale + np.asarray(map_maxima, dtype=np.float64) / map_scale).astype(np.float32)
    raise ValueError(f"unknown image scoring {scoring!r}; choose one of {', '.join(IMAGE_SCORINGS)}")
