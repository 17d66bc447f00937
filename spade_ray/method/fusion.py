"""From per-level nearest-match distances to one anomaly map.

SPADE scores a pixel by how far its features are from the closest normal features, at each level
of the pyramid; the levels are upsampled to the input resolution, averaged, and smoothed with a
Gaussian (sigma 4 in the paper) because single-pixel maxima are mostly feature noise.
"""

from __future__ import annotations

from functools import lru_cache

import numpy as np
import torch
import torch.nn.functional as F
from scipy.ndimage import gaussian_filter1d

__all__ = ["DEFAULT_SIGMA", "fuse_levels"]

DEFAULT_SIGMA = 4.0


def fuse_levels(level_maps: list[torch.Tensor], size: int | tuple[int, int], sigma: float = DEFAULT_SIGMA) -> np.ndarray:
    """Upsample (bilinear) each (H_l, W_l) map to ``size``, average them, Gaussian-smooth.

    Returns a float32 (H, W) numpy array.  ``sigma <= 0`` disables smoothing.

    Every step is linear and separable, so for each level and axis the upsampling and the
    smoothing are one precomputed matrix, and the fused map is ``mean_l A_l M_l B_l^T``: a few
    small matrix products (0.1 ms at 224 px) instead of three upsamplings and a 33-tap filter over
    the full-size map (1.4 ms, on 2 cores).  The matrices are built by applying the very operators
    (``F.interpolate``, bilinear, half-pixel centres; ``scipy.ndimage.gaussian_filter1d``,
    truncate 4, reflected borders) to unit vectors, so the result is theirs up to float rounding.
    """
    if not level_maps:
        raise ValueError("fuse_levels needs at least one level map")
    out_h, out_w = (size, size) if isinstance(size, int) else tuple(size)
    fused = None
    for level_map in level_maps:
        m = level_map.float()
        rows = _operator(int(m.shape[0]), out_h, float(sigma)).to(m.device)
        cols = _operator(int(m.shape[1]), out_w, float(sigma)).to(m.device)
        term = rows @ m @ cols.T
        fused = term if fused is None else fused + term
    assert fused is not None
    return (fused / len(level_maps)).cpu().numpy().astype(np.float32, copy=False)


@lru_cache(maxsize=64)
def _operator(n_in: int, n_out: int, sigma: float) -> torch.Tensor:
    """(n_out, n_in) float32: bilinear upsampling of a length-``n_in`` signal to ``n_out``, then smoothing."""
    basis = torch.eye(n_in, dtype=torch.float64)[:, None, :]  # n_in unit signals
    upsample = F.interpolate(basis, size=n_out, mode="linear", align_corners=False)[:, 0, :].T.numpy()  # (n_out, n_in)
    if sigma > 0:
        upsample = gaussian_filter1d(upsample, sigma=sigma, axis=0, mode="reflect", truncate=4.0)
    return torch.from_numpy(np.ascontiguousarray(upsample, dtype=np.float32))
