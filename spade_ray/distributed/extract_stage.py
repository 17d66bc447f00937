"""The extract job's actor-pool stage: backbone once per actor, one Parquet feature shard per batch."""

from __future__ import annotations

from typing import Any

import numpy as np

from spade_ray.distributed.decode_stage import Batch, batch_retries
from spade_ray.distributed.devices import actor_device
from spade_ray.distributed.runtime import set_worker_threads
from spade_ray.method.backbones import load_backbone
from spade_ray.method.features import features_from_tensor
from spade_ray.method.preprocess import Preprocessor
from spade_ray.storage.featurestore import FeatureMeta, features_to_table, write_feature_shard
from spade_ray.storage.results import batch_name
from spade_ray.storage.retry import OutputWriteError, retries_so_far
from spade_ray.storage.urls import join

__all__ = ["ExtractFeatures"]


class ExtractFeatures:
    """Actor-pool UDF: backbone once per actor, on its GPU when Ray gave it one; one Parquet feature shard per batch."""

    def __init__(self, backbone: str, weights: str | None, preprocessor: Preprocessor, output: str,
                 run_id: str, storage_options: dict[str, Any] | None = None, threads: int | None = None) -> None:
        set_worker_threads(threads=threads)
        self.device = actor_device("extractor")
        self.backbone = load_backbone(backbone, weights, self.device)
        self.preprocessor = preprocessor
        self.output = output
        self.run_id = run_id
        self.storage_options = storage_options
        self.meta: FeatureMeta | None = None

    def __call__(self, batch: Batch) -> Batch:
        ok = batch["status"] == "ok"
        features = None
        if ok.any():
            features = features_from_tensor(self.backbone, self.preprocessor.normalize(batch["pixels"][ok]), np.float16)
            if self.meta is None:
                self.meta = FeatureMeta(
                    backbone=self.backbone.name,
                    weights_sha256=self.backbone.weights_sha256,
                    image_size=self.preprocessor.image_size,
                    protocol=self.preprocessor.protocol,
                    level_shapes=[tuple(level.shape[1:]) for level in features.levels],
                    global_dim=int(features.global_.shape[1]),
                )
        meta = self.meta or _meta_without_features(self.backbone, self.preprocessor)
        ids = [str(x) for x in batch["image_id"]]
        table = features_to_table(
            ids, [str(x) for x in batch["uri"]],
            [int(h) if s == "ok" else None for h, s in zip(batch["height"], batch["status"])],
            [int(w) if s == "ok" else None for w, s in zip(batch["width"], batch["status"])],
            features, meta, statuses=[str(s) for s in batch["status"]],
            errors=[str(e) or None for e in batch["error"]], relpaths=[str(r) for r in batch["relpath"]],
        )
        url = join(self.output, batch_name(self.run_id, ids))
        retries_before = retries_so_far()
        try:
            write_feature_shard(url, table, self.storage_options)
        except Exception as exc:  # the output's problem (full, denied, store gone), not the images'
            raise OutputWriteError.of(self.output, exc) from exc
        retries = batch["storage_retries"].copy() if "storage_retries" in batch else batch_retries(len(ids), 0)
        retries[:1] += retries_so_far() - retries_before
        return {"image_id": batch["image_id"], "status": batch["status"], "error": batch["error"],
                "device": np.full(len(ids), self.device, dtype=object), "storage_retries": retries}


def _meta_without_features(backbone: Any, preprocessor: Preprocessor) -> FeatureMeta:
    """The shard metadata when a whole batch failed to decode: shapes from a dummy forward pass."""
    import torch

    features = features_from_tensor(backbone, torch.zeros(1, 3, preprocessor.image_size, preprocessor.image_size))
    return FeatureMeta(backbone.name, backbone.weights_sha256, preprocessor.image_size, preprocessor.protocol,
                       [tuple(level.shape[1:]) for level in features.levels], int(features.global_.shape[1]))
