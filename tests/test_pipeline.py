"""The distributed job on a real local Ray: extract -> build-bank (3 shards) -> score.

It must give the same numbers as the in-process ``Spade`` with the same settings, write one
result row per input (ok or error) with its mask, heatmap and overlay, a report of the output,
skip what is done on a rerun, and run unchanged with every path on a real S3 server.
"""

from __future__ import annotations

import json
import re
import shutil
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from spade_ray import Spade
from spade_ray.distributed.build_bank_job import run_build_bank
from spade_ray.distributed.extract_job import run_extract
from spade_ray.distributed.score_job import run_score
from spade_ray.method.calibration import Calibration
from spade_ray.storage.artifacts import ArtifactChoice
from spade_ray.storage.datasets import load_mvtec
from spade_ray.storage.results import read_results
from spade_ray.storage.sources import resolve_inputs

pytestmark = pytest.mark.timeout(600)

SETTINGS = {"image_k": 3, "pixel_k": 4, "kappa": 1}
IMAGE_SIZE = 128



@pytest.fixture(scope="module")
def dataset(tmp_path_factory) -> Path:
    from spade_ray.apps.synthetic import make_synthetic_dataset

    root = make_synthetic_dataset(tmp_path_factory.mktemp("pipe") / "ds", n_train=18, n_test_good=3,
                                  n_test_per_defect=2, size=IMAGE_SIZE, seed=3)
    (root / "test" / "good" / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n not really a png")
    return root


@pytest.fixture(scope="module")
def local_run(ray_with_s3_env, dataset, tmp_path_factory):
    out = tmp_path_factory.mktemp("run")
    ex = run_extract(str(dataset / "train" / "good"), str(out / "features"), image_size=IMAGE_SIZE, batch_size=8)
    bb = run_build_bank(str(out / "features"), str(out / "bank"), shards=3, calibration_samples=6, **SETTINGS)
    sc = run_score(str(dataset / "test"), str(out / "bank"), str(out / "scored"), batch_size=4, save_maps=True,
                   artifacts=ArtifactChoice(visuals="all"))
    return out, ex, bb, sc


def result_rows(output: str, storage_options=None) -> list[dict]:
    return read_results(output, None, storage_options).to_pylist()


def test_every_stage_reports_counts(local_run) -> None:
    _, ex, bb, sc = local_run
    assert (ex.ok, ex.error) == (18, 0)
    assert bb.extra["n_images"] == 18 and bb.extra["shards"] == 3
    assert bb.extra["bytes_per_image"] < 300 * 1024  # fp16 pyramids at 128 px are far below the 300 KB budget
    assert (sc.ok, sc.error, sc.skipped) == (9, 1, 0)
    assert "9 ok, 1 error, 0 skipped" in sc.line() and "images/s" in sc.line()


def test_bank_has_three_verified_shards_and_a_manifest_written_last(local_run) -> None:
    out, *_ = local_run
    manifest = json.loads((out / "bank" / "v0001" / "manifest.json").read_text())
    assert len(manifest["shards"]) == 3 and sum(s["n_images"] for s in manifest["shards"]) == 18
    assert all(len(sha) == 64 for s in manifest["shards"] for sha in s["files"].values())
    assert manifest["calibration"]["pixel_threshold"] > 0


def test_one_result_row_per_input_with_the_design_columns(local_run, dataset) -> None:
    out, *_ = local_run
    rows = result_rows(str(out / "scored"))
    inputs = resolve_inputs(str(dataset / "test"))
    assert sorted(r["image_id"] for r in rows) == sorted(i.image_id for i in inputs)
    for col in ("uri", "image_id", "image_score", "pixel_max", "is_anomalous", "mask_uri", "heatmap_uri",
                "overlay_uri", "neighbours", "bank_id", "status", "error", "seconds"):
        assert col in rows[0]
    broken = [r for r in rows if r["uri"].endswith("broken.png")]
    assert broken[0]["status"] == "error" and "broken.png" in broken[0]["error"]
    ok = [r for r in rows if r["status"] == "ok"]
    assert all(Path(r["mask_uri"]).is_file() and Path(r["heatmap_uri"]).is_file() for r in ok)
    assert all(len(r["neighbours"]) == SETTINGS["image_k"] for r in ok)


def test_every_scored_image_gets_an_overlay_aligned_at_its_own_size(local_run, dataset) -> None:
    out, *_ = local_run
    ok = [r for r in result_rows(str(out / "scored")) if r["status"] == "ok"]
    assert len(ok) == 9
    for row in ok:
        key = row["relpath"].rsplit(".", 1)[0]
        assert row["overlay_uri"] == str(out / "scored" / "overlays" / f"{key}.jpg")
        overlay = Image.open(row["overlay_uri"])
        assert overlay.format == "JPEG" and overlay.size == Image.open(row["uri"]).size == Image.open(row["mask_uri"]).size
    assert len(list((out / "scored" / "overlays").rglob("*.jpg"))) == 9


def test_score_writes_a_self_contained_report_of_the_output(local_run, tmp_path) -> None:
    from browser import assert_not_blank, render

    out, _, bb, sc = local_run
    html = (out / "scored" / "report.html").read_text()
    assert sc.extra["report"] == str(out / "scored" / "report.html")
    assert '<b>10</b>images' in html and '<b>9</b>ok' in html and '<b>1</b>error' in html
    assert f'<b>{sc.extra["anomalous"]}</b>anomalous' in html and "broken.png" in html  # the error is listed
    assert f"{bb.extra['image_threshold']:.6g}" in html and html.count("<svg") == 2
    assert html.count('<section class="item">') == 9  # fewer images than --report-top 24: all of them
    # the nearest normal images are the bank's own sources, reachable here: thumbnails, not names
    assert html.count('<figure class="nb"><img src="data:image/jpeg;base64,') == 9 * SETTINGS["image_k"]
    assert not re.findall(r'(?:src|href)="(?!data:)', html)
    page = render(out / "scored" / "report.html", tmp_path)
    assert page.n_images == 9 * (3 + SETTINGS["image_k"]) and page.broken == []
    assert_not_blank(page.screenshot)


def test_distributed_scores_and_maps_equal_in_process_spade(local_run, dataset) -> None:
    out, *_ = local_run
    data = load_mvtec(str(dataset))
    model = Spade("lite0", image_size=IMAGE_SIZE, **SETTINGS).fit([s.uri for s in data.train], calibration_samples=6)
    # the same normal images calibrate both (chosen by URI hash, not by bank order or shard), so the
    # scales the image score combines with, and the thresholds, agree as well
    bank = Calibration(**json.loads((out / "bank" / "v0001" / "manifest.json").read_text())["calibration"])
    for name in ("knn_scale", "map_scale", "image_threshold", "pixel_threshold"):
        assert getattr(model.calibration, name) == pytest.approx(getattr(bank, name), rel=1e-5), name
    test = [s for s in data.test if not s.uri.endswith("broken.png")]
    pred = model.predict([s.uri for s in test])
    rows = {r["uri"]: r for r in result_rows(str(out / "scored"))}
    for sample, knn, score, amap in zip(test, pred.knn_scores, pred.image_scores, pred.maps):
        row = rows[sample.uri]
        assert row["knn_score"] == pytest.approx(float(knn), rel=1e-3)
        assert row["image_score"] == pytest.approx(float(score), rel=1e-3)
        distributed_map = np.load(out / "scored" / "maps" / sample.relpath.replace("test/", "", 1).replace(".png", ".npy"))
        assert distributed_map.shape == amap.shape
        np.testing.assert_allclose(distributed_map, amap, rtol=1e-3, atol=1e-3 * float(amap.max()))


def test_rerun_skips_done_images_and_overwrite_redoes_them(local_run, dataset) -> None:
    out, *_ = local_run
    again = run_score(str(dataset / "test"), str(out / "bank"), str(out / "scored"), batch_size=4)
    assert (again.ok, again.error, again.skipped) == (0, 0, 10)
    assert len(result_rows(str(out / "scored"))) == 10
    redo = run_score(str(dataset / "test"), str(out / "bank"), str(out / "scored"), batch_size=4, overwrite=True)
    assert (redo.ok, redo.error, redo.skipped) == (9, 1, 0)
    assert len(result_rows(str(out / "scored"))) == 10


def test_add_to_makes_a_new_version_and_keeps_the_old_one(local_run, dataset, tmp_path) -> None:
    out, *_ = local_run
    extra = tmp_path / "more"
    extra.mkdir()
    for p in sorted((dataset / "test" / "good").glob("00*.png"))[:2]:
        shutil.copy(p, extra / f"new-{p.name}")
    run_extract(str(extra), str(tmp_path / "features"), image_size=IMAGE_SIZE)
    bank = tmp_path / "bank"
    shutil.copytree(out / "bank", bank)
    added = run_build_bank(str(tmp_path / "features"), None, add_to=str(bank), shards=1, calibration_samples=4, **SETTINGS)
    assert added.extra["version"] == "v0002" and added.extra["n_images"] == 20
    v2 = json.loads((bank / "v0002" / "manifest.json").read_text())
    assert v2["parent"] == "v0001" and len(v2["shards"]) == 4
    # the old version stays complete and readable, and the latest version is the new one
    from spade_ray.bank.shard_loader import load_shard
    from spade_ray.bank.store import open_bank

    root, v1 = open_bank(str(bank / "v0001"))
    assert v1.n_images == 18 and sum(len(load_shard(root, e)) for e in v1.shards) == 18
    assert open_bank(str(bank))[1].version == 2


def test_the_whole_pipeline_on_s3(ray_with_s3_env, dataset) -> None:
    s3 = ray_with_s3_env
    bucket = s3.make_bucket()
    fs = s3.filesystem()
    fs.put(str(dataset) + "/", f"{bucket}/ds/", recursive=True)
    base = f"s3://{bucket}"
    # no storage options anywhere: driver and workers find endpoint and credentials in AWS_* variables
    ex = run_extract(f"{base}/ds/train/good", f"{base}/features", image_size=IMAGE_SIZE, batch_size=8)
    bb = run_build_bank(f"{base}/features", f"{base}/bank", shards=3, calibration_samples=6, **SETTINGS)
    sc = run_score(f"{base}/ds/test", f"{base}/bank", f"{base}/out", batch_size=4)
    assert (ex.ok, bb.extra["n_images"], sc.ok, sc.error) == (18, 18, 9, 1)
    rows = result_rows(f"{base}/out")
    assert len(rows) == 10
    ok = [r for r in rows if r["status"] == "ok"]
    assert all(r["mask_uri"].startswith(f"{base}/out/masks/") and fs.exists(r["mask_uri"]) for r in ok)
    # the nightly default: pictures for the flagged images only, masks for all
    for r in ok:
        if r["is_anomalous"]:
            assert r["overlay_uri"].startswith(f"{base}/out/overlays/") and fs.exists(r["overlay_uri"])
            assert fs.exists(r["heatmap_uri"])
        else:
            assert r["overlay_uri"] is None and r["heatmap_uri"] is None
    report = fs.cat_file(f"{bucket}/out/report.html").decode()
    assert report.count('<figure class="nb"><img src="data:') == 9 * SETTINGS["image_k"]  # normals read from S3
    assert fs.exists(f"{bucket}/bank/v0001/manifest.json")



def test_scoring_with_other_settings_recalibrates_against_the_served_bank(local_run, dataset, tmp_path) -> None:
    out, _, bb, sc = local_run
    assert sc.extra["recalibrated"] is False and sc.extra["image_threshold"] == bb.extra["image_threshold"]
    other = run_score(str(dataset / "test" / "good"), str(out / "bank"), str(tmp_path / "other"), batch_size=4,
                      scoring={"aggregate": 1, "image_scoring": "knn"})
    assert other.extra["recalibrated"] is True and other.ok > 0
    # raw features are farther apart than the default aggregated ones: the normal thresholds follow the settings
    assert other.extra["pixel_threshold"] > sc.extra["pixel_threshold"]
    rows = result_rows(str(tmp_path / "other"))
    assert all(r["image_score"] == pytest.approx(r["knn_score"]) for r in rows)  # knn: the image score is the kNN score
