"""The correspondence kernel equals a brute-force all-pairs search, whatever the chunking."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from spade_ray.method.correspondence import level_nearest_distances, merge_smallest, nearest_distances
from spade_ray.method.fusion import fuse_levels
from spade_ray.method.image_scoring import knn_score


def brute_force(query: torch.Tensor, gallery: torch.Tensor, kappa: int) -> torch.Tensor:
    d = torch.cdist(query.double(), gallery.double())  # (Q, G), exact in float64
    return d.sort(dim=1).values[:, :kappa].float()


@pytest.mark.parametrize("kappa", [1, 3])
@pytest.mark.parametrize("chunk", [7, 64, 1 << 20])
def test_nearest_distances_match_all_pairs(kappa: int, chunk: int) -> None:
    gen = torch.Generator().manual_seed(0)
    query = torch.randn(37, 16, generator=gen)
    gallery = torch.randn(211, 16, generator=gen)
    got = nearest_distances(query, gallery, kappa=kappa, chunk_elements=chunk)
    torch.testing.assert_close(got, brute_force(query, gallery, kappa), rtol=1e-5, atol=1e-5)


def test_float16_gallery_is_upcast_not_truncated() -> None:
    gen = torch.Generator().manual_seed(1)
    query = torch.randn(20, 8, generator=gen)
    gallery = torch.randn(50, 8, generator=gen).half()
    got = nearest_distances(query, gallery, kappa=2)
    torch.testing.assert_close(got, brute_force(query, gallery.float(), 2), rtol=1e-5, atol=1e-5)


def test_exact_distance_for_near_duplicates_with_large_norms() -> None:
    # |q|^2 + |g|^2 - 2qg cancels catastrophically here; the kernel recomputes winners exactly
    base = torch.full((1, 64), 100.0)
    gallery = torch.cat([base + 1e-3, base + 5.0])
    got = nearest_distances(base, gallery, kappa=1)
    assert got.item() == pytest.approx(1e-3 * 8, rel=1e-3)


def test_missing_neighbours_are_inf() -> None:
    got = nearest_distances(torch.zeros(2, 3), torch.ones(1, 3), kappa=3)
    assert torch.isinf(got[:, 1:]).all() and torch.allclose(got[:, 0], torch.full((2,), 3**0.5))


def test_level_distances_cover_every_pixel_of_every_gallery_image() -> None:
    gen = torch.Generator().manual_seed(2)
    query = torch.randn(5, 6, 7, generator=gen)       # C, H, W
    gallery = torch.randn(3, 5, 6, 7, generator=gen)  # K, C, H, W
    got = level_nearest_distances(query, gallery, kappa=2)
    assert got.shape == (6, 7, 2)
    flat_q = query.reshape(5, -1).T
    flat_g = gallery.permute(0, 2, 3, 1).reshape(-1, 5)
    torch.testing.assert_close(got.reshape(-1, 2), brute_force(flat_q, flat_g, 2), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("kappa", [1, 4])
def test_merging_shards_equals_one_gallery(kappa: int) -> None:
    gen = torch.Generator().manual_seed(3)
    query = torch.randn(30, 10, generator=gen)
    shards = [torch.randn(n, 10, generator=gen) for n in (40, 2, 25)]
    parts = [nearest_distances(query, s, kappa) for s in shards]
    whole = nearest_distances(query, torch.cat(shards), kappa)
    torch.testing.assert_close(merge_smallest(parts, kappa), whole)


def test_fusion_upsamples_averages_and_smooths() -> None:
    flat = fuse_levels([torch.ones(4, 4), torch.full((2, 2), 3.0)], size=16, sigma=4.0)
    assert flat.shape == (16, 16) and np.allclose(flat, 2.0)
    spike = torch.zeros(8, 8)
    spike[4, 4] = 1.0
    sharp = fuse_levels([spike], size=32, sigma=0)
    smooth = fuse_levels([spike], size=32, sigma=4.0)
    assert smooth.max() < sharp.max() and smooth.sum() == pytest.approx(sharp.sum(), rel=1e-3)


def test_image_score_is_mean_of_k_nearest() -> None:
    d = np.array([[1.0, 2.0, 6.0], [0.0, 0.0, 3.0]])
    assert knn_score(d, 2).tolist() == [1.5, 0.0]
    with pytest.raises(ValueError):
        knn_score(d, 4)
