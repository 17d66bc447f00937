"""``spade-ray evaluate``: fit on ``train/good`` of an MVTec-layout dataset, score ``test/*``, measure.

Writes ``OUT/metrics.json`` (contract in docs/DESIGN.md), ``OUT/report.html`` and, on request, the
masks, heatmaps and overlays of every test image.  The timing block separates the stages so that
a slow run says why.
"""

from __future__ import annotations

import json
import time
from dataclasses import asdict, replace
from typing import Any

import numpy as np

from spade_ray.method.calibration import Calibration
from spade_ray.method.config import DEFAULT_IMAGE_K, DEFAULT_PIXEL_K, SpadeConfig
from spade_ray.method.decision import Thresholds
from spade_ray.method.matching import DEFAULT_KAPPA
from spade_ray.method.metrics import compute_metrics
from spade_ray.method.scorer import Prediction
from spade_ray.method.tiling import Tiling
from spade_ray.method.timing import peak_rss_mb
from spade_ray.model import Spade
from spade_ray.progress import Progress, no_progress
from spade_ray.report.evaluate_report import evaluation_report
from spade_ray.report.report import DEFAULT_REPORT_TOP, write_report
from spade_ray.storage.artifacts import ArtifactChoice, Artifacts
from spade_ray.storage.datasets import MVTecDataset, load_mvtec
from spade_ray.storage.featurestore import image_id_for
from spade_ray.storage.images import DEFAULT_MAX_PIXELS, load_image, load_mask
from spade_ray.storage.outputs import unique_output_stems
from spade_ray.storage.urls import join, write_bytes

__all__ = ["evaluate", "format_summary"]

def _flag_rates(flagged: np.ndarray, labels: np.ndarray) -> dict[str, float | None]:
    """False-alarm rate (normal images flagged) and detection rate (defective images flagged)."""
    normal, defective = labels == 0, labels == 1
    return {
        "false_alarm_rate": float(flagged[normal].mean()) if normal.any() else None,
        "detection_rate": float(flagged[defective].mean()) if defective.any() else None,
    }


def _fit(data: MVTecDataset, model: Spade, calibration_samples: int, target_fpr: float, progress: Progress) -> float:
    """Fit on the normal training images, then calibrate with progress of its own; returns the seconds taken."""
    bar = progress(len(data.train), "fit (normal bank)")
    start = time.perf_counter()
    model.fit([s.uri for s in data.train], ids=[s.relpath for s in data.train], calibration_samples=0, progress=bar.update)
    bar.close()
    if calibration_samples > 0 and len(data.train) > 1:
        bar = progress(min(len(data.train), calibration_samples), "calibrate (leave-one-out)")
        model.calibration = model.calibrate(calibration_samples, target_fpr, progress=bar.update)
        bar.close()
    return time.perf_counter() - start


def _thresholds(model: Spade, prediction: Prediction) -> Thresholds:
    """The normal-only calibration's thresholds; without one (calibration_samples=0) the test medians,
    so masks and the report still show something, marked as such in the report."""
    cal = model.calibration
    if cal is not None:
        return Thresholds(cal.image_threshold, cal.pixel_threshold)
    return Thresholds(float(np.quantile(prediction.image_scores, 0.5)), float(np.quantile(prediction.pixel_max, 0.5)))


def _per_defect_type(data: MVTecDataset, prediction: Prediction, labels: np.ndarray, masks: list | None,
                     flagged: np.ndarray) -> dict[str, dict[str, Any]]:
    """Metrics of each defect type against the normal test images, and how many of its images were flagged."""
    per_type = {}
    for defect in data.defect_types:
        if defect == "good":
            continue
        keep = np.array([s.defect_type in ("good", defect) for s in data.test])
        of_type = np.array([s.defect_type == defect for s in data.test])
        sub = compute_metrics(prediction.image_scores[keep], labels[keep],
                              [m for m, k in zip(prediction.maps, keep) if k] if masks else None,
                              [m for m, k in zip(masks, keep) if k] if masks else None)
        per_type[defect] = {"n": int(of_type.sum()), "image_auroc": sub["image_auroc"], "pixel_auroc": sub["pixel_auroc"],
                            "aupro": sub["aupro"], "detection_rate": float(flagged[of_type].mean())}
    return per_type


def _calibration_block(cal: Calibration | None, prediction: Prediction, labels: np.ndarray,
                       flagged: np.ndarray) -> dict[str, Any] | None:
    """The calibrated thresholds and the rates each rule reaches on the test set."""
    if cal is None:
        return None
    return {
        "target_fpr": cal.target_fpr,
        "n_images": cal.n_images,
        "image_threshold": cal.image_threshold,
        "pixel_threshold": cal.pixel_threshold,
        "at_image_threshold": _flag_rates(prediction.image_scores > cal.image_threshold, labels),
        "at_pixel_threshold": _flag_rates(prediction.pixel_max > cal.pixel_threshold, labels),
        # what `score` flags (is_anomalous): either rule; its false-alarm rate can exceed each alone
        "at_decision": _flag_rates(flagged, labels),
    }


def _write_artifacts(data: MVTecDataset, prediction: Prediction, model: Spade, thresholds: Thresholds, output: str,
                     storage_options: dict[str, Any] | None, max_pixels: int, progress: Progress) -> float:
    """Masks, heatmaps and overlays of every test image (the score job's artifacts); returns the seconds taken."""
    start = time.perf_counter()
    bar = progress(len(data.test), "write maps")
    artifacts = Artifacts(output, thresholds, ArtifactChoice(visuals="all"))
    stems = unique_output_stems((image_id_for(s.uri), s.relpath) for s in data.test)
    for sample, amap in zip(data.test, prediction.maps):
        def image(uri: str = sample.uri) -> np.ndarray:
            return model.preprocessor.image_to_output(load_image(uri, storage_options, max_pixels=max_pixels))

        artifacts.write(stems[image_id_for(sample.uri)], amap, image, flagged=True, storage_options=storage_options)
        bar.update(1)
    bar.close()
    return time.perf_counter() - start


def _ground_truth_masks(data: MVTecDataset, model: Spade, storage_options: dict[str, Any] | None,
                        max_pixels: int) -> list[np.ndarray | None] | None:
    """Each test image's mask in the maps' frame (None for a normal image); None when the dataset has none."""
    if not data.has_masks:
        return None
    return [model.preprocessor.mask_to_output(load_mask(s.mask_uri, storage_options, max_pixels)) if s.mask_uri else None
            for s in data.test]


def _timing(model: Spade, fit_seconds: float, test_seconds: float, metric_seconds: float, write_seconds: float,
            n_test: int) -> dict[str, Any]:
    return {
        "stages": model.timer.as_dict(),
        "fit_seconds": round(fit_seconds, 3),
        "test_seconds": round(test_seconds, 3),
        "seconds_per_test_image": round(test_seconds / max(n_test, 1), 4),
        "test_images_per_second": round(n_test / test_seconds, 2) if test_seconds > 0 else None,
        "metrics_seconds": round(metric_seconds, 3),
        "write_seconds": round(write_seconds, 3),
    }


def _write_report_and_metrics(result: dict[str, Any], data: MVTecDataset, prediction: Prediction, labels: np.ndarray,
                              masks: list | None, thresholds: Thresholds, model: Spade, report_top: int,
                              storage_options: dict[str, Any] | None, progress: Progress) -> None:
    """``report.html`` from the predictions in memory; its time goes into ``result``."""
    start = time.perf_counter()
    bar = progress(min(report_top, len(data.test)), "report")
    report = evaluation_report(data, prediction, labels, masks, result, thresholds=thresholds,
                               preprocessor=model.preprocessor, top=report_top, storage_options=storage_options,
                               progress=bar.update, ignore=model.ignore)
    bar.close()
    write_report(result["report"], report, storage_options)
    result["timing"]["report_seconds"] = round(time.perf_counter() - start, 3)


def _config(base: SpadeConfig, tiling: Tiling, scoring: dict[str, Any] | None) -> SpadeConfig:
    """The model's settings: the features' (with their tiling), then the scoring overrides."""
    return replace(base, **tiling.settings()).with_scoring(scoring or {})


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
    scoring: dict[str, Any] | None = None,
    batch_size: int = 16,
    calibration_samples: int = 64,
    target_fpr: float = 0.01,
    write_maps: bool = False,
    report_top: int = DEFAULT_REPORT_TOP,
    storage_options: dict[str, Any] | None = None,
    max_pixels: int = DEFAULT_MAX_PIXELS,
    progress: Progress = no_progress,
    ignore_mask: str | None = None, tiling: Tiling | None = None,  # high-resolution frames as tiles (SpadeConfig.tiling)
) -> dict[str, Any]:
    """Fit on train/good, score test/*, write metrics.json and report.html (``ignore_mask``: PNG, white = ignore)."""
    started, tiling = time.perf_counter(), tiling or Tiling()
    data = load_mvtec(dataset, storage_options)
    config = _config(SpadeConfig(backbone, image_size, protocol, image_k, pixel_k, kappa), tiling, scoring)
    model = Spade(config, weights=weights, batch_size=batch_size, storage_options=storage_options,
                  max_pixels=max_pixels, ignore_mask=ignore_mask)
    fit_seconds = _fit(data, model, calibration_samples, target_fpr, progress)
    bar, test_start = progress(len(data.test), "score (test)"), time.perf_counter()
    prediction = model.predict([s.uri for s in data.test], progress=bar.update)
    test_seconds = time.perf_counter() - test_start
    bar.close()
    labels = np.array([s.label for s in data.test], dtype=np.int64)
    metric_start = time.perf_counter()
    masks = _ground_truth_masks(data, model, storage_options, max_pixels)
    metrics = compute_metrics(prediction.image_scores, labels, prediction.maps if masks else None, masks)
    thresholds = _thresholds(model, prediction)
    flagged = np.asarray(thresholds.is_anomalous(prediction.image_scores, prediction.pixel_max), dtype=bool)
    per_type = _per_defect_type(data, prediction, labels, masks, flagged)
    metric_seconds = time.perf_counter() - metric_start
    write_seconds = _write_artifacts(data, prediction, model, thresholds, output, storage_options, max_pixels,
                                     progress) if write_maps else 0.0

    result: dict[str, Any] = {
        "dataset": dataset, "protocol": protocol, "backbone": backbone,
        "params": {**model.config.scoring(), "image_size": image_size, "weights_sha256": model.weights_sha256,
                   "bank_dtype": "float16", "ignore_mask": ignore_mask, **asdict(tiling)},
        "n_train": len(data.train), "n_test": len(data.test),
        **metrics,
        "per_defect_type": per_type,
        "calibration": _calibration_block(model.calibration, prediction, labels, flagged),
        "timing": _timing(model, fit_seconds, test_seconds, metric_seconds, write_seconds, len(data.test)),
        "report": join(output, "report.html"),
    }
    _write_report_and_metrics(result, data, prediction, labels, masks, thresholds, model, report_top, storage_options,
                              progress)
    result["timing"].update(total_seconds=round(time.perf_counter() - started, 3), peak_rss_mb=round(peak_rss_mb(), 1))
    write_bytes(join(output, "metrics.json"), json.dumps(result, indent=2).encode(), storage_options)
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
        f"pixel_k={p['pixel_k']} kappa={p['kappa']} matching={p['matching']} image_size={p['image_size']}",
        f"image     AUROC {_fmt(result['image_auroc'])}   F1-max {_fmt(result['image_f1_max'])}",
        f"pixel     AUROC {_fmt(result['pixel_auroc'])}   AUPRO {_fmt(result['aupro'])}   F1-max {_fmt(result['pixel_f1_max'])}",
    ]
    for defect, row in result.get("per_defect_type", {}).items():
        lines.append(f"  {defect:<12} n={row['n']:<4} image AUROC {_fmt(row['image_auroc'])}   "
                     f"pixel AUROC {_fmt(row.get('pixel_auroc'))}   AUPRO {_fmt(row.get('aupro'))}")
    cal = result.get("calibration")
    if cal:
        at, decision = cal["at_image_threshold"], cal["at_decision"]
        lines.append(
            f"threshold image {cal['image_threshold']:.3f} (normal-only, target FPR {cal['target_fpr']:.0%}): "
            f"false alarms {_fmt(at['false_alarm_rate'])}, detections {_fmt(at['detection_rate'])}"
        )
        lines.append(
            f"flagged   image or map over its threshold (is_anomalous): "
            f"false alarms {_fmt(decision['false_alarm_rate'])}, detections {_fmt(decision['detection_rate'])}"
        )
    lines.append(
        f"time      fit {t['fit_seconds']:.1f}s, test {t['test_seconds']:.1f}s "
        f"({t['seconds_per_test_image']:.3f}s/image), peak RSS {t['peak_rss_mb']:.0f} MiB"
    )
    lines.append("stages    " + ", ".join(f"{k} {v:.1f}s" for k, v in t["stages"].items()))
    return "\n".join(lines)
