"""Scoring a batch of images, written once: retrieval -> gallery -> correspondence -> fusion -> image score -> decision.

The steps run against two small interfaces, so the same code scores in process and on a cluster:

* a :class:`NeighbourIndex` finds each query's nearest normal images by their global vectors (a
  local FAISS index, or the shard actors' indexes scattered and merged);
* a :class:`GalleryMatcher` matches each query's pixels against the pixels of its gallery (local
  pyramids, or the shard actors that own the gallery images, merged).

:class:`~spade_ray.method.local_bank.LocalBank` implements both in process and
``spade_ray.distributed.remote_bank.RemoteBank`` on Ray; :class:`spade_ray.Spade` and the score
job's actors are thin users of :class:`Scorer`.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from functools import cached_property
from typing import Protocol

import numpy as np
import torch

from spade_ray.method.aggregation import aggregate_levels
from spade_ray.method.config import SpadeConfig
from spade_ray.method.decision import Thresholds
from spade_ray.method.features import FeatureBatch
from spade_ray.method.fusion import fuse_levels
from spade_ray.method.ignore import IgnoreRegion
from spade_ray.method.image_scoring import combine_image_scores, knn_score
from spade_ray.method.matching import MatchSettings
from spade_ray.method.preprocess import Preprocessor
from spade_ray.method.timing import StageTimer

__all__ = ["GalleryMatcher", "Matches", "NeighbourIndex", "Prediction", "Scorer"]


class NeighbourIndex(Protocol):
    """The nearest normal images of each query, by global vector."""

    def search(self, queries: np.ndarray, k: int, exclude: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray]:
        """(distances, bank rows), both (B, k), ascending; -1/inf pad; ``exclude`` (B,) rows to leave out."""
        ...

    def neighbour_names(self, rows: np.ndarray) -> list[list[str]]:
        """What names the bank images of ``rows`` (B, k) to a person, per query (missing rows left out)."""
        ...


class GalleryMatcher(Protocol):
    """Per-pixel nearest-match distances of each query against its gallery of bank images."""

    def gallery_distances(self, query_levels: Sequence[np.ndarray], galleries: np.ndarray,
                          match: MatchSettings) -> list[list[torch.Tensor]]:
        """For query b: per level, (H, W, kappa) ascending distances to the bank rows ``galleries[b]``.

        ``query_levels[l]`` is the batch's (B, C, H, W) level in ``match.aggregate``'s feature space.
        """
        ...


@dataclass
class Matches:
    """What matching a batch gives: kNN image scores, fused maps at the network's input size, neighbour rows."""

    knn_scores: np.ndarray
    maps: list[np.ndarray]
    rows: np.ndarray


@dataclass
class Prediction:
    """Scores of a batch of images, and the decision when thresholds are known.

    ``maps[i]`` is the anomaly map in the image's output frame (its own size for the ``full``
    protocol, the 224 crop for ``paper``); ``neighbours[i]`` names the ``image_k`` nearest normal
    images; ``knn_scores`` are the retrieval part of the image scores (equal to them under image
    scoring ``knn``); ``is_anomalous`` is the decision at the thresholds and ``masks[i]`` the
    pixels of ``maps[i]`` above the pixel threshold (bool, the map's shape); both None without
    thresholds.  They come from the one :class:`~spade_ray.method.decision.Thresholds` rule, so a
    notebook sees the decision the score job writes.
    """

    image_scores: np.ndarray
    maps: list[np.ndarray]
    neighbours: list[list[str]]
    knn_scores: np.ndarray | None = None
    thresholds: Thresholds | None = None

    @cached_property
    def pixel_max(self) -> np.ndarray:
        return np.array([float(m.max()) for m in self.maps], dtype=np.float32)

    @cached_property
    def is_anomalous(self) -> np.ndarray | None:
        if self.thresholds is None:
            return None
        return np.asarray(self.thresholds.is_anomalous(self.image_scores, self.pixel_max), dtype=bool).reshape(-1)

    @cached_property
    def masks(self) -> list[np.ndarray] | None:
        """Made on first use: the score job writes its masks from the maps and never asks for these."""
        return None if self.thresholds is None else [self.thresholds.mask(amap) for amap in self.maps]

    @staticmethod
    def concat(parts: Sequence[Prediction]) -> Prediction:
        """The parts as one prediction (parts of one model's predict share its thresholds)."""
        return Prediction(
            np.concatenate([p.image_scores for p in parts]).astype(np.float32) if parts else np.zeros(0, np.float32),
            [m for p in parts for m in p.maps],
            [n for p in parts for n in p.neighbours],
            np.concatenate([p.knn_scores for p in parts]).astype(np.float32) if parts else np.zeros(0, np.float32),
            parts[0].thresholds if parts else None,
        )


@dataclass
class Scorer:
    """SPADE's scoring of query features against a normal bank reached through ``index`` and ``gallery``.

    ``scales`` are the bank's normal score scales (needed by image scoring ``knn+map``);
    ``thresholds`` (when known) add the decision to every prediction; ``ignore`` (the bank's ignore
    region) zeroes the maps there, right after fusion and again in each output frame, so the image
    score, the calibration's maxima, masks, heatmaps and overlays all see zeros there.
    """

    config: SpadeConfig
    index: NeighbourIndex
    gallery: GalleryMatcher
    scales: tuple[float, float] | None = None
    thresholds: Thresholds | None = None
    timer: StageTimer = field(default_factory=StageTimer)
    ignore: IgnoreRegion | None = None

    @property
    def geometry(self) -> Preprocessor:
        """The input geometry of this scorer's settings (what the ignore region goes through)."""
        return Preprocessor(self.config.image_size, self.config.protocol)  # type: ignore[arg-type]

    def match(self, query: FeatureBatch, exclude: np.ndarray | None = None, aggregated: bool = False,
              sizes: Sequence[tuple[int, int]] | None = None, regions: Sequence[np.ndarray] | None = None) -> Matches:
        """Retrieval, correspondence and fusion for a batch of query features.

        ``aggregated``: the query pyramids are already in the configured feature space (bank images
        scored leave-one-out, as the bank holds them); otherwise they are raw and aggregated here.
        ``exclude`` (B,) bank rows to leave out of each query's neighbours.  ``sizes``: the images'
        (height, width), which place the ignore region (None: they have the mask's frame, as the
        bank's images do in calibration); ``regions``: the ignore region of each query in the input
        frame, given outright (a tile's part of its frame's region, :meth:`IgnoreRegion.at_tile`).
        """
        cfg = self.config
        with self.timer.stage("retrieval"):
            distances, rows = self.index.search(query.global_, max(cfg.image_k, cfg.pixel_k), exclude)
            knn = knn_score(distances, cfg.image_k)
        levels = query.levels
        if not aggregated:
            with self.timer.stage("aggregate"):
                levels = aggregate_levels(levels, cfg.aggregate)
        with self.timer.stage("correspondence"):
            per_query = self.gallery.gallery_distances(levels, rows[:, : cfg.pixel_k], cfg.match)
        with self.timer.stage("fusion"):
            maps = [fuse_levels([d.mean(dim=-1) for d in level_distances], cfg.image_size, cfg.sigma)
                    for level_distances in per_query]
            if self.ignore is not None:
                if regions is None:
                    frames = sizes if sizes is not None else [(None, None)] * len(maps)
                    regions = [self.ignore.at_input(self.geometry, *size) for size in frames]
                maps = [IgnoreRegion.apply(amap, region) for amap, region in zip(maps, regions, strict=True)]
        return Matches(knn, maps, rows)

    def score(self, query: FeatureBatch, sizes: Sequence[tuple[int, int]], preprocessor: Preprocessor) -> Prediction:
        """Image scores, maps in each image's output frame, nearest normals and (with thresholds) the decision and masks.

        ``sizes`` are the images' own (height, width); the image score combines the kNN score with
        the map maximum at the network's input size, as the calibration that scaled it did.
        """
        matched = self.match(query, sizes=sizes)
        with self.timer.stage("fusion"):
            scores = combine_image_scores(matched.knn_scores, np.array([m.max() for m in matched.maps]),
                                          self.config.image_scoring, self.scales)
            maps = [preprocessor.map_to_output(amap, height, width) for amap, (height, width) in zip(matched.maps, sizes)]
            if self.ignore is not None:  # bilinear resizing blurs the zeros' edge: zero the output frame too
                maps = [IgnoreRegion.apply(amap, self.ignore.at_output(preprocessor, height, width))
                        for amap, (height, width) in zip(maps, sizes)]
        neighbours = self.index.neighbour_names(matched.rows[:, : self.config.image_k])
        return Prediction(np.asarray(scores, dtype=np.float32), maps, neighbours,
                          np.asarray(matched.knn_scores, dtype=np.float32), self.thresholds)
