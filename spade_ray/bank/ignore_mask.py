"""A bank's ignore mask on storage: read a user's PNG, store it in a version, load it verified.

The user's file (``build-bank --ignore-mask PATH_OR_URL``, ``Spade(ignore_mask=...)``) is decoded
with :func:`~spade_ray.storage.images.decode_mask` (grey > 127 = white = ignore) and stored
re-encoded as a clean 0/255 PNG, so what the bank holds is exactly the region it applies,
whatever the original's format (anti-aliased edges, RGB, 16 bit).  Like a shard file it is
recorded with its sha256 in the manifest and checked before use: a replaced or damaged mask is
refused with a message naming it, never silently applied.
"""

from __future__ import annotations

import hashlib
from typing import Any

import numpy as np

from spade_ray.bank.manifest import BankManifest, IgnoreMaskEntry
from spade_ray.bank.shard_loader import manifest_relpath, read_manifest_file
from spade_ray.method.ignore import IgnoreRegion
from spade_ray.storage.images import ImageDecodeError, decode_mask
from spade_ray.storage.outputs import encode_png
from spade_ray.storage.urls import join, read_bytes, write_bytes

__all__ = ["IGNORE_MASK_FILE", "decode_ignore_mask", "encode_ignore_mask", "load_ignore_mask", "read_ignore_mask",
           "write_ignore_mask"]

IGNORE_MASK_FILE = "ignore_mask.png"


def decode_ignore_mask(data: bytes, url: str) -> IgnoreRegion:
    """The region of a mask file's bytes (white = ignore); ValueError naming ``url`` when they are no image."""
    try:
        return IgnoreRegion(decode_mask(data, url))
    except ImageDecodeError as exc:
        raise ValueError(f"ignore mask {url} is not a readable image ({exc.reason}); "
                         "expected a PNG at the camera's frame size, white = ignore") from None
    except ValueError as exc:
        raise ValueError(f"ignore mask {url}: {exc}") from None


def read_ignore_mask(url: str, storage_options: dict[str, Any] | None = None) -> IgnoreRegion:
    """The region of a user's mask file (white = ignore); ValueError naming the file when it is no image."""
    try:
        data = read_bytes(url, storage_options)
    except FileNotFoundError:
        raise FileNotFoundError(f"ignore mask {url} does not exist") from None
    return decode_ignore_mask(data, url)


def encode_ignore_mask(region: IgnoreRegion) -> bytes:
    """The region as the 0/255 PNG a bank or a saved model keeps."""
    return encode_png(region.mask.astype(np.uint8) * 255)


def write_ignore_mask(version_url: str, region: IgnoreRegion,
                      storage_options: dict[str, Any] | None = None) -> IgnoreMaskEntry:
    """Store ``region`` as ``version_url/ignore_mask.png``; returns its manifest entry (path relative to the bank root)."""
    data = encode_ignore_mask(region)
    write_bytes(join(version_url, IGNORE_MASK_FILE), data, storage_options)
    version = version_url.rstrip("/").rpartition("/")[2]
    height, width = region.shape
    return IgnoreMaskEntry(f"{version}/{IGNORE_MASK_FILE}", hashlib.sha256(data).hexdigest(), height, width)


def load_ignore_mask(bank_root: str, manifest: BankManifest,
                     storage_options: dict[str, Any] | None = None) -> IgnoreRegion | None:
    """The bank version's ignore region (None without one), checked against the manifest's sha256 and size."""
    entry = manifest.ignore_mask
    if entry is None:
        return None
    url = join(bank_root, manifest_relpath(entry.path, "ignore mask"))
    data = read_manifest_file(url, entry.sha256, storage_options, " (the ignore mask)")
    region = decode_ignore_mask(data, url)
    if region.shape != (entry.height, entry.width):
        raise ValueError(f"bank file {url} (the ignore mask) is {region.shape}, the manifest says "
                         f"{(entry.height, entry.width)}")
    return region
