"""A mixed archive in one nightly run: ``score --routes`` on a real local Ray with two real banks.

Two products, each with its own bank built by the distributed jobs from its own normal images, and
an archive ``line1/cam1/...``, ``line2/cam1/...`` plus a folder no route covers.  Each image must get
one row naming the bank its route points to, the unrouted one an error row, the report a section
per bank with that bank's thresholds; a rerun skips everything, a re-routed product is scored again
(its rows replaced), and a memory budget too small for both banks serves them one after the other.
The same run with the archive, the banks and the table on a real S3 server (SeaweedFS).
"""

from __future__ import annotations

import json
import re
import shutil
from pathlib import Path

import pytest

from spade_ray.apps.cli import main
from spade_ray.bank.store import open_bank
from spade_ray.distributed.bank_plan import served_bytes
from spade_ray.distributed.score_job import run_score
from spade_ray.storage.results import read_results
from spade_ray.storage.routes import load_routes

pytestmark = pytest.mark.timeout(600)



@pytest.fixture(scope="module")
def plant(ray_with_s3_env, small_bank, tmp_path_factory) -> dict:
    """Bank 1 (the shared small bank) and bank 2 (another product, built here); an archive mixing both."""
    from spade_ray.apps.synthetic import make_synthetic_dataset
    from spade_ray.distributed.build_bank_job import run_build_bank
    from spade_ray.distributed.extract_job import run_extract

    work = tmp_path_factory.mktemp("plant")
    other = make_synthetic_dataset(work / "ds2", n_train=8, n_test_good=2, n_test_per_defect=1, size=64, seed=11)
    run_extract(str(other / "train" / "good"), str(work / "features2"), image_size=small_bank["image_size"], batch_size=8)
    run_build_bank(str(work / "features2"), str(work / "bank2"), shards=1, calibration_samples=4, image_k=2, pixel_k=3,
                   kappa=1)
    archive = work / "archive"
    for line, dataset in (("line1", small_bank["dataset"]), ("line2", other)):
        for i, image in enumerate(sorted((dataset / "test").rglob("*.png"))[:4]):
            (archive / line / "cam1").mkdir(parents=True, exist_ok=True)
            shutil.copy(image, archive / line / "cam1" / f"{i}.png")
    (archive / "line9").mkdir()
    shutil.copy(image, archive / "line9" / "stray.png")
    banks = {"line1": str(small_bank["bank"]), "line2": str(work / "bank2")}
    ids = {line: open_bank(url)[1].bank_id for line, url in banks.items()}
    return {"work": work, "archive": archive, "banks": banks, "ids": ids}


def _table(path: Path, line1: str, line2: str, extra: str = "") -> Path:
    path.write_text(f"routes:\n  - match: line1/cam*/**\n    bank: {line1}\n"
                    f"  - match: line2/\n    bank: {line2}\n    name: line 2\n{extra}")
    return path


def _rows(output: str) -> list[dict]:
    return read_results(output, ["relpath", "image_id", "bank_id", "status", "error"]).to_pylist()


@pytest.fixture(scope="module")
def routed(plant, tmp_path_factory) -> dict:
    """The night's run: the mixed archive scored with a table routing line1 and line2 (line9 has no route)."""
    work = tmp_path_factory.mktemp("routed")
    table = load_routes(str(_table(work / "routes.yaml", plant["banks"]["line1"], plant["banks"]["line2"])))
    out = work / "out"
    return {"out": out, "summary": run_score(str(plant["archive"]), table, str(out), batch_size=4), "table": table}


def test_a_routed_run_scores_each_image_against_its_bank_and_reports_per_bank(plant, routed) -> None:
    ids, summary, out = plant["ids"], routed["summary"], str(routed["out"])
    assert (summary.ok, summary.error, summary.skipped) == (8, 1, 0)
    rows = _rows(out)
    assert len(rows) == 9 and len({r["image_id"] for r in rows}) == 9
    for r in rows:
        line = r["relpath"].split("/")[0]
        if line == "line9":  # no route: an error row naming the image, never silently skipped
            assert r["status"] == "error" and r["bank_id"] is None
            assert r["error"].startswith("no bank for ") and "stray.png" in r["error"] and "routes.yaml" in r["error"]
        else:
            assert r["status"] == "ok" and r["bank_id"] == ids[line]
    assert summary.extra["no_bank"] == 1
    assert summary.extra["waves"] == [[ids["line1"], ids["line2"]]]  # both fit the default budget: served at once
    per_bank = summary.extra["banks"]
    assert {b["route"] for b in per_bank.values()} == {"line1/cam*/**", "line 2"}
    assert all(b["scored"] == 4 and b["ok"] == 4 and b["wave"] == 0 for b in per_bank.values())

    html = (routed["out"] / "report.html").read_text()
    assert html.count('<section class="bank">') == 2
    for bank_id, b in per_bank.items():  # each section shows its own bank's thresholds
        section = html.split(f"<td>bank id</td><td>{bank_id}</td>", 1)[1].split('<section class="bank">', 1)[0]
        assert f"<td>image threshold</td><td>{b['image_threshold']:.6g}</td>" in section
    assert per_bank[ids["line1"]]["image_threshold"] != per_bank[ids["line2"]]["image_threshold"]
    assert "no bank for" in html and "stray.png" in html

    again = run_score(str(plant["archive"]), routed["table"], out, batch_size=4)  # the rerun: everything is done
    assert (again.ok, again.error, again.skipped, again.skipped_error) == (0, 0, 9, 1)
    assert "waves" not in again.extra and len(_rows(out)) == 9


def test_rerouted_products_are_scored_again_bank_by_bank_within_the_memory_budget(plant, routed, tmp_path,
                                                                                   capsys) -> None:
    """The products swap banks, and the budget fits one bank only: two waves, one bank each, every row replaced."""
    banks, ids = plant["banks"], plant["ids"]
    out = str(tmp_path / "out")
    shutil.copytree(routed["out"], out)  # the night's output, as the run left it
    before = {r["relpath"]: r["bank_id"] for r in _rows(out)}
    swapped = _table(tmp_path / "swapped.yaml", banks["line2"], banks["line1"])
    budget_gib = max(served_bytes(open_bank(url)[1]) for url in banks.values()) / 2**30  # one fits, both do not
    code = main(["score", str(plant["archive"]), "--routes", str(swapped), "--output", out, "--batch-size", "4",
                 "--bank-memory", f"{budget_gib:.6f}", "--quiet", "--log-format", "json", "--max-error-rate", "0.5"])
    assert code == 0
    summary = json.loads([line for line in capsys.readouterr().out.splitlines() if '"waves"' in line][-1])
    assert summary["waves"] == [[ids["line2"]], [ids["line1"]]]  # bank by bank, in table order
    assert (summary["ok"], summary["skipped"]) == (8, 1)  # the unrouted image's row stays: still no route
    rows = _rows(out)
    assert len(rows) == 9 and len({r["image_id"] for r in rows}) == 9  # replaced, never doubled
    other = {ids["line1"]: ids["line2"], ids["line2"]: ids["line1"], None: None}
    assert {r["relpath"]: r["bank_id"] for r in rows} == {k: other[v] for k, v in before.items()}


def test_a_listing_in_many_chunks_gives_one_row_per_input_and_the_keys_of_one_chunk(plant, tmp_path) -> None:
    """Chunks of one folder group each: the same rows and output keys as one chunk, colliding names included."""
    from PIL import Image

    archive = tmp_path / "archive"
    images = sorted((plant["archive"] / "line1" / "cam1").glob("*.png"))
    for rel, image in [(f"line1/cam1/{p.name}", p) for p in images] + [
            ("line1/cam 1/0.png", images[0]), ("line1/cam_1/0.png", images[1]), ("line9/stray.png", images[2])]:
        (archive / rel).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy(image, archive / rel)
    Image.open(images[3]).convert("RGB").save(archive / "line1/cam1/0.jpg")  # its key collides with 0.png's
    table = load_routes(str(_table(tmp_path / "routes.yaml", plant["banks"]["line1"], plant["banks"]["line2"])))
    runs = {}
    for chunk in (1, 1000):
        out = str(tmp_path / f"out-{chunk}")
        summary = run_score(str(archive), table, out, batch_size=4, listing_chunk=chunk)
        assert (summary.ok, summary.error, summary.skipped) == (7, 1, 0)
        rows = read_results(out, ["relpath", "image_id", "status", "mask_uri"]).to_pylist()
        assert len(rows) == 8 and len({r["image_id"] for r in rows}) == 8
        runs[chunk] = {r["relpath"]: r["mask_uri"] and r["mask_uri"].removeprefix(out) for r in rows}
    assert runs[1] == runs[1000]
    masks = [m for m in runs[1].values() if m]
    assert len(masks) == 7 and len({m.lower() for m in masks}) == 7  # no two inputs share an output
    assert runs[1]["line1/cam1/1.png"] == "/masks/line1/cam1/1.png" and runs[1]["line1/cam1/0.png"] != "/masks/line1/cam1/0.png"
    again = run_score(str(archive), table, str(tmp_path / "out-1"), batch_size=4, listing_chunk=1)
    assert (again.ok, again.error, again.skipped, again.skipped_error) == (0, 0, 8, 1) and "waves" not in again.extra


def test_a_routed_run_on_s3_with_the_table_on_s3(plant, ray_with_s3_env, tmp_path, capsys) -> None:
    s3 = ray_with_s3_env
    bucket = s3.make_bucket()
    fs = s3.filesystem()
    fs.put(str(plant["archive"]) + "/", f"{bucket}/2026-11-28/", recursive=True)
    for line, url in plant["banks"].items():
        fs.put(url + "/", f"{bucket}/banks/{line}/", recursive=True)
    base = f"s3://{bucket}"
    # a CSV table whose routes match full URIs: the night's date is a wildcard
    fs.pipe(f"{bucket}/routes.csv", (f"match,bank,pixel_k\n{base}/*/line1/,{base}/banks/line1,\n"
                                     f"{base}/*/line2/**,{base}/banks/line2,2\n").encode())
    code = main(["score", f"{base}/2026-11-28/", "--routes", f"{base}/routes.csv", "--output", f"{base}/scored",
                 "--batch-size", "4", "--quiet", "--log-format", "json"])
    assert code == 0
    summary = json.loads([line for line in capsys.readouterr().out.splitlines() if '"stage": "score"' in line
                          and '"banks"' in line][-1])
    assert (summary["ok"], summary["error"], summary["no_bank"]) == (8, 1, 1)
    ids = {b["bank"].rsplit("/", 1)[1]: bank_id for bank_id, b in summary["banks"].items()}
    rows = read_results(f"{base}/scored", ["relpath", "bank_id", "status", "mask_uri"]).to_pylist()
    assert len(rows) == 9
    for r in rows:
        line = r["relpath"].split("/")[0]
        if line == "line9":
            assert r["status"] == "error" and r["bank_id"] is None
        else:
            assert r["bank_id"] == ids[line] and fs.exists(r["mask_uri"])
    # pixel_k 2 for line 2 differs from its bank's 3: that bank alone was recalibrated on its served shards
    assert summary["banks"][ids["line2"]]["recalibrated"] and not summary["banks"][ids["line1"]]["recalibrated"]
    report = fs.cat_file(f"{bucket}/scored/report.html").decode()
    assert len(re.findall('<section class="bank">', report)) == 2


def test_the_rebuild_job_rebuilds_every_routed_bank_from_its_normals(plant, tmp_path, capsys) -> None:
    import runpy

    from spade_ray.apps.synthetic import make_synthetic_dataset

    normals = {line: make_synthetic_dataset(tmp_path / line, n_train=5, n_test_good=1, n_test_per_defect=1, size=64,
                                            seed=seed) / "train" / "good" for line, seed in (("line1", 21), ("line2", 22))}
    rows = "".join(f"{line}/,{tmp_path}/banks/{line},{normals[line]},{tmp_path}/features/{line}\n" for line in normals)
    (tmp_path / "routes.csv").write_text(f"match,bank,normals,features\n{rows}line9/,{plant['banks']['line1']},,\n")
    rebuild = runpy.run_path(str(Path(__file__).resolve().parents[1] / "jobs" / "rebuild_bank.py"))
    code = rebuild["run"](["--routes", str(tmp_path / "routes.csv"), "--image-size", "64", "--batch-size", "8",
                           "--calibration-samples", "2", "--image-k", "2", "--pixel-k", "3", "--quiet"])
    assert code == 0
    for line in normals:  # each bank from its own normal images
        root, manifest = open_bank(str(tmp_path / "banks" / line))
        assert manifest.n_images == 5 and manifest.calibration is not None
    assert "routes.csv line 4: no normals/features" in capsys.readouterr().err  # named, and its bank left as it is
    assert open_bank(plant["banks"]["line1"])[1].version == 1
