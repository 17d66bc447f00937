"""What a job reads: INPUT (folder, URL prefix, glob, or a text/Parquet list of URIs) -> images.

Each input image gets a ``relpath``: its path relative to the input root.  Output keys (masks,
heatmaps) derive from it, so two files with the same name in different folders never collide.
For an explicit list of URIs the root is the longest common folder of the list.
"""

from __future__ import annotations

import os
import posixpath
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import fsspec
import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from spade_ray.storage.datasets import _is_image_relpath, list_images
from spade_ray.storage.featurestore import image_id_for
from spade_ray.storage.outputs import output_folder_key
from spade_ray.storage.urls import join, relative, resolve

__all__ = ["LISTING_CHUNK", "InputImage", "list_chunks", "resolve_inputs"]

_LIST_SUFFIXES = (".txt", ".lst", ".csv")
_GLOB_CHARS = "*?["
# Inputs per chunk of a job's listing: what the score driver holds as Python objects at a time
# (a folder group larger than this stays whole).  Lower it to see a small run cut in chunks.
LISTING_CHUNK = 100_000
_PIECE = 10_000  # URIs made Python objects at a time while a list is read, ranked or sorted


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


def _relative_to(uri: str, root: str) -> str:
    target = _normalise_root(uri) if _is_local(uri) else uri
    if root and target.startswith(root + "/"):
        return target[len(root) + 1:]
    # outside the root (lists mixing buckets): keep everything after the scheme
    return target.split("://", 1)[-1].lstrip("/")


def _list_file_uris(url: str, storage_options: dict[str, Any] | None) -> pa.ChunkedArray:
    """The URIs of a text or Parquet list, read in pieces into Arrow (no Python string per URI kept)."""
    pieces: list[pa.Array] = []
    if url.endswith(".parquet"):
        import pyarrow.parquet as pq

        with fsspec.open(url, "rb", **(storage_options or {})) as fh:
            for batch in pq.ParquetFile(fh).iter_batches(batch_size=_PIECE, columns=["uri"]):
                column = batch.column(0).cast(pa.string())
                pieces.append(column.filter(pc.fill_null(pc.not_equal(column, ""), False)))
        return pa.chunked_array(pieces, pa.string())
    with fsspec.open(url, "rt", **(storage_options or {})) as fh:
        piece: list[str] = []
        for raw in fh:
            line = raw.strip()
            if line and not line.startswith("#"):
                piece.append(line.split(",")[0].strip())
            if len(piece) >= _PIECE:
                pieces.append(pa.array(piece, pa.string()))
                piece = []
        pieces.append(pa.array(piece, pa.string()))
    return pa.chunked_array(pieces, pa.string())


def _pieces(uris: pa.ChunkedArray) -> Iterator[list[str]]:
    for chunk in uris.chunks:
        for start in range(0, len(chunk), _PIECE):
            yield chunk.slice(start, _PIECE).to_pylist()


def _list_root(uris: pa.ChunkedArray) -> str:
    """The longest common folder of a list's URIs (local ones made absolute), piece by piece."""
    prefix: str | None = None
    for piece in _pieces(uris):
        folders = [posixpath.dirname(_normalise_root(u) if _is_local(u) else u) for u in piece]
        prefix = os.path.commonprefix(folders + ([prefix] if prefix is not None else []))
    if prefix is None:
        return ""
    if not prefix.endswith("/"):
        for piece in _pieces(uris):
            folders = (posixpath.dirname(_normalise_root(u) if _is_local(u) else u) for u in piece)
            if any(f != prefix and not f.startswith(prefix + "/") for f in folders):
                prefix = prefix[: prefix.rfind("/")]
                break
    return prefix.rstrip("/")


def _sorted_items(uris: pa.ChunkedArray, root: str) -> Iterator[tuple[str, InputImage]]:
    """A materialised list of URIs in listing order (folder key, then URI), once each, with their folder keys.

    The URIs stay in Arrow; each is ranked by its folder key (few distinct values, ranked in
    Python), the ranks ordered by numpy, and only one folder group at a time becomes Python
    strings, sorted there.  Arrow's own sort by (rank, URI) would copy every URI once more.
    """
    codes: dict[str, int] = {}
    pieces = []
    for piece in _pieces(uris):
        pieces.append(np.fromiter((codes.setdefault(output_folder_key(_relative_to(u, root)), len(codes)) for u in piece),
                                  dtype=np.int32, count=len(piece)))
    keys = sorted(codes)
    rank_of_code = np.empty(len(keys), dtype=np.int32)
    rank_of_code[[codes[k] for k in keys]] = np.arange(len(keys), dtype=np.int32)
    ranks = rank_of_code[np.concatenate(pieces)] if pieces else np.empty(0, dtype=np.int32)
    del pieces
    order = np.argsort(ranks, kind="stable")
    bounds = np.searchsorted(ranks, np.arange(len(keys) + 1), sorter=order)
    del ranks
    for rank, key in enumerate(keys):
        for uri in sorted(set(_take(uris, order[bounds[rank]:bounds[rank + 1]]))):
            yield key, InputImage(uri, _relative_to(uri, root), image_id_for(uri))


def _take(uris: pa.ChunkedArray, indices: np.ndarray) -> list[str]:
    """``uris[indices]`` chunk by chunk: Arrow's take on a chunked array joins all its chunks first (a copy of every URI)."""
    starts = np.cumsum([0] + [len(chunk) for chunk in uris.chunks])
    which = np.searchsorted(starts, indices, side="right") - 1
    taken: list[str] = []
    for c in np.unique(which):
        taken.extend(uris.chunks[c].take(pa.array(indices[which == c] - starts[c])).to_pylist())
    return taken


def _walk_items(fs: Any, fs_root: str, base: str, root: str) -> Iterator[tuple[str, InputImage]]:
    """The images under a folder or prefix in listing order, one listing request per folder.

    Folders whose keys are equal (``A`` and ``a``, ``a b`` and ``a_b``) are listed together, so
    that a folder group comes out whole; each listing is dropped from the client's cache once
    read, so the driver holds one folder group and the path of folders above it, not the bucket.
    """
    def visit(dirs: list[str], key: str) -> Iterator[tuple[str, InputImage]]:
        files: list[str] = []
        subdirs: dict[str, list[str]] = {}
        pending = list(dirs)
        while pending:
            folder = pending.pop()
            entries = fs.ls(folder, detail=True)
            fs.invalidate_cache(folder)
            for info in entries:
                rel = relative(info["name"], fs_root)
                if rel is None or posixpath.basename(rel.rstrip("/")).startswith("."):
                    continue
                if info["type"] == "directory":
                    sub = output_folder_key(rel + "/image")
                    (pending if sub == key else subdirs.setdefault(sub, [])).append(info["name"])
                elif _is_image_relpath(rel):
                    files.append(join(base, rel))
        for uri in sorted(files):
            yield key, InputImage(uri, _relative_to(uri, root), image_id_for(uri))
        for sub in sorted(subdirs):
            yield from visit(subdirs[sub], sub)

    yield from visit([fs_root], "")


def _listed_items(source: str, storage_options: dict[str, Any] | None) -> Iterator[tuple[str, InputImage]]:
    if source.endswith(_LIST_SUFFIXES) or source.endswith(".parquet"):
        uris = _list_file_uris(source, storage_options)
        yield from _sorted_items(uris, _list_root(uris))
        return
    static = source
    if any(c in source for c in _GLOB_CHARS):
        static = source[: min(source.find(c) for c in _GLOB_CHARS if c in source)]
        static = static[: static.rfind("/") + 1] or "."
    else:
        fs, fs_root, base = resolve(source, storage_options)
        if fs.isdir(fs_root):
            yield from _walk_items(fs, fs_root, base, _normalise_root(source))
            return
    found = list_images(source, storage_options)  # a glob or a single file: listed at once
    root = _normalise_root(static)
    if len(found) == 1 and _normalise_root(found[0]) == root:  # a single file
        root = posixpath.dirname(root)
    yield from _sorted_items(pa.chunked_array([pa.array(found, pa.string())], pa.string()), root)


def list_chunks(source: str, storage_options: dict[str, Any] | None = None,
                chunk: int = LISTING_CHUNK) -> Iterator[list[InputImage]]:
    """Every image named by ``source``, in chunks of about ``chunk`` inputs, so no caller holds the whole listing.

    The order is fixed (by folder, a folder before its subfolders, then by URI) and each URI comes
    once.  A chunk ends only where the output folder key changes
    (:func:`~spade_ray.storage.outputs.output_folder_key`): a folder group is never split, however
    large, so output keys computed per chunk are those of the whole listing.  A folder or prefix is
    walked folder by folder; a list file is read in pieces into Arrow and ordered folder group by
    folder group; a glob is listed at once.  Raises ValueError naming the source when it holds no image.
    """
    if chunk < 1:
        raise ValueError(f"a listing chunk holds at least one input, not {chunk}")
    current: list[InputImage] = []
    last: str | None = None
    found = False
    for key, item in _listed_items(source, storage_options):
        if len(current) >= chunk and key != last:
            yield current
            current = []
        current.append(item)
        last, found = key, True
    if current:
        yield current
    if not found:
        raise ValueError(f"no images found in {source!r} (looked for .png/.jpg/.jpeg/.bmp/.tif/.tiff files)")


def resolve_inputs(source: str, storage_options: dict[str, Any] | None = None) -> list[InputImage]:
    """Every image named by ``source`` in listing order (see :func:`list_chunks`), with its relative path and stable id.

    The whole listing as Python objects: for tests and small tools; a job goes chunk by chunk.
    Raises ValueError naming the source when it holds no image.
    """
    return [item for part in list_chunks(source, storage_options) for item in part]
