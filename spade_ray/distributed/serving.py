"""Serving a bank on Ray: one actor per shard, and a client that scatters queries and gathers answers.

Retrieval is scatter-gather: every shard returns its local top-k and the client merges them into
the exact global top-k (the same result as one index over everything).  Correspondence moves the
query to the data: the batch's query pyramids go once into the object store, each shard that
owns some of the neighbours computes per-level nearest-match distances against its own patches,
and the client merges them (element-wise minimum for kappa=1, the k smallest otherwise).
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from typing import Any

import numpy as np
import ray
import torch

from spade_ray.method.aggregation import aggregate_levels
from spade_ray.bank.store import open_bank, version_name
from spade_ray.method.correspondence import merge_smallest
from spade_ray.method.features import FeatureBatch
from spade_ray.method.fusion import fuse_levels, image_score
from spade_ray.model import SpadeConfig
from spade_ray.method.retrieval import merge_topk
from spade_ray.bank.shard_server import ShardServer
from spade_ray.distributed.runtime import cluster_cpus, set_worker_threads

__all__ = ["BankClient", "BankLoadError", "ServedBank", "bank_id_of", "creation_error_reason", "serve_bank", "start_shard_actors"]


@ray.remote(max_restarts=3, max_task_retries=3)
class ShardActor(ShardServer):
    """A bank shard in a Ray actor; restarts reload and re-verify the shard from storage."""

    def __init__(self, bank_root: str, entry: dict[str, Any], offset: int, storage_options: dict[str, Any] | None = None,
                 aggregate: int | None = None) -> None:
        threads = set_worker_threads()
        super().__init__(bank_root, entry, offset, storage_options, verify=True, threads=threads, aggregate=aggregate)

    def ping(self) -> bool:
        return True


def bank_id_of(bank_root: str, manifest: dict[str, Any]) -> str:
    """A short identity of one bank version: its version name plus a hash of its manifest."""
    digest = hashlib.sha256(json.dumps(manifest, sort_keys=True).encode()).hexdigest()[:12]
    version = manifest["version"]
    return f"{version_name(version) if isinstance(version, int) else version}-{digest}"


@dataclass
class ServedBank:
    """Handles of a bank's shard actors plus what a scorer needs to know about the bank."""

    bank_root: str
    manifest: dict[str, Any]
    actors: list[Any]
    offsets: list[int]
    sizes: list[int]

    @property
    def bank_id(self) -> str:
        return bank_id_of(self.bank_root, self.manifest)

    @property
    def n_images(self) -> int:
        return int(sum(self.sizes))

    def shutdown(self) -> None:
        for actor in self.actors:
            ray.kill(actor, no_restart=True)


def shard_actor_cpus(n_shards: int) -> float:
    """CPUs reserved per shard actor: one each on a cluster, a fair part of half the CPUs on a small machine.

    Asking a whole CPU per shard on a 2-CPU machine would leave a third shard unschedulable and the
    job waiting forever.
    """
    return float(min(1.0, max(0.05, cluster_cpus() / (2 * max(n_shards, 1)))))


def start_shard_actors(bank_root: str, manifest: dict[str, Any], storage_options: dict[str, Any] | None = None,
                       num_cpus: float | None = None, aggregate: int | None = None) -> ServedBank:
    """One shard actor per manifest entry; returns once every shard is loaded and verified.

    ``aggregate``: the feature space the job will query (the actors prepare it while loading, and
    keep only that copy of their pyramids).
    """
    if num_cpus is None:
        num_cpus = shard_actor_cpus(len(manifest["shards"]))
    actors, offsets, sizes, offset = [], [], [], 0
    for entry in manifest["shards"]:
        actors.append(ShardActor.options(num_cpus=num_cpus).remote(bank_root, entry, offset, storage_options, aggregate))
        offsets.append(offset)
        sizes.append(int(entry["n_images"]))
        offset += int(entry["n_images"])
    try:
        ray.get([a.ping.remote() for a in actors])  # surfaces load/verification errors now
    except ray.exceptions.RayActorError as exc:
        for actor in actors:
            ray.kill(actor, no_restart=True)
        raise BankLoadError(f"a bank shard could not be served: {creation_error_reason(exc)}") from None
    return ServedBank(bank_root, manifest, actors, offsets, sizes)


class BankLoadError(RuntimeError):
    """A shard actor could not load its shard (missing or changed file, unreadable storage)."""


def creation_error_reason(exc: BaseException) -> str:
    """The original error of an actor whose constructor raised, without Ray's wrapping and traceback.

    Ray reports such an actor as dead with a message that starts with where it ran and ends with
    the constructor's own ``Type: message`` line; an operator needs only that last line.
    """
    lines = [line.strip() for line in str(exc).splitlines() if line.strip()]
    return lines[-1] if lines else type(exc).__name__


def serve_bank(bank_url: str, storage_options: dict[str, Any] | None = None, num_cpus: float | None = None,
               aggregate: int | None = None) -> ServedBank:
    """Serve the bank's latest complete version (or the version folder given)."""
    bank_root, manifest = open_bank(bank_url, storage_options)
    return start_shard_actors(bank_root, manifest, storage_options, num_cpus, aggregate)


class BankClient:
    """Scores query features against a served bank; the distributed twin of ``Spade._score_features``."""

    def __init__(self, bank: ServedBank, config: SpadeConfig) -> None:
        self.bank = bank
        self.config = config

    def search(self, global_: np.ndarray, k: int, exclude: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray]:
        parts = ray.get([a.search.remote(global_, k, exclude) for a in self.bank.actors])
        return merge_topk(parts, k)

    def neighbour_ids(self, rows: np.ndarray) -> list[list[tuple[str, str]]]:
        """(image id, uri) of bank-wide rows, per query row."""
        flat = sorted({int(r) for r in np.asarray(rows).ravel() if r >= 0})
        found: dict[int, tuple[str, str]] = {}
        starts = np.asarray(self.bank.offsets)
        by_shard: dict[int, list[int]] = {}
        for r in flat:
            by_shard.setdefault(int(np.searchsorted(starts, r, side="right") - 1), []).append(r)
        refs = {s: self.bank.actors[s].ids.remote(np.asarray(rs)) for s, rs in by_shard.items()}
        for s, ref in refs.items():
            found.update(zip(by_shard[s], ray.get(ref)))
        return [[found[int(r)] for r in row if r >= 0] for row in np.asarray(rows)]

    def score(self, query: FeatureBatch, exclude: np.ndarray | None = None,
              aggregated: bool = False) -> tuple[np.ndarray, list[np.ndarray], np.ndarray]:
        """kNN image scores, fused maps at input size, and neighbour rows for a batch of query features.

        ``aggregated``: the query pyramids are already in the configured feature space (bank images
        scored leave-one-out, see ``ShardServer.features``); otherwise they are raw and aggregated here.
        """
        cfg = self.config
        k = max(cfg.image_k, cfg.pixel_k)
        dists, rows = self.search(query.global_, k, exclude)
        scores = image_score(dists, cfg.image_k)
        gallery = rows[:, : cfg.pixel_k]
        levels = query.levels if aggregated else aggregate_levels(query.levels, cfg.aggregate)
        levels_ref = ray.put([np.ascontiguousarray(level, dtype=np.float32) for level in levels])
        calls = []
        for actor, offset, size in zip(self.bank.actors, self.bank.offsets, self.bank.sizes):
            wanted = {}
            for b in range(len(query)):
                owned = gallery[b][(gallery[b] >= offset) & (gallery[b] < offset + size)]
                if owned.size:
                    wanted[b] = owned
            if wanted:
                calls.append(actor.correspond.remote(levels_ref, wanted, cfg.kappa, cfg.matching, cfg.coarse_k, cfg.margin,
                                                     cfg.aggregate))
        answers = ray.get(calls)
        maps = []
        for b in range(len(query)):
            level_maps = []
            for level in range(len(query.levels)):
                parts = [torch.tensor(ans[b][level]) for ans in answers if b in ans]
                level_maps.append(merge_smallest(parts, cfg.kappa).mean(dim=-1))
            maps.append(fuse_levels(level_maps, cfg.image_size, cfg.sigma))
        return scores, maps, rows
