"""One bank shard loaded into memory, verified file by file against its manifest entry.

Every file is fetched once (one GET each) and, with ``verify``, checked against the sha256 the
manifest recorded before it is parsed: a truncated upload or a file from another build is refused
with a message naming the file, never turned into wrong scores.  No pickle: JSON, ``.npy`` with
``allow_pickle=False`` and FAISS's own serialisation.
"""

from __future__ import annotations

import hashlib
import io
import json
import re
from dataclasses import dataclass
from typing import Any

import faiss
import numpy as np

from spade_ray.bank.manifest import BankManifest, ShardEntry
from spade_ray.method.retrieval import search_exact
from spade_ray.storage.urls import join, read_bytes

__all__ = ["BankArrays", "BankShard", "load_bank_arrays", "load_shard", "manifest_relpath", "read_manifest_file"]

_LEVEL_RE = re.compile(r"^level(\d+)\.npy$")
_REQUIRED_FILES = ("ids.json", "index.faiss", "global.npy")


@dataclass
class BankShard:
    """One shard in memory: ids/uris, global vectors float32 (n, D), levels float16 (n, C, H, W), FAISS index.

    Row ``r`` of every array, of ``ids``/``uris`` and of the index is the same image.
    """

    name: str
    ids: list[str]
    uris: list[str]
    global_: np.ndarray
    levels: list[np.ndarray]
    index: faiss.Index

    def __len__(self) -> int:
        return len(self.ids)

    def search(self, queries: np.ndarray, k: int, exclude: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray]:
        """This shard's ``k`` nearest rows per query: (Euclidean distances, local rows), (B, k) ascending.

        Exact and deterministic (see :func:`spade_ray.method.retrieval.search_exact`), so per-shard
        results merge with :func:`spade_ray.method.retrieval.merge_topk` (after mapping rows to global
        ids) into exactly what one index over the whole bank returns.  Missing neighbours have
        row -1 and distance inf; ``exclude`` (B,) local rows to leave out (-1: none).
        """
        return search_exact(self.index, self.global_, queries, k, exclude)


def manifest_relpath(path: str, what: str) -> str:
    """A path the manifest gives relative to the bank root, refused unless plain (it must not leave the bank)."""
    parts = path.split("/")
    if path.startswith("/") or any(p in ("", ".", "..") for p in parts):
        raise ValueError(f"{what} path {path!r} in the manifest must be a plain relative path")
    return path


def read_manifest_file(url: str, sha256: str | None, storage_options: dict[str, Any] | None = None,
                       label: str = "") -> bytes:
    """A bank file the manifest lists, fetched once and, unless ``sha256`` is None, checked against it.

    The check comes before anything parses the bytes, so a truncated upload or a file of another
    build is refused with a message naming it (``label`` says what it is) instead of giving wrong scores.
    """
    try:
        data = read_bytes(url, storage_options)
    except FileNotFoundError:
        raise FileNotFoundError(f"bank file {url}{label} listed in the manifest is missing") from None
    if sha256 is not None:
        got = hashlib.sha256(data).hexdigest()
        if got != sha256:
            raise ValueError(f"bank file {url}{label} is corrupt or was replaced: sha256 {got} != {sha256} "
                             "recorded in the manifest")
    return data


def load_shard(
    bank_root: str, entry: ShardEntry, verify: bool = True, storage_options: dict[str, Any] | None = None
) -> BankShard:
    """Load one shard named by a manifest entry; every file is fetched once (one GET each).

    With ``verify`` each file's sha256 is checked against the manifest before it is parsed: a
    mismatch (corrupt upload, file replaced by another build) raises ValueError naming the file
    and both hashes.
    """
    files = entry.files
    missing = [f for f in _REQUIRED_FILES if f not in files]
    level_files = sorted(((int(m.group(1)), f) for f in files if (m := _LEVEL_RE.match(f))), key=lambda t: t[0])
    if missing or not level_files or [i for i, _ in level_files] != list(range(len(level_files))):
        raise ValueError(f"manifest entry of shard {entry.name!r} lists files {sorted(files)}; "
                         f"expected {list(_REQUIRED_FILES)} + level0.npy, level1.npy, ...")
    shard_url = join(bank_root, manifest_relpath(entry.path, "shard"))

    def fetch(file_name: str) -> bytes:
        return read_manifest_file(join(shard_url, file_name), files[file_name] if verify else None, storage_options)

    def load_npy(file_name: str) -> np.ndarray:
        try:
            return np.load(io.BytesIO(fetch(file_name)), allow_pickle=False)
        except ValueError as exc:
            raise ValueError(f"bank file {join(shard_url, file_name)} is not a valid .npy: {exc}") from None

    ids_doc = json.loads(fetch("ids.json"))
    ids, uris = list(ids_doc["ids"]), list(ids_doc["uris"])
    index = faiss.deserialize_index(np.frombuffer(fetch("index.faiss"), dtype=np.uint8))
    global_ = load_npy("global.npy")
    levels = [load_npy(f) for _, f in level_files]

    n = len(ids)
    sizes = {"uris": len(uris), "index.faiss": int(index.ntotal), "global.npy": len(global_)}
    sizes.update({f: len(level) for (_, f), level in zip(level_files, levels)})
    wrong = {k: v for k, v in sizes.items() if v != n}
    if wrong or entry.n_images != n:
        raise ValueError(f"shard {shard_url} is inconsistent: {n} ids but {wrong or {'manifest n_images': entry.n_images}}")
    return BankShard(entry.name, ids, uris, global_, levels, index)


@dataclass
class BankArrays:
    """Every image of a bank version in one process, rows in the sharded numbering (manifest order).

    Row ``r`` is the image the score job's shard actors call bank row ``r`` (shard offsets add up
    in manifest order), so neighbours found in process can be compared with the job's.
    """

    ids: list[str]
    uris: list[str]
    global_: np.ndarray
    levels: list[np.ndarray]


def load_bank_arrays(bank_root: str, manifest: BankManifest, storage_options: dict[str, Any] | None = None) -> BankArrays:
    """Load and verify every shard of ``manifest`` into one set of arrays (for :meth:`spade_ray.Spade.load`).

    The arrays are allocated once from the manifest's shapes and each shard is copied in and
    dropped before the next is fetched, so the peak is the bank plus one shard, not twice the bank.
    """
    n = manifest.n_images
    global_ = np.empty((n, manifest.global_dim), dtype=np.float32)
    levels = [np.empty((n, c, h, w), dtype=np.float16) for c, h, w in manifest.levels]
    ids: list[str] = []
    uris: list[str] = []
    for entry in manifest.shards:
        shard = load_shard(bank_root, entry, verify=True, storage_options=storage_options)
        start, stop = len(ids), len(ids) + len(shard)
        if (stop > n or shard.global_.shape[1:] != global_.shape[1:]
                or [lv.shape[1:] for lv in shard.levels] != [lv.shape[1:] for lv in levels]):
            raise ValueError(f"shard {entry.name} of {bank_root} does not match its manifest's image count or shapes")
        global_[start:stop] = shard.global_
        for level, part in zip(levels, shard.levels):
            level[start:stop] = part
        ids.extend(shard.ids)
        uris.extend(shard.uris)
    if len(ids) != n:
        raise ValueError(f"bank {bank_root} version {manifest.version}: manifest says {n} images, its shards hold {len(ids)}")
    return BankArrays(ids, uris, global_, levels)
