"""Local paths and fsspec URLs: resolve one, join and split keys, read and write whole files.

Every module that touches storage goes through these few functions, so a local folder, ``s3://``,
``gs://`` or a chained ``simplecache::s3://`` URL behave the same everywhere, and the rules below
(which spelling of a URL is handed back, how keys join, what makes a write safe) are decided once.
"""

from __future__ import annotations

import os
import posixpath
import uuid
from typing import Any

import fsspec
from fsspec.implementations.local import LocalFileSystem

__all__ = ["join", "read_bytes", "relative", "resolve", "write_bytes"]


def resolve(url: str, storage_options: dict[str, Any] | None = None) -> tuple[Any, str, str]:
    """(filesystem, path as the filesystem names it, base for the URLs handed back to callers).

    Remote URLs keep the caller's own spelling as the base (protocol, chained ``simplecache::``
    URLs), so every URL built from it can go straight back to fsspec or to another machine; local
    paths become absolute and normalised (fsspec keeps ``a/../b`` segments), so the strings do not
    depend on the working directory.  Neither the path nor the base ends with a slash (except the
    local root ``/``).
    """
    fs, path = fsspec.core.url_to_fs(url, **(storage_options or {}))
    if isinstance(fs, LocalFileSystem):
        path = posixpath.normpath(path)
        return fs, path, path
    return fs, path.rstrip("/") or "/", url.rstrip("/")


def join(base: str, relpath: str) -> str:
    """``base`` (a local path or URL prefix) and a relative key below it, joined by one slash.

    The base's trailing slashes are dropped, so ``s3://b/out/`` and ``s3://b/out`` name the same
    prefix.  ``relpath`` is kept verbatim: a key found by a listing (see :func:`relative`) may hold
    an empty segment (``a//b``), and on object stores that is another object than ``a/b``.  Keys
    this package builds itself never start with a slash (see
    :func:`spade_ray.storage.outputs.output_stem`).
    """
    return base.rstrip("/") + "/" + relpath


def relative(path: str, fs_root: str) -> str | None:
    """``path`` relative to the folder ``fs_root`` (both as the filesystem names them); None when outside it."""
    prefix = fs_root if fs_root.endswith("/") else fs_root + "/"
    return path[len(prefix) :] if path.startswith(prefix) else None


def read_bytes(url: str, storage_options: dict[str, Any] | None = None) -> bytes:
    """A whole file from a local path or any fsspec URL, in one request (one GET on object stores).

    Everything this package reads (images, masks, feature shards, result files, bank files) is read
    whole and parsed from memory, so one plain GET is the cheapest way to get it (opening a file
    object would add a HEAD for its size first).
    """
    fs, path = fsspec.core.url_to_fs(url, **(storage_options or {}))
    return fs.cat_file(path)


def write_bytes(url: str, data: bytes, storage_options: dict[str, Any] | None = None) -> None:
    """Write a whole file atomically: temp file + rename locally, a single PUT on object stores.

    Readers (a report over a running job, a rerun deciding what is done, a bank reader) then see
    either the old file or the whole new one, never a truncated PNG or Parquet footer; a crashed
    writer leaves at most a ``NAME.tmp-XXXXXXXX`` file locally (no reader picks it up: its name no
    longer ends in ``.parquet``, ``.json``, ...), and nothing on object stores, where an object
    appears only when its PUT completes.
    """
    fs, path = fsspec.core.url_to_fs(url, **(storage_options or {}))
    if "file" in (fs.protocol if isinstance(fs.protocol, tuple) else (fs.protocol,)):
        os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
        tmp = f"{path}.tmp-{uuid.uuid4().hex[:8]}"
        with open(tmp, "wb") as fh:
            fh.write(data)
        os.replace(tmp, path)
    else:
        fs.pipe_file(path, data)
