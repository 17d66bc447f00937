"""Find the images of a dataset in the MVTec AD folder layout, locally or in object storage.

Layout (the de-facto standard for anomaly detection data)::

    ROOT/train/good/*.png              normal images only
    ROOT/test/good/*.png               normal test images
    ROOT/test/<defect_type>/*.png      defective test images, one folder per type
    ROOT/ground_truth/<defect_type>/<stem>_mask.png

A defective test image without a mask file is kept, with ``mask_uri=None``: it
still counts for image-level metrics. Only listings happen here (one recursive
``find`` per call, which on S3 is a handful of paginated LIST requests, not one
request per folder); images are decoded later, by workers, via
:mod:`spade_ray.storage.images`.

URIs keep the form the caller gave: ``s3://bucket/x`` yields
``s3://bucket/x/train/good/1.png``, a local folder yields absolute paths, so
every returned URI can be handed straight back to ``fsspec.open``.
"""

from __future__ import annotations

import posixpath
from dataclasses import dataclass
from typing import Any

from fsspec.implementations.local import LocalFileSystem

from spade_ray.storage.urls import join, relative, resolve

__all__ = ["IMAGE_EXTENSIONS", "MVTecDataset", "Sample", "list_images", "load_mvtec"]

IMAGE_EXTENSIONS = frozenset({".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff"})

GOOD = "good"
_GLOB_CHARS = "*?["


@dataclass(frozen=True)
class Sample:
    """One image of the dataset, with what is known about it."""

    uri: str
    label: int  # 0 normal, 1 defective
    defect_type: str  # "good" for normal images
    mask_uri: str | None
    relpath: str  # posix path relative to ROOT, e.g. "test/crack/001.png"


@dataclass(frozen=True)
class MVTecDataset:
    """The train (normal only) and test samples of one MVTec-layout dataset."""

    root: str
    train: list[Sample]
    test: list[Sample]

    @property
    def defect_types(self) -> list[str]:
        """Sorted defect folder names of the test split, without "good"."""
        return sorted({s.defect_type for s in self.test if s.defect_type != GOOD})

    @property
    def has_masks(self) -> bool:
        """True if at least one test sample has a ground-truth mask, so pixel metrics make sense."""
        return any(s.mask_uri is not None for s in self.test)


def _is_image_relpath(relpath: str) -> bool:
    """True for an image file by extension, outside hidden files and folders.

    Hidden entries are skipped: macOS leaves "._001.png" resource forks next to
    real images, and notebooks leave ".ipynb_checkpoints/" copies; neither is data.
    """
    parts = relpath.split("/")
    if any(part.startswith(".") for part in parts):
        return False
    return posixpath.splitext(parts[-1])[1].lower() in IMAGE_EXTENSIONS


def load_mvtec(root: str, storage_options: dict[str, Any] | None = None) -> MVTecDataset:
    """List an MVTec-layout dataset at a local path or fsspec URL.

    Samples are sorted by relative path, so every run sees the same order.
    Raises FileNotFoundError when ``train/good`` or ``test`` is missing and
    ValueError when they hold no images, both naming ``root``.
    """
    fs, fs_root, base = resolve(root, storage_options)
    if not fs.isdir(fs_root):
        raise FileNotFoundError(f"dataset root {root!r} does not exist or is not a folder")

    for required in ("train/good", "test"):
        if not fs.isdir(f"{fs_root}/{required}"):
            raise FileNotFoundError(
                f"dataset root {root!r} has no {required}/ folder; expected the MVTec layout "
                "ROOT/train/good/*, ROOT/test/<type>/*, ROOT/ground_truth/<type>/<stem>_mask.png"
            )

    train_paths: list[str] = []
    test_paths: list[tuple[str, str]] = []  # (relpath, defect_type)
    mask_paths: set[str] = set()
    for path in fs.find(fs_root):
        rel = relative(path, fs_root)
        if rel is None:
            continue
        parts = rel.split("/")
        if len(parts) != 3 or not _is_image_relpath(rel):
            continue
        top, folder, _ = parts
        if top == "train" and folder == GOOD:
            train_paths.append(rel)
        elif top == "test":
            test_paths.append((rel, folder))
        elif top == "ground_truth":
            mask_paths.add(rel)

    if not train_paths:
        raise ValueError(
            f"dataset root {root!r}: train/good/ contains no images ({', '.join(sorted(IMAGE_EXTENSIONS))})"
        )
    if not test_paths:
        raise ValueError(f"dataset root {root!r}: test/<type>/ folders contain no images")

    train = [Sample(join(base, rel), 0, GOOD, None, rel) for rel in sorted(train_paths)]
    test = []
    for rel, defect_type in sorted(test_paths):
        mask_uri = None
        if defect_type != GOOD:
            stem = posixpath.splitext(posixpath.basename(rel))[0]
            mask_rel = f"ground_truth/{defect_type}/{stem}_mask.png"
            if mask_rel in mask_paths:
                mask_uri = join(base, mask_rel)
        test.append(Sample(join(base, rel), int(defect_type != GOOD), defect_type, mask_uri, rel))
    return MVTecDataset(root=root, train=train, test=test)


def list_images(root_or_glob: str, storage_options: dict[str, Any] | None = None) -> list[str]:
    """Every image file under a folder/prefix (recursively) or matching a glob, sorted.

    This is the input of an inference run over arbitrary, unlabelled images;
    non-image files (by extension) and dot-files are skipped. A single image
    path is returned as a one-element list.
    """
    fs, fs_path, base = resolve(root_or_glob, storage_options)
    if any(c in fs_path for c in _GLOB_CHARS):
        # detail=True: the listing already says what is a folder, no request per match
        matches = fs.glob(fs_path, detail=True)
        found = [p for p, info in matches.items() if info.get("type") != "directory"]
        # Rebuild URIs from the static part of the pattern, in both spellings.
        fs_static = fs_path[: min(fs_path.find(c) for c in _GLOB_CHARS if c in fs_path)]
        fs_static = fs_static[: fs_static.rfind("/") + 1]
        if isinstance(fs, LocalFileSystem):
            base_static = fs_static
        else:
            base_static = root_or_glob[: min(root_or_glob.find(c) for c in _GLOB_CHARS if c in root_or_glob)]
            base_static = base_static[: base_static.rfind("/") + 1]
    else:
        found = fs.find(fs_path)
        fs_static, base_static = fs_path, base

    uris = []
    for path in found:
        if path == fs_static:  # a single file was given
            if _is_image_relpath(posixpath.basename(path)):
                uris.append(base_static)
            continue
        rel = relative(path, fs_static)
        if rel is None:  # not expected from find/glob; fall back to the filesystem's own URL
            if _is_image_relpath(posixpath.basename(path)):
                uris.append(path if isinstance(fs, LocalFileSystem) else fs.unstrip_protocol(path))
        elif _is_image_relpath(rel):
            uris.append(join(base_static, rel))
    return sorted(uris)
