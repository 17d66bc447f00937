"""The score job's last stage: store each batch's artifacts, then commit its result rows.

A small pool of I/O actors, so the writes of one batch overlap the scoring of the next.  Within a batch the
files are written concurrently (:func:`~spade_ray.storage.urls.write_many`), and the batch's
result file goes last, only after every artifact is stored: a row never points at a missing
object.  A write that fails raises, so Ray retries the task (the same keys, overwritten whole);
if it fails for good the job stops and its rerun scores the batch again.  The error names the
output (:class:`~spade_ray.storage.retry.OutputWriteError`): a full disk, a denied write or a
store that stayed away past the retry budget are the output's problem, not the images'.
"""

from __future__ import annotations

import json
from typing import Any

import numpy as np

from spade_ray.distributed.decode_stage import batch_retries
from spade_ray.storage.results import batch_name, write_results
from spade_ray.storage.retry import OutputWriteError, retries_so_far
from spade_ray.storage.urls import write_many

__all__ = ["WriteResults"]

Batch = dict[str, np.ndarray]


class WriteResults:
    """Store a batch's files, then its rows as one result file; returns the statuses (and the scorer's
    device) the driver counts."""

    def __init__(self, output: str, run_id: str, storage_options: dict[str, Any] | None = None) -> None:
        self.output = output
        self.run_id = run_id
        self.storage_options = storage_options

    def __call__(self, batch: Batch) -> Batch:
        rows = [json.loads(row) for row in batch["row"]]
        retries_before = retries_so_far()
        try:
            write_many({str(url): bytes(data) for urls, datas in zip(batch["file_urls"], batch["file_bytes"])
                        for url, data in zip(urls, datas)}, self.storage_options)
            write_results(self.output, rows, batch_name(self.run_id, [r["image_id"] for r in rows]), self.storage_options)
        except Exception as exc:
            raise OutputWriteError.of(self.output, exc) from exc
        retries = batch["storage_retries"].copy() if "storage_retries" in batch else batch_retries(len(rows), 0)
        retries[:1] += retries_so_far() - retries_before
        out = {"image_id": batch["image_id"], "status": np.array([r["status"] for r in rows], dtype=object),
               "error": np.array([r["error"] or "" for r in rows], dtype=object), "storage_retries": retries}
        if "device" in batch:
            out["device"] = batch["device"]
        return out
