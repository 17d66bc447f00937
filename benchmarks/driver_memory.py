"""The score driver's memory per input URI while it reads a night's listing, chunk by chunk.

    PYTHONPATH=. python benchmarks/driver_memory.py --images 200000 --chunk 50000 \\
        --json benchmarks/results/driver-memory-streamed-200000.json

The score job's driver reads its listing in chunks (``sources.list_chunks``), checks each chunk
against the "already done" set (``bank_plan.done_images``) and puts each bank's inputs to score in
Ray's object store as Arrow tables (``score_inputs.plan_inputs``).  This runs that pass through the
job's own functions, against a real (small) bank, on ``--images`` synthetic URIs shaped like a
plant's (``s3://bucket/archive/YYYY-MM-DD/lineN/camN/NNNNNNNN.png``), in two nights:

* ``first``: an empty output, every input to score (all of them go to the object store);
* ``rerun``: an output already holding a row for every input (the done-set is full, nothing to score);

and for two sources: a list file (``--list``, read in pieces, sorted in Arrow) and a folder of
as many empty files (``--folder``, walked folder by folder; the listing request is the same on a
bucket).  Each case runs in a fresh process, twice: once under ``tracemalloc`` (Python objects)
with Arrow's pool counted beside (its buffers are not Python objects), once without tracing for the
process's resident set (its high-water mark while the pass ran, over the resident set before it:
every allocation, numpy and Ray's client included).  "held" is what stays after the pass, for the
rest of the run; "peak" the most at any time during it.  docs/scaling.md extrapolates to 10^7.
"""

from __future__ import annotations

import argparse
import gc
import json
import multiprocessing
import tempfile
import time
import tracemalloc
from pathlib import Path
from typing import Any

import pyarrow as pa

BANK_ROWS_PER_FILE = 500


def plant_uris(n: int, prefix: str = "s3://plant-archive/inspection/2026-11-28") -> list[str]:
    return [f"{prefix}/line{i % 4}/cam{i % 3}/{i:08d}.png" for i in range(n)]


def _rss(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) * 1024
    raise RuntimeError(f"no {field} in /proc/self/status")


def _reset_high_water_mark() -> None:
    Path("/proc/self/clear_refs").write_text("5")  # Linux: VmHWM := VmRSS


def _scenario(source: str, bank: str, output: str, chunk: int, traced: bool) -> dict[str, Any]:
    """One pass in this (fresh) process; the bank is opened and Ray started before measuring."""
    from spade_ray.distributed.bank_plan import BankPlanner, done_images
    from spade_ray.distributed.runtime import init_ray
    from spade_ray.distributed.score_inputs import plan_inputs
    from spade_ray.storage.routes import RoutingTable
    from spade_ray.storage.sources import list_chunks

    init_ray(num_cpus=1)
    table = RoutingTable.single(bank)
    planner = BankPlanner({}, None, None, None, None)
    plan = planner.plan(table.routes[0])  # opened before measuring: the bank's import of torch is not the listing's
    pool = pa.default_memory_pool()
    gc.collect()
    arrow_base, arrow_peak_before = pa.total_allocated_bytes(), pool.max_memory()
    if traced:
        tracemalloc.start()
    else:
        _reset_high_water_mark()
    rss_base = _rss("VmRSS")
    start = time.perf_counter()
    done = done_images(output, {plan.bank_id}, False, False, True, None)
    counts = plan_inputs(list_chunks(source, None, chunk), table, planner, done, True, lambda items: None, lambda: None)
    seconds = time.perf_counter() - start
    gc.collect()
    figures: dict[str, Any] = {"inputs": counts.inputs, "skipped": counts.skipped, "to_score": plan.todo.rows,
                               "object_store_bytes": sum(plan.todo.sizes), "tables": len(plan.todo.refs),
                               "done_set_bytes": done.ids.nbytes + done.errors.nbytes
                               + (done.bank_codes.nbytes if done.bank_codes is not None else 0),
                               "seconds": round(seconds, 1)}
    if traced:
        held, peak = tracemalloc.get_traced_memory()
        tracemalloc.stop()
        arrow_peak = pool.max_memory()  # the process's peak: the pass's own when it rose during the pass
        figures.update(python_held=held, python_peak=peak, arrow_held=pa.total_allocated_bytes() - arrow_base,
                       arrow_peak=arrow_peak - arrow_base if arrow_peak > arrow_peak_before else None)
    else:
        figures.update(rss_held=_rss("VmRSS") - rss_base, rss_peak=_rss("VmHWM") - rss_base)
    return figures


def _child(queue: Any, *args: Any) -> None:
    queue.put(_scenario(*args))


def in_fresh_process(*args: Any) -> dict[str, Any]:
    ctx = multiprocessing.get_context("spawn")
    queue = ctx.Queue()
    proc = ctx.Process(target=_child, args=(queue, *args))
    proc.start()
    result = queue.get()
    proc.join()
    return result


def write_result_rows(output: Path, uris: list[str], bank_id: str) -> None:
    """One ok row per input, in files of BANK_ROWS_PER_FILE rows, as the writers commit them."""
    from spade_ray.storage.featurestore import image_id_for
    from spade_ray.storage.results import batch_name, write_results

    for start in range(0, len(uris), BANK_ROWS_PER_FILE):
        rows = [{"uri": u, "relpath": u.split("/", 3)[-1], "image_id": image_id_for(u), "image_score": 0.5,
                 "knn_score": 0.5, "pixel_max": 0.1, "is_anomalous": False, "mask_uri": f"{output}/masks/{i}.png",
                 "heatmap_uri": None, "overlay_uri": None, "neighbours": [], "bank_id": bank_id, "status": "ok",
                 "error": None, "seconds": 0.01} for i, u in enumerate(uris[start:start + BANK_ROWS_PER_FILE])]
        write_results(str(output), rows, batch_name("soak", [r["image_id"] for r in rows]))


def small_bank(work: Path) -> str:
    """A real bank (synthetic normals, 64 px input): the pass opens it as a night's run does."""
    from spade_ray.apps.synthetic import make_synthetic_dataset
    from spade_ray.distributed.build_bank_job import run_build_bank
    from spade_ray.distributed.extract_job import run_extract

    dataset = make_synthetic_dataset(work / "ds", n_train=6, n_test_good=1, n_test_per_defect=1, size=64, seed=3)
    run_extract(str(dataset / "train" / "good"), str(work / "features"), image_size=64, batch_size=6)
    run_build_bank(str(work / "features"), str(work / "bank"), shards=1, calibration_samples=4, image_k=2, pixel_k=3,
                   kappa=1)
    return str(work / "bank")


def run(n: int, chunk: int, work: Path, bank: str | None, sources: list[str]) -> dict[str, Any]:
    import ray

    from spade_ray.bank.store import open_bank

    bank = bank or small_bank(work)
    if ray.is_initialized():
        ray.shutdown()
    bank_id = open_bank(bank)[1].bank_id
    inputs: dict[str, tuple[str, list[str]]] = {}
    if "list" in sources:
        listing = work / "inputs.txt"
        uris = plant_uris(n)
        listing.write_text("\n".join(uris) + "\n")
        inputs["list"] = (str(listing), uris)
    if "folder" in sources:
        folder = work / "archive"
        uris = plant_uris(n, str(folder))
        for uri in uris:
            path = Path(uri)
            path.parent.mkdir(parents=True, exist_ok=True)
            path.touch()
        inputs["folder"] = (str(folder), uris)
    result: dict[str, Any] = {"images": n, "chunk": chunk, "bank": "synthetic, 1 shard", "cases": {}}
    for name, (source, uris) in inputs.items():
        for night in ("first", "rerun"):
            output = work / f"out-{name}-{night}"
            if night == "rerun":
                write_result_rows(output, uris, bank_id)
            traced = in_fresh_process(source, bank, str(output), chunk, True)
            plain = in_fresh_process(source, bank, str(output), chunk, False)
            case = {**traced, **{k: plain[k] for k in ("rss_held", "rss_peak")}}
            case["per_input"] = {k: round(case[k] / n, 1) for k in ("python_held", "python_peak", "arrow_held",
                                                                   "arrow_peak", "rss_held", "rss_peak",
                                                                   "object_store_bytes", "done_set_bytes")
                                 if case.get(k) is not None}
            result["cases"][f"{name}/{night}"] = case
            print(name, night, json.dumps(case["per_input"]), flush=True)
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=int, default=200_000)
    parser.add_argument("--chunk", type=int, default=None, help="inputs per listing chunk (default: the job's)")
    parser.add_argument("--bank", default=None, help="a bank to open (default: build a small one)")
    parser.add_argument("--sources", default="list,folder", help="which sources to measure: list, folder")
    parser.add_argument("--json", default=None)
    args = parser.parse_args()
    from spade_ray.storage.sources import LISTING_CHUNK

    with tempfile.TemporaryDirectory(prefix="spade-ray-driver-memory-") as tmp:
        result = run(args.images, args.chunk or LISTING_CHUNK, Path(tmp), args.bank, args.sources.split(","))
    print(json.dumps(result, indent=2))
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=1) + "\n")


if __name__ == "__main__":
    main()
