"""Integration on real data (../shared/datasets/magnetic_tile), skipped when it is absent.

A subset keeps this to about a minute; the full-dataset figures in the README come from
`spade-ray evaluate` (command given there).
"""

from __future__ import annotations

import numpy as np
import pytest

from spade_ray import Spade
from spade_ray.method.metrics import compute_metrics
from spade_ray.storage.datasets import load_mvtec
from spade_ray.storage.images import load_mask

pytestmark = pytest.mark.slow


@pytest.mark.parametrize("protocol", ["paper", "full"])
def test_spade_detects_and_localises_real_defects(magnetic_tile, protocol: str) -> None:
    data = load_mvtec(str(magnetic_tile))
    train = data.train[::4]  # 191 normal images
    good = [s for s in data.test if s.label == 0][::6]
    bad = [s for s in data.test if s.label == 1][::10]
    test = good + bad
    model = Spade("lite0", image_k=5, pixel_k=5, protocol=protocol).fit([s.uri for s in train], calibration_samples=16)
    pred = model.predict([s.uri for s in test])
    labels = np.array([s.label for s in test])
    masks = [model.preprocessor.mask_to_output(load_mask(s.mask_uri)) if s.mask_uri else None for s in test]
    for amap, s in zip(pred.maps, test):
        if protocol == "full":
            assert amap.shape == load_mask(s.mask_uri).shape if s.mask_uri else True
    m = compute_metrics(pred.image_scores, labels, pred.maps, masks)
    # well above chance on a real, hard dataset (full-data numbers are ~0.9 / 0.8, see README)
    assert m["image_auroc"] > 0.75
    assert m["pixel_auroc"] > 0.7
    assert m["aupro"] > 0.5
