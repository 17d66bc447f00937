"""Soak: one `spade-ray score` run over many small synthetic images, its memory sampled as it goes.

    PYTHONPATH=. python benchmarks/soak.py --images 10000 --json benchmarks/results/soak-10000.json

A night is long: a driver or an actor whose memory grows with the images done fails at 3 a.m.,
not in a test of 40 images.  This scores ``--images`` 64 px frames made by the demo's generator
(``--unique`` distinct ones, hard-linked under many names: each name is its own input, with its
own id, row and mask) against a tiny bank, in a subprocess that leads its own session, and
samples every second the resident set of the driver and of the largest Ray worker of each kind
(:mod:`spade_ray.apps.memseries`) next to the images committed.  It reports the rows written and,
per process kind, the peak in the first quarter of the images, in the last quarter and the growth;
docs/operations.md and docs/scaling.md have the figures.  tests/test_soak.py runs it at full size.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import pyarrow.parquet as pq

from spade_ray.apps.memseries import MemorySeries, growth
from spade_ray.apps.synthetic import make_synthetic_dataset

FRAME = 64


@dataclass(frozen=True)
class SoakSettings:
    images: int = 10_000
    unique: int = 200  # distinct frames drawn by the generator; the rest are links to them
    batch_size: int = 500
    interval: float = 1.0  # seconds between memory samples
    seed: int = 7  # of the frames' material: the bank's normal images must share it (make_bank's seed)


def make_inbox(root: Path, images: int, unique: int, seed: int = 7) -> Path:
    """``images`` input files under ``root/inbox/dNNN/``: ``unique`` generated frames, each linked under many names."""
    frames = make_synthetic_dataset(root / "frames", n_train=0, n_test_good=unique, n_test_per_defect=0, size=FRAME,
                                    seed=seed) / "test" / "good"
    sources = sorted(frames.glob("*.png"))
    inbox = root / "inbox"
    for n in range(images):
        target = inbox / f"d{n // 1000:03d}" / f"{n:06d}.png"
        target.parent.mkdir(parents=True, exist_ok=True)
        os.link(sources[n % len(sources)], target)
    return inbox


def make_bank(root: Path, seed: int = 7) -> Path:
    """A tiny bank (10 normal frames, 1 shard, calibrated): the soak counts rows and memory, not quality."""
    import ray

    from spade_ray.distributed.build_bank_job import run_build_bank
    from spade_ray.distributed.extract_job import run_extract

    train = make_synthetic_dataset(root / "train", n_train=10, n_test_good=0, n_test_per_defect=0, size=FRAME, seed=seed)
    run_extract(str(train / "train" / "good"), str(root / "features"), image_size=FRAME, batch_size=5)
    run_build_bank(str(root / "features"), str(root / "bank"), shards=1, calibration_samples=4, image_k=2, pixel_k=3,
                   kappa=1)
    ray.shutdown()
    return root / "bank"


class CommittedRows:
    """Rows committed so far in ``out/results``, from each result file's footer, each file read once."""

    def __init__(self, out: Path) -> None:
        self.results = out / "results"
        self.rows: dict[str, int] = {}

    def __call__(self) -> int:
        for path in self.results.glob("*.parquet") if self.results.is_dir() else ():
            if path.name not in self.rows:
                try:
                    self.rows[path.name] = pq.read_metadata(path).num_rows
                except OSError:  # being renamed into place this very moment: next time
                    continue
        return sum(self.rows.values())


def run_soak(workdir: Path, bank: Path, settings: SoakSettings) -> dict:
    """Score the soak's inbox in a subprocess, sampling memory; returns the figures (and the samples)."""
    inbox = make_inbox(workdir, settings.images, settings.unique, settings.seed)
    out = workdir / "out"
    command = [sys.executable, "-m", "spade_ray.apps.cli", "score", str(inbox), "--bank", str(bank), "--output", str(out),
               "--batch-size", str(settings.batch_size), "--visuals", "none", "--quiet", "--log-format", "json"]
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    started = time.monotonic()
    proc = subprocess.Popen(command, start_new_session=True, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            env=env)
    rows = CommittedRows(out)
    with MemorySeries(proc.pid, rows, settings.interval) as series:
        stdout, stderr = proc.communicate()
    if proc.returncode != 0:
        raise RuntimeError(f"soak run failed (exit {proc.returncode}): {stderr[-2000:]}")
    summary = [json.loads(line) for line in stdout.splitlines() if line.startswith("{")][-1]
    return {"settings": {**settings.__dict__, "frame": FRAME}, "seconds": round(time.monotonic() - started, 1),
            "rows": rows(), "result_files": len(rows.rows), "summary": summary, "output": str(out),
            "memory": growth(series.samples, settings.images), "samples": series.as_json()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=int, default=SoakSettings.images)
    parser.add_argument("--batch-size", type=int, default=SoakSettings.batch_size)
    parser.add_argument("--workdir", default=None, help="default: a new temporary folder")
    parser.add_argument("--bank", default=None, help="score against this bank (default: build a tiny one first)")
    parser.add_argument("--json", default=None, help="write the figures and the samples here")
    args = parser.parse_args()
    import tempfile

    workdir = Path(args.workdir or tempfile.mkdtemp(prefix="spade-ray-soak-"))
    bank = Path(args.bank) if args.bank else make_bank(workdir)
    result = run_soak(workdir, bank, SoakSettings(images=args.images, batch_size=args.batch_size))
    print(json.dumps({k: v for k, v in result.items() if k != "samples"}, indent=2))
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=1) + "\n")


if __name__ == "__main__":
    main()
