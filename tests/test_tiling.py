"""Tiling high-resolution frames: the grid, seamless stitching, and tiled SPADE in process.

The model tests use the real backbone and the synthetic dataset's images enlarged to a frame of
several tiles, so the scoring runs retrieval, correspondence and stitching for real.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from spade_ray import Spade
from spade_ray.method.config import SpadeConfig
from spade_ray.method.tiling import Stitcher, Tiling, frame_key, stitch, tile_key


@pytest.mark.parametrize("height,width", [(1250, 500), (4000, 5000), (225, 224), (300, 700)])
@pytest.mark.parametrize("tiling", [Tiling(224, 56), Tiling(224, 0), Tiling(224, 56, 0.5), Tiling(128, 32, 2.0)])
def test_tiles_cover_the_frame_with_at_least_the_overlap(tiling: Tiling, height: int, width: int) -> None:
    boxes = tiling.boxes(height, width)
    covered = np.zeros((height, width), dtype=np.int32)
    for top, left, bottom, right in boxes:
        assert 0 <= top < bottom <= height and 0 <= left < right <= width
        covered[top:bottom, left:right] += 1
    assert covered.min() >= 1
    extent = round(tiling.tile / tiling.scale)
    tops = sorted({b[0] for b in boxes})
    for above, below in zip(tops, tops[1:]):  # neighbouring rows share at least the overlap
        assert above + min(extent, height) - below >= round(tiling.overlap / tiling.scale)


def test_a_frame_no_larger_than_a_tile_is_one_tile_of_the_whole_frame() -> None:
    assert Tiling(224, 56).boxes(224, 180) == [(0, 0, 224, 180)]
    assert Tiling(224, 56, 0.25).boxes(800, 896) == [(0, 0, 800, 896)]


@pytest.mark.parametrize("bad", [dict(tile=16), dict(tile=224, overlap=113), dict(tile=224, scale=0.0),
                                 dict(tile=224, overlap=-1)])
def test_bad_tiling_settings_are_refused_by_name(bad: dict) -> None:
    with pytest.raises(ValueError, match="tile|scale"):
        Tiling(**bad)


def test_tiling_needs_the_full_protocol() -> None:
    with pytest.raises(ValueError, match="protocol full"):
        SpadeConfig(tile=224, protocol="paper")


def test_stitching_tiles_cut_from_a_smooth_map_gives_it_back_without_seams() -> None:
    """Each tile's map is a bilinear sample of one smooth frame map: the stitched map is that map, so
    a seam (a jump where tiles meet) would show as an error along the tile borders."""
    height, width = 700, 450
    yy, xx = np.mgrid[0:height, 0:width].astype(np.float32)
    frame = np.sin(yy / 90.0) + np.cos(xx / 70.0)
    tiling = Tiling(224, 56)
    boxes = tiling.boxes(height, width)
    tiles = [frame[t:b, lf:r] for t, lf, b, r in boxes]
    stitched = stitch(tiles, boxes, height, width, tiling.blend_width())
    np.testing.assert_allclose(stitched, frame, atol=1e-5)


def test_overlapping_tiles_that_disagree_blend_smoothly() -> None:
    """Two tiles with different constant maps: across the overlap the value moves from one to the other
    in small steps, never a jump as large as their difference."""
    stitcher = Stitcher(100, 200, 40)
    stitcher.add(np.zeros((100, 120), np.float32), (0, 0, 100, 120))
    stitcher.add(np.ones((100, 120), np.float32), (0, 80, 100, 200))
    row = stitcher.result()[50]
    assert row[0] == 0.0 and row[-1] == 1.0
    assert np.all(np.diff(row) >= -1e-6) and np.abs(np.diff(row)).max() < 0.1


def test_tile_keys_name_their_frame() -> None:
    assert frame_key(tile_key("s3://b/x#tile/a.png", 12)) == "s3://b/x#tile/a.png"
    assert frame_key("plain.png") == "plain.png"


def _frames(dataset: Path, split: str, count: int, size: int) -> list[np.ndarray]:
    paths = sorted((dataset / split).rglob("*.png"))[:count]
    return [np.asarray(Image.open(p).convert("RGB").resize((size, size), Image.Resampling.BILINEAR)) for p in paths]


def test_frames_no_larger_than_a_tile_score_exactly_as_untiled(synthetic_dataset: Path) -> None:
    """One tile per frame is the untiled path: same calibration, image scores and maps (up to float rounding)."""
    train, test = _frames(synthetic_dataset, "train", 8, 128), _frames(synthetic_dataset, "test", 4, 128)
    models = [Spade("lite0", image_size=128, pixel_k=3, tile=tile).fit(train, calibration_samples=4) for tile in (0, 128)]
    untiled, tiled = (m.predict(test) for m in models)
    assert models[0].calibration.image_threshold == pytest.approx(models[1].calibration.image_threshold, rel=1e-6)
    np.testing.assert_allclose(tiled.image_scores, untiled.image_scores, rtol=1e-6)
    for a, b in zip(tiled.maps, untiled.maps):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)
    assert tiled.neighbours == untiled.neighbours


def test_a_large_frame_scores_at_its_own_size_from_its_tiles(synthetic_dataset: Path) -> None:
    """Frames of 3x3 tiles: maps at the frame's size, neighbours named by frame, the bank a row per tile."""
    train, test = _frames(synthetic_dataset, "train", 6, 320), _frames(synthetic_dataset, "test", 3, 320)
    model = Spade("lite0", image_size=128, pixel_k=3, tile=128).fit(train, calibration_samples=3)
    assert len(model.bank_ids) == 6 * 9 and frame_key(model.bank_ids[0]) == "0"
    prediction = model.predict(test + [test[0][:100, :300]])
    assert [m.shape for m in prediction.maps] == [(320, 320)] * 3 + [(100, 300)]
    assert all(set(n) <= {str(i) for i in range(6)} and len(n) >= 1 for n in prediction.neighbours)
    assert model.calibration.n_images == 3  # frames, not tiles
    assert prediction.is_anomalous is not None and np.isfinite(prediction.image_scores).all()
    model.save("memory://tiling/model")  # the tiling is saved with the model: it scores the same frames alike
    loaded = Spade.load("memory://tiling/model")
    assert loaded.config.tiling == model.config.tiling == Tiling(128, 32)
    again = loaded.predict(test[:1])
    np.testing.assert_array_equal(again.image_scores, prediction.image_scores[:1])
    np.testing.assert_array_equal(again.maps[0], prediction.maps[0])


def test_an_ignore_mask_zeroes_each_tile_and_the_stitched_frame(synthetic_dataset: Path) -> None:
    """A bright patch painted inside the ignored corner of a tiled frame changes neither its map nor its map maximum."""
    train, test = _frames(synthetic_dataset, "train", 6, 320), _frames(synthetic_dataset, "test", 1, 320)
    ignored = np.zeros((320, 320), dtype=bool)
    ignored[:160, :160] = True  # the patch's 60 px and the reach of its features around it
    plain = Spade("lite0", image_size=128, pixel_k=3, tile=128).fit(train, calibration_samples=3)
    masked = Spade("lite0", image_size=128, pixel_k=3, tile=128, ignore_mask=ignored).fit(train, calibration_samples=3)
    patched = test[0].copy()
    patched[20:80, 20:80] = 255
    seen = plain.predict([patched])
    clean, hidden = masked.predict([test[0], patched]).maps
    assert seen.maps[0][20:80, 20:80].mean() > 2 * seen.maps[0][200:, 200:].mean()  # the patch shows without a mask
    assert (hidden[ignored] == 0).all() and (hidden[~ignored] > 0).all()
    assert hidden.max() == pytest.approx(clean.max(), rel=0.05)
    assert masked.calibration.pixel_threshold <= plain.calibration.pixel_threshold  # calibrated on masked tiles
