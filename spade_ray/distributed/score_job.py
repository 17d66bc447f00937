"""The score job: images -> masks, heatmaps, overlays, result rows and the report, against each image's served bank.

``score --bank`` is the one-route case of ``score --routes``: the same planning (:mod:`bank_plan`),
the same waves of served banks, the same pipeline and writer.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Any

import ray

from spade_ray.bank.store import open_bank
from spade_ray.distributed.bank_plan import BankPlan, BankPlanner, done_images, pack_waves
from spade_ray.distributed.decode_stage import DecodeImages
from spade_ray.distributed.devices import gpus_per_actor as resolve_gpus
from spade_ray.distributed.devices import shard_gpus as resolve_shard_gpus
from spade_ray.distributed.input_blocks import InputBlocks
from spade_ray.distributed.pipeline import JobSummary, new_run_id, run_pipeline
from spade_ray.distributed.remote_bank import calibrate_served
from spade_ray.distributed.runtime import init_ray
from spade_ray.distributed.score_inputs import plan_inputs
from spade_ray.distributed.score_stage import ScoreImages, ScoreTarget
from spade_ray.distributed.shard_actors import ServedBank, shard_actor_cpus, start_shard_actors
from spade_ray.distributed.write_stage import WriteResults
from spade_ray.method.backbones import BACKBONES
from spade_ray.method.calibration import Calibration
from spade_ray.method.config import SpadeConfig
from spade_ray.method.decision import Thresholds
from spade_ray.method.ignore import IgnoreRegion
from spade_ray.method.preprocess import Preprocessor
from spade_ray.progress import Progress, no_progress
from spade_ray.report.report import DEFAULT_REPORT_TOP, Report, score_report
from spade_ray.report.routed_report import BankSection, RoutedReport, routed_report, write_routed_report
from spade_ray.storage.artifacts import ArtifactChoice
from spade_ray.storage.images import DEFAULT_MAX_PIXELS
from spade_ray.storage.results import batch_name, drop_image_rows, write_results
from spade_ray.storage.routes import RoutingTable
from spade_ray.storage.sources import LISTING_CHUNK, InputImage, list_chunks
from spade_ray.storage.urls import join

__all__ = ["SCORER_CONCURRENT_BATCHES", "run_score"]

# Batches a scorer actor works on at once, in threads: while one batch waits for the shard actors'
# answers, the next one's backbone runs (torch releases the GIL), so the actor's cores do not idle
# through every round trip to the shards.
SCORER_CONCURRENT_BATCHES = 2


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


@dataclass(frozen=True)
class _Run:
    """The run-wide settings every bank of a score run shares (per-bank ones are in its :class:`BankPlan`)."""

    output: str
    weights: str | None
    batch_size: int
    max_actors: int | None
    artifacts: ArtifactChoice
    max_pixels: int
    storage_options: dict[str, Any] | None
    progress: Progress
    gpus_per_actor: float | None
    shard_gpus: float
    bank_memory: float | None


def default_bank_memory() -> float:
    """Half the memory Ray may give tasks and actors: the rest is for the scorers, the decode tasks and Ray itself."""
    return 0.5 * float(ray.cluster_resources().get("memory", 8 * 2**30))


def _serve_wave(wave: list[BankPlan], run: _Run) -> tuple[dict[str, ServedBank], float, float]:
    """Start the shard actors of every bank of the wave; returns them, the CPUs they reserve, and each scorer's GPUs.

    The GPUs are settled before any actor starts, so a request the cluster cannot meet fails in one line.
    """
    n_shards = sum(len(plan.manifest.shards) for plan in wave)
    per_shard = resolve_shard_gpus(run.shard_gpus, n_shards)
    scorer_gpus = resolve_gpus(run.gpus_per_actor, reserved=per_shard * n_shards)
    cpus = shard_actor_cpus(n_shards)
    served: dict[str, ServedBank] = {}
    try:
        for plan in wave:
            served[plan.key] = start_shard_actors(plan.bank_root, plan.manifest, run.storage_options, num_cpus=cpus,
                                                  aggregate=plan.config.aggregate, num_gpus=per_shard)
    except BaseException:
        for bank in served.values():
            bank.shutdown()
        raise
    return served, cpus * n_shards, scorer_gpus


Decisions = dict[str, tuple[Thresholds, Calibration | None]]


def _score_wave(wave: list[BankPlan], run: _Run, summary: JobSummary, decisions: Decisions) -> None:
    """Serve the wave's banks, decide each one's thresholds (recalibrating where settings changed), score their images."""
    served, shard_cpus, scorer_gpus = _serve_wave(wave, run)
    try:
        targets = []
        for plan in wave:
            decisions[plan.key] = _decision(served[plan.key], plan.config, plan.calibration, plan.threshold,
                                            plan.image_threshold, run.batch_size, run.progress, plan.ignore)
            thresholds, calibration = decisions[plan.key]
            targets.append(ScoreTarget(plan.key, served[plan.key], plan.config, thresholds,
                                       calibration.scales if calibration else None, plan.ignore))
        todo = InputBlocks()
        for plan in wave:
            todo.extend(plan.todo)
        if not todo.rows:
            return
        pre = _preprocessor(wave[0].config)
        decode = DecodeImages(pre, run.storage_options, run.max_pixels, keep_encoded=run.artifacts.may_need_images,
                              whole_frames=wave[0].config.tiling.enabled)
        run_pipeline(todo, decode, ScoreImages, {"targets": targets, "weights": run.weights, "output": run.output,
                                                 "artifacts": run.artifacts, "max_pixels": run.max_pixels,
                                                 "chunk": run.batch_size},
                     run.batch_size, run.max_actors, summary, run.progress, "score", reserved_cpus=shard_cpus,
                     write=(WriteResults, {"output": run.output, "run_id": new_run_id(),
                                           "storage_options": run.storage_options}),
                     concurrent_batches=SCORER_CONCURRENT_BATCHES, gpus_per_actor=scorer_gpus,
                     reserved_gpus=sum(bank.gpus for bank in served.values()))
    finally:
        for bank in served.values():
            bank.shutdown()


def _preprocessor(config: SpadeConfig) -> Preprocessor:
    spec = BACKBONES[config.backbone]
    return Preprocessor(config.image_size, config.protocol, spec.mean, spec.std)  # type: ignore[arg-type]


def _score_banks(plans: list[BankPlan], run: _Run, summary: JobSummary, address: str | None) -> Decisions:
    """Every bank's thresholds, scoring the banks with work in waves that fit ``run.bank_memory`` (see :func:`pack_waves`)."""
    decisions: Decisions = {}
    if any(plan.needs_serving for plan in plans):
        init_ray(address)
        budget = run.bank_memory if run.bank_memory is not None else default_bank_memory()
        waves = pack_waves(plans, budget)
        summary.extra.update(bank_memory=budget, waves=[[plan.bank_id for plan in wave] for wave in waves])
        for wave in waves:
            _score_wave(wave, run, summary, decisions)
    for plan in plans:
        if plan.key not in decisions:  # nothing to score and nothing to recalibrate: the bank's own decision
            decisions[plan.key] = _decision(None, plan.config, plan.calibration, plan.threshold, plan.image_threshold,
                                            run.batch_size, run.progress, plan.ignore)
    return decisions


def _write_unmatched(items: list[InputImage], table: RoutingTable, run: _Run, summary: JobSummary) -> None:
    """An error row for each input no route matches ("no bank for ..."), through the result writer like any other."""
    if not items:
        return
    reason = f"no route of {table.source} matches it"
    rows = [{"uri": it.uri, "relpath": it.relpath, "image_id": it.image_id, "bank_id": None, "status": "error",
             "error": f"no bank for {it.uri}: {reason}"} for it in items]
    for start in range(0, len(rows), 1000):
        part = rows[start:start + 1000]
        write_results(run.output, part, batch_name(new_run_id(), [r["image_id"] for r in part]), run.storage_options)
    summary.error += len(rows)
    summary.errors.extend((r["image_id"], r["error"]) for r in rows)


def _write_report(source: str, table: RoutingTable, plans: list[BankPlan], decisions: Decisions, summary: JobSummary,
                  n_items: int, report_top: int, run: _Run) -> None:
    """``output/report.html`` over every result row in ``output``: one bank's page, or a section per bank."""
    sections = [BankSection(plan.bank_id, plan.route.label, plan.route.bank, decisions[plan.key][0],
                            _preprocessor(plan.config), plan.ignore) for plan in plans]
    bar = run.progress(min(report_top * max(len(plans), 1), n_items), "report")
    try:
        if len(plans) == 1 and not summary.extra.get("no_bank"):
            s = sections[0]
            report: Report | RoutedReport = score_report(
                run.output, source=source, bank_id=s.bank_id, thresholds=s.thresholds, preprocessor=s.preprocessor,
                skipped=summary.skipped, top=report_top, storage_options=run.storage_options, progress=bar.update,
                ignore=s.ignore)
        else:
            report = routed_report(run.output, source=source, routes=table.source, sections=sections,
                                   skipped=summary.skipped, top=report_top, storage_options=run.storage_options,
                                   progress=bar.update)
    finally:
        bar.close()
    summary.extra["report"] = join(run.output, "report.html")
    summary.extra["anomalous"] = report.counts["anomalous"]
    parts = report.sections if isinstance(report, RoutedReport) else [(sections[0], report)]
    for section, part in parts:
        summary.extra["banks"][section.bank_id].update({k: part.counts[k] for k in ("images", "ok", "error", "anomalous")})
    write_routed_report(summary.extra["report"], report, run.storage_options)


def _bank_facts(plans: list[BankPlan], decisions: Decisions, summary: JobSummary) -> None:
    """Per bank in the summary (and the JSON log line): its route, URL, what this run did, its thresholds."""
    waves = {bank_id: i for i, wave in enumerate(summary.extra.get("waves", [])) for bank_id in wave}
    summary.extra["banks"] = {
        plan.bank_id: {"route": plan.route.label, "bank": plan.route.bank, "inputs": plan.inputs,
                       "scored": plan.todo.rows, "skipped": plan.inputs - plan.todo.rows,
                       "wave": waves.get(plan.bank_id), "recalibrated": plan.recalibrate,
                       "image_threshold": decisions[plan.key][0].image, "pixel_threshold": decisions[plan.key][0].pixel}
        for plan in plans}
    if len(plans) == 1:  # the one-bank run's summary, as before routing existed
        thresholds = decisions[plans[0].key][0]
        summary.extra.update(bank_id=plans[0].bank_id, pixel_threshold=thresholds.pixel, image_threshold=thresholds.image,
                             recalibrated=plans[0].recalibrate)


def run_score(source: str, bank: str | RoutingTable, output: str, *, weights: str | None = None,
              image_k: int | None = None, pixel_k: int | None = None, kappa: int | None = None,
              scoring: dict[str, Any] | None = None, threshold: float | None = None, image_threshold: float | None = None,
              batch_size: int = 16, max_actors: int | None = None, overwrite: bool = False, retry_errors: bool = False,
              save_maps: bool = False, artifacts: ArtifactChoice | None = None, max_pixels: int = DEFAULT_MAX_PIXELS,
              storage_options: dict[str, Any] | None = None, address: str | None = None, progress: Progress = no_progress,
              report_top: int = DEFAULT_REPORT_TOP, gpus_per_actor: float | None = None, shard_gpus: float = 0.0,
              bank_memory: float | None = None, listing_chunk: int = LISTING_CHUNK) -> JobSummary:
    """Score every image under ``source`` against its bank; masks, heatmaps, overlays and result rows to ``output``.

    ``bank``: one bank (URL) for every image, or a :class:`RoutingTable` sending each image to the
    bank of the first route that matches it; an image no route matches gets an error row ("no bank
    for ...").  Images already scored into ``output`` against the bank their route points to are
    skipped (``overwrite`` redoes them all, ``retry_errors`` only those whose row is an error); a
    one-bank output refuses rows of another bank, a routed one scores a re-routed image again.
    The mask threshold defaults to each bank's normal-only calibration.  ``artifacts`` chooses the
    pictures written (default: masks for every image, heatmaps and overlays for the flagged ones);
    ``save_maps`` adds the raw maps.  The banks' shard actors are served in waves that fit
    ``bank_memory`` bytes (default: half of Ray's memory).  Finally ``output/report.html`` shows
    everything scored into ``output``, per bank.  GPUs: ``gpus_per_actor`` per scorer (None: 1 if any),
    ``shard_gpus`` per shard.  The listing is read ``listing_chunk`` inputs at a time (see
    :func:`~spade_ray.storage.sources.list_chunks`): the driver never holds the whole night's inputs.
    """
    start = time.perf_counter()
    table = bank if isinstance(bank, RoutingTable) else RoutingTable.single(bank)
    choice = (artifacts or ArtifactChoice()).adding({"maps"} if save_maps else set())
    run = _Run(output, weights, batch_size, max_actors, choice, max_pixels, storage_options, progress, gpus_per_actor,
               shard_gpus, bank_memory)
    exclusive = not isinstance(bank, RoutingTable)
    # a wrong bank is the first error, and rows of another bank the second, before the inputs are listed
    banks = {open_bank(bank, storage_options)[1].bank_id} if exclusive else set()
    done = done_images(output, banks, overwrite, retry_errors, exclusive, storage_options)
    planner = BankPlanner({"image_k": image_k, "pixel_k": pixel_k, "kappa": kappa, **(scoring or {})}, threshold,
                          image_threshold, weights, storage_options)
    summary = JobSummary("score", started=start, output=output)
    counts = plan_inputs(list_chunks(source, storage_options, listing_chunk), table, planner, done, exclusive,
                         lambda items: _write_unmatched(items, table, run, summary), lambda: init_ray(address))
    drop_image_rows(output, counts.rerouted, storage_options)  # before scoring: an image never has two rows
    _write_unmatched(counts.unmatched_rerouted, table, run, summary)
    summary.skipped, summary.skipped_error = counts.skipped, counts.skipped_error
    summary.extra["no_bank"] = counts.no_bank
    plans = planner.plans
    decisions = _score_banks(plans, run, summary, address)
    _bank_facts(plans, decisions, summary)
    _write_report(source, table, plans, decisions, summary, counts.inputs, report_top, run)
    summary.seconds = time.perf_counter() - start
    return summary
