"""A nightly job on messy input: every file ends as exactly one row, outputs never collide, a bad bank is refused.

One real run of the distributed ``score`` job (local Ray, real bank, real image files) over an inbox
that mixes every pixel format a camera or an export tool produces with every kind of broken file.
"""

from __future__ import annotations

import io
import json
import shutil
import struct
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import ray
from PIL import Image

from spade_ray.apps.cli import main
from spade_ray.distributed.score_job import run_score
from spade_ray.distributed.shard_actors import BankLoadError
from spade_ray.storage.artifacts import ArtifactChoice
from spade_ray.storage.parquet import read_columns
from spade_ray.storage.results import read_results
from spade_ray.storage.sources import resolve_inputs

pytestmark = pytest.mark.timeout(300)

MAX_PIXELS = 50_000


@pytest.fixture(scope="module", autouse=True)
def _own_ray():
    """Each module that starts Ray stops it, so the next module can start one with its own settings."""
    yield
    ray.shutdown()


def _png(img: Image.Image, fmt: str = "PNG", **kw) -> bytes:
    buf = io.BytesIO()
    img.save(buf, format=fmt, **kw)
    return buf.getvalue()


def _unsupported_tiff() -> bytes:
    data = bytearray(_png(Image.new("L", (16, 16), 7), "TIFF"))
    ifd = struct.unpack("<I", data[4:8])[0]
    for i in range(struct.unpack("<H", data[ifd:ifd + 2])[0]):
        entry = ifd + 2 + 12 * i
        if struct.unpack("<H", data[entry:entry + 2])[0] == 262:
            data[entry + 8:entry + 10] = struct.pack("<H", 5)  # CMYK photometric with one sample: no PIL mode
    return bytes(data)


GOOD = ("good/gray.png", "good/rgba.png", "good/palette.png", "good/wide16.png", "good/cmyk.jpg", "good/rotated.jpg",
        "line1/cam/same.png", "line2/cam/same.png", "line1/cam/same.jpg", "odd/we ird#name!.png")
BAD = {  # file -> the reason its row must give
    "bad/zero.png": "empty input (0 bytes)",
    "bad/truncated.png": "truncated or corrupt",
    "bad/text.png": "not a recognised image format",
    "bad/tiny.png": "too small: 4x4",
    "bad/huge.png": f"300x300 = 90000 > max_pixels={MAX_PIXELS}",
    "bad/unsupported.tif": "unsupported or corrupt TIFF",
}


@pytest.fixture(scope="module")
def inbox(small_bank, tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("inbox") / "in"
    photo = Image.open(small_bank["dataset"] / "test" / "crack" / "000.png").convert("RGB")
    wide = (np.asarray(photo.convert("L"), dtype=np.uint16) * 257).astype(np.uint16)
    exif = Image.Exif()
    exif[0x0112] = 6  # stored sideways, shown rotated 90 degrees clockwise
    files = {
        "good/gray.png": _png(photo.convert("L")),
        "good/rgba.png": _png(photo.convert("RGBA")),
        "good/palette.png": _png(photo.convert("P")),
        "good/wide16.png": _png(Image.fromarray(wide)),
        "good/cmyk.jpg": _png(photo.convert("CMYK"), "JPEG", quality=95),
        "good/rotated.jpg": _png(photo.resize((96, 64)), "JPEG", exif=exif.tobytes(), quality=95),
        "line1/cam/same.png": _png(photo),
        "line2/cam/same.png": _png(photo.transpose(Image.Transpose.FLIP_LEFT_RIGHT)),
        "line1/cam/same.jpg": _png(photo, "JPEG", quality=90),
        "odd/we ird#name!.png": _png(photo),
        "bad/zero.png": b"",
        "bad/truncated.png": _png(photo)[:2000],
        "bad/text.png": b"this is a log file, not an image",
        "bad/tiny.png": _png(Image.new("RGB", (4, 4))),
        "bad/huge.png": _png(Image.new("RGB", (300, 300))),
        "bad/unsupported.tif": _unsupported_tiff(),
    }
    for rel, data in files.items():
        (root / rel).parent.mkdir(parents=True, exist_ok=True)
        (root / rel).write_bytes(data)
    assert Image.open(root / "good/wide16.png").mode == "I;16" and Image.open(root / "good/cmyk.jpg").mode == "CMYK"
    assert Image.open(root / "good/palette.png").mode == "P"
    return root


def read_rows(output: Path) -> list[dict]:
    return read_results(str(output)).to_pylist()


@pytest.fixture(scope="module")
def scored(small_bank, inbox, tmp_path_factory):
    out = tmp_path_factory.mktemp("scored") / "out"
    summary = run_score(str(inbox), str(small_bank["bank"]), str(out), batch_size=4, max_pixels=MAX_PIXELS,
                        artifacts=ArtifactChoice(visuals="all"))
    return out, summary


def test_every_input_ends_as_exactly_one_row(scored, inbox) -> None:
    out, summary = scored
    rows = read_rows(out)
    assert (summary.ok, summary.error) == (len(GOOD), len(BAD))
    assert sorted(r["image_id"] for r in rows) == sorted(i.image_id for i in resolve_inputs(str(inbox)))
    by_rel = {r["relpath"]: r for r in rows}
    assert {rel for rel, r in by_rel.items() if r["status"] == "ok"} == set(GOOD)


@pytest.mark.parametrize("relpath", sorted(BAD))
def test_a_bad_file_is_an_error_row_naming_the_file_and_why(scored, relpath) -> None:
    out, _ = scored
    [row] = [r for r in read_rows(out) if r["relpath"] == relpath]
    assert row["status"] == "error" and row["image_score"] is None and row["mask_uri"] is None
    assert row["uri"] in row["error"] and BAD[relpath] in row["error"]


def test_every_pixel_format_is_scored_and_masks_match_the_image_as_shown(scored) -> None:
    out, _ = scored
    rows = {r["relpath"]: r for r in read_rows(out)}
    for rel in GOOD:
        assert np.isfinite(rows[rel]["image_score"]) and len(rows[rel]["neighbours"]) == 2
        assert Image.open(rows[rel]["mask_uri"]).size == ((64, 96) if rel == "good/rotated.jpg" else (64, 64))
    # the 16-bit and the palette copy of one photo score like the photo itself (fixed 16->8 bit mapping)
    assert rows["good/wide16.png"]["image_score"] == pytest.approx(rows["good/gray.png"]["image_score"], rel=1e-3)


def test_outputs_never_collide_and_stay_below_the_output_prefix(scored) -> None:
    out, _ = scored
    ok = [r for r in read_rows(out) if r["status"] == "ok"]
    for column in ("mask_uri", "heatmap_uri"):
        uris = [r[column] for r in ok]
        assert len(set(uris)) == len(ok)  # same name in two folders, same stem with two extensions
        assert all(Path(u).resolve().is_relative_to(out.resolve()) and Path(u).is_file() for u in uris)
    masks = {r["relpath"]: r["mask_uri"] for r in ok}
    assert masks["line1/cam/same.png"] != masks["line1/cam/same.jpg"]
    assert masks["good/gray.png"] == str(out / "masks" / "good" / "gray.png")  # plain names keep the plain key
    assert "we_ird_name_" in masks["odd/we ird#name!.png"]


def test_result_rows_are_committed_per_batch(scored) -> None:
    out, _ = scored
    files = sorted((out / "results").glob("*.parquet"))
    assert len(files) >= 4 and all(pq.read_metadata(f).num_rows <= 4 for f in files)
    assert not [p for p in out.rglob("*") if ".tmp-" in p.name]  # no half-written file left behind


def test_max_error_rate_fails_the_job_but_keeps_every_row(scored, inbox, small_bank, capsys) -> None:
    out, _ = scored
    args = ["score", str(inbox), "--bank", str(small_bank["bank"]), "--output", str(out),
            "--max-pixels", str(MAX_PIXELS), "--quiet"]
    # a rerun: every image already has its row, and the earlier error rows still count
    assert main(args + ["--max-error-rate", "0.25"]) == 3
    captured = capsys.readouterr()
    assert "0 ok, 0 error, 16 skipped" in captured.out
    assert "6 of 16 images failed (37.5%), more than --max-error-rate 0.25" in captured.err
    assert main(args + ["--max-error-rate", "0.4"]) == 0
    assert main(args) == 0  # no limit: failed images never fail the job
    assert len(read_rows(out)) == 16


def test_extract_records_bad_files_and_honours_max_error_rate(inbox, tmp_path, capsys) -> None:
    features = tmp_path / "features"
    code = main(["extract", str(inbox / "bad"), "--output", str(features), "--image-size", "64",
                 "--max-pixels", str(MAX_PIXELS), "--max-error-rate", "0.5", "--quiet"])
    assert code == 3 and "6 of 6 images failed (100.0%)" in capsys.readouterr().err
    rows = read_columns(str(features), pa.schema([(c, pa.string()) for c in ("uri", "status", "error")])).to_pylist()
    assert len(rows) == 6 and {r["status"] for r in rows} == {"error"}
    assert all(BAD["bad/" + Path(r["uri"]).name] in r["error"] for r in rows)


def test_retry_errors_rescores_only_the_failed_images_and_keeps_one_row_each(scored, inbox, small_bank, tmp_path) -> None:
    out, _ = scored
    target = tmp_path / "out"
    shutil.copytree(out / "results", target / "results")
    fixed = inbox / "bad" / "zero.png"
    fixed.write_bytes((inbox / "good" / "gray.png").read_bytes())  # someone re-uploaded the empty file
    try:
        summary = run_score(str(inbox), str(small_bank["bank"]), str(target), max_pixels=MAX_PIXELS, retry_errors=True)
    finally:
        fixed.write_bytes(b"")
    assert (summary.ok, summary.error, summary.skipped) == (1, 5, 10)
    rows = read_rows(target)
    assert len(rows) == len({r["image_id"] for r in rows}) == 16
    assert {r["relpath"] for r in rows if r["status"] == "error"} == set(BAD) - {"bad/zero.png"}


# ----------------------------------------------------------------------------- a damaged or mismatched bank


@pytest.fixture()
def bank_copy(small_bank, tmp_path) -> Path:
    return Path(shutil.copytree(small_bank["bank"], tmp_path / "bank"))


def test_a_changed_bank_file_is_refused_naming_the_file(bank_copy, inbox, tmp_path) -> None:
    target = bank_copy / "v0001" / "shard-00001" / "global.npy"
    data = bytearray(target.read_bytes())
    data[-1] ^= 0x01
    target.write_bytes(bytes(data))
    with pytest.raises(BankLoadError, match=r"shard-00001/global\.npy is corrupt or was replaced: sha256"):
        run_score(str(inbox / "good"), str(bank_copy), str(tmp_path / "out"))
    assert not (tmp_path / "out" / "results").exists()


def test_a_bank_without_manifest_is_never_read(bank_copy, inbox, tmp_path) -> None:
    (bank_copy / "v0001" / "manifest.json").unlink()  # what a bank still being written looks like
    with pytest.raises(FileNotFoundError, match="no complete bank version"):
        run_score(str(inbox / "good"), str(bank_copy), str(tmp_path / "out"))


def test_a_newer_version_still_being_written_is_ignored(bank_copy, inbox, scored) -> None:
    out, first = scored
    shutil.copytree(bank_copy / "v0001" / "shard-00000", bank_copy / "v0002" / "shard-00000")  # no manifest yet
    again = run_score(str(inbox), str(bank_copy), str(out), max_pixels=MAX_PIXELS)
    assert again.extra["bank_id"] == first.extra["bank_id"] and again.extra["bank_id"].startswith("v0001-")
    assert again.skipped == 16


def test_a_bank_of_other_weights_is_refused_before_any_work(bank_copy, inbox, tmp_path) -> None:
    path = bank_copy / "v0001" / "manifest.json"
    manifest = json.loads(path.read_text())
    path.write_text(json.dumps({**manifest, "weights_sha256": "0" * 64}))
    with pytest.raises(ValueError, match=r"weights sha256 0{64}\), this scorer uses lite0 \(weights sha256 [0-9a-f]{64}"):
        run_score(str(inbox / "good"), str(bank_copy), str(tmp_path / "out"))
