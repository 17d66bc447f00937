"""The pixels the network sees: a grey image takes the one-channel path with the very same result."""

from __future__ import annotations

import numpy as np
import pytest
from PIL import Image

from spade_ray.method.preprocess import Preprocessor


@pytest.mark.parametrize("protocol", ["full", "paper"])
@pytest.mark.parametrize("shape", [(100, 630), (319, 502), (300, 300)])
def test_a_grey_image_resizes_exactly_like_its_rgb_copy(protocol: str, shape: tuple[int, int]) -> None:
    rng = np.random.default_rng(0)
    grey = rng.integers(0, 256, shape, dtype=np.uint8)
    rgb = np.repeat(grey[:, :, None], 3, axis=2)
    pre = Preprocessor(224, protocol)  # type: ignore[arg-type]
    got = pre.resize_rgb(rgb)
    want = pre._resize(Image.fromarray(rgb))  # the three-channel path
    assert got.shape == (224, 224, 3) and got.dtype == np.uint8
    np.testing.assert_array_equal(got, want)


def test_a_colour_image_is_not_taken_for_grey() -> None:
    rgb = np.zeros((64, 64, 3), np.uint8)
    rgb[10:20, 10:20, 2] = 255  # one blue square: channels differ only there
    out = Preprocessor(64, "full").resize_rgb(rgb)
    assert out[:, :, 2].max() > 0 and out[:, :, 0].max() == 0
