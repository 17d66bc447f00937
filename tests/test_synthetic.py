"""The embedded demo dataset: right layout, visible defects under their masks, reproducible."""

from __future__ import annotations

import time

import numpy as np
import pytest
from scipy import ndimage

from spade_ray.apps.synthetic import DEFECT_TYPES, make_synthetic_dataset
from spade_ray.storage.datasets import load_mvtec
from spade_ray.storage.images import load_image, load_mask


@pytest.fixture(scope="module")
def default_dataset(tmp_path_factory):
    root = tmp_path_factory.mktemp("synthetic") / "data"
    start = time.perf_counter()
    make_synthetic_dataset(root)
    elapsed = time.perf_counter() - start
    return root, elapsed


def gray(uri: str) -> np.ndarray:
    return load_image(uri).astype(np.float64).mean(axis=2)


def ring_contrast(image: np.ndarray, mask: np.ndarray) -> float:
    """Mean inside the mask minus mean of a ring around it, in units of the ring's std."""
    ring = ndimage.binary_dilation(mask, iterations=6) & ~mask
    return float((image[mask].mean() - image[ring].mean()) / image[ring].std())


def test_default_dataset_has_the_mvtec_layout(default_dataset):
    # (its generation time is printed by the demo, not asserted: timing checks flake on a loaded machine)
    root, _ = default_dataset

    ds = load_mvtec(str(root))
    assert len(ds.train) == 40
    assert len(ds.test) == 10 + 3 * 8
    assert ds.defect_types == sorted(DEFECT_TYPES) == ["crack", "scratch", "spot"]
    assert ds.train[0].relpath == "train/good/000.png"
    assert all((s.mask_uri is not None) == (s.label == 1) for s in ds.test)
    assert load_image(ds.train[0].uri).shape == (256, 256, 3)


def test_normal_images_share_a_texture_but_are_not_identical(default_dataset):
    root, _ = default_dataset
    images = [gray(str(root / f"train/good/{i:03d}.png")) for i in range(5)]
    for a, b in zip(images, images[1:]):
        assert np.abs(a - b).mean() > 3.0  # different crops, streaks, grain, brightness
    stds = [im.std() for im in images]
    assert 6.0 < min(stds) and max(stds) < 14.0  # a real texture, of similar strength


@pytest.mark.parametrize("defect", DEFECT_TYPES)
def test_defects_are_visible_exactly_under_their_masks(default_dataset, defect):
    root, _ = default_dataset
    for i in range(8):
        image = gray(str(root / f"test/{defect}/{i:03d}.png"))
        mask = load_mask(str(root / f"ground_truth/{defect}/{i:03d}_mask.png"))
        assert mask.shape == image.shape
        assert 0.002 < mask.mean() < 0.06, "a few percent of the image, not nothing, not most"

        # Where the mask says, the image departs from its smoothed surroundings...
        residual = np.abs(image - ndimage.uniform_filter(image, 63))
        assert residual[mask].mean() > 1.3 * residual[~mask].mean()
        # ...by about the texture's own variation: visible, but not a trivial threshold.
        contrast = abs(ring_contrast(image, mask))
        assert 0.8 < contrast < 5.0
        # The same mask moved elsewhere finds nothing special: it is aligned.
        moved = np.roll(mask, (64, 96), axis=(0, 1))
        assert abs(ring_contrast(image, moved)) < 0.5 * contrast


def test_same_seed_same_bytes_other_seed_other_images(tmp_path):
    kw = dict(n_train=2, n_test_good=1, n_test_per_defect=1, size=64)
    a = make_synthetic_dataset(tmp_path / "a", seed=7, **kw)
    b = make_synthetic_dataset(tmp_path / "b", seed=7, **kw)
    c = make_synthetic_dataset(tmp_path / "c", seed=8, **kw)
    files = sorted(p.relative_to(a) for p in a.rglob("*.png"))
    assert len(files) == 2 + 1 + 3 + 3
    assert files == sorted(p.relative_to(b) for p in b.rglob("*.png"))
    assert all((a / f).read_bytes() == (b / f).read_bytes() for f in files)
    assert (a / "train/good/000.png").read_bytes() != (c / "train/good/000.png").read_bytes()


def test_refuses_to_write_into_a_non_empty_folder(tmp_path):
    (tmp_path / "precious.txt").write_text("keep me")
    with pytest.raises(FileExistsError, match=str(tmp_path)):
        make_synthetic_dataset(tmp_path, n_train=1, size=64)
    assert (tmp_path / "precious.txt").read_text() == "keep me"
