"""Coarse-to-fine dense correspondence: the coarse level chooses where the fine levels look.

Exact SPADE compares every pixel of the finest level (stride 4: 3136 pixels at 224 px) with every
pixel of every gallery image (50 x 3136), which costs ten times the backbone's forward pass.  The
pyramid already says where to look: a query cell at the coarsest level (stride 16) is matched
exactly against all coarse cells of the gallery, and then, *in each gallery image separately*, the
``coarse_k`` best-matching coarse cells (plus ``margin`` cells around them) are the only places its
finer-level pixels are compared with.  That is about 20 times less arithmetic at the defaults.

The choice is made per gallery image, never across images, so a bank split over shards gives
exactly the same distances as one gallery: each shard restricts its own images the same way, and
the element-wise minimum of the shards' answers is the single-gallery answer.

The coarsest level's distances are exact.  A finer level's distance is the distance to the nearest
*candidate*, which is never smaller than the exact one; the accuracy cost is measured in the README.
"""

from __future__ import annotations

import math

import torch

from spade_ray.method.correspondence import DEFAULT_CHUNK_ELEMENTS

__all__ = ["DEFAULT_COARSE_K", "DEFAULT_MARGIN", "coarse_to_fine_distances"]

DEFAULT_COARSE_K = 1
# With the default 3x3-aggregated features margin 0 is within 0.3 point of exact on magnetic_tile;
# with raw features (--aggregate 1) it loses 0.8 point of AUPRO there and margin 1 is needed (README).
DEFAULT_MARGIN = 0


def coarse_to_fine_distances(
    query_levels: list[torch.Tensor],
    gallery_levels: list[torch.Tensor],
    kappa: int = 1,
    coarse_k: int = DEFAULT_COARSE_K,
    margin: int = DEFAULT_MARGIN,
    chunk_elements: int = DEFAULT_CHUNK_ELEMENTS,
) -> list[torch.Tensor]:
    """Per level, (H, W, kappa) ascending distances of one query pyramid to a K-image gallery.

    ``query_levels[l]`` is (C_l, H_l, W_l); ``gallery_levels[l]`` is (K, C_l, H_l, W_l) of any float
    dtype.  The level with the smallest spatial size is the coarse one and is searched exactly.
    """
    if coarse_k < 1 or margin < 0:
        raise ValueError(f"coarse_k must be >= 1 and margin >= 0; got {coarse_k}, {margin}")
    coarse = min(range(len(query_levels)), key=lambda i: query_levels[i].shape[1] * query_levels[i].shape[2])
    qc, gc = query_levels[coarse].float(), gallery_levels[coarse]
    channels, hc, wc = qc.shape
    n_images = gc.shape[0]
    if n_images == 0:
        return [torch.full((q.shape[1], q.shape[2], kappa), float("inf"), device=q.device) for q in query_levels]
    # every query coarse cell against every coarse cell of each gallery image: (K, Pc, Nc)
    q_flat = qc.reshape(channels, hc * wc).T.contiguous()
    g_flat = gc.float().permute(0, 2, 3, 1).reshape(n_images, hc * wc, channels)
    d2 = torch.baddbmm((g_flat * g_flat).sum(dim=2)[:, None, :], q_flat.expand(n_images, -1, -1),
                       g_flat.transpose(1, 2), beta=1.0, alpha=-2.0)
    cells = d2.topk(min(coarse_k, hc * wc), dim=2, largest=False).indices  # (K, Pc, m)
    out = []
    for level, (q, g) in enumerate(zip(query_levels, gallery_levels)):
        if level == coarse:
            out.append(_coarse_level(q_flat, g_flat, d2, (hc, wc), kappa))
        else:
            out.append(_restricted_level(q.float(), g, cells, (hc, wc), kappa, margin, chunk_elements))
    return out


def _coarse_level(q_flat: torch.Tensor, g_flat: torch.Tensor, d2: torch.Tensor, shape: tuple[int, int],
                  kappa: int) -> torch.Tensor:
    """The coarse level's exact answer from the distance matrix already computed: (H, W, kappa)."""
    n_images, n_query, n_cells = d2.shape
    flat = d2.permute(1, 0, 2).reshape(n_query, n_images * n_cells)
    k = min(kappa, flat.shape[1])
    rows = flat.topk(k, dim=1, largest=False).indices
    winners = g_flat.reshape(n_images * n_cells, -1)[rows]
    exact = torch.linalg.vector_norm(winners - q_flat[:, None, :], dim=2).sort(dim=1).values
    if k < kappa:
        exact = torch.cat([exact, torch.full((n_query, kappa - k), float("inf"), device=exact.device)], dim=1)
    return exact.reshape(*shape, kappa)


def _restricted_level(
    query: torch.Tensor,
    gallery: torch.Tensor,
    cells: torch.Tensor,
    coarse_shape: tuple[int, int],
    kappa: int,
    margin: int,
    chunk_elements: int,
) -> torch.Tensor:
    """One finer level: each query pixel against the windows of its coarse cell's matches.

    Two kernels give the same distances (tested).  With margin > 0 the windows overlap, and cutting
    each image into windows once (``_restricted_level_windows``) beats gathering the same rows many
    times; with margin 0 nothing is gathered twice, and one gather over all gallery images at once
    is 2-3 times faster than the per-image loop (measured: 14 against 28 ms at stride 4, 6 against
    17 ms at stride 8, 2 threads, 50 images).  A bank laid out by coarse cell
    (:class:`spade_ray.method.pyramid_bank.PyramidBank`) answers margin 0 without either, when its grids
    divide evenly; these kernels serve the other cases.
    """
    channels, height, width = query.shape
    hc, wc = coarse_shape
    if kappa == 1 and margin > 0 and height % hc == 0 and width % wc == 0:
        return _restricted_level_windows(query, gallery, cells, coarse_shape, margin)
    return _restricted_level_gather(query, gallery, cells, coarse_shape, kappa, margin, chunk_elements)


def _restricted_level_windows(
    query: torch.Tensor, gallery: torch.Tensor, cells: torch.Tensor, coarse_shape: tuple[int, int], margin: int
) -> torch.Tensor:
    """kappa = 1 on a grid that divides evenly: one gallery image at a time, its windows cut once.

    Windows of an image are the same for every query, so the image is unfolded into its windows
    once, and each query cell picks its window by index; the working set of one image stays in
    cache, which is what makes this several times faster than gathering rows across all images.
    """
    channels, height, width = query.shape
    hc, wc = coarse_shape
    fy, fx = height // hc, width // wc
    wy, wx = min(height, fy * (1 + 2 * margin)), min(width, fx * (1 + 2 * margin))
    ny, nx = (height - wy) // fy + 1, (width - wx) // fx + 1  # window positions per axis
    # query pixels grouped by coarse cell: (Pc, fy*fx, C)
    q = query.reshape(channels, hc, fy, wc, fx).permute(1, 3, 2, 4, 0).reshape(hc * wc, fy * fx, channels)
    best = torch.full((hc * wc, fy * fx), float("inf"), device=query.device)
    best_row = torch.zeros((hc * wc, fy * fx), dtype=torch.long, device=query.device)
    window_rows = _window_rows(ny, nx, fy, fx, wy, wx, width, query.device)  # (ny*nx, wy*wx) rows of one image
    for k in range(gallery.shape[0]):
        image = gallery[k].float()  # (C, H, W)
        windows = image.unfold(1, wy, fy).unfold(2, wx, fx)  # (C, ny, nx, wy, wx)
        windows = windows.permute(1, 2, 3, 4, 0).reshape(ny * nx, wy * wx, channels)
        norms = (windows * windows).sum(dim=2)
        for choice in range(cells.shape[2]):
            cell = cells[k, :, choice]
            y0, _ = _span(torch.div(cell, wc, rounding_mode="floor"), hc, height, margin)  # the window rule of
            x0, _ = _span(cell % wc, wc, width, margin)  # the gather kernel: windows start on multiples of fy/fx
            pick = torch.div(y0, fy, rounding_mode="floor") * nx + torch.div(x0, fx, rounding_mode="floor")  # (Pc,)
            g = windows[pick]  # (Pc, wy*wx, C)
            d2 = torch.baddbmm(norms[pick][:, None, :], q, g.transpose(1, 2), beta=1.0, alpha=-2.0)
            values, idx = d2.min(dim=2)
            better = values < best
            best = torch.where(better, values, best)
            rows = k * height * width + window_rows[pick].gather(1, idx)
            best_row = torch.where(better, rows, best_row)
    # exact distances for the winners, back on the image grid
    g_flat = gallery.permute(0, 2, 3, 1).reshape(-1, channels)
    exact = torch.linalg.vector_norm(g_flat[best_row.reshape(-1)].float() - q.reshape(-1, channels), dim=1)
    return exact.reshape(hc, wc, fy, fx).permute(0, 2, 1, 3).reshape(height, width, 1)


def _window_rows(ny: int, nx: int, fy: int, fx: int, wy: int, wx: int, width: int, device: torch.device) -> torch.Tensor:
    """Flat pixel rows (y * W + x) of each window of one image: (ny*nx, wy*wx), in unfold order."""
    y = (torch.arange(ny, device=device) * fy)[:, None, None, None] + torch.arange(wy, device=device)[None, None, :, None]
    x = (torch.arange(nx, device=device) * fx)[None, :, None, None] + torch.arange(wx, device=device)[None, None, None, :]
    return (y * width + x).reshape(ny * nx, wy * wx)


def _restricted_level_gather(
    query: torch.Tensor,
    gallery: torch.Tensor,
    cells: torch.Tensor,
    coarse_shape: tuple[int, int],
    kappa: int,
    margin: int,
    chunk_elements: int,
) -> torch.Tensor:
    """Any grid and any kappa: gather every candidate row of every image per query cell."""
    channels, height, width = query.shape
    n_images = gallery.shape[0]
    hc, wc = coarse_shape
    candidates = _candidate_rows(cells, coarse_shape, (height, width), margin)  # (Pc, M) gallery rows
    groups = _pixels_by_cell(coarse_shape, (height, width)).to(query.device)  # (Pc, P) query pixels, -1 padded
    q_flat = query.reshape(channels, height * width).T
    g_flat = gallery.permute(0, 2, 3, 1).reshape(n_images * height * width, channels)
    n_cells, n_cand = candidates.shape
    best_d2 = torch.empty((n_cells, groups.shape[1], kappa), device=query.device)
    best_row = torch.empty((n_cells, groups.shape[1], kappa), dtype=torch.long, device=query.device)
    step = max(1, chunk_elements // max(1, n_cand * max(channels, groups.shape[1])))
    for start in range(0, n_cells, step):
        cand = candidates[start : start + step]
        g = g_flat[cand.reshape(-1)].float().reshape(*cand.shape, channels)
        q = q_flat[groups[start : start + step].clamp_min(0)]
        sq = (g * g).sum(dim=2)
        if kappa > 1:  # overlapping windows repeat rows: count each gallery pixel once
            sq = torch.where(_repeated(cand), torch.full_like(sq, float("inf")), sq)
        d2 = torch.baddbmm(sq[:, None, :], q, g.transpose(1, 2), beta=1.0, alpha=-2.0)
        if kappa == 1:  # the common case: argmin is cheaper than topk
            values, idx = d2.min(dim=2, keepdim=True)
        else:
            k = min(kappa, n_cand)
            values, idx = d2.topk(k, dim=2, largest=False)
            if k < kappa:
                pad = torch.full((*values.shape[:2], kappa - k), float("inf"), device=values.device)
                values = torch.cat([values, pad], dim=2)
                idx = torch.cat([idx, idx[..., :1].expand(-1, -1, kappa - k)], dim=2)
        best_d2[start : start + step] = values
        best_row[start : start + step] = cand.gather(1, idx.reshape(idx.shape[0], -1)).reshape(idx.shape)
    # exact distances for the winners, scattered back to the image grid
    valid = groups >= 0
    pixels, rows, found = groups[valid], best_row[valid], torch.isfinite(best_d2[valid])
    exact = torch.linalg.vector_norm(g_flat[rows].float() - q_flat[pixels][:, None, :], dim=2)
    exact = torch.where(found, exact, torch.full_like(exact, float("inf"))).sort(dim=1).values
    out = torch.empty((height * width, kappa), device=query.device)
    out[pixels] = exact
    return out.reshape(height, width, kappa)


def _span(cell: torch.Tensor, coarse: int, fine: int, margin: int) -> tuple[torch.Tensor, int]:
    """First fine index and length of the window covering coarse ``cell`` plus ``margin`` cells."""
    per_cell = math.ceil(fine / coarse)
    length = min(fine, per_cell * (1 + 2 * margin))
    first = torch.div(cell * fine, coarse, rounding_mode="floor") - margin * per_cell
    return first.clamp(0, fine - length), length


def _candidate_rows(cells: torch.Tensor, coarse_shape: tuple[int, int], fine_shape: tuple[int, int],
                    margin: int) -> torch.Tensor:
    """(K, Pc, m) coarse matches -> (Pc, K*m*wy*wx) flat rows of the (K*H*W) fine gallery."""
    (hc, wc), (height, width) = coarse_shape, fine_shape
    n_images, n_cells, m = cells.shape
    y0, wy = _span(torch.div(cells, wc, rounding_mode="floor"), hc, height, margin)
    x0, wx = _span(cells % wc, wc, width, margin)
    device = cells.device
    ys = y0[..., None, None] + torch.arange(wy, device=device)[:, None]  # (K, Pc, m, wy, 1)
    xs = x0[..., None, None] + torch.arange(wx, device=device)[None, :]  # (K, Pc, m, 1, wx)
    image = torch.arange(n_images, device=device)[:, None, None, None, None]
    rows = (image * height + ys) * width + xs  # (K, Pc, m, wy, wx)
    return rows.permute(1, 0, 2, 3, 4).reshape(n_cells, -1)


def _pixels_by_cell(coarse_shape: tuple[int, int], fine_shape: tuple[int, int]) -> torch.Tensor:
    """(Pc, P) fine pixel indices grouped by the coarse cell that contains them, -1 padded."""
    (hc, wc), (height, width) = coarse_shape, fine_shape
    cy = torch.div(torch.arange(height) * hc, height, rounding_mode="floor")
    cx = torch.div(torch.arange(width) * wc, width, rounding_mode="floor")
    cell = (cy[:, None] * wc + cx[None, :]).reshape(-1)
    order = torch.argsort(cell, stable=True)
    counts = torch.bincount(cell, minlength=hc * wc)
    starts = torch.cumsum(counts, 0) - counts
    slot = torch.arange(cell.numel()) - starts[cell[order]]
    groups = torch.full((hc * wc, int(counts.max())), -1, dtype=torch.long)
    groups[cell[order], slot] = order
    return groups


def _repeated(rows: torch.Tensor) -> torch.Tensor:
    """Mask of entries whose row already appears earlier (by sorted order) in the same line."""
    sorted_rows, order = rows.sort(dim=1)
    dup_sorted = torch.zeros_like(sorted_rows, dtype=torch.bool)
    dup_sorted[:, 1:] = sorted_rows[:, 1:] == sorted_rows[:, :-1]
    return torch.zeros_like(dup_sorted).scatter(1, order, dup_sorted)
