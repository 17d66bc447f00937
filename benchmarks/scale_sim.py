"""Scale simulation: a sharded bank of 10^6 synthetic global vectors served by Ray actors.

    PYTHONPATH=. nice -n 10 python benchmarks/scale_sim.py --json benchmarks/results/scale_sim.json   # ~11 min on 2 cores
    PYTHONPATH=. python benchmarks/scale_sim.py --n 20000 --dim 64 --sub-n 5000                        # a quick run
    PYTHONPATH=. python benchmarks/scale_sim.py --scan-rates     # one shard's flat search, batches, BLAS threshold

Results and their reading: docs/scaling.md.  Peak memory at the defaults: ~2 GiB per shard actor
while they run, then ~6 GiB in the driver alone.

What it does, in order:

1. **Sharded bank.**  ``--shards`` Ray actors (fractional CPUs, so they fit a 2-CPU machine) each
   generate their own contiguous rows of the bank deterministically from the seed (nothing big goes
   through the driver) straight into a FAISS flat index, and serve them with the project's own
   retrieval code: each actor is a :class:`spade_ray.bank.shard_server.ShardServer` over a
   :class:`spade_ray.bank.store.BankShard` (global vectors only, no pyramids), so ``search`` is
   ``search_exact`` (FAISS proposes k+8, exact float64 rerank, ties by row) and the driver's
   scatter-gather is :meth:`spade_ray.distributed.remote_bank.RemoteBank.search` (``merge_topk``).
   Measured: build time, RSS of every actor (``/proc/<pid>/status`` VmRSS and VmHWM, before and
   after its build), index bytes, query latency (p50/p95 per query and per batch of 16) and the
   bytes each query moves (size of the arguments and of each shard's answer as Ray serialises them, cloudpickle protocol 5).
2. **One flat index.**  After the actors are gone the driver builds one flat index over all rows
   (the same generator, so the same vectors) and checks that the scatter-gather top-K equals its
   ``search_exact`` top-K: ids exactly, distances exactly.
3. **Flat vs IVF vs HNSW** on a sub-bank (``--sub-n`` first rows): build time, index bytes, latency
   per query (one thread) and recall@K of FAISS ``IndexIVFFlat`` (several nprobe) and
   ``IndexHNSWFlat`` (several efSearch) used through ``search_exact`` (they propose k+8 candidates,
   the exact rerank orders them), against the exact top-K.

The synthetic vectors (see :class:`Mixture`) are a mixture of Gaussians calibrated to real lite0
global vectors (magnetic_tile bank: mean vector norm 13.9, total variance 37.2, 90% of it in 32
principal components): a bank of 10^6 images holds many products, cameras and lines, so clusters of
unequal size (Zipf weights), each cluster with its own low-rank spread plus a little isotropic noise.
Uniform noise would be a worst case for approximate indexes (no structure to exploit) and nothing
like CNN features.  The script reports the generated sample's statistics next to the real ones.

Memory: every vector is held once per process (the flat index's own storage, viewed as the
``vectors`` array that the rerank reads), so 10^6 x 1280 float32 = 5.1 GB is held by the actors
while they run and by the driver while it checks, never both at once.
"""

from __future__ import annotations

import argparse
import gc
import json
import logging
import os
import sys
import time
from dataclasses import asdict
from pathlib import Path
from typing import Any

import faiss
import numpy as np

from spade_ray.method.retrieval import RERANK_MARGIN, search_exact

# The synthetic bank and the printed tables are modules next to this script; loaded from a file
# (as the tests do), the script's folder is not on the import path.
if str(Path(__file__).resolve().parent) not in sys.path:
    sys.path.append(str(Path(__file__).resolve().parent))
import scale_sim_bank  # noqa: E402
from scale_sim_bank import Mixture, MixtureSpec, SimShard, data_stats, flat_index, proc_memory, shard_bounds  # noqa: E402
from scale_sim_report import print_table  # noqa: E402

__all__ = ["Mixture", "MixtureSpec", "compare_indexes", "scan_rates", "shard_bounds", "simulate"]

# ------------------------------------------------------------------------------------------ phases


def pct(values: list[float]) -> dict[str, float]:
    v = np.asarray(values) * 1000
    return {"p50_ms": float(np.percentile(v, 50)), "p95_ms": float(np.percentile(v, 95)), "mean_ms": float(v.mean()), "n": len(v)}


def run_sharded(spec: MixtureSpec, n: int, shards: int, queries: np.ndarray, k: int, n_latency: int,
                n_batches: int, batch: int, num_cpus: float, log=print, blas_threshold: int | None = None) -> dict[str, Any]:
    """Start the shard actors, measure, and return the scatter-gather top-k of ``queries``."""
    import ray

    from spade_ray.distributed.remote_bank import RemoteBank
    from spade_ray.distributed.shard_actors import ServedBank

    # the workers need not find the benchmarks folder: the shard actor's module travels with it
    ray.cloudpickle.register_pickle_by_value(scale_sim_bank)
    actor_cls = ray.remote(num_cpus=num_cpus)(SimShard)
    bounds = shard_bounds(n, shards)
    t0 = time.perf_counter()
    actors = [actor_cls.remote(spec, a, b, 1, blas_threshold) for a, b in bounds]
    try:
        stats = ray.get([a.stats.remote() for a in actors])
        build_wall = time.perf_counter() - t0
        log(f"built {shards} shards of ~{n // shards} rows in {build_wall:.1f} s")
        bank = ServedBank("sim://", {"shards": [{"n_images": b - a} for a, b in bounds]}, actors,
                          [a for a, _ in bounds], [b - a for a, b in bounds])
        client = RemoteBank(bank, aggregate=1)
        client.search(queries[:1], k)  # warm up every actor's code path

        t0 = time.perf_counter()
        dist, ids = client.search(queries, k)  # the batch checked against the flat index
        check_s = time.perf_counter() - t0
        single = []
        for q in queries[:n_latency]:
            t0 = time.perf_counter()
            client.search(q[None], k)
            single.append(time.perf_counter() - t0)
        batched = []
        for i in range(n_batches):
            qb = queries[(i * batch) % len(queries):][:batch]
            t0 = time.perf_counter()
            client.search(qb, k)
            batched.append(time.perf_counter() - t0)
        inside = [ray.get(a.timed_search.remote(queries[:1], k))[2] for a in actors for _ in range(3)]
        log(f"latency: 1 query p50 {np.median(single) * 1e3:.0f} ms, batch of {batch} p50 {np.median(batched) * 1e3:.0f} ms")

        answer = ray.get(actors[0].search.remote(queries[:1], k))
        bytes_in = len(ray.cloudpickle.dumps((queries[:1], k, None), protocol=5))
        bytes_out = len(ray.cloudpickle.dumps(answer, protocol=5))
        stats = ray.get([a.stats.remote() for a in actors])  # peak RSS after all the queries
    finally:
        for a in actors:
            ray.kill(a)
    _wait_gone([sh["pid"] for sh in stats])  # their memory is free before the driver builds the reference
    return {
        "ids": ids, "dist": dist,
        "build_wall_s": build_wall,
        "shards": stats,
        "latency_single": pct(single),
        "latency_batch": {**pct(batched), "batch": batch},
        "batch_of_checked_queries_s": check_s, "n_checked_queries": len(queries),
        "shard_search_inside_actor_ms": {"p50": float(np.median(inside) * 1e3), "rows_per_shard": int(n / shards)},
        "bytes_per_query": {"to_each_shard": bytes_in, "from_each_shard": bytes_out,
                            "total": shards * (bytes_in + bytes_out),
                            "raw": {"query": int(queries[:1].nbytes), "answer": int(answer[0].nbytes + answer[1].nbytes)}},
    }


def _wait_gone(pids: list[int], timeout: float = 60.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline and any(os.path.exists(f"/proc/{pid}") for pid in pids):
        time.sleep(0.5)


def run_reference(spec: MixtureSpec, n: int, queries: np.ndarray, k: int, log=print) -> dict[str, Any]:
    """One flat index over all n rows, in this process; its exact top-k of ``queries``."""
    before = proc_memory()
    t0 = time.perf_counter()
    index, vectors = flat_index(Mixture(spec), 0, n)
    build_s = time.perf_counter() - t0
    t0 = time.perf_counter()
    dist, ids = search_exact(index, vectors, queries, k)
    search_s = time.perf_counter() - t0
    after = proc_memory()
    log(f"flat reference over {n} rows: built in {build_s:.1f} s, {len(queries)} queries in {search_s:.1f} s")
    del index, vectors
    gc.collect()
    return {"ids": ids, "dist": dist, "build_s": build_s, "search_s": search_s,
            "rss_before": before["VmRSS"], "rss_after": after["VmRSS"], "hwm": after["VmHWM"]}


class _IndexBench:
    """Measures one index of the comparison against the exact top-k of the same queries over the same vectors."""

    def __init__(self, vectors: np.ndarray, queries: np.ndarray, true_ids: np.ndarray, k: int, n_latency: int,
                 log=print) -> None:
        self.vectors, self.queries, self.true_ids = vectors, queries, true_ids
        self.k, self.n_latency, self.log = k, n_latency, log

    def measure(self, name: str, index: faiss.Index, build_s: float, params: dict[str, Any], nbytes: int) -> dict[str, Any]:
        """Recall and per-query latency of ``index`` used through ``search_exact``; logs and returns its row."""
        k, queries = self.k, self.queries
        _, found = search_exact(index, self.vectors, queries, k)
        recall = float(np.mean([len(set(found[i]) & set(self.true_ids[i])) / k for i in range(len(queries))]))
        exact_rows = float(np.mean((found == self.true_ids).all(axis=1)))
        times = []
        for q in queries[: self.n_latency]:
            t = time.perf_counter()
            search_exact(index, self.vectors, q[None], k)
            times.append(time.perf_counter() - t)
        row = {"index": name, **params, "build_s": build_s, "index_bytes": nbytes, "bytes_per_vector": nbytes / len(self.vectors),
               f"recall@{k}": recall, "queries_exact": exact_rows, "latency": pct(times)}
        self.log(f"  {name:9s} {json.dumps(params):28s} build {build_s:7.1f} s  {nbytes / 2**20:8.1f} MiB  "
                 f"recall@{k} {recall:.4f}  p50 {row['latency']['p50_ms']:.2f} ms")
        return row


def _ivf_rows(bench: _IndexBench, nprobes: list[int]) -> list[dict[str, Any]]:
    """IVFFlat with sqrt(n) lists, trained on a spread sample; one row per nprobe up to nlist."""
    vectors = bench.vectors
    sub_n, d = vectors.shape
    nlist = max(1, int(round(np.sqrt(sub_n))))
    quantizer = faiss.IndexFlatL2(d)
    ivf = faiss.IndexIVFFlat(quantizer, d, nlist, faiss.METRIC_L2)
    t0 = time.perf_counter()
    train = vectors[np.linspace(0, sub_n - 1, min(sub_n, 40 * nlist)).astype(int)]
    ivf.train(train)
    ivf.add(vectors)
    ivf_build = time.perf_counter() - t0
    ivf_bytes = len(faiss.serialize_index(ivf))
    rows = []
    for nprobe in nprobes:
        if nprobe <= nlist:
            ivf.nprobe = nprobe
            rows.append(bench.measure("IVFFlat", ivf, ivf_build, {"nlist": nlist, "nprobe": nprobe}, ivf_bytes))
    del ivf, quantizer
    gc.collect()
    return rows


def _hnsw_rows(bench: _IndexBench, hnsw_m: int, ef_construction: int, efs: list[int]) -> list[dict[str, Any]]:
    """HNSWFlat built once; one row per efSearch."""
    hnsw = faiss.IndexHNSWFlat(bench.vectors.shape[1], hnsw_m)
    hnsw.hnsw.efConstruction = ef_construction
    t0 = time.perf_counter()
    hnsw.add(bench.vectors)
    hnsw_build = time.perf_counter() - t0
    hnsw_bytes = len(faiss.serialize_index(hnsw))
    rows = []
    for ef in efs:
        hnsw.hnsw.efSearch = ef
        params = {"M": hnsw_m, "efConstruction": ef_construction, "efSearch": ef}
        rows.append(bench.measure("HNSWFlat", hnsw, hnsw_build, params, hnsw_bytes))
    return rows


def compare_indexes(spec: MixtureSpec, sub_n: int, queries: np.ndarray, k: int, nprobes: list[int],
                    efs: list[int], hnsw_m: int, ef_construction: int, n_latency: int, log=print) -> list[dict[str, Any]]:
    """Flat vs IVFFlat vs HNSWFlat on the first ``sub_n`` rows, one thread, through ``search_exact``."""
    faiss.omp_set_num_threads(1)
    t0 = time.perf_counter()
    flat, vectors = flat_index(Mixture(spec), 0, sub_n)
    flat_build = time.perf_counter() - t0
    _, true_ids = search_exact(flat, vectors, queries, k)
    bench = _IndexBench(vectors, queries, true_ids, k, n_latency, log)
    results = [bench.measure("Flat", flat, flat_build, {}, sub_n * spec.dim * 4)]
    results += _ivf_rows(bench, nprobes)
    results += _hnsw_rows(bench, hnsw_m, ef_construction, efs)
    del bench, flat, vectors
    gc.collect()
    return results


def scan_rates(spec: MixtureSpec, rows: int, k: int, batches: tuple[int, ...] = (1, 16, 64),
               thresholds: tuple[int, ...] | None = None, repeats: int = 3, log=print) -> list[dict[str, Any]]:
    """Seconds per search_exact call on one shard of ``rows`` vectors, one thread, in this process.

    FAISS 1.15 computes a batch's distances with one BLAS pass over the vectors when
    queries x dim >= ``distance_compute_blas_threshold`` (default 128,000: 100 queries at 1280-d), and
    otherwise scans all the vectors once per query.  Thresholds tried: 0 = FAISS's default, 20
    (always BLAS), 16 x dim (BLAS from 16 queries on).
    """
    faiss.omp_set_num_threads(1)
    default = int(faiss.cvar.distance_compute_blas_threshold)
    if thresholds is None:
        thresholds = (0, 20, 16 * spec.dim)
    index, vectors = flat_index(Mixture(spec), 0, rows)
    queries = Mixture(spec).queries(max(batches))
    out = []
    try:
        for threshold in thresholds:
            faiss.cvar.distance_compute_blas_threshold = threshold or default
            for b in batches:
                times = []
                for _ in range(repeats):
                    t0 = time.perf_counter()
                    search_exact(index, vectors, queries[:b], k)
                    times.append(time.perf_counter() - t0)
                t = float(np.median(times))
                row = {"rows": rows, "batch": b, "blas_threshold": threshold or default, "median_s": t,
                       "ns_per_query_vector": t / (b * rows) * 1e9, "loadavg": os.getloadavg()[0]}
                log(f"  rows {rows:,} batch {b:3d} blas_threshold {row['blas_threshold']:6d}: {t * 1e3:8.1f} ms "
                    f"({row['ns_per_query_vector']:.0f} ns per query-vector)")
                out.append(row)
    finally:
        faiss.cvar.distance_compute_blas_threshold = default
    return out


def simulate(n: int = 1_000_000, shards: int = 4, dim: int = 1280, k: int = 50, n_queries: int = 200,
             n_latency: int = 40, n_batches: int = 10, batch: int = 16, num_cpus: float = 0.25,
             sub_n: int | None = 100_000, nprobes: tuple[int, ...] = (1, 4, 16, 64), efs: tuple[int, ...] = (64, 128, 256),
             hnsw_m: int = 32, ef_construction: int = 80, n_clusters: int | None = None, seed: int = 0,
             blas_threshold: int | None = None, log=print) -> dict[str, Any]:
    """The whole simulation; expects Ray to be initialised.  Returns the JSON-able report."""
    default_threshold = int(faiss.cvar.distance_compute_blas_threshold)
    if blas_threshold is not None:  # the driver's flat reference too
        faiss.cvar.distance_compute_blas_threshold = blas_threshold
    spec = MixtureSpec(dim=dim, n_clusters=n_clusters or max(10, min(1000, n // 1000)), seed=seed)
    mixture = Mixture(spec)
    queries = mixture.queries(n_queries)
    report: dict[str, Any] = {"n": n, "shards": shards, "dim": dim, "k": k, "n_queries": n_queries,
                              "spec": asdict(spec), "rerank_margin": RERANK_MARGIN, "cpus": os.cpu_count(),
                              "loadavg_start": os.getloadavg(), "blas_threshold": blas_threshold,
                              "faiss_default_blas_threshold": default_threshold}
    report["data_stats"] = {"one_cluster": data_stats(mixture.one_cluster(0, 762)),
                            "bank_sample": data_stats(mixture.rows(0, min(n, 4096)))}
    del mixture
    gc.collect()

    sharded = run_sharded(spec, n, shards, queries, k, n_latency, n_batches, batch, num_cpus, log, blas_threshold)
    reference = run_reference(spec, n, queries, k, log)
    ids_equal = bool(np.array_equal(sharded["ids"], reference["ids"]))
    dist_equal = bool(np.array_equal(sharded["dist"], reference["dist"]))
    report["check"] = {"queries": n_queries, "k": k, "ids_equal": ids_equal, "distances_equal": dist_equal,
                       "rows_differing": int((sharded["ids"] != reference["ids"]).any(axis=1).sum()),
                       "max_abs_dist_diff": float(np.abs(sharded["dist"].astype(np.float64) - reference["dist"]).max())}
    log(f"scatter-gather == one flat index: ids {ids_equal}, distances {dist_equal}")
    report["sharded"] = {key: v for key, v in sharded.items() if key not in ("ids", "dist")}
    report["reference"] = {key: v for key, v in reference.items() if key not in ("ids", "dist")}
    if sub_n:
        log(f"Flat vs IVF vs HNSW on {min(sub_n, n)} rows, {n_queries} queries, one thread:")
        report["index_comparison"] = {"sub_n": min(sub_n, n), "threads": 1, "results": compare_indexes(
            spec, min(sub_n, n), queries, k, list(nprobes), list(efs), hnsw_m, ef_construction, n_latency, log)}
    report["loadavg_end"] = os.getloadavg()
    faiss.cvar.distance_compute_blas_threshold = default_threshold
    return report


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--n", type=int, default=1_000_000, help="bank vectors (default 10^6)")
    parser.add_argument("--shards", type=int, default=4)
    parser.add_argument("--dim", type=int, default=1280)
    parser.add_argument("--k", type=int, default=50)
    parser.add_argument("--queries", type=int, default=200, help="queries checked against the flat index and used for recall")
    parser.add_argument("--latency-queries", type=int, default=40)
    parser.add_argument("--batches", type=int, default=10, help="batches timed for the per-batch latency")
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--shard-cpus", type=float, default=0.25, help="CPUs Ray reserves per shard actor")
    parser.add_argument("--cpus", type=int, default=2, help="CPUs of the local Ray")
    parser.add_argument("--sub-n", type=int, default=100_000, help="sub-bank for Flat vs IVF vs HNSW (0: skip)")
    parser.add_argument("--nprobe", type=int, nargs="+", default=[1, 4, 16, 64])
    parser.add_argument("--ef-search", type=int, nargs="+", default=[64, 128, 256])
    parser.add_argument("--hnsw-m", type=int, default=32)
    parser.add_argument("--ef-construction", type=int, default=80)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--blas-threshold", type=int, help="faiss.cvar.distance_compute_blas_threshold in the shard actors "
                        "and the driver: FAISS 1.15 uses BLAS (one pass over the vectors for the whole batch) when "
                        "queries x dim >= this (default 128000)")
    parser.add_argument("--scan-rates", action="store_true", help="only time one shard's flat search in this process "
                        "(n/shards rows, one thread, batches 1/16/64; BLAS threshold FAISS's default, 20 and 16 x dim)")
    parser.add_argument("--json", help="write the report here")
    args = parser.parse_args()

    if args.scan_rates:
        spec = MixtureSpec(dim=args.dim, n_clusters=max(10, min(1000, args.n // 1000)), seed=args.seed)
        rows = scan_rates(spec, args.n // args.shards, args.k)
        if args.json:
            Path(args.json).parent.mkdir(parents=True, exist_ok=True)
            Path(args.json).write_text(json.dumps({"command": " ".join(["python", *sys.argv]), "scan_rates": rows}, indent=2))
        return

    import ray

    t0 = time.perf_counter()
    ray.init(num_cpus=args.cpus, include_dashboard=False, object_store_memory=512 * 2**20, logging_level=logging.WARNING)
    try:
        report = simulate(n=args.n, shards=args.shards, dim=args.dim, k=args.k, n_queries=args.queries,
                          n_latency=args.latency_queries, n_batches=args.batches, batch=args.batch,
                          num_cpus=args.shard_cpus, sub_n=args.sub_n, nprobes=tuple(args.nprobe), efs=tuple(args.ef_search),
                          hnsw_m=args.hnsw_m, ef_construction=args.ef_construction, seed=args.seed,
                          blas_threshold=args.blas_threshold)
    finally:
        ray.shutdown()
    report["total_s"] = time.perf_counter() - t0
    report["driver_peak_rss"] = proc_memory()["VmHWM"]
    report["command"] = " ".join(["python", *sys.argv])
    print_table(report)
    print(f"\ntotal {report['total_s']:.0f} s, driver peak RSS {report['driver_peak_rss'] / 2**30:.2f} GiB")
    if args.json:
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(json.dumps(report, indent=2, default=float))
    if not (report["check"]["ids_equal"] and report["check"]["distances_equal"]):
        sys.exit("scatter-gather top-K differs from the flat index")


if __name__ == "__main__":
    main()
