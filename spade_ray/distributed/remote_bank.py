"""A served, sharded bank as the scorer sees it: the Ray implementation of the scorer's interfaces.

Retrieval is scatter-gather: every shard returns its local top-k and this merges them into the
exact global top-k (the same result as one index over everything).  Correspondence moves the
query to the data: the batch's query pyramids go once into the object store, each shard that
owns some of the neighbours computes per-level nearest-match distances against its own patches,
and the answers are merged (element-wise minimum for kappa=1, the k smallest otherwise), which
is what one gallery holding every shard's pixels would answer.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import ray
import torch

from spade_ray.distributed.shard_actors import ServedBank
from spade_ray.method.calibration import Calibration, calibration_rows
from spade_ray.method.config import SpadeConfig
from spade_ray.method.correspondence import merge_smallest
from spade_ray.method.features import FeatureBatch
from spade_ray.method.ignore import IgnoreRegion
from spade_ray.method.matching import MatchSettings
from spade_ray.method.retrieval import merge_topk
from spade_ray.method.scorer import Scorer
from spade_ray.method.tiled_scoring import calibration_routine
from spade_ray.progress import Progress, no_progress

__all__ = ["RemoteBank", "calibrate_served"]


class RemoteBank:
    """Neighbour index, gallery matcher and calibration source over a bank's shard actors.

    ``aggregate`` is the feature space the shards serve (bank images handed out for calibration
    come in it).
    """

    def __init__(self, bank: ServedBank, aggregate: int) -> None:
        self.bank = bank
        self.aggregate = aggregate
        self._starts = np.asarray(bank.offsets)

    def _owners(self, rows: np.ndarray) -> np.ndarray:
        return np.searchsorted(self._starts, rows, side="right") - 1

    # NeighbourIndex
    def search(self, queries: np.ndarray, k: int, exclude: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray]:
        parts = ray.get([a.search.remote(queries, k, exclude) for a in self.bank.actors])
        return merge_topk(parts, k)

    def neighbour_names(self, rows: np.ndarray) -> list[list[str]]:
        """The source URIs of bank rows, per query (what the report shows and result rows record)."""
        return [[uri for _, uri in row] for row in self.neighbour_ids(rows)]

    def neighbour_ids(self, rows: np.ndarray) -> list[list[tuple[str, str]]]:
        """(image id, uri) of bank-wide rows, per query row."""
        flat = np.asarray(sorted({int(r) for r in np.asarray(rows).ravel() if r >= 0}), dtype=np.int64)
        owners = self._owners(flat)
        refs = {int(s): self.bank.actors[s].ids.remote(flat[owners == s]) for s in np.unique(owners)}
        found: dict[int, tuple[str, str]] = {}
        for s, ref in refs.items():
            found.update(zip(flat[owners == s].tolist(), ray.get(ref)))
        return [[found[int(r)] for r in row if r >= 0] for row in np.asarray(rows)]

    # GalleryMatcher
    def gallery_distances(self, query_levels: Sequence[np.ndarray], galleries: np.ndarray,
                          match: MatchSettings) -> list[list[torch.Tensor]]:
        levels_ref = ray.put([np.ascontiguousarray(level, dtype=np.float32) for level in query_levels])
        calls = []
        for actor, offset, size in zip(self.bank.actors, self.bank.offsets, self.bank.sizes):
            wanted = {}
            for b, rows in enumerate(galleries):
                owned = rows[(rows >= offset) & (rows < offset + size)]
                if owned.size:
                    wanted[b] = owned
            if wanted:
                calls.append(actor.correspond.remote(levels_ref, wanted, match))
        answers = ray.get(calls)
        return [[merge_smallest([torch.tensor(ans[b][level]) for ans in answers if b in ans], match.kappa)
                 for level in range(len(query_levels))]
                for b in range(len(galleries))]

    # CalibrationSource
    def calibration_rows(self, samples: int) -> np.ndarray:
        """Each shard proposes its own smallest-hash candidates; the bank-wide choice is among them."""
        candidates = ray.get([actor.calibration_candidates.remote(samples) for actor in self.bank.actors])
        uris = [uri for shard_uris, _ in candidates for uri in shard_uris]
        rows = np.concatenate([rows for _, rows in candidates])
        return np.sort(rows[calibration_rows(uris, samples)])

    def keys(self, rows: np.ndarray) -> list[str]:
        return [pairs[0][0] for pairs in self.neighbour_ids(np.asarray(rows)[:, None])]

    def features(self, rows: np.ndarray) -> FeatureBatch:
        rows = np.asarray(rows)
        owners = self._owners(rows)
        shards = np.unique(owners)
        answers = ray.get([self.bank.actors[s].features.remote(rows[owners == s], self.aggregate) for s in shards])
        global_ = np.empty((len(rows), answers[0][0].shape[1]), dtype=np.float32)
        levels = [np.empty((len(rows), *level.shape[1:]), dtype=np.float32) for level in answers[0][1]]
        for s, (g, shard_levels) in zip(shards, answers):
            where = np.flatnonzero(owners == s)
            global_[where] = g
            for out, level in zip(levels, shard_levels):
                out[where] = level
        return FeatureBatch(global_, levels)


def calibrate_served(served: ServedBank, config: SpadeConfig, samples: int, target_fpr: float, batch_size: int,
                     progress: Progress = no_progress, ignore: IgnoreRegion | None = None) -> Calibration | None:
    """The bank's normal-only calibration, computed on its shard actors (None for fewer than 2 images or no samples).

    The same routine and scorer as the in-process model's, so both reach identical thresholds;
    ``ignore`` (the bank's ignore region) zeroes the normal maps where scoring will.
    """
    if samples <= 0 or served.n_images < 2:
        return None
    remote = RemoteBank(served, config.aggregate)
    bar = progress(min(samples, served.n_images), "calibrate (leave-one-out)")
    try:
        return calibration_routine(config)(Scorer(config, remote, remote, ignore=ignore), remote, samples, target_fpr,
                                           batch_size, bar.update)
    finally:
        bar.close()
