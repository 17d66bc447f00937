"""Peak memory of scoring one large frame tiled: shows that a 5000 x 4000 frame scores within a bounded budget.

A bank is fitted (tiled) on a few normal frames; then one frame of HEIGHT x WIDTH (a normal frame
stretched to that size, so it looks like the data) is scored.  The process's peak RSS is reset
(``/proc/self/clear_refs``, Linux) just before scoring, so the printed peak is the scoring's own
high-water mark: the model, the bank, the decoded frame, its tiles and the stitched map.

    python benchmarks/tile_memory.py /work/shared/datasets/kolektorsdd --height 4000 --width 5000 \
        --json benchmarks/results/tile-memory-5000x4000.json
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np
from PIL import Image

from spade_ray.model import Spade


def _status_mb(field: str) -> float:
    """``VmRSS`` (now) or ``VmHWM`` (peak since the last reset) of this process, in MiB."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(f"{field}:"):
            return int(line.split()[1]) / 1024
    return float("nan")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("dataset", help="MVTec-layout dataset whose train/good frames make the bank")
    parser.add_argument("--height", type=int, default=4000)
    parser.add_argument("--width", type=int, default=5000)
    parser.add_argument("--bank-frames", type=int, default=6)
    parser.add_argument("--tile", type=int, default=224)
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--json", default=None)
    args = parser.parse_args()
    normal = sorted((Path(args.dataset) / "train" / "good").glob("*.png"))
    model = Spade("lite0", tile=args.tile, image_scoring="knn", batch_size=args.batch_size)
    model.fit([str(p) for p in normal[: args.bank_frames]], calibration_samples=0)
    big = np.asarray(Image.open(normal[-1]).convert("RGB").resize((args.width, args.height), Image.Resampling.BILINEAR))
    tiles = len(model.config.tiling.boxes(args.height, args.width))
    before = _status_mb("VmRSS")
    Path("/proc/self/clear_refs").write_text("5")  # reset the peak RSS to the current RSS
    start = time.perf_counter()
    prediction = model.predict([big])
    seconds = time.perf_counter() - start
    result = {"frame": [args.height, args.width], "tile": args.tile, "overlap": model.config.tiling.overlap,
              "tiles": tiles, "bank_tiles": len(model.bank_ids),
              "batch_size": args.batch_size, "rss_before_mb": round(before, 1),
              "peak_rss_scoring_mb": round(_status_mb("VmHWM"), 1), "frame_rgb_mb": round(big.nbytes / 2**20, 1),
              "map_shape": list(prediction.maps[0].shape), "seconds": round(seconds, 1)}
    print(json.dumps(result, indent=1))
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=1) + "\n")


if __name__ == "__main__":
    main()
