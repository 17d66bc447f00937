"""Anomaly-detection metrics: image/pixel AUROC, F1-max and the MVTec AD AUPRO.

Plain numpy/scipy, no Ray: the job gathers scores, maps and masks on one process and calls
:func:`compute_metrics` once.

Every metric here is read off one exact curve. The positives (defective images, or defective
pixels) are few, the negatives are many, so instead of argsorting every pixel (an int64 index
per pixel plus sorted copies) we sort the negative scores once, in place, and find with a binary
search, for each distinct positive score ``v``, how many negatives score ``>= v`` and ``> v``.
Between two distinct positive scores the true-positive count is constant, so those points give
the whole ROC polyline (the same one sklearn's ``roc_curve`` walks, ties included): pixel AUROC,
pixel F1-max and AUPRO all come from it, and the only full-size array is the float32 negatives.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
from scipy import ndimage

__all__ = [
    "aupro",
    "compute_metrics",
    "f1_max",
    "image_auroc",
    "pixel_auroc",
    "pixel_f1_max",
    "pixel_roc_curve",
    "pro_curve",
    "roc_curve",
]

# 8-connectivity, as the MVTec AD reference code labels ground-truth regions.
_REGION_STRUCTURE = np.ones((3, 3), dtype=bool)


@dataclass(frozen=True)
class _Ranked:
    """Scores split by class and ranked, ready to read any threshold curve off.

    ``negatives`` is sorted ascending. ``values`` are the distinct positive scores, descending;
    ``tp[k]`` counts positives scoring ``>= values[k]`` and ``region_tp[k]`` sums their
    region weights (``1 / region area``; only for AUPRO).
    """

    negatives: np.ndarray
    n_pos: int
    values: np.ndarray
    tp: np.ndarray
    region_tp: np.ndarray | None = None
    n_regions: int = 0

    @property
    def n_neg(self) -> int:
        return int(self.negatives.size)

    def fp_at_values(self) -> tuple[np.ndarray, np.ndarray]:
        """Negatives scoring ``> values[k]`` and ``>= values[k]`` (flagged: ``score >= t``)."""
        n = self.n_neg
        strict = n - np.searchsorted(self.negatives, self.values, side="right")
        inclusive = n - np.searchsorted(self.negatives, self.values, side="left")
        return strict, inclusive

    def polyline(self, y: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """The exact (false positives, y) curve as the threshold falls from +inf to -inf.

        Lowering the threshold onto ``values[k]`` first admits the negatives strictly above it
        (y unchanged, a horizontal run), then everything tied at ``values[k]`` at once (a
        diagonal when negatives tie with positives, which is how ``roc_curve`` treats ties).
        """
        strict, inclusive = self.fp_at_values()
        k = self.values.size
        x_out = np.empty(2 * k + 2, dtype=np.int64)
        y_out = np.empty(2 * k + 2, dtype=np.float64)
        x_out[0], y_out[0] = 0, 0.0
        x_out[1:-1:2], x_out[2:-1:2] = strict, inclusive
        y_out[1:-1:2] = np.concatenate(([0.0], y[:-1]))
        y_out[2:-1:2] = y
        x_out[-1], y_out[-1] = self.n_neg, y[-1]
        return x_out, y_out


def _rank(
    negatives: np.ndarray,
    positives: np.ndarray,
    weights: np.ndarray | None = None,
    n_regions: int = 0,
) -> _Ranked:
    """Sort ``negatives`` in place (the caller hands over a private copy) and rank positives."""
    negatives.sort()
    if positives.size == 0:
        empty = np.empty(0, dtype=np.int64)
        no_weights = None if weights is None else empty
        return _Ranked(negatives, 0, positives[:0], empty, no_weights, n_regions)
    order = np.argsort(positives)[::-1]
    desc = positives[order]
    # Last index of each run of equal scores: the count at threshold t must include all ties.
    ends = np.append(np.flatnonzero(desc[1:] != desc[:-1]), desc.size - 1)
    region_tp = None
    if weights is not None:
        region_tp = np.cumsum(weights[order], dtype=np.float64)[ends]
    return _Ranked(negatives, int(desc.size), desc[ends], ends + 1, region_tp, n_regions)


def _auroc(r: _Ranked) -> float | None:
    if r.n_pos == 0 or r.n_neg == 0:
        return None
    x, y = r.polyline(r.tp.astype(np.float64))
    area = np.sum(np.diff(x).astype(np.float64) * (y[1:] + y[:-1])) / 2.0
    return float(area / (float(r.n_neg) * float(r.n_pos)))


def _f1_max(r: _Ranked) -> float | None:
    # F1 = 2TP / (TP + FP + P). Only thresholds sitting on a positive score matter: any lower
    # threshold down to the next positive adds false positives and no true positives. TP >= 1
    # at those thresholds, so there is no 0/0, and the (p=1, r=0) end point is never visited.
    if r.n_pos == 0:
        return None
    _, fp = r.fp_at_values()
    tp = r.tp.astype(np.float64)
    return float(np.max(2.0 * tp / (tp + fp + r.n_pos)))


def _area_up_to(x: np.ndarray, y: np.ndarray, limit: float) -> float:
    """Trapezoid area under a polyline with non-decreasing ``x`` from ``x[0]`` to ``limit``,
    interpolating the point at ``limit`` (as the MVTec AD ``trapezoid(..., x_max=)`` does)."""
    ins = int(np.searchsorted(x, limit, side="right"))
    xs, ys = x[:ins], y[:ins]
    area = float(np.sum(np.diff(xs) * (ys[1:] + ys[:-1])) / 2.0)
    if ins < x.size and xs[-1] < limit:
        y_limit = ys[-1] + (y[ins] - ys[-1]) * (limit - xs[-1]) / (x[ins] - xs[-1])
        area += float((limit - xs[-1]) * (ys[-1] + y_limit) / 2.0)
    return area


def _aupro(r: _Ranked, fpr_limit: float) -> float | None:
    # Each region pixel weighs 1 / (its region's area), so the weight caught at threshold t,
    # divided by the number of regions, is the mean per-region overlap PRO(t): every defect
    # counts the same however large it is. This is compute_pro of mvtec_ad_evaluation, exact.
    if r.n_regions == 0 or r.n_neg == 0 or r.region_tp is None:
        return None
    fp, pro = r.polyline(np.minimum(r.region_tp / r.n_regions, 1.0))
    fpr = fp / float(r.n_neg)
    return float(_area_up_to(fpr, pro, fpr_limit) / fpr_limit)


def _check_fpr_limit(fpr_limit: float) -> None:
    if not 0.0 < fpr_limit <= 1.0:
        raise ValueError(f"fpr_limit must lie in (0, 1], got {fpr_limit}")


def _rank_images(scores: np.ndarray, labels: np.ndarray) -> _Ranked:
    s = np.asarray(scores, dtype=np.float64).ravel()
    lab = np.asarray(labels).ravel()
    if s.shape != lab.shape:
        raise ValueError(f"{s.size} scores but {lab.size} labels")
    if not np.all(np.isfinite(s)):
        raise ValueError("image scores must be finite")
    if not np.all((lab == 0) | (lab == 1)):
        raise ValueError("labels must be 0 (normal) or 1 (defective)")
    positive = lab.astype(bool)
    return _rank(s[~positive], s[positive])


def _rank_pixels(
    maps: Sequence[np.ndarray], masks: Sequence[np.ndarray | None], regions: bool
) -> _Ranked:
    """Gather all pixels of all images (maps may differ in size) into one ranking.

    Negatives go straight into one preallocated float32 array (the only full-size buffer).
    With ``regions`` each defective pixel also gets the weight ``1 / area`` of its
    8-connected ground-truth region, for AUPRO.
    """
    if len(maps) != len(masks):
        raise ValueError(f"{len(maps)} maps but {len(masks)} masks")
    n_neg = 0
    for i, (amap, mask) in enumerate(zip(maps, masks)):
        shape = np.shape(amap)
        if len(shape) != 2:
            raise ValueError(f"map {i} must be 2-D (H, W), got shape {shape}")
        if mask is None:
            n_neg += int(np.prod(shape))
            continue
        if np.shape(mask) != shape:
            raise ValueError(f"mask {i} has shape {np.shape(mask)}, its map {shape}")
        n_neg += int(np.prod(shape)) - int(np.count_nonzero(mask))

    negatives = np.empty(n_neg, dtype=np.float32)
    pos_scores: list[np.ndarray] = []
    pos_weights: list[np.ndarray] = []
    n_regions = 0
    offset = 0
    for i, (amap, mask) in enumerate(zip(maps, masks)):
        scores = np.asarray(amap, dtype=np.float32)
        if not np.all(np.isfinite(scores)):
            raise ValueError(f"map {i} has non-finite scores")
        positive = None if mask is None else np.asarray(mask) != 0
        if positive is None or not positive.any():
            # Normal image, or a defective one with nothing marked: all its pixels are normal.
            negatives[offset : offset + scores.size] = scores.ravel()
            offset += scores.size
            continue
        neg = scores[~positive]
        negatives[offset : offset + neg.size] = neg
        offset += neg.size
        pos_scores.append(scores[positive])
        if regions:
            labelled, n = ndimage.label(positive, structure=_REGION_STRUCTURE)
            region_of = labelled[positive]
            pos_weights.append(1.0 / np.bincount(region_of)[region_of])
            n_regions += int(n)

    positives = np.concatenate(pos_scores) if pos_scores else np.empty(0, dtype=np.float32)
    weights = None
    if regions:
        weights = np.concatenate(pos_weights) if pos_weights else np.empty(0, dtype=np.float64)
    return _rank(negatives, positives, weights, n_regions)


def image_auroc(scores: np.ndarray, labels: np.ndarray) -> float | None:
    """ROC AUC of image scores (labels 1 = defective): the chance a defective image outscores
    a normal one, threshold-free. None when only one class is present (AUC undefined)."""
    return _auroc(_rank_images(scores, labels))


def f1_max(scores: np.ndarray, labels: np.ndarray) -> float | None:
    """Best F1 over all thresholds (predict defective when score >= t): what an operator gets
    with an ideally tuned threshold. None when there are no positives."""
    return _f1_max(_rank_images(scores, labels))


def pixel_auroc(maps: Sequence[np.ndarray], masks: Sequence[np.ndarray | None]) -> float | None:
    """ROC AUC over every pixel of every image (maps may differ in size; a None mask means a
    normal image). None without both a defective and a normal pixel."""
    return _auroc(_rank_pixels(maps, masks, regions=False))


def pixel_f1_max(maps: Sequence[np.ndarray], masks: Sequence[np.ndarray | None]) -> float | None:
    """Best F1 over all thresholds, counting pixels. None when no pixel is defective."""
    return _f1_max(_rank_pixels(maps, masks, regions=False))


def aupro(
    maps: Sequence[np.ndarray], masks: Sequence[np.ndarray | None], fpr_limit: float = 0.3
) -> float | None:
    """Area under the per-region-overlap curve up to ``fpr_limit``, normalised to [0, 1].

    Pixel AUROC is dominated by large defects; PRO averages the detected fraction over each
    connected defect region, so small defects count as much as big ones (MVTec AD). Only the
    low false-positive range matters in practice, hence the limit. None without any region or
    without any normal pixel.
    """
    _check_fpr_limit(fpr_limit)
    return _aupro(_rank_pixels(maps, masks, regions=True), fpr_limit)


def compute_metrics(
    image_scores: np.ndarray,
    image_labels: np.ndarray,
    maps: Sequence[np.ndarray] | None = None,
    masks: Sequence[np.ndarray | None] | None = None,
    fpr_limit: float = 0.3,
) -> dict[str, float | None]:
    """All metrics of a run as JSON-ready floats; each pixel ranking is built once and shared.

    The pixel metrics are None when there are no maps or the dataset has no masks at all.
    """
    _check_fpr_limit(fpr_limit)
    images = _rank_images(image_scores, image_labels)
    result: dict[str, float | None] = {
        "image_auroc": _auroc(images),
        "pixel_auroc": None,
        "aupro": None,
        "image_f1_max": _f1_max(images),
        "pixel_f1_max": None,
    }
    del images
    if maps is None or masks is None or all(m is None for m in masks):
        return result
    if len(maps) != len(np.ravel(image_scores)):
        raise ValueError(f"{len(maps)} maps but {len(np.ravel(image_scores))} image scores")
    pixels = _rank_pixels(maps, masks, regions=True)
    result["pixel_auroc"] = _auroc(pixels)
    result["aupro"] = _aupro(pixels, fpr_limit)
    result["pixel_f1_max"] = _f1_max(pixels)
    return result


# ----------------------------------------------------------------------------- curves for plots
# The same exact polylines the areas above integrate, as rates, for a report to draw.


def roc_curve(scores: np.ndarray, labels: np.ndarray) -> tuple[np.ndarray, np.ndarray] | None:
    """Image ROC as (false-positive rate, true-positive rate), from (0, 0) to (1, 1); None without both classes."""
    r = _rank_images(scores, labels)
    if r.n_pos == 0 or r.n_neg == 0:
        return None
    fp, tp = r.polyline(r.tp.astype(np.float64))
    return fp / float(r.n_neg), tp / float(r.n_pos)


def pixel_roc_curve(maps: Sequence[np.ndarray], masks: Sequence[np.ndarray | None]) -> tuple[np.ndarray, np.ndarray] | None:
    """Pixel ROC as (false-positive rate, true-positive rate); None without a defective and a normal pixel."""
    r = _rank_pixels(maps, masks, regions=False)
    if r.n_pos == 0 or r.n_neg == 0:
        return None
    fp, tp = r.polyline(r.tp.astype(np.float64))
    return fp / float(r.n_neg), tp / float(r.n_pos)


def pro_curve(
    maps: Sequence[np.ndarray], masks: Sequence[np.ndarray | None], fpr_limit: float = 0.3
) -> tuple[np.ndarray, np.ndarray] | None:
    """Per-region overlap against pixel false-positive rate, up to ``fpr_limit`` (the part AUPRO integrates).

    None without any defect region or any normal pixel.
    """
    _check_fpr_limit(fpr_limit)
    r = _rank_pixels(maps, masks, regions=True)
    if r.n_regions == 0 or r.n_neg == 0 or r.region_tp is None:
        return None
    fp, pro = r.polyline(np.minimum(r.region_tp / r.n_regions, 1.0))
    fpr = fp / float(r.n_neg)
    keep = int(np.searchsorted(fpr, fpr_limit, side="right"))
    x, y = fpr[:keep], pro[:keep]
    if keep < fpr.size and x[-1] < fpr_limit:  # close the curve at the limit, as the area does
        y_limit = y[-1] + (pro[keep] - y[-1]) * (fpr_limit - x[-1]) / (fpr[keep] - x[-1])
        x, y = np.append(x, fpr_limit), np.append(y, y_limit)
    return x, y
