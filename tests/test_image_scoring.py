"""Image scores from retrieval and the anomaly map, and the calibration that scales them."""

import numpy as np
import pytest

from spade_ray.method.calibration import Calibration, calibration_rows
from spade_ray.method.config import SpadeConfig
from spade_ray.method.image_scoring import combine_image_scores, normal_scales


def test_knn_is_the_retrieval_distance_alone() -> None:
    knn = np.array([1.0, 2.0])
    np.testing.assert_allclose(combine_image_scores(knn, np.array([9.0, 9.0]), "knn", None), knn)


def test_knn_plus_map_adds_both_terms_in_units_of_their_normal_medians() -> None:
    scales = normal_scales([1.0, 2.0, 3.0, 100.0], [0.5, 0.5, 0.5])  # medians: one odd normal image does not set them
    assert scales == (2.5, 0.5)
    scores = combine_image_scores(np.array([2.5, 5.0]), np.array([0.5, 0.5]), "knn+map", scales)
    np.testing.assert_allclose(scores, [2.0, 3.0])


def test_a_small_defect_that_the_pooled_vector_misses_is_ranked_by_the_map() -> None:
    knn = np.array([1.0, 1.0])  # both images look normal to the pooled vector
    map_max = np.array([1.0, 4.0])  # the second has a small very anomalous region
    scores = combine_image_scores(knn, map_max, "knn+map", (1.0, 1.0))
    assert scores[1] > scores[0]


def test_knn_plus_map_without_normal_scales_says_what_is_missing() -> None:
    with pytest.raises(ValueError, match="calibrat"):
        combine_image_scores(np.ones(2), np.ones(2), "knn+map", None)
    with pytest.raises(ValueError, match="unknown image scoring"):
        combine_image_scores(np.ones(2), np.ones(2), "max", None)


def test_calibration_thresholds_follow_the_image_scoring() -> None:
    rng = np.random.default_rng(0)
    knn, maxima = rng.uniform(1, 2, 64), rng.uniform(3, 5, 64)
    settings = {"aggregate": 3, "matching": "exact"}
    cal = Calibration.from_scores(knn, maxima, 0.05, "knn+map", settings)
    assert cal.scales == (pytest.approx(np.median(knn)), pytest.approx(np.median(maxima)))
    combined = knn / np.median(knn) + maxima / np.median(maxima)
    assert cal.image_threshold == pytest.approx(np.quantile(combined, 0.95), rel=1e-5)
    assert cal.pixel_threshold == pytest.approx(np.quantile(maxima, 0.95))
    knn_only = cal.for_image_scoring("knn")
    assert knn_only.image_threshold == pytest.approx(np.quantile(knn, 0.95)) and knn_only.pixel_threshold == cal.pixel_threshold


def test_a_calibration_knows_which_settings_it_was_made_with() -> None:
    config = SpadeConfig()
    cal = Calibration.from_scores([1.0, 2.0], [1.0, 2.0], 0.01, settings=config.calibration_settings())
    assert cal.matches(config)
    assert cal.matches(SpadeConfig(image_scoring="knn"))  # only combines the same normal scores
    assert not cal.matches(SpadeConfig(aggregate=1)) and not cal.matches(SpadeConfig(pixel_k=5))


def test_calibration_sample_depends_on_the_images_not_on_bank_order_or_shards() -> None:
    uris = [f"s3://line-3/good/{i:04d}.png" for i in range(500)]
    rows = calibration_rows(uris, 16)
    chosen = {uris[r] for r in rows}
    assert len(rows) == 16 and list(rows) == sorted(rows)
    shuffled = list(np.random.default_rng(0).permutation(uris))
    assert {shuffled[r] for r in calibration_rows(shuffled, 16)} == chosen
    # three shards each propose their own 16; choosing among the proposals gives the same 16
    shards = [uris[0::3], uris[1::3], uris[2::3]]
    proposals = [shard[r] for shard in shards for r in calibration_rows(shard, 16)]
    assert {proposals[r] for r in calibration_rows(proposals, 16)} == chosen
    assert len(calibration_rows(uris[:5], 16)) == 5
