"""The extract job's actor-pool stage: backbone once per actor, one Parquet feature shard per batch.

With tiling a frame becomes one feature row per tile (``frame#tileN``, :func:`~spade_ray.method.tiling.tile_key`),
cut and extracted exactly as the in-process model does (:func:`~spade_ray.method.tiled_scoring.cut_frame`,
:func:`~spade_ray.method.tiled_scoring.extract_tiles`).  A frame's tiles always go into one shard
file, so a rerun that finds any of a frame's rows finds all of them; a batch of large frames is
written as several shards of whole frames, about ``SHARD_TILES`` tiles each, so an actor never
holds more than that many tiles' features.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import numpy as np

from spade_ray.distributed.decode_stage import Batch, batch_retries, decoded_file
from spade_ray.distributed.devices import actor_device
from spade_ray.distributed.runtime import set_worker_threads
from spade_ray.method.backbones import load_backbone
from spade_ray.method.features import FeatureBatch, features_from_tensor
from spade_ray.method.preprocess import Preprocessor
from spade_ray.method.tiled_scoring import cut_frame, extract_tiles
from spade_ray.method.tiling import NO_TILING, Tiling, tile_key
from spade_ray.storage.featurestore import FeatureMeta, features_to_table, write_feature_shard
from spade_ray.storage.images import DEFAULT_MAX_PIXELS
from spade_ray.storage.results import batch_name
from spade_ray.storage.retry import OutputWriteError, retries_so_far
from spade_ray.storage.urls import join

__all__ = ["SHARD_TILES", "ExtractFeatures"]

# Tiles per feature shard of a tiled extract (whole frames, so a shard may hold more): at lite0's
# 224 px pyramid in float16 a tile is about a quarter of a megabyte.
SHARD_TILES = 512


class ExtractFeatures:
    """Actor-pool UDF: backbone once per actor, on its GPU when Ray gave it one; one Parquet feature shard per batch."""

    def __init__(self, backbone: str, weights: str | None, preprocessor: Preprocessor, output: str,
                 run_id: str, storage_options: dict[str, Any] | None = None, threads: int | None = None,
                 tiling: Tiling = NO_TILING, chunk: int = 16, max_pixels: int = DEFAULT_MAX_PIXELS) -> None:
        set_worker_threads(threads=threads)
        self.tiling = tiling
        self.chunk = chunk
        self.max_pixels = max_pixels
        self.device = actor_device("extractor")
        self.backbone = load_backbone(backbone, weights, self.device)
        self.preprocessor = preprocessor
        self.output = output
        self.run_id = run_id
        self.storage_options = storage_options
        self.meta: FeatureMeta | None = None

    def __call__(self, batch: Batch) -> Batch:
        retries_before = retries_so_far()
        ids = [str(x) for x in batch["image_id"]]
        if self.tiling.enabled:
            for part in self._tiled_parts(batch):
                self._write(*part)
        else:
            ok = batch["status"] == "ok"
            features = self._forward(batch["pixels"][ok]) if ok.any() else None
            rows = _Rows()
            for i in range(len(ids)):
                rows.add(batch, i)
            self._write(rows, features)
        retries = batch["storage_retries"].copy() if "storage_retries" in batch else batch_retries(len(ids), 0)
        retries[:1] += retries_so_far() - retries_before
        return {"image_id": batch["image_id"], "status": batch["status"], "error": batch["error"],
                "device": np.full(len(ids), self.device, dtype=object), "storage_retries": retries}

    def _forward(self, pixels: np.ndarray) -> FeatureBatch:
        """float16 features of (n, S, S, 3) uint8 network-size pixels; the first ones also set the shard metadata."""
        features = features_from_tensor(self.backbone, self.preprocessor.normalize(pixels), np.float16)
        if self.meta is None:
            self.meta = _meta(self.backbone, self.preprocessor, self.tiling, features)
        return features

    def _tiled_parts(self, batch: Batch) -> Iterator[tuple[_Rows, FeatureBatch | None]]:
        """(rows, features) of whole frames, about SHARD_TILES tiles at a time: a row per tile, one per bad frame."""
        rows, parts, tiles = _Rows(), [], 0
        for i, status in enumerate(batch["status"]):
            if status != "ok":
                rows.add(batch, i)
                continue
            frame = cut_frame(decoded_file(batch, i, self.max_pixels), self.tiling, self.preprocessor)
            parts.append(extract_tiles(frame, self._forward, self.chunk))
            for t in range(len(frame.boxes)):
                rows.add(batch, i, tile_key(str(batch["image_id"][i]), t))
            tiles += len(frame.boxes)
            if tiles >= SHARD_TILES:
                yield rows, FeatureBatch.concat(parts)
                rows, parts, tiles = _Rows(), [], 0
        if rows.ids:
            yield rows, FeatureBatch.concat(parts) if parts else None

    def _write(self, rows: _Rows, features: FeatureBatch | None) -> None:
        """One feature shard of these rows (``features``: of their ok rows, in order)."""
        meta = self.meta or _meta_without_features(self.backbone, self.preprocessor, self.tiling)
        table = features_to_table(rows.ids, rows.uris, rows.heights, rows.widths, features, meta, statuses=rows.statuses,
                                  errors=rows.errors, relpaths=rows.relpaths)
        url = join(self.output, batch_name(self.run_id, rows.ids))
        try:
            write_feature_shard(url, table, self.storage_options)
        except Exception as exc:  # the output's problem (full, denied, store gone), not the images'
            raise OutputWriteError.of(self.output, exc) from exc


class _Rows:
    """The columns of a feature shard's rows, one :meth:`add` per row."""

    def __init__(self) -> None:
        self.ids: list[str] = []
        self.uris: list[str] = []
        self.relpaths: list[str] = []
        self.heights: list[int | None] = []
        self.widths: list[int | None] = []
        self.statuses: list[str] = []
        self.errors: list[str | None] = []

    def add(self, batch: Batch, i: int, row_id: str | None = None) -> None:
        """Row ``i`` of a decoded batch (under ``row_id``, a tile's key, when given)."""
        ok = batch["status"][i] == "ok"
        self.ids.append(row_id or str(batch["image_id"][i]))
        self.uris.append(str(batch["uri"][i]))
        self.relpaths.append(str(batch["relpath"][i]))
        self.heights.append(int(batch["height"][i]) if ok else None)
        self.widths.append(int(batch["width"][i]) if ok else None)
        self.statuses.append(str(batch["status"][i]))
        self.errors.append(str(batch["error"][i]) or None)


def _meta(backbone: Any, preprocessor: Preprocessor, tiling: Tiling, features: FeatureBatch) -> FeatureMeta:
    """The shard metadata of features this extractor made."""
    return FeatureMeta(backbone.name, backbone.weights_sha256, preprocessor.image_size, preprocessor.protocol,
                       [tuple(level.shape[1:]) for level in features.levels], int(features.global_.shape[1]),
                       **tiling.settings())


def _meta_without_features(backbone: Any, preprocessor: Preprocessor, tiling: Tiling) -> FeatureMeta:
    """The shard metadata when a whole batch failed to decode: shapes from a dummy forward pass."""
    import torch

    zeros = torch.zeros(1, 3, preprocessor.image_size, preprocessor.image_size)
    return _meta(backbone, preprocessor, tiling, features_from_tensor(backbone, zeros))
