"""Retrieval of the nearest normal images by their pooled global vectors (FAISS).

An exact flat L2 index is the default: normal banks hold thousands to millions of images, and
exact search keeps SPADE's image score what the paper defines.  Distances are returned as plain
Euclidean distances (FAISS returns squared ones).
"""

from __future__ import annotations

import faiss
import numpy as np

__all__ = ["GlobalIndex", "merge_topk"]


class GlobalIndex:
    """An exact L2 index over global vectors whose rows are numbered 0..n-1."""

    def __init__(self, vectors: np.ndarray) -> None:
        vectors = np.ascontiguousarray(vectors, dtype=np.float32)
        if vectors.ndim != 2:
            raise ValueError(f"global vectors must be (N, D); got {vectors.shape}")
        self.dim = int(vectors.shape[1])
        self.index = faiss.IndexFlatL2(self.dim)
        self.index.add(vectors)

    def __len__(self) -> int:
        return int(self.index.ntotal)

    def search(self, queries: np.ndarray, k: int, exclude: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray]:
        """The ``k`` nearest rows for each query: (distances, ids), both (B, k), ascending.

        ``exclude`` (B,) gives one row id per query to leave out (leave-one-out scoring of the
        bank's own images).  Missing neighbours (k > bank size) have id -1 and distance inf.
        """
        queries = np.ascontiguousarray(queries, dtype=np.float32)
        kk = min(k + (0 if exclude is None else 1), len(self))
        d2, ids = self.index.search(queries, kk) if kk > 0 else (np.zeros((len(queries), 0), np.float32), np.zeros((len(queries), 0), np.int64))
        dist = np.full((len(queries), k), np.inf, dtype=np.float32)
        out_ids = np.full((len(queries), k), -1, dtype=np.int64)
        for row in range(len(queries)):
            keep = ids[row] >= 0
            if exclude is not None:
                keep &= ids[row] != exclude[row]
            kept_d2, kept_ids = d2[row][keep][:k], ids[row][keep][:k]
            dist[row, : len(kept_ids)] = np.sqrt(np.maximum(kept_d2, 0.0))
            out_ids[row, : len(kept_ids)] = kept_ids
        return dist, out_ids


def merge_topk(parts: list[tuple[np.ndarray, np.ndarray]], k: int) -> tuple[np.ndarray, np.ndarray]:
    """Merge per-shard (distances, global ids) top-k lists into the exact global top-k.

    Ties are broken by id so the result does not depend on the order of the shards.
    """
    dists = np.concatenate([p[0] for p in parts], axis=1)
    ids = np.concatenate([p[1] for p in parts], axis=1)
    order = np.lexsort((ids, dists), axis=1) if dists.size else np.zeros_like(ids)
    order = order[:, :k]
    return np.take_along_axis(dists, order, axis=1), np.take_along_axis(ids, order, axis=1)
