"""Retrieval of the nearest normal images by their pooled global vectors (FAISS).

An exact flat L2 index is the default: normal banks hold thousands to millions of images, and
exact search keeps SPADE's image score what the paper defines.  Distances are returned as plain
Euclidean distances (FAISS returns squared ones).
"""

from __future__ import annotations

import faiss
import numpy as np

__all__ = ["BLAS_FROM_QUERIES", "RERANK_MARGIN", "GlobalIndex", "merge_topk", "search_exact"]


# FAISS proposes this many extra candidates; exact distances then decide the order.  Its own
# distances (|x|^2 + |y|^2 - 2xy in float32, computed differently for different index sizes and
# batch sizes) can swap near-ties, so without the exact re-ranking a bank split into shards
# could pick a different k-th neighbour than one index over everything.
RERANK_MARGIN = 8

# FAISS (1.15) scans with one BLAS matrix multiply only when queries x dim reaches its
# ``distance_compute_blas_threshold`` (default 128,000: 100 queries of 1280-d), and otherwise scans
# the whole index once per query.  Scoring batches are 16 images, so from 16 queries on the BLAS
# path is taken: measured 4.5x (16 queries) to 12x (64) faster on a 250,000-vector shard, and 3-4x
# slower for a single query, which keeps the per-query scan (docs/scaling.md).
BLAS_FROM_QUERIES = 16


def search_exact(index: faiss.Index, vectors: np.ndarray, queries: np.ndarray, k: int,
                 exclude: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray]:
    """The ``k`` nearest rows of ``vectors`` (indexed by ``index``) for each query, deterministically.

    Returns (distances float64, rows int64), both (B, k), ascending by exact float64 Euclidean
    distance, ties broken by row; -1/inf where there are fewer than k rows.  The distances stay
    float64 so that :func:`merge_topk` orders shards' answers as this function ordered them:
    rounded to float32, distinct neighbours can tie, and a tie broken by row depends on the
    order in which a bank's images were added (a real case on magnetic_tile: the 50th and 51st
    neighbours of a test image 1e-7 apart, and the in-process and the sharded bank differ in
    row order).  ``exclude`` (B,) or (B, m)
    names the rows to leave out of each query's answer (-1: none), for leave-one-out scoring
    (m > 1: every tile of a tiled bank frame).
    """
    queries = np.ascontiguousarray(queries, dtype=np.float32)
    if queries.ndim != 2:
        raise ValueError(f"queries must be (B, D); got {queries.shape}")
    n_query, n_rows = len(queries), int(index.ntotal)
    dist = np.full((n_query, k), np.inf, dtype=np.float64)
    rows = np.full((n_query, k), -1, dtype=np.int64)
    excluded = None if exclude is None else np.asarray(exclude, dtype=np.int64).reshape(n_query, -1)
    kk = min(k + RERANK_MARGIN + (0 if excluded is None else excluded.shape[1]), n_rows)
    if kk == 0 or n_query == 0:
        return dist, rows
    faiss.cvar.distance_compute_blas_threshold = BLAS_FROM_QUERIES * queries.shape[1]
    _, candidates = index.search(queries, kk)
    for b in range(n_query):
        cand = candidates[b][candidates[b] >= 0]
        if excluded is not None:
            cand = cand[~np.isin(cand, excluded[b])]
        exact = np.linalg.norm(vectors[cand].astype(np.float64) - queries[b].astype(np.float64), axis=1)
        order = np.lexsort((cand, exact))[:k]
        dist[b, : len(order)] = exact[order]
        rows[b, : len(order)] = cand[order]
    return dist, rows


class GlobalIndex:
    """An exact L2 index over global vectors whose rows are numbered 0..n-1."""

    def __init__(self, vectors: np.ndarray) -> None:
        vectors = np.ascontiguousarray(vectors, dtype=np.float32)
        if vectors.ndim != 2:
            raise ValueError(f"global vectors must be (N, D); got {vectors.shape}")
        self.vectors = vectors
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
        return search_exact(self.index, self.vectors, queries, k, exclude)


def merge_topk(parts: list[tuple[np.ndarray, np.ndarray]], k: int) -> tuple[np.ndarray, np.ndarray]:
    """Merge per-shard (distances, global ids) top-k lists into the exact global top-k.

    Ties are broken by id so the result does not depend on the order of the shards.
    """
    dists = np.concatenate([p[0] for p in parts], axis=1)
    ids = np.concatenate([p[1] for p in parts], axis=1)
    order = np.lexsort((ids, dists), axis=1) if dists.size else np.zeros_like(ids)
    order = order[:, :k]
    return np.take_along_axis(dists, order, axis=1), np.take_along_axis(ids, order, axis=1)
