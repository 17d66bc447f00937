"""Locally aggregated pixel features: each feature averaged over its n x n neighbourhood.

A raw pyramid feature describes one receptive field; a small defect, or a normal texture that is
shifted by a pixel, changes it abruptly.  Averaging each feature with its neighbours (PatchCore's
"locally aware patch features", 3x3 there) gives every pixel some context at no cost in feature
size, so the nearest-match distance measures "does this neighbourhood look normal" rather than
"does this exact receptive field exist in the gallery".  The price: a defect thinner than the
window is averaged with normal surroundings, so thin scratches fade (measured in the README, which
says when to prefer ``--aggregate 1``).  The bank and the queries must be
aggregated the same way; that is why the setting travels with the scoring settings and the bank
keeps raw features (one bank serves every setting).
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch
import torch.nn.functional as F

__all__ = ["aggregate_level", "aggregate_levels"]

_CHUNK_IMAGES = 64  # bounds the float32 temporary when a whole bank is aggregated


def aggregate_level(level: np.ndarray | torch.Tensor, size: int) -> np.ndarray:
    """(B, C, H, W) features -> the same shape and dtype, each averaged over its ``size`` x ``size`` neighbourhood.

    Border pixels average only the neighbours that exist (no zero padding pulls them down).
    ``size`` must be odd (the window is centred); 1 returns the input unchanged.
    """
    if size < 1 or size % 2 == 0:
        raise ValueError(f"aggregate must be an odd window size >= 1; got {size}")
    array = level.cpu().numpy() if isinstance(level, torch.Tensor) else np.asarray(level)
    if size == 1:
        return array
    out = np.empty_like(array)
    for start in range(0, array.shape[0], _CHUNK_IMAGES):
        chunk = torch.from_numpy(np.ascontiguousarray(array[start : start + _CHUNK_IMAGES], dtype=np.float32))
        # channels-last: PyTorch's CPU pooling kernel vectorises over channels there (measured 3x
        # faster on lite0 pyramids, bitwise the same result)
        pooled = F.avg_pool2d(chunk.contiguous(memory_format=torch.channels_last), size, stride=1, padding=size // 2,
                              count_include_pad=False).contiguous()
        out[start : start + _CHUNK_IMAGES] = pooled.numpy().astype(array.dtype, copy=False)
    return out


def aggregate_levels(levels: Sequence[np.ndarray], size: int) -> list[np.ndarray]:
    """:func:`aggregate_level` applied to every level of a pyramid."""
    return [aggregate_level(level, size) for level in levels]
