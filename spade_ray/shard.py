"""One shard of the normal bank, served: retrieval and correspondence against the data it owns.

This is the work a shard actor does, as a plain class with no Ray in it (the Ray layer wraps it
with ``ray.remote``).  The query moves to the data: a shard answers "your top-k global neighbours"
and "per-level nearest-match distances of these query pixels against the pixels of the neighbours
I own"; it never ships its pyramids.  Rows are numbered bank-wide: shard rows plus the shard's
``offset`` (its position in the manifest), so results from all shards merge exactly.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch

from .bank import BankShard, load_shard
from .coarse_to_fine import DEFAULT_COARSE_K, DEFAULT_MARGIN
from .correspondence import DEFAULT_CHUNK_ELEMENTS
from .model import calibration_rows
from .pyramid_bank import PyramidBanks

__all__ = ["ShardServer"]


class ShardServer:
    """Holds one bank shard in memory and answers retrieval and correspondence queries."""

    def __init__(
        self,
        bank_root: str,
        entry: dict[str, Any],
        offset: int,
        storage_options: dict[str, Any] | None = None,
        verify: bool = True,
        threads: int | None = None,
    ) -> None:
        if threads:
            torch.set_num_threads(threads)
            import faiss

            faiss.omp_set_num_threads(threads)
        self.shard: BankShard = load_shard(bank_root, entry, verify=verify, storage_options=storage_options)
        self.offset = int(offset)
        self.pyramids = PyramidBanks(self.shard.levels)  # pyramids(aggregate): this shard's pyramids in that feature space

    @classmethod
    def from_shard(cls, shard: BankShard, offset: int) -> "ShardServer":
        server = cls.__new__(cls)
        server.shard, server.offset = shard, int(offset)
        server.pyramids = PyramidBanks(shard.levels)
        return server

    def info(self) -> dict[str, Any]:
        return {"name": self.shard.name, "n_images": len(self.shard), "offset": self.offset,
                "bytes": int(self.shard.global_.nbytes + sum(level.nbytes for level in self.shard.levels))}

    def owns(self, rows: np.ndarray) -> np.ndarray:
        """Mask of the bank-wide rows that live in this shard."""
        return (rows >= self.offset) & (rows < self.offset + len(self.shard))

    def search(self, queries: np.ndarray, k: int, exclude: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray]:
        """Local top-k per query as (distances, bank-wide rows), ascending; -1/inf pad.

        ``exclude`` (B,) bank-wide rows to leave out (leave-one-out calibration); -1 for none.
        """
        local_exclude = None
        if exclude is not None:
            exclude = np.asarray(exclude)
            local_exclude = np.where(self.owns(exclude), exclude - self.offset, -1)
        dist, local = self.shard.search(queries, k, local_exclude)
        return dist, np.where(local >= 0, local + self.offset, -1)

    def correspond(
        self,
        query_levels: list[np.ndarray],
        wanted: dict[int, np.ndarray],
        kappa: int,
        matching: str = "exact",
        coarse_k: int = DEFAULT_COARSE_K,
        margin: int = DEFAULT_MARGIN,
        aggregate: int = 1,
        chunk_elements: int = DEFAULT_CHUNK_ELEMENTS,
    ) -> dict[int, list[np.ndarray]]:
        """For query b in ``wanted``: per level, (H, W, kappa) distances to this shard's part of its gallery.

        ``query_levels[l]`` is (B, C, H, W) for the whole batch (shared via the object store), already
        aggregated with ``aggregate`` (the gallery is aggregated and laid out here, once per shard);
        ``wanted[b]`` lists bank-wide rows of b's gallery, only those this shard owns are used.
        """
        out: dict[int, list[np.ndarray]] = {}
        bank = self.pyramids(aggregate)
        for b, rows in wanted.items():
            rows = np.asarray(rows)
            local = np.sort(rows[self.owns(rows)] - self.offset)
            if local.size == 0:
                continue
            queries = [torch.from_numpy(np.array(level[b], dtype=np.float32)) for level in query_levels]  # writable copies
            distances = bank.distances(queries, local, kappa, matching, coarse_k, margin, chunk_elements)
            out[int(b)] = [d.numpy() for d in distances]
        return out

    def features(self, rows: np.ndarray) -> tuple[np.ndarray, list[np.ndarray]]:
        """Global vectors and float32 pyramids of a few owned rows (calibration only)."""
        local = np.asarray(rows) - self.offset
        if not self.owns(np.asarray(rows)).all():
            raise ValueError(f"shard {self.shard.name} does not own all of rows {rows}")
        return self.shard.global_[local].copy(), [level[local].astype(np.float32) for level in self.shard.levels]

    def calibration_candidates(self, samples: int) -> tuple[list[str], np.ndarray]:
        """URIs and bank-wide rows of this shard's share of a calibration sample (see ``calibration_rows``)."""
        local = calibration_rows(self.shard.uris, samples)
        return [self.shard.uris[r] for r in local.tolist()], local + self.offset

    def ids(self, rows: np.ndarray) -> list[tuple[str, str]]:
        """(image id, uri) of owned bank-wide rows."""
        return [(self.shard.ids[r - self.offset], self.shard.uris[r - self.offset]) for r in np.asarray(rows).tolist()]
