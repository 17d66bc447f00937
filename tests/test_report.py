"""The report's parts: ranking, charts, curves, nearest-normal thumbnails, and safe HTML."""

from __future__ import annotations

import re

import numpy as np
import pytest
from PIL import Image
from skimage import data as skdata

from spade_ray.method.decision import Thresholds
from spade_ray.method.metrics import (
    aupro,
    image_auroc,
    pixel_auroc,
    pixel_roc_curve,
    pro_curve,
    roc_curve,
)
from spade_ray.report.report import (
    Report,
    ReportItem,
    item_panels,
    most_anomalous,
    neighbour_pictures,
    render_report,
)
from spade_ray.report.svgplot import Series, curves_svg, histogram_svg, thin_curve


def test_flagged_images_rank_first_whichever_rule_flagged_them() -> None:
    rows = [
        {"relpath": "high score, below both", "image_score": 0.9, "pixel_max": 9.0},
        {"relpath": "flagged by the map", "image_score": 0.5, "pixel_max": 12.0},
        {"relpath": "flagged by the score", "image_score": 1.5, "pixel_max": 1.0},
        {"relpath": "error", "image_score": None, "pixel_max": None},
    ]
    top = most_anomalous(rows, 10, Thresholds(image=1.0, pixel=10.0))
    assert [r["relpath"] for r in top] == ["flagged by the score", "flagged by the map", "high score, below both"]
    assert len(most_anomalous(rows, 1, Thresholds(1.0, 10.0))) == 1


def test_the_histogram_marks_the_threshold_where_it_lies() -> None:
    svg = histogram_svg("image scores", [Series("normal", [0.0, 1.0, 1.0, 2.0]), Series("defective", [3.0, 4.0])],
                        {"threshold": 2.5}, x_label="image score", bins=8)
    assert svg.startswith("<svg") and "<title>image scores</title>" in svg and "normal (4)" in svg
    x = float(re.search(r'<line x1="([\d.]+)" y1="\d+" x2="[\d.]+" y2="\d+" stroke="#111"', svg).group(1))
    left, right = 52, 440 - 16  # plot area
    assert x == pytest.approx(left + 2.5 / 4.0 * (right - left), abs=0.1)
    assert len(re.findall(r'fill-opacity="0.6"', svg)) == 5  # non-empty bins: {0}, {1,1}, {2}, {3}, {4}


def test_curves_are_the_exact_polylines_the_metrics_integrate() -> None:
    rng = np.random.default_rng(0)
    labels = rng.integers(0, 2, 60)
    scores = rng.normal(size=60) + labels
    fpr, tpr = roc_curve(scores, labels)
    assert np.trapezoid(tpr, fpr) == pytest.approx(image_auroc(scores, labels))
    maps = [rng.random((24, 24)).astype(np.float32) for _ in range(4)]
    masks = [None, rng.random((24, 24)) > 0.8, None, rng.random((24, 24)) > 0.9]
    fpr, tpr = pixel_roc_curve(maps, masks)
    assert np.trapezoid(tpr, fpr) == pytest.approx(pixel_auroc(maps, masks))
    fpr, pro = pro_curve(maps, masks, 0.3)
    assert fpr[-1] == pytest.approx(0.3) and np.trapezoid(pro, fpr) / 0.3 == pytest.approx(aupro(maps, masks))
    assert roc_curve(scores, np.zeros(60)) is None


def test_long_curves_are_thinned_to_what_a_plot_can_show() -> None:
    x = np.linspace(0, 1, 1_000_000)
    tx, _ = thin_curve(x, np.sqrt(x), resolution=600)
    assert len(tx) <= 1300 and tx[0] == 0 and tx[-1] == 1
    svg = curves_svg("ROC", [Series("pixel", x, np.sqrt(x))], "FPR", "TPR", diagonal=True)
    assert len(svg) < 40_000 and "<polyline" in svg


def test_nearest_normals_are_thumbnails_when_readable_and_named_when_not(tmp_path) -> None:
    good = tmp_path / "good.png"
    Image.fromarray(skdata.astronaut()).save(good)
    found = neighbour_pictures([("good.png", str(good)), ("gone.png", str(tmp_path / "gone.png"))])
    assert found[0].picture.startswith("data:image/jpeg;base64,") and found[0].problem is None
    assert found[1].picture is None and "FileNotFoundError" in found[1].problem and found[1].name == "gone.png"


def test_the_page_escapes_names_and_embeds_every_picture() -> None:
    image = skdata.chelsea()
    mask = np.zeros(image.shape[:2], dtype=bool)
    mask[100:140, 200:260] = True
    item = ReportItem('<script>alert("x")</script>.png', 3.0, 12.0, True, item_panels(image, image, mask))
    html = render_report(Report("t", [("input", "a&b")], {"ok": 1, "anomalous": 1}, [], [item]))
    assert "<script>" not in html and "&lt;script&gt;" in html and "a&amp;b" in html
    srcs = re.findall(r'<img src="([^"]+)"', html)
    assert len(srcs) == 3 and all(s.startswith("data:image/jpeg;base64,") for s in srcs)


def test_a_score_report_reads_every_run_in_the_output_and_says_why_pictures_are_missing(tmp_path) -> None:
    import pyarrow as pa
    import pyarrow.parquet as pq

    from spade_ray.method.preprocess import Preprocessor
    from spade_ray.report.report import score_report
    from spade_ray.storage.results import RESULT_SCHEMA

    def row(name: str, score: float | None, status: str = "ok") -> dict:
        return {"uri": str(tmp_path / "in" / name), "relpath": name, "image_id": name, "bank_id": "v0001-x",
                "image_score": score, "pixel_max": None if score is None else 1.0,
                "is_anomalous": None if score is None else score > 2.0, "mask_uri": str(tmp_path / "gone.png"),
                "heatmap_uri": None, "overlay_uri": None, "neighbours": None if score is None else [str(tmp_path / "n.png")],
                "status": status, "error": "ImageDecodeError: truncated" if status != "ok" else None, "seconds": 0.1}

    (tmp_path / "out" / "results").mkdir(parents=True)
    pq.write_table(pa.Table.from_pylist([row("a.png", 1.0), row("b.png", 3.0)], schema=RESULT_SCHEMA),
                   tmp_path / "out" / "results" / "part-1.parquet")
    older = pa.Table.from_pylist([row("c.png", 5.0), row("d.png", None, "error")], schema=RESULT_SCHEMA)
    pq.write_table(older.drop_columns(["overlay_uri"]), tmp_path / "out" / "results" / "part-0.parquet")  # an older run

    report = score_report(str(tmp_path / "out"), source="in", bank_id="v0001-x", thresholds=Thresholds(2.0, 10.0),
                          preprocessor=Preprocessor(), skipped=4, top=2)
    assert report.counts == {"images": 4, "ok": 3, "error": 1, "skipped (this run)": 4, "anomalous": 2}
    assert report.errors == [("d.png", "ImageDecodeError: truncated")]
    assert [i.name for i in report.items] == ["c.png", "b.png"]
    assert all(i.problem and "FileNotFoundError" in i.problem and i.neighbours[0].picture is None for i in report.items)
    html = render_report(report)
    assert "c.png" in html and "a.png" not in html and "not available" in html
