"""Tests for spade_ray.method.metrics: hand-worked cases, sklearn agreement, AUPRO vs brute force."""

from __future__ import annotations

import json

import numpy as np
import pytest
from scipy import ndimage
from sklearn.metrics import precision_recall_curve, roc_auc_score

from spade_ray.method.metrics import (
    aupro,
    compute_metrics,
    f1_max,
    image_auroc,
    pixel_auroc,
    pixel_f1_max,
)

# ---------------------------------------------------------------- references


def sklearn_f1_max(scores: np.ndarray, labels: np.ndarray) -> float:
    precision, recall, _ = precision_recall_curve(labels, scores)
    precision, recall = precision[:-1], recall[:-1]  # drop the (p=1, r=0) end point
    denom = precision + recall
    f1 = np.divide(2 * precision * recall, denom, out=np.zeros_like(denom), where=denom > 0)
    return float(f1.max())


def brute_force_aupro(maps, masks, fpr_limit: float = 0.3) -> float:
    """PRO and FPR computed directly at every candidate threshold, slow and obvious."""
    regions, normals = [], []
    for amap, mask in zip(maps, masks):
        mask = np.zeros(amap.shape, bool) if mask is None else mask.astype(bool)
        labelled, n = ndimage.label(mask, structure=np.ones((3, 3)))
        regions += [amap[labelled == k] for k in range(1, n + 1)]
        normals.append(amap[~mask])
    normal = np.concatenate(normals)
    thresholds = np.unique(np.concatenate([m.ravel() for m in maps]))[::-1]
    fprs, pros = [0.0], [0.0]
    for t in thresholds:
        fprs.append(np.mean(normal >= t))
        pros.append(np.mean([np.mean(r >= t) for r in regions]))
    fprs, pros = np.array(fprs), np.array(pros)
    keep = fprs <= fpr_limit
    x, y = list(fprs[keep]), list(pros[keep])
    if x[-1] < fpr_limit:
        nxt = np.flatnonzero(~keep)[0]
        x0, y0, x1, y1 = x[-1], y[-1], fprs[nxt], pros[nxt]
        x.append(fpr_limit)
        y.append(y0 + (y1 - y0) * (fpr_limit - x0) / (x1 - x0))
    x, y = np.array(x), np.array(y)
    return float(np.sum(np.diff(x) * (y[1:] + y[:-1]) / 2) / fpr_limit)


def random_maps(rng, n_images: int, n_levels: int = 0, defect_rate: float = 0.6):
    """Maps of varying sizes with blob-shaped defects that score higher on average."""
    maps, masks = [], []
    for _ in range(n_images):
        h, w = rng.integers(6, 14, size=2)
        mask = None
        amap = rng.normal(size=(h, w))
        if rng.random() < defect_rate:
            mask = rng.random((h, w)) < 0.06
            if rng.random() < 0.5:  # grow some seeds into blobs (8-connected regions)
                mask = ndimage.binary_dilation(mask)
            amap = amap + 1.5 * mask
        if n_levels:  # coarse scores: many ties, also between normal and defective pixels
            amap = np.round(amap * n_levels / 4) / (n_levels / 4)
        maps.append(amap.astype(np.float32))
        masks.append(mask)
    return maps, masks


def flat_pixels(maps, masks):
    scores = np.concatenate([m.ravel() for m in maps])
    labels = np.concatenate(
        [np.zeros(m.size, int) if k is None else k.ravel().astype(int) for m, k in zip(maps, masks)]
    )
    return scores, labels


# ---------------------------------------------------------------- image level, by hand


def test_image_auroc_perfect_and_reversed():
    labels = np.array([0, 0, 0, 1, 1])
    assert image_auroc(np.array([0.1, 0.2, 0.3, 0.8, 0.9]), labels) == 1.0
    assert image_auroc(np.array([0.9, 0.8, 0.7, 0.2, 0.1]), labels) == 0.0


def test_image_auroc_four_samples_by_hand():
    # Pairs (pos, neg): 0.35>0.1 yes, 0.35>0.4 no, 0.8>0.1 yes, 0.8>0.4 yes -> 3/4.
    scores, labels = np.array([0.1, 0.4, 0.35, 0.8]), np.array([0, 0, 1, 1])
    assert image_auroc(scores, labels) == pytest.approx(0.75)


def test_image_auroc_ties_count_half():
    # Pairs: (0.5 vs 0.5) tie = 1/2, (0.5 vs 0.2) win -> (0.5 + 1) / 2.
    assert image_auroc(np.array([0.5, 0.2, 0.5]), np.array([0, 0, 1])) == pytest.approx(0.75)


def test_f1_max_by_hand():
    scores = np.array([0.9, 0.8, 0.7, 0.6, 0.5])
    labels = np.array([1, 0, 1, 0, 0])
    # t=0.9: P=1 R=1/2 F1=2/3; t=0.8: 1/2; t=0.7: P=2/3 R=1 F1=0.8; t=0.6: 2/3; t=0.5: 4/7.
    assert f1_max(scores, labels) == pytest.approx(0.8)
    assert f1_max(np.array([0.1, 0.9]), np.array([0, 1])) == 1.0


def test_f1_max_tie_between_classes():
    # The only threshold catching the positive also catches the tied negative: P=1/2, R=1.
    assert f1_max(np.array([0.5, 0.5, 0.1]), np.array([1, 0, 0])) == pytest.approx(2 / 3)


def test_one_class_gives_none():
    scores = np.array([0.1, 0.5, 0.9])
    assert image_auroc(scores, np.zeros(3, int)) is None
    assert image_auroc(scores, np.ones(3, int)) is None
    assert f1_max(scores, np.zeros(3, int)) is None
    assert f1_max(scores, np.ones(3, int)) == 1.0  # defined: everything flagged is right
    assert image_auroc(np.array([]), np.array([])) is None


def test_bad_image_inputs_raise():
    with pytest.raises(ValueError):
        image_auroc(np.array([0.1, 0.2]), np.array([0, 1, 1]))
    with pytest.raises(ValueError):
        image_auroc(np.array([0.1, np.nan]), np.array([0, 1]))
    with pytest.raises(ValueError):
        image_auroc(np.array([0.1, 0.2]), np.array([0, 2]))


@pytest.mark.parametrize("seed", range(8))
def test_image_metrics_match_sklearn_with_ties(seed):
    rng = np.random.default_rng(seed)
    n = int(rng.integers(20, 300))
    labels = (rng.random(n) < rng.uniform(0.1, 0.9)).astype(int)
    labels[:2] = [0, 1]
    scores = np.round(rng.normal(size=n) + labels * rng.uniform(0, 2), 1)  # rounded: ties
    assert image_auroc(scores, labels) == pytest.approx(roc_auc_score(labels, scores), abs=1e-9)
    assert f1_max(scores, labels) == pytest.approx(sklearn_f1_max(scores, labels), abs=1e-9)


# ---------------------------------------------------------------- pixel level


def test_pixel_metrics_by_hand():
    maps = [np.array([[0.9, 0.1], [0.2, 0.3]]), np.array([[0.4, 0.8, 0.0]])]
    masks = [np.array([[1, 0], [0, 0]]), None]
    assert pixel_auroc(maps, masks) == 1.0
    assert pixel_f1_max(maps, masks) == 1.0
    # Second map's 0.8 now outscores the single defective pixel's 0.7: 5 of 6 negatives beaten.
    maps[0][0, 0] = 0.7
    assert pixel_auroc(maps, masks) == pytest.approx(5 / 6)
    assert pixel_f1_max(maps, masks) == pytest.approx(2 / 3)  # t=0.7: P=1/2, R=1


@pytest.mark.parametrize("seed", range(6))
@pytest.mark.parametrize("n_levels", [0, 8])
def test_pixel_metrics_match_sklearn_on_concatenation(seed, n_levels):
    rng = np.random.default_rng(100 + seed)
    maps, masks = random_maps(rng, n_images=12, n_levels=n_levels)
    masks[0] = np.zeros(maps[0].shape, bool)
    masks[0][2:4, 3:5] = True  # at least one defect
    scores, labels = flat_pixels(maps, masks)
    assert pixel_auroc(maps, masks) == pytest.approx(roc_auc_score(labels, scores), abs=1e-9)
    assert pixel_f1_max(maps, masks) == pytest.approx(sklearn_f1_max(scores, labels), abs=1e-9)


def test_pixel_metrics_without_a_class_give_none():
    maps = [np.ones((3, 4), np.float32), np.zeros((2, 2), np.float32)]
    assert pixel_auroc(maps, [None, None]) is None
    assert pixel_f1_max(maps, [None, np.zeros((2, 2), bool)]) is None
    assert aupro(maps, [None, None]) is None
    full = [np.ones((3, 4), bool), np.ones((2, 2), bool)]
    assert pixel_auroc(maps, full) is None  # no normal pixel
    assert aupro(maps, full) is None


def test_pixel_shape_mismatch_raises():
    with pytest.raises(ValueError):
        pixel_auroc([np.zeros((3, 3))], [np.zeros((3, 4), bool)])
    with pytest.raises(ValueError):
        pixel_auroc([np.zeros((3, 3))], [])
    with pytest.raises(ValueError):
        aupro([np.zeros((3, 3))], [np.ones((3, 3), bool)], fpr_limit=0.0)


# ---------------------------------------------------------------- AUPRO


def test_aupro_perfect_map_is_one():
    mask = np.zeros((8, 8), bool)
    mask[1:3, 1:3] = True
    mask[5:8, 4:8] = True
    maps = [mask.astype(np.float32), np.zeros((5, 7), np.float32)]
    assert aupro(maps, [mask, None]) == pytest.approx(1.0)
    assert aupro(maps, [mask, None], fpr_limit=1.0) == pytest.approx(1.0)
    # Reversed: every normal pixel outscores every defect, PRO stays 0 until FPR = 1.
    assert aupro([1 - maps[0], maps[1] + 2], [mask, None]) == 0.0


def test_aupro_two_regions_of_different_size_by_hand():
    # One row: region A = pixels 0-1 (area 2), region B = pixels 3-6 (area 4), 4 normal pixels.
    mask = np.array([[1, 1, 0, 1, 1, 1, 1, 0, 0, 0]], bool)
    amap = np.array([[0.9, 0.9, 0.5, 0.8, 0.8, 0.2, 0.2, 0.1, 0.1, 0.1]], np.float32)
    # t=0.9: A fully caught, B not at all -> PRO (1 + 0)/2 = 0.5, FPR 0
    # t=0.8: B half                    -> PRO 0.75, FPR 0
    # t=0.5: one normal pixel          -> PRO 0.75, FPR 1/4
    # t=0.2: B complete                -> PRO 1,    FPR 1/4
    # t=0.1: all                       -> PRO 1,    FPR 1
    # Area to 0.3: 0.25 * 0.75 + 0.05 * 1 = 0.2375; normalised by 0.3.
    assert aupro([amap], [mask]) == pytest.approx(0.2375 / 0.3)
    assert aupro([amap], [mask], fpr_limit=0.2) == pytest.approx(0.75)  # interpolated, flat part
    assert aupro([amap], [mask], fpr_limit=1.0) == pytest.approx(0.25 * 0.75 + 0.75)
    # Pixel-wise the same map has 6 defect pixels: PRO weighs region A (2 px) like B (4 px).
    assert brute_force_aupro([amap], [mask]) == pytest.approx(0.2375 / 0.3)


def test_aupro_regions_are_8_connected():
    # (0,0)-(0,1) and (1,2) touch diagonally: one region of area 3 (4-connectivity would give
    # two regions, PRO at t=0.9 = (0 + 1)/2 = 0.5 instead of 1/3).
    mask = np.array([[1, 1, 0], [0, 0, 1], [0, 0, 0]], bool)
    amap = np.where(mask, 0.1, 0.5).astype(np.float32)
    amap[1, 2] = 0.9
    assert aupro([amap], [mask]) == pytest.approx(1 / 3)


def test_aupro_tie_between_defect_and_normal_is_a_diagonal():
    # One 2-pixel region at 0.5, normal pixels 0.5 and 0.0: the curve jumps (0,0) -> (0.5, 1).
    # PRO interpolated at FPR 0.3 is 0.6; area 0.3 * 0.6 / 2 = 0.09; / 0.3 = 0.3.
    mask = np.array([[1, 1, 0, 0]], bool)
    amap = np.array([[0.5, 0.5, 0.5, 0.0]], np.float32)
    assert aupro([amap], [mask]) == pytest.approx(0.3)


@pytest.mark.parametrize("seed", range(6))
@pytest.mark.parametrize("n_levels", [0, 8])
@pytest.mark.parametrize("fpr_limit", [0.3, 0.05, 1.0])
def test_aupro_matches_brute_force(seed, n_levels, fpr_limit):
    rng = np.random.default_rng(200 + seed)
    maps, masks = random_maps(rng, n_images=8, n_levels=n_levels)
    masks[0] = np.zeros(maps[0].shape, bool)
    masks[0][1:3, 1:3] = True
    masks[0][4, 4] = True  # two regions at least, of different sizes
    expected = brute_force_aupro(maps, masks, fpr_limit)
    assert aupro(maps, masks, fpr_limit) == pytest.approx(expected, abs=1e-9)


def test_defective_image_with_empty_mask_counts_as_normal():
    rng = np.random.default_rng(7)
    maps, masks = random_maps(rng, n_images=5)
    masks[0] = np.zeros(maps[0].shape, bool)
    masks[0][2:5, 2:5] = True
    empty = list(masks)
    empty[1] = np.zeros(maps[1].shape, bool)
    none = list(masks)
    none[1] = None
    assert aupro(maps, empty) == pytest.approx(aupro(maps, none), abs=1e-12)
    assert pixel_auroc(maps, empty) == pytest.approx(pixel_auroc(maps, none), abs=1e-12)
    # Masks of 0/255 (as read from PNG) mean the same as bool masks.
    scaled = [None if m is None else m.astype(np.uint8) * 255 for m in masks]
    assert aupro(maps, scaled) == pytest.approx(aupro(maps, masks), abs=1e-12)


# ---------------------------------------------------------------- compute_metrics

KEYS = ["image_auroc", "pixel_auroc", "aupro", "image_f1_max", "pixel_f1_max"]


def test_compute_metrics_agrees_with_the_single_functions():
    rng = np.random.default_rng(3)
    maps, masks = random_maps(rng, n_images=10, n_levels=8)
    masks[0] = np.zeros(maps[0].shape, bool)
    masks[0][1:4, 1:3] = True
    labels = np.array([m is not None for m in masks], int)
    labels[-1] = 1  # a defective image whose mask is missing
    scores = np.array([m.max() for m in maps], np.float64)
    out = compute_metrics(scores, labels, maps, masks, fpr_limit=0.3)
    assert list(out) == KEYS
    assert out["image_auroc"] == image_auroc(scores, labels)
    assert out["image_f1_max"] == f1_max(scores, labels)
    assert out["pixel_auroc"] == pixel_auroc(maps, masks)
    assert out["pixel_f1_max"] == pixel_f1_max(maps, masks)
    assert out["aupro"] == aupro(maps, masks, 0.3)
    assert all(type(v) is float for v in out.values())
    json.dumps(out)


def test_compute_metrics_without_masks_gives_none_pixel_metrics():
    scores = np.array([0.1, 0.2, 0.8, 0.9])
    labels = np.array([0, 0, 1, 1])
    maps = [np.zeros((4, 4), np.float32)] * 4
    for out in (
        compute_metrics(scores, labels),
        compute_metrics(scores, labels, maps=maps),
        compute_metrics(scores, labels, maps=maps, masks=[None] * 4),
    ):
        assert out == {
            "image_auroc": 1.0,
            "pixel_auroc": None,
            "aupro": None,
            "image_f1_max": 1.0,
            "pixel_f1_max": None,
        }


def test_compute_metrics_one_class():
    out = compute_metrics(np.array([0.3, 0.4]), np.array([0, 0]))
    assert out["image_auroc"] is None and out["image_f1_max"] is None
