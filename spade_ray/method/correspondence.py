"""Dense correspondence: for every query pixel feature, the distance to its nearest gallery features.

This is SPADE's pixel-level step and its cost centre.  Distances are computed in the
matrix-multiply form ``|q|^2 + |g|^2 - 2 q.g`` over bounded chunks of the gallery, so memory is
``O(queries x chunk)`` whatever the size of the gallery (the reference implementation materialises
the whole distance matrix and runs out of memory on large banks).  The matrix-multiply form loses
precision when two features are close relative to their norms, so it is only used to *find* the
``kappa`` nearest gallery rows; their distances are then recomputed exactly from the differences.
"""

from __future__ import annotations

import torch

__all__ = [
    "DEFAULT_CHUNK_ELEMENTS",
    "flatten_gallery",
    "level_nearest_distances",
    "merge_smallest",
    "nearest_distances",
]

# 2**22 float32 distances = 16 MiB per chunk (measured fastest on 224 px lite0 pyramids; larger chunks
# fall out of cache, smaller ones pay per-call overhead), and memory does not grow with the gallery:
# a scoring actor needs the same few MiB whatever the bank size.
DEFAULT_CHUNK_ELEMENTS = 1 << 22


def nearest_distances(
    query: torch.Tensor,
    gallery: torch.Tensor,
    kappa: int = 1,
    chunk_elements: int = DEFAULT_CHUNK_ELEMENTS,
) -> torch.Tensor:
    """Euclidean distances from each query row to its ``kappa`` nearest gallery rows.

    ``query`` is (Q, C), ``gallery`` is (G, C) of any float dtype (fp16 banks are upcast chunk by
    chunk).  Returns (Q, kappa) float32 distances in ascending order; if the gallery has fewer than
    ``kappa`` rows the missing columns are ``inf``.
    """
    if query.ndim != 2 or gallery.ndim != 2 or query.shape[1] != gallery.shape[1]:
        raise ValueError(f"query {tuple(query.shape)} and gallery {tuple(gallery.shape)} must be (Q, C) and (G, C)")
    if kappa < 1:
        raise ValueError(f"kappa must be >= 1; got {kappa}")
    q = query.float()
    n_query, n_gallery = q.shape[0], gallery.shape[0]
    device = q.device
    best_d2 = torch.full((n_query, kappa), float("inf"), device=device)
    best_idx = torch.zeros((n_query, kappa), dtype=torch.long, device=device)
    if n_gallery == 0 or n_query == 0:
        return best_d2
    # |q - g|^2 = |q|^2 + (|g|^2 - 2 q.g): the |q|^2 term is constant per query row, so it is added
    # after the reduction; the chunk is one GEMM into a buffer allocated once (no page-faulting
    # allocation per chunk, which otherwise costs more system time than the arithmetic).
    step = max(1, min(n_gallery, chunk_elements // max(n_query, 1)))
    buffer = torch.empty((n_query, step), dtype=torch.float32, device=device)
    for start in range(0, n_gallery, step):
        g = gallery[start : start + step].to(device=device, dtype=torch.float32)
        d2 = buffer[:, : g.shape[0]]
        torch.addmm((g * g).sum(dim=1)[None, :], q, g.T, beta=1.0, alpha=-2.0, out=d2)
        if kappa == 1:
            values, idx = d2.min(dim=1, keepdim=True)
            better = values < best_d2
            best_d2 = torch.where(better, values, best_d2)
            best_idx = torch.where(better, idx + start, best_idx)
        else:
            k = min(kappa, d2.shape[1])
            values, idx = d2.topk(k, dim=1, largest=False)
            merged_d2 = torch.cat([best_d2, values], dim=1)
            merged_idx = torch.cat([best_idx, idx + start], dim=1)
            best_d2, order = merged_d2.topk(kappa, dim=1, largest=False)
            best_idx = merged_idx.gather(1, order)
    found = torch.isfinite(best_d2)
    # exact distances for the winners: no cancellation error from the expanded form
    winners = gallery[best_idx.clamp_max(n_gallery - 1).to(gallery.device)].to(device=device, dtype=torch.float32)
    exact = torch.linalg.vector_norm(winners - q[:, None, :], dim=2)
    exact = torch.where(found, exact, torch.full_like(exact, float("inf")))
    return exact.sort(dim=1).values


def flatten_gallery(feature_maps: torch.Tensor) -> torch.Tensor:
    """(K, C, H, W) feature maps of K images -> (K*H*W, C) gallery of pixel features."""
    return feature_maps.permute(0, 2, 3, 1).reshape(-1, feature_maps.shape[1])


def level_nearest_distances(
    query_map: torch.Tensor,
    gallery_maps: torch.Tensor,
    kappa: int = 1,
    chunk_elements: int = DEFAULT_CHUNK_ELEMENTS,
) -> torch.Tensor:
    """One pyramid level: query (C, H, W) against every pixel of gallery (K, C, H', W').

    Returns (H, W, kappa) ascending distances; callers that hold different parts of the gallery
    (bank shards) each compute this and :func:`merge_smallest` combines them exactly.
    """
    channels, height, width = query_map.shape
    query = query_map.reshape(channels, height * width).T
    dists = nearest_distances(query, flatten_gallery(gallery_maps), kappa, chunk_elements)
    return dists.reshape(height, width, kappa)


def merge_smallest(parts: list[torch.Tensor], kappa: int) -> torch.Tensor:
    """Merge per-shard ascending ``(..., k_i)`` distance lists into the global ``kappa`` smallest.

    For kappa=1 this is the element-wise minimum; the result equals searching one gallery holding
    all the shards' features.
    """
    if not parts:
        raise ValueError("merge_smallest needs at least one part")
    if kappa == 1:
        out = parts[0][..., :1]
        for part in parts[1:]:
            out = torch.minimum(out, part[..., :1])
        return out
    merged = torch.cat(parts, dim=-1)
    if merged.shape[-1] < kappa:
        pad = torch.full((*merged.shape[:-1], kappa - merged.shape[-1]), float("inf"), dtype=merged.dtype)
        merged = torch.cat([merged, pad], dim=-1)
    return merged.topk(kappa, dim=-1, largest=False).values.sort(dim=-1).values
