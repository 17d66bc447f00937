"""Feature extraction: normalised network input -> (global vectors, feature pyramid) as numpy arrays.

One function serves the in-process model and the Ray extractor and scorer actors (each resizes
and normalises with the same :class:`~spade_ray.method.preprocess.Preprocessor`), so a bank built by the
distributed job holds exactly the features :class:`spade_ray.Spade` would compute.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from spade_ray.method.backbones import Backbone

__all__ = ["FeatureBatch", "features_from_tensor"]


@dataclass
class FeatureBatch:
    """Features of B images: ``global_`` (B, D) float32 and one (B, C, H, W) array per level."""

    global_: np.ndarray
    levels: list[np.ndarray]

    def __len__(self) -> int:
        return int(self.global_.shape[0])

    def select(self, rows: np.ndarray | list[int] | slice) -> FeatureBatch:
        return FeatureBatch(self.global_[rows], [level[rows] for level in self.levels])

    @staticmethod
    def concat(batches: list[FeatureBatch]) -> FeatureBatch:
        if not batches:
            raise ValueError("no feature batches to concatenate")
        return FeatureBatch(
            np.concatenate([b.global_ for b in batches]),
            [np.concatenate([b.levels[i] for b in batches]) for i in range(len(batches[0].levels))],
        )


def features_from_tensor(backbone: Backbone, tensor: torch.Tensor, level_dtype: np.dtype | type = np.float32) -> FeatureBatch:
    """Run the backbone on an already normalised (B, 3, S, S) batch."""
    pyramid, pooled = backbone(tensor.to(backbone.device))
    return FeatureBatch(
        pooled.float().cpu().numpy(),
        [level.float().cpu().numpy().astype(level_dtype, copy=False) for level in pyramid],
    )
