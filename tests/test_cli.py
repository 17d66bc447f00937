"""The command line as a user runs it: demo, evaluate, and one-line errors."""

from __future__ import annotations

import json
import subprocess
import sys

import numpy as np
from PIL import Image

from spade_ray.cli import main


def run_cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "spade_ray.cli", *args], capture_output=True, text=True, timeout=600)


def test_demo_runs_the_distributed_pipeline_and_writes_every_output(tmp_path) -> None:
    out = tmp_path / "demo"
    proc = run_cli("demo", "--output", str(out), "--pixel-k", "5", "--image-size", "128", "--quiet")
    assert proc.returncode == 0, proc.stderr
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["n_test"] == 34 and metrics["image_auroc"] > 0.8 and metrics["pixel_auroc"] > 0.85
    assert str(out / "metrics.json") in proc.stdout and "score: 34 ok, 0 error, 0 skipped" in proc.stdout
    assert (out / "bank" / "v0001" / "manifest.json").is_file() and list((out / "features").glob("*.parquet"))
    masks = sorted((out / "masks").rglob("*.png"))
    heatmaps = sorted((out / "heatmaps").rglob("*.png"))
    assert len(masks) == len(heatmaps) == 34
    mask = np.asarray(Image.open(masks[0]))
    assert mask.dtype == np.uint8 and set(np.unique(mask)) <= {0, 255}
    assert np.asarray(Image.open(heatmaps[0])).shape[-1] == 3
    # the masks of defective images find something; most normal ones stay empty
    flagged = {p.parent.name: 0 for p in masks}
    for p in masks:
        flagged[p.parent.name] += int(np.asarray(Image.open(p)).any())
    assert flagged["scratch"] + flagged["spot"] + flagged["crack"] >= 12 and flagged["good"] <= 3


def test_evaluate_writes_the_metrics_contract(synthetic_dataset, tmp_path) -> None:
    out = tmp_path / "ev"
    code = main(["evaluate", str(synthetic_dataset), "--output", str(out), "--protocol", "paper",
                 "--image-k", "2", "--pixel-k", "3", "--calibration-samples", "4", "--quiet"])
    assert code == 0
    m = json.loads((out / "metrics.json").read_text())
    for key in ("dataset", "protocol", "backbone", "params", "n_train", "n_test", "image_auroc", "pixel_auroc",
                "aupro", "image_f1_max", "pixel_f1_max", "timing"):
        assert key in m
    assert m["protocol"] == "paper" and m["params"]["image_k"] == 2 and m["params"]["pixel_k"] == 3
    assert m["timing"]["seconds_per_test_image"] > 0 and m["timing"]["peak_rss_mb"] > 0
    assert set(m["timing"]["stages"]) >= {"decode", "forward", "retrieval", "correspondence", "fusion"}


def test_a_missing_dataset_is_a_one_line_error(tmp_path) -> None:
    proc = run_cli("evaluate", str(tmp_path / "nope"), "--output", str(tmp_path / "o"))
    assert proc.returncode != 0
    assert proc.stderr.strip().count("\n") == 0 and "nope" in proc.stderr


def test_every_command_documents_its_options() -> None:
    for command in ("demo", "evaluate"):
        proc = run_cli(command, "--help")
        assert proc.returncode == 0 and "--pixel-k" in proc.stdout and "--image-k" in proc.stdout
