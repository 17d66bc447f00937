"""The sharded normal bank: what ``spade-ray build-bank`` writes and the shard actors load.

Layout under a bank root (a local folder or any fsspec prefix)::

    BANK/v0001/manifest.json            written LAST: a version without it is incomplete, never used
    BANK/v0001/shard-00000/ids.json     {"ids": [...], "uris": [...]}, row order = FAISS row order
    BANK/v0001/shard-00000/index.faiss  faiss.serialize_index(IndexFlatL2 of the global vectors)
    BANK/v0001/shard-00000/global.npy   float32 (n, D)
    BANK/v0001/shard-00000/level0.npy   float16 (n, C, H, W); level1.npy, level2.npy, ...
    BANK/v0001/ignore_mask.png          optional: 0/255 PNG at frame size, white = map values never count
    BANK/v0002/...                      a later version (``--add-to``)

Versions are immutable: a new build or ``--add-to`` writes a new ``vNNNN`` folder, and an add-to
manifest lists its parent's shard entries unchanged (their ``path`` still points into the parent's
folder) next to its own new shards.  Readers of v0001 are therefore never disturbed by a writer of
v0002, and nothing is copied to grow a bank.

The manifest (:class:`spade_ray.bank.manifest.BankManifest`) records every shard file's sha256;
:func:`spade_ray.bank.shard_loader.load_shard` checks each file against it before parsing, so a truncated upload or a file
from another build is refused with a message naming the file rather than producing wrong scores.
Every file is written whole and read in one request (:mod:`spade_ray.storage.urls`).  No pickle:
JSON, ``.npy`` with ``allow_pickle=False`` and FAISS's own serialisation.
"""

from __future__ import annotations

import datetime as _dt
import hashlib
import io
import json
import posixpath
import re
from collections.abc import Sequence
from typing import Any

import faiss
import numpy as np

from spade_ray.bank.manifest import BANK_FORMAT_VERSION, BankManifest, IgnoreMaskEntry, ShardEntry
from spade_ray.storage.featurestore import FeatureMeta
from spade_ray.storage.urls import join, resolve, write_bytes

__all__ = [
    "check_compatible",
    "feature_meta_of",
    "list_versions",
    "make_manifest",
    "next_version_name",
    "open_bank",
    "shard_for",
    "shard_name",
    "version_name",
    "write_manifest",
    "write_shard",
]

MANIFEST = "manifest.json"
_VERSION_RE = re.compile(r"^v(\d{4,})$")


def shard_for(image_id: str, n_shards: int) -> int:
    """The shard an image belongs to: int(first 16 hex digits of sha256(image_id)) % n_shards.

    A content hash (not Python's salted ``hash()``, not arrival order) gives the same answer on
    every worker and every run, and spreads ids evenly over the shards.
    """
    if n_shards < 1:
        raise ValueError(f"n_shards must be >= 1; got {n_shards}")
    return int(hashlib.sha256(image_id.encode("utf-8")).hexdigest()[:16], 16) % n_shards


def version_name(version: int) -> str:
    """``3`` -> ``"v0003"``: zero-padded so version folders also sort by name."""
    return f"v{int(version):04d}"


def shard_name(shard_index: int) -> str:
    """``7`` -> ``"shard-00007"``."""
    return f"shard-{int(shard_index):05d}"


def _sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def _npy_bytes(array: np.ndarray) -> bytes:
    buf = io.BytesIO()
    np.save(buf, array, allow_pickle=False)
    return buf.getvalue()


def _split_version_url(version_url: str) -> tuple[str, str]:
    """(bank root URL, version folder name) of ``.../BANK/v0001``; ValueError if not a version folder."""
    stripped = version_url.rstrip("/")
    root, _, name = stripped.rpartition("/")
    if not _VERSION_RE.match(name):
        raise ValueError(f"{version_url!r} is not a bank version folder (expected .../vNNNN)")
    return root, name


# ----------------------------------------------------------------------------- writing


def write_shard(
    version_url: str,
    shard_index: int,
    ids: Sequence[str],
    uris: Sequence[str],
    global_: np.ndarray,
    levels: Sequence[np.ndarray],
    storage_options: dict[str, Any] | None = None,
) -> ShardEntry:
    """Write one shard's files under ``version_url/shard-NNNNN/`` and return its manifest entry.

    The entry's ``path`` is relative to the bank root (``"v0001/shard-00000"``).  Global vectors are
    stored float32 and levels float16 (converted if needed).  An empty shard (no images) is allowed:
    hashing small banks over many shards can leave one empty; its index returns no neighbours.
    """
    _, vname = _split_version_url(version_url)
    n = len(ids)
    global_ = np.ascontiguousarray(global_, dtype=np.float32)
    if len(uris) != n or global_.ndim != 2 or global_.shape[0] != n:
        raise ValueError(f"shard {shard_index}: {n} ids, {len(uris)} uris, global vectors {global_.shape}")
    if not levels:
        raise ValueError(f"shard {shard_index}: no pyramid levels")
    levels = [np.ascontiguousarray(level, dtype=np.float16) for level in levels]
    for i, level in enumerate(levels):
        if level.ndim != 4 or level.shape[0] != n:
            raise ValueError(f"shard {shard_index}: level{i} has shape {level.shape}; expected ({n}, C, H, W)")

    index = faiss.IndexFlatL2(int(global_.shape[1]))
    if n:
        index.add(global_)
    files: dict[str, bytes] = {
        "ids.json": json.dumps({"ids": list(ids), "uris": list(uris)}).encode("utf-8"),
        "index.faiss": faiss.serialize_index(index).tobytes(),
        "global.npy": _npy_bytes(global_),
    }
    for i, level in enumerate(levels):
        files[f"level{i}.npy"] = _npy_bytes(level)

    name = shard_name(shard_index)
    shard_url = join(version_url, name)
    hashes = {}
    for file_name, data in files.items():
        write_bytes(join(shard_url, file_name), data, storage_options)
        hashes[file_name] = _sha256(data)
    return ShardEntry(name=name, path=f"{vname}/{name}", n_images=n, files=hashes)


def make_manifest(
    version: int | str,
    meta: FeatureMeta,
    shards: Sequence[ShardEntry],
    build: dict[str, Any] | None = None,
    calibration: dict[str, Any] | None = None,
    parent: str | None = None,
    created: str | None = None,
    ignore_mask: IgnoreMaskEntry | None = None,
) -> BankManifest:
    """The manifest of a version (write it with :func:`write_manifest`, after every shard).

    ``meta`` is the features' :class:`FeatureMeta` (backbone, weights, size, protocol, shapes);
    ``shards`` the entries returned by :func:`write_shard` (for ``--add-to``: the parent's
    entries, unchanged, followed by the new ones); ``parent`` the parent version's name.  Shard
    names must be unique across the whole list, so number an add-to's new shards from
    ``len(parent.shards)``.  ``ignore_mask``: the entry :func:`spade_ray.bank.ignore_mask.write_ignore_mask`
    returned, or the parent's.
    """
    if isinstance(version, str):
        match = _VERSION_RE.match(version)
        if not match:
            raise ValueError(f"version must be an int or a name like 'v0001'; got {version!r}")
        version = int(match.group(1))
    names = [s.name for s in shards]
    dupes = sorted({n for n in names if names.count(n) > 1})
    if dupes:
        raise ValueError(f"shard names must be unique within a version; repeated: {dupes}")
    return BankManifest(
        format_version=BANK_FORMAT_VERSION,
        version=int(version),
        created=created or _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        backbone=meta.backbone,
        weights_sha256=meta.weights_sha256,
        image_size=meta.image_size,
        protocol=meta.protocol,
        levels=tuple(meta.level_shapes),
        global_dim=meta.global_dim,
        n_images=int(sum(s.n_images for s in shards)),
        build=dict(build or {}),
        calibration=calibration,
        parent=parent,
        shards=tuple(shards),
        ignore_mask=ignore_mask,
        tiling=meta.tiling,
    )


def feature_meta_of(manifest: BankManifest) -> FeatureMeta:
    """The :class:`FeatureMeta` a bank's features have: compare it with new features before ``--add-to``."""
    return FeatureMeta(
        backbone=manifest.backbone,
        weights_sha256=manifest.weights_sha256,
        image_size=manifest.image_size,
        protocol=manifest.protocol,
        level_shapes=list(manifest.levels),
        global_dim=manifest.global_dim,
        **manifest.tiling.settings(),
    )


def write_manifest(version_url: str, manifest: BankManifest, storage_options: dict[str, Any] | None = None) -> None:
    """Write ``version_url/manifest.json`` atomically; call it last, when every shard file is written.

    Its appearance is what makes the version exist for readers.  The manifest's ``version`` must
    match the folder's name, so a manifest can never describe another folder.
    """
    _, vname = _split_version_url(version_url)
    if version_name(manifest.version) != vname:
        raise ValueError(f"manifest says version {manifest.version} but is being written to {version_url}")
    data = json.dumps(manifest.to_dict(), indent=1, sort_keys=True).encode("utf-8")
    write_bytes(join(version_url, MANIFEST), data, storage_options)


# ----------------------------------------------------------------------------- finding versions


def _version_folders(fs: Any, fs_root: str) -> list[tuple[int, str]]:
    """(number, name) of every ``vNNNN`` folder directly under the root, complete or not."""
    if not fs.exists(fs_root):
        return []
    found = []
    for entry in fs.ls(fs_root, detail=True):
        name = posixpath.basename(entry["name"].rstrip("/"))
        match = _VERSION_RE.match(name)
        if match and entry.get("type") == "directory":
            found.append((int(match.group(1)), name))
    return sorted(found)


def list_versions(bank_url: str, storage_options: dict[str, Any] | None = None) -> list[str]:
    """Names of the complete versions (those with a manifest.json), oldest first; [] for a new bank."""
    fs, fs_root, _ = resolve(bank_url, storage_options)
    return [name for _, name in _version_folders(fs, fs_root) if fs.exists(f"{fs_root}/{name}/{MANIFEST}")]


def next_version_name(bank_url: str, storage_options: dict[str, Any] | None = None) -> str:
    """The folder name for a new version: ``v0001`` for a new bank, else one past the highest.

    Incomplete versions count too: a crashed build's leftovers are never overwritten or mixed
    into a new version.
    """
    fs, fs_root, _ = resolve(bank_url, storage_options)
    folders = _version_folders(fs, fs_root)
    return version_name(folders[-1][0] + 1 if folders else 1)


def _read_manifest(fs: Any, fs_path: str, where: str) -> BankManifest:
    try:
        data = json.loads(fs.cat_file(fs_path))
    except json.JSONDecodeError as exc:
        raise ValueError(f"{where} is not valid JSON: {exc}") from None
    return BankManifest.from_dict(data, where)


def open_bank(url: str, storage_options: dict[str, Any] | None = None) -> tuple[str, BankManifest]:
    """(bank root URL, manifest) for a bank root (its latest complete version) or a version folder.

    The root URL is what shard entry paths are relative to (pass it to :func:`~spade_ray.bank.shard_loader.load_shard`); it
    keeps the caller's protocol, and local paths come back absolute.
    """
    fs, fs_path, base = resolve(url, storage_options)
    name = posixpath.basename(fs_path.rstrip("/"))
    if _VERSION_RE.match(name):
        root = base.rstrip("/").rpartition("/")[0]
        manifest_path = f"{fs_path}/{MANIFEST}"
        if not fs.exists(manifest_path):
            raise FileNotFoundError(
                f"{url}: no complete bank version (no {MANIFEST}); the build that wrote it did not finish"
            )
        manifest = _read_manifest(fs, manifest_path, join(base, MANIFEST))
        if version_name(manifest.version) != name:
            raise ValueError(f"{join(base, MANIFEST)} says version {manifest.version} but lies in {name}/")
        return root, manifest
    versions = list_versions(url, storage_options)
    if not versions:
        raise FileNotFoundError(
            f"{url}: no complete bank version (no vNNNN/{MANIFEST}); build one with `spade-ray build-bank`"
        )
    manifest = _read_manifest(fs, f"{fs_path}/{versions[-1]}/{MANIFEST}", join(base, f"{versions[-1]}/{MANIFEST}"))
    return base, manifest


def check_compatible(manifest: BankManifest, backbone: str, weights_sha256: str, image_size: int, protocol: str) -> None:
    """Refuse to score with features that are not comparable to the bank's.

    Distances between features of different backbones, weights, input sizes or preprocessing
    protocols are meaningless yet look plausible, so any difference is an error.
    """
    theirs = (manifest.backbone, manifest.weights_sha256, manifest.image_size, manifest.protocol)
    ours = (backbone, weights_sha256, int(image_size), protocol)
    if theirs[:2] != ours[:2]:
        raise ValueError(
            f"bank was built with backbone {theirs[0]} (weights sha256 {theirs[1]}), "
            f"this scorer uses {ours[0]} (weights sha256 {ours[1]}); score with the bank's backbone and weights "
            "or rebuild the bank"
        )
    if theirs[2] != ours[2]:
        raise ValueError(f"bank was built with image size {theirs[2]}, this scorer uses {ours[2]}; use --image-size {theirs[2]}")
    if theirs[3] != ours[3]:
        raise ValueError(f"bank was built with protocol {theirs[3]!r}, this scorer uses {ours[3]!r}; use --protocol {theirs[3]}")
