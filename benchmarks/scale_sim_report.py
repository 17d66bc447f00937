"""The tables ``scale_sim.py`` prints from its report: the sharded bank, the check, Flat vs IVF vs HNSW."""

from __future__ import annotations

from typing import Any


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
    print(f"bytes per query: {b['to_each_shard']} B to each shard, {b['from_each_shard']} B back from each, "
          f"{b['total']} B in all")
    c = report["check"]
    print(f"check vs one flat index ({c['queries']} queries): ids equal {c['ids_equal']}, distances equal {c['distances_equal']}")
    if "index_comparison" in report:
        _print_index_comparison(report)


def _print_index_comparison(report: dict[str, Any]) -> None:
    ic = report["index_comparison"]
    k = report["k"]
    print(f"\n== Flat vs IVF vs HNSW on {ic['sub_n']:,} vectors (1 thread, exact rerank of k+{report['rerank_margin']})")
    print(f"{'index':9} {'params':38} {'build s':>8} {'MiB':>8} {'B/vec':>7} {'recall@' + str(k):>10} "
          f"{'p50 ms':>8} {'p95 ms':>8}")
    for r in ic["results"]:
        params = ", ".join(f"{key}={r[key]}" for key in ("nlist", "nprobe", "M", "efConstruction", "efSearch") if key in r)
        print(f"{r['index']:9} {params:38} {r['build_s']:>8.1f} {r['index_bytes'] / 2**20:>8.1f} {r['bytes_per_vector']:>7.0f} "
              f"{r[f'recall@{k}']:>10.4f} {r['latency']['p50_ms']:>8.2f} {r['latency']['p95_ms']:>8.2f}")
