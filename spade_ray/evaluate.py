"""``spade-ray evaluate``: fit on ``train/good`` of an MVTec-layout dataset, score ``test/*``, measure.

Writes ``OUT/metrics.json`` (contract in docs/DESIGN.md) and, on request, the masks and heatmaps
of every test image.  The timing block separates the stages so that a slow run says why.
"""

from __future__ import annotations

import json
import time
from typing import Any

import numpy as np

from .datasets import load_mvtec
from .featurestore import image_id_for
from .images import DEFAULT_MAX_PIXELS, load_mask
from .metrics import compute_metrics, image_auroc
from .model import DEFAULT_IMAGE_K, DEFAULT_KAPPA, DEFAULT_PIXEL_K, Spade
from .outputs import heatmap_rgb, join_url, unique_output_stems, write_bytes, write_png
from .progress import Progress, no_progress
from .timing import peak_rss_mb

__all__ = ["evaluate", "format_summary"]

def _rates(scores: np.ndarray, labels: np.ndarray, threshold: float) -> dict[str, float | None]:
    flagged = scores > threshold
    normal, defective = labels == 0, labels == 1
    return {
        "false_alarm_rate": float(flagged[normal].mean()) if normal.any() else None,
        "detection_rate": float(flagged[defective].mean()) if defective.any() else None,
    }


def evaluate(
    dataset: str,
    output: str,
    *,
    protocol: str = "full",
    backbone: str = "lite0",
    weights: str | None = None,
    image_size: int = 224,
    image_k: int = DEFAULT_IMAGE_K,
    pixel_k: int = DEFAULT_PIXEL_K,
    kappa: int = DEFAULT_KAPPA,
    batch_size: int = 16,
    calibration_samples: int = 64,
    target_fpr: float = 0.01,
    write_maps: bool = False,
    storage_options: dict[str, Any] | None = None,
    max_pixels: int = DEFAULT_MAX_PIXELS,
    progress: Progress = no_progress,
) -> dict[str, Any]:
    """Fit on the dataset's normal training images, score its test images, write metrics.json."""
    started = time.perf_counter()
    data = load_mvtec(dataset, storage_options)
    model = Spade(backbone, image_k=image_k, pixel_k=pixel_k, kappa=kappa, image_size=image_size,
                  protocol=protocol, weights=weights, batch_size=batch_size, storage_options=storage_options,
                  max_pixels=max_pixels)

    bar = progress(len(data.train), "fit (normal bank)")
    fit_start = time.perf_counter()
    model.fit([s.uri for s in data.train], ids=[s.relpath for s in data.train],
              calibration_samples=calibration_samples, target_fpr=target_fpr, progress=bar.update)
    fit_seconds = time.perf_counter() - fit_start
    bar.close()

    bar = progress(len(data.test), "score (test)")
    test_start = time.perf_counter()
    prediction = model.predict([s.uri for s in data.test], progress=bar.update)
    test_seconds = time.perf_counter() - test_start
    bar.close()

    labels = np.array([s.label for s in data.test], dtype=np.int64)
    metric_start = time.perf_counter()
    masks = None
    if data.has_masks:
        masks = [
            model.preprocessor.mask_to_output(load_mask(s.mask_uri, storage_options, max_pixels)) if s.mask_uri else None
            for s in data.test
        ]
    metrics = compute_metrics(prediction.image_scores, labels, prediction.maps if masks else None, masks)
    per_type = {}
    for defect in data.defect_types:
        if defect == "good":
            continue
        keep = np.array([s.defect_type in ("good", defect) for s in data.test])
        per_type[defect] = {"n": int(sum(s.defect_type == defect for s in data.test)),
                            "image_auroc": image_auroc(prediction.image_scores[keep], labels[keep])}
    metric_seconds = time.perf_counter() - metric_start

    calibration = None
    if model.calibration is not None:
        cal = model.calibration
        calibration = {
            "target_fpr": cal.target_fpr,
            "n_images": cal.n_images,
            "image_threshold": cal.image_threshold,
            "pixel_threshold": cal.pixel_threshold,
            "at_image_threshold": _rates(prediction.image_scores, labels, cal.image_threshold),
            "at_pixel_threshold": _rates(prediction.pixel_max, labels, cal.pixel_threshold),
        }

    write_seconds = 0.0
    if write_maps:
        write_start = time.perf_counter()
        threshold = model.calibration.pixel_threshold if model.calibration else float(np.quantile(prediction.pixel_max, 0.5))
        stems = unique_output_stems((image_id_for(s.uri), s.relpath) for s in data.test)
        for sample, amap in zip(data.test, prediction.maps):
            key = stems[image_id_for(sample.uri)] + ".png"
            write_png(join_url(output, f"masks/{key}"), ((amap > threshold) * 255).astype(np.uint8), storage_options)
            write_png(join_url(output, f"heatmaps/{key}"), heatmap_rgb(amap, vmax=2.0 * threshold), storage_options)
        write_seconds = time.perf_counter() - write_start

    n_test = len(data.test)
    stages = model.timer.as_dict()
    result: dict[str, Any] = {
        "dataset": dataset,
        "protocol": protocol,
        "backbone": backbone,
        "params": {
            "image_k": image_k,
            "pixel_k": pixel_k,
            "kappa": kappa,
            "image_size": image_size,
            "sigma": model.config.sigma,
            "weights_sha256": model.weights_sha256,
            "bank_dtype": "float16",
        },
        "n_train": len(data.train),
        "n_test": n_test,
        **metrics,
        "per_defect_type": per_type,
        "calibration": calibration,
        "timing": {
            "stages": stages,
            "fit_seconds": round(fit_seconds, 3),
            "test_seconds": round(test_seconds, 3),
            "seconds_per_test_image": round(test_seconds / max(n_test, 1), 4),
            "test_images_per_second": round(n_test / test_seconds, 2) if test_seconds > 0 else None,
            "metrics_seconds": round(metric_seconds, 3),
            "write_seconds": round(write_seconds, 3),
            "total_seconds": round(time.perf_counter() - started, 3),
            "peak_rss_mb": round(peak_rss_mb(), 1),
        },
    }
    write_bytes(join_url(output, "metrics.json"), json.dumps(result, indent=2).encode(), storage_options)
    return result


def _fmt(value: float | None) -> str:
    return "n/a" if value is None else f"{value:.3f}"


def format_summary(result: dict[str, Any]) -> str:
    """A one-screen summary of an evaluate result."""
    t = result["timing"]
    p = result["params"]
    lines = [
        f"dataset   {result['dataset']}  ({result['n_train']} normal train, {result['n_test']} test images)",
        f"settings  backbone={result['backbone']} protocol={result['protocol']} image_k={p['image_k']} "
        f"pixel_k={p['pixel_k']} kappa={p['kappa']} image_size={p['image_size']}",
        f"image     AUROC {_fmt(result['image_auroc'])}   F1-max {_fmt(result['image_f1_max'])}",
        f"pixel     AUROC {_fmt(result['pixel_auroc'])}   AUPRO {_fmt(result['aupro'])}   F1-max {_fmt(result['pixel_f1_max'])}",
    ]
    for defect, row in result.get("per_defect_type", {}).items():
        lines.append(f"  {defect:<12} n={row['n']:<4} image AUROC {_fmt(row['image_auroc'])}")
    cal = result.get("calibration")
    if cal:
        at = cal["at_image_threshold"]
        lines.append(
            f"threshold image {cal['image_threshold']:.3f} (normal-only, target FPR {cal['target_fpr']:.0%}): "
            f"false alarms {_fmt(at['false_alarm_rate'])}, detections {_fmt(at['detection_rate'])}"
        )
    lines.append(
        f"time      fit {t['fit_seconds']:.1f}s, test {t['test_seconds']:.1f}s "
        f"({t['seconds_per_test_image']:.3f}s/image), peak RSS {t['peak_rss_mb']:.0f} MiB"
    )
    lines.append("stages    " + ", ".join(f"{k} {v:.1f}s" for k, v in t["stages"].items()))
    return "\n".join(lines)
