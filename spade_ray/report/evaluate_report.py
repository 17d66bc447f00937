"""The ``evaluate`` report: the score report's pictures plus what ground truth allows.

With labels and masks the page also shows ROC curves (image and pixel), the PRO curve up to the
false-positive rate AUPRO integrates to, metrics per defect type, and the false-alarm and
detection rates the normal-only thresholds actually reach.  Built from the predictions
``evaluate`` holds in memory; only the top images and their nearest normals are read again.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import numpy as np

from spade_ray.method.decision import Thresholds
from spade_ray.method.ignore import IgnoreRegion
from spade_ray.method.metrics import pixel_roc_curve, pro_curve, roc_curve
from spade_ray.method.preprocess import Preprocessor
from spade_ray.method.scorer import Prediction
from spade_ray.report.report import (
    DEFAULT_REPORT_TOP,
    Neighbour,
    Report,
    ReportItem,
    ignore_section,
    item_panels,
    most_anomalous,
    neighbour_pictures,
    now_utc,
)
from spade_ray.report.svgplot import Series, curves_svg, histogram_svg
from spade_ray.storage.artifacts import overlay_with_mask
from spade_ray.storage.datasets import MVTecDataset
from spade_ray.storage.images import load_image

__all__ = ["evaluation_report"]


def _f(value: float | None, digits: int = 3) -> str:
    return "n/a" if value is None else f"{value:.{digits}f}"


def _charts(prediction: Prediction, labels: np.ndarray, masks: Sequence[np.ndarray | None] | None,
            thresholds: Thresholds, fpr_limit: float) -> list[str]:
    normal, defective = labels == 0, labels == 1
    scores, maxima = prediction.image_scores, prediction.pixel_max
    charts = [
        histogram_svg("image scores", [Series("normal", scores[normal]), Series("defective", scores[defective])],
                      {"threshold": thresholds.image}, x_label="image score"),
        histogram_svg("anomaly map maxima", [Series("normal", maxima[normal]), Series("defective", maxima[defective])],
                      {"threshold": thresholds.pixel}, x_label="anomaly map maximum"),
    ]
    rocs = []
    image_roc = roc_curve(scores, labels)
    if image_roc is not None:
        rocs.append(Series("image", *image_roc))
    if masks is not None:
        pixel_roc = pixel_roc_curve(prediction.maps, masks)
        if pixel_roc is not None:
            rocs.append(Series("pixel", *pixel_roc))
    if rocs:
        charts.append(curves_svg("ROC", rocs, "false-positive rate", "true-positive rate", diagonal=True))
    if masks is not None:
        pro = pro_curve(prediction.maps, masks, fpr_limit)
        if pro is not None:
            charts.append(curves_svg("PRO", [Series("per-region overlap", *pro)], "pixel false-positive rate",
                                     "per-region overlap", x_max=fpr_limit))
    return charts


def _tables(result: dict[str, Any]) -> list[tuple[str, list[str], list[list[str]]]]:
    tables = [("Metrics", ["image AUROC", "pixel AUROC", f"AUPRO (FPR ≤ {result.get('aupro_fpr_limit', 0.3)})",
                           "image F1-max", "pixel F1-max"],
               [[_f(result["image_auroc"]), _f(result["pixel_auroc"]), _f(result["aupro"]),
                 _f(result["image_f1_max"]), _f(result["pixel_f1_max"])]])]
    per_type = result.get("per_defect_type") or {}
    if per_type:
        rows = [[name, str(row["n"]), _f(row["image_auroc"]), _f(row.get("pixel_auroc")), _f(row.get("aupro")),
                 _f(row.get("detection_rate"))] for name, row in per_type.items()]
        tables.append(("Per defect type (each against the normal test images)",
                       ["defect type", "images", "image AUROC", "pixel AUROC", "AUPRO", "flagged at the thresholds"], rows))
    cal = result.get("calibration")
    if cal:
        rows = []
        for label, key in (("image score > image threshold", "at_image_threshold"),
                           ("map maximum > pixel threshold", "at_pixel_threshold"),
                           ("either (is_anomalous)", "at_decision")):
            rates = cal.get(key) or {}
            rows.append([label, _f(rates.get("false_alarm_rate")), _f(rates.get("detection_rate"))])
        tables.append((f"Normal-only thresholds (target false-alarm rate {cal['target_fpr']:.2%}, "
                       f"{cal['n_images']} normal images scored leave-one-out): rates reached on the test set",
                       ["rule", "false-alarm rate (normal images flagged)", "detection rate (defective images flagged)"],
                       rows))
    return tables


def evaluation_report(data: MVTecDataset, prediction: Prediction, labels: np.ndarray,
                      masks: Sequence[np.ndarray | None] | None, result: dict[str, Any], *,
                      thresholds: Thresholds, preprocessor: Preprocessor,
                      top: int = DEFAULT_REPORT_TOP, fpr_limit: float = 0.3,
                      storage_options: dict[str, Any] | None = None,
                      progress: Callable[[int], None] | None = None, ignore: IgnoreRegion | None = None) -> Report:
    """The report of one evaluation: counts, distributions, curves, tables and the ``top`` most anomalous images.

    ``ignore`` (the --ignore-mask) is shown at the top and hatched on the overlay panels.
    """
    flagged = np.asarray(thresholds.is_anomalous(prediction.image_scores, prediction.pixel_max), dtype=bool)
    rows = [{"index": i, "relpath": s.relpath, "image_score": float(prediction.image_scores[i]),
             "pixel_max": float(prediction.pixel_max[i])} for i, s in enumerate(data.test)]
    train_uri = {s.relpath: s.uri for s in data.train}
    cache: dict[str, Neighbour] = {}
    items = []
    for row in most_anomalous(rows, top, thresholds):
        i = row["index"]
        sample = data.test[i]
        amap = prediction.maps[i]
        neighbours = neighbour_pictures([(n, train_uri.get(n, n)) for n in prediction.neighbours[i]], storage_options, cache)
        item = ReportItem(sample.relpath, row["image_score"], row["pixel_max"], bool(flagged[i]), {}, neighbours,
                          note=f"ground truth: {sample.defect_type}")
        source = load_image(sample.uri, storage_options)
        image = preprocessor.image_to_output(source)
        overlay, mask = overlay_with_mask(image, amap, thresholds)
        item.panels = item_panels(image, overlay, mask,
                                  ignore.at_output(preprocessor, *source.shape[:2]) if ignore is not None else None)
        items.append(item)
        if progress:
            progress(1)
    counts = {"images": len(data.test), "normal": int((labels == 0).sum()), "defective": int((labels == 1).sum()),
              "anomalous": int(flagged.sum()),
              "false alarms": int((flagged & (labels == 0)).sum()), "missed": int((~flagged & (labels == 1)).sum())}
    cal = result.get("calibration")
    facts = [("dataset", str(result["dataset"])), ("protocol", str(result["protocol"])),
             ("backbone", str(result["backbone"])),
             ("settings", ", ".join(f"{k}={result['params'][k]}" for k in ("image_k", "pixel_k", "kappa", "image_size"))),
             ("train / test images", f"{result['n_train']} / {result['n_test']}"),
             ("image threshold", f"{thresholds.image:.6g}" + ("" if cal else " (no calibration: median of the test scores)")),
             ("pixel threshold", f"{thresholds.pixel:.6g}" + ("" if cal else " (no calibration: median of the test maxima)")),
             ("written", now_utc())]
    legend = "ignored region (--ignore-mask)"
    return Report("spade-ray evaluation report", facts, counts,
                  _charts(prediction, labels, masks, thresholds, fpr_limit),
                  items, tables=_tables(result), ignored=ignore_section(ignore, legend) if ignore is not None else None,
                  ignored_legend=legend)
