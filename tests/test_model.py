"""The in-process API: fit on normal images, predict scores and maps, save and load without pickle."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from PIL import Image

from spade_ray import Spade
from spade_ray.method.metrics import compute_metrics
from spade_ray.storage.datasets import load_mvtec
from spade_ray.storage.images import load_mask


@pytest.fixture(scope="module")
def fitted(synthetic_dataset):
    data = load_mvtec(str(synthetic_dataset))
    model = Spade("lite0", image_k=3, pixel_k=5, image_size=128, batch_size=8)
    model.fit([s.uri for s in data.train], ids=[s.relpath for s in data.train], calibration_samples=8)
    return model, data


def test_predict_gives_a_score_and_a_map_at_each_images_size(fitted) -> None:
    model, data = fitted
    odd = np.zeros((75, 203, 3), np.uint8) + 120  # non-square, not a multiple of anything
    gray = np.full((64, 90), 90, np.uint8)  # grayscale arrays are accepted too
    pred = model.predict([data.test[0].uri, odd, gray])
    assert pred.image_scores.shape == (3,)
    assert [m.shape for m in pred.maps] == [(128, 128), (75, 203), (64, 90)]
    assert all(m.dtype == np.float32 and np.isfinite(m).all() for m in pred.maps)
    assert len(pred.neighbours[0]) == 3 and all(n.startswith("train/good/") for n in pred.neighbours[0])


def test_defects_score_higher_and_are_localised(fitted) -> None:
    model, data = fitted
    pred = model.predict([s.uri for s in data.test])
    labels = np.array([s.label for s in data.test])
    masks = [load_mask(s.mask_uri) if s.mask_uri else None for s in data.test]
    metrics = compute_metrics(pred.image_scores, labels, pred.maps, masks)
    # synthetic defects are clear: SPADE must rank them well above chance
    assert metrics["image_auroc"] > 0.8
    assert metrics["pixel_auroc"] > 0.85


def test_a_bank_image_is_its_own_nearest_neighbour(fitted) -> None:
    model, data = fitted
    pred = model.predict([data.train[3].uri])
    assert pred.neighbours[0][0] == data.train[3].relpath


def test_calibration_thresholds_come_from_normal_images(fitted) -> None:
    model, _ = fitted
    cal = model.calibration
    assert cal is not None and cal.n_images == 8
    assert cal.image_threshold >= np.median(cal.image_scores)
    assert cal.pixel_threshold >= np.median(cal.pixel_maxima)


def test_save_and_load_round_trip_without_pickle(fitted, tmp_path) -> None:
    model, data = fitted
    model.save(tmp_path / "m")
    meta = json.loads((tmp_path / "m" / "spade.json").read_text())
    assert meta["weights_sha256"] == model.weights_sha256 and meta["config"]["pixel_k"] == 5
    loaded = Spade.load(tmp_path / "m")
    uris = [s.uri for s in data.test[:3]]
    a, b = model.predict(uris), loaded.predict(uris)
    np.testing.assert_allclose(a.image_scores, b.image_scores, rtol=1e-6)
    for x, y in zip(a.maps, b.maps):
        np.testing.assert_allclose(x, y, rtol=1e-6)
    assert loaded.calibration == model.calibration


def test_loading_refuses_other_weights(fitted, tmp_path) -> None:
    model, _ = fitted
    model.save(tmp_path / "m2")
    meta_path = tmp_path / "m2" / "spade.json"
    meta = json.loads(meta_path.read_text())
    meta["weights_sha256"] = "0" * 64
    meta_path.write_text(json.dumps(meta))
    with pytest.raises(ValueError, match="sha256"):
        Spade.load(tmp_path / "m2").predict([np.zeros((32, 32, 3), np.uint8)])


def test_a_folder_without_spade_json_is_not_a_model(tmp_path) -> None:
    with pytest.raises(FileNotFoundError, match="spade.json"):
        Spade.load(tmp_path)


def test_paper_protocol_maps_are_in_the_224_crop_frame(synthetic_dataset, tmp_path) -> None:
    data = load_mvtec(str(synthetic_dataset))
    model = Spade(protocol="paper", image_k=1, pixel_k=2, image_scoring="knn")
    model.fit([s.uri for s in data.train[:4]], calibration_samples=0)
    img = np.asarray(Image.open(data.test[0].uri).convert("RGB").resize((300, 200)))
    assert model.predict([img]).maps[0].shape == (224, 224)


def test_predict_before_fit_says_what_to_do() -> None:
    with pytest.raises(RuntimeError, match="fit"):
        Spade().predict([np.zeros((32, 32, 3), np.uint8)])


def test_bad_settings_are_refused() -> None:
    with pytest.raises(ValueError, match="pixel_k"):
        Spade(pixel_k=0)
    with pytest.raises(ValueError, match="protocol"):
        Spade(protocol="crop")


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize("matching", ["exact", "coarse-to-fine"])
def test_cuda_scores_equal_cpu_scores(synthetic_dataset, matching: str) -> None:
    from spade_ray.storage.datasets import load_mvtec

    data = load_mvtec(str(synthetic_dataset))
    train, test = [s.uri for s in data.train], [s.uri for s in data.test[:6]]
    cpu = Spade("lite0", matching=matching, image_scoring="knn", device="cpu").fit(train, calibration_samples=0).predict(test)
    gpu = Spade("lite0", matching=matching, image_scoring="knn", device="cuda").fit(train, calibration_samples=0).predict(test)
    np.testing.assert_allclose(gpu.image_scores, cpu.image_scores, rtol=1e-3)
    for a, b in zip(gpu.maps, cpu.maps):
        assert np.abs(a - b).max() <= 1e-2 * np.abs(b).max()
