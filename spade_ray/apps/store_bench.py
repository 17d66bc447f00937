"""The score job's storage stages of ``spade-ray bench``: local disk, a real S3 server, and that server with latency.

A nightly job reads its images from and writes its masks to an object store, where every request
costs a round trip; these stages measure what that costs, on the images and bank of stages (c)
and (d), so that the ratios compare like with like:

(d) the score job on local disk (run by :mod:`spade_ray.apps.benchmark`, reported here);
(f) the score job with inputs, bank and output on a SeaweedFS S3 server started for the bench
    (:mod:`spade_ray.testing.s3server`), reached through a :class:`FaultProxy` at 0 ms that counts
    every request;
(g) the same through the proxy with ``--store-latency-ms`` added to every chunk each way, into a
    fresh output prefix.

A job's cost per image is its steady state (between its first and its last results); its start-up
(Ray, actors loading the backbone and the bank) is paid once per run and is shown apart.

JSON keys added to the bench's figures:

``score_job``
    ``{"d_local_disk" | "f_s3" | "g_s3_latency": {"images", "startup_seconds",
    "steady_seconds_per_image", "whole_job_seconds_per_image", "peak_rss_mib": {actor kind: MiB}}}``;
    (f) and (g) add ``latency_ms`` and ``requests``.
``requests`` (of (f) and (g), counted at the proxy)
    ``per_image``: ``input_get`` (GETs of input images), ``put`` (``{folder: PUTs}`` under the output:
    masks, heatmaps, overlays, maps, results, ...), ``all`` (every request of the scoring pipeline but
    the bank's, HEAD and LIST included); ``results_put_per_batch``; once per run: ``bank`` (requests
    for the bank's objects), ``startup`` (other requests before the first batch was scored) and
    ``report`` (the report's); ``by_kind`` (the scoring's, bank included, per image).
``R3_score_job_vs_in_process``, ``R3_s3_vs_in_process``, ``R4_latency_vs_none``
    steady seconds per image of (d) and of (f) over (c)'s, and of (g) over (f)'s.
``identical``
    whether (d), (f) and (g) give the same rows (image score, pixel max, decision, neighbours per
    image) and byte-identical masks; null when (f) and (g) did not run.
``store``
    ``{"latency_ms", "batch_size", "skipped"}``: ``skipped`` is the reason (f) and (g) did not run, or null.
"""

from __future__ import annotations

import os
import tempfile
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any
from urllib.parse import unquote

from spade_ray.apps.procwatch import ProcessPeaks
from spade_ray.progress import Progress
from spade_ray.storage.results import read_results
from spade_ray.storage.urls import read_many
from spade_ray.testing.s3server import S3Server, run_s3_server
from spade_ray.testing.tcpproxy import FaultProxy, RequestCounts
from spade_ray.testing.weed import WeedNotInstalled, find_weed

if TYPE_CHECKING:
    from spade_ray.distributed.pipeline import JobSummary

__all__ = ["ScoreRun", "format_store", "run_store_stages", "store_figures", "store_unavailable"]

COMPARED = ("image_score", "pixel_max", "is_anomalous", "neighbours")  # what "identical" compares, besides masks


@dataclass
class ScoreRun:
    """One score job as the bench ran it: its summary, its actors' peak memory, and where it wrote."""

    summary: JobSummary
    peaks: ProcessPeaks
    output: str
    latency_ms: float | None = None
    startup: RequestCounts | None = None  # requests before the scoring began
    scoring: RequestCounts | None = None  # requests from then until the report
    report: RequestCounts | None = None  # requests of the report alone


class _StageMarks:
    """A progress factory that notes the proxy's counts when each of the job's stages begins.

    The score job opens a bar for its scoring ("score") and for its report ("report"); the counts
    at those moments split its requests into start-up, pipeline and report.
    """

    def __init__(self, progress: Progress, proxy: FaultProxy) -> None:
        self.progress, self.proxy = progress, proxy
        self.ray_data_bars = getattr(progress, "ray_data_bars", False)
        self.marks: dict[str, RequestCounts] = {}

    def __call__(self, total: int, desc: str) -> Any:
        self.marks.setdefault(desc, self.proxy.counts())
        return self.progress(total, desc)


def _minus(later: RequestCounts, earlier: RequestCounts) -> RequestCounts:
    """The requests counted between two snapshots."""
    kinds = {k: n - earlier.by_kind.get(k, 0) for k, n in later.by_kind.items()}
    paths = {p: {k: n - earlier.by_path.get(p, {}).get(k, 0) for k, n in ks.items()} for p, ks in later.by_path.items()}
    return RequestCounts(by_kind={k: n for k, n in kinds.items() if n},
                         by_path={p: {k: n for k, n in ks.items() if n} for p, ks in paths.items() if any(ks.values())})


def _upload(server: S3Server, bucket: str, dataset: str, test: list[str], bank: Path) -> list[str]:
    """The test images (same paths under the dataset) and the bank folder into the bucket; the images' URLs."""
    fs = server.filesystem()
    keys = [os.path.relpath(uri, dataset) for uri in test]
    fs.put(list(test), [f"{bucket}/input/{key}" for key in keys])
    fs.put(str(bank) + "/", f"{bucket}/bank/", recursive=True)
    return [f"s3://{bucket}/input/{key}" for key in keys]


def _score(source: str, bank: str, output: str, *, batch_size: int, address: str | None, progress: Progress,
           storage_options: dict[str, Any] | None) -> tuple[JobSummary, ProcessPeaks]:
    """One score job into a fresh ``output``, with its actors' peak memory."""
    from spade_ray.distributed.score_job import run_score

    with ProcessPeaks() as peaks:
        summary = run_score(source, bank, output, batch_size=batch_size, overwrite=True, address=address,
                            progress=progress, storage_options=storage_options)
    return summary, peaks


def _score_through(proxy: FaultProxy, server: S3Server, latency_ms: float, source: str, bucket: str, output: str,
                   **job: Any) -> ScoreRun:
    """A score job on S3 through the proxy at ``latency_ms``, its requests split by when they were made."""
    options = {**server.storage_options, "endpoint_url": proxy.endpoint_url}
    proxy.latency_ms = latency_ms
    proxy.reset_counts()
    marks = _StageMarks(job.pop("progress"), proxy)
    summary, peaks = _score(source, f"s3://{bucket}/bank", f"s3://{bucket}/{output}", progress=marks,
                            storage_options=options, **job)
    end = proxy.counts()
    started, reported = marks.marks.get("score", end), marks.marks.get("report", end)
    return ScoreRun(summary, peaks, f"s3://{bucket}/{output}", latency_ms, startup=started,
                    scoring=_minus(reported, started), report=_minus(end, reported))


def store_unavailable() -> str | None:
    """Why (f) and (g) cannot run here (SeaweedFS is a test extra, not a dependency), or None when they can."""
    try:
        find_weed()
    except WeedNotInstalled as exc:
        return str(exc)
    return None


def run_store_stages(dataset: str, test: list[str], bank: Path, local_output: str, *, latency_ms: float,
                     batch_size: int, address: str | None, progress: Progress, log: Callable[[str], None],
                     ) -> tuple[list[ScoreRun], bool]:
    """(f) and (g) on a server started here; their runs, and whether they and (d) in ``local_output`` agree exactly."""
    with tempfile.TemporaryDirectory(prefix="spade-ray-bench-s3-") as base, run_s3_server(base) as server, \
            FaultProxy(server.endpoint_url) as proxy, tempfile.NamedTemporaryFile("w", suffix=".txt") as listing:
        bucket = server.make_bucket("spade-ray-bench")
        log(f"uploading {len(test)} test images and the bank to {server.endpoint_url}/{bucket} ...")
        listing.write("\n".join(_upload(server, bucket, dataset, test, bank)) + "\n")
        listing.flush()
        job = {"batch_size": batch_size, "address": address, "progress": progress}
        log("(f) distributed scoring on S3, through the counting proxy at 0 ms ...")
        f = _score_through(proxy, server, 0.0, listing.name, bucket, "scored-f", **job)
        log(f.summary.line())
        log(f"(g) distributed scoring on S3, {latency_ms:g} ms added each way ...")
        g = _score_through(proxy, server, latency_ms, listing.name, bucket, "scored-g", **job)
        log(g.summary.line())
        direct = server.storage_options  # the identity check reads past the proxy: it is not measured
        return [f, g], _same_results([(local_output, None), (f.output, direct), (g.output, direct)])


def _result_rows(output: str, storage_options: dict[str, Any] | None) -> dict[str, dict[str, Any]]:
    """relpath -> the compared columns and the mask's bytes, of every ok row in ``output``."""
    table = read_results(output, ["relpath", "status", "mask_uri", *COMPARED], storage_options)
    rows = [r for r in table.to_pylist() if r["status"] == "ok"]
    masks = read_many([r["mask_uri"] for r in rows], storage_options)
    return {r["relpath"]: {**{c: r[c] for c in COMPARED}, "mask": mask} for r, mask in zip(rows, masks)}


def _same_results(outputs: list[tuple[str, dict[str, Any] | None]]) -> bool:
    """Whether every output holds the same rows (by relative path) and byte-identical masks."""
    first, *others = [_result_rows(output, options) for output, options in outputs]
    return bool(first) and all(rows == first for rows in others)


def _per_image(count: float, n: int) -> float | None:
    return round(count / n, 4) if n else None


def _keys(counts: RequestCounts, bucket: str) -> Iterator[tuple[str, dict[str, int]]]:
    """(object key in the bucket, requests by kind) for every path the proxy saw."""
    for path, kinds in counts.by_path.items():
        yield unquote(path).removeprefix(f"/{bucket}").lstrip("/"), kinds


def _bank_requests(counts: RequestCounts, bucket: str) -> int:
    return sum(sum(kinds.values()) for key, kinds in _keys(counts, bucket) if key.startswith("bank/"))


def _requests(run: ScoreRun, batch_size: int) -> dict[str, Any]:
    """The requests of one S3 run by what they were for, per image where they scale with the images.

    The bank's requests are paid once per run (the shard actors load it whole), so they are counted
    apart from the per-image figures, whenever the actors make them.
    """
    assert run.startup is not None and run.scoring is not None and run.report is not None
    n = run.summary.ok + run.summary.error
    bucket, output = run.output.removeprefix("s3://").split("/", 1)
    input_get, puts = 0, {}
    for key, kinds in _keys(run.scoring, bucket):
        if key.startswith("input/"):
            input_get += kinds.get("GET", 0)
        elif key.startswith(f"{output}/") and kinds.get("PUT"):
            folder = key.removeprefix(f"{output}/").split("/")[0] if key.count("/") > 1 else "(top level)"
            puts[folder] = puts.get(folder, 0) + kinds["PUT"]
    bank = _bank_requests(run.scoring, bucket)
    startup_bank = _bank_requests(run.startup, bucket)
    batches = -(-n // batch_size)
    return {"per_image": {"input_get": _per_image(input_get, n),
                          "put": {folder: _per_image(count, n) for folder, count in sorted(puts.items())},
                          "all": _per_image(run.scoring.total - bank, n)},
            "results_put_per_batch": round(puts.get("results", 0) / batches, 3) if batches else None,
            "bank": startup_bank + bank, "startup": run.startup.total - startup_bank, "report": run.report.total,
            "by_kind": {k: _per_image(v, n) for k, v in sorted(run.scoring.by_kind.items())}}


def _job(run: ScoreRun, batch_size: int) -> dict[str, Any]:
    """Timing, memory and (on S3) requests of one score job."""
    s = run.summary
    figures: dict[str, Any] = {
        "images": s.ok + s.error,
        "startup_seconds": _rounded(s.startup_seconds, 3),
        "steady_seconds_per_image": _rounded(s.steady_seconds_per_image, 5),
        "whole_job_seconds_per_image": _rounded(1 / s.images_per_second if s.images_per_second else None, 5),
        "peak_rss_mib": run.peaks.mib(),
    }
    if run.scoring is not None:
        figures["latency_ms"] = run.latency_ms
        figures["requests"] = _requests(run, batch_size)
    return figures


def _rounded(value: float | None, digits: int) -> float | None:
    return round(value, digits) if value is not None else None


def _ratio(numerator: float | None, denominator: float | None) -> float | None:
    """The ratio to 4 significant digits (a fixed 3 decimals would drop most of a ratio near 0.01)."""
    return float(f"{numerator / denominator:.4g}") if numerator and denominator else None


def store_figures(local: ScoreRun, stored: tuple[list[ScoreRun], bool] | None, in_process: float, *,
                  latency_ms: float, batch_size: int, skipped: str | None) -> dict[str, Any]:
    """The JSON keys of the module docstring, from (d), (f) and (g) and (c)'s seconds per image."""
    runs = {"d_local_disk": local}
    identical = None
    if stored is not None:
        (f, g), identical = stored
        runs.update(f_s3=f, g_s3_latency=g)
    jobs = {name: _job(run, batch_size) for name, run in runs.items()}
    steady = {name: job["steady_seconds_per_image"] for name, job in jobs.items()}
    return {
        "score_job": jobs,
        "R3_score_job_vs_in_process": _ratio(steady["d_local_disk"], in_process),
        "R3_s3_vs_in_process": _ratio(steady.get("f_s3"), in_process),
        "R4_latency_vs_none": _ratio(steady.get("g_s3_latency"), steady.get("f_s3")),
        "identical": identical,
        "store": {"latency_ms": latency_ms, "batch_size": batch_size,
                  "skipped": skipped if stored is None else None},
    }


def _number(value: float | None, spec: str) -> str:
    return "n/a" if value is None else format(value, spec)


def _yes_no(value: bool | None) -> str:
    return "n/a" if value is None else "yes" if value else "NO"


def _requests_line(label: str, requests: dict[str, Any]) -> str:
    per = requests["per_image"]
    puts = ", ".join(f"{folder} {count:.2f}" for folder, count in per["put"].items())
    return (f"{label} requests per image: GET input {_number(per['input_get'], '.2f')}; PUT {puts} "
            f"({_number(requests['results_put_per_batch'], '.2f')} results file per batch); all {per['all']:.2f}; "
            f"once per run: {requests['bank']} for the bank, {requests['startup']} more at start-up, "
            f"{requests['report']} for the report")


def format_store(result: dict[str, Any]) -> list[str]:
    """The lines ``spade-ray bench`` prints for the score job stages, in the style of its table."""
    latency = result["store"]["latency_ms"]
    labels = {"d_local_disk": "(d) score job, local disk", "f_s3": "(f) score job, S3 (proxy at 0 ms)",
              "g_s3_latency": f"(g) score job, S3 (+{latency:g} ms each way)"}
    lines = [f"{'score job':<44}{'steady s/image':>16}{'start-up s':>12}{'whole s/image':>15}"]
    for key, job in result["score_job"].items():
        lines.append(f"{labels[key]:<44}{_number(job['steady_seconds_per_image'], '.4f'):>16}"
                     f"{_number(job['startup_seconds'], '.1f'):>12}{_number(job['whole_job_seconds_per_image'], '.4f'):>15}")
    for key in ("f_s3", "g_s3_latency"):
        if key in result["score_job"]:
            lines.append(_requests_line(labels[key][:3], result["score_job"][key]["requests"]))
    lines.append(f"R3 = {_number(result['R3_score_job_vs_in_process'], '.3f')} (local disk), "
                 f"{_number(result['R3_s3_vs_in_process'], '.3f')} (S3)   "
                 f"R4 = {_number(result['R4_latency_vs_none'], '.3f')} (+{latency:g} ms)   "
                 f"identical: {_yes_no(result['identical'])}")
    if result["store"]["skipped"]:
        lines.append(f"(f) and (g) skipped: {result['store']['skipped']}")
    for key, job in result["score_job"].items():
        lines.append(f"{labels[key][:3]} peak RSS (MiB): " + ", ".join(f"{k} {v:.0f}" for k, v in job["peak_rss_mib"].items()))
    return lines
