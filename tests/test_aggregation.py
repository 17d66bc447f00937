"""Locally aggregated features: each pixel feature is the mean of its n x n neighbourhood."""

import numpy as np
import pytest

from spade_ray.method.aggregation import aggregate_level, aggregate_levels


def test_interior_pixels_average_their_3x3_neighbourhood() -> None:
    rng = np.random.default_rng(0)
    level = rng.normal(size=(2, 3, 6, 7)).astype(np.float32)
    out = aggregate_level(level, 3)
    assert out.shape == level.shape and out.dtype == np.float32
    np.testing.assert_allclose(out[1, 2, 3, 4], level[1, 2, 2:5, 3:6].mean(), rtol=1e-5)


def test_border_pixels_average_only_the_neighbours_that_exist() -> None:
    level = np.ones((1, 1, 4, 4), dtype=np.float32)
    level[0, 0, 0, 0] = 10.0
    out = aggregate_level(level, 3)
    assert out[0, 0, 0, 0] == pytest.approx((10 + 3) / 4)  # corner: a 2x2 neighbourhood, no zero padding
    assert out[0, 0, 3, 3] == pytest.approx(1.0)


def test_size_one_is_the_raw_features_and_dtype_is_kept() -> None:
    level = np.arange(2 * 3 * 5 * 5, dtype=np.float16).reshape(2, 3, 5, 5)
    assert aggregate_level(level, 1) is level
    assert aggregate_levels([level, level], 5)[1].dtype == np.float16


def test_a_whole_bank_is_aggregated_in_chunks_with_the_same_result() -> None:
    rng = np.random.default_rng(1)
    bank = rng.normal(size=(130, 2, 5, 5)).astype(np.float32)  # more than one chunk of 64 images
    chunked = aggregate_level(bank, 3)
    for i in (0, 64, 129):
        np.testing.assert_allclose(chunked[i], aggregate_level(bank[i : i + 1], 3)[0], rtol=1e-6)


@pytest.mark.parametrize("size", [0, 2, -3])
def test_even_or_non_positive_windows_are_refused(size: int) -> None:
    with pytest.raises(ValueError, match="odd window"):
        aggregate_level(np.zeros((1, 1, 3, 3), np.float32), size)
