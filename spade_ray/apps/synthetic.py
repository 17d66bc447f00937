"""A small synthetic dataset in the MVTec layout, so the pipeline can be demonstrated and
tested end to end without downloading anything.

The "product" is a brushed, finely striped metal-like surface. Normal images are
crops of one shared material at small random offsets, with their own fresh
brushing streaks, grain, brightness, contrast and illumination ramp, so no two
are identical and a detector has to learn the texture rather than memorise
pixels. Three defect types are painted on test images, each with a 0/255 mask:

* ``scratch``: 1-2 thin curved lines, brighter or darker, fading at their ends;
* ``spot``: 1-3 irregular blobs, all darker or all brighter;
* ``crack``: a dark jagged polyline with a few thinner branches.

Defect contrast is 1.5-3.5 times the texture's own standard deviation and each
covers roughly 0.5-4 % of the image: visible to a person, but not separable by a
simple threshold on brightness, because the texture spans a similar range.

Only numpy, scipy and PIL; everything derives from ``seed``, so a seed always
produces byte-identical files.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
from PIL import Image
from scipy import ndimage

__all__ = ["DEFECT_TYPES", "make_synthetic_dataset"]

DEFECT_TYPES = ("scratch", "spot", "crack")

# Standard deviation of the normal texture, in gray levels; defect contrasts are
# multiples of it.
TEXTURE_STD = 9.0
_MEAN_LEVEL = 120.0
_TINT = np.array([-4.0, 0.0, 5.0])  # a cool, steel-like cast, the same for every image


def _unit(field: np.ndarray) -> np.ndarray:
    field = field - field.mean()
    return field / (field.std() + 1e-12)


class _Material:
    """Shared texture fields of the product surface, larger than an image so it can be shifted."""

    def __init__(self, size: int, rng: np.random.Generator) -> None:
        self.size = size
        self.scale = size / 256.0
        self.pad = max(4, size // 16)
        n = size + self.pad
        s = self.scale
        # band-passed noise: mottling a few pixels to a few tens of pixels across
        noise = rng.standard_normal((n, n))
        band = ndimage.gaussian_filter(noise, 3 * s) - ndimage.gaussian_filter(noise, 10 * s)
        self.mottle = _unit(band)
        # fine oriented stripes whose phase wanders slowly, like a woven or lapped surface
        angle = rng.uniform(-0.35, 0.35) + np.pi / 2  # roughly vertical stripes
        period = 5.0 * max(s, 0.5)
        warp = _unit(ndimage.gaussian_filter(rng.standard_normal((n, n)), 16 * s))
        yy, xx = np.mgrid[0:n, 0:n].astype(np.float64)
        self.stripes = _unit(np.sin(2 * np.pi * (xx * np.sin(angle) + yy * np.cos(angle)) / period + 1.8 * warp))

    def sample(self, rng: np.random.Generator) -> np.ndarray:
        """One normal image as float gray levels, without the final grain."""
        size, s = self.size, self.scale
        dy, dx = rng.integers(0, self.pad + 1, size=2)
        crop = np.s_[dy : dy + size, dx : dx + size]
        # brushing streaks: noise stretched along x, fresh for every image
        streaks = _unit(ndimage.gaussian_filter(rng.standard_normal((size, size)), (0.7 * s, 12 * s)))
        w_stripes, w_mottle, w_streaks = 0.6, 0.5, 0.6
        texture = w_stripes * self.stripes[crop] + w_mottle * self.mottle[crop] + w_streaks * streaks
        texture *= TEXTURE_STD / np.sqrt(w_stripes**2 + w_mottle**2 + w_streaks**2)
        texture *= rng.uniform(0.9, 1.1)  # per-image contrast
        yy, xx = np.mgrid[0:size, 0:size] / size - 0.5
        ramp_angle = rng.uniform(0, 2 * np.pi)
        ramp = rng.uniform(0, 8) * (np.cos(ramp_angle) * xx + np.sin(ramp_angle) * yy)
        return _MEAN_LEVEL + rng.uniform(-8, 8) + ramp + texture


def _resample(points: np.ndarray, values: np.ndarray, step: float = 0.5) -> tuple[np.ndarray, np.ndarray]:
    """Points along a polyline every ``step`` pixels, with ``values`` (N, k) interpolated."""
    seg = np.linalg.norm(np.diff(points, axis=0), axis=1)
    arc = np.concatenate([[0.0], np.cumsum(seg)])
    at = np.arange(0.0, arc[-1] + step, step)
    dense = np.stack([np.interp(at, arc, points[:, i]) for i in range(2)], axis=1)
    vals = np.stack([np.interp(at, arc, values[:, i]) for i in range(values.shape[1])], axis=1)
    return dense, vals


def _strokes(
    size: int, polylines: list[tuple[np.ndarray, np.ndarray, np.ndarray]]
) -> tuple[np.ndarray, np.ndarray]:
    """Rasterise polylines with per-vertex radius and weight.

    Each polyline is (points (N, 2) as y, x; radius (N,); weight (N,)). Returns an
    anti-aliased coverage ``alpha`` (coverage times weight) and the mask
    ``distance <= radius``, so the mask is exactly where the stroke is painted.
    """
    centre = np.zeros((size, size), dtype=bool)
    radius = np.zeros((size, size))
    weight = np.zeros((size, size))
    for points, rad, wgt in polylines:
        dense, vals = _resample(points, np.stack([rad, wgt], axis=1))
        idx = np.rint(dense).astype(int)
        keep = ((idx >= 0) & (idx < size)).all(axis=1)  # a stroke may leave the frame
        iy, ix = idx[keep].T
        centre[iy, ix] = True
        radius[iy, ix] = vals[keep, 0]
        weight[iy, ix] = vals[keep, 1]
    if not centre.any():
        return np.zeros((size, size)), np.zeros((size, size), dtype=bool)
    dist, (ny, nx) = ndimage.distance_transform_edt(~centre, return_indices=True)
    r = radius[ny, nx]
    alpha = np.clip(r + 0.5 - dist, 0.0, 1.0) * weight[ny, nx]
    return alpha, dist <= r


def _scratch(size: int, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    lines = []
    for _ in range(rng.integers(1, 3)):
        length = rng.uniform(0.35, 0.7) * size
        direction = rng.uniform(0, 2 * np.pi)
        d = np.array([np.sin(direction), np.cos(direction)])
        centre = rng.uniform(0.3, 0.7, size=2) * size
        p0, p2 = centre - d * length / 2, centre + d * length / 2
        p1 = centre + np.array([-d[1], d[0]]) * rng.uniform(-0.25, 0.25) * length  # bend
        t = np.linspace(0, 1, 64)[:, None]
        curve = (1 - t) ** 2 * p0 + 2 * (1 - t) * t * p1 + t**2 * p2
        radius = np.full(64, rng.uniform(1.0, 1.6) * max(size / 256, 0.5))
        fade = 0.55 + 0.45 * np.sin(np.pi * t[:, 0])  # shallower towards the ends
        lines.append((curve, radius, fade))
    alpha, mask = _strokes(size, lines)
    sign = 1.0 if rng.random() < 0.6 else -1.0
    return sign * rng.uniform(2.0, 3.0) * TEXTURE_STD * alpha, mask


def _spot(size: int, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    yy, xx = np.mgrid[0:size, 0:size].astype(np.float64)
    alpha = np.zeros((size, size))
    mask = np.zeros((size, size), dtype=bool)
    for _ in range(rng.integers(1, 4)):
        cy, cx = rng.uniform(0.15, 0.85, size=2) * size
        base = rng.uniform(0.035, 0.08) * size
        rho = np.hypot(yy - cy, xx - cx)
        theta = np.arctan2(yy - cy, xx - cx)
        wobble = sum(rng.uniform(0, 0.12) * np.cos(k * theta + rng.uniform(0, 2 * np.pi)) for k in (2, 3, 4))
        r = base * (1 + wobble)
        edge = r - rho
        inside = edge >= 0
        soft = np.clip(edge / 1.5 + 0.5, 0.0, 1.0) * (1 - 0.35 * np.clip(rho / r, 0, 1) ** 2)
        alpha = np.maximum(alpha, soft)
        mask |= inside
    sign = -1.0 if rng.random() < 0.6 else 1.0
    return sign * rng.uniform(2.0, 3.0) * TEXTURE_STD * alpha, mask


def _walk(start: np.ndarray, heading: float, steps: int, step: float, rng: np.random.Generator) -> np.ndarray:
    """A jagged path: a persistent heading with random turns."""
    points = [start]
    for _ in range(steps):
        heading += rng.normal(0, 0.45)
        points.append(points[-1] + step * np.array([np.sin(heading), np.cos(heading)]))
    return np.array(points)


def _crack(size: int, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    s = max(size / 256, 0.5)
    step = 0.025 * size
    steps = int(rng.uniform(0.4, 0.7) * size / step)
    heading = rng.uniform(0, 2 * np.pi)
    towards = np.array([np.sin(heading), np.cos(heading)])
    start = rng.uniform(0.3, 0.7, size=2) * size - 0.5 * steps * step * towards  # centred-ish
    main = _walk(start, heading, steps, step, rng)
    taper = np.linspace(1.0, 0.5, len(main))
    width = rng.uniform(1.5, 2.2) * s
    lines = [(main, width * taper, np.ones(len(main)))]
    for _ in range(rng.integers(1, 4)):
        at = rng.integers(1, len(main) - 1)
        side = rng.choice([-1.0, 1.0])
        direction = np.arctan2(*(main[at + 1] - main[at - 1])) + side * rng.uniform(0.5, 1.1)
        branch = _walk(main[at], direction, int(rng.integers(4, 9)), step * 0.8, rng)
        thin = np.linspace(0.9, 0.5, len(branch)) * s
        lines.append((branch, thin, np.linspace(0.9, 0.6, len(branch))))
    alpha, mask = _strokes(size, lines)
    return -rng.uniform(2.5, 3.5) * TEXTURE_STD * alpha, mask


_PAINTERS = {"scratch": _scratch, "spot": _spot, "crack": _crack}


def _finish(gray: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """Add sensor grain (after any defect, so defects carry it too) and tint to RGB uint8."""
    grain = 2.5 * _unit(ndimage.gaussian_filter(rng.standard_normal(gray.shape), 0.6))
    rgb = (gray + grain)[:, :, None] + _TINT
    return np.clip(np.rint(rgb), 0, 255).astype(np.uint8)


def make_synthetic_dataset(
    root: str | Path,
    n_train: int = 40,
    n_test_good: int = 10,
    n_test_per_defect: int = 8,
    size: int = 256,
    seed: int = 0,
) -> Path:
    """Write a synthetic MVTec-layout dataset under ``root`` and return its path.

    ``root`` must not exist or be empty: writing into an existing dataset would
    leave a mix of old and new files. Images are ``size`` x ``size`` RGB PNGs
    named ``000.png``...; masks are 0/255 grayscale PNGs at
    ``ground_truth/<type>/<stem>_mask.png``.
    """
    root = Path(root)
    if root.exists() and (not root.is_dir() or any(root.iterdir())):
        raise FileExistsError(f"synthetic dataset root {str(root)!r} exists and is not an empty folder")
    if size < 32:
        raise ValueError(f"size must be >= 32, got {size}")

    material = _Material(size, np.random.default_rng([seed, 0]))

    def save(image: np.ndarray, relpath: str) -> None:
        path = root / relpath
        path.parent.mkdir(parents=True, exist_ok=True)
        Image.fromarray(image).save(path)

    # One generator per image, keyed by (seed, split, type, index): an image
    # does not change when the number of other images does.
    for i in range(n_train):
        rng = np.random.default_rng([seed, 1, 0, i])
        save(_finish(material.sample(rng), rng), f"train/good/{i:03d}.png")
    for i in range(n_test_good):
        rng = np.random.default_rng([seed, 2, 0, i])
        save(_finish(material.sample(rng), rng), f"test/good/{i:03d}.png")
    for code, defect in enumerate(DEFECT_TYPES, start=1):
        for i in range(n_test_per_defect):
            rng = np.random.default_rng([seed, 2, code, i])
            gray = material.sample(rng)
            delta, mask = _PAINTERS[defect](size, rng)
            save(_finish(gray + delta, rng), f"test/{defect}/{i:03d}.png")
            save(mask.astype(np.uint8) * 255, f"ground_truth/{defect}/{i:03d}_mask.png")
    return root
