"""Coarse-to-fine matching: exact where it searches everything, never below exact, shard-splittable."""

from __future__ import annotations

import pytest
import torch

from spade_ray.method.coarse_to_fine import coarse_to_fine_distances
from spade_ray.method.correspondence import level_nearest_distances, merge_smallest
from spade_ray.method.matching import MatchSettings, pyramid_distances


def pyramid(gen: torch.Generator, images: int | None, shapes: list[tuple[int, int, int]]) -> list[torch.Tensor]:
    lead = () if images is None else (images,)
    return [torch.randn(*lead, *shape, generator=gen) for shape in shapes]


SHAPES = [(8, 16, 16), (12, 8, 8), (20, 4, 4)]  # strides 4/8/16 of a 64 px input
ODD_SHAPES = [(8, 13, 17), (12, 7, 9), (20, 4, 5)]  # sizes that are not multiples of the coarse grid


def exact(query: list[torch.Tensor], gallery: list[torch.Tensor], kappa: int) -> list[torch.Tensor]:
    return [level_nearest_distances(q, g, kappa) for q, g in zip(query, gallery)]


@pytest.mark.parametrize("shapes", [SHAPES, ODD_SHAPES])
@pytest.mark.parametrize("kappa", [1, 3])
def test_searching_every_coarse_cell_is_exact(shapes: list[tuple[int, int, int]], kappa: int) -> None:
    gen = torch.Generator().manual_seed(0)
    query, gallery = pyramid(gen, None, shapes), pyramid(gen, 5, shapes)
    cells = shapes[-1][1] * shapes[-1][2]
    got = coarse_to_fine_distances(query, gallery, kappa, coarse_k=cells, margin=0)
    for g, e in zip(got, exact(query, gallery, kappa)):
        torch.testing.assert_close(g, e, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("kappa", [1, 3])
def test_a_margin_covering_the_image_is_exact_and_counts_each_pixel_once(kappa: int) -> None:
    gen = torch.Generator().manual_seed(1)
    query, gallery = pyramid(gen, None, SHAPES), pyramid(gen, 4, SHAPES)
    got = coarse_to_fine_distances(query, gallery, kappa, coarse_k=2, margin=8)
    for g, e in zip(got, exact(query, gallery, kappa)):
        torch.testing.assert_close(g, e, rtol=1e-5, atol=1e-5)


def test_restricted_search_never_beats_exact_and_coarse_level_is_exact() -> None:
    gen = torch.Generator().manual_seed(2)
    query, gallery = pyramid(gen, None, SHAPES), pyramid(gen, 6, SHAPES)
    got = coarse_to_fine_distances(query, gallery, kappa=1)
    ref = exact(query, gallery, 1)
    torch.testing.assert_close(got[-1], ref[-1], rtol=1e-5, atol=1e-5)
    for g, e in zip(got[:-1], ref[:-1]):
        assert bool((g >= e - 1e-5).all())


def test_a_normal_query_finds_its_twin_at_the_corresponding_place() -> None:
    # the query is gallery image 2 plus tiny noise: every pixel's true match is at its own position
    gen = torch.Generator().manual_seed(3)
    gallery = pyramid(gen, 5, SHAPES)
    query = [g[2] + 1e-3 * torch.randn(g[2].shape, generator=gen) for g in gallery]
    for level in coarse_to_fine_distances(query, gallery, kappa=1):
        assert float(level.max()) < 0.01


@pytest.mark.parametrize("kappa", [1, 2])
def test_shards_merge_to_the_single_gallery_answer(kappa: int) -> None:
    gen = torch.Generator().manual_seed(4)
    query, gallery = pyramid(gen, None, SHAPES), pyramid(gen, 7, SHAPES)
    match = MatchSettings(kappa, "coarse-to-fine", coarse_k=2, margin=1, aggregate=1)
    whole = pyramid_distances(query, gallery, match)
    parts = [pyramid_distances(query, [g[rows] for g in gallery], match)
             for rows in (slice(0, 3), slice(3, 7))]
    for level, w in enumerate(whole):
        torch.testing.assert_close(merge_smallest([p[level] for p in parts], kappa), w, rtol=1e-5, atol=1e-5)


def test_unknown_matching_is_refused() -> None:
    with pytest.raises(ValueError, match="unknown matching"):
        MatchSettings(matching="nearest-ish")


def test_exact_matching_equals_the_published_reference_loop() -> None:
    from spade_ray.method.reference import reference_level_distances

    gen = torch.Generator().manual_seed(5)
    query, gallery = pyramid(gen, None, SHAPES), pyramid(gen, 3, SHAPES)
    for q, g, got in zip(query, gallery, pyramid_distances(query, gallery, MatchSettings(1, "exact", aggregate=1))):
        torch.testing.assert_close(got[..., 0], reference_level_distances(q, g), rtol=1e-5, atol=1e-5)


def test_the_per_image_window_kernel_equals_the_general_gather_kernel() -> None:
    from spade_ray.method.coarse_to_fine import _restricted_level_gather, _restricted_level_windows

    gen = torch.Generator().manual_seed(6)
    query, gallery = pyramid(gen, None, SHAPES), pyramid(gen, 5, SHAPES)
    cells = torch.randint(0, 16, (5, 16, 2), generator=gen)
    for margin in (0, 1):
        fast = _restricted_level_windows(query[0], gallery[0], cells, (4, 4), margin)
        general = _restricted_level_gather(query[0], gallery[0], cells, (4, 4), 1, margin, 1 << 20)
        torch.testing.assert_close(fast, general, rtol=1e-5, atol=1e-5)
