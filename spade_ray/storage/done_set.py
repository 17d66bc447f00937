"""The images an output already holds a row for, kept compact: the score driver's "already done" set.

A rerun must skip every image with a row, so the driver holds one entry per row before its first
batch.  As Python strings in a dict that cost ~160 bytes per row for the whole run and ~440 while
it was built (docs/scaling.md, "The driver at 10^7 images a night"): gigabytes at 10^7 rows.  Here
each image id (20 ASCII hex digits) is 20 bytes of one sorted numpy array, taken column-wise from
Arrow without making a Python object per row; membership is a binary search.  The bank of each
row is kept as a small code (few banks per output), so that a routed run can tell, chunk by chunk
of its listing, which images are routed to another bank now than their row's.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

__all__ = ["ID_BYTES", "DoneSet"]

ID_BYTES = 20  # storage.sources.image_id_for: the first 20 hex digits of sha256(URI)
_DTYPE = f"S{ID_BYTES}"


def _id_array(column: pa.ChunkedArray | pa.Array) -> np.ndarray:
    """The ids of an Arrow string column as an ``S20`` array (in column order), without a Python string per id."""
    try:
        fixed = pc.cast(column, pa.binary(ID_BYTES))
    except (pa.ArrowInvalid, pa.ArrowNotImplementedError) as exc:
        raise ValueError(f"result rows hold an image_id that is not {ID_BYTES} characters long: {exc}") from exc
    chunks = fixed.chunks if isinstance(fixed, pa.ChunkedArray) else [fixed]
    parts = [np.frombuffer(c.buffers()[1], dtype=_DTYPE, count=len(c), offset=c.offset * ID_BYTES) for c in chunks
             if len(c)]
    return np.concatenate(parts) if parts else np.empty(0, dtype=_DTYPE)


def _find(sorted_ids: np.ndarray, query: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(whether each query id is in ``sorted_ids``, where it is or would be)."""
    if not len(sorted_ids):
        return np.zeros(len(query), dtype=bool), np.zeros(len(query), dtype=np.int64)
    at = np.minimum(np.searchsorted(sorted_ids, query), len(sorted_ids) - 1)
    return sorted_ids[at] == query, at


def _member(sorted_ids: np.ndarray, query: np.ndarray) -> np.ndarray:
    return _find(sorted_ids, query)[0]


def _bank_codes(column: pa.ChunkedArray) -> tuple[np.ndarray, tuple[str | None, ...]]:
    """Each row's bank as an int16 code into the few bank ids (None included) of the column."""
    encoded = pc.dictionary_encode(column, null_encoding="encode").combine_chunks()
    return (np.asarray(encoded.indices.to_numpy(zero_copy_only=False), dtype=np.int16),
            tuple(encoded.dictionary.to_pylist()))


@dataclass(frozen=True)
class DoneSet:
    """Every image id with a row (``ids``) and those whose row is an error (``errors``), both sorted ``S20``;
    with the rows' banks, ``bank_codes`` (aligned with ``ids``) into ``banks``."""

    ids: np.ndarray
    errors: np.ndarray
    bank_codes: np.ndarray | None = None
    banks: tuple[str | None, ...] = ()

    @classmethod
    def empty(cls) -> DoneSet:
        return cls(np.empty(0, dtype=_DTYPE), np.empty(0, dtype=_DTYPE), np.empty(0, dtype=np.int16))

    @classmethod
    def from_rows(cls, table: pa.Table) -> DoneSet:
        """From result rows' ``image_id`` and ``status`` columns (``read_results``), and ``bank_id`` when read."""
        failed = table.filter(pc.not_equal(table.column("status"), "ok")).column("image_id")
        ids = _id_array(table.column("image_id"))
        order = np.argsort(ids, kind="stable")
        codes, banks = _bank_codes(table.column("bank_id")) if "bank_id" in table.column_names else (None, ())
        return cls(ids[order], np.sort(_id_array(failed)), None if codes is None else codes[order], banks)

    def __len__(self) -> int:
        return len(self.ids)

    def holds(self, image_ids: Sequence[str]) -> np.ndarray:
        """For each id, whether the output has a row for it."""
        return _member(self.ids, np.asarray(image_ids, dtype=_DTYPE))

    def count_errors(self, image_ids: Sequence[str]) -> int:
        """How many of these ids have an error row."""
        return int(_member(self.errors, np.asarray(image_ids, dtype=_DTYPE)).sum())

    def elsewhere(self, image_ids: Sequence[str], bank: str | None) -> np.ndarray:
        """For each id, whether its row is of another bank than ``bank`` (None: an image no route matches)."""
        if self.bank_codes is None:
            raise ValueError("this done-set was made without the rows' bank_id column")
        held, at = _find(self.ids, np.asarray(image_ids, dtype=_DTYPE))
        code = self.banks.index(bank) if bank in self.banks else -1
        return held & (self.bank_codes[at] != code) if len(self.ids) else held
