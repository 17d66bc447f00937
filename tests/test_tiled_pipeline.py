"""Tiled scoring on a real local Ray: extract --tile -> build-bank -> score gives the in-process numbers.

Frames larger than a tile (several tiles each, not square) are written as PNG files; the jobs read
them like any input.  The distributed bank holds one row per tile, calibrates frame by frame, and
the score job's rows, thresholds and full-frame maps equal those of ``Spade(tile=...)`` fitted on
the same files.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from spade_ray import Spade
from spade_ray.distributed.build_bank_job import run_build_bank
from spade_ray.distributed.extract_job import run_extract
from spade_ray.distributed.score_job import run_score
from spade_ray.method.calibration import Calibration
from spade_ray.method.tiling import Tiling, frame_key
from spade_ray.storage.artifacts import ArtifactChoice
from spade_ray.storage.featurestore import read_feature_meta, read_features
from spade_ray.storage.results import read_results

pytestmark = pytest.mark.timeout(600)

IMAGE_SIZE = 96
TILING = Tiling(96, 24)
SETTINGS = {"image_k": 2, "pixel_k": 4, "kappa": 1}
FRAME = (200, 280)  # height, width: 3 x 4 tiles of 96 px overlapping by at least 24


def _write_frames(source: Path, target: Path, count: int) -> list[Path]:
    target.mkdir(parents=True)
    paths = []
    for i, path in enumerate(sorted(source.rglob("*.png"))[:count]):
        image = Image.open(path).convert("RGB").resize((FRAME[1], FRAME[0]), Image.Resampling.BILINEAR)
        paths.append(target / f"frame{i:02d}.png")
        image.save(paths[-1])
    return paths


@pytest.fixture(scope="module")
def frames(synthetic_dataset: Path, tmp_path_factory: pytest.TempPathFactory) -> tuple[list[Path], list[Path]]:
    root = tmp_path_factory.mktemp("tiled")
    train = _write_frames(synthetic_dataset / "train", root / "train", 8)
    test = _write_frames(synthetic_dataset / "test", root / "test", 4)
    (root / "test" / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n not really a png")
    return train, test


@pytest.fixture(scope="module")
def tiled_run(ray_with_s3_env, frames, tmp_path_factory):
    train, test = frames
    out = tmp_path_factory.mktemp("tiled_run")
    ex = run_extract(str(train[0].parent), str(out / "features"), image_size=IMAGE_SIZE, batch_size=4, tiling=TILING)
    bb = run_build_bank(str(out / "features"), str(out / "bank"), shards=2, calibration_samples=4, **SETTINGS)
    sc = run_score(str(test[0].parent), str(out / "bank"), str(out / "scored"), batch_size=4, save_maps=True,
                   artifacts=ArtifactChoice(visuals="all"))
    return out, ex, bb, sc


def test_extract_writes_a_feature_row_per_tile_named_after_its_frame(tiled_run, frames) -> None:
    out, ex, *_ = tiled_run
    assert (ex.ok, ex.error) == (8, 0)
    files = sorted(str(p) for p in (out / "features").rglob("*.parquet"))
    table, meta = read_features(files)
    tiles_per_frame = len(TILING.boxes(*FRAME))
    assert table.num_rows == 8 * tiles_per_frame
    assert len({frame_key(i) for i in table.column("image_id").to_pylist()}) == 8
    assert read_feature_meta(files[0]).tiling == meta.tiling == TILING
    assert set(table.column("height").to_pylist()) == {FRAME[0]}  # the frame's own size on every tile row


def test_a_rerun_of_extract_finds_every_frame_done(tiled_run, frames) -> None:
    out, *_ = tiled_run
    again = run_extract(str(frames[0][0].parent), str(out / "features"), image_size=IMAGE_SIZE, batch_size=4,
                        tiling=TILING)
    assert (again.ok, again.skipped) == (0, 8)


def test_the_bank_records_its_tiling_and_score_uses_it(tiled_run) -> None:
    out, _, bb, sc = tiled_run
    manifest = json.loads((out / "bank" / "v0001" / "manifest.json").read_text())
    assert manifest["tiling"] == {"tile": 96, "tile_overlap": 24, "scale": 1.0}
    assert manifest["n_images"] == 8 * len(TILING.boxes(*FRAME))
    assert manifest["calibration"]["n_images"] == 4  # frames, not tiles
    assert (sc.ok, sc.error) == (4, 1)
    rows = read_results(str(out / "scored")).to_pylist()
    assert len(rows) == 5 and sum(r["status"] == "error" for r in rows) == 1
    for row in (r for r in rows if r["status"] == "ok"):
        mask = Image.open(out / "scored" / row["mask_uri"].split("/scored/", 1)[1])
        assert mask.size == (FRAME[1], FRAME[0])  # masks at the frame's own size


def test_tiled_distributed_scores_and_maps_equal_in_process_spade(tiled_run, frames) -> None:
    out, *_ = tiled_run
    train, test = frames
    model = Spade("lite0", image_size=IMAGE_SIZE, tile=TILING.tile, tile_overlap=TILING.overlap, batch_size=4,
                  **SETTINGS).fit([str(p) for p in train], calibration_samples=4)
    bank = Calibration(**json.loads((out / "bank" / "v0001" / "manifest.json").read_text())["calibration"])
    for name in ("knn_scale", "map_scale", "image_threshold", "pixel_threshold"):
        assert getattr(model.calibration, name) == pytest.approx(getattr(bank, name), rel=1e-5), name
    prediction = model.predict([str(p) for p in test])
    rows = {Path(r["uri"]).name: r for r in read_results(str(out / "scored")).to_pylist()}
    for path, knn, score, amap in zip(test, prediction.knn_scores, prediction.image_scores, prediction.maps):
        row = rows[path.name]
        assert row["knn_score"] == pytest.approx(float(knn), rel=1e-5)
        assert row["image_score"] == pytest.approx(float(score), rel=1e-5)
        distributed_map = np.load(out / "scored" / "maps" / path.name.replace(".png", ".npy"))
        assert distributed_map.shape == amap.shape == FRAME
        np.testing.assert_allclose(distributed_map, amap, rtol=1e-4, atol=1e-5 * float(amap.max()))


def test_a_tiled_bank_with_an_ignore_mask_scores_as_in_process(tiled_run, frames, tmp_path) -> None:
    """The mask (at frame size) is cut with the tiles: zero under it, the same numbers as ``Spade(tile=..., ignore_mask=...)``."""
    out, *_ = tiled_run
    train, test = frames
    ignored = np.zeros(FRAME, dtype=bool)
    ignored[:, FRAME[1] // 2:] = True  # the right half of every frame
    mask_png = tmp_path / "ignore.png"
    Image.fromarray(ignored.astype(np.uint8) * 255).save(mask_png)
    run_build_bank(str(out / "features"), str(tmp_path / "bank"), shards=2, calibration_samples=4,
                   ignore_mask=str(mask_png), **SETTINGS)
    run_score(str(test[0].parent), str(tmp_path / "bank"), str(tmp_path / "scored"), batch_size=4, save_maps=True)
    model = Spade("lite0", image_size=IMAGE_SIZE, tile=TILING.tile, tile_overlap=TILING.overlap, batch_size=4,
                  ignore_mask=str(mask_png), **SETTINGS).fit([str(p) for p in train], calibration_samples=4)
    bank = Calibration(**json.loads((tmp_path / "bank" / "v0001" / "manifest.json").read_text())["calibration"])
    assert model.calibration.pixel_threshold == pytest.approx(bank.pixel_threshold, rel=1e-5)
    prediction = model.predict([str(p) for p in test])
    for path, amap in zip(test, prediction.maps):
        distributed_map = np.load(tmp_path / "scored" / "maps" / path.name.replace(".png", ".npy"))
        assert (distributed_map[ignored] == 0).all() and distributed_map[~ignored].min() > 0
        np.testing.assert_allclose(distributed_map, amap, rtol=1e-4, atol=1e-5 * float(amap.max()))
