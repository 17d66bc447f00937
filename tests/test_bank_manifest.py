"""The typed bank manifest: the file it writes and the bank id it gives are those of the dict-based format."""

from __future__ import annotations

import dataclasses
import hashlib
import json

import pytest

from spade_ray.bank.manifest import BankManifest, ShardEntry
from spade_ray.bank.store import feature_meta_of, make_manifest, open_bank, write_manifest
from spade_ray.method.config import LEGACY_SCORING
from spade_ray.method.tiling import Tiling
from spade_ray.storage.featurestore import FeatureMeta

META = FeatureMeta("lite0", "ab" * 32, 64, "full", [(3, 8, 8), (5, 4, 4)], 6)
FILES = ("ids.json", "index.faiss", "global.npy", "level0.npy", "level1.npy")


def _entry(index: int, version: str, n: int, digits: str) -> ShardEntry:
    name = f"shard-{index:05d}"
    return ShardEntry(name, f"{version}/{name}", n, {f: d * 64 for f, d in zip(FILES, digits)})


def _manifest() -> BankManifest:
    shards = [_entry(0, "v0001", 3, "12345"), _entry(1, "v0002", 2, "6789a")]
    return make_manifest(2, META, shards, build={"n_shards": 2, "image_k": 5, "scoring": {"aggregate": 3}},
                         calibration={"image_threshold": 1.5, "pixel_threshold": 0.25, "settings": None},
                         parent="v0001", created="2026-01-02T03:04:05+00:00")


def test_manifest_json_and_bank_id_are_those_of_the_dict_format(tmp_path) -> None:
    # Expected values were produced by the dict-based make_manifest/write_manifest/bank_id_of this replaced,
    # for the same inputs (see _manifest).
    write_manifest(str(tmp_path / "v0002"), _manifest())
    data = (tmp_path / "v0002" / "manifest.json").read_bytes()
    assert (len(data), hashlib.sha256(data).hexdigest()) == (
        1702, "e81f48bae70533508bdcf8caf55eb38b661878f2999f4379c0528fee3f0295d9")
    _, read_back = open_bank(str(tmp_path))
    assert read_back == _manifest() and read_back.to_dict() == json.loads(data)
    assert read_back.bank_id == _manifest().bank_id == "v0002-74af2d2c3b5f"


def test_from_dict_is_where_a_manifest_is_checked() -> None:
    good = _manifest().to_dict()
    assert BankManifest.from_dict(good) == _manifest()
    with pytest.raises(ValueError, match="here: manifest lacks shards"):
        BankManifest.from_dict({k: v for k, v in good.items() if k != "shards"}, "here")
    with pytest.raises(ValueError, match="version must be an integer"):
        BankManifest.from_dict({**good, "version": "2"})
    with pytest.raises(ValueError, match="malformed manifest"):
        BankManifest.from_dict({**good, "levels": [{"channels": 3}]})
    with pytest.raises(ValueError, match="not a spade_ray bank manifest"):
        BankManifest.from_dict([good])


def test_to_dict_is_a_copy() -> None:
    manifest = _manifest()
    manifest.to_dict()["build"]["n_shards"] = 99
    assert manifest.build["n_shards"] == 2


def test_settings_a_bank_predates_take_their_legacy_values() -> None:
    manifest = _manifest()
    config = manifest.built_config()
    assert (config.backbone, config.image_size, config.protocol, config.image_k) == ("lite0", 64, "full", 5)
    assert config.image_scoring == LEGACY_SCORING["image_scoring"]
    saved = {"target_fpr": 0.01, "n_images": 4, "image_threshold": 1.5, "pixel_threshold": 0.25}
    calibration = make_manifest(1, META, [], build=manifest.build, calibration=saved).built_calibration()
    assert calibration is not None and calibration.image_threshold == 1.5
    assert calibration.settings == config.calibration_settings()  # saved without settings: the build's
    assert make_manifest(1, META, []).built_calibration() is None


def test_a_tiled_bank_records_its_tiling_and_scores_with_it() -> None:
    tiled = dataclasses.replace(META, tile=96, tile_overlap=24, scale=1.0)
    manifest = make_manifest(1, tiled, [_entry(0, "v0001", 12, "12345")], build={"image_k": 2})
    data = manifest.to_dict()
    assert data["tiling"] == {"tile": 96, "tile_overlap": 24, "scale": 1.0}
    back = BankManifest.from_dict(json.loads(json.dumps(data)))
    assert back.tiling == Tiling(96, 24) and back.bank_id == manifest.bank_id
    assert back.built_config().tiling == Tiling(96, 24)
    assert feature_meta_of(back) == tiled  # new features for --add-to must be cut the same way
    assert "tiling" not in _manifest().to_dict() and _manifest().built_config().tiling == Tiling()
