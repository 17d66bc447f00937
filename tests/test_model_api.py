"""The notebook API: the decision with every prediction, models at any URL, and the nightly job's bank in process."""

from __future__ import annotations

import json
import shutil

import fsspec
import numpy as np
import pytest

from spade_ray import Spade
from spade_ray.bank.shard_loader import load_shard
from spade_ray.bank.store import open_bank
from spade_ray.storage.datasets import load_mvtec


@pytest.fixture(scope="module")
def fitted(synthetic_dataset):
    data = load_mvtec(str(synthetic_dataset))
    model = Spade("lite0", image_k=2, pixel_k=4, image_size=64, batch_size=8)
    model.fit([s.uri for s in data.train], calibration_samples=8)
    return model, [s.uri for s in data.test]


def test_a_calibrated_prediction_has_masks_at_the_pixel_threshold(fitted) -> None:
    model, test = fitted
    pred = model.predict(test)
    assert pred.is_anomalous is not None and pred.is_anomalous.dtype == bool and len(pred.masks) == len(test)
    for amap, mask, flagged in zip(pred.maps, pred.masks, pred.is_anomalous):
        assert mask.dtype == bool and mask.shape == amap.shape  # the map's frame: the image's own size
        np.testing.assert_array_equal(mask, amap > model.calibration.pixel_threshold)
        assert flagged or not mask.any()  # a masked pixel is over the pixel threshold, so the image is flagged
    assert pred.is_anomalous.any()  # the synthetic defects are plain enough to be flagged


def test_without_thresholds_there_is_no_decision(synthetic_dataset) -> None:
    train = [s.uri for s in load_mvtec(str(synthetic_dataset)).train[:4]]
    model = Spade("lite0", image_size=64, image_scoring="knn").fit(train, calibration_samples=0)
    pred = model.predict(train[:1])
    assert pred.is_anomalous is None and pred.masks is None and pred.maps[0].shape == (128, 128)


def test_save_and_load_at_a_url_keep_the_same_files(fitted, tmp_path) -> None:
    model, test = fitted
    url = "memory://spade-api-test/models/line3"
    assert model.save(url) == url and model.save(tmp_path / "local") == str(tmp_path / "local")
    fs = fsspec.filesystem("memory")
    names = sorted(p.rsplit("/", 1)[1] for p in fs.ls("/spade-api-test/models/line3", detail=False))
    assert names == ["global.npy", "level0.npy", "level1.npy", "level2.npy", "spade.json"]
    for name in names:  # the on-disk format is the same wherever it is written
        assert fs.cat_file(f"/spade-api-test/models/line3/{name}") == (tmp_path / "local" / name).read_bytes()
    loaded = Spade.load(url)
    a, b = model.predict(test[:3]), loaded.predict(test[:3])
    np.testing.assert_array_equal(a.image_scores, b.image_scores)
    assert loaded.calibration == model.calibration and [m.tolist() for m in a.masks] == [m.tolist() for m in b.masks]


@pytest.fixture(scope="module")
def from_bank(small_bank):
    return Spade.load(str(small_bank["bank"])), open_bank(str(small_bank["bank"]))


def test_loading_a_bank_takes_its_rows_settings_and_calibration(from_bank) -> None:
    model, (root, manifest) = from_bank
    shards = [load_shard(root, entry) for entry in manifest.shards]
    # rows in manifest order, as the score job numbers them: shard offset + row in the shard
    assert model.bank_ids == [uri for shard in shards for uri in shard.uris] and len(model.bank_ids) == manifest.n_images
    np.testing.assert_array_equal(model.bank.global_, np.concatenate([s.global_ for s in shards]))
    for level, parts in zip(model.bank.levels, zip(*(s.levels for s in shards))):
        np.testing.assert_array_equal(level, np.concatenate(parts))
    assert model.config == manifest.built_config() and model.calibration == manifest.built_calibration()
    assert model.weights_sha256 == manifest.weights_sha256


def test_a_bank_loaded_in_process_calibrates_as_the_build_did(from_bank) -> None:
    model, (_, manifest) = from_bank
    again = model.calibrate(samples=model.calibration.n_images, target_fpr=0.01)
    for name in ("knn_scale", "map_scale", "image_threshold", "pixel_threshold"):
        assert getattr(again, name) == pytest.approx(getattr(manifest.built_calibration(), name), rel=1e-5), name


def test_a_bank_loaded_in_process_scores_as_the_score_job(from_bank, small_bank, tmp_path) -> None:
    import ray

    from spade_ray.distributed.score_job import run_score
    from spade_ray.storage.results import read_results

    model, _ = from_bank
    test = str(small_bank["dataset"] / "test")
    was_running = ray.is_initialized()
    run_score(test, str(small_bank["bank"]), str(tmp_path / "scored"), batch_size=4)
    if not was_running:
        ray.shutdown()
    rows = read_results(str(tmp_path / "scored")).to_pylist()
    pred = model.predict([r["uri"] for r in rows])
    for row, score, flagged, neighbours in zip(rows, pred.image_scores, pred.is_anomalous, pred.neighbours):
        assert row["image_score"] == pytest.approx(float(score), rel=1e-3)
        assert (row["is_anomalous"], row["neighbours"]) == (bool(flagged), neighbours)


def test_a_version_folder_loads_that_version(from_bank, small_bank) -> None:
    model, _ = from_bank
    pinned = Spade.load(str(small_bank["bank"] / "v0001"))
    assert pinned.bank_ids == model.bank_ids and pinned.calibration == model.calibration


def test_a_bank_of_other_weights_is_refused(small_bank, tmp_path) -> None:
    bank = tmp_path / "bank"
    shutil.copytree(small_bank["bank"], bank)
    manifest_path = bank / "v0001" / "manifest.json"
    manifest = json.loads(manifest_path.read_text())
    manifest["weights_sha256"] = "0" * 64
    manifest_path.write_text(json.dumps(manifest))
    with pytest.raises(ValueError, match="weights sha256"):
        Spade.load(str(bank))


def test_a_folder_that_is_neither_model_nor_bank_says_what_it_looked_for(tmp_path) -> None:
    with pytest.raises(FileNotFoundError, match="spade.json.*no vNNNN/manifest.json"):
        Spade.load(tmp_path)
