"""Our image preprocessing against transformers' Gemma3ImageProcessorPil, and hostile image bytes."""

import io
import struct
import zlib

import numpy as np
import pytest
from PIL import Image
from transformers.models.gemma3.image_processing_pil_gemma3 import Gemma3ImageProcessorPil

from gemma3.processing import Gemma3ImageProcessor, decode_image

CONFIG = dict(size={"height": 28, "width": 28}, pan_and_scan_min_crop_size=8, pan_and_scan_max_num_crops=4,
              pan_and_scan_min_ratio_to_activate=1.2)


def image(mode, width, height, seed=0):
    rng = np.random.default_rng(seed)
    rgba = Image.fromarray(rng.integers(0, 256, (height, width, 4), dtype=np.uint8), "RGBA")
    if mode == "P+transparency":
        p = rgba.convert("RGB").convert("P", palette=Image.Palette.ADAPTIVE, colors=16)
        p.info["transparency"] = 3
        return p
    if mode == "I;16":
        return Image.frombytes("I;16", (width, height), rng.integers(0, 65536, (height, width), "<u2").tobytes())
    return rgba.convert(mode)


@pytest.mark.parametrize("mode", ["RGB", "RGBA", "LA", "L", "P", "P+transparency", "I;16", "CMYK", "1"])
@pytest.mark.parametrize("width, height", [(28, 28), (50, 20), (17, 61), (3, 1)])
@pytest.mark.parametrize("pan_and_scan", [False, True])
def test_pixels_match_transformers(mode, width, height, pan_and_scan):
    img = image(mode, width, height, seed=width * height)
    ref = Gemma3ImageProcessorPil(**CONFIG)(images=[img], do_pan_and_scan=pan_and_scan, return_tensors="np")
    got = Gemma3ImageProcessor.from_dict(CONFIG)([img], do_pan_and_scan=pan_and_scan)
    assert got["num_crops"] == list(np.asarray(ref["num_crops"]).reshape(-1))
    assert got["pixel_values"].shape == ref["pixel_values"].shape and got["pixel_values"].dtype == np.float32
    np.testing.assert_allclose(got["pixel_values"], ref["pixel_values"], atol=1e-5)


def test_pan_and_scan_makes_crops_for_wide_images():
    wide = image("RGB", 90, 20)
    out = Gemma3ImageProcessor.from_dict(CONFIG)([wide, image("RGB", 20, 20)], do_pan_and_scan=True)
    assert out["num_crops"] == [4, 0] and out["pixel_values"].shape == (6, 3, 28, 28)


def _png(img):
    buf = io.BytesIO()
    img.save(buf, "PNG")
    return buf.getvalue()


def test_bytes_are_decoded_and_exif_rotation_applied():
    img = image("RGB", 30, 10)
    buf = io.BytesIO()
    exif = Image.Exif()
    exif[0x0112] = 6  # rotate 90 degrees clockwise to display
    img.save(buf, "JPEG", exif=exif, quality=95)
    upright = decode_image(buf.getvalue())
    assert upright.size == (10, 30)
    processor = Gemma3ImageProcessor.from_dict(CONFIG)
    np.testing.assert_allclose(processor([buf.getvalue()])["pixel_values"], processor([upright])["pixel_values"])


def _bomb_png(width, height):
    """A PNG header declaring huge dimensions, with a tiny (invalid) body: nothing is allocated."""
    def chunk(kind, data):
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))
    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"\x00")) + chunk(b"IEND", b"")


@pytest.mark.parametrize("data, message", [
    (b"", "empty"),
    (b"definitely not an image", "cannot decode"),
    (_png(Image.new("RGB", (8, 8)))[:40], "cannot decode"),
    (_bomb_png(100_000, 100_000), "over the limit"),
])
def test_bad_bytes_raise_clear_errors(data, message):
    with pytest.raises(ValueError, match=message):
        decode_image(data, max_pixels=10_000_000)
