"""Global-vector retrieval: exact kNN, leave-one-out, and shard merging."""

from __future__ import annotations

import numpy as np

from spade_ray.method.retrieval import GlobalIndex, merge_topk


def test_search_returns_euclidean_distances_in_order() -> None:
    rng = np.random.default_rng(0)
    bank = rng.normal(size=(50, 8)).astype(np.float32)
    queries = rng.normal(size=(5, 8)).astype(np.float32)
    dist, ids = GlobalIndex(bank).search(queries, 4)
    full = np.linalg.norm(queries[:, None] - bank[None], axis=2)
    np.testing.assert_array_equal(ids, np.argsort(full, axis=1)[:, :4])
    np.testing.assert_allclose(dist, np.sort(full, axis=1)[:, :4], rtol=1e-4)


def test_leave_one_out_never_returns_the_query_itself() -> None:
    rng = np.random.default_rng(1)
    bank = rng.normal(size=(10, 4)).astype(np.float32)
    dist, ids = GlobalIndex(bank).search(bank[[2, 7]], 3, exclude=np.array([2, 7]))
    assert 2 not in ids[0] and 7 not in ids[1]
    assert (dist > 0).all()


def test_more_neighbours_than_bank_pads_with_inf() -> None:
    dist, ids = GlobalIndex(np.eye(2, dtype=np.float32)).search(np.zeros((1, 2), np.float32), 4)
    assert ids[0, 2:].tolist() == [-1, -1] and np.isinf(dist[0, 2:]).all()


def test_merging_shard_topk_equals_one_index() -> None:
    rng = np.random.default_rng(2)
    bank = rng.normal(size=(300, 16)).astype(np.float32)
    queries = rng.normal(size=(7, 16)).astype(np.float32)
    bounds = [0, 90, 200, 300]
    parts = []
    for lo, hi in zip(bounds[:-1], bounds[1:]):
        d, local = GlobalIndex(bank[lo:hi]).search(queries, 5)
        parts.append((d, local + lo))
    d_all, ids_all = GlobalIndex(bank).search(queries, 5)
    d_merged, ids_merged = merge_topk(parts, 5)
    np.testing.assert_array_equal(ids_merged, ids_all)
    np.testing.assert_allclose(d_merged, d_all, rtol=1e-6)


def test_near_ties_are_ordered_by_exact_distance_then_row() -> None:
    base = np.zeros((1, 4), np.float32)
    bank = np.array([[1, 0, 0, 0], [0, 1, 0, 0], [0, 0, 1, 0], [2, 0, 0, 0]], np.float32)  # three exact ties
    dist, ids = GlobalIndex(bank).search(base, 3)
    assert ids[0].tolist() == [0, 1, 2] and np.allclose(dist, 1.0)


def test_shards_merge_by_the_exact_distance_not_a_float32_rounding_of_it() -> None:
    query = np.zeros((1, 2), np.float32)
    bank = np.array([[1, 1e-4], [1, 0]], np.float32)  # distances 1 + 5e-9 and 1: equal in float32
    whole = GlobalIndex(bank).search(query, 1)
    assert whole[1].tolist() == [[1]]
    parts = [GlobalIndex(bank[:1]).search(query, 1), GlobalIndex(bank[1:]).search(query, 1)]
    parts[1] = (parts[1][0], parts[1][1] + 1)
    merged = merge_topk(parts, 1)
    assert merged[1].tolist() == [[1]]  # rounded to float32 the tie would go to row 0


def test_a_sharded_bank_serves_the_same_neighbours_as_one_index() -> None:
    import faiss

    from spade_ray.bank.shard_loader import BankShard
    from spade_ray.bank.shard_server import ShardServer
    from spade_ray.method.retrieval import merge_topk

    rng = np.random.default_rng(5)
    bank = rng.normal(size=(120, 32)).astype(np.float32)
    queries = bank[[3, 50, 99]] + rng.normal(scale=0.01, size=(3, 32)).astype(np.float32)
    servers, offset = [], 0
    for part in np.array_split(np.arange(120), 3):
        index = faiss.IndexFlatL2(32)
        index.add(bank[part])
        shard = BankShard(f"s{offset}", [str(i) for i in part], [""] * len(part), bank[part], [], index)
        servers.append(ShardServer.from_shard(shard, offset))
        offset += len(part)
    exclude = np.array([3, 50, 99])
    merged = merge_topk([s.search(queries, 10, exclude) for s in servers], 10)
    whole = GlobalIndex(bank).search(queries, 10, exclude)
    np.testing.assert_array_equal(merged[1], whole[1])
    np.testing.assert_array_equal(merged[0], whole[0])
    assert all(e not in row for e, row in zip(exclude, merged[1]))  # each query's own image is left out
