"""A bank laid out by coarse cell answers exactly like the general kernels, for any gallery rows."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from spade_ray.method.aggregation import aggregate_level
from spade_ray.method.correspondence import merge_smallest
from spade_ray.method.matching import MatchSettings, pyramid_distances
from spade_ray.method.pyramid_bank import PyramidBank, PyramidBanks

SHAPES = [(8, 16, 16), (12, 8, 8), (20, 4, 4)]  # strides 4/8/16 of a 64 px input: cell-major
ODD_SHAPES = [(8, 13, 17), (12, 7, 9), (20, 4, 5)]  # not multiples of the coarse grid: image layout


def bank_and_query(seed: int, shapes: list[tuple[int, int, int]], images: int = 7) -> tuple[list[np.ndarray], list[torch.Tensor]]:
    gen = torch.Generator().manual_seed(seed)
    bank = [torch.randn(images, *shape, generator=gen).half().numpy() for shape in shapes]
    query = [torch.randn(*shape, generator=gen) for shape in shapes]
    return bank, query


@pytest.mark.parametrize("shapes, cell_major", [(SHAPES, True), (ODD_SHAPES, False)])
def test_any_rows_read_back_exactly_in_image_layout(shapes: list[tuple[int, int, int]], cell_major: bool) -> None:
    bank, _ = bank_and_query(0, shapes)
    pyramids = PyramidBank(bank)
    assert pyramids.cell_major is cell_major and len(pyramids) == 7
    rows = np.array([5, 0, 3])
    for got, level in zip(pyramids.images(rows), bank):
        assert got.dtype == torch.float16
        np.testing.assert_array_equal(got.numpy(), level[rows])


@pytest.mark.parametrize("matching, margin", [("coarse-to-fine", 0), ("coarse-to-fine", 1), ("exact", 0)])
@pytest.mark.parametrize("kappa, coarse_k", [(1, 1), (3, 1), (1, 2), (2, 3)])
@pytest.mark.parametrize("chunk_elements", [1 << 22, 100])  # one chunk, and many chunks of query cells
def test_distances_equal_the_general_kernels_on_the_same_gallery(matching: str, margin: int, kappa: int, coarse_k: int,
                                                                   chunk_elements: int) -> None:
    bank, query = bank_and_query(1, SHAPES)
    rows = np.array([0, 2, 3, 6])
    gallery = [torch.from_numpy(level[rows]) for level in bank]
    match = MatchSettings(kappa, matching, coarse_k, margin, aggregate=1)
    got = PyramidBank(bank).distances(query, rows, match, chunk_elements)
    want = pyramid_distances(query, gallery, match, chunk_elements)
    for g, w in zip(got, want):
        assert g.shape == w.shape
        torch.testing.assert_close(g, w, rtol=0, atol=0)


@pytest.mark.parametrize("kappa", [1, 2])
def test_shards_of_a_laid_out_bank_merge_to_the_single_bank_answer(kappa: int) -> None:
    bank, query = bank_and_query(2, SHAPES, images=9)
    rows = np.arange(9)
    match = MatchSettings(kappa, "coarse-to-fine", 1, 0, aggregate=1)
    whole = PyramidBank(bank).distances(query, rows, match)
    shards = [PyramidBank([level[part] for level in bank]) for part in (slice(0, 4), slice(4, 9))]
    parts = [shards[0].distances(query, np.arange(4), match), shards[1].distances(query, np.arange(5), match)]
    for level, w in enumerate(whole):
        torch.testing.assert_close(merge_smallest([p[level] for p in parts], kappa), w, rtol=0, atol=0)


def test_a_query_equal_to_a_bank_image_is_at_distance_zero_everywhere() -> None:
    bank, _ = bank_and_query(3, SHAPES)
    query = [torch.from_numpy(level[4].astype(np.float32)) for level in bank]
    for level in PyramidBank(bank).distances(query, np.array([1, 4, 6]), MatchSettings(1, "coarse-to-fine", 1, 0, aggregate=1)):
        assert float(level.max()) == 0.0


def test_the_laid_out_copy_costs_only_the_pixel_norms_beside_the_pyramids() -> None:
    bank, _ = bank_and_query(4, SHAPES)
    pyramids = PyramidBank(bank)
    raw = sum(level.nbytes for level in bank)
    norms = sum(4 * level.shape[0] * level.shape[2] * level.shape[3] for level in bank)  # float32 per pixel
    assert pyramids.nbytes == raw + norms


def test_each_feature_space_is_made_once_and_kept() -> None:
    bank, _ = bank_and_query(5, SHAPES)
    banks = PyramidBanks(bank)
    assert 3 not in banks
    first = banks(3)
    assert 3 in banks and banks(3) is first
    for got, level in zip(first.images(np.arange(7)), bank):
        np.testing.assert_array_equal(got.numpy(), aggregate_level(level, 3))
