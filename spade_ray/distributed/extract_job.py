"""The extract job: images -> Parquet feature shards, one file per batch; a rerun resumes."""

from __future__ import annotations

import time
from typing import Any

import pyarrow as pa

from spade_ray.distributed.decode_stage import DecodeImages
from spade_ray.distributed.devices import gpus_per_actor as resolve_gpus
from spade_ray.distributed.extract_stage import ExtractFeatures
from spade_ray.distributed.input_blocks import InputBlocks
from spade_ray.distributed.pipeline import JobSummary, new_run_id, run_pipeline
from spade_ray.distributed.runtime import init_ray
from spade_ray.method.backbones import BACKBONES
from spade_ray.method.preprocess import Preprocessor
from spade_ray.method.tiling import NO_TILING, Tiling, frame_key
from spade_ray.progress import Progress, no_progress
from spade_ray.storage.images import DEFAULT_MAX_PIXELS
from spade_ray.storage.parquet import read_columns
from spade_ray.storage.sources import resolve_inputs

__all__ = ["run_extract"]


def run_extract(source: str, output: str, *, backbone: str = "lite0", weights: str | None = None, image_size: int = 224,
                protocol: str = "full", batch_size: int = 16, max_actors: int | None = None,
                max_pixels: int = DEFAULT_MAX_PIXELS, storage_options: dict[str, Any] | None = None,
                address: str | None = None, progress: Progress = no_progress,
                gpus_per_actor: float | None = None, tiling: Tiling = NO_TILING) -> JobSummary:
    """Images under ``source`` -> Parquet feature shards under ``output`` (one file per batch).

    Images that already have a row in ``output`` are skipped, so an interrupted extract resumes.
    Images above ``max_pixels`` are error rows (refused from the header, never decoded).
    ``gpus_per_actor``: each extractor's share of a GPU (None: 1 when the cluster has GPUs, else 0).
    ``tiling``: cut each frame into tiles, one feature row per tile (``frame#tileN``); needs protocol full.
    """
    start = time.perf_counter()
    items = resolve_inputs(source, storage_options)
    done_rows = read_columns(output, pa.schema([("image_id", pa.string()), ("status", pa.string())]), storage_options)
    row_frame = frame_key if tiling.enabled else str  # a tiled frame is done when its rows (all in one file) are there
    done = {row_frame(i): s for i, s in zip(done_rows.column("image_id").to_pylist(), done_rows.column("status").to_pylist())}
    todo = [it for it in items if it.image_id not in done]
    summary = JobSummary("extract", started=start, skipped=len(items) - len(todo), output=output,
                         skipped_error=sum(1 for it in items if done.get(it.image_id, "ok") != "ok"))
    if tiling.enabled and protocol != "full":
        raise ValueError("tiling scores frames at their own size: it needs --protocol full")
    if todo:
        init_ray(address)
        spec = BACKBONES[backbone]
        pre = Preprocessor(image_size, protocol, spec.mean, spec.std)  # type: ignore[arg-type]
        inputs = InputBlocks.of(todo)
        run_pipeline(inputs, DecodeImages(pre, storage_options, max_pixels, whole_frames=tiling.enabled), ExtractFeatures,
                      {"backbone": backbone, "weights": weights, "preprocessor": pre, "output": output,
                       "run_id": new_run_id(), "storage_options": storage_options, "tiling": tiling, "chunk": batch_size,
                       "max_pixels": max_pixels},
                      batch_size, max_actors, summary, progress, "extract", gpus_per_actor=resolve_gpus(gpus_per_actor))
    summary.seconds = time.perf_counter() - start
    return summary
