"""Overlays and thumbnails: what a person sees of an anomaly map, pixel for pixel."""

from __future__ import annotations

import numpy as np
import pytest
from skimage import data as skdata

from spade_ray.method.preprocess import Preprocessor
from spade_ray.storage.outputs import heatmap_rgb, output_key
from spade_ray.storage.overlay import (
    OUTLINE_RGB,
    draw_outline,
    mask_outline,
    overlay_rgb,
    thumbnail,
)


@pytest.fixture
def photo() -> np.ndarray:
    return skdata.chelsea()  # 300 x 451 RGB, a real photo


def test_the_overlay_leaves_normal_pixels_alone_and_colours_anomalous_ones(photo) -> None:
    amap = np.zeros(photo.shape[:2], dtype=np.float32)
    amap[100:150, 200:260] = 2.0  # the top of the scale (vmax = 2 x threshold 1.0)
    out = overlay_rgb(photo, amap, vmax=2.0)
    assert out.shape == photo.shape and out.dtype == np.uint8
    np.testing.assert_array_equal(out[:100], photo[:100])  # a normal region looks exactly like the image
    hot = out[110:140, 210:250].astype(np.float32)
    expected = 0.3 * photo[110:140, 210:250] + 0.7 * heatmap_rgb(np.full((1, 1), 2.0), 2.0)[0, 0]
    np.testing.assert_allclose(hot, expected, atol=1.0)


def test_the_mask_outline_is_a_ring_on_the_mask_border(photo) -> None:
    mask = np.zeros(photo.shape[:2], dtype=bool)
    mask[50:90, 60:120] = True
    ring = mask_outline(mask, width=2)
    assert ring[50, 60] and ring[51, 100] and ring[89, 119] and not ring[70, 90] and not ring[49, 60]
    assert ring.sum() == mask.sum() - mask[52:88, 62:118].sum()
    drawn = draw_outline(photo, mask, width=2)
    assert (drawn[ring] == OUTLINE_RGB).all()
    np.testing.assert_array_equal(drawn[~ring], photo[~ring])
    with pytest.raises(ValueError, match="same size"):
        draw_outline(photo, mask[:-1])


def test_overlays_line_up_with_the_map_in_both_protocols(photo) -> None:
    full, paper = Preprocessor(224, "full"), Preprocessor(224, "paper")
    assert full.image_to_output(photo).shape[:2] == full.output_shape(*photo.shape[:2]) == photo.shape[:2]
    assert paper.image_to_output(photo).shape[:2] == paper.output_shape(*photo.shape[:2]) == (224, 224)
    with pytest.raises(ValueError, match="same size"):
        overlay_rgb(photo, np.zeros((224, 224), np.float32), vmax=1.0)


def test_thumbnails_shrink_to_256_px_and_keep_thin_defects(photo) -> None:
    small = thumbnail(photo, 256)
    assert max(small.shape[:2]) == 256 and small.shape[2] == 3
    assert thumbnail(photo[:100, :100], 256).shape == (100, 100, 3)  # never enlarged
    line = np.zeros((1000, 1000), dtype=bool)
    line[500, 100:900] = True  # one pixel thick
    assert thumbnail(line, 256, binary=True).any()


def test_overlay_keys_follow_the_output_key_rule() -> None:
    assert output_key("crack/001.png", ".jpg") == "crack/001.jpg"
    assert output_key("../../etc/x y.png", ".jpg") == "etc/x_y.jpg"  # never escapes the output prefix
