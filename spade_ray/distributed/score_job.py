"""The score job: images -> masks, heatmaps, overlays, result rows and the report, against a served bank."""

from __future__ import annotations

import time
from typing import Any

import pyarrow.compute as pc

from spade_ray.bank.ignore_mask import load_ignore_mask
from spade_ray.bank.manifest import BankManifest
from spade_ray.bank.store import check_compatible, open_bank
from spade_ray.distributed.decode_stage import DecodeImages
from spade_ray.distributed.devices import gpus_per_actor as resolve_gpus
from spade_ray.distributed.devices import shard_gpus as resolve_shard_gpus
from spade_ray.distributed.pipeline import JobSummary, new_run_id, run_pipeline
from spade_ray.distributed.remote_bank import calibrate_served
from spade_ray.distributed.runtime import init_ray
from spade_ray.distributed.score_stage import ScoreImages
from spade_ray.distributed.shard_actors import ServedBank, shard_actor_cpus, start_shard_actors
from spade_ray.distributed.write_stage import WriteResults
from spade_ray.method.backbones import BACKBONES
from spade_ray.method.calibration import Calibration
from spade_ray.method.config import SpadeConfig
from spade_ray.method.decision import Thresholds
from spade_ray.method.ignore import IgnoreRegion
from spade_ray.method.preprocess import Preprocessor
from spade_ray.progress import Progress, no_progress
from spade_ray.report.report import DEFAULT_REPORT_TOP, score_report, write_report
from spade_ray.storage.artifacts import ArtifactChoice
from spade_ray.storage.done_set import DoneSet
from spade_ray.storage.images import DEFAULT_MAX_PIXELS
from spade_ray.storage.outputs import unique_output_stems
from spade_ray.storage.results import drop_error_rows, read_results, remove_results
from spade_ray.storage.sources import resolve_inputs
from spade_ray.storage.urls import join

__all__ = ["SCORER_CONCURRENT_BATCHES", "run_score"]

# Batches a scorer actor works on at once, in threads: while one batch waits for the shard actors'
# answers, the next one's backbone runs (torch releases the GIL), so the actor's cores do not idle
# through every round trip to the shards.
SCORER_CONCURRENT_BATCHES = 2


def _check_weights_on_driver(manifest: BankManifest, config: SpadeConfig, weights: str | None) -> None:
    """Refuse a bank of another backbone or other weights before any worker starts.

    The scorer actors check again (they are what really loads the weights); this check only makes
    the common mistake one clear error.  A driver that cannot see the weights file leaves it to them.
    """
    from spade_ray.method.backbones import WeightsNotFoundError, file_sha256, weights_path

    try:
        sha = file_sha256(weights_path(config.backbone, weights))
    except WeightsNotFoundError:
        return
    check_compatible(manifest, config.backbone, sha, config.image_size, config.protocol)


def _open_bank(bank_url: str, storage_options: dict[str, Any] | None) -> tuple[str, BankManifest, IgnoreRegion | None]:
    """(bank root, manifest, ignore region): the mask is read and verified once, here; the actors get the small array."""
    bank_root, manifest = open_bank(bank_url, storage_options)
    return bank_root, manifest, load_ignore_mask(bank_root, manifest, storage_options)


def _done_images(output: str, bank_id: str, overwrite: bool, retry_errors: bool,
                 storage_options: dict[str, Any] | None) -> DoneSet:
    """The images with a row in ``output`` that this run keeps (and so skips), compact (10^7 rows fit).

    ``overwrite`` removes every result first; ``retry_errors`` drops the error rows first; results
    of another bank in the same output are refused, so it always holds one row per image.
    """
    if overwrite:
        remove_results(output, storage_options)
        return DoneSet.empty()
    existing = read_results(output, ["image_id", "bank_id", "status"], storage_options)
    others = set(pc.unique(existing.column("bank_id")).to_pylist()) - {bank_id}
    if others:
        raise ValueError(f"{output} holds results scored against another bank ({', '.join(sorted(map(str, others)))}); "
                         f"use --overwrite to replace them or choose another --output")
    done = DoneSet.from_rows(existing)
    if retry_errors and len(done.errors):
        drop_error_rows(output, storage_options)
        done = DoneSet.from_rows(existing.filter(pc.equal(existing.column("status"), "ok")))
    return done


def _decision(served: ServedBank | None, config: SpadeConfig, calibration: Calibration | None, threshold: float | None,
              image_threshold: float | None, batch_size: int, progress: Progress,
              ignore: IgnoreRegion | None = None) -> tuple[Thresholds, Calibration | None]:
    """The thresholds this run decides with, and the calibration (with the scales) its scores follow.

    Settings other than the bank's change the normal scores, so the bank is recalibrated on the
    served shards first; explicit thresholds win over calibrated ones.
    """
    if calibration is not None and not calibration.matches(config):
        assert served is not None
        calibration = calibrate_served(served, config, max(calibration.n_images, 2), calibration.target_fpr, batch_size,
                                       progress, ignore)
    if calibration is not None:
        calibration = calibration.for_image_scoring(config.image_scoring)
    pixel = threshold if threshold is not None else calibration.pixel_threshold  # type: ignore[union-attr]
    image = image_threshold if image_threshold is not None else calibration.image_threshold  # type: ignore[union-attr]
    return Thresholds(float(image), float(pixel)), calibration


def _serve(bank_root: str, manifest: BankManifest, aggregate: int, storage_options: dict[str, Any] | None,
           address: str | None, gpus_per_actor: float | None, shard_gpus: float) -> tuple[ServedBank, float, float]:
    """Join Ray and start the bank's shard actors; returns them, the CPUs they reserve, and each scorer's GPUs.

    The GPUs are settled before any actor starts, so a request the cluster cannot meet fails in one line.
    """
    init_ray(address)
    n_shards = len(manifest.shards)
    per_shard = resolve_shard_gpus(shard_gpus, n_shards)
    scorer_gpus = resolve_gpus(gpus_per_actor, reserved=per_shard * n_shards)
    cpus = shard_actor_cpus(n_shards)
    served = start_shard_actors(bank_root, manifest, storage_options, num_cpus=cpus, aggregate=aggregate, num_gpus=per_shard)
    return served, cpus * n_shards, scorer_gpus


def _write_report(output: str, source: str, bank_id: str, thresholds: Thresholds, preprocessor: Preprocessor,
                  summary: JobSummary, n_items: int, report_top: int, storage_options: dict[str, Any] | None,
                  progress: Progress, ignore: IgnoreRegion | None) -> None:
    """``output/report.html`` over every result row in ``output``; its URL and the anomalous count go in the summary."""
    bar = progress(min(report_top, n_items), "report")
    try:
        report = score_report(output, source=source, bank_id=bank_id, thresholds=thresholds, preprocessor=preprocessor,
                              skipped=summary.skipped, top=report_top, storage_options=storage_options,
                              progress=bar.update, ignore=ignore)
    finally:
        bar.close()
    summary.extra["report"] = join(output, "report.html")
    summary.extra["anomalous"] = report.counts["anomalous"]
    write_report(summary.extra["report"], report, storage_options)


def run_score(source: str, bank_url: str, output: str, *, weights: str | None = None, image_k: int | None = None,
              pixel_k: int | None = None, kappa: int | None = None, scoring: dict[str, Any] | None = None,
              threshold: float | None = None, image_threshold: float | None = None, batch_size: int = 16,
              max_actors: int | None = None, overwrite: bool = False, retry_errors: bool = False, save_maps: bool = False,
              artifacts: ArtifactChoice | None = None, max_pixels: int = DEFAULT_MAX_PIXELS,
              storage_options: dict[str, Any] | None = None, address: str | None = None, progress: Progress = no_progress,
              report_top: int = DEFAULT_REPORT_TOP, gpus_per_actor: float | None = None,
              shard_gpus: float = 0.0) -> JobSummary:
    """Score every image under ``source`` against a served bank; masks, heatmaps, overlays and result rows to ``output``.

    Images already scored into ``output`` against the same bank are skipped (``overwrite`` redoes
    them all, ``retry_errors`` only those whose row is an error); the mask threshold defaults to
    the bank's normal-only calibration.  ``artifacts`` chooses the pictures written (default: masks
    for every image, heatmaps and overlays for the flagged ones); ``save_maps`` adds the raw maps.
    Finally ``output/report.html`` shows everything scored into ``output``, with the
    ``report_top`` most anomalous images.  GPUs: ``gpus_per_actor`` per scorer (None: 1 if any), ``shard_gpus`` per shard.
    """
    start = time.perf_counter()
    bank_root, manifest, ignore = _open_bank(bank_url, storage_options)
    config = manifest.built_config().with_scoring({"image_k": image_k, "pixel_k": pixel_k, "kappa": kappa, **(scoring or {})})
    calibration = manifest.built_calibration()
    if calibration is None and (threshold is None or image_threshold is None or config.image_scoring != "knn"):
        raise ValueError(f"bank {bank_url} has no calibration; pass --threshold and --image-threshold "
                         "(and --image-scoring knn: the knn+map score needs the normal scales)")
    _check_weights_on_driver(manifest, config, weights)
    items = resolve_inputs(source, storage_options)
    bank_id = manifest.bank_id
    done = _done_images(output, bank_id, overwrite, retry_errors, storage_options)
    ids = [it.image_id for it in items]
    todo = [it for it, held in zip(items, done.holds(ids)) if not held]
    summary = JobSummary("score", started=start, skipped=len(items) - len(todo), output=output,
                         skipped_error=done.count_errors(ids), extra={"bank_id": bank_id})
    spec = BACKBONES[config.backbone]
    pre = Preprocessor(config.image_size, config.protocol, spec.mean, spec.std)  # type: ignore[arg-type]
    recalibrate = calibration is not None and not calibration.matches(config)
    served, shard_cpus, scorer_gpus = None, 0.0, 0.0
    if recalibrate or todo:
        served, shard_cpus, scorer_gpus = _serve(bank_root, manifest, config.aggregate, storage_options, address,
                                                 gpus_per_actor, shard_gpus)
    try:
        thresholds, calibration = _decision(served, config, calibration, threshold, image_threshold, batch_size, progress, ignore)
        summary.extra.update(pixel_threshold=thresholds.pixel, image_threshold=thresholds.image, recalibrated=recalibrate)
        if todo:
            keys = unique_output_stems((it.image_id, it.relpath) for it in items)  # all inputs: same keys on a rerun
            choice = (artifacts or ArtifactChoice()).adding({"maps"} if save_maps else set())
            run_pipeline(todo, DecodeImages(pre, storage_options, max_pixels, keep_encoded=choice.may_need_images),
                         ScoreImages, {"bank": served, "config": config, "weights": weights, "output": output,
                                       "thresholds": thresholds, "artifacts": choice, "max_pixels": max_pixels,
                                       "scales": calibration.scales if calibration else None, "ignore": ignore},
                         batch_size, max_actors, summary, progress, "score", reserved_cpus=shard_cpus, keys=keys,
                         write=(WriteResults, {"output": output, "run_id": new_run_id(), "storage_options": storage_options}),
                         concurrent_batches=SCORER_CONCURRENT_BATCHES, gpus_per_actor=scorer_gpus,
                         reserved_gpus=served.gpus if served else 0.0)
    finally:
        if served is not None:
            served.shutdown()
    _write_report(output, source, bank_id, thresholds, pre, summary, len(items), report_top, storage_options, progress, ignore)
    summary.seconds = time.perf_counter() - start
    return summary
