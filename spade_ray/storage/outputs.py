"""What a user looks at, as files: output keys, and masks, heatmaps and overlays encoded as bytes.

Output keys come from the input's path relative to its root, so the same file name in two
folders never collides, and a key can never climb out of the output prefix.  Encoding is kept
apart from writing so a job can write a batch's files concurrently
(:func:`spade_ray.storage.urls.write_many`), each whole (readers never see half a PNG).
"""

from __future__ import annotations

import io
import posixpath
import re
from collections.abc import Iterable

import numpy as np
from PIL import Image

__all__ = ["encode_jpeg", "encode_npy", "encode_png", "heatmap_rgb", "output_folder_key", "output_key", "output_stem",
           "unique_output_stems"]


# Anchor colours of a perceptually ordered dark-to-bright map (black, purple, red, orange, yellow)
_HEAT_ANCHORS = np.array(
    [[0, 0, 4], [87, 16, 110], [188, 55, 84], [249, 142, 9], [252, 255, 164]], dtype=np.float32
)
_SAFE = re.compile(r"[^A-Za-z0-9._\-]+")


def output_stem(relpath: str) -> str:
    """A safe relative key without extension for an input's relative path: ``test/crack/001.jpg`` -> ``test/crack/001``.

    ``..``, empty and absolute components are dropped and odd characters replaced, so the key
    always stays below the output prefix.
    """
    parts = [p for p in relpath.replace("\\", "/").split("/") if p not in ("", ".", "..")]
    parts = [_SAFE.sub("_", p) for p in parts] or ["image"]
    stem, _ = posixpath.splitext(parts[-1])
    parts[-1] = stem if stem and stem not in (".", "..") else "image"
    return "/".join(parts)


def output_key(relpath: str, suffix: str = ".png") -> str:
    """A safe relative key for an input's relative path: ``test/crack/001.jpg`` -> ``test/crack/001.png``."""
    return output_stem(relpath) + suffix


def output_folder_key(relpath: str) -> str:
    """The folder part of the input's output stem, lowercased, its parts joined by NUL.

    Two inputs whose stems may collide in :func:`unique_output_stems` always share it, so a
    listing cut only where it changes can compute the keys chunk by chunk and get the same keys
    as over the whole listing.  Sorting by it sorts folder by folder, a folder before its
    subfolders (NUL sorts before every character a safe part may hold).
    """
    return "\0".join(output_stem(relpath).lower().split("/")[:-1])


def unique_output_stems(inputs: Iterable[tuple[str, str]]) -> dict[str, str]:
    """``{image_id: stem}`` for ``(image_id, relpath)`` pairs, no two stems equal (ignoring case).

    :func:`output_stem` alone can map two inputs to one key: ``a/001.png`` and ``a/001.jpg`` (the
    extension is replaced), ``a b.png`` and ``a_b.png`` (odd characters), the same path in two
    buckets of one URI list.  Every member of such a group gets ``-<first 8 hex of its image
    id>`` appended, so no output overwrites another's; everyone else keeps the plain key.  Case
    is ignored so that keys stay distinct on case-insensitive filesystems too.
    """
    pairs = list(inputs)
    stems = {image_id: output_stem(relpath) for image_id, relpath in pairs}
    groups: dict[str, list[str]] = {}
    for image_id, stem in stems.items():
        groups.setdefault(stem.lower(), []).append(image_id)
    for members in groups.values():
        if len(members) > 1:
            for image_id in members:
                stems[image_id] = f"{stems[image_id]}-{image_id[:8]}"
    return stems


def encode_png(image: np.ndarray) -> bytes:
    """PNG bytes of an HxW or HxWx3 uint8 image (masks and heatmaps: exact pixels, small for flat maps)."""
    buf = io.BytesIO()
    Image.fromarray(image).save(buf, format="PNG", optimize=False)
    return buf.getvalue()


def encode_jpeg(image: np.ndarray, quality: int = 85) -> bytes:
    """JPEG bytes of an HxWx3 uint8 image (overlays are photos: a JPEG is a fraction of a PNG's size)."""
    buf = io.BytesIO()
    Image.fromarray(np.asarray(image, dtype=np.uint8)).convert("RGB").save(buf, format="JPEG", quality=quality)
    return buf.getvalue()


def encode_npy(array: np.ndarray) -> bytes:
    """A raw float anomaly map as ``.npy`` bytes, for analysis and exact comparisons (no pickle)."""
    buf = io.BytesIO()
    np.save(buf, np.ascontiguousarray(array), allow_pickle=False)
    return buf.getvalue()


def heatmap_rgb(amap: np.ndarray, vmax: float, vmin: float = 0.0) -> np.ndarray:
    """An anomaly map as an RGB image on a fixed scale (``vmin`` black .. ``vmax`` bright yellow).

    A fixed scale (from the bank's calibration) keeps heatmaps of different images comparable;
    per-image min-max scaling would make every normal image look alarming.
    """
    span = max(vmax - vmin, 1e-12)
    t = np.clip((amap.astype(np.float32) - vmin) / span, 0.0, 1.0) * (len(_HEAT_ANCHORS) - 1)
    low = np.floor(t).astype(np.int64).clip(0, len(_HEAT_ANCHORS) - 2)
    frac = (t - low)[..., None]
    rgb = _HEAT_ANCHORS[low] * (1 - frac) + _HEAT_ANCHORS[low + 1] * frac
    return rgb.round().astype(np.uint8)
