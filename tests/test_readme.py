"""The README's examples run as written: its Python blocks against a small synthetic dataset and a
bank made by the real jobs (only the paths rewritten), its configuration file through the parser."""

from __future__ import annotations

import re
from pathlib import Path

import numpy as np
import pytest

REPO = Path(__file__).resolve().parents[1]


def blocks(language: str) -> list[str]:
    return re.findall(rf"```{language}\n(.*?)```", (REPO / "README.md").read_text(), flags=re.S)


def rewritten(code: str, paths: dict[str, str]) -> str:
    for written, here in paths.items():
        code = code.replace(written, here)
    return code


def test_the_python_examples_run_as_written(synthetic_dataset, small_bank) -> None:
    test, small_test = synthetic_dataset / "test", small_bank["dataset"] / "test"
    paths = {
        '"good/*.png"': repr(f"{synthetic_dataset}/train/good/*.png"),
        "incoming/part_17.png": str(sorted((test / "good").glob("*.png"))[0]),
        "incoming/part_18.png": str(sorted(p for p in test.rglob("*.png") if p.parent.name != "good")[0]),
        "s3://plant/models/line3": "memory://readme/models/line3",
        "s3://plant/banks/line3": str(small_bank["bank"]),
        "s3://plant/2026-11-28/cam1_0042.png": str(sorted(small_test.rglob("*.png"))[0]),
    }
    code = blocks("python")
    assert len(code) == 2
    assert all(any(written in block for block in code) for written in paths), "a rewritten path left the README"
    scope: dict = {}
    exec(rewritten(code[0], paths), scope)  # the README's own example
    pred = scope["pred"]
    assert pred.is_anomalous.dtype == bool and pred.masks[0].shape == pred.maps[0].shape == (128, 128)
    assert scope["model"].bank_ids and scope["model"].calibration is not None  # loaded back from the URL
    exec(rewritten(code[1], paths), scope)
    nightly, pred = scope["nightly"], scope["pred"]
    assert nightly.config.image_size == small_bank["image_size"] and nightly.calibration is not None
    np.testing.assert_array_equal(pred.masks[0], pred.maps[0] > nightly.calibration.pixel_threshold)


@pytest.mark.parametrize(("argv", "expected"), [
    (["score", "s3://plant/2026-11-28/", "--output", "s3://plant/scored/2026-11-28"],
     {"bank": "s3://plant/banks/line3", "output": "s3://plant/scored/2026-11-28", "visuals": "all", "batch_size": 8}),
    (["build-bank", "s3://plant/features/line3"], {"output": "s3://plant/banks/line3", "shards": 4, "batch_size": 8}),
])
def test_the_configuration_file_example_means_what_the_readme_says(tmp_path, argv, expected) -> None:
    from spade_ray.apps.cli_parser import build_parser
    from spade_ray.apps.config_file import parse_args

    [toml] = blocks("toml")
    (tmp_path / "line3.toml").write_text(toml)
    args = parse_args(build_parser(), [*argv, "--config", str(tmp_path / "line3.toml")])
    assert {key: getattr(args, key) for key in expected} == expected
    assert args.storage_options == '{"endpoint_url": "http://minio:9000"}'
