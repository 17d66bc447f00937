"""Decode untrusted image bytes into arrays the feature extractor can use.

Images arrive from customers' buckets and folders, so every byte string is
treated as untrusted: it may be empty, truncated, not an image at all, a
decompression bomb, or an unusual pixel format (16-bit, float, CMYK, palette).
Every such failure becomes one exception type, :class:`ImageDecodeError`, whose
message names the input, so a batch job can log and skip the bad file instead
of dying on an opaque PIL error thousands of images in.

Pixel format choices, made once here so all callers agree:

* Alpha is *dropped*, not composited on black or white: the colour channels are
  what the camera saw; alpha in inspection images is an export artefact.
* Integer images wider than 8 bits are scaled by their fixed range (``v >> 8``),
  never by the image's own min/max: stretching each image separately would hide
  exactly the global brightness changes an anomaly detector must see.
* EXIF orientation is applied, so the array is the image as a viewer shows it
  (and as a person drew its mask).

No Ray here: this module is used by workers and by plain scripts alike.
"""

from __future__ import annotations

import io
import warnings
from typing import Any

import numpy as np
from PIL import Image, ImageFile, ImageOps, UnidentifiedImageError

from spade_ray.storage.urls import read_bytes

__all__ = [
    "DEFAULT_MAX_PIXELS",
    "ImageDecodeError",
    "decode_image",
    "decode_mask",
    "load_image",
    "load_mask",
    "set_pixel_limit",
]

# 100 megapixels: line-scan cameras on web inspection lines produce very long
# images (e.g. 8k x 12k), so PIL's default of ~89 Mpx is too tight, while
# anything bigger is far more likely a decompression bomb than a real frame.
DEFAULT_MAX_PIXELS = 100_000_000

# PIL's process-wide bomb guard is set explicitly and follows ``max_pixels``
# (see :func:`set_pixel_limit`), never PIL's own default: PIL warns above the
# limit and refuses above twice it inside ``Image.open``, before any pixel is
# inflated.  The limit callers control is ``max_pixels``, checked from the
# header right after opening; PIL's refusal is the backstop for headers so
# large that even opening them is refused.  PIL's warning between 1x and 2x is
# silenced because every such image is refused by the header check just after.
Image.MAX_IMAGE_PIXELS = DEFAULT_MAX_PIXELS
warnings.filterwarnings("ignore", category=Image.DecompressionBombWarning)
# A truncated file must fail loudly rather than decode with a grey bottom half
# that would look like a huge anomaly.
ImageFile.LOAD_TRUNCATED_IMAGES = False

# Integer modes wider than 8 bits; their samples are treated as 16-bit unsigned
# ('I' is how PIL has long represented 16-bit PNG/TIFF data).
_WIDE_INT_MODES = frozenset({"I;16", "I;16L", "I;16B", "I;16N", "I;16S", "I"})


def set_pixel_limit(max_pixels: int) -> None:
    """Tie PIL's process-wide decompression-bomb limit to ``max_pixels`` (``--max-pixels``).

    Called on every decode, so a Ray worker process that decodes for a job with another limit
    follows that job's limit rather than whatever the process last used.
    """
    if max_pixels < 1:
        raise ValueError(f"max_pixels must be >= 1; got {max_pixels}")
    if Image.MAX_IMAGE_PIXELS != max_pixels:
        Image.MAX_IMAGE_PIXELS = int(max_pixels)


class ImageDecodeError(ValueError):
    """An input could not be turned into an image array; says which and why."""

    def __init__(self, uri: str, reason: str) -> None:
        # Both parts go to args (not a pre-formatted message) so the exception
        # survives pickling, e.g. when a Ray worker sends it to the driver.
        super().__init__(uri, reason)
        self.uri = uri
        self.reason = reason

    def __str__(self) -> str:
        return f"cannot decode image {self.uri!r}: {self.reason}"


# File signatures of the formats inspection cameras write; PIL's plugin name for each.
_SIGNATURES = ((b"\x89PNG\r\n\x1a\n", "PNG"), (b"\xff\xd8\xff", "JPEG"), (b"II*\x00", "TIFF"),
               (b"MM\x00*", "TIFF"), (b"BM", "BMP"))


def _unidentified_reason(data: bytes) -> str:
    """Why PIL identified no format: not an image at all, or a known format it cannot read.

    PIL hides each plugin's reason behind "cannot identify image file"; for a file that has the
    signature of a known format the plugin is asked again, so the reason says *what* is
    unsupported (e.g. a TIFF's pixel layout) instead of claiming the file is no image.
    """
    for magic, fmt in _SIGNATURES:
        if data.startswith(magic):
            try:
                Image.init()
                Image.OPEN[fmt][0](io.BytesIO(data), "")
            except Exception as exc:  # noqa: BLE001 - the plugin's own complaint, whatever its type
                return f"unsupported or corrupt {fmt} ({type(exc).__name__}: {exc})"
            return f"unsupported or corrupt {fmt}"
    return "not a recognised image format"


def _open_checked(data: bytes, uri: str, max_pixels: int, min_side: int) -> Image.Image:
    """Open, size-check, fully decode and orient an image, or raise ImageDecodeError.

    The size checks use only the header, so a bomb is rejected before its
    pixels are inflated.
    """
    if not data:
        raise ImageDecodeError(uri, "empty input (0 bytes)")
    set_pixel_limit(max_pixels)
    try:
        img = Image.open(io.BytesIO(data))
    except Image.DecompressionBombError as exc:
        raise ImageDecodeError(
            uri, f"too many pixels (> max_pixels={max_pixels}), refused as a decompression bomb ({exc})"
        ) from exc
    except UnidentifiedImageError as exc:
        raise ImageDecodeError(uri, _unidentified_reason(data)) from exc
    except Exception as exc:  # PIL plugins raise assorted types on malformed headers
        raise ImageDecodeError(uri, f"unreadable image header ({type(exc).__name__}: {exc})") from exc

    width, height = img.size
    if width * height > max_pixels:
        raise ImageDecodeError(
            uri, f"too many pixels: {width}x{height} = {width * height} > max_pixels={max_pixels}"
        )
    if width < min_side or height < min_side:
        raise ImageDecodeError(uri, f"too small: {width}x{height}, each side must be >= {min_side}")

    try:
        img.load()
        img = ImageOps.exif_transpose(img)
    except Image.DecompressionBombError as exc:
        raise ImageDecodeError(
            uri, f"too many pixels (> max_pixels={max_pixels}), refused as a decompression bomb ({exc})"
        ) from exc
    except Exception as exc:  # OSError, SyntaxError, EOFError, zlib/struct errors...
        raise ImageDecodeError(
            uri, f"truncated or corrupt image data ({type(exc).__name__}: {exc})"
        ) from exc
    return img


def _wide_to_uint8(img: Image.Image) -> np.ndarray:
    """Map a 16-bit-style integer image to 8 bit by its fixed range (v >> 8)."""
    values = np.asarray(img).astype(np.int64)
    return (np.clip(values, 0, 65535) >> 8).astype(np.uint8)


def _float_to_uint8(img: Image.Image) -> np.ndarray:
    """Map an 'F' image to 8 bit the way PIL's own F->L conversion does.

    Float samples are taken to be in 8-bit units (clipped to 0..255, NaN -> 0):
    a fixed mapping, for the same reason 16-bit data is not min/max stretched.
    """
    values = np.nan_to_num(np.asarray(img, dtype=np.float64), nan=0.0, posinf=255.0, neginf=0.0)
    return np.clip(np.rint(values), 0, 255).astype(np.uint8)


def _gray_or_none(img: Image.Image) -> np.ndarray | None:
    """8-bit grayscale array for single-channel modes, None for colour modes."""
    mode = img.mode
    if mode in _WIDE_INT_MODES:
        return _wide_to_uint8(img)
    if mode == "F":
        return _float_to_uint8(img)
    if mode == "L":
        return np.array(img, dtype=np.uint8)
    if mode in ("LA", "La"):
        return np.array(img.getchannel(0), dtype=np.uint8)
    if mode == "1":
        return np.array(img.convert("L"), dtype=np.uint8)
    return None


def _to_rgb(img: Image.Image, uri: str) -> np.ndarray:
    gray = _gray_or_none(img)
    if gray is not None:
        return np.repeat(gray[:, :, None], 3, axis=2)
    mode = img.mode
    try:
        if mode == "RGB":
            rgb = np.array(img, dtype=np.uint8)
        elif mode == "RGBA":
            rgb = np.array(img, dtype=np.uint8)[:, :, :3]
        elif mode in ("P", "PA", "RGBa"):
            # Through RGBA so palette transparency is kept as alpha, then dropped.
            rgb = np.array(img.convert("RGBA"), dtype=np.uint8)[:, :, :3]
        else:  # CMYK, YCbCr, RGBX, LAB, HSV, ...
            rgb = np.array(img.convert("RGB"), dtype=np.uint8)
    except Exception as exc:
        raise ImageDecodeError(uri, f"unsupported pixel mode {mode!r} ({exc})") from exc
    return np.ascontiguousarray(rgb)


def decode_image(
    data: bytes,
    uri: str = "<bytes>",
    max_pixels: int = DEFAULT_MAX_PIXELS,
    min_side: int = 8,
) -> np.ndarray:
    """Decode image bytes into an HxWx3 uint8 RGB array, as a viewer shows it.

    ``uri`` is only used in error messages. Raises :class:`ImageDecodeError` for
    empty, corrupt, truncated, non-image, too small (a side < ``min_side``) or
    too large (> ``max_pixels``, checked from the header) inputs.
    """
    img = _open_checked(data, uri, max_pixels=max_pixels, min_side=min_side)
    return _to_rgb(img, uri)


def decode_mask(data: bytes, uri: str = "<bytes>", max_pixels: int = DEFAULT_MAX_PIXELS) -> np.ndarray:
    """Decode a ground-truth mask into an HxW bool array (True = defective).

    Real masks are not clean binary (JPEG-like noise, anti-aliased edges), so the
    mask is converted to 8-bit grayscale and thresholded at > 127. Masks of any
    size are accepted (``min_side`` 1).
    """
    img = _open_checked(data, uri, max_pixels=max_pixels, min_side=1)
    gray = _gray_or_none(img)
    if gray is None:
        rgb = _to_rgb(img, uri)
        gray = np.array(Image.fromarray(rgb).convert("L"), dtype=np.uint8)
    return gray > 127


def load_image(uri: str, storage_options: dict[str, Any] | None = None, **kw: Any) -> np.ndarray:
    """Read and decode an image; ``kw`` goes to :func:`decode_image`."""
    return decode_image(read_bytes(uri, storage_options), uri=uri, **kw)


def load_mask(uri: str, storage_options: dict[str, Any] | None = None, max_pixels: int = DEFAULT_MAX_PIXELS) -> np.ndarray:
    """Read and decode a ground-truth mask (see :func:`decode_mask`)."""
    return decode_mask(read_bytes(uri, storage_options), uri=uri, max_pixels=max_pixels)
