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
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import faiss
import numpy as np

from spade_ray.bank.store import BankShard
from spade_ray.method.retrieval import RERANK_MARGIN, search_exact
from spade_ray.bank.shard_server import ShardServer

CHUNK_ROWS = 8192  # the generator's unit: row r of the bank comes from chunk r // CHUNK_ROWS, whoever makes it


# ------------------------------------------------------------------------------------------- data


@dataclass(frozen=True)
class MixtureSpec:
    """Parameters of the synthetic global vectors (defaults calibrated to real lite0 vectors).

    One cluster stands for one product/camera/line: its images spread like real lite0 vectors of
    one product do (magnetic_tile: total variance 37.2, 69% of it in 8 principal components, 90%
    in 32, 98% in 128); cluster centres spread as much again (``between_ratio``), so neighbouring
    clusters overlap: the harder case for IVF.
    """

    dim: int = 1280
    n_clusters: int = 1000        # products x cameras x lines in a 10^6-image bank
    zipf: float = 1.0             # cluster weights ~ 1 / rank^zipf: a few common, many rare
    within_var: float = 37.2      # E|x - cluster mean|^2 (lite0 on magnetic_tile: 37.2)
    within_rank: int = 128        # each cluster spreads in its own low-rank subspace ...
    spectrum: float = 1.3         # ... with variances ~ 1 / i^spectrum ...
    n_within_bases: int = 16      # ... one of this many random subspaces
    noise_frac: float = 0.02      # share of the within variance in isotropic noise
    between_ratio: float = 1.0    # variance of the cluster centres / within_var
    between_rank: int = 64        # the centres vary in a shared low-rank subspace
    mean_norm: float = 13.9       # |mean vector| (lite0 on magnetic_tile: 13.9)
    seed: int = 0


class Mixture:
    """Deterministic generator: ``rows(start, stop)`` is the same in every process for the same spec."""

    def __init__(self, spec: MixtureSpec) -> None:
        self.spec = s = spec
        rng = np.random.default_rng([s.seed, 0])
        d = s.dim
        mean = rng.gamma(0.5, 1.0, d)
        self.mean = (mean * (s.mean_norm / np.linalg.norm(mean))).astype(np.float32)
        weights = 1.0 / np.arange(1, s.n_clusters + 1) ** s.zipf
        self.weights = weights / weights.sum()
        rb, rw = min(s.between_rank, d), min(s.within_rank, d)
        lam_b = 1.0 / np.arange(1, rb + 1)
        lam_w = 1.0 / np.arange(1, rw + 1) ** s.spectrum
        self.lam_w = (lam_w / lam_w.sum() * s.within_var * (1 - s.noise_frac)).astype(np.float32)
        between = _orthonormal(rng, d, rb)
        coeff = rng.standard_normal((s.n_clusters, rb)) * np.sqrt(lam_b / lam_b.sum() * s.within_var * s.between_ratio)
        self.centres = (coeff @ between.T).astype(np.float32)                     # (C, d), zero mean
        self.bases = np.stack([_orthonormal(rng, d, rw).T for _ in range(s.n_within_bases)]).astype(np.float32)  # (B, rw, d)
        self.basis_of = rng.integers(0, s.n_within_bases, s.n_clusters)
        self.noise_sd = np.float32(np.sqrt(s.within_var * s.noise_frac / d))

    def _chunk(self, stream: int, c: int, size: int, cluster: int | None = None) -> np.ndarray:
        rng = np.random.default_rng([self.spec.seed, stream, c])
        if cluster is None:
            labels = rng.choice(self.spec.n_clusters, size=size, p=self.weights)
        else:
            labels = np.full(size, cluster)
        z = rng.standard_normal((size, len(self.lam_w)), dtype=np.float32) * np.sqrt(self.lam_w)
        x = rng.standard_normal((size, self.spec.dim), dtype=np.float32)
        x *= self.noise_sd
        x += self.mean
        x += self.centres[labels]
        basis = self.basis_of[labels]
        for b in np.unique(basis):
            sel = np.flatnonzero(basis == b)
            x[sel] += z[sel] @ self.bases[b]
        return x

    def one_cluster(self, cluster: int, n: int) -> np.ndarray:
        """``n`` images of one cluster (for the calibration statistics)."""
        return self._chunk(3, cluster, n, cluster)

    def fill(self, out: np.ndarray, start: int, stream: int = 1) -> None:
        """Write bank rows ``start .. start + len(out)`` into ``out`` (float32, (n, dim)), chunk by chunk."""
        stop = start + len(out)
        for c in range(start // CHUNK_ROWS, (stop - 1) // CHUNK_ROWS + 1 if stop > start else 0):
            lo, hi = c * CHUNK_ROWS, (c + 1) * CHUNK_ROWS
            chunk = self._chunk(stream, c, CHUNK_ROWS)
            a, b = max(lo, start), min(hi, stop)
            out[a - start: b - start] = chunk[a - lo: b - lo]

    def rows(self, start: int, stop: int) -> np.ndarray:
        out = np.empty((stop - start, self.spec.dim), np.float32)
        self.fill(out, start)
        return out

    def queries(self, n: int) -> np.ndarray:
        """Held-out images from the same distribution (another random stream: never bank rows)."""
        out = np.empty((n, self.spec.dim), np.float32)
        self.fill(out, 0, stream=2)
        return out


def _orthonormal(rng: np.random.Generator, d: int, r: int) -> np.ndarray:
    q, _ = np.linalg.qr(rng.standard_normal((d, r)))
    return q  # (d, r)


def data_stats(x: np.ndarray) -> dict[str, float]:
    """The statistics the generator is calibrated on, for a sample of vectors."""
    x = x.astype(np.float64)
    mean = x.mean(0)
    xc = x - mean
    s = np.linalg.eigvalsh(xc.T @ xc)[::-1].clip(0)  # squared singular values, largest first
    c = np.cumsum(s) / s.sum()
    out = {"n": len(x), "mean_norm": float(np.linalg.norm(mean)), "total_var": float(s.sum() / len(x)),
           "var_in_8_pcs": float(c[min(7, len(c) - 1)]), "var_in_32_pcs": float(c[min(31, len(c) - 1)]),
           "var_in_128_pcs": float(c[min(127, len(c) - 1)]), "participation_ratio": float(s.sum() ** 2 / (s ** 2).sum())}
    if 51 < len(x) <= 2000:  # neighbour distances: how much contrast a nearest-neighbour search has to work with
        sq = (x * x).sum(1)
        dist = np.sqrt(np.maximum(sq[:, None] + sq[None] - 2 * x @ x.T, 0))
        np.fill_diagonal(dist, np.inf)
        nn = np.sort(dist, axis=1)
        out.update(nn1_mean=float(nn[:, 0].mean()), nn50_mean=float(nn[:, 49].mean()),
                   median_pair=float(np.median(dist[np.isfinite(dist)])))
    return out


# ------------------------------------------------------------------------------------------ index


def flat_index(mixture: Mixture, start: int, stop: int) -> tuple[faiss.IndexFlatL2, np.ndarray]:
    """A flat L2 index over bank rows start..stop, generated straight into FAISS's own storage.

    Returns (index, vectors) where ``vectors`` is a numpy view of the index's storage (the same
    bytes, not a copy): ``search_exact`` needs both, and 5 GB held twice would not fit.
    """
    n, d = stop - start, mixture.spec.dim
    index = faiss.IndexFlatL2(d)
    index.codes.resize(n * d * 4)
    vectors = faiss.rev_swig_ptr(index.codes.data(), n * d * 4).view(np.float32).reshape(n, d)
    mixture.fill(vectors, start)
    index.ntotal = n
    return index, vectors


def proc_memory(pid: int | str = "self") -> dict[str, int]:
    """VmRSS and VmHWM (peak RSS) of a process, in bytes."""
    out = {}
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith(("VmRSS:", "VmHWM:")):
                key, value, _unit = line.split()
                out[key[:-1]] = int(value) * 1024
    return out


class SimShard(ShardServer):
    """A shard of the synthetic bank: rows start..stop, served by the project's ShardServer.search."""

    def __init__(self, spec: MixtureSpec, start: int, stop: int, threads: int = 1, blas_threshold: int | None = None) -> None:
        faiss.omp_set_num_threads(threads)
        if blas_threshold is not None:  # FAISS 1.15: BLAS when queries x dim >= this (default 128,000)
            faiss.cvar.distance_compute_blas_threshold = blas_threshold
        self.memory_before = proc_memory()
        t0 = time.perf_counter()
        index, vectors = flat_index(Mixture(spec), start, stop)
        self.build_s = time.perf_counter() - t0
        n = stop - start
        shard = BankShard(name=f"sim-{start}-{stop}", ids=[""] * n, uris=[""] * n, global_=vectors, levels=[], index=index)
        self.shard, self.offset = shard, int(start)

    def stats(self) -> dict[str, Any]:
        return {"pid": os.getpid(), "rows": len(self.shard), "offset": self.offset, "build_s": self.build_s,
                "index_bytes": int(self.shard.index.ntotal) * self.shard.index.d * 4,
                "rss_before_build": self.memory_before["VmRSS"], **{k.lower(): v for k, v in proc_memory().items()}}

    def timed_search(self, queries: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray, float]:
        """``search`` plus the seconds it took inside the actor (no Ray overhead)."""
        t0 = time.perf_counter()
        dist, rows = self.search(queries, k)
        return dist, rows, time.perf_counter() - t0


def shard_bounds(n: int, shards: int) -> list[tuple[int, int]]:
    edges = np.linspace(0, n, shards + 1).round().astype(int)
    return [(int(a), int(b)) for a, b in zip(edges[:-1], edges[1:])]


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

    if __name__ != "__main__":  # imported from a file (tests): workers cannot import this module by name
        ray.cloudpickle.register_pickle_by_value(sys.modules[__name__])
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


def compare_indexes(spec: MixtureSpec, sub_n: int, queries: np.ndarray, k: int, nprobes: list[int],
                    efs: list[int], hnsw_m: int, ef_construction: int, n_latency: int, log=print) -> list[dict[str, Any]]:
    """Flat vs IVFFlat vs HNSWFlat on the first ``sub_n`` rows, one thread, through ``search_exact``."""
    faiss.omp_set_num_threads(1)
    d = spec.dim
    t0 = time.perf_counter()
    flat, vectors = flat_index(Mixture(spec), 0, sub_n)
    flat_build = time.perf_counter() - t0
    true_d, true_ids = search_exact(flat, vectors, queries, k)
    results = []

    def measure(name: str, index: faiss.Index, build_s: float, params: dict[str, Any], nbytes: int) -> None:
        found, _ = None, None
        _, found = search_exact(index, vectors, queries, k)
        recall = float(np.mean([len(set(found[i]) & set(true_ids[i])) / k for i in range(len(queries))]))
        exact_rows = float(np.mean((found == true_ids).all(axis=1)))
        times = []
        for q in queries[:n_latency]:
            t = time.perf_counter()
            search_exact(index, vectors, q[None], k)
            times.append(time.perf_counter() - t)
        row = {"index": name, **params, "build_s": build_s, "index_bytes": nbytes, "bytes_per_vector": nbytes / sub_n,
               f"recall@{k}": recall, "queries_exact": exact_rows, "latency": pct(times)}
        log(f"  {name:9s} {json.dumps(params):28s} build {build_s:7.1f} s  {nbytes / 2**20:8.1f} MiB  "
            f"recall@{k} {recall:.4f}  p50 {row['latency']['p50_ms']:.2f} ms")
        results.append(row)

    measure("Flat", flat, flat_build, {}, sub_n * d * 4)

    nlist = max(1, int(round(np.sqrt(sub_n))))
    quantizer = faiss.IndexFlatL2(d)
    ivf = faiss.IndexIVFFlat(quantizer, d, nlist, faiss.METRIC_L2)
    t0 = time.perf_counter()
    train = vectors[np.linspace(0, sub_n - 1, min(sub_n, 40 * nlist)).astype(int)]
    ivf.train(train)
    ivf.add(vectors)
    ivf_build = time.perf_counter() - t0
    ivf_bytes = len(faiss.serialize_index(ivf))
    for nprobe in nprobes:
        if nprobe <= nlist:
            ivf.nprobe = nprobe
            measure("IVFFlat", ivf, ivf_build, {"nlist": nlist, "nprobe": nprobe}, ivf_bytes)
    del ivf, quantizer
    gc.collect()

    hnsw = faiss.IndexHNSWFlat(d, hnsw_m)
    hnsw.hnsw.efConstruction = ef_construction
    t0 = time.perf_counter()
    hnsw.add(vectors)
    hnsw_build = time.perf_counter() - t0
    hnsw_bytes = len(faiss.serialize_index(hnsw))
    for ef in efs:
        hnsw.hnsw.efSearch = ef
        measure("HNSWFlat", hnsw, hnsw_build, {"M": hnsw_m, "efConstruction": ef_construction, "efSearch": ef}, hnsw_bytes)
    del hnsw, flat, vectors
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


def print_table(report: dict[str, Any]) -> None:
    s = report["sharded"]
    gib = 2 ** 30
    print(f"\n== sharded bank: {report['n']:,} vectors x {report['dim']} over {report['shards']} shard actors, K={report['k']}")
    print(f"{'shard':>5} {'rows':>9} {'build s':>8} {'index MiB':>10} {'RSS GiB':>8} {'peak GiB':>9} {'RSS before':>10}")
    for i, sh in enumerate(s["shards"]):
        print(f"{i:>5} {sh['rows']:>9,} {sh['build_s']:>8.1f} {sh['index_bytes'] / 2**20:>10.1f} "
              f"{sh['vmrss'] / gib:>8.2f} {sh['vmhwm'] / gib:>9.2f} {sh['rss_before_build'] / gib:>10.2f}")
    print(f"build (wall, all shards): {s['build_wall_s']:.1f} s")
    ls, lb = s["latency_single"], s["latency_batch"]
    print(f"latency 1 query:        p50 {ls['p50_ms']:.1f} ms  p95 {ls['p95_ms']:.1f} ms  (n={ls['n']})")
    print(f"latency batch of {lb['batch']}:    p50 {lb['p50_ms']:.1f} ms  p95 {lb['p95_ms']:.1f} ms  (n={lb['n']})")
    print(f"one shard's search inside its actor (1 query, {s['shard_search_inside_actor_ms']['rows_per_shard']:,} rows): "
          f"p50 {s['shard_search_inside_actor_ms']['p50']:.1f} ms")
    b = s["bytes_per_query"]
    print(f"bytes per query: {b['to_each_shard']} B to each shard, {b['from_each_shard']} B back from each, {b['total']} B in all")
    c = report["check"]
    print(f"check vs one flat index ({c['queries']} queries): ids equal {c['ids_equal']}, distances equal {c['distances_equal']}")
    if "index_comparison" in report:
        ic = report["index_comparison"]
        k = report["k"]
        print(f"\n== Flat vs IVF vs HNSW on {ic['sub_n']:,} vectors (1 thread, exact rerank of k+{report['rerank_margin']})")
        print(f"{'index':9} {'params':38} {'build s':>8} {'MiB':>8} {'B/vec':>7} {'recall@' + str(k):>10} {'p50 ms':>8} {'p95 ms':>8}")
        for r in ic["results"]:
            params = ", ".join(f"{key}={r[key]}" for key in ("nlist", "nprobe", "M", "efConstruction", "efSearch") if key in r)
            print(f"{r['index']:9} {params:38} {r['build_s']:>8.1f} {r['index_bytes'] / 2**20:>8.1f} {r['bytes_per_vector']:>7.0f} "
                  f"{r[f'recall@{k}']:>10.4f} {r['latency']['p50_ms']:>8.2f} {r['latency']['p95_ms']:>8.2f}")


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
