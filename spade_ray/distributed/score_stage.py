"""The score job's actor-pool stage: features, SPADE scores against the served bank, encoded artifacts.

It writes nothing itself: each image leaves as its result row plus the encoded files it gets
(mask, and as chosen heatmap, overlay, raw map), and the write stage
(:mod:`spade_ray.distributed.write_stage`) stores them concurrently and commits the rows.  So the
scorer's CPU goes straight on to the next batch while the previous one's files are in flight.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np
import ray

from spade_ray.bank.store import check_compatible
from spade_ray.distributed.decode_stage import Batch, decoded_file
from spade_ray.distributed.devices import actor_device
from spade_ray.distributed.remote_bank import RemoteBank
from spade_ray.distributed.runtime import set_worker_threads
from spade_ray.distributed.shard_actors import ServedBank
from spade_ray.errors import error_reason
from spade_ray.method.backbones import load_backbone
from spade_ray.method.config import SpadeConfig
from spade_ray.method.decision import Thresholds
from spade_ray.method.features import FeatureBatch, features_from_tensor
from spade_ray.method.ignore import IgnoreRegion
from spade_ray.method.preprocess import Preprocessor
from spade_ray.method.scorer import Prediction, Scorer
from spade_ray.method.tiled_scoring import cut_frame, score_frames
from spade_ray.storage.artifacts import ArtifactChoice, Artifacts
from spade_ray.storage.images import DEFAULT_MAX_PIXELS

__all__ = ["ScoreImages", "ScoreTarget"]

_EMPTY_SCORES = {"image_score": None, "knn_score": None, "pixel_max": None, "is_anomalous": None, "mask_uri": None,
                 "heatmap_uri": None, "overlay_uri": None, "neighbours": None}


def _lists(values: list[list[Any]]) -> np.ndarray:
    """A column whose cells are lists (of URLs or of file bytes), as Ray Data carries it between stages."""
    column = np.empty(len(values), dtype=object)
    column[:] = values
    return column


@dataclass(frozen=True)
class ScoreTarget:
    """One bank the scorer actors score against in a pipeline, with the decision its images get.

    A routed run serves several banks in one pipeline (a wave); each row carries its target's
    ``key`` (the ``target`` column), and the scorer holds one :class:`Scorer` per target.
    """

    key: str
    bank: ServedBank
    config: SpadeConfig
    thresholds: Thresholds
    scales: tuple[float, float] | None = None
    ignore: IgnoreRegion | None = None


class _Served:
    """A target inside a scorer actor: the scorer over its shard actors, and the artifacts at its thresholds."""

    def __init__(self, target: ScoreTarget, output: str, artifacts: ArtifactChoice) -> None:
        remote = RemoteBank(target.bank, target.config.aggregate)
        self.scorer = Scorer(target.config, remote, remote, target.scales, target.thresholds, ignore=target.ignore)
        self.artifacts = Artifacts(output, target.thresholds, artifacts)
        self.bank_id = target.bank.bank_id


class ScoreImages:
    """Actor-pool UDF: the backbone and a :class:`~spade_ray.method.scorer.Scorer` over the shard actors
    of each target bank (one for ``score --bank``; those of a wave for ``score --routes``).

    The backbone runs on the actor's GPU when Ray gave it one (:func:`actor_device`); the
    correspondence runs where the bank is, in the shard actors, and fusion and encoding on the CPU.
    The targets of one pipeline share a backbone, input geometry and tiling (the routed run groups
    banks so), so a batch mixing banks is decoded and extracted once and scored per bank.  A tiled
    bank's frames come whole (the decode stage's ``encoded`` file) and are cut and scored one at a
    time, ``chunk`` tiles through the network at once, exactly as the in-process model scores them.

    Returns, per image, its result row as JSON (``row``: exact floats, and one column type however
    many fields are null) and its encoded artifacts (``file_urls``, ``file_bytes``).

    A failure of the *infrastructure* (a shard actor that died for good, a lost object, a killed
    worker) is not a fact about the image, so it is never written down as its result (a rerun
    skips images with a row and would never retry it); it fails the batch's task, Ray retries it
    on a restarted actor, and if that fails too the job stops and its rerun scores the batch.
    """

    def __init__(self, targets: list[ScoreTarget], weights: str | None, output: str,
                 artifacts: ArtifactChoice | None = None, max_pixels: int = DEFAULT_MAX_PIXELS,
                 threads: int | None = None, chunk: int = 16) -> None:
        set_worker_threads(threads=threads)
        self.max_pixels = max_pixels
        self.chunk = chunk
        self.device = actor_device("scorer")
        config = targets[0].config
        self.backbone = load_backbone(config.backbone, weights, self.device)
        for target in targets:
            check_compatible(target.bank.manifest, config.backbone, self.backbone.weights_sha256, config.image_size,
                             config.protocol)
        spec = self.backbone.spec
        self.preprocessor = Preprocessor(config.image_size, config.protocol, spec.mean, spec.std)  # type: ignore[arg-type]
        self.tiling = config.tiling
        self.targets = {t.key: _Served(t, output, artifacts or ArtifactChoice()) for t in targets}

    def __call__(self, batch: Batch) -> Batch:
        start = time.perf_counter()
        n = len(batch["uri"])
        keys = [str(k) for k in batch["target"]]
        ok = np.flatnonzero(batch["status"] == "ok")
        rows: list[dict[str, Any]] = [
            {"uri": str(batch["uri"][i]), "relpath": str(batch["relpath"][i]), "image_id": str(batch["image_id"][i]),
             "bank_id": self.targets[keys[i]].bank_id, "status": str(batch["status"][i]),
             "error": str(batch["error"][i]) or None, **_EMPTY_SCORES}
            for i in range(n)
        ]
        files: list[dict[str, bytes]] = [{} for _ in range(n)]
        if ok.size:
            try:
                self._score(batch, ok, keys, rows, files)
            except ray.exceptions.RayError:
                raise  # infrastructure, not the images: let Ray retry the batch (see the class docstring)
            except Exception as exc:  # a failure of the batch is recorded on each of its images
                for i in ok:
                    rows[i].update(status="error", error=error_reason(exc), **_EMPTY_SCORES)
                    files[i] = {}
        seconds = (time.perf_counter() - start) / max(n, 1)
        for row in rows:
            row["seconds"] = seconds
        return {"image_id": batch["image_id"], "row": np.array([json.dumps(r) for r in rows], dtype=object),
                "file_urls": _lists([list(f) for f in files]), "file_bytes": _lists([list(f.values()) for f in files]),
                "device": np.full(n, self.device, dtype=object),
                **({"storage_retries": batch["storage_retries"]} if "storage_retries" in batch else {})}

    def _score(self, batch: Batch, ok: np.ndarray, keys: list[str], rows: list[dict[str, Any]],
               files: list[dict[str, bytes]]) -> None:
        if self.tiling.enabled:  # frame by frame, cut into tiles as the in-process model cuts them
            for i in ok:
                target, image = self.targets[keys[i]], decoded_file(batch, i, self.max_pixels)
                frame = cut_frame(image, self.tiling, self.preprocessor)
                self._record(target, batch, np.array([i]), score_frames(target.scorer, [frame], self._forward, self.chunk),
                             rows, files, lambda _, image=image: self.preprocessor.image_to_output(image))
            return
        query = self._forward(batch["pixels"][ok])
        sizes = [(int(batch["height"][i]), int(batch["width"][i])) for i in ok]
        for key in sorted({keys[i] for i in ok}):
            part = np.flatnonzero([keys[i] == key for i in ok])
            features = query.select(part) if len(part) < len(ok) else query
            prediction = self.targets[key].scorer.score(features, [sizes[j] for j in part], self.preprocessor)
            self._record(self.targets[key], batch, ok[part], prediction, rows, files,
                         lambda i: self.preprocessor.image_to_output(decoded_file(batch, i, self.max_pixels)))

    def _forward(self, pixels: np.ndarray) -> FeatureBatch:
        return features_from_tensor(self.backbone, self.preprocessor.normalize(pixels))

    def _record(self, target: _Served, batch: Batch, ok: np.ndarray, prediction: Prediction,
                rows: list[dict[str, Any]], files: list[dict[str, bytes]], overlay_image: Callable[[int], np.ndarray]) -> None:
        """The rows and encoded artifacts of the images ``ok`` of the batch, scored against ``target``;
        ``overlay_image(i)``: image ``i`` in its map's output frame, asked for only when an overlay is drawn."""
        for j, i in enumerate(ok):
            rows[i].update(self._row(prediction, j))
            uris, files[i] = target.artifacts.encode(str(batch["key"][i]), prediction.maps[j],
                                                     lambda i=i: overlay_image(i), bool(rows[i]["is_anomalous"]))
            rows[i].update(uris)

    @staticmethod
    def _row(prediction: Prediction, j: int) -> dict[str, Any]:
        assert prediction.is_anomalous is not None  # the scorer has thresholds
        return {"image_score": float(prediction.image_scores[j]), "knn_score": float(prediction.knn_scores[j]),
                "pixel_max": float(prediction.pixel_max[j]), "is_anomalous": bool(prediction.is_anomalous[j]),
                "neighbours": prediction.neighbours[j]}

