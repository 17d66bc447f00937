"""Decoding untrusted image bytes: every supported mode, and every way to fail."""

from __future__ import annotations

import io
import pickle
import struct
import zlib

import numpy as np
import pytest
from PIL import Image

from spade_ray.storage.images import (
    ImageDecodeError,
    decode_image,
    decode_mask,
    load_image,
    load_mask,
)
from spade_ray.storage.urls import read_bytes


def encode(img: Image.Image, fmt: str = "PNG", **kw) -> bytes:
    buf = io.BytesIO()
    img.save(buf, fmt, **kw)
    return buf.getvalue()


def png_chunk(kind: bytes, body: bytes) -> bytes:
    return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body))


def png_header_only(width: int, height: int) -> bytes:
    """A valid PNG header claiming width x height, followed by almost no pixel data."""
    ihdr = struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0)  # 8-bit grayscale
    idat = zlib.compress(b"\x00" * 100)  # a hundred bytes where gigabytes are due
    return b"\x89PNG\r\n\x1a\n" + png_chunk(b"IHDR", ihdr) + png_chunk(b"IDAT", idat)


# --- modes -----------------------------------------------------------------


def test_rgb_round_trips_exactly():
    rgb = np.random.default_rng(0).integers(0, 256, (12, 16, 3), dtype=np.uint8)
    out = decode_image(encode(Image.fromarray(rgb)))
    assert out.dtype == np.uint8 and out.shape == (12, 16, 3)
    np.testing.assert_array_equal(out, rgb)


def test_grayscale_L_is_replicated_to_three_channels():
    out = decode_image(encode(Image.new("L", (16, 12), 77)))
    assert out.shape == (12, 16, 3)
    assert (out == 77).all()


def test_LA_drops_alpha():
    out = decode_image(encode(Image.new("LA", (16, 16), (77, 0))))
    assert (out == 77).all()  # fully transparent, yet the gray value is kept


def test_RGBA_drops_alpha_instead_of_compositing_on_black():
    out = decode_image(encode(Image.new("RGBA", (16, 16), (10, 200, 30, 0))))
    assert out.shape == (16, 16, 3)
    assert (out == [10, 200, 30]).all()


def test_palette_image_with_transparency_keeps_colours():
    img = Image.new("P", (16, 16), 0)
    img.putpalette([0, 0, 0, 250, 20, 5] + [0] * (256 * 3 - 6))
    img.paste(1, (0, 0, 8, 16))
    data = encode(img, transparency=1)  # palette entry 1 is transparent
    out = decode_image(data)
    assert (out[:, :8] == [250, 20, 5]).all()
    assert (out[:, 8:] == 0).all()


def test_16bit_grayscale_is_scaled_by_range_not_by_min_max():
    values = np.array([[0x1234, 0xABCD] * 8] * 16, dtype=np.uint16)
    img = Image.fromarray(values)
    assert img.mode == "I;16"
    out = decode_image(encode(img))
    # value >> 8; a min/max stretch would have given 0 and 255 instead
    assert out[0, 0].tolist() == [0x12] * 3
    assert out[0, 1].tolist() == [0xAB] * 3


def test_16bit_big_endian_and_32bit_I_tiffs():
    values = np.array([[0x1234, 0xFFFF] * 8] * 16, dtype=np.uint16)
    big_endian = Image.frombytes("I;16B", (16, 16), values.astype(">u2").tobytes())
    wide = Image.fromarray(values.astype(np.int32))
    assert wide.mode == "I"
    for img in (big_endian, wide):
        out = decode_image(encode(img, "TIFF"))
        assert out[0, :2, 0].tolist() == [0x12, 0xFF]


def test_float_image_clips_to_8bit_units():
    values = np.full((16, 16), 100.6, dtype=np.float32)
    values[0, :3] = [-5.0, 300.0, np.nan]
    out = decode_image(encode(Image.fromarray(values), "TIFF"))
    assert out[0, :4, 0].tolist() == [0, 255, 0, 101]


def test_one_bit_image_becomes_0_or_255():
    img = Image.new("1", (16, 16), 0)
    img.paste(1, (0, 0, 16, 4))
    out = decode_image(encode(img))
    assert (out[:4] == 255).all() and (out[4:] == 0).all()


def test_cmyk_jpeg_is_converted_to_rgb():
    img = Image.new("CMYK", (16, 16), (0, 255, 255, 0))  # no cyan, full magenta+yellow: red
    data = encode(img, "JPEG", quality=95)
    assert Image.open(io.BytesIO(data)).mode == "CMYK"
    r, g, b = decode_image(data)[8, 8].astype(int)
    assert r > 240 and g < 15 and b < 15


def test_ycbcr_tiff_is_converted_to_rgb():
    data = encode(Image.new("YCbCr", (16, 16), (128, 128, 128)), "TIFF")
    assert Image.open(io.BytesIO(data)).mode == "YCbCr"
    assert (decode_image(data) == 128).all()


def test_exif_orientation_6_is_applied():
    img = Image.new("RGB", (40, 20), (0, 0, 0))
    img.paste((255, 255, 255), (0, 0, 10, 20))  # white band on the left
    exif = Image.Exif()
    exif[0x0112] = 6  # stored sideways: rotate 90 degrees clockwise to display
    out = decode_image(encode(img, "JPEG", exif=exif.tobytes(), quality=95))
    assert out.shape == (40, 20, 3)  # viewer's shape: transposed
    assert out[:10].mean() > 200 and out[10:].mean() < 50  # left band is now on top


# --- failures ----------------------------------------------------------------


def valid_png(size: int = 64) -> bytes:
    noise = np.random.default_rng(1).integers(0, 256, (size, size, 3), dtype=np.uint8)
    return encode(Image.fromarray(noise))


def valid_jpeg(size: int = 64) -> bytes:
    noise = np.random.default_rng(2).integers(0, 256, (size, size, 3), dtype=np.uint8)
    return encode(Image.fromarray(noise), "JPEG")


def corrupt_middle(data: bytes) -> bytes:
    mid = len(data) // 2
    return data[:mid] + bytes(b ^ 0xFF for b in data[mid : mid + 64]) + data[mid + 64 :]


def tiff_with_unsupported_layout() -> bytes:
    """A valid TIFF whose pixel layout PIL cannot read: one sample per pixel tagged as CMYK."""
    data = bytearray(encode(Image.new("L", (16, 16), 7), "TIFF"))
    ifd = struct.unpack("<I", data[4:8])[0]
    for i in range(struct.unpack("<H", data[ifd:ifd + 2])[0]):
        entry = ifd + 2 + 12 * i
        if struct.unpack("<H", data[entry:entry + 2])[0] == 262:  # PhotometricInterpretation
            data[entry + 8:entry + 10] = struct.pack("<H", 5)  # "separated" (CMYK)
    return bytes(data)


@pytest.mark.parametrize(
    ("data", "kw", "reason"),
    [
        pytest.param(b"", {}, "empty", id="zero-bytes"),
        pytest.param(b"just some text, not an image", {}, "not a recognised image", id="not-an-image"),
        pytest.param(tiff_with_unsupported_layout(), {}, "unsupported or corrupt TIFF (SyntaxError: unknown pixel mode)",
                     id="unsupported-mode"),
        pytest.param(valid_png()[: len(valid_png()) // 2], {}, "truncated or corrupt", id="truncated-png"),
        pytest.param(valid_jpeg()[: len(valid_jpeg()) // 2], {}, "truncated or corrupt", id="truncated-jpeg"),
        pytest.param(corrupt_middle(valid_png()), {}, "truncated or corrupt", id="corrupt-png"),
        pytest.param(encode(Image.new("RGB", (7, 100))), {}, "too small", id="too-narrow"),
        pytest.param(encode(Image.new("RGB", (100, 4))), {"min_side": 5}, "too small", id="too-short"),
        pytest.param(encode(Image.new("RGB", (100, 100))), {"max_pixels": 9_999}, "> max_pixels=9999", id="too-big"),
        # the size is refused from the header: decoding the (missing) pixels first
        # would have reported a truncated file instead
        pytest.param(png_header_only(1_000, 1_000), {"max_pixels": 999_999}, "> max_pixels", id="big-header-only"),
        # PIL's own bomb guard follows max_pixels and fires inside Image.open above twice it
        pytest.param(png_header_only(20_000, 20_000), {}, "max_pixels=100000000), refused as a decompression bomb",
                     id="pil-bomb"),
        pytest.param(png_header_only(300, 300), {"max_pixels": 40_000}, "decompression bomb", id="pil-bomb-follows-max-pixels"),
    ],
)
def test_bad_input_raises_decode_error_naming_the_uri(data, kw, reason):
    uri = "s3://bucket/line-3/img_0042.png"
    with pytest.raises(ImageDecodeError) as info:
        decode_image(data, uri=uri, **kw)
    message = str(info.value)
    assert uri in message
    assert reason in message
    assert isinstance(info.value, ValueError)


def test_decode_error_survives_pickling_for_ray_workers():
    err = pickle.loads(pickle.dumps(ImageDecodeError("gs://b/x.png", "empty input")))
    assert str(err) == "cannot decode image 'gs://b/x.png': empty input"
    assert err.uri == "gs://b/x.png"


# --- masks -------------------------------------------------------------------


def test_mask_is_binarised_above_127():
    values = np.array([[0, 127, 128, 255] * 4] * 4, dtype=np.uint8)
    mask = decode_mask(encode(Image.fromarray(values)), uri="m.png")
    assert mask.dtype == bool and mask.shape == (4, 16)
    assert mask[0, :4].tolist() == [False, False, True, True]


def test_16bit_and_rgb_masks_use_the_same_threshold():
    wide = np.array([[0x7FFF, 0x8000] * 4] * 4, dtype=np.uint16)  # >>8: 127, 128
    assert decode_mask(encode(Image.fromarray(wide)), "m16.png")[0, :2].tolist() == [False, True]
    rgba = np.zeros((4, 8, 4), dtype=np.uint8)
    rgba[:, 4:, :3] = 255  # white right half, alpha 0 everywhere: alpha is ignored
    assert decode_mask(encode(Image.fromarray(rgba)), "m.png")[0].tolist() == [False] * 4 + [True] * 4


def test_bad_mask_raises_decode_error_naming_the_uri():
    with pytest.raises(ImageDecodeError, match="gt/001_mask.png"):
        decode_mask(b"", "gt/001_mask.png")


# --- reading through fsspec ---------------------------------------------------


def test_load_image_and_mask_from_local_path_and_memory_url(tmp_path):
    import fsspec

    rgb = np.full((10, 12, 3), 9, dtype=np.uint8)
    local = tmp_path / "a.png"
    local.write_bytes(encode(Image.fromarray(rgb)))
    assert load_image(str(local)).shape == (10, 12, 3)

    fs = fsspec.filesystem("memory")
    fs.pipe("/spade-test-images/mask.png", encode(Image.new("L", (5, 5), 200)))
    try:
        assert read_bytes("memory://spade-test-images/mask.png")[:4] == b"\x89PNG"
        assert load_mask("memory://spade-test-images/mask.png").all()
        with pytest.raises(ImageDecodeError, match="memory://spade-test-images/mask.png"):
            load_image("memory://spade-test-images/mask.png")  # 5x5 < min_side
    finally:
        fs.rm("/spade-test-images", recursive=True)


def test_missing_file_is_file_not_found(tmp_path):
    with pytest.raises(FileNotFoundError):
        load_image(str(tmp_path / "nope.png"))


# --- limits and orientation, as a job sees them ---------------------------------


def test_pil_bomb_limit_is_set_explicitly_and_follows_max_pixels():
    from spade_ray.storage.images import DEFAULT_MAX_PIXELS

    decode_image(valid_png(), max_pixels=12_345)
    assert Image.MAX_IMAGE_PIXELS == 12_345
    decode_image(valid_png())
    assert Image.MAX_IMAGE_PIXELS == DEFAULT_MAX_PIXELS


def test_mask_aligns_with_an_exif_rotated_image_as_a_viewer_shows_it():
    # the camera stored the frame sideways (40x20) and tagged it "rotate 90 clockwise";
    # the annotator drew the mask on the upright view (20 wide, 40 tall), marking the top quarter
    stored = Image.new("RGB", (40, 20), (0, 0, 0))
    stored.paste((255, 255, 255), (0, 0, 10, 20))  # left band of the stored frame = top of the upright view
    exif = Image.Exif()
    exif[0x0112] = 6
    image = decode_image(encode(stored, "JPEG", exif=exif.tobytes(), quality=95), "cam/001.jpg")
    drawn = np.zeros((40, 20), dtype=np.uint8)
    drawn[:10] = 255
    mask = decode_mask(encode(Image.fromarray(drawn)), "gt/001_mask.png")
    assert mask.shape == image.shape[:2]
    bright = image.mean(axis=2) > 128
    assert (bright == mask).mean() > 0.95
