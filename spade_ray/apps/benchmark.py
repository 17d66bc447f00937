"""``spade-ray bench``: where the time goes, measured in one run on the same images and settings.

Stages, all on the same test images:

(a) backbone forward only (decoded, preprocessed tensors in memory) - the floor;
(b) extraction job: decode + forward + Parquet write of the bank's normal images, on Ray;
(c) in-process scoring: ``Spade.predict`` (decode, forward, retrieval, correspondence, fusion);
(d) distributed scoring: the ``score`` job against a bank served by N shard actors (masks,
    heatmaps and result rows written);
(e) the published SPADE correspondence loop (:mod:`spade_ray.method.reference`), on a few images;
(f), (g) the score job on a real S3 server, without and with added latency
    (:mod:`spade_ray.apps.store_bench`, which also reports (d)'s steady state and start-up apart).

R1 = throughput (c) / throughput (a): how close scoring is to the forward pass (1 = free); (a) and
(c) alternate for a few rounds and the round with the median ratio is reported.
R2 = time (e) / time (c): the speed-up over the published code.
R3 = steady time per image of the score job (d) / time (c); R4 = (g) / (f): what the store's latency costs.
"""

from __future__ import annotations

import json
import os
import platform
import shutil
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch

from spade_ray.apps.procwatch import ProcessPeaks
from spade_ray.apps.store_bench import ScoreRun, format_store, run_store_stages, store_figures, store_unavailable
from spade_ray.apps.synthetic import make_synthetic_dataset
from spade_ray.method.features import FeatureBatch, features_from_tensor
from spade_ray.method.fusion import fuse_levels
from spade_ray.method.image_scoring import knn_score
from spade_ray.method.reference import reference_level_distances
from spade_ray.method.timing import peak_rss_mb
from spade_ray.model import Spade
from spade_ray.progress import Progress, no_progress
from spade_ray.storage.datasets import load_mvtec
from spade_ray.storage.featurestore import list_feature_shards, read_features, table_to_features
from spade_ray.storage.images import load_image

if TYPE_CHECKING:
    from spade_ray.distributed.pipeline import JobSummary

__all__ = ["format_bench", "run_bench"]


def _evenly(items: list, n: int) -> list:
    if n >= len(items):
        return list(items)
    return [items[i] for i in np.linspace(0, len(items) - 1, n).round().astype(int)]


def _write_list(path: Path, uris: list[str]) -> str:
    path.write_text("\n".join(uris) + "\n")
    return str(path)


def _time_forward(model: Spade, images: list[np.ndarray]) -> float:
    """Seconds per image of the backbone alone, on preprocessed tensors already in memory."""
    tensors = [model.preprocessor.to_tensor(images[i : i + model.batch_size]) for i in range(0, len(images), model.batch_size)]
    features_from_tensor(model.backbone, tensors[0])  # warm-up: first-call allocations are not the steady state
    start = time.perf_counter()
    for tensor in tensors:
        features_from_tensor(model.backbone, tensor)
    return (time.perf_counter() - start) / len(images)


def _time_predict(model: Spade, uris: list[str]) -> tuple[float, dict[str, float]]:
    """Seconds per image of ``Spade.predict`` and its per-stage seconds per image."""
    model.predict(uris[: model.batch_size])  # warm-up
    model.timer.seconds.clear()
    start = time.perf_counter()
    model.predict(uris)
    seconds = (time.perf_counter() - start) / len(uris)
    return seconds, {k: round(v / len(uris), 5) for k, v in model.timer.as_dict().items()}


def _time_reference(model: Spade, uris: list[str]) -> float:
    """Seconds per image of scoring with the published correspondence loop (same forward, retrieval, fusion)."""
    cfg = model.config
    assert model.bank is not None
    start = time.perf_counter()
    for uri in uris:
        image = load_image(uri)
        query = features_from_tensor(model.backbone, model.preprocessor.to_tensor([image]))
        dists, rows = model.bank.search(query.global_, max(cfg.image_k, cfg.pixel_k))
        knn_score(dists, cfg.image_k)
        gallery = np.sort(rows[0, : cfg.pixel_k])
        level_maps = [reference_level_distances(torch.from_numpy(level[0]), torch.from_numpy(bank[gallery]))
                      for level, bank in zip(query.levels, model.bank.levels)]
        fuse_levels(level_maps, cfg.image_size, cfg.sigma)
    return (time.perf_counter() - start) / len(uris)


Round = tuple[float, float, float, dict[str, float]]  # (R1, (a) s/image, (c) s/image, (c)'s per-stage s/image)


@dataclass
class _Measured:
    """What the stages measured, kept together until the figures are written."""

    extract: JobSummary  # (b)
    build: JobSummary  # the bank that (c), (d) and (e) score against (not a timed stage)
    rounds: list[Round]  # (a) and (c), alternating
    exact: float | None  # (c'), when (c) does not already match exactly
    reference: float  # (e)
    score: JobSummary  # (d)
    peaks_extract: ProcessPeaks
    peaks_score: ProcessPeaks


def _synthetic_dataset(work: Path, log: Callable[[str], None]) -> str:
    """The dataset used without ``--dataset``: made once per work folder, reused by later runs."""
    dataset = str(work / "dataset")
    if not (work / "dataset" / "train").is_dir():
        log(f"no --dataset: making a synthetic one in {dataset}")
        make_synthetic_dataset(dataset, n_train=64, n_test_good=16, n_test_per_defect=16)
    return dataset


def _run_extract_job(train_list: str, work: Path, protocol: str, progress: Progress,
                     log: Callable[[str], None], gpus_per_actor: float | None = None) -> tuple[JobSummary, ProcessPeaks]:
    """(b): the extract job over the bank's normal images, with its actors' peak memory."""
    from spade_ray.distributed.extract_job import run_extract

    shutil.rmtree(work / "features", ignore_errors=True)  # (b) must extract, not resume a previous run
    with ProcessPeaks() as peaks:
        extract = run_extract(train_list, str(work / "features"), protocol=protocol, progress=progress,
                              gpus_per_actor=gpus_per_actor)
    log(extract.line())
    return extract, peaks


def _build_bank(work: Path, shards: int, scoring: dict[str, Any] | None, progress: Progress,
                log: Callable[[str], None]) -> JobSummary:
    """The sharded bank that (d) serves, from (b)'s features."""
    from spade_ray.distributed.build_bank_job import run_build_bank

    # a small calibration: the score job needs thresholds (their values do not change its speed)
    build = run_build_bank(str(work / "features"), str(work / "bank"), shards=shards, calibration_samples=8,
                           scoring=scoring, progress=progress)
    log(build.line())
    return build


def _stop_ray() -> None:
    """The in-process stages run alone, as they would in a notebook; (d) restarts Ray."""
    # On a small machine Ray's daemons and idle workers otherwise take a share of the cores from (a)
    # and (c) alike, and the figures then depend on what Ray happens to be doing (measured on 2
    # cores: forward 0.025 -> 0.020 s, correspondence 0.016 -> 0.012 s per image once Ray is stopped).
    import ray

    ray.shutdown()


def _read_bank_features(work: Path) -> tuple[list[str], FeatureBatch]:
    """The ids and features (b) wrote, for the in-process models."""
    table, _ = read_features(list_feature_shards(str(work / "features")))
    ids, _, bank = table_to_features(table)
    return ids, bank


def _calibrated_model(protocol: str, scoring: dict[str, Any], ids: list[str], bank: FeatureBatch) -> Spade:
    """An in-process model over the bank; calibrated because the knn+map image score needs the normal scales (not timed)."""
    model = Spade("lite0", protocol=protocol, **scoring)
    model.set_bank(ids, bank.global_, bank.levels)
    model.calibration = model.calibrate(8)
    return model


def _alternate_forward_and_predict(model: Spade, test: list[str], rounds: int, log: Callable[[str], None]) -> list[Round]:
    """(a) and (c), alternating for ``rounds`` rounds, so that a machine's drift in speed does not decide R1.

    The caller reports the round with the median ratio.
    """
    # a shared machine's speed drifts by 10-20% within minutes, and two stages timed once, one
    # after the other, would carry that drift into R1
    images = [load_image(uri) for uri in test]
    measured = []
    for round_ in range(max(1, rounds)):
        log(f"(a) backbone forward on {len(test)} images (round {round_ + 1} of {max(1, rounds)}) ...")
        a_seconds = _time_forward(model, images)
        log(f"(c) in-process scoring ({model.config.matching} matching) ...")
        c_seconds, c_stages = _time_predict(model, test)
        measured.append((a_seconds / c_seconds, a_seconds, c_seconds, c_stages))
    return measured


def _median_round(rounds: list[Round]) -> Round:
    """The round whose R1 is the median (the lower one of an even count)."""
    ordered = sorted(rounds, key=lambda r: r[0])
    return ordered[(len(ordered) - 1) // 2]


def _time_exact_predict(model: Spade, protocol: str, scoring: dict[str, Any] | None, ids: list[str], bank: FeatureBatch,
                        test: list[str], log: Callable[[str], None]) -> float | None:
    """(c'): in-process scoring with exact matching, the published method's, when (c) used another."""
    if model.config.matching == "exact":
        return None
    log("(c') in-process scoring, exact matching ...")
    exact_model = _calibrated_model(protocol, {**(scoring or {}), "matching": "exact"}, ids, bank)
    exact, _ = _time_predict(exact_model, test)
    return exact


def _run_score_job(test_list: str, work: Path, shards: int, batch_size: int, address: str | None, progress: Progress,
                   log: Callable[[str], None], gpus_per_actor: float | None = None) -> tuple[JobSummary, ProcessPeaks]:
    """(d): the distributed score job against the sharded bank, with its actors' peak memory."""
    from spade_ray.distributed.runtime import init_ray
    from spade_ray.distributed.score_job import run_score

    log(f"(d) distributed scoring with {shards} shard actors ...")
    init_ray(address)
    with ProcessPeaks() as peaks:
        score = run_score(test_list, str(work / "bank"), str(work / "scored"), batch_size=batch_size, overwrite=True,
                          progress=progress, gpus_per_actor=gpus_per_actor)
    log(score.line())
    return score, peaks


def _per_second(summary: JobSummary) -> float | None:
    """Seconds per image of a job, None when it scored nothing."""
    return 1 / summary.images_per_second if summary.images_per_second else None


def _figures(measured: _Measured, model: Spade, dataset: str, protocol: str, test: list[str], reference_images: int,
             torch_threads: int, work: Path) -> dict[str, Any]:
    """The figures ``--json`` writes and :func:`format_bench` prints."""
    _, forward, scored, stages = _median_round(measured.rounds)
    exact, reference = measured.exact, measured.reference
    per_image = {"a_forward": forward, "b_extract_job": _per_second(measured.extract),
                 "c_in_process": scored, "d_distributed": _per_second(measured.score),
                 "e_reference": reference}
    if exact is not None:
        per_image["c_in_process_exact"] = exact
    result: dict[str, Any] = {
        "dataset": dataset,
        "protocol": protocol,
        "settings": replace(model.config).scoring(),
        "machine": {"cpus": os.cpu_count(), "torch_threads": torch_threads, "platform": platform.platform(),
                    "torch": torch.__version__, "device": str(model.backbone.device)},
        "images": {"bank": measured.build.extra.get("n_images"), "test": len(test),
                   "reference": min(reference_images, len(test))},
        "seconds_per_image": {k: round(v, 5) if v is not None else None for k, v in per_image.items()},
        "images_per_second": {k: round(1 / v, 2) if v else None for k, v in per_image.items()},
        "in_process_stages_seconds_per_image": stages,
        "R1_scoring_vs_forward_throughput": round(forward / scored, 3),
        "R1_rounds": [round(r[0], 3) for r in measured.rounds],
        "R2_reference_vs_scoring_time": round(reference / scored, 1),
        "bank_bytes_per_image": measured.build.extra.get("bytes_per_image"),
        "peak_rss_mib": {"driver (in-process model)": round(peak_rss_mb(), 1), **measured.peaks_extract.mib(),
                         **measured.peaks_score.mib()},
        "devices": {"b_extract_job": measured.extract.extra.get("devices"),
                    "d_distributed": measured.score.extra.get("devices")},
        "workdir": str(work),
    }
    if exact is not None:
        result["R1_exact"] = round(forward / exact, 3)
        result["R2_exact"] = round(reference / exact, 1)
    return result


def run_bench(
    dataset: str | None = None,
    *,
    test_images: int = 64,
    reference_images: int = 4,
    rounds: int = 3,
    shards: int = 2,
    protocol: str = "paper",
    scoring: dict[str, Any] | None = None,
    workdir: str | None = None,
    address: str | None = None,
    batch_size: int = 16,
    store: bool = True,
    store_latency_ms: float = 20.0,
    gpus_per_actor: float | None = None,
    progress: Progress = no_progress,
    log: Callable[[str], None] = print,
) -> dict[str, Any]:
    """Run stages (a)-(g) and return the figures (also what ``--json`` writes); ``store=False`` skips (f) and (g)."""
    from spade_ray.distributed.runtime import init_ray

    work = Path(workdir or tempfile.mkdtemp(prefix="spade-ray-bench-"))
    work.mkdir(parents=True, exist_ok=True)
    if dataset is None:
        dataset = _synthetic_dataset(work, log)
    data = load_mvtec(dataset)
    test = [s.uri for s in _evenly(data.test, test_images)]
    train_list = _write_list(work / "train.txt", [s.uri for s in data.train])
    test_list = _write_list(work / "test.txt", test)
    torch_threads = torch.get_num_threads()
    init_ray(address)

    extract, peaks_extract = _run_extract_job(train_list, work, protocol, progress, log, gpus_per_actor)
    build = _build_bank(work, shards, scoring, progress, log)
    _stop_ray()
    ids, bank = _read_bank_features(work)
    model = _calibrated_model(protocol, scoring or {}, ids, bank)
    rounds_measured = _alternate_forward_and_predict(model, test, rounds, log)
    exact = _time_exact_predict(model, protocol, scoring, ids, bank, test, log)
    log(f"(e) published correspondence loop on {min(reference_images, len(test))} images ...")
    reference = _time_reference(model, test[:reference_images])
    score, peaks_score = _run_score_job(test_list, work, shards, batch_size, address, progress, log, gpus_per_actor)
    skipped = store_unavailable() if store else "--no-store"
    if skipped and store:
        log(f"(f) and (g) skipped: {skipped}")
    stored = None if skipped else run_store_stages(
        dataset, test, work / "bank", str(work / "scored"), latency_ms=store_latency_ms, batch_size=batch_size,
        address=address, progress=progress, log=log)

    measured = _Measured(extract, build, rounds_measured, exact, reference, score, peaks_extract, peaks_score)
    result = _figures(measured, model, dataset, protocol, test, reference_images, torch_threads, work)
    result.update(store_figures(ScoreRun(score, peaks_score, str(work / "scored")), stored, _median_round(rounds_measured)[2],
                                latency_ms=store_latency_ms, batch_size=batch_size, skipped=skipped))
    (work / "bench.json").write_text(json.dumps(result, indent=2))
    return result


def format_bench(result: dict[str, Any]) -> str:
    """The human-readable table printed by ``spade-ray bench``."""
    names = {"a_forward": "(a) backbone forward", "b_extract_job": "(b) extract job (decode+forward+write)",
             "c_in_process": f"(c) in-process scoring [{result['settings']['matching']}]",
             "c_in_process_exact": "(c') in-process scoring [exact]", "d_distributed": "(d) distributed scoring job",
             "e_reference": "(e) published correspondence loop"}
    lines = [f"{'stage':<44}{'s/image':>10}{'images/s':>10}"]
    for key, label in names.items():
        if key in result["seconds_per_image"]:
            s, ips = result["seconds_per_image"][key], result["images_per_second"][key]
            s, ips = (float("nan") if v is None else v for v in (s, ips))
            lines.append(f"{label:<44}{s:>10.4f}{ips:>10.1f}")
    stages = result["in_process_stages_seconds_per_image"]
    lines.append("in-process stages (s/image): " + ", ".join(f"{k} {v:.4f}" for k, v in stages.items()))
    r = f"R1 = {result['R1_scoring_vs_forward_throughput']:.3f}   R2 = {result['R2_reference_vs_scoring_time']:.1f}"
    if len(result.get("R1_rounds", [])) > 1:
        r += f"   (R1 of each round: {', '.join(f'{v:.3f}' for v in result['R1_rounds'])}; the median round is reported)"
    if "R1_exact" in result:
        r += f"   (exact matching: R1 = {result['R1_exact']:.3f}, R2 = {result['R2_exact']:.1f})"
    lines.append(r)
    lines.append(f"bank: {result['bank_bytes_per_image'] / 1024:.0f} KiB per image")
    lines.append("peak RSS (MiB): " + ", ".join(f"{k} {v:.0f}" for k, v in result["peak_rss_mib"].items()))
    if "score_job" in result:
        lines.extend(format_store(result))
    m = result["machine"]
    lines.append(f"machine: {m['cpus']} CPUs, {m['torch_threads']} torch threads, {m['device']}; "
                 f"{result['images']['test']} test images, bank of {result['images']['bank']}")
    return "\n".join(lines)
