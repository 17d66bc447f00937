"""Seconds per test frame of untiled, larger-input and tiled scoring, measured in one run on the same frames.

Three in-process models are fitted on the dataset's normal frames (default: ``--image-size 224``,
``--image-size 448``, ``--tile 224``); then the test frames are scored in chunks of ``--chunk``,
the models taking turns chunk by chunk, so that whatever else the machine runs weighs on all three
alike and the ratios hold even where the absolute seconds do not.

    python benchmarks/tile_speed.py ../shared/datasets/kolektorsdd --json benchmarks/results/tile-speed-kolektorsdd.json
"""

from __future__ import annotations

import argparse
import json
import os
import time
from pathlib import Path

from spade_ray.model import Spade
from spade_ray.storage.datasets import load_mvtec

RUNS = {"untiled-224": {"image_size": 224}, "untiled-448": {"image_size": 448}, "tiled-224": {"tile": 224}}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("dataset")
    parser.add_argument("--chunk", type=int, default=16)
    parser.add_argument("--json", default=None)
    args = parser.parse_args()
    data = load_mvtec(args.dataset)
    train, test = [s.uri for s in data.train], [s.uri for s in data.test]
    models, fit_seconds = {}, {}
    for name, settings in RUNS.items():
        start = time.perf_counter()
        models[name] = Spade("lite0", **settings).fit(train, calibration_samples=64)
        fit_seconds[name] = time.perf_counter() - start
    seconds = dict.fromkeys(RUNS, 0.0)
    for begin in range(0, len(test), args.chunk):
        for name, model in models.items():
            start = time.perf_counter()
            model.predict(test[begin:begin + args.chunk])
            seconds[name] += time.perf_counter() - start
    per_frame = {name: seconds[name] / len(test) for name in RUNS}
    result = {"dataset": args.dataset, "n_train": len(train), "n_test": len(test), "cpus": os.cpu_count(),
              "load_average": os.getloadavg(), "fit_seconds": {k: round(v, 1) for k, v in fit_seconds.items()},
              "seconds_per_test_frame": {k: round(v, 4) for k, v in per_frame.items()},
              "relative_to_untiled_224": {k: round(v / per_frame["untiled-224"], 2) for k, v in per_frame.items()}}
    print(json.dumps(result, indent=1))
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=1) + "\n")


if __name__ == "__main__":
    main()
