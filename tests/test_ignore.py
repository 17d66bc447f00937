"""Ignore regions, in process: what lies under the mask never counts, and the mask survives resizing.

The bank here is real (a :class:`LocalBank` over synthetic feature pyramids) and so is the scorer:
a query that equals a bank image up to small noise, plus a bright blob of features in the top-left
corner, gives an anomaly map with a bright blob there; an ignore region over that corner must
zero it and leave the image score and the map maximum as they are without the blob.
"""

from __future__ import annotations

import numpy as np
import pytest

from spade_ray import Spade
from spade_ray.method.calibration import calibrate
from spade_ray.method.config import SpadeConfig
from spade_ray.method.features import FeatureBatch
from spade_ray.method.ignore import IgnoreRegion
from spade_ray.method.local_bank import LocalBank
from spade_ray.method.preprocess import Preprocessor
from spade_ray.method.scorer import Scorer

SIZE = 64  # network input; levels at strides 4, 8, 16
SHAPES = [(8, 16, 16), (16, 8, 8), (32, 4, 4)]
CONFIG = SpadeConfig("lite0", SIZE, "full", image_k=2, pixel_k=3, kappa=1, aggregate=1, matching="exact",
                     image_scoring="knn+map")
CORNER = np.zeros((SIZE, SIZE), bool)
CORNER[:40, :40] = True  # the blob's 16 px cell and the spread of upsampling and smoothing around it


def _features(rng: np.random.Generator, n: int, noise: float = 0.05, blob_in: tuple[int, ...] = ()) -> FeatureBatch:
    """n images: one shared normal pattern plus noise; those in ``blob_in`` get bright top-left features."""
    base = [rng.normal(size=shape).astype(np.float32) for shape in SHAPES]
    levels = [np.stack([b + noise * rng.normal(size=b.shape).astype(np.float32) for _ in range(n)]) for b in base]
    for level, (_, h, _) in zip(levels, SHAPES):
        cells = max(1, h // 8)  # the top-left 16 px at every level
        level[list(blob_in), :, :cells, :cells] += 3.0
    global_ = rng.normal(size=(n, 16)).astype(np.float32) * noise + rng.normal(size=16).astype(np.float32)
    return FeatureBatch(global_, [level.astype(np.float16).astype(np.float32) for level in levels])


def _bank(seed: int = 0, blob_in: tuple[int, ...] = ()) -> LocalBank:
    features = _features(np.random.default_rng(seed), 6, blob_in=blob_in)
    return LocalBank([f"normal-{i}.png" for i in range(6)], features.global_, features.levels, CONFIG.aggregate)


def _query(bank: LocalBank, blob: bool) -> FeatureBatch:
    rng = np.random.default_rng(7)
    levels = [level[:1].astype(np.float32) + 0.05 * rng.normal(size=level[:1].shape).astype(np.float32)
              for level in bank.levels]
    if blob:
        for level, (_, h, _) in zip(levels, SHAPES):
            level[:, :, : max(1, h // 8), : max(1, h // 8)] += 3.0
    return FeatureBatch(bank.global_[:1].copy(), levels)


def test_a_bright_blob_under_the_ignore_region_never_counts() -> None:
    bank = _bank()
    pre = Preprocessor(SIZE)
    plain = Scorer(CONFIG, bank, bank, scales=(1.0, 1.0))
    masked = Scorer(CONFIG, bank, bank, scales=(1.0, 1.0), ignore=IgnoreRegion(CORNER))
    blob_seen = plain.score(_query(bank, blob=True), [(SIZE, SIZE)], pre)
    blob_ignored = masked.score(_query(bank, blob=True), [(SIZE, SIZE)], pre)
    no_blob = masked.score(_query(bank, blob=False), [(SIZE, SIZE)], pre)

    assert blob_seen.maps[0][:16, :16].mean() > 5 * blob_seen.maps[0][48:, 48:].mean()  # the blob is bright
    assert (blob_ignored.maps[0][CORNER] == 0).all()
    assert blob_ignored.pixel_max[0] == pytest.approx(no_blob.pixel_max[0], rel=0.02)
    assert blob_ignored.image_scores[0] == pytest.approx(no_blob.image_scores[0], rel=0.02)
    assert blob_seen.pixel_max[0] > 3 * blob_ignored.pixel_max[0]


def test_an_image_of_another_size_gets_the_mask_resized_to_it() -> None:
    bank = _bank()
    masked = Scorer(CONFIG, bank, bank, scales=(1.0, 1.0), ignore=IgnoreRegion(CORNER))
    prediction = masked.score(_query(bank, blob=True), [(128, 96)], Preprocessor(SIZE))
    amap = prediction.maps[0]
    assert amap.shape == (128, 96)
    assert (amap[:80, :60] == 0).all() and (amap[80:, 60:] > 0).all()  # 40/64 of each side


def test_calibration_scores_the_bank_with_the_mask() -> None:
    bank = _bank(blob_in=(0,))  # one normal image has a fixture in the corner that the others lack
    bank.pyramids()
    plain = calibrate(Scorer(CONFIG, bank, bank), bank, samples=6, target_fpr=0.01, batch_size=4)
    scorer = Scorer(CONFIG, bank, bank, ignore=IgnoreRegion(CORNER))
    masked = calibrate(scorer, bank, samples=6, target_fpr=0.01, batch_size=4)

    rows = bank.calibration_rows(6)
    maps = scorer.match(bank.features(rows), exclude=rows, aggregated=True).maps
    assert masked.pixel_maxima == [float(m.max()) for m in maps]  # the maxima of the masked maps
    assert all((m[CORNER] == 0).all() for m in maps)
    assert masked.pixel_threshold < plain.pixel_threshold / 2  # the corner no longer sets the threshold


def test_thin_strokes_survive_the_reduction_to_the_network_input() -> None:
    frame = np.zeros((1000, 1600), bool)
    frame[500:502, 100:1500] = True  # a 2 px timestamp line
    region = IgnoreRegion(frame)
    full = region.at_input(Preprocessor(224))
    assert full.shape == (224, 224) and full.any(axis=1).sum() == 1 and full.sum() >= 190
    paper = region.at_input(Preprocessor(224, "paper"))  # resize 256 then centre-crop, like the image
    assert paper.shape == (224, 224) and paper.any(axis=1).sum() == 1
    assert (region.at_output(Preprocessor(224), 1000, 1600) == frame).all()  # the image's own frame: the mask as drawn


def test_a_mask_that_ignores_everything_is_refused() -> None:
    with pytest.raises(ValueError, match="whole frame"):
        IgnoreRegion(np.ones((8, 8), bool))


def test_a_saved_model_keeps_its_mask_and_refuses_a_changed_one(tmp_path) -> None:
    bank = _bank()
    model = Spade(SpadeConfig("lite0", SIZE), ignore_mask=CORNER.astype(np.uint8) * 255)
    model.set_bank(bank.ids, bank.global_, bank.levels)
    model.save(tmp_path / "model")
    loaded = Spade.load(tmp_path / "model")
    assert loaded.ignore is not None and (loaded.ignore.mask == CORNER).all()
    mask_file = tmp_path / "model" / "ignore_mask.png"
    mask_file.write_bytes(mask_file.read_bytes()[:-8])
    with pytest.raises(ValueError, match=f"{mask_file}.*corrupt"):
        Spade.load(tmp_path / "model")


def test_a_mask_that_is_no_image_is_refused_naming_it(tmp_path) -> None:
    path = tmp_path / "mask.png"
    path.write_bytes(b"not an image at all")
    with pytest.raises(ValueError, match=f"ignore mask {path} is not a readable image"):
        Spade(SpadeConfig("lite0", SIZE), ignore_mask=str(path))
