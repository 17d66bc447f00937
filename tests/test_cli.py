"""The command line as a user runs it: demo, evaluate (metrics, report, overlays, logs), and one-line errors."""

from __future__ import annotations

import json
import re
import subprocess
import sys

import numpy as np
from PIL import Image


def run_cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "spade_ray.apps.cli", *args], capture_output=True, text=True, timeout=600)


def test_demo_runs_the_distributed_pipeline_and_writes_every_output(demo_run) -> None:
    out, proc = demo_run
    assert proc.returncode == 0, proc.stderr
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["n_test"] == 34 and metrics["image_auroc"] > 0.8 and metrics["pixel_auroc"] > 0.85
    assert str(out / "metrics.json") in proc.stdout and "score: 34 ok, 0 error, 0 skipped" in proc.stdout
    assert (out / "bank" / "v0001" / "manifest.json").is_file() and list((out / "features").glob("*.parquet"))
    masks = sorted((out / "masks").rglob("*.png"))
    heatmaps = sorted((out / "heatmaps").rglob("*.png"))
    overlays = sorted((out / "overlays").rglob("*.jpg"))
    assert len(masks) == len(heatmaps) == len(overlays) == 34
    assert (out / "report.html").is_file() and str(out / "report.html") in proc.stdout
    mask = np.asarray(Image.open(masks[0]))
    assert mask.dtype == np.uint8 and set(np.unique(mask)) <= {0, 255}
    assert np.asarray(Image.open(heatmaps[0])).shape[-1] == 3
    # the masks of defective images find something; most normal ones stay empty
    flagged = {p.parent.name: 0 for p in masks}
    for p in masks:
        flagged[p.parent.name] += int(np.asarray(Image.open(p)).any())
    assert flagged["scratch"] + flagged["spot"] + flagged["crack"] >= 12 and flagged["good"] <= 3


def test_evaluate_writes_the_metrics_contract(evaluated) -> None:
    out, _ = evaluated
    m = json.loads((out / "metrics.json").read_text())
    for key in ("dataset", "protocol", "backbone", "params", "n_train", "n_test", "image_auroc", "pixel_auroc",
                "aupro", "image_f1_max", "pixel_f1_max", "timing", "per_defect_type", "calibration", "report"):
        assert key in m
    assert m["protocol"] == "paper" and m["params"]["image_k"] == 2 and m["params"]["pixel_k"] == 3
    assert m["timing"]["seconds_per_test_image"] > 0 and m["timing"]["peak_rss_mb"] > 0
    assert set(m["timing"]["stages"]) >= {"decode", "forward", "retrieval", "correspondence", "fusion", "calibration"}


def test_evaluate_reports_the_rates_reached_at_the_normal_only_thresholds(evaluated, synthetic_dataset) -> None:
    out, _ = evaluated
    m = json.loads((out / "metrics.json").read_text())
    cal = m["calibration"]
    assert cal["target_fpr"] == 0.01 and cal["n_images"] == 4
    for rule in ("at_image_threshold", "at_pixel_threshold", "at_decision"):
        assert 0.0 <= cal[rule]["false_alarm_rate"] <= 1.0 and 0.0 <= cal[rule]["detection_rate"] <= 1.0
    # is_anomalous flags an image when either rule does, so it catches at least what each catches
    assert cal["at_decision"]["detection_rate"] >= max(cal["at_image_threshold"]["detection_rate"],
                                                       cal["at_pixel_threshold"]["detection_rate"])
    types = m["per_defect_type"]
    assert set(types) == {"scratch", "spot", "crack"}
    for row in types.values():
        assert row["n"] == 3 and 0.0 <= row["detection_rate"] <= 1.0
        assert row["pixel_auroc"] is not None and row["aupro"] is not None


def test_json_logs_are_one_object_per_line_and_no_bars_off_a_terminal(evaluated) -> None:
    _, proc = evaluated
    records = [json.loads(line) for line in proc.stdout.splitlines()]
    assert records, "evaluate logged nothing"
    for record in records:
        assert {"time", "level", "message"} <= set(record)
    done = records[-1]
    assert done["stage"] == "evaluate" and done["n_test"] == 13 and done["report"].endswith("report.html")
    assert 0.0 <= done["image_auroc"] <= 1.0
    # stderr is a pipe here, and no --quiet was given: still no progress bar
    assert "%|" not in proc.stderr and "img/s" not in proc.stderr and "\r" not in proc.stderr


def test_evaluate_writes_an_overlay_per_test_image_in_its_map_frame(evaluated, synthetic_dataset) -> None:
    out, _ = evaluated
    tests = sorted((synthetic_dataset / "test").rglob("*.png"))
    for image in tests:
        rel = image.relative_to(synthetic_dataset)
        overlay = out / "overlays" / rel.with_suffix(".jpg")
        mask = out / "masks" / rel
        assert overlay.is_file() and mask.is_file()
        # --protocol paper: maps, masks and overlays are all in the 224 x 224 centre-crop frame
        assert Image.open(overlay).size == Image.open(mask).size == (224, 224)


def test_evaluate_report_shows_curves_per_type_metrics_and_the_top_images(evaluated) -> None:
    out, _ = evaluated
    html = (out / "report.html").read_text()
    assert html.count("<svg") == 4  # two score histograms, ROC, PRO
    for title in ("<title>image scores</title>", "<title>anomaly map maxima</title>", "<title>ROC</title>",
                  "<title>PRO</title>", "threshold ", "Per defect type", "either (is_anomalous)"):
        assert title in html
    for defect in ("scratch", "spot", "crack"):
        assert f"<td>{defect}</td>" in html
    assert html.count('<section class="item">') == 6  # --report-top 6
    assert html.count("<figcaption>heatmap overlay</figcaption>") == 6
    assert html.count('<figure class="nb"><img src="data:image/jpeg;base64,') == 6 * 2  # image_k=2 normals each
    # self-contained: every reference is embedded, nothing is fetched
    assert not re.findall(r'(?:src|href)="(?!data:)', html) and "url(" not in html and "<link" not in html
    assert (out / "report.html").stat().st_size < 3_000_000


def test_the_report_renders_in_a_real_browser_with_every_image_loaded(evaluated, tmp_path) -> None:
    from browser import assert_not_blank, render

    out, _ = evaluated
    page = render(out / "report.html", tmp_path)
    assert page.n_images == 6 * (3 + 2)  # three panels and two nearest normals per image
    assert page.broken == []
    assert_not_blank(page.screenshot)


def test_a_missing_dataset_is_a_one_line_error(tmp_path) -> None:
    proc = run_cli("evaluate", str(tmp_path / "nope"), "--output", str(tmp_path / "o"))
    assert proc.returncode != 0
    assert proc.stderr.strip().count("\n") == 0 and "nope" in proc.stderr


def test_every_command_documents_its_options() -> None:
    for command in ("demo", "evaluate"):
        proc = run_cli(command, "--help")
        assert proc.returncode == 0 and "--pixel-k" in proc.stdout and "--image-k" in proc.stdout


def test_method_presets_fill_only_the_settings_not_given_explicitly() -> None:
    from spade_ray.apps.cli import _scoring, build_parser
    from spade_ray.method.config import METHODS, SpadeConfig

    parse = build_parser().parse_args
    assert _scoring(parse(["evaluate", "ds", "--output", "o"])) == {}  # nothing given: the defaults downstream
    paper = _scoring(parse(["evaluate", "ds", "--output", "o", "--method", "spade"]))
    assert paper == METHODS["spade"] and SpadeConfig().with_scoring(paper).aggregate == 1
    mixed = _scoring(parse(["score", "in", "--bank", "b", "--output", "o", "--method", "spade", "--aggregate", "3"]))
    assert mixed["aggregate"] == 3 and mixed["image_scoring"] == "knn" and mixed["matching"] == "exact"
    assert SpadeConfig().with_scoring(METHODS["spade-ray"]) == SpadeConfig()  # the preset is the default
