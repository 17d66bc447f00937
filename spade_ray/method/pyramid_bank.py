"""The bank's pyramids laid out for matching: the fine pixels under each coarse cell stored together.

Coarse-to-fine matching (:mod:`spade_ray.method.coarse_to_fine`) compares the fine pixels of each query
coarse cell with the fine pixels under the matched coarse cell of each gallery image.  In the
images' own (C, H, W) layout those pixels are scattered, so every query paid for a copy of its
whole gallery (numpy gather, fp16 -> fp32, channels-last permute) before gathering its windows:
34 of the 37 ms a 224 px query spent matching against 50 gallery images on 2 cores.  Laid out once
per bank as (image x cell, pixel in cell, channel), the window of a cell is one contiguous block,
and a query reads exactly the blocks it compares with (one ``index_select`` per level) and nothing
else.  The layout is a permutation of the same float16 values, plus the float32 squared norm of
every pixel (6% more, computed once instead of per query).  With the default settings (margin 0)
the kernel here gives the same distances as the general one (tested); other settings read the
gallery back in image layout and use the general kernels.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import numpy as np
import torch

from spade_ray.method.aggregation import aggregate_level
from spade_ray.method.correspondence import DEFAULT_CHUNK_ELEMENTS
from spade_ray.method.matching import MatchSettings, pyramid_distances

__all__ = ["PyramidBank", "PyramidBanks"]

_CHUNK_IMAGES = 256  # bounds the temporaries when a large bank is laid out


class PyramidBank:
    """N images' pyramids in one feature space, laid out by coarse cell; answers matching queries.

    ``levels[l]`` is (N, C_l, H_l, W_l); the level with the fewest pixels is the coarse grid.  When
    every level's height and width are multiples of the coarse grid's (any input size that is a
    multiple of the coarsest stride), pixels are stored cell-major; otherwise the images' own
    layout is kept and every query uses the general kernels.
    """

    def __init__(self, levels: Sequence[np.ndarray], aggregate: int = 1, *, consume: bool = False) -> None:
        """``levels`` as stored (raw pyramids), brought into the feature space of ``aggregate`` here.

        With ``consume`` (``levels`` must be a list) each raw level is dropped from the list as
        soon as its laid-out copy exists, so a caller that keeps no other reference (a shard actor)
        never holds two copies of its pyramids at once, only one level's worth more.
        """
        if not levels:
            raise ValueError("a pyramid bank needs at least one level")
        self.n_images = int(levels[0].shape[0])
        self.shapes = [tuple(int(s) for s in level.shape[1:]) for level in levels]
        self.aggregate = aggregate
        self.coarse = min(range(len(levels)), key=lambda i: self.shapes[i][1] * self.shapes[i][2])
        _, hc, wc = self.shapes[self.coarse]
        self.grid = (hc, wc)
        self.cell_major = all(h % hc == 0 and w % wc == 0 for _, h, w in self.shapes)
        self._blocks: list[torch.Tensor] = []  # cell-major: (N*Pc, fy*fx, C) per level
        self._norms: list[torch.Tensor] = []  # cell-major: (N*Pc, fy*fx) float32 per level
        self._images: list[torch.Tensor] = []  # otherwise: (N, C, H, W) per level
        for i in range(len(levels)):
            level = aggregate_level(levels[i], aggregate)
            if consume:
                levels[i] = None  # type: ignore[index]
            if self.cell_major:
                self._blocks.append(_to_cells(level, self.grid))
                self._norms.append(_squared_norms(self._blocks[-1]))
            else:
                self._images.append(torch.from_numpy(np.ascontiguousarray(level)))
            del level

    def __len__(self) -> int:
        return self.n_images

    @property
    def nbytes(self) -> int:
        if self.cell_major:
            return sum(t.numel() * t.element_size() for t in (*self._blocks, *self._norms))
        return sum(t.numel() * t.element_size() for t in self._images)

    def images(self, rows: np.ndarray | Sequence[int]) -> list[torch.Tensor]:
        """Per level, the pyramids of ``rows`` in image layout: (K, C, H, W), the bank's dtype."""
        index = torch.as_tensor(np.asarray(rows, dtype=np.int64))
        if not self.cell_major:
            return [level.index_select(0, index) for level in self._images]
        return [_from_cells(blocks, index, shape, self.grid) for blocks, shape in zip(self._blocks, self.shapes)]

    def distances(self, query_levels: list[torch.Tensor], rows: np.ndarray | Sequence[int], match: MatchSettings,
                  chunk_elements: int = DEFAULT_CHUNK_ELEMENTS) -> list[torch.Tensor]:
        """Per level, (H, W, kappa) ascending distances of one query pyramid (C, H, W) to the gallery ``rows``.

        Computed on the query's device; only the gallery data a query compares with is copied there.
        """
        index = torch.as_tensor(np.asarray(rows, dtype=np.int64))
        if match.matching == "coarse-to-fine" and match.margin == 0 and self.cell_major and index.numel() > 0:
            return self._cell_distances(query_levels, index, match.kappa, match.coarse_k, chunk_elements)
        device = query_levels[0].device
        galleries = [g.to(device) for g in self.images(index)]
        return pyramid_distances(query_levels, galleries, match, chunk_elements)

    def gallery_distances(self, query_levels: Sequence[np.ndarray], galleries: Mapping[int, np.ndarray], match: MatchSettings,
                          device: torch.device | str | None = None) -> dict[int, list[torch.Tensor]]:
        """For each query ``b`` of a batch: per level, (H, W, kappa) distances to the bank rows ``galleries[b]``.

        ``query_levels[l]`` is the batch's (B, C, H, W) level in this bank's feature space; rows
        that are negative (missing neighbours) are ignored, and a query with no row gets no entry.
        The matching runs on ``device`` (the backbone's, so a GPU does both); the bank stays in host
        memory and only the gallery data each query compares with is copied over.
        """
        out: dict[int, list[torch.Tensor]] = {}
        for b, rows in galleries.items():
            rows = np.sort(rows[rows >= 0])
            if rows.size == 0:
                continue
            queries = [torch.from_numpy(np.array(level[b], dtype=np.float32)).to(device) for level in query_levels]
            out[int(b)] = self.distances(queries, rows, match)
        return out

    def query_levels(self, rows: np.ndarray | Sequence[int]) -> list[np.ndarray]:
        """The pyramids of ``rows`` as float32 query levels (a bank image scored leave-one-out, as held)."""
        return [level.float().numpy() for level in self.images(rows)]

    def _cell_distances(self, query_levels: list[torch.Tensor], index: torch.Tensor, kappa: int, coarse_k: int,
                        chunk_elements: int) -> list[torch.Tensor]:
        """Coarse-to-fine with margin 0 on the cell-major layout (same answer as ``coarse_to_fine_distances``)."""
        device = query_levels[0].device
        hc, wc = self.grid
        n_cells, n_images = hc * wc, int(index.numel())
        channels = self.shapes[self.coarse][0]
        # coarse level: every query cell against every cell of every gallery image, exactly
        gallery = _take(self._blocks[self.coarse], index, n_cells).reshape(n_images * n_cells, channels)
        gallery = gallery.to(device, torch.float32)
        norms = _take(self._norms[self.coarse], index, n_cells).reshape(1, n_images * n_cells).to(device)
        query = query_levels[self.coarse].float().reshape(channels, n_cells).T
        m, k = min(coarse_k, n_cells), min(kappa, n_images * n_cells)
        cells = torch.empty((n_cells, n_images, m), dtype=torch.long, device=device)
        winners = torch.empty((n_cells, k), dtype=torch.long, device=device)
        step = max(1, chunk_elements // (n_images * n_cells))
        for start in range(0, n_cells, step):
            d2 = torch.addmm(norms, query[start : start + step], gallery.T, beta=1.0, alpha=-2.0)
            per_image = d2.view(-1, n_images, n_cells)
            if m == 1 and k == 1:  # the default: each image's best cell, then the best of those (two cheap passes)
                values, best = per_image.min(dim=2)
                image = values.argmin(dim=1, keepdim=True)
                cells[start : start + step] = best[:, :, None]
                winners[start : start + step] = image * n_cells + best.gather(1, image)
            else:
                cells[start : start + step] = _smallest(per_image, m)
                winners[start : start + step] = _smallest(d2, k)
        coarse = _exact(gallery[winners], query[:, None, :], kappa)  # (Pc, kappa)
        out: list[torch.Tensor] = []
        # finer levels: each query cell's pixels against the pixels under its matched cells
        blocks = (index.to(device)[None, :, None] * n_cells + cells).reshape(n_cells, n_images * m).cpu()
        for level, q in enumerate(query_levels):
            if level == self.coarse:
                out.append(coarse.reshape(hc, wc, kappa))
                continue
            out.append(self._restricted(q.float(), blocks, level, kappa, chunk_elements))
        return out

    def _restricted(self, query: torch.Tensor, blocks: torch.Tensor, level: int, kappa: int,
                    chunk_elements: int) -> torch.Tensor:
        """One finer level: query pixels of each coarse cell against the blocks listed for that cell."""
        channels, height, width = self.shapes[level]
        hc, wc = self.grid
        fy, fx = height // hc, width // wc
        per_cell = fy * fx
        n_cells, n_blocks = blocks.shape
        q = query.reshape(channels, hc, fy, wc, fx).permute(1, 3, 2, 4, 0).reshape(n_cells, per_cell, channels)
        n_candidates = n_blocks * per_cell
        k = min(kappa, n_candidates)
        out = torch.empty((n_cells, per_cell, kappa), device=query.device)
        step = max(1, chunk_elements // (per_cell * max(n_candidates, channels)))
        for start in range(0, n_cells, step):
            chosen = blocks[start : start + step].reshape(-1)
            g = self._blocks[level].index_select(0, chosen).to(query.device, torch.float32)
            g = g.reshape(-1, n_candidates, channels)
            sq = self._norms[level].index_select(0, chosen).to(query.device).reshape(-1, 1, n_candidates)
            qs = q[start : start + step]
            d2 = torch.baddbmm(sq, qs, g.transpose(1, 2), beta=1.0, alpha=-2.0)  # (cells, per_cell, candidates)
            best = _smallest(d2, k)  # (cells, per_cell, k)
            winners = g.gather(1, best.reshape(best.shape[0], -1, 1).expand(-1, -1, channels))
            winners = winners.reshape(*best.shape, channels)
            out[start : start + step] = _exact(winners, qs[:, :, None, :], kappa)
        return out.reshape(hc, wc, fy, fx, kappa).permute(0, 2, 1, 3, 4).reshape(height, width, kappa)


class PyramidBanks:
    """A bank's raw pyramids and, per feature space asked for (aggregate window size), its
    :class:`PyramidBank` (made once, then kept).

    A bank (in-process or one served shard) usually serves one setting: the cost is one pass over
    its pyramids and one laid-out copy of them in memory, beside the raw pyramids.
    """

    def __init__(self, raw: Sequence[np.ndarray]) -> None:
        self.raw = list(raw)
        self._banks: dict[int, PyramidBank] = {}

    def __contains__(self, aggregate: int) -> bool:
        return aggregate in self._banks

    def __call__(self, aggregate: int) -> PyramidBank:
        if aggregate not in self._banks:
            self._banks[aggregate] = PyramidBank(self.raw, aggregate)
        return self._banks[aggregate]


def _to_cells(level: np.ndarray, grid: tuple[int, int]) -> torch.Tensor:
    """(N, C, H, W) -> (N*Pc, fy*fx, C): image, coarse cell (row-major), pixel in cell (row-major), channel."""
    n, channels, height, width = level.shape
    hc, wc = grid
    fy, fx = height // hc, width // wc
    out = torch.empty((n, hc, wc, fy, fx, channels), dtype=torch.from_numpy(level[:0]).dtype)
    for start in range(0, n, _CHUNK_IMAGES):
        part = torch.from_numpy(np.ascontiguousarray(level[start : start + _CHUNK_IMAGES]))
        out[start : start + _CHUNK_IMAGES] = part.reshape(-1, channels, hc, fy, wc, fx).permute(0, 2, 4, 3, 5, 1)
    return out.reshape(n * hc * wc, fy * fx, channels)


def _from_cells(blocks: torch.Tensor, index: torch.Tensor, shape: tuple[int, ...], grid: tuple[int, int]) -> torch.Tensor:
    """Rows ``index`` of a cell-major level back in image layout: (K, C, H, W)."""
    channels, height, width = shape
    hc, wc = grid
    fy, fx = height // hc, width // wc
    cells = _take(blocks, index, hc * wc).reshape(-1, hc, wc, fy, fx, channels)
    return cells.permute(0, 5, 1, 3, 2, 4).reshape(-1, channels, height, width).contiguous()


def _take(cell_major: torch.Tensor, index: torch.Tensor, n_cells: int) -> torch.Tensor:
    """Whole images ``index`` of a cell-major tensor: (K*Pc, ...)."""
    per_image = cell_major.view(-1, n_cells * cell_major[0].numel())
    return per_image.index_select(0, index).reshape(-1, *cell_major.shape[1:])


def _squared_norms(blocks: torch.Tensor) -> torch.Tensor:
    out = torch.empty(blocks.shape[:-1], dtype=torch.float32)
    step = _CHUNK_IMAGES * 64
    for start in range(0, blocks.shape[0], step):
        part = blocks[start : start + step].float()
        out[start : start + step] = (part * part).sum(dim=-1)
    return out


def _smallest(d2: torch.Tensor, k: int) -> torch.Tensor:
    """Indices of the ``k`` smallest entries along the last dimension (argmin when k is 1: cheaper than topk)."""
    if k == 1:
        return d2.min(dim=-1, keepdim=True).indices
    return d2.topk(k, dim=-1, largest=False).indices


def _exact(winners: torch.Tensor, query: torch.Tensor, kappa: int) -> torch.Tensor:
    """Exact distances from ``query`` (..., 1, C) to its ``winners`` (..., k, C), ascending, inf-padded to kappa."""
    exact = torch.linalg.vector_norm(winners.float() - query, dim=-1).sort(dim=-1).values
    if exact.shape[-1] < kappa:
        pad = torch.full((*exact.shape[:-1], kappa - exact.shape[-1]), float("inf"), device=exact.device)
        exact = torch.cat([exact, pad], dim=-1)
    return exact
