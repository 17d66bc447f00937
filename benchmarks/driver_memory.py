"""The score driver's memory per input URI: the listing, the "already done" set and the output keys.

    PYTHONPATH=. python benchmarks/driver_memory.py --images 100000 --json benchmarks/results/driver-memory-100000.json

Before the first batch the driver holds one entry per input, however many: the listing
(``resolve_inputs``: a list of ``InputImage``), the set of images already scored into the output
(``bank_plan.done_images``, read from every result row) and the output key of every input
(``unique_output_stems``).  Each is measured here through the job's own functions on ``--images``
synthetic URIs shaped like a plant's (``s3://bucket/archive/YYYY-MM-DD/lineN/camN/NNNNNNNN.png``,
given as a list file; a bucket listing adds what the storage client keeps) and as many real result
rows: bytes retained per URI (what stays for the whole run) and the peak while it is built, from
``tracemalloc`` (Python objects; Arrow's buffers, freed once the rows are Python objects, are not counted).
docs/scaling.md extrapolates the figures to 10^7 images a night.
"""

from __future__ import annotations

import argparse
import gc
import json
import tempfile
import tracemalloc
from collections.abc import Callable
from pathlib import Path
from typing import Any

from spade_ray.distributed.bank_plan import done_images
from spade_ray.storage.outputs import unique_output_stems
from spade_ray.storage.results import batch_name, write_results
from spade_ray.storage.sources import InputImage, resolve_inputs

BANK_ID = "v0001-0123456789ab"
ROWS_PER_FILE = 500


def plant_uris(n: int) -> list[str]:
    return [f"s3://plant-archive/inspection/2026-11-28/line{i % 4}/cam{i % 3}/{i:08d}.png" for i in range(n)]


def measure(build: Callable[[], Any]) -> tuple[Any, int, int]:
    """(what ``build`` returned, bytes it still holds, peak bytes while building), Python allocations only."""
    gc.collect()
    tracemalloc.start()
    tracemalloc.reset_peak()
    base = tracemalloc.get_traced_memory()[0]
    value = build()
    gc.collect()
    current, peak = tracemalloc.get_traced_memory()
    tracemalloc.stop()
    return value, current - base, peak - base


def write_result_rows(output: Path, items: list[InputImage]) -> None:
    """One ok row per input, in files of ROWS_PER_FILE rows, as the writers commit them."""
    for start in range(0, len(items), ROWS_PER_FILE):
        rows = [{"uri": it.uri, "relpath": it.relpath, "image_id": it.image_id, "image_score": 0.5, "knn_score": 0.5,
                 "pixel_max": 0.1, "is_anomalous": False, "mask_uri": f"{output}/masks/{it.relpath}",
                 "heatmap_uri": None, "overlay_uri": None, "neighbours": [], "bank_id": BANK_ID, "status": "ok",
                 "error": None, "seconds": 0.01} for it in items[start:start + ROWS_PER_FILE]]
        write_results(str(output), rows, batch_name("soak", [r["image_id"] for r in rows]))


def run(n: int, workdir: Path) -> dict[str, Any]:
    listing = workdir / "inputs.txt"
    listing.write_text("\n".join(plant_uris(n)) + "\n")
    items, held, peak = measure(lambda: resolve_inputs(str(listing)))
    figures: dict[str, Any] = {"listing": {"bytes_per_uri": held / n, "peak_bytes_per_uri": peak / n}}
    out = workdir / "out"
    write_result_rows(out, items)
    done, held, peak = measure(lambda: done_images(str(out), {it.image_id: BANK_ID for it in items}, False, False, True, None))
    assert len(done) == n
    figures["done_set"] = {"bytes_per_uri": held / n, "peak_bytes_per_uri": peak / n}
    keys, held, peak = measure(lambda: unique_output_stems((it.image_id, it.relpath) for it in items))
    figures["output_keys"] = {"bytes_per_uri": held / n, "peak_bytes_per_uri": peak / n}
    for part in figures.values():
        part.update({k: round(v) for k, v in part.items()})
    total = sum(p["bytes_per_uri"] for p in figures.values())
    return {"images": n, "uri_example": items[0].uri, "per_uri": figures, "held_bytes_per_uri": total,
            "held_gib_at_1e7": round(total * 1e7 / 2**30, 2)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=int, default=100_000)
    parser.add_argument("--json", default=None)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="spade-ray-driver-memory-") as tmp:
        result = run(args.images, Path(tmp))
    print(json.dumps(result, indent=2))
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=1) + "\n")


if __name__ == "__main__":
    main()
