"""The score job's actor-pool stage: features, SPADE scores against the served bank, artifacts, result rows."""

from __future__ import annotations

import io
import time
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import ray

from spade_ray.bank.store import check_compatible
from spade_ray.distributed.decode_stage import Batch, error_reason
from spade_ray.distributed.pipeline import batch_name
from spade_ray.distributed.remote_bank import RemoteBank
from spade_ray.distributed.runtime import set_worker_threads
from spade_ray.distributed.shard_actors import ServedBank
from spade_ray.method.backbones import load_backbone
from spade_ray.method.config import SpadeConfig
from spade_ray.method.decision import Thresholds
from spade_ray.method.features import features_from_tensor
from spade_ray.method.preprocess import Preprocessor
from spade_ray.method.scorer import Scorer
from spade_ray.storage.artifacts import ArtifactWriter
from spade_ray.storage.images import DEFAULT_MAX_PIXELS, load_image
from spade_ray.storage.outputs import join_url, output_stem, write_bytes

__all__ = ["RESULT_SCHEMA", "ScoreImages"]


RESULT_SCHEMA = pa.schema([
    ("uri", pa.string()),
    ("relpath", pa.string()),
    ("image_id", pa.string()),
    ("image_score", pa.float32()),
    ("knn_score", pa.float32()),
    ("pixel_max", pa.float32()),
    ("is_anomalous", pa.bool_()),
    ("mask_uri", pa.string()),
    ("heatmap_uri", pa.string()),
    ("overlay_uri", pa.string()),
    ("neighbours", pa.list_(pa.string())),
    ("bank_id", pa.string()),
    ("status", pa.string()),
    ("error", pa.string()),
    ("seconds", pa.float32()),
])


class ScoreImages:
    """Actor-pool UDF: the backbone and a :class:`~spade_ray.method.scorer.Scorer` over the shard actors;
    writes masks, heatmaps, overlays and result rows.

    The overlay needs the image at its own size, which the decode stage does not ship (it sends
    only the network-size pixels), so the scorer reads the image again: one more GET per image,
    small next to the scoring itself, and the object store never carries full-size frames.
    Result rows are committed per batch (one Parquet file, written whole), so a crash loses only
    the batches in flight.

    A failure of the *infrastructure* (a shard actor that died for good, a lost object, a killed
    worker) is not a fact about the image, so it is never written down as its result (a rerun
    skips images with a row and would never retry it); it fails the batch's task, Ray retries it
    on a restarted actor, and if that fails too the job stops and its rerun scores the batch.
    """

    def __init__(self, bank: ServedBank, config: SpadeConfig, weights: str | None, output: str, run_id: str,
                 thresholds: Thresholds, storage_options: dict[str, Any] | None = None,
                 save_maps: bool = False, max_pixels: int = DEFAULT_MAX_PIXELS,
                 scales: tuple[float, float] | None = None) -> None:
        set_worker_threads()
        self.max_pixels = max_pixels
        self.backbone = load_backbone(config.backbone, weights)
        check_compatible(bank.manifest, config.backbone, self.backbone.weights_sha256, config.image_size, config.protocol)
        spec = self.backbone.spec
        self.preprocessor = Preprocessor(config.image_size, config.protocol, spec.mean, spec.std)  # type: ignore[arg-type]
        remote = RemoteBank(bank, config.aggregate)
        self.scorer = Scorer(config, remote, remote, scales, thresholds)
        self.writer = ArtifactWriter(output, thresholds, storage_options, save_maps)
        self.bank_id = bank.bank_id
        self.output = output
        self.run_id = run_id
        self.storage_options = storage_options

    def __call__(self, batch: Batch) -> Batch:
        start = time.perf_counter()
        n = len(batch["uri"])
        ok = np.flatnonzero(batch["status"] == "ok")
        rows: list[dict[str, Any]] = [
            {"uri": str(batch["uri"][i]), "relpath": str(batch["relpath"][i]), "image_id": str(batch["image_id"][i]),
             "bank_id": self.bank_id, "status": str(batch["status"][i]), "error": str(batch["error"][i]) or None,
             "image_score": None, "pixel_max": None, "is_anomalous": None, "mask_uri": None, "heatmap_uri": None,
             "overlay_uri": None, "neighbours": None}
            for i in range(n)
        ]
        if ok.size:
            try:
                self._score(batch, ok, rows)
            except ray.exceptions.RayError:
                raise  # infrastructure, not the images: let Ray retry the batch (see the module docstring)
            except Exception as exc:  # a failure of the batch is recorded on each of its images
                for i in ok:
                    rows[i].update(status="error", error=error_reason(exc), image_score=None, knn_score=None, pixel_max=None,
                                   is_anomalous=None, mask_uri=None, heatmap_uri=None, overlay_uri=None,
                                   neighbours=None)
        seconds = (time.perf_counter() - start) / max(n, 1)
        for row in rows:
            row["seconds"] = seconds
        table = pa.Table.from_pylist(rows, schema=RESULT_SCHEMA)
        buf = io.BytesIO()
        pq.write_table(table, buf)
        write_bytes(join_url(self.output, f"results/{batch_name(self.run_id, [r['image_id'] for r in rows])}"),
                    buf.getvalue(), self.storage_options)
        return {"image_id": batch["image_id"], "status": np.array([r["status"] for r in rows], dtype=object),
                "error": np.array([r["error"] or "" for r in rows], dtype=object)}

    def _score(self, batch: Batch, ok: np.ndarray, rows: list[dict[str, Any]]) -> None:
        query = features_from_tensor(self.backbone, self.preprocessor.normalize(batch["pixels"][ok]))
        sizes = [(int(batch["height"][i]), int(batch["width"][i])) for i in ok]
        prediction = self.scorer.score(query, sizes, self.preprocessor)
        assert prediction.is_anomalous is not None  # the scorer has thresholds
        for j, i in enumerate(ok):
            stem = str(batch["key"][i]) if "key" in batch else output_stem(str(batch["relpath"][i]))
            image = self.preprocessor.image_to_output(
                load_image(str(batch["uri"][i]), self.storage_options, max_pixels=self.max_pixels))
            uris = self.writer.write(stem, prediction.maps[j], image)
            rows[i].update(image_score=float(prediction.image_scores[j]), knn_score=float(prediction.knn_scores[j]),
                           pixel_max=float(prediction.pixel_max[j]), is_anomalous=bool(prediction.is_anomalous[j]),
                           neighbours=prediction.neighbours[j], **uris)
