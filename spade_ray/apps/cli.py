"""The ``spade-ray`` command line.

Exit codes (what a scheduler acts on):

* 0 — the job ran; images that failed have ``status="error"`` rows with the reason (a summary on
  stdout, the first errors on stderr).
* 1 — the job could not run (bad bank, unreachable storage, ...): a one-line reason on stderr.
* 2 — wrong arguments (argparse).
* 3 — the job ran and wrote every row, but more images failed than ``--max-error-rate`` allows.
* 130 — interrupted (Ctrl-C, SIGINT).
* 143 — stopped by SIGTERM (a deleted or preempted Kubernetes job, ``ray job stop``): committed
  batches are kept, batches in flight are discarded whole; the rerun of the same command finishes.

``--help`` on each command documents its options (they are declared in :mod:`spade_ray.apps.cli_parser`).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
from collections.abc import Sequence
from typing import Any

from spade_ray.apps.cli_parser import build_parser
from spade_ray.apps.config_file import parse_args
from spade_ray.apps.logs import configure_logging, fields, get_logger
from spade_ray.apps.stderr_filter import filtered_stderr
from spade_ray.apps.tile_options import tiling_of
from spade_ray.distributed.preemption import EXIT_PREEMPTED, Preempted, graceful_sigterm
from spade_ray.errors import error_message
from spade_ray.method.config import METHODS
from spade_ray.progress import Progress, terminal_progress
from spade_ray.storage.artifacts import ArtifactChoice

__all__ = ["EXIT_TOO_MANY_ERRORS", "build_parser", "main"]


def _progress(args: argparse.Namespace) -> Progress:
    """Bars only for a person at a terminal: not with --quiet, not when stderr is a file or a pipe, not for JSON logs."""
    return terminal_progress(quiet=args.quiet or args.log_format == "json")


def _storage_options(text: str | None) -> dict[str, Any] | None:
    if not text:
        return None
    try:
        value = json.loads(text)
    except json.JSONDecodeError as exc:
        raise ValueError(f"--storage-options must be a JSON object: {exc}") from exc
    if not isinstance(value, dict):
        raise ValueError("--storage-options must be a JSON object, e.g. '{\"endpoint_url\": \"http://...\"}'")
    return value


EXIT_TOO_MANY_ERRORS = 3


def _scoring(args: argparse.Namespace) -> dict[str, Any]:
    """Scoring settings beyond image_k/pixel_k/kappa from the command line: the --method preset, then explicit options."""
    settings = dict(METHODS[args.method]) if getattr(args, "method", None) else {}
    settings.update({name: getattr(args, name) for name in ("matching", "coarse_k", "margin", "aggregate", "image_scoring")
                     if getattr(args, name, None) is not None})
    return settings


def _model_kwargs(args: argparse.Namespace) -> dict[str, Any]:
    return {
        "backbone": args.backbone,
        "weights": args.weights,
        "image_size": args.image_size,
        "image_k": args.image_k,
        "pixel_k": args.pixel_k,
        "kappa": args.kappa,
        "scoring": _scoring(args),
        "batch_size": args.batch_size,
    }


def _cmd_evaluate(args: argparse.Namespace) -> int:
    from spade_ray.apps.evaluate import evaluate, format_summary

    result = evaluate(
        args.dataset,
        args.output,
        protocol=args.protocol,
        calibration_samples=args.calibration_samples,
        target_fpr=args.target_fpr,
        write_maps=args.save_maps,
        report_top=args.report_top,
        storage_options=_storage_options(args.storage_options),
        max_pixels=args.max_pixels,
        progress=_progress(args),
        ignore_mask=args.ignore_mask,
        **_model_kwargs(args),
        tiling=tiling_of(args),
    )
    log = get_logger()
    metrics = {k: result[k] for k in ("image_auroc", "pixel_auroc", "aupro", "image_f1_max", "pixel_f1_max")}
    if args.log_format == "json":
        log.info("evaluate: done", **fields(stage="evaluate", n_train=result["n_train"], n_test=result["n_test"], **metrics,
                                             calibration=result["calibration"], per_defect_type=result["per_defect_type"],
                                             seconds=result["timing"]["total_seconds"],
                                             metrics_json=f"{args.output.rstrip('/')}/metrics.json", report=result["report"]))
    else:
        log.info(format_summary(result))
        log.info(f"metrics   {args.output.rstrip('/')}/metrics.json")
        log.info(f"report    {result['report']}")
    return 0


def _cmd_demo(args: argparse.Namespace) -> int:
    from spade_ray.apps.demo import run_demo

    output = args.output or tempfile.mkdtemp(prefix="spade-ray-demo-")
    log = get_logger()
    result = run_demo(output, seed=args.seed, image_size=args.image_size, image_k=args.image_k, pixel_k=args.pixel_k,
                      kappa=args.kappa, scoring=_scoring(args), batch_size=args.batch_size, shards=args.shards,
                      address=args.address, progress=_progress(args), report_top=args.report_top, log=log.info,
                      gpus_per_actor=args.gpus_per_actor)
    metrics = {k: result[k] for k in ("image_auroc", "pixel_auroc", "aupro", "image_f1_max", "pixel_f1_max")}
    if args.log_format == "json":
        log.info("demo: done", **fields(stage="demo", **metrics, output=output, report=os.path.join(output, "report.html")))
        return 0
    fmt = lambda v: "n/a" if v is None else f"{v:.3f}"  # noqa: E731
    log.info(f"image     AUROC {fmt(result['image_auroc'])}   F1-max {fmt(result['image_f1_max'])}")
    log.info(f"pixel     AUROC {fmt(result['pixel_auroc'])}   AUPRO {fmt(result['aupro'])}   "
             f"F1-max {fmt(result['pixel_f1_max'])}")
    log.info(f"report    {os.path.join(output, 'report.html')}  (open it in a browser)")
    log.info(f"metrics   {os.path.join(output, 'metrics.json')}")
    log.info(f"results   {os.path.join(output, 'results')}/*.parquet  (one row per test image)")
    log.info(f"masks     {os.path.join(output, 'masks')}/<type>/<name>.png  (white = anomalous)")
    log.info(f"heatmaps  {os.path.join(output, 'heatmaps')}/<type>/<name>.png")
    log.info(f"overlays  {os.path.join(output, 'overlays')}/<type>/<name>.jpg  (heatmap on the image, mask outline)")
    log.info(f"bank      {os.path.join(output, 'bank')}  (features in {os.path.join(output, 'features')})")
    return 0


def _finish(summary: Any, max_error_rate: float | None = None) -> int:
    """Errors first (at most 20, on stderr), then the one-line summary; exit 0, or 3 when the share
    of failed images is above ``max_error_rate``."""
    log = get_logger()
    for image_id, reason in summary.errors[:20]:
        log.warning(f"  error {image_id}: {reason}", **fields(stage=summary.job, image_id=image_id, reason=reason))
    if len(summary.errors) > 20:
        log.warning(f"  ... and {len(summary.errors) - 20} more errors (see the result rows)",
                    **fields(stage=summary.job, more_errors=len(summary.errors) - 20))
    log.info(summary.line(), **fields(**summary.fields()))
    if max_error_rate is not None and summary.error_rate > max_error_rate:
        total = summary.ok + summary.error + summary.skipped
        failed = summary.error + summary.skipped_error
        log.error(f"spade-ray {summary.job}: error: {failed} of {total} images failed ({summary.error_rate:.1%}), more than "
                  f"--max-error-rate {max_error_rate:g} allows; every image has its row in {summary.output} "
                  "(status/error columns)", **fields(stage=summary.job, error_rate=summary.error_rate))
        return EXIT_TOO_MANY_ERRORS
    return 0


def _cmd_extract(args: argparse.Namespace) -> int:
    from spade_ray.distributed.extract_job import run_extract

    summary = run_extract(args.input, args.output, backbone=args.backbone, weights=args.weights,
                          image_size=args.image_size, protocol=args.protocol, batch_size=args.batch_size,
                          max_actors=args.max_actors, max_pixels=args.max_pixels,
                          storage_options=_storage_options(args.storage_options),
                          address=args.address, progress=_progress(args), gpus_per_actor=args.gpus_per_actor,
                          tiling=tiling_of(args))
    return _finish(summary, args.max_error_rate)


def _cmd_build_bank(args: argparse.Namespace) -> int:
    from spade_ray.distributed.build_bank_job import run_build_bank

    summary = run_build_bank(args.features, args.output, shards=args.shards, add_to=args.add_to,
                             image_k=args.image_k, pixel_k=args.pixel_k, kappa=args.kappa, scoring=_scoring(args),
                             calibration_samples=args.calibration_samples, target_fpr=args.target_fpr,
                             batch_size=args.batch_size, storage_options=_storage_options(args.storage_options),
                             address=args.address, progress=_progress(args), ignore_mask=args.ignore_mask)
    x = summary.extra
    log = get_logger()
    if args.log_format == "text":
        log.info(f"bank {x['version']}: {x['n_images']} images in {x['shards']} shards, "
                 f"{x['bytes_per_image'] / 1024:.0f} KiB per image in memory (fp16 pyramids + fp32 global vector)")
        if x.get("ignore_mask"):
            log.info(f"ignore mask {x['ignore_mask']}: map values there are zero (calibration included)")
        if x.get("pixel_threshold") is not None:
            log.info(f"calibrated thresholds: image {x['image_threshold']:.4f}, pixel {x['pixel_threshold']:.4f}")
    return _finish(summary)


def _cmd_score(args: argparse.Namespace) -> int:
    from spade_ray.distributed.score_job import run_score
    from spade_ray.storage.routes import load_routes

    storage_options = _storage_options(args.storage_options)
    bank = load_routes(args.routes, storage_options) if args.routes else args.bank
    summary = run_score(args.input, bank, args.output, weights=args.weights, image_k=args.image_k,
                        pixel_k=args.pixel_k, kappa=args.kappa, scoring=_scoring(args), threshold=args.threshold,
                        image_threshold=args.image_threshold, batch_size=args.batch_size, max_actors=args.max_actors,
                        overwrite=args.overwrite, retry_errors=args.retry_errors,
                        artifacts=ArtifactChoice.parse(args.write, args.visuals, args.save_maps),
                        max_pixels=args.max_pixels, storage_options=storage_options,
                        address=args.address, progress=_progress(args), report_top=args.report_top,
                        gpus_per_actor=args.gpus_per_actor, shard_gpus=args.shard_gpus,
                        bank_memory=args.bank_memory * 2**30 if args.bank_memory else None)
    if args.log_format == "text":
        if args.routes:
            _log_banks(summary)
        get_logger().info(f"report {summary.extra['report']}")
    return _finish(summary, args.max_error_rate)


def _log_banks(summary: Any) -> None:
    """A routed run's line per bank (the JSON log has them in ``banks``), and the inputs no route matched."""
    log = get_logger()
    for bank_id, b in summary.extra.get("banks", {}).items():
        wave = f", wave {b['wave'] + 1} of {len(summary.extra['waves'])}" if b.get("wave") is not None else ""
        log.info(f"bank {b['route']} -> {b['bank']} ({bank_id}): {b['scored']} scored, {b['skipped']} skipped{wave}; "
                 f"in the output {b.get('ok', 0)} ok, {b.get('error', 0)} error, {b.get('anomalous', 0)} anomalous; "
                 f"thresholds image {b['image_threshold']:.4g}, pixel {b['pixel_threshold']:.4g}")
    if summary.extra.get("no_bank"):
        log.warning(f"{summary.extra['no_bank']} images matched no route: error rows 'no bank for ...'")


def _cmd_bench(args: argparse.Namespace) -> int:
    from spade_ray.apps.benchmark import format_bench, run_bench

    log = (lambda line: print(line, file=sys.stderr)) if args.json == "-" else get_logger().info
    result = run_bench(args.dataset, test_images=args.test_images, reference_images=args.reference_images,
                       rounds=args.rounds, batch_size=args.batch_size, store=args.store,
                       store_latency_ms=args.store_latency_ms, shards=args.shards, protocol=args.protocol,
                       scoring=_scoring(args), workdir=args.workdir, gpus_per_actor=args.gpus_per_actor,
                       address=args.address, progress=_progress(args), log=log)
    if args.json == "-":
        print(json.dumps(result, indent=2))
    else:
        print(format_bench(result))
        if args.json:
            with open(args.json, "w") as fh:
                json.dump(result, fh, indent=2)
    return 0


COMMANDS = {"bench": _cmd_bench, "demo": _cmd_demo, "evaluate": _cmd_evaluate, "extract": _cmd_extract,
            "build-bank": _cmd_build_bank, "score": _cmd_score}


def _use_storage_retry(args: argparse.Namespace) -> None:
    """The command's retry policy for this process and (through the environment) for the Ray workers it starts."""
    from spade_ray.storage.retry import StorageRetry, use_retry

    if getattr(args, "storage_retries", None) is not None:
        use_retry(StorageRetry(retries=args.storage_retries, seconds=args.storage_retry_seconds))


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(build_parser(), argv)
    log = configure_logging(args.log_format)
    try:
        _use_storage_retry(args)
        # filtered_stderr: Ray Data's harmless core-worker ERROR line, and only that, never reaches a person
        with graceful_sigterm(), filtered_stderr():
            return COMMANDS[args.command](args)
    except Preempted as stop:
        log.error(f"spade-ray {args.command}: stopped by SIGTERM ({stop.seconds():.1f} s to stop): committed batches are "
                  "kept, each batch in flight was committed whole or discarded; run the same command again to finish",
                  **fields(stage=args.command, reason="SIGTERM", stop_seconds=round(stop.seconds(), 3)))
        return EXIT_PREEMPTED
    except KeyboardInterrupt:
        log.error("spade-ray: interrupted", **fields(stage=args.command))
        return 130
    except Exception as exc:  # one-line reason, no traceback, for operators and CI logs
        if os.environ.get("SPADE_RAY_DEBUG"):
            raise
        from spade_ray.storage.retry import find_storage_failure

        reason = error_message(find_storage_failure(exc) or exc)  # a storage failure in a worker: its own line
        log.error(f"spade-ray {args.command}: error: {reason}", **fields(stage=args.command, reason=reason))
        return 1


if __name__ == "__main__":
    sys.exit(main())
