"""A job's inputs as Arrow tables in Ray's object store: the driver keeps references and a count, not rows.

A night's listing, as one Python object per input, would not fit the head pod at 10^7 inputs; the
object store holds them as Arrow (and spills to disk when full), and the pipeline reads them from
there.  Not with ``ray.data.from_arrow_refs``: it starts a 1-CPU task per table for its metadata
(which waits forever once the served banks hold the CPUs), and keeps each table one block, so one
decode task would read a whole chunk.  Here the metadata is known when a table is put, and the
read tasks, as light as the decode tasks, cut each table into blocks of about one batch.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any

import pyarrow as pa
import ray
from ray.data.block import BlockMetadata
from ray.data.datasource import Datasource, ReadTask

from spade_ray.storage.outputs import output_stem
from spade_ray.storage.sources import InputImage

__all__ = ["InputBlocks", "input_table"]


def input_table(items: Sequence[InputImage], keys: dict[str, str] | None = None, **columns: str) -> pa.Table:
    """The pipeline's rows for ``items``: uri, relpath, image_id, key, and a column per ``columns`` (one value for all).

    ``keys`` maps image ids to their output key stems (default: :func:`output_stem` of the relpath).
    """
    keys = keys or {}
    data = {"uri": [it.uri for it in items], "relpath": [it.relpath for it in items],
            "image_id": [it.image_id for it in items],
            "key": [keys.get(it.image_id) or output_stem(it.relpath) for it in items]}
    return pa.table({**{name: pa.array(values, pa.string()) for name, values in data.items()},
                     **{name: pa.array([value] * len(items), pa.string()) for name, value in columns.items()}})


def _read(ref: ray.ObjectRef) -> Iterable[pa.Table]:
    return [ray.get(ref)]


class _StoredTables(Datasource):
    """Tables already in the object store, one read task each (Ray Data splits their output into blocks)."""

    def __init__(self, blocks: InputBlocks) -> None:
        self._blocks = blocks

    def estimate_inmemory_data_size(self) -> int:
        return sum(self._blocks.sizes)

    def get_read_tasks(self, parallelism: int, per_task_row_limit: int | None = None,
                       data_context: Any = None) -> list[ReadTask]:
        return [ReadTask(lambda ref=ref: _read(ref), BlockMetadata(rows, size, None, None))
                for ref, rows, size in zip(self._blocks.refs, self._blocks.counts, self._blocks.sizes)]


@dataclass
class InputBlocks:
    """Input tables put in the object store (``refs``), with each one's rows (``counts``) and bytes (``sizes``).

    Ray must be initialised before a table is added.
    """

    refs: list[ray.ObjectRef] = field(default_factory=list)
    counts: list[int] = field(default_factory=list)
    sizes: list[int] = field(default_factory=list)

    @property
    def rows(self) -> int:
        return sum(self.counts)

    @classmethod
    def of(cls, items: Sequence[InputImage]) -> InputBlocks:
        """``items`` in one table, keyed by their relpaths."""
        blocks = cls()
        blocks.add(input_table(items))
        return blocks

    def add(self, table: pa.Table) -> None:
        if table.num_rows:
            self.refs.append(ray.put(table))
            self.counts.append(table.num_rows)
            self.sizes.append(table.nbytes)

    def extend(self, other: InputBlocks) -> None:
        self.refs.extend(other.refs)
        self.counts.extend(other.counts)
        self.sizes.extend(other.sizes)

    def dataset(self, batch_size: int, num_cpus: float) -> ray.data.Dataset:
        """The rows as a dataset of blocks of at most about ``batch_size`` rows, read by tasks of ``num_cpus``."""
        return ray.data.read_datasource(_StoredTables(self), num_cpus=num_cpus,
                                        override_num_blocks=max(1, -(-self.rows // batch_size)))
