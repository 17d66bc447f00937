"""The result rows of ``spade-ray score``: ``OUT/results/*.parquet``, one file per scored batch.

One row per input image, ok or error (the columns are :data:`RESULT_SCHEMA`, listed in the
README).  Each batch's rows are one Parquet file written whole, so a crash loses only the
batches in flight and a reader never sees half a file; every run into the same output adds
files, and the rows of all of them together are what the output holds.
"""

from __future__ import annotations

import hashlib
import io
from collections.abc import Callable, Collection, Sequence
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from spade_ray.storage.parquet import list_parquet_files, read_columns
from spade_ray.storage.urls import join, read_bytes, resolve, write_bytes

__all__ = ["RESULTS", "RESULT_SCHEMA", "batch_name", "drop_error_rows", "drop_image_rows", "read_results", "remove_results",
           "write_results"]

RESULTS = "results"  # the folder under OUT

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


def batch_name(run_id: str, image_ids: np.ndarray | list[str]) -> str:
    """A file name for one batch's output: unique per run and per batch content."""
    digest = hashlib.sha256("\n".join(map(str, image_ids)).encode()).hexdigest()[:12]
    return f"part-{run_id}-{digest}.parquet"


def write_results(output: str, rows: list[dict[str, Any]], name: str,
                  storage_options: dict[str, Any] | None = None) -> None:
    """Write one batch's rows (dicts of :data:`RESULT_SCHEMA` columns) as ``OUT/results/<name>``, whole.

    One file per batch, written atomically: the rows of a batch appear together or not at all,
    so a rerun never sees an image half recorded.
    """
    buf = io.BytesIO()
    pq.write_table(pa.Table.from_pylist(rows, schema=RESULT_SCHEMA), buf)
    write_bytes(join(output, f"{RESULTS}/{name}"), buf.getvalue(), storage_options)


def read_results(output: str, columns: Sequence[str] | None = None,
                 storage_options: dict[str, Any] | None = None) -> pa.Table:
    """``columns`` (default: all) of every result row under ``OUT/results`` (all runs into it), as one table.

    Columnar, so a report over a million rows costs tens of MB on the driver, not Python dicts;
    only the asked columns are read, and one missing from older files (e.g. ``overlay_uri``)
    reads as nulls.  An output with no results gives an empty table.
    """
    names = RESULT_SCHEMA.names if columns is None else list(columns)
    schema = pa.schema([RESULT_SCHEMA.field(name) for name in names])
    return read_columns(join(output, RESULTS), schema, storage_options)


def remove_results(output: str, storage_options: dict[str, Any] | None = None) -> None:
    """Delete every result file under ``OUT/results`` (``--overwrite``: no row of an earlier run survives)."""
    fs, path, _ = resolve(join(output, RESULTS), storage_options)
    if fs.exists(path):
        for file in fs.find(path):
            if file.endswith(".parquet"):
                fs.rm_file(file)


def drop_error_rows(output: str, storage_options: dict[str, Any] | None = None) -> int:
    """Rewrite each result file that holds error rows without them; returns how many rows went.

    Done before scoring so the images are simply "not done" again: a crash at any point leaves
    every image with one row or none (the next run scores it), never two.  Each file is
    replaced whole (atomic write), and a file left with no rows is removed.
    """
    return _drop(output, lambda table: pc.equal(table.column("status"), "ok"), storage_options)


def drop_image_rows(output: str, image_ids: Collection[str], storage_options: dict[str, Any] | None = None) -> int:
    """Rewrite the result files without the rows of ``image_ids``; returns how many rows went.

    A routed run whose table now sends an image to another bank scores it again: its old row goes
    first, the same way as :func:`drop_error_rows`, so the image never has two rows.
    """
    if not image_ids:
        return 0
    ids = pa.array(sorted(image_ids), pa.string())
    return _drop(output, lambda table: pc.invert(pc.is_in(table.column("image_id"), value_set=ids)), storage_options)


def _drop(output: str, keep: Callable[[pa.Table], pa.ChunkedArray], storage_options: dict[str, Any] | None) -> int:
    dropped = 0
    for url in list_parquet_files(join(output, RESULTS), storage_options):
        table = pq.read_table(pa.BufferReader(read_bytes(url, storage_options)))
        kept = table.filter(keep(table))
        if kept.num_rows == table.num_rows:
            continue
        if kept.num_rows:
            buf = io.BytesIO()
            pq.write_table(kept, buf)
            write_bytes(url, buf.getvalue(), storage_options)
        else:
            fs, path, _ = resolve(url, storage_options)
            fs.rm_file(path)
        dropped += table.num_rows - kept.num_rows
    return dropped
