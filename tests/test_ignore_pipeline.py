"""Ignore regions end to end on a real local Ray: build-bank --ignore-mask, score, the report.

A dark square painted in the top-left corner of a normal image is a defect against a bank without
a mask; against the same images built with an ignore mask over that corner (a printed serial
number, say) its map and mask are zero there and the map maximum comes from the rest of the frame.
(At a 64 px network input every feature sees the whole image, so the square still raises the map a
little elsewhere; and the kNN part of the image score, from the pooled vector of the whole image, is
not masked: see the README.)  The distributed job and the in-process ``Spade`` with the same mask
give the same numbers; the bank records, inherits and verifies its mask.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import ray
from PIL import Image

from spade_ray import Spade
from spade_ray.apps.cli import main
from spade_ray.distributed.build_bank_job import run_build_bank
from spade_ray.distributed.extract_job import run_extract
from spade_ray.distributed.score_job import run_score
from spade_ray.storage.datasets import load_mvtec
from spade_ray.storage.results import read_results

pytestmark = pytest.mark.timeout(900)

SIZE = 64
SETTINGS = {"image_k": 2, "pixel_k": 3, "kappa": 1}
CORNER = (slice(0, 32), slice(0, 32))  # the ignored quarter of the 64 px frame


@pytest.fixture(scope="module")
def run(tmp_path_factory) -> dict[str, Path]:
    """One dataset, its features, a bank without and one with the ignore mask, each scoring the painted image."""
    from spade_ray.apps.synthetic import make_synthetic_dataset
    from spade_ray.distributed.runtime import init_ray

    work = tmp_path_factory.mktemp("ignore")
    dataset = make_synthetic_dataset(work / "ds", n_train=10, n_test_good=3, n_test_per_defect=1, size=SIZE, seed=5)
    image = np.asarray(Image.open(sorted((dataset / "test" / "good").glob("*.png"))[0]).convert("RGB")).copy()
    image[6:14, 6:14] = 0  # the "defect": a dark square where the serial number is printed
    (work / "inputs").mkdir()
    Image.fromarray(image).save(work / "inputs" / "painted.png")
    mask = np.zeros((SIZE, SIZE), np.uint8)
    mask[CORNER] = 255
    Image.fromarray(mask).save(work / "ignore.png")

    init_ray(num_cpus=2)
    run_extract(str(dataset / "train" / "good"), str(work / "features"), image_size=SIZE, batch_size=5)
    for name, ignore in (("plain", None), ("masked", str(work / "ignore.png"))):
        run_build_bank(str(work / "features"), str(work / f"bank-{name}"), shards=2, calibration_samples=4,
                       ignore_mask=ignore, **SETTINGS)
        run_score(str(work / "inputs"), str(work / f"bank-{name}"), str(work / f"out-{name}"), save_maps=True)
    yield {"work": work, "dataset": dataset}
    ray.shutdown()


def _row(out: Path) -> dict:
    (row,) = read_results(str(out)).to_pylist()
    assert row["status"] == "ok", row["error"]
    return row


def test_a_defect_inside_the_ignored_region_leaves_no_map_and_no_mask(run) -> None:
    work = run["work"]
    plain, masked = _row(work / "out-plain"), _row(work / "out-masked")
    # the square sets the plain map's maximum; under the mask only the rest of the frame counts
    assert plain["is_anomalous"] and plain["pixel_max"] > 2 * masked["pixel_max"]
    # the map's share of the knn+map image score is gone; the kNN part (pooled vector of the whole image) stays
    assert masked["image_score"] < plain["image_score"] and masked["knn_score"] == pytest.approx(plain["knn_score"])
    plain_mask = np.asarray(Image.open(work / "out-plain" / "masks" / "painted.png")) > 0
    masked_mask = np.asarray(Image.open(work / "out-masked" / "masks" / "painted.png")) > 0
    assert plain_mask[CORNER].any() and not masked_mask[CORNER].any()
    assert (np.load(work / "out-masked" / "maps" / "painted.npy")[CORNER] == 0).all()
    page = (work / "out-masked" / "report.html").read_text()
    assert "<h2>Ignored region</h2>" in page and "ignored region (bank&#x27;s ignore mask)" in page
    assert "Ignored region" not in (work / "out-plain" / "report.html").read_text()


def test_distributed_equals_in_process_spade_with_the_same_mask(run) -> None:
    work = run["work"]
    train = load_mvtec(str(run["dataset"])).train
    model = Spade("lite0", image_size=SIZE, ignore_mask=str(work / "ignore.png"), **SETTINGS)
    model.fit([s.uri for s in train], calibration_samples=4)
    bank = json.loads((work / "bank-masked" / "v0001" / "manifest.json").read_text())["calibration"]
    assert sorted(model.calibration.pixel_maxima) == pytest.approx(sorted(bank["pixel_maxima"]), rel=1e-6)
    prediction = model.predict([str(work / "inputs" / "painted.png")])
    row = _row(work / "out-masked")
    assert row["image_score"] == pytest.approx(float(prediction.image_scores[0]), rel=1e-6)
    assert row["pixel_max"] == pytest.approx(float(prediction.pixel_max[0]), rel=1e-6)
    np.testing.assert_allclose(np.load(work / "out-masked" / "maps" / "painted.npy"), prediction.maps[0],
                               rtol=1e-5, atol=1e-6)


def test_the_manifest_records_the_mask_and_add_to_inherits_it(run) -> None:
    work = run["work"]
    first = json.loads((work / "bank-masked" / "v0001" / "manifest.json").read_text())
    entry = first["ignore_mask"]
    assert (entry["path"], entry["height"], entry["width"]) == ("v0001/ignore_mask.png", SIZE, SIZE)
    assert "ignore_mask" not in json.loads((work / "bank-plain" / "v0001" / "manifest.json").read_text())
    run_build_bank(str(work / "features"), None, add_to=str(work / "bank-masked"), calibration_samples=4, **SETTINGS)
    second = json.loads((work / "bank-masked" / "v0002" / "manifest.json").read_text())
    assert second["ignore_mask"] == entry and not (work / "bank-masked" / "v0002" / "ignore_mask.png").exists()

    other = np.zeros((SIZE, SIZE), np.uint8)
    other[40:, 40:] = 255
    Image.fromarray(other).save(work / "other.png")
    assert main(["build-bank", str(work / "features"), "--add-to", str(work / "bank-masked"), "--ignore-mask",
                 str(work / "other.png"), "--calibration-samples", "4", "--quiet"]) == 0
    third = json.loads((work / "bank-masked" / "v0003" / "manifest.json").read_text())["ignore_mask"]
    assert third["path"] == "v0003/ignore_mask.png" and third["sha256"] != entry["sha256"]


def test_a_changed_mask_file_is_refused_naming_it(run, tmp_path, capsys) -> None:
    bank = tmp_path / "bank"
    shutil.copytree(run["work"] / "bank-masked" / "v0001", bank / "v0001")
    mask_file = bank / "v0001" / "ignore_mask.png"
    Image.fromarray(np.full((SIZE, SIZE), 255, np.uint8)).save(mask_file)
    with pytest.raises(ValueError, match=f"{mask_file} \\(the ignore mask\\) is corrupt or was replaced"):
        run_score(str(run["work"] / "inputs"), str(bank), str(tmp_path / "out"))

    not_an_image = tmp_path / "mask.png"
    not_an_image.write_text("serial number area")
    assert main(["build-bank", str(run["work"] / "features"), "--output", str(tmp_path / "new"),
                 "--ignore-mask", str(not_an_image), "--quiet"]) == 1
    assert f"ignore mask {not_an_image} is not a readable image" in capsys.readouterr().err
