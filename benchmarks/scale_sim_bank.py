"""The synthetic bank of ``scale_sim.py``: deterministic global vectors, flat indexes over them, shard actors.

Every process makes the same rows from the same seed, so shard actors build their part of the bank
without the driver sending it, and the driver can rebuild the whole bank to check them.
"""

from __future__ import annotations

import os
import time
from dataclasses import dataclass
from typing import Any

import faiss
import numpy as np

from spade_ray.bank.shard_loader import BankShard
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
            # in float64, rounded once: a float32 product's last bit follows BLAS's blocking and thread
            # count, which differ between the driver and a 1-CPU actor on some CPUs
            x[sel] += (z[sel].astype(np.float64) @ self.bases[b].astype(np.float64)).astype(np.float32)
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
