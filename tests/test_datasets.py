"""Listing MVTec-layout datasets on local disk and through fsspec URLs."""

from __future__ import annotations

import uuid
from pathlib import Path

import fsspec
import pytest

from spade_ray.storage.datasets import MVTecDataset, Sample, list_images, load_mvtec

MAGNETIC_TILE = Path(__file__).resolve().parents[2] / "shared" / "datasets" / "magnetic_tile"

# Only names matter to the listing, so the "images" are a few bytes each.
SMALL_DATASET = [
    "train/good/000.png",
    "train/good/001.jpg",
    "train/good/002.JPEG",
    "train/good/README",  # not an image: ignored
    "train/good/._000.png",  # macOS resource fork: ignored
    "test/good/000.png",
    "test/crack/000.png",
    "test/crack/001.png",  # defective, but nobody drew its mask
    "test/spot/000.bmp",
    "ground_truth/crack/000_mask.png",
    "ground_truth/spot/000_mask.png",
    "README.md",
]


def write_files(root: Path, relpaths: list[str]) -> Path:
    for rel in relpaths:
        path = root / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(b"x")
    return root


def test_load_mvtec_reads_train_test_and_masks(tmp_path):
    root = write_files(tmp_path / "ds", SMALL_DATASET)
    ds = load_mvtec(str(root))

    assert isinstance(ds, MVTecDataset)
    assert [s.relpath for s in ds.train] == ["train/good/000.png", "train/good/001.jpg", "train/good/002.JPEG"]
    assert all(s.label == 0 and s.defect_type == "good" and s.mask_uri is None for s in ds.train)
    assert ds.train[0].uri == str(root / "train/good/000.png")

    assert ds.test == [
        Sample(str(root / "test/crack/000.png"), 1, "crack", str(root / "ground_truth/crack/000_mask.png"), "test/crack/000.png"),
        Sample(str(root / "test/crack/001.png"), 1, "crack", None, "test/crack/001.png"),
        Sample(str(root / "test/good/000.png"), 0, "good", None, "test/good/000.png"),
        Sample(str(root / "test/spot/000.bmp"), 1, "spot", str(root / "ground_truth/spot/000_mask.png"), "test/spot/000.bmp"),
    ]
    assert ds.defect_types == ["crack", "spot"]
    assert ds.has_masks


def test_relative_root_gives_absolute_uris(tmp_path, monkeypatch):
    write_files(tmp_path / "ds", SMALL_DATASET)
    (tmp_path / "elsewhere").mkdir()
    monkeypatch.chdir(tmp_path / "elsewhere")
    ds = load_mvtec("../ds/")
    assert ds.train[0].uri == str(tmp_path / "ds" / "train/good/000.png")
    assert list_images("../ds/test/*/*.bmp") == [str(tmp_path / "ds" / "test/spot/000.bmp")]


def test_dataset_without_any_mask_has_masks_false(tmp_path):
    root = write_files(tmp_path / "ds", ["train/good/a.png", "test/good/a.png", "test/dent/b.png"])
    ds = load_mvtec(str(root))
    assert not ds.has_masks
    assert [s.label for s in ds.test] == [1, 0]  # sorted by relpath: dent before good


@pytest.mark.parametrize(
    ("files", "error", "message"),
    [
        (["test/good/a.png"], FileNotFoundError, "train/good"),
        (["train/good/a.png"], FileNotFoundError, "test/"),
        (["train/good/README", "test/good/a.png"], ValueError, "train/good/ contains no images"),
        (["train/good/a.png", "test/good/notes.txt"], ValueError, "test/<type>/ folders contain no images"),
    ],
)
def test_broken_layout_errors_name_the_root(tmp_path, files, error, message):
    root = write_files(tmp_path / "broken", files)
    with pytest.raises(error, match=message) as info:
        load_mvtec(str(root))
    assert str(root) in str(info.value)


def test_missing_root_is_file_not_found(tmp_path):
    with pytest.raises(FileNotFoundError, match="nowhere"):
        load_mvtec(str(tmp_path / "nowhere"))


@pytest.fixture
def memory_root():
    """A dataset in fsspec's in-memory filesystem, standing in for s3://bucket/prefix."""
    fs = fsspec.filesystem("memory")
    prefix = f"/spade-test-{uuid.uuid4().hex}"
    for rel in SMALL_DATASET:
        fs.pipe(f"{prefix}/data/{rel}", b"x")
    yield f"memory:/{prefix}/data"
    fs.rm(prefix, recursive=True)


def test_load_mvtec_through_a_url_keeps_the_protocol(memory_root):
    ds = load_mvtec(memory_root + "/")
    assert ds.root == memory_root + "/"
    assert ds.train[0].uri == f"{memory_root}/train/good/000.png"
    crack = ds.test[0]
    assert crack.mask_uri == f"{memory_root}/ground_truth/crack/000_mask.png"
    with fsspec.open(crack.uri, "rb") as f:  # URIs open as they are
        assert f.read() == b"x"


def test_list_images_in_a_folder_recursively(tmp_path):
    root = write_files(tmp_path / "ds", SMALL_DATASET)
    found = list_images(str(root))
    assert found == sorted(str(root / rel) for rel in SMALL_DATASET if not rel.endswith(("README", ".md")) and "._" not in rel)
    assert len(found) == 9


def test_list_images_with_a_glob(tmp_path):
    root = write_files(tmp_path / "ds", SMALL_DATASET)
    assert list_images(str(root / "test/*/*.png")) == [
        str(root / "test/crack/000.png"),
        str(root / "test/crack/001.png"),
        str(root / "test/good/000.png"),
    ]
    assert list_images(str(root / "**/*_mask.png")) == [
        str(root / "ground_truth/crack/000_mask.png"),
        str(root / "ground_truth/spot/000_mask.png"),
    ]


def test_list_images_of_a_single_file_and_of_a_url(tmp_path, memory_root):
    root = write_files(tmp_path / "ds", SMALL_DATASET)
    assert list_images(str(root / "test/spot/000.bmp")) == [str(root / "test/spot/000.bmp")]
    assert list_images(f"{memory_root}/test") == [
        f"{memory_root}/test/crack/000.png",
        f"{memory_root}/test/crack/001.png",
        f"{memory_root}/test/good/000.png",
        f"{memory_root}/test/spot/000.bmp",
    ]
    assert list_images(f"{memory_root}/train/good/*.png") == [f"{memory_root}/train/good/000.png"]


@pytest.mark.skipif(not MAGNETIC_TILE.is_dir(), reason="shared magnetic_tile dataset not present")
def test_magnetic_tile_dataset():
    ds = load_mvtec(str(MAGNETIC_TILE))
    assert len(ds.train) == 762
    assert len(ds.test) == 582
    assert {s.defect_type for s in ds.test} == {"blowhole", "break", "crack", "fray", "uneven", "good"}
    assert ds.defect_types == ["blowhole", "break", "crack", "fray", "uneven"]
    defective = [s for s in ds.test if s.label == 1]
    assert len(defective) == 392
    assert all(s.mask_uri is not None and Path(s.mask_uri).is_file() for s in defective)
    assert all(s.mask_uri is None for s in ds.test if s.label == 0)
