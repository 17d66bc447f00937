"""Pictures for a person: the anomaly map blended on the image, the mask as an outline, thumbnails.

A heatmap alone hides the part; a mask alone hides how sure the model is.  The overlay shows
both on the image itself: the heat colour fades in with the anomaly score (below half the pixel
threshold the image shows unchanged, so a normal image's overlay looks like the image rather than
tinted by SPADE's baseline distances), and the thresholded mask is drawn as a thin cyan outline,
a colour the heat scale (black-red-yellow) never contains.
"""

from __future__ import annotations

import base64

import numpy as np
from PIL import Image
from scipy import ndimage

from spade_ray.storage.outputs import encode_jpeg, heatmap_rgb

__all__ = ["OUTLINE_RGB", "draw_outline", "hatch", "jpeg_data_uri", "mask_outline", "overlay_rgb", "thumbnail"]

OUTLINE_RGB = (0, 255, 255)
# Most of the heat colour where the map reaches the top of the scale; the image still shows through.
MAX_ALPHA = 0.7
# Fraction of the colour scale (0..vmax = 2 x pixel threshold) below which nothing is blended.
FADE_START = 0.25


def mask_outline(mask: np.ndarray, width: int | None = None) -> np.ndarray:
    """The border pixels of a binary mask, ``width`` pixels thick (default: ~1/300 of the image, >= 1).

    Thickness grows with the image so the outline stays visible on a 4k frame and in a thumbnail.
    """
    mask = np.asarray(mask, dtype=bool)
    if width is None:
        width = max(1, round(min(mask.shape[:2]) / 300))
    inner = ndimage.binary_erosion(mask, iterations=width, border_value=0)
    return mask & ~inner


def draw_outline(image: np.ndarray, mask: np.ndarray, width: int | None = None,
                 colour: tuple[int, int, int] = OUTLINE_RGB) -> np.ndarray:
    """A copy of ``image`` (HxWx3 uint8) with the outline of ``mask`` (HxW, same size) drawn on it."""
    if image.shape[:2] != np.shape(mask):
        raise ValueError(f"image {image.shape[:2]} and mask {np.shape(mask)} must have the same size")
    out = np.array(image, dtype=np.uint8, copy=True)
    out[mask_outline(mask, width)] = colour
    return out


HATCH_RGB = (128, 128, 128)


def hatch(image: np.ndarray, region: np.ndarray, spacing: int = 6) -> np.ndarray:
    """A copy of ``image`` with grey diagonal stripes over ``region`` (HxW bool, same size): the ignored region.

    Stripes rather than a fill keep the part visible under them (an inspector checks that the mask
    covers the serial number, not more), and grey is in neither the heat scale nor the mask outline.
    """
    if image.shape[:2] != np.shape(region):
        raise ValueError(f"image {image.shape[:2]} and region {np.shape(region)} must have the same size")
    rows, cols = np.indices(np.shape(region))
    stripes = np.asarray(region, dtype=bool) & ((rows + cols) % max(spacing, 2) < max(spacing // 3, 1))
    out = np.array(image, dtype=np.uint8, copy=True)
    out[stripes] = HATCH_RGB
    return out


def overlay_rgb(image: np.ndarray, amap: np.ndarray, vmax: float, mask: np.ndarray | None = None) -> np.ndarray:
    """The anomaly map blended on the image (heat opacity grows with the score), plus the mask outline.

    ``vmax`` is the top of the fixed colour scale, the same as the heatmap's (twice the pixel
    threshold), so overlays of different images compare like the heatmaps do.
    """
    if image.shape[:2] != amap.shape:
        raise ValueError(f"image {image.shape[:2]} and anomaly map {amap.shape} must have the same size")
    level = amap.astype(np.float32) / max(float(vmax), 1e-12)
    strength = np.clip((level - FADE_START) / (1.0 - FADE_START), 0.0, 1.0)[..., None] * MAX_ALPHA
    blended = image.astype(np.float32) * (1.0 - strength) + heatmap_rgb(amap, vmax=vmax).astype(np.float32) * strength
    out = blended.round().clip(0, 255).astype(np.uint8)
    return draw_outline(out, mask) if mask is not None else out


def thumbnail(image: np.ndarray, max_side: int = 256, *, binary: bool = False) -> np.ndarray:
    """``image`` scaled down so its longer side is at most ``max_side`` (never up).

    ``binary`` masks are reduced by area and kept where any covered pixel was set, so a defect one
    pixel wide does not vanish from a thumbnail.
    """
    h, w = np.shape(image)[:2]
    scale = min(1.0, max_side / max(h, w))
    size = (max(1, round(w * scale)), max(1, round(h * scale)))
    if scale == 1.0:
        return np.asarray(image)
    if binary:
        small = Image.fromarray(np.asarray(image, dtype=np.uint8) * 255).resize(size, Image.Resampling.BOX)
        return np.asarray(small) > 0
    return np.asarray(Image.fromarray(np.asarray(image)).resize(size, Image.Resampling.LANCZOS))


def jpeg_data_uri(image: np.ndarray, quality: int = 80) -> str:
    """A ``data:image/jpeg;base64,...`` URI, to embed a picture in a self-contained HTML page."""
    return "data:image/jpeg;base64," + base64.b64encode(encode_jpeg(image, quality)).decode("ascii")
