"""The backbones carry real ImageNet weights, tap the documented pyramid, and never go random."""

from __future__ import annotations

import pickle

import numpy as np
import pytest
import torch
from PIL import Image

from spade_ray.method.backbones import BACKBONES, WeightsNotFoundError, load_backbone

skimage_data = pytest.importorskip("skimage.data")

# ImageNet class indices: 281 tabby, 282 tiger cat, 285 Egyptian cat; 967 espresso
CAT_CLASSES = {281, 282, 283, 284, 285}
ESPRESSO = 967


def _classify(backbone, image: np.ndarray) -> int:
    spec = backbone.spec
    x = np.asarray(Image.fromarray(image).resize((224, 224), Image.Resampling.BICUBIC), np.float32) / 255.0
    x = (x - np.array(spec.mean, np.float32)) / np.array(spec.std, np.float32)
    with torch.inference_mode():
        logits = backbone.trunk(torch.from_numpy(x).permute(2, 0, 1)[None].float())
    return int(logits.argmax())


@pytest.mark.parametrize("name", ["lite0", "lite1", "lite2"])
def test_lite_weights_are_imagenet(name: str) -> None:
    backbone = load_backbone(name, device="cpu")
    assert _classify(backbone, skimage_data.chelsea()) in CAT_CLASSES
    assert _classify(backbone, skimage_data.coffee()) == ESPRESSO


def test_lite0_pyramid_has_strides_4_8_16_and_a_1280d_vector(lite0) -> None:
    pyramid, pooled = lite0(torch.zeros(2, 3, 224, 224))
    assert [tuple(p.shape) for p in pyramid] == [(2, 24, 56, 56), (2, 40, 28, 28), (2, 112, 14, 14)]
    assert tuple(pooled.shape) == (2, 1280)
    assert [lvl.channels for lvl in BACKBONES["lite0"].levels] == [24, 40, 112]


def test_weights_hash_is_recorded(lite0) -> None:
    assert len(lite0.weights_sha256) == 64 and lite0.weights_path.endswith(".pth")


@pytest.mark.parametrize("name", ["wide_resnet50_2", "resnet18"])
def test_resnets_without_weights_fail_with_instructions(name: str, tmp_path, monkeypatch) -> None:
    monkeypatch.setenv("TORCH_HOME", str(tmp_path))  # an empty torchvision cache
    with pytest.raises(WeightsNotFoundError, match="--weights") as err:
        load_backbone(name)
    assert "random" in str(err.value)


def test_resnet18_loads_a_user_supplied_weights_file(tmp_path) -> None:
    torchvision = pytest.importorskip("torchvision")
    # a real state dict written by torchvision's own model: the loader must accept the format
    # (the values are not ImageNet's, which is why only the user may supply this file)
    path = tmp_path / "resnet18.pth"
    torch.save(torchvision.models.resnet18(weights=None).state_dict(), path)
    backbone = load_backbone("resnet18", weights=str(path), device="cpu")
    pyramid, pooled = backbone(torch.zeros(1, 3, 224, 224))
    assert [p.shape[1] for p in pyramid] == [64, 128, 256] and pooled.shape[1] == 512
    assert [224 // p.shape[-1] for p in pyramid] == [4, 8, 16]


def test_pickled_weights_are_refused(tmp_path) -> None:
    class Evil:
        def __reduce__(self):
            return (print, ("pwned",))

    path = tmp_path / "evil.pth"
    torch.save({"x": Evil()}, path)
    with pytest.raises(pickle.UnpicklingError, match="Weights only load failed"):  # torch refuses, nothing runs
        load_backbone("resnet18", weights=str(path))


def test_unknown_backbone() -> None:
    with pytest.raises(ValueError, match="unknown backbone"):
        load_backbone("vgg16")


def test_features_do_not_depend_on_batch_or_thread_count(lite0) -> None:
    """An image gets bitwise the same features alone at 1 thread (a Ray actor scoring the tail of a
    batch) as inside a batch of 17 at 2 threads (the in-process model).  Without pinning 1x1
    convolutions to oneDNN the two runs differ by ~1e-6, enough to flip a near-tie in retrieval."""
    x = torch.from_numpy(np.random.default_rng(0).uniform(-1, 1, (17, 3, 224, 224)).astype(np.float32))
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        alone_pyramid, alone_pooled = lite0(x[:1])
        torch.set_num_threads(2)
        batch_pyramid, batch_pooled = lite0(x)
    finally:
        torch.set_num_threads(threads)
    assert torch.equal(alone_pooled[0], batch_pooled[0])
    for alone, batched in zip(alone_pyramid, batch_pyramid):
        assert torch.equal(alone[0], batched[0])
