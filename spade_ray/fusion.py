"""From per-level nearest-match distances to one anomaly map.

SPADE scores a pixel by how far its features are from the closest normal features, at each level
of the pyramid; the levels are upsampled to the input resolution, averaged, and smoothed with a
Gaussian (sigma 4 in the paper) because single-pixel maxima are mostly feature noise.
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F
from scipy.ndimage import gaussian_filter

__all__ = ["DEFAULT_SIGMA", "fuse_levels", "image_score"]

DEFAULT_SIGMA = 4.0


def fuse_levels(level_maps: list[torch.Tensor], size: int | tuple[int, int], sigma: float = DEFAULT_SIGMA) -> np.ndarray:
    """Upsample (bilinear) each (H_l, W_l) map to ``size``, average them, Gaussian-smooth.

    Returns a float32 (H, W) numpy array.  ``sigma <= 0`` disables smoothing.
    """
    if not level_maps:
        raise ValueError("fuse_levels needs at least one level map")
    out_size = (size, size) if isinstance(size, int) else tuple(size)
    stacked = torch.stack(
        [
            F.interpolate(m.float()[None, None], size=out_size, mode="bilinear", align_corners=False)[0, 0]
            for m in level_maps
        ]
    )
    fused = stacked.mean(dim=0).cpu().numpy()
    if sigma > 0:
        fused = gaussian_filter(fused, sigma=sigma)
    return fused.astype(np.float32, copy=False)


def image_score(knn_distances: np.ndarray, image_k: int) -> np.ndarray:
    """Image-level SPADE score: mean distance to the ``image_k`` nearest normal global vectors.

    ``knn_distances`` is (B, k >= image_k) ascending.
    """
    if knn_distances.shape[1] < image_k:
        raise ValueError(f"need {image_k} neighbour distances, got {knn_distances.shape[1]}")
    return knn_distances[:, :image_k].mean(axis=1)
