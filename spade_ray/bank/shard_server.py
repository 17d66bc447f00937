"""One shard of the normal bank, served: retrieval and correspondence against the data it owns.

This is the work a shard actor does, as a plain class with no Ray in it (the Ray layer wraps it
with ``ray.remote``).  The query moves to the data: a shard answers "your top-k global neighbours"
and "per-level nearest-match distances of these query pixels against the pixels of the neighbours
I own"; it never ships its pyramids.  Rows are numbered bank-wide: shard rows plus the shard's
``offset`` (its position in the manifest), so results from all shards merge exactly.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch

from spade_ray.bank.manifest import ShardEntry
from spade_ray.bank.shard_loader import BankShard, load_shard
from spade_ray.method.calibration import calibration_rows
from spade_ray.method.matching import MatchSettings
from spade_ray.method.pyramid_bank import PyramidBank

__all__ = ["ShardServer"]


class ShardServer:
    """Holds one bank shard in memory and answers retrieval and correspondence queries.

    Its pyramids are held once, in the feature space and layout of the setting it serves
    (:class:`~spade_ray.method.pyramid_bank.PyramidBank`): the raw pyramids read from storage are
    dropped level by level as the served copy is made, so a shard costs one copy of its
    pyramids whatever the ``aggregate`` setting.  A query in another feature space (a rare
    thing: jobs start their shard actors with the setting they score with) reloads the shard
    from storage and serves that one instead.
    """

    def __init__(
        self,
        bank_root: str,
        entry: ShardEntry,
        offset: int,
        storage_options: dict[str, Any] | None = None,
        verify: bool = True,
        threads: int | None = None,
        aggregate: int | None = None,
        device: str = "cpu",
    ) -> None:
        # where the correspondence runs: the bank stays in host memory either way, and only the
        # gallery data a query compares with is copied to a GPU (``PyramidBank.gallery_distances``)
        self.device = device
        if threads:
            torch.set_num_threads(threads)
            import faiss

            faiss.omp_set_num_threads(threads)
        self._load = lambda: load_shard(bank_root, entry, verify=verify, storage_options=storage_options)
        self.shard: BankShard = self._load()
        self.offset = int(offset)
        self._served: PyramidBank | None = None
        if aggregate is not None:
            self.pyramids(aggregate)

    @classmethod
    def from_shard(cls, shard: BankShard, offset: int) -> ShardServer:
        """A server over a shard already in memory (it serves the first setting asked for, and only that one)."""
        server = cls.__new__(cls)
        server.shard, server.offset, server._served, server.device = shard, int(offset), None, "cpu"

        def cannot_reload() -> BankShard:
            raise RuntimeError(f"shard {shard.name} was given in memory and already serves another setting; "
                               "it cannot be reloaded from storage")

        server._load = cannot_reload
        return server

    def pyramids(self, aggregate: int) -> PyramidBank:
        """This shard's pyramids in the feature space of ``aggregate`` (made on first use; the raw ones are dropped)."""
        if self._served is None or self._served.aggregate != aggregate:
            levels = self.shard.levels if self.shard.levels else self._load().levels
            self.shard.levels = []  # the served copy replaces them
            self._served = None  # the previous setting's copy goes before the next is made
            self._served = PyramidBank(levels, aggregate, consume=True)
        return self._served

    def info(self) -> dict[str, Any]:
        pyramids = self._served.nbytes if self._served is not None else sum(level.nbytes for level in self.shard.levels)
        return {"name": self.shard.name, "n_images": len(self.shard), "offset": self.offset,
                "bytes": int(self.shard.global_.nbytes + pyramids), "device": self.device}

    def owns(self, rows: np.ndarray) -> np.ndarray:
        """Mask of the bank-wide rows that live in this shard."""
        return (rows >= self.offset) & (rows < self.offset + len(self.shard))

    def search(self, queries: np.ndarray, k: int, exclude: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray]:
        """Local top-k per query as (distances, bank-wide rows), ascending; -1/inf pad.

        ``exclude`` (B,) bank-wide rows to leave out (leave-one-out calibration); -1 for none.
        """
        local_exclude = None
        if exclude is not None:
            exclude = np.asarray(exclude)
            local_exclude = np.where(self.owns(exclude), exclude - self.offset, -1)
        dist, local = self.shard.search(queries, k, local_exclude)
        return dist, np.where(local >= 0, local + self.offset, -1)

    def correspond(self, query_levels: list[np.ndarray], wanted: dict[int, np.ndarray],
                   match: MatchSettings) -> dict[int, list[np.ndarray]]:
        """For query b in ``wanted``: per level, (H, W, kappa) distances to this shard's part of its gallery.

        ``query_levels[l]`` is (B, C, H, W) for the whole batch (shared via the object store), already
        in ``match.aggregate``'s feature space (the gallery is aggregated and laid out here, once per
        shard); ``wanted[b]`` lists bank-wide rows of b's gallery, only those this shard owns are used.
        """
        local = {b: np.asarray(rows)[self.owns(np.asarray(rows))] - self.offset for b, rows in wanted.items()}
        answers = self.pyramids(match.aggregate).gallery_distances(query_levels, local, match, self.device)
        return {b: [d.cpu().numpy() for d in distances] for b, distances in answers.items()}

    def features(self, rows: np.ndarray, aggregate: int) -> tuple[np.ndarray, list[np.ndarray]]:
        """Global vectors and float32 pyramids, in the feature space of ``aggregate``, of a few owned rows.

        For leave-one-out calibration: a bank image is scored as a query just as the served bank
        holds it (already aggregated, so the client must not aggregate it again).
        """
        local = np.asarray(rows) - self.offset
        if not self.owns(np.asarray(rows)).all():
            raise ValueError(f"shard {self.shard.name} does not own all of rows {rows}")
        return self.shard.global_[local].copy(), self.pyramids(aggregate).query_levels(local)

    def calibration_candidates(self, samples: int) -> tuple[list[str], np.ndarray]:
        """URIs and bank-wide rows of this shard's share of a calibration sample (see ``calibration_rows``)."""
        local = calibration_rows(self.shard.uris, samples)
        return [self.shard.uris[r] for r in local.tolist()], local + self.offset

    def ids(self, rows: np.ndarray) -> list[tuple[str, str]]:
        """(image id, uri) of owned bank-wide rows."""
        return [(self.shard.ids[r - self.offset], self.shard.uris[r - self.offset]) for r in np.asarray(rows).tolist()]
