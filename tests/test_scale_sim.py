"""The scale simulation at a tiny size, through the same code path as the full run.

4 shard actors on a real local Ray each generate their rows from the seed and serve them with
ShardServer.search (search_exact); RemoteBank.search scatters and merges.  The merged top-K must be
exactly one flat index's top-K: same ids, same distances.
"""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

import numpy as np
import pytest
import ray

pytestmark = pytest.mark.timeout(300)

SCRIPT = Path(__file__).resolve().parents[1] / "benchmarks" / "scale_sim.py"


@pytest.fixture(scope="module")
def scale_sim():
    spec = importlib.util.spec_from_file_location("scale_sim", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    sys.modules["scale_sim"] = module
    spec.loader.exec_module(module)
    yield module
    sys.modules.pop("scale_sim", None)


@pytest.fixture(scope="module")
def local_ray():
    ray.init(num_cpus=2, include_dashboard=False, object_store_memory=128 * 2**20)
    yield
    ray.shutdown()


def test_generator_is_the_same_whoever_makes_which_rows(scale_sim) -> None:
    mixture = scale_sim.Mixture(scale_sim.MixtureSpec(dim=16, n_clusters=10, seed=4))
    whole = mixture.rows(0, 20_000)
    pieces = np.concatenate([scale_sim.Mixture(mixture.spec).rows(a, b) for a, b in scale_sim.shard_bounds(20_000, 3)])
    np.testing.assert_array_equal(whole, pieces)
    assert not np.isin(mixture.queries(5)[:, 0], whole[:, 0]).any()  # queries are never bank rows


def test_scatter_gather_equals_one_flat_index(scale_sim, local_ray) -> None:
    report = scale_sim.simulate(n=20_000, shards=4, dim=64, k=50, n_queries=60, n_latency=3, n_batches=2,
                                num_cpus=0.25, sub_n=0, log=lambda *_: None)
    check = report["check"]
    assert check["ids_equal"] and check["distances_equal"], check
    shards = report["sharded"]["shards"]
    assert [s["rows"] for s in shards] == [5000] * 4 and len({s["pid"] for s in shards}) == 4
    assert all(s["index_bytes"] == 5000 * 64 * 4 for s in shards)
    assert report["sharded"]["bytes_per_query"]["raw"] == {"query": 64 * 4, "answer": 50 * (8 + 8)}


def test_flat_ivf_hnsw_comparison_runs_and_flat_is_exact(scale_sim) -> None:
    spec = scale_sim.MixtureSpec(dim=32, n_clusters=20)
    queries = scale_sim.Mixture(spec).queries(20)
    rows = scale_sim.compare_indexes(spec, 3000, queries, 10, nprobes=[1, 55, 1000], efs=[32], hnsw_m=8,
                                     ef_construction=40, n_latency=2, log=lambda *_: None)
    by = {(r["index"], r.get("nprobe"), r.get("efSearch")): r for r in rows}
    assert by[("Flat", None, None)]["recall@10"] == 1.0
    assert by[("IVFFlat", 55, None)]["nlist"] == 55  # round(sqrt(3000))
    assert by[("IVFFlat", 55, None)]["recall@10"] == 1.0  # every list probed: exact
    assert ("IVFFlat", 1000, None) not in by  # nprobe above nlist is skipped
    assert ("HNSWFlat", None, 32) in by
    assert all(0 < r["recall@10"] <= 1 for r in rows)
