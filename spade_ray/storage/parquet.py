"""Every Parquet file under a prefix: list them, or read some of their columns as one table.

Both the feature shards (``spade-ray extract``) and the result rows (``spade-ray score``) are
folders of Parquet files, one per batch, that several runs add to.  What a folder "holds" is
decided here once: every ``*.parquet`` below it, recursively, except hidden entries (a path part
starting with ``.`` or ``_``: temp files, ``_SUCCESS`` markers, notebook checkpoints).
"""

from __future__ import annotations

from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq

from spade_ray.storage.urls import join, read_many, relative, resolve

__all__ = ["WHOLE_FILE_BYTES", "list_parquet_files", "read_columns"]

#: Files up to this size are fetched whole in one request and parsed from memory; bigger ones
#: (feature shards of large batches) are opened, so only the footer and the asked column chunks
#: travel.  Result files are a few kB each: a ranged read would cost a size lookup and two GETs.
WHOLE_FILE_BYTES = 8 << 20


def _parquet_entries(prefix: str, storage_options: dict[str, Any] | None) -> tuple[Any, list[tuple[str, str, int]]]:
    """(filesystem, [(URL, filesystem path, size)]) of the visible Parquet files under ``prefix``, sorted."""
    fs, fs_path, base = resolve(prefix, storage_options)
    if fs.isfile(fs_path):
        return fs, ([(base, fs_path, int(fs.size(fs_path)))] if fs_path.endswith(".parquet") else [])
    entries = []
    for path, info in fs.find(fs_path, detail=True).items():
        rel = relative(path, fs_path)
        if rel is None or not rel.endswith(".parquet"):
            continue
        if any(part.startswith((".", "_")) for part in rel.split("/")):
            continue
        entries.append((join(base, rel), path, int(info.get("size") or 0)))
    return fs, sorted(entries)


def list_parquet_files(prefix: str, storage_options: dict[str, Any] | None = None) -> list[str]:
    """Every visible ``*.parquet`` under a folder/prefix (recursively), sorted; a single file -> [it].

    Returned strings keep the caller's protocol (``s3://bucket/feat/a.parquet``) so they can be
    handed straight to the readers and to other machines; a prefix that does not exist holds none.
    """
    return [url for url, _, _ in _parquet_entries(prefix, storage_options)[1]]


def _columns_of(parquet: pq.ParquetFile, schema: pa.Schema) -> pa.Table:
    present = set(parquet.schema_arrow.names)
    table = parquet.read(columns=[name for name in schema.names if name in present])
    for field in schema:
        if field.name not in present:
            table = table.append_column(field, pa.nulls(table.num_rows, field.type))
    return table.select(schema.names)


def read_columns(prefix: str, schema: pa.Schema, storage_options: dict[str, Any] | None = None) -> pa.Table:
    """The columns named by ``schema`` of every Parquet file under ``prefix``, as one table.

    Only those columns are read (a rerun asking which images are done never downloads features).
    A column a file lacks (written by an older version) reads as nulls of the schema's type; an
    empty or missing prefix gives an empty table of ``schema``.  Files are concatenated in sorted
    order, rows in file order.  Small files are fetched many at a time (one round trip per file
    on an object store, one after another, would make a night's output slow to resume).
    """
    fs, entries = _parquet_entries(prefix, storage_options)
    small = [(url, path) for url, path, size in entries if size <= WHOLE_FILE_BYTES]
    fetched = dict(zip((url for url, _ in small), read_many([url for url, _ in small], storage_options)))
    tables = []
    for url, path, _ in entries:
        data = fetched.get(url)
        if isinstance(data, Exception):
            raise data
        if data is not None:
            tables.append(_columns_of(pq.ParquetFile(pa.BufferReader(data)), schema))
        else:
            with fs.open(path, "rb") as fh:
                tables.append(_columns_of(pq.ParquetFile(fh), schema))
    if not tables:
        return schema.empty_table()
    return pa.concat_tables(tables, promote_options="permissive")
