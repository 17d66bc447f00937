"""Local paths and fsspec URLs: resolve one, join and split keys, read and write whole files.

Every module that touches storage goes through these few functions, so a local folder, ``s3://``,
``gs://`` or a chained ``simplecache::s3://`` URL behave the same everywhere, and the rules below
(which spelling of a URL is handed back, how keys join, what makes a write safe) are decided once.
"""

from __future__ import annotations

import os
import posixpath
import uuid
from collections.abc import Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import fsspec
from fsspec.implementations.local import LocalFileSystem

from spade_ray.storage.retry import client_options, with_retries

__all__ = ["MAX_IN_FLIGHT", "join", "read_bytes", "read_many", "relative", "resolve", "write_bytes", "write_many"]


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


# Per filesystem, what makes ``cat_file`` a single request (measured at a counting proxy: s3fs
# sends HEAD + GET by default, one GET with ``max_concurrency=1``).
_ONE_REQUEST: dict[str, dict[str, Any]] = {"s3": {"max_concurrency": 1}}


def _protocol(fs: Any) -> str:
    return fs.protocol if isinstance(fs.protocol, str) else fs.protocol[0]


def _whole_file_fs(url: str, storage_options: dict[str, Any] | None) -> tuple[Any, str]:
    """(filesystem, path) for whole-file reads and writes, whose only retries are :mod:`~spade_ray.storage.retry`'s.

    The client is made with its own retries off (:func:`~spade_ray.storage.retry.client_options`);
    s3fs's loop is a class attribute, not an option, so it is set on this instance, which fsspec
    keeps for these options alone.
    """
    protocol = fsspec.core.split_protocol(url)[0] or "file"
    fs, path = fsspec.core.url_to_fs(url, **client_options(protocol, storage_options))
    if protocol in ("s3", "s3a"):
        fs.retries = 1
    return fs, path


def read_bytes(url: str, storage_options: dict[str, Any] | None = None) -> bytes:
    """A whole file from a local path or any fsspec URL, in one request (one GET on object stores).

    Everything this package reads (images, masks, feature shards, result files, bank files) is read
    whole and parsed from memory, so one plain GET is the cheapest way to get it.  s3fs would first
    ask for the size with a HEAD (to split large objects into concurrent ranged GETs): a second
    round trip for every image, so it is told to read in one request.  Transient failures are
    retried (:func:`~spade_ray.storage.retry.with_retries`).
    """
    fs, path = _whole_file_fs(url, storage_options)
    return with_retries(lambda: fs.cat_file(path, **_ONE_REQUEST.get(_protocol(fs), {})), url)


def write_bytes(url: str, data: bytes, storage_options: dict[str, Any] | None = None) -> None:
    """Write a whole file atomically: temp file + rename locally, a single PUT on object stores.

    Readers (a report over a running job, a rerun deciding what is done, a bank reader) then see
    either the old file or the whole new one, never a truncated PNG or Parquet footer; a crashed
    writer leaves at most a ``NAME.tmp-XXXXXXXX`` file locally (no reader picks it up: its name no
    longer ends in ``.parquet``, ``.json``, ...), and nothing on object stores, where an object
    appears only when its PUT completes.  Transient failures are retried; a PUT retried after a
    lost answer writes the same bytes again.
    """
    fs, path = _whole_file_fs(url, storage_options)
    if _protocol(fs) in ("file", "local"):
        _write_local(path, data)
    else:
        with_retries(lambda: fs.pipe_file(path, data), url)


def _write_local(path: str, data: bytes) -> None:
    """Temp file + rename; a write that fails (disk full) removes its temp file, so nothing partial is left."""
    os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
    tmp = f"{path}.tmp-{uuid.uuid4().hex[:8]}"
    try:
        with open(tmp, "wb") as fh:
            fh.write(data)
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.remove(tmp)
        raise


# Requests one caller keeps in flight at once.  An object store answers each request after a round
# trip of tens of milliseconds whatever its size, so files read or written one after another cost
# a round trip each; this many at a time hide it, and stay well below what one S3 prefix serves
# (thousands of requests per second) and the connection pools of s3fs/gcsfs.
MAX_IN_FLIGHT = 16


def read_many(urls: Sequence[str], storage_options: dict[str, Any] | None = None,
              max_in_flight: int = MAX_IN_FLIGHT) -> list[bytes | Exception]:
    """Whole files, up to ``max_in_flight`` requests at a time: for each URL its bytes, or the exception that read raised.

    A batch of images costs about one round trip instead of one per image.  Failures are returned,
    not raised, so one unreadable file never costs its neighbours their result.
    """
    def read(url: str) -> bytes | Exception:
        try:
            return read_bytes(url, storage_options)
        except Exception as exc:  # returned to the caller, who decides per file
            return exc

    if len(urls) <= 1:
        return [read(url) for url in urls]
    with ThreadPoolExecutor(min(max_in_flight, len(urls)), thread_name_prefix="spade-read") as pool:
        return list(pool.map(read, urls))


def write_many(files: Mapping[str, bytes], storage_options: dict[str, Any] | None = None,
               max_in_flight: int = MAX_IN_FLIGHT) -> None:
    """Write whole files (each as :func:`write_bytes`: atomic), up to ``max_in_flight`` at a time.

    Every write is attempted; the first failure is raised once all have ended, so the caller
    knows the set is not complete (and, say, commits no row pointing at a missing object).
    """
    items = list(files.items())
    if len(items) <= 1:
        for url, data in items:
            write_bytes(url, data, storage_options)
        return
    with ThreadPoolExecutor(min(max_in_flight, len(items)), thread_name_prefix="spade-write") as pool:
        futures = [pool.submit(write_bytes, url, data, storage_options) for url, data in items]
    for future in futures:
        future.result()
