"""Input folders made of the small bank's real test images, for runs that need many batches."""

from __future__ import annotations

import shutil
from pathlib import Path


def camera_folders(small_bank: dict, root: Path, n_images: int) -> Path:
    """``n_images`` copies of the small dataset's test images as ``root/cam{0..3}/NNN.png`` (each its own input)."""
    sources = sorted((small_bank["dataset"] / "test").glob("*/*.png"))
    for n in range(n_images):
        target = root / f"cam{n % 4}" / f"{n:03d}.png"
        target.parent.mkdir(parents=True, exist_ok=True)
        shutil.copy(sources[n % len(sources)], target)
    return root
