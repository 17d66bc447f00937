"""Pyramid matching strategies: how each query pixel finds its nearest normal pixels.

``exact`` is SPADE as published: every pixel of every level against every pixel of the gallery.
``coarse-to-fine`` searches the coarsest level exactly and lets its matches choose the windows the
finer levels search (:mod:`spade_ray.method.coarse_to_fine`).  Both decide per gallery image, so a bank
split over shards answers exactly like one gallery.
"""

from __future__ import annotations

import torch

from spade_ray.method.coarse_to_fine import DEFAULT_COARSE_K, DEFAULT_MARGIN, coarse_to_fine_distances
from spade_ray.method.correspondence import DEFAULT_CHUNK_ELEMENTS, level_nearest_distances

__all__ = ["MATCHING", "pyramid_distances"]

MATCHING = ("exact", "coarse-to-fine")


def pyramid_distances(
    query_levels: list[torch.Tensor],
    gallery_levels: list[torch.Tensor],
    kappa: int = 1,
    matching: str = "exact",
    coarse_k: int = DEFAULT_COARSE_K,
    margin: int = DEFAULT_MARGIN,
    chunk_elements: int = DEFAULT_CHUNK_ELEMENTS,
) -> list[torch.Tensor]:
    """Per level, (H, W, kappa) ascending distances of one query pyramid (C, H, W) to a gallery (K, C, H, W)."""
    if matching == "exact":
        return [level_nearest_distances(q.float(), g, kappa, chunk_elements) for q, g in zip(query_levels, gallery_levels)]
    if matching == "coarse-to-fine":
        return coarse_to_fine_distances(query_levels, gallery_levels, kappa, coarse_k, margin, chunk_elements)
    raise ValueError(f"unknown matching {matching!r}; choose one of {', '.join(MATCHING)}")
