"""The published SPADE implementation's correspondence loop, kept as a yardstick and an oracle.

The reference code (SPADE-pytorch, the paper's companion) builds the gallery of all pixel features
of the K nearest images and, 100 gallery features at a time, takes the broadcast difference with
the whole query map and its norm over channels, then the minimum.  It is exact and simple and
materialises (100, C, H, W) differences per step, which is what makes it slow; ``spade-ray bench``
times it against the kernels in :mod:`spade_ray.method.correspondence` and :mod:`spade_ray.method.coarse_to_fine`.
"""

from __future__ import annotations

import torch

__all__ = ["reference_level_distances"]

GALLERY_STEP = 100  # gallery features per step, as in the published code


def reference_level_distances(query_map: torch.Tensor, gallery_maps: torch.Tensor) -> torch.Tensor:
    """(H, W) distance of each query pixel (C, H, W) to its nearest gallery pixel (K, C, H', W').

    Unlike the published loop (which drops the last ``G mod 100`` gallery features) every gallery
    feature is used, so the result is the exact nearest-neighbour distance (kappa = 1).
    """
    channels = query_map.shape[0]
    gallery = gallery_maps.float().permute(0, 2, 3, 1).reshape(-1, channels)[:, :, None, None]  # (G, C, 1, 1)
    query = query_map.float()[None]  # (1, C, H, W)
    best = torch.full(query_map.shape[1:], float("inf"))
    for start in range(0, gallery.shape[0], GALLERY_STEP):
        dist = torch.linalg.vector_norm(gallery[start : start + GALLERY_STEP] - query, dim=1)  # (step, H, W)
        best = torch.minimum(best, dist.min(dim=0).values)
    return best
