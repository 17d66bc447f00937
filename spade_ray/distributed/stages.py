"""The per-batch work of the Ray Data pipelines: decode, extract features, score.

Each stage takes and returns a batch as a dict of numpy arrays.  A bad image never fails a batch:
it becomes a row with ``status="error"`` and a reason naming the input, and is carried through
to the job's results, so every input ends with exactly one row.

A failure of the *infrastructure* is different: a shard actor that died for good, a lost object,
a worker that was killed.  Those are not facts about the image, so they are never written down
as its result (a rerun skips images with a row and would never retry it); they fail the batch's
task, Ray retries it on a restarted actor, and if that fails too the job stops and its rerun
scores the batch.
"""

from __future__ import annotations

import hashlib
import io
import time
import uuid
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import ray

from spade_ray.method.backbones import load_backbone
from spade_ray.bank.store import check_compatible
from spade_ray.storage.featurestore import FeatureMeta, features_to_table, write_feature_shard
from spade_ray.method.features import features_from_tensor
from spade_ray.method.image_scoring import combine_image_scores
from spade_ray.storage.images import DEFAULT_MAX_PIXELS, load_image
from spade_ray.model import SpadeConfig
from spade_ray.storage.outputs import heatmap_rgb, join_url, output_stem, write_bytes, write_jpeg, write_npy, write_png
from spade_ray.storage.overlay import overlay_rgb
from spade_ray.method.preprocess import Preprocessor
from spade_ray.distributed.runtime import set_worker_threads
from spade_ray.distributed.serving import BankClient, ServedBank

__all__ = ["DecodeImages", "ExtractFeatures", "RESULT_SCHEMA", "ScoreImages", "batch_name"]

Batch = dict[str, np.ndarray]


def batch_name(run_id: str, image_ids: np.ndarray | list[str]) -> str:
    """A file name for one batch's output: unique per run and per batch content."""
    digest = hashlib.sha256("\n".join(map(str, image_ids)).encode()).hexdigest()[:12]
    return f"part-{run_id}-{digest}.parquet"


def _reason(exc: BaseException) -> str:
    text = str(exc).splitlines()[0] if str(exc) else ""
    return f"{type(exc).__name__}: {text}" if text else type(exc).__name__


class DecodeImages:
    """Read + decode + resize to the network input, in Ray Data read tasks (no model needed)."""

    def __init__(self, preprocessor: Preprocessor, storage_options: dict[str, Any] | None = None,
                 max_pixels: int = DEFAULT_MAX_PIXELS) -> None:
        self.preprocessor = preprocessor
        self.storage_options = storage_options
        self.max_pixels = max_pixels

    def __call__(self, batch: Batch) -> Batch:
        n = len(batch["uri"])
        size = self.preprocessor.image_size
        pixels = np.zeros((n, size, size, 3), dtype=np.uint8)
        heights = np.zeros(n, dtype=np.int32)
        widths = np.zeros(n, dtype=np.int32)
        status = np.full(n, "ok", dtype=object)
        error = np.full(n, "", dtype=object)
        for i, uri in enumerate(batch["uri"]):
            try:
                image = load_image(str(uri), self.storage_options, max_pixels=self.max_pixels)
                heights[i], widths[i] = image.shape[:2]
                pixels[i] = self.preprocessor.resize_rgb(image)
            except Exception as exc:  # one bad image never kills the batch
                status[i], error[i] = "error", _reason(exc)
        return {**batch, "pixels": pixels, "height": heights, "width": widths, "status": status, "error": error}


class ExtractFeatures:
    """Actor-pool UDF: backbone once per actor; writes one Parquet feature shard per batch."""

    def __init__(self, backbone: str, weights: str | None, preprocessor: Preprocessor, output: str,
                 run_id: str, storage_options: dict[str, Any] | None = None) -> None:
        set_worker_threads()
        self.backbone = load_backbone(backbone, weights)
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
        url = join_url(self.output, batch_name(self.run_id, ids))
        write_feature_shard(url, table, self.storage_options)
        return {"image_id": batch["image_id"], "status": batch["status"], "error": batch["error"]}


def _meta_without_features(backbone: Any, preprocessor: Preprocessor) -> FeatureMeta:
    """The shard metadata when a whole batch failed to decode: shapes from a dummy forward pass."""
    import torch

    features = features_from_tensor(backbone, torch.zeros(1, 3, preprocessor.image_size, preprocessor.image_size))
    return FeatureMeta(backbone.name, backbone.weights_sha256, preprocessor.image_size, preprocessor.protocol,
                       [tuple(level.shape[1:]) for level in features.levels], int(features.global_.shape[1]))


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
    """Actor-pool UDF: backbone + map fusion; queries the shard actors; writes masks, heatmaps, overlays, result rows.

    The overlay needs the image at its own size, which the decode stage does not ship (it sends
    only the network-size pixels), so the scorer reads the image again: one more GET per image,
    small next to the scoring itself, and the object store never carries full-size frames.
    Result rows are committed per batch (one Parquet file, written whole), so a crash loses only
    the batches in flight.
    """

    def __init__(self, bank: ServedBank, config: SpadeConfig, weights: str | None, output: str, run_id: str,
                 pixel_threshold: float, image_threshold: float, storage_options: dict[str, Any] | None = None,
                 save_maps: bool = False, max_pixels: int = DEFAULT_MAX_PIXELS,
                 scales: tuple[float, float] | None = None) -> None:
        set_worker_threads()
        self.max_pixels = max_pixels
        self.save_maps = save_maps
        self.backbone = load_backbone(config.backbone, weights)
        check_compatible(bank.manifest, config.backbone, self.backbone.weights_sha256, config.image_size, config.protocol)
        spec = self.backbone.spec
        self.preprocessor = Preprocessor(config.image_size, config.protocol, spec.mean, spec.std)  # type: ignore[arg-type]
        self.client = BankClient(bank, config)
        self.config = config
        self.bank_id = bank.bank_id
        self.output = output
        self.run_id = run_id
        self.pixel_threshold = pixel_threshold
        self.image_threshold = image_threshold
        self.scales = scales
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
                    rows[i].update(status="error", error=_reason(exc), image_score=None, knn_score=None, pixel_max=None,
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
        knn, maps, neighbour_rows = self.client.score(query)
        scores = combine_image_scores(knn, np.array([m.max() for m in maps]), self.config.image_scoring, self.scales)
        neighbours = self.client.neighbour_ids(neighbour_rows[:, : self.config.image_k])
        for j, i in enumerate(ok):
            amap = self.preprocessor.map_to_output(maps[j], int(batch["height"][i]), int(batch["width"][i]))
            pixel_max = float(amap.max())
            stem = str(batch["key"][i]) if "key" in batch else output_stem(str(batch["relpath"][i]))
            mask_uri = join_url(self.output, f"masks/{stem}.png")
            heatmap_uri = join_url(self.output, f"heatmaps/{stem}.png")
            overlay_uri = join_url(self.output, f"overlays/{stem}.jpg")
            mask = amap > self.pixel_threshold
            vmax = 2.0 * self.pixel_threshold
            write_png(mask_uri, (mask * 255).astype(np.uint8), self.storage_options)
            write_png(heatmap_uri, heatmap_rgb(amap, vmax=vmax), self.storage_options)
            image = self.preprocessor.image_to_output(
                load_image(str(batch["uri"][i]), self.storage_options, max_pixels=self.max_pixels))
            write_jpeg(overlay_uri, overlay_rgb(image, amap, vmax, mask), self.storage_options)
            if self.save_maps:
                write_npy(join_url(self.output, f"maps/{stem}.npy"), amap, self.storage_options)
            rows[i].update(
                image_score=float(scores[j]), knn_score=float(knn[j]), pixel_max=pixel_max,
                is_anomalous=bool(scores[j] > self.image_threshold or pixel_max > self.pixel_threshold),
                mask_uri=mask_uri, heatmap_uri=heatmap_uri, overlay_uri=overlay_uri, neighbours=[uri for _, uri in neighbours[j]],
            )


def new_run_id() -> str:
    return time.strftime("%Y%m%dT%H%M%S") + "-" + uuid.uuid4().hex[:6]
