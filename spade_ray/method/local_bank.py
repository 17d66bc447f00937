"""A normal bank held in this process: the in-process implementation of the scorer's interfaces.

It is what :class:`spade_ray.Spade` scores against: a FAISS index of the global vectors
(:class:`~spade_ray.method.scorer.NeighbourIndex`), the pyramids laid out for matching
(:class:`~spade_ray.method.scorer.GalleryMatcher`), and the bank images as calibration queries
(:class:`~spade_ray.method.calibration.CalibrationSource`).
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch

from spade_ray.method.calibration import calibration_rows
from spade_ray.method.features import FeatureBatch
from spade_ray.method.matching import MatchSettings
from spade_ray.method.pyramid_bank import PyramidBank, PyramidBanks
from spade_ray.method.retrieval import GlobalIndex
from spade_ray.method.timing import StageTimer

__all__ = ["LocalBank"]


class LocalBank:
    """Ids, float32 global vectors and float16 pyramids of N normal images, served in process.

    The pyramids are laid out for matching once per feature space asked for (``aggregate``),
    beside the raw ones (which :meth:`spade_ray.Spade.save` writes).
    """

    def __init__(self, ids: Sequence[str], global_: np.ndarray, levels: Sequence[np.ndarray], aggregate: int,
                 device: torch.device | str | None = None, timer: StageTimer | None = None) -> None:
        self.ids = list(ids)
        self.global_ = np.ascontiguousarray(global_, dtype=np.float32)
        self.levels = [np.ascontiguousarray(level, dtype=np.float16) for level in levels]
        self.aggregate = aggregate
        self.device = device
        self.timer = timer or StageTimer()
        self._pyramids = PyramidBanks(self.levels)
        with self.timer.stage("index"):
            self.index = GlobalIndex(self.global_)

    def __len__(self) -> int:
        return len(self.ids)

    def pyramids(self, aggregate: int | None = None) -> PyramidBank:
        """The pyramids in the feature space of ``aggregate`` (default: the served one), laid out for matching."""
        aggregate = self.aggregate if aggregate is None else aggregate
        if aggregate in self._pyramids:
            return self._pyramids(aggregate)
        with self.timer.stage("prepare bank"):
            return self._pyramids(aggregate)

    # NeighbourIndex
    def search(self, queries: np.ndarray, k: int, exclude: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray]:
        return self.index.search(queries, k, exclude)

    def neighbour_names(self, rows: np.ndarray) -> list[list[str]]:
        return [[self.ids[r] for r in row if r >= 0] for row in np.asarray(rows)]

    # GalleryMatcher
    def gallery_distances(self, query_levels: Sequence[np.ndarray], galleries: np.ndarray,
                          match: MatchSettings) -> list[list[torch.Tensor]]:
        answers = self.pyramids(match.aggregate).gallery_distances(query_levels, dict(enumerate(galleries)), match, self.device)
        return [answers[b] for b in range(len(galleries))]

    # CalibrationSource
    def calibration_rows(self, samples: int) -> np.ndarray:
        return calibration_rows(self.ids, samples)

    def keys(self, rows: np.ndarray) -> list[str]:
        return [self.ids[r] for r in np.asarray(rows).tolist()]

    def features(self, rows: np.ndarray) -> FeatureBatch:
        return FeatureBatch(self.global_[rows], self.pyramids().query_levels(rows))
