"""Parquet feature shards: what ``spade-ray extract`` writes and ``build-bank`` reads.

One row per input image, success or error, so a failed decode is recorded rather than silently
dropped and a re-run can tell what is done::

    image_id  string                     stable id from the URI (see :func:`image_id_for`)
    uri       string                     the input as given (local path or fsspec URL)
    relpath   string, nullable           the input's path relative to the input root
    height    int32, nullable            the image's original size (null when it did not decode)
    width     int32, nullable
    status    string                     "ok" or "error"
    error     string, nullable           the reason, null when ok
    global    fixed_size_list<float32>[D]         pooled global vector (null on error rows)
    level0..  fixed_shape_tensor<float16>[C,H,W]  one column per pyramid level (null on error rows)

The pyramid columns use Arrow's canonical fixed-shape tensor extension type, so any Arrow reader
(pyarrow, Polars, DuckDB, Spark with the extension) sees real tensors with their shape, and
:func:`table_to_features` turns them into numpy without copying.  Levels are float16: they are
the bulk of the data and half precision is plenty for nearest-neighbour distances.  The schema
metadata key ``b"spade_ray"`` holds a :class:`FeatureMeta` as JSON (backbone, weights hash, input
size, protocol, level shapes), so features from different backbones can never be mixed unnoticed.

Shards are written whole and atomically (temp file + rename locally, one PUT on object stores):
a reader never sees half a Parquet file.  No pickle anywhere.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from typing import Any

import fsspec
import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from spade_ray.method.config import TILING_SETTINGS, UNTILED
from spade_ray.method.features import FeatureBatch
from spade_ray.method.tiling import Tiling
from spade_ray.storage.parquet import list_parquet_files
from spade_ray.storage.urls import read_bytes, write_bytes

__all__ = [
    "FEATURE_FORMAT_VERSION",
    "META_KEY",
    "FeatureMeta",
    "features_to_table",
    "image_id_for",
    "list_feature_shards",
    "read_feature_meta",
    "read_features",
    "table_to_features",
    "write_feature_shard",
]

FEATURE_FORMAT_VERSION = 1
META_KEY = b"spade_ray"
STATUS_OK = "ok"
STATUS_ERROR = "error"
_STATUSES = frozenset({STATUS_OK, STATUS_ERROR})
_TENSOR_DIMS = ["C", "H", "W"]


def image_id_for(uri: str) -> str:
    """A stable key for an input image: the first 20 hex digits of sha256(uri).

    It depends only on the URI string, so every run, worker and machine computes the same id for
    the same input (Python's ``hash()`` is salted per process and could not be used).  80 bits
    make a collision practically impossible (about 1e-12 for a billion images), and the id is
    plain lowercase hex: safe as a file name, object key, Parquet value or dictionary key,
    unlike the URI itself.
    """
    return hashlib.sha256(uri.encode("utf-8")).hexdigest()[:20]


@dataclass(frozen=True)
class FeatureMeta:
    """What produced a set of features; features are comparable only when these are equal.

    ``level_shapes`` is (C, H, W) per pyramid level; ``global_dim`` is the length of the pooled
    vector.  ``weights_sha256`` pins the exact weights (same backbone name, other weights, other
    features).
    """

    backbone: str
    weights_sha256: str
    image_size: int
    protocol: str
    level_shapes: list[tuple[int, int, int]]
    global_dim: int
    format_version: int = FEATURE_FORMAT_VERSION
    # How frames were cut into tiles (spade_ray.method.tiling): a row is then one tile
    # (``frame#tileN``), and only features cut the same way are comparable.  Untiled: 0, 0, 1.
    tile: int = 0
    tile_overlap: int = 0
    scale: float = 1.0

    def __post_init__(self) -> None:
        # Normalise so that a meta read back from JSON (lists) equals the one written (tuples).
        shapes = [tuple(int(x) for x in shape) for shape in self.level_shapes]
        for shape in shapes:
            if len(shape) != 3:
                raise ValueError(f"level shapes must be (C, H, W); got {shape}")
        object.__setattr__(self, "level_shapes", shapes)
        object.__setattr__(self, "image_size", int(self.image_size))
        object.__setattr__(self, "global_dim", int(self.global_dim))
        object.__setattr__(self, "format_version", int(self.format_version))
        object.__setattr__(self, "tile", int(self.tile))
        object.__setattr__(self, "tile_overlap", int(self.tile_overlap))
        object.__setattr__(self, "scale", float(self.scale))

    @property
    def tiling(self) -> Tiling:
        """How the features' frames were cut (``Tiling()``: not at all, one row per image)."""
        return Tiling(self.tile, self.tile_overlap, self.scale)

    def to_json(self) -> str:
        """Deterministic JSON (sorted keys), so equal metas give byte-equal schema metadata."""
        data = asdict(self)
        data["level_shapes"] = [list(shape) for shape in self.level_shapes]
        if not self.tile:  # untiled metadata stays byte-identical to that written before tiling existed
            for name in TILING_SETTINGS:
                del data[name]
        return json.dumps(data, sort_keys=True)

    @classmethod
    def from_json(cls, text: str | bytes) -> FeatureMeta:
        """Parse :meth:`to_json` output; ValueError for another format version or missing fields."""
        try:
            data = json.loads(text)
        except json.JSONDecodeError as exc:
            raise ValueError(f"feature metadata is not valid JSON: {exc}") from None
        if not isinstance(data, dict):
            raise ValueError("feature metadata must be a JSON object")
        version = data.get("format_version")
        if version != FEATURE_FORMAT_VERSION:
            raise ValueError(
                f"unsupported feature format version {version!r}; this spade_ray reads version {FEATURE_FORMAT_VERSION}"
            )
        try:
            return cls(
                backbone=data["backbone"],
                weights_sha256=data["weights_sha256"],
                image_size=data["image_size"],
                protocol=data["protocol"],
                level_shapes=data["level_shapes"],
                global_dim=data["global_dim"],
                format_version=version,
                **{name: data.get(name, UNTILED[name]) for name in TILING_SETTINGS},
            )
        except KeyError as exc:
            raise ValueError(f"feature metadata lacks field {exc.args[0]!r}") from None


# ----------------------------------------------------------------------------- building a table


def _tensor_type(shape: tuple[int, int, int]) -> pa.DataType:
    return pa.fixed_shape_tensor(pa.float16(), list(shape), dim_names=_TENSOR_DIMS)


def _scatter(values: np.ndarray, ok_rows: np.ndarray, n_rows: int) -> np.ndarray:
    """Values for ``ok_rows`` placed into an n_rows array (zeros elsewhere, later masked null)."""
    if len(values) == n_rows:
        return values
    out = np.zeros((n_rows,) + values.shape[1:], dtype=values.dtype)
    out[ok_rows] = values
    return out


def _fixed_size_list(flat: np.ndarray, size: int, null_mask: np.ndarray | None) -> pa.FixedSizeListArray:
    values = pa.array(np.ascontiguousarray(flat).reshape(-1))  # zero-copy for numeric numpy
    mask = None if null_mask is None or not null_mask.any() else pa.array(null_mask)
    return pa.FixedSizeListArray.from_arrays(values, size, mask=mask)


def _checked_statuses(n: int, uris: Sequence[str], heights: Sequence[int | None], widths: Sequence[int | None],
                      statuses: Sequence[str] | None, errors: Sequence[str | None] | None,
                      relpaths: Sequence[str | None] | None) -> list[str]:
    """The rows' statuses (default all ok), after checking that every per-row list has ``n`` entries."""
    for name, seq in (("uris", uris), ("heights", heights), ("widths", widths), ("statuses", statuses),
                      ("errors", errors), ("relpaths", relpaths)):
        if seq is not None and len(seq) != n:
            raise ValueError(f"{name} has {len(seq)} entries for {n} ids")
    status_list = [STATUS_OK] * n if statuses is None else [str(s) for s in statuses]
    bad = sorted(set(status_list) - _STATUSES)
    if bad:
        raise ValueError(f"status must be 'ok' or 'error'; got {bad}")
    return status_list


def _checked_features(features: FeatureBatch | None, meta: FeatureMeta, n: int, n_ok: int) -> tuple[np.ndarray, list[np.ndarray]]:
    """(global vectors, levels) of every row or of the ok rows, checked against ``meta``'s shapes."""
    if features is None:
        if n_ok:
            raise ValueError(f"{n_ok} rows have status 'ok' but no features were given")
        global_ = np.zeros((0, meta.global_dim), dtype=np.float32)
        levels = [np.zeros((0,) + shape, dtype=np.float16) for shape in meta.level_shapes]
    else:
        global_, levels = features.global_, features.levels
        if len(global_) not in (n, n_ok):
            raise ValueError(f"features have {len(global_)} rows; expected {n} (all rows) or {n_ok} (ok rows)")
    if global_.ndim != 2 or global_.shape[1] != meta.global_dim:
        raise ValueError(f"global vectors have shape {global_.shape}; meta says (N, {meta.global_dim})")
    if len(levels) != len(meta.level_shapes):
        raise ValueError(f"{len(levels)} pyramid levels; meta describes {len(meta.level_shapes)}")
    for i, (level, shape) in enumerate(zip(levels, meta.level_shapes)):
        if tuple(level.shape[1:]) != shape or len(level) != len(global_):
            raise ValueError(f"level{i} has shape {level.shape}; meta says (N, {', '.join(map(str, shape))})")
    return global_, levels


def features_to_table(
    ids: Sequence[str],
    uris: Sequence[str],
    heights: Sequence[int | None],
    widths: Sequence[int | None],
    features: FeatureBatch | None,
    meta: FeatureMeta,
    statuses: Sequence[str] | None = None,
    errors: Sequence[str | None] | None = None,
    relpaths: Sequence[str | None] | None = None,
) -> pa.Table:
    """One Arrow table (one row per image, ok or error) in the feature-shard schema.

    ``features`` may hold either every row (values of error rows are ignored) or only the ok rows
    in order (what an extractor has after dropping images that failed to decode); ``None`` when
    no row is ok.  ``statuses`` defaults to all "ok"; ``errors`` is kept for error rows only (the
    column is null on ok rows).  Shapes must match ``meta``: a shard's metadata must describe it.
    """
    n = len(ids)
    status_list = _checked_statuses(n, uris, heights, widths, statuses, errors, relpaths)
    error_mask = np.array([s == STATUS_ERROR for s in status_list], dtype=bool)
    ok_rows = np.flatnonzero(~error_mask)
    global_, levels = _checked_features(features, meta, n, len(ok_rows))
    null_mask = error_mask if error_mask.any() else None
    columns: dict[str, pa.Array] = {
        "image_id": pa.array(list(ids), type=pa.string()),
        "uri": pa.array(list(uris), type=pa.string()),
        "relpath": pa.array([None] * n if relpaths is None else list(relpaths), type=pa.string()),
        "height": pa.array([None if h is None else int(h) for h in heights], type=pa.int32()),
        "width": pa.array([None if w is None else int(w) for w in widths], type=pa.int32()),
        "status": pa.array(status_list, type=pa.string()),
        "error": pa.array(
            [None if (errors is None or s == STATUS_OK or errors[i] is None) else str(errors[i])
             for i, s in enumerate(status_list)],
            type=pa.string(),
        ),
        "global": _fixed_size_list(
            _scatter(global_.astype(np.float32, copy=False), ok_rows, n), meta.global_dim, null_mask
        ),
    }
    for i, (level, shape) in enumerate(zip(levels, meta.level_shapes)):
        storage = _fixed_size_list(
            _scatter(level.astype(np.float16, copy=False), ok_rows, n), int(np.prod(shape)), null_mask
        )
        columns[f"level{i}"] = pa.ExtensionArray.from_storage(_tensor_type(shape), storage)
    table = pa.table(columns)
    return table.replace_schema_metadata({META_KEY: meta.to_json().encode("utf-8")})


# ----------------------------------------------------------------------------- writing and reading


def write_feature_shard(url: str, table: pa.Table, storage_options: dict[str, Any] | None = None) -> None:
    """Write one shard as zstd Parquet, atomically (built in memory, then one write/PUT).

    Shards are small (a batch of images), so building them in memory costs little and means a
    crashed writer leaves either the old file or the whole new one, never a truncated footer.
    """
    if META_KEY not in (table.schema.metadata or {}):
        raise ValueError("table has no spade_ray metadata; build it with features_to_table()")
    sink = pa.BufferOutputStream()
    pq.write_table(table, sink, compression="zstd")
    write_bytes(url, sink.getvalue().to_pybytes(), storage_options)


def _meta_from_schema(schema: pa.Schema, url: str) -> FeatureMeta:
    raw = (schema.metadata or {}).get(META_KEY)
    if raw is None:
        raise ValueError(f"{url} is not a spade_ray feature shard (no {META_KEY.decode()!r} schema metadata)")
    try:
        return FeatureMeta.from_json(raw)
    except ValueError as exc:
        raise ValueError(f"{url}: {exc}") from None


def read_feature_meta(url: str, storage_options: dict[str, Any] | None = None) -> FeatureMeta:
    """The :class:`FeatureMeta` of a shard, from the Parquet footer only (no column data is read)."""
    fs, path = fsspec.core.url_to_fs(url, **(storage_options or {}))
    with fs.open(path, "rb") as fh:
        schema = pq.read_schema(fh)
    return _meta_from_schema(schema, url)


def list_feature_shards(prefix: str, storage_options: dict[str, Any] | None = None) -> list[str]:
    """Every feature shard under a folder/prefix (recursively), sorted; a single file -> [it].

    The shards are the visible ``*.parquet`` files, listed by
    :func:`spade_ray.storage.parquet.list_parquet_files` (URLs keep the caller's protocol).
    """
    return list_parquet_files(prefix, storage_options)


def read_features(
    urls: Sequence[str], storage_options: dict[str, Any] | None = None, only_ok: bool = True
) -> tuple[pa.Table, FeatureMeta]:
    """All rows of several shards as one table (ok rows only by default) and their common meta.

    Every shard must carry the same :class:`FeatureMeta`: mixing backbones, weights, input
    sizes or protocols would silently compare incomparable features.  The ValueError names the
    first shard that differs and how.
    """
    if not urls:
        raise ValueError("no feature shards to read")
    tables: list[pa.Table] = []
    first: FeatureMeta | None = None
    for url in urls:
        table = pq.read_table(pa.BufferReader(read_bytes(url, storage_options)))
        meta = _meta_from_schema(table.schema, url)
        if first is None:
            first = meta
        elif meta != first:
            diffs = [
                f"{k}: {getattr(meta, k)!r} != {getattr(first, k)!r}"
                for k in ("backbone", "weights_sha256", "image_size", "protocol", "level_shapes", "global_dim", "format_version")
                if getattr(meta, k) != getattr(first, k)
            ]
            raise ValueError(
                f"feature shard {url} was made with different settings than {urls[0]} ({'; '.join(diffs)}); "
                "features of different backbones/weights/sizes cannot be mixed"
            )
        if only_ok:
            table = table.filter(pc.equal(table.column("status"), STATUS_OK))
        tables.append(table)
    assert first is not None
    combined = pa.concat_tables(tables).replace_schema_metadata({META_KEY: first.to_json().encode("utf-8")})
    return combined, first


def _single_array(column: pa.ChunkedArray) -> pa.Array:
    """One contiguous array; zero-copy when the column already has a single chunk."""
    return column.chunk(0) if column.num_chunks == 1 else column.combine_chunks()


def table_to_features(table: pa.Table) -> tuple[list[str], list[str], FeatureBatch]:
    """(ids, uris, FeatureBatch) of a table of ok rows: global float32 (N, D), levels float16 (N, C, H, W).

    The arrays are views of the Arrow buffers where pyarrow allows (a single-chunk table, as
    :func:`read_features` of one shard gives), so they are **read-only**: copy before writing in
    place.  Error rows have no features; filter them first (``read_features(only_ok=True)``).
    """
    meta = _meta_from_schema(table.schema, "table")
    n = table.num_rows
    n_bad = n - pc.sum(pc.equal(table.column("status"), STATUS_OK).cast(pa.int64())).as_py() if n else 0
    if n_bad:
        raise ValueError(f"table has {n_bad} rows whose status is not 'ok'; they have no features (read with only_ok=True)")
    ids = table.column("image_id").to_pylist()
    uris = table.column("uri").to_pylist()

    glob = _single_array(table.column("global"))
    if glob.null_count:
        raise ValueError("table has ok rows with a null global vector")
    global_ = glob.flatten().to_numpy(zero_copy_only=False).reshape(n, meta.global_dim)

    levels = []
    for i, shape in enumerate(meta.level_shapes):
        col = _single_array(table.column(f"level{i}"))
        if col.null_count:
            raise ValueError(f"table has ok rows with a null level{i}")
        if n == 0:
            levels.append(np.zeros((0,) + shape, dtype=np.float16))
        else:
            levels.append(col.to_numpy_ndarray())
    return ids, uris, FeatureBatch(global_, levels)
