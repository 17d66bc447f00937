"""The build-bank job: Parquet feature shards -> a new, calibrated, immutable bank version."""

from __future__ import annotations

import time
from dataclasses import asdict
from typing import Any

import numpy as np
import pyarrow.parquet as pq
import ray

from spade_ray.bank.ignore_mask import load_ignore_mask, read_ignore_mask, write_ignore_mask
from spade_ray.bank.manifest import BankManifest, IgnoreMaskEntry, ShardEntry
from spade_ray.bank.shard_loader import load_shard
from spade_ray.bank.store import (
    feature_meta_of,
    make_manifest,
    next_version_name,
    open_bank,
    shard_for,
    version_name,
    write_manifest,
    write_shard,
)
from spade_ray.distributed.pipeline import JobSummary
from spade_ray.distributed.remote_bank import calibrate_served
from spade_ray.distributed.runtime import init_ray
from spade_ray.distributed.shard_actors import shard_actor_cpus, start_shard_actors
from spade_ray.method.config import DEFAULT_IMAGE_K, DEFAULT_PIXEL_K, SpadeConfig
from spade_ray.method.features import FeatureBatch
from spade_ray.method.fusion import DEFAULT_SIGMA
from spade_ray.method.ignore import IgnoreRegion
from spade_ray.method.matching import DEFAULT_KAPPA
from spade_ray.progress import Progress, no_progress
from spade_ray.storage.featurestore import FeatureMeta, list_feature_shards, read_feature_meta
from spade_ray.storage.urls import join

__all__ = ["run_build_bank"]


@ray.remote
def _split_feature_file(url: str, keep_rows: list[int], n_shards: int, expected_meta: str,
                        storage_options: dict[str, Any] | None) -> tuple[Any, ...]:
    """Read one feature file and cut its kept rows into the bank shards they hash to."""
    from spade_ray.storage.featurestore import read_features, table_to_features

    table, meta = read_features([url], storage_options, only_ok=False)
    if meta.to_json() != expected_meta:
        raise ValueError(f"feature file {url} was extracted with other settings than the rest: {meta.to_json()}")
    table = table.take(keep_rows)
    ids, uris, features = table_to_features(table)
    assignment = np.array([shard_for(i, n_shards) for i in ids], dtype=np.int64)
    parts = []
    for s in range(n_shards):
        rows = np.flatnonzero(assignment == s)
        parts.append(([ids[r] for r in rows], [uris[r] for r in rows], features.select(rows)))
    return tuple(parts) if n_shards > 1 else parts[0]


@ray.remote
def _write_bank_shard(version_url: str, shard_index: int, storage_options: dict[str, Any] | None,
                      *parts: tuple[list[str], list[str], FeatureBatch]) -> dict[str, Any]:
    ids = [i for p in parts for i in p[0]]
    uris = [u for p in parts for u in p[1]]
    batches = [p[2] for p in parts if len(p[0])]
    if batches:
        features = FeatureBatch.concat(batches)
        global_, levels = features.global_, features.levels
    else:  # an empty shard (few images, many shards) is valid and answers nothing
        template = parts[0][2]
        global_ = template.global_[:0]
        levels = [level[:0] for level in template.levels]
    order = np.argsort(ids, kind="stable")  # deterministic row order whatever the file order
    return write_shard(version_url, shard_index, [ids[i] for i in order], [uris[i] for i in order],
                       global_[order], [level[order] for level in levels], storage_options)


def _select_rows(files: list[str], storage_options: dict[str, Any] | None,
                 exclude: set[str]) -> tuple[dict[str, list[int]], int, int]:
    """Which rows of which file enter the bank: ok rows, first occurrence of each image id."""
    import fsspec

    seen = set(exclude)
    keep: dict[str, list[int]] = {}
    errors = duplicates = 0
    for url in files:
        with fsspec.open(url, "rb", **(storage_options or {})) as fh:
            table = pq.read_table(fh, columns=["image_id", "status"])
        rows = []
        for r, (image_id, status) in enumerate(zip(table.column("image_id").to_pylist(), table.column("status").to_pylist())):
            if status != "ok":
                errors += 1
            elif image_id in seen:
                duplicates += 1
            else:
                seen.add(image_id)
                rows.append(r)
        if rows:
            keep[url] = rows
    return keep, errors, duplicates


def _target(features: str, output: str | None, add_to: str | None, meta: FeatureMeta,
            storage_options: dict[str, Any] | None) -> tuple[str, BankManifest | None, set[str]]:
    """(bank root, parent version's manifest or None, ids already in the parent) of the version to write."""
    if add_to:
        bank_root, parent = open_bank(add_to, storage_options)
        if feature_meta_of(parent) != meta:
            raise ValueError(f"features under {features} ({_described(meta)}) do not match bank {add_to} "
                             f"({_described(feature_meta_of(parent))})")
        exclude: set[str] = set()
        for entry in parent.shards:
            exclude.update(load_shard(bank_root, entry, verify=False, storage_options=storage_options).ids)
        return bank_root, parent, exclude
    if output:
        return output.rstrip("/"), None, set()
    raise ValueError("build-bank needs --output BANK or --add-to BANK")


def _described(meta: FeatureMeta) -> str:
    tiles = f", tiles {meta.tile}px overlap {meta.tile_overlap} scale {meta.scale:g}" if meta.tile else ", untiled"
    return f"{meta.backbone}, {meta.image_size}px, {meta.protocol}{tiles}"


def _write_shards(keep: dict[str, list[int]], version_url: str, first_index: int, shards: int, meta: FeatureMeta,
                  storage_options: dict[str, Any] | None, progress: Progress) -> list[ShardEntry]:
    """The shuffle: one task per feature file cuts its rows by shard, one task per shard writes it."""
    bar = progress(shards, "build-bank (shards)")
    parts = [_split_feature_file.options(num_returns=shards).remote(url, rows, shards, meta.to_json(), storage_options)
             for url, rows in keep.items()]
    parts = [p if isinstance(p, list) else [p] for p in parts]
    pending = [_write_bank_shard.remote(version_url, first_index + s, storage_options, *[p[s] for p in parts])
               for s in range(shards)]
    order = list(pending)
    while pending:
        ready, pending = ray.wait(pending, num_returns=1)
        bar.update(len(ready))
    bar.close()
    return ray.get(order)


def _ignore_region(ignore_mask: str | None, bank_root: str, parent: BankManifest | None, version_url: str,
                   storage_options: dict[str, Any] | None) -> tuple[IgnoreMaskEntry | None, IgnoreRegion | None]:
    """The new version's ignore mask: the file given (stored in the version), else the parent's (inherited as is)."""
    if ignore_mask:
        region = read_ignore_mask(ignore_mask, storage_options)
        return write_ignore_mask(version_url, region, storage_options), region
    if parent is not None and parent.ignore_mask is not None:
        return parent.ignore_mask, load_ignore_mask(bank_root, parent, storage_options)
    return None, None


def run_build_bank(features: str, output: str | None, *, shards: int = 1, add_to: str | None = None,
                   image_k: int = DEFAULT_IMAGE_K, pixel_k: int = DEFAULT_PIXEL_K, kappa: int = DEFAULT_KAPPA,
                   sigma: float = DEFAULT_SIGMA, scoring: dict[str, Any] | None = None, calibration_samples: int = 64,
                   target_fpr: float = 0.01, batch_size: int = 16,
                   storage_options: dict[str, Any] | None = None, address: str | None = None,
                   progress: Progress = no_progress, ignore_mask: str | None = None) -> JobSummary:
    """Parquet feature shards -> a new bank version (``output``, or a new version of ``add_to``).

    Images are assigned to shards by a hash of their id (stable across rebuilds); one Ray task
    per shard writes its FAISS index, ids and pyramids; normal-only calibration runs on the
    served shards, with the ignore mask (``ignore_mask``, else the parent's); the manifest is written last.
    """
    start = time.perf_counter()
    if shards < 1:
        raise ValueError(f"--shards must be >= 1; got {shards}")
    files = list_feature_shards(features, storage_options)
    if not files:
        raise ValueError(f"no feature shards (*.parquet) found under {features!r}; run `spade-ray extract` first")
    meta = read_feature_meta(files[0], storage_options)
    bank_root, parent_manifest, exclude = _target(features, output, add_to, meta, storage_options)
    keep, n_errors, n_duplicates = _select_rows(files, storage_options, exclude)
    n_new = sum(len(v) for v in keep.values())
    if n_new == 0 and not parent_manifest:
        raise ValueError(f"no usable normal images in {features!r} ({n_errors} error rows)")
    version = next_version_name(bank_root, storage_options)
    version_url = join(bank_root, version)
    mask_entry, region = _ignore_region(ignore_mask, bank_root, parent_manifest, version_url, storage_options)
    summary = JobSummary("build-bank", ok=n_new, error=n_errors, skipped=n_duplicates + len(exclude), output=version_url)

    init_ray(address)
    first_index = len(parent_manifest.shards) if parent_manifest else 0
    new_entries = _write_shards(keep, version_url, first_index, shards, meta, storage_options, progress) if n_new else []
    entries = (list(parent_manifest.shards) if parent_manifest else []) + new_entries
    config = SpadeConfig(meta.backbone, meta.image_size, meta.protocol, image_k, pixel_k, kappa, sigma,
                         **meta.tiling.settings()).with_scoring(scoring or {})
    draft = make_manifest(version, meta, entries, parent=version_name(parent_manifest.version) if parent_manifest else None)
    served = start_shard_actors(bank_root, draft, storage_options, num_cpus=shard_actor_cpus(len(entries)),
                                aggregate=config.aggregate)
    try:
        calibration = calibrate_served(served, config, calibration_samples, target_fpr, batch_size, progress, region)
    finally:
        served.shutdown()
    build = {"shards": shards, **config.scoring(), "calibration_samples": calibration_samples, "target_fpr": target_fpr,
             "features": features}
    manifest = make_manifest(version, meta, entries, build=build, calibration=asdict(calibration) if calibration else None,
                             parent=version_name(parent_manifest.version) if parent_manifest else None,
                             ignore_mask=mask_entry)
    write_manifest(version_url, manifest, storage_options)  # last: the version is complete from now on
    bank_bytes = sum(served_bytes for served_bytes in _entry_bytes(meta, manifest))
    summary.extra.update(version=version, n_images=manifest.n_images, shards=len(entries),
                         bytes_per_image=round(bank_bytes / max(manifest.n_images, 1)),
                         ignore_mask=mask_entry.path if mask_entry else None,
                         image_threshold=calibration.image_threshold if calibration else None,
                         pixel_threshold=calibration.pixel_threshold if calibration else None)
    summary.seconds = time.perf_counter() - start
    return summary


def _entry_bytes(meta: FeatureMeta, manifest: BankManifest) -> list[int]:
    """In-memory bytes per shard: float32 global vectors + float16 pyramids (what a shard actor holds)."""
    per_image = 4 * meta.global_dim + 2 * sum(c * h * w for c, h, w in meta.level_shapes)
    return [per_image * entry.n_images for entry in manifest.shards]


# ----------------------------------------------------------------------------- score
