"""A mixed archive of two real products in one `score --routes` run: all banks at once vs bank by bank.

Builds one bank per dataset (the first --normals images of train/good) with the real jobs, lists a
mixed archive (the first --per-product test images of each, interleaved by name), then scores it
twice with the same routing table: with the default --bank-memory (both banks served at once, one
pipeline) and with a budget that fits one bank only (two waves). Prints one JSON object: the served
size estimate per bank, the waves, the seconds and counts of each run, and its per-bank thresholds.

    python benchmarks/routed_archive.py --datasets ../shared/datasets/magnetic_tile ../shared/datasets/kolektorsdd \\
        --work /tmp/routed-bench --json benchmarks/results/routed_archive.json
"""

from __future__ import annotations

import argparse
import contextlib
import json
import sys
import time
from pathlib import Path

from spade_ray.apps.cli import main
from spade_ray.bank.store import open_bank
from spade_ray.distributed.bank_plan import served_bytes


def _images(folder: Path) -> list[Path]:
    return sorted(p for p in folder.rglob("*") if p.suffix.lower() in (".png", ".jpg", ".jpeg", ".bmp"))


def _build(dataset: Path, work: Path, normals: int, image_size: int) -> str:
    listing = work / f"{dataset.name}-normals.txt"
    listing.write_text("\n".join(str(p) for p in _images(dataset / "train" / "good")[:normals]) + "\n")
    for argv in (["extract", str(listing), "--output", str(work / f"features-{dataset.name}"),
                  "--image-size", str(image_size)],
                 ["build-bank", str(work / f"features-{dataset.name}"), "--output", str(work / f"bank-{dataset.name}"),
                  "--shards", "2"]):
        if main([*argv, "--quiet"]) != 0:
            sys.exit(f"{argv[0]} failed")
    return str(work / f"bank-{dataset.name}")


def _score(archive: Path, routes: Path, output: Path, bank_memory: float | None) -> dict:
    log = output.with_suffix(".log")
    argv = ["score", str(archive), "--routes", str(routes), "--output", str(output), "--quiet", "--log-format", "json"]
    start = time.perf_counter()
    with open(log, "w") as fh, contextlib.redirect_stdout(fh):
        code = main(argv + (["--bank-memory", f"{bank_memory:.6f}"] if bank_memory else []))
    seconds = time.perf_counter() - start
    summary = [json.loads(line) for line in log.read_text().splitlines() if '"banks"' in line][-1]
    return {"exit": code, "seconds": round(seconds, 1), "ok": summary["ok"], "error": summary["error"],
            "waves": summary.get("waves"), "banks": summary["banks"]}


def main_bench(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--datasets", nargs=2, type=Path, required=True)
    parser.add_argument("--work", type=Path, required=True)
    parser.add_argument("--normals", type=int, default=40)
    parser.add_argument("--per-product", type=int, default=24)
    parser.add_argument("--image-size", type=int, default=128)
    parser.add_argument("--json", type=Path)
    args = parser.parse_args(argv)
    args.work.mkdir(parents=True, exist_ok=True)
    banks = {d.name: _build(d, args.work, args.normals, args.image_size) for d in args.datasets}
    sizes = {name: served_bytes(open_bank(url)[1]) for name, url in banks.items()}
    tests = {d.name: _images(d / "test")[:args.per_product] for d in args.datasets}
    archive = args.work / "archive.txt"
    archive.write_text("\n".join(str(p) for pair in zip(*tests.values()) for p in pair) + "\n")
    routes = args.work / "routes.yaml"
    routes.write_text("routes:\n" + "".join(f"  - match: {name}/\n    bank: {url}\n" for name, url in banks.items()))
    result = {"normals_per_bank": args.normals, "images_per_product": args.per_product, "image_size": args.image_size,
              "served_bytes": sizes,
              "all_at_once": _score(archive, routes, args.work / "out-once", None),
              "bank_by_bank": _score(archive, routes, args.work / "out-waves", max(sizes.values()) / 2**30)}
    text = json.dumps(result, indent=2)
    print(text)
    if args.json:
        args.json.write_text(text + "\n")
    return result


if __name__ == "__main__":
    main_bench()
