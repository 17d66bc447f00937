"""What a job reads: INPUT (folder, URL prefix, glob, or a text/Parquet list of URIs) -> images.

Each input image gets a ``relpath``: its path relative to the input root.  Output keys (masks,
heatmaps) derive from it, so two files with the same name in different folders never collide.
For an explicit list of URIs the root is the longest common folder of the list.
"""

from __future__ import annotations

import os
import posixpath
from dataclasses import dataclass
from typing import Any

import fsspec

from spade_ray.storage.datasets import list_images
from spade_ray.storage.featurestore import image_id_for

__all__ = ["InputImage", "resolve_inputs"]

_LIST_SUFFIXES = (".txt", ".lst", ".csv")
_GLOB_CHARS = "*?["


@dataclass(frozen=True)
class InputImage:
    uri: str
    relpath: str
    image_id: str


def _is_local(url: str) -> bool:
    return "://" not in url or url.startswith("file://")


def _normalise_root(root: str) -> str:
    if root.startswith("file://"):
        root = root[len("file://"):]
    if "://" not in root:
        root = os.path.abspath(root)
    return root.rstrip("/")


def _common_folder(uris: list[str]) -> str:
    folders = [posixpath.dirname(u) for u in uris]
    prefix = os.path.commonprefix(folders)
    if not all(f == prefix or f.startswith(prefix.rstrip("/") + "/") for f in folders):
        prefix = prefix[: prefix.rfind("/")]
    return prefix.rstrip("/")


def _relative_to(uri: str, root: str) -> str:
    target = _normalise_root(uri) if _is_local(uri) else uri
    if root and target.startswith(root + "/"):
        return target[len(root) + 1:]
    # outside the root (lists mixing buckets): keep everything after the scheme
    return target.split("://", 1)[-1].lstrip("/")


def _read_list(url: str, storage_options: dict[str, Any] | None) -> list[str]:
    if url.endswith(".parquet"):
        import pyarrow.parquet as pq

        with fsspec.open(url, "rb", **(storage_options or {})) as fh:
            table = pq.read_table(fh, columns=["uri"])
        return [u for u in table.column("uri").to_pylist() if u]
    with fsspec.open(url, "rt", **(storage_options or {})) as fh:
        lines = [line.strip() for line in fh]
    return [line.split(",")[0].strip() for line in lines if line and not line.startswith("#")]


def resolve_inputs(source: str, storage_options: dict[str, Any] | None = None) -> list[InputImage]:
    """Every image named by ``source``, sorted by URI, with its relative path and stable id.

    Raises ValueError naming the source when it holds no image.
    """
    if source.endswith(_LIST_SUFFIXES) or source.endswith(".parquet"):
        uris = _read_list(source, storage_options)
        root = _common_folder([_normalise_root(u) if _is_local(u) else u for u in uris]) if uris else ""
    else:
        uris = list_images(source, storage_options)
        static = source
        if any(c in source for c in _GLOB_CHARS):
            static = source[: min(source.find(c) for c in _GLOB_CHARS if c in source)]
            static = static[: static.rfind("/") + 1] or "."
        root = _normalise_root(static)
        if len(uris) == 1 and _normalise_root(uris[0]) == root:  # a single file
            root = posixpath.dirname(root)
    if not uris:
        raise ValueError(f"no images found in {source!r} (looked for .png/.jpg/.jpeg/.bmp/.tif/.tiff files)")
    items = {u: InputImage(u, _relative_to(u, root), image_id_for(u)) for u in uris}
    return [items[u] for u in sorted(items)]
