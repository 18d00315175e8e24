"""Image preprocessing equal to transformers' ``Gemma3ImageProcessorPil``, in Pillow and NumPy.

Steps, as transformers does them: RGB conversion (transparency composited onto white), optional
pan-and-scan crops of the RGB array, a PIL resize of each image straight to ``size`` (aspect ratio
not kept), ``* rescale_factor`` in float64 then float32, ``(x - mean) / std``, channels first.
Decoding bytes adds what transformers' ``load_image`` does (EXIF orientation) and what a server
needs (a pixel limit against decompression bombs, clear errors for undecodable data).
"""

from __future__ import annotations

import dataclasses
import io
import itertools
import json
import math
import os
import warnings
from typing import Any

import numpy as np
from PIL import Image, ImageOps

DEFAULT_MAX_PIXELS = 64_000_000


def decode_image(data: bytes, max_pixels: int = DEFAULT_MAX_PIXELS) -> Image.Image:
    """Encoded bytes → an upright PIL image; ValueError for anything that is not a usable image."""
    if not data:
        raise ValueError("the image is empty (0 bytes)")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            image = Image.open(io.BytesIO(data))
            width, height = image.size
            if width * height > max_pixels:  # checked before any pixel is decoded
                raise ValueError(f"the image is {width}x{height}, over the limit of {max_pixels} pixels")
            if width == 0 or height == 0:
                raise ValueError(f"the image has no pixels ({width}x{height})")
            image.load()
    except ValueError:
        raise
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as e:
        raise ValueError(f"the image is over the limit of {max_pixels} pixels ({e})") from None
    except (OSError, SyntaxError) as e:
        raise ValueError(f"cannot decode the image: {e}") from None
    return ImageOps.exif_transpose(image)


def to_rgb(image: Image.Image) -> Image.Image:
    """RGB, with any transparency composited onto white (transformers' ``convert_to_rgb``)."""
    if "A" in image.getbands() or image.info.get("transparency") is not None:
        rgba = image.convert("RGBA")
        background = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(background, rgba).convert("RGB")
    return image.convert("RGB")


@dataclasses.dataclass
class Gemma3ImageProcessor:
    """Reads ``preprocessor_config.json``; ``__call__`` returns pixel_values (N, 3, H, W) and num_crops."""

    size: dict = dataclasses.field(default_factory=lambda: {"height": 224, "width": 224})
    resample: int = 2  # PIL bilinear
    do_resize: bool = True
    do_rescale: bool = True
    rescale_factor: float = 1 / 255
    do_normalize: bool = True
    image_mean: Any = (0.5, 0.5, 0.5)
    image_std: Any = (0.5, 0.5, 0.5)
    do_convert_rgb: bool = True
    do_pan_and_scan: bool = False
    pan_and_scan_min_crop_size: int = 256
    pan_and_scan_max_num_crops: int = 4
    pan_and_scan_min_ratio_to_activate: float = 1.2

    @classmethod
    def from_dict(cls, d: dict) -> Gemma3ImageProcessor:
        known = {f.name for f in dataclasses.fields(cls)}
        return cls(**{k: v for k, v in d.items() if k in known and v is not None})

    @classmethod
    def from_pretrained(cls, path: str | os.PathLike) -> Gemma3ImageProcessor:
        with open(os.path.join(path, "preprocessor_config.json")) as f:
            return cls.from_dict(json.load(f))

    def to_dict(self) -> dict:
        """Everything that changes the pixels (part of the embedding cache key)."""
        d = dataclasses.asdict(self)
        d["image_mean"], d["image_std"] = list(self.image_mean), list(self.image_std)
        return d

    def pan_and_scan(self, image: np.ndarray) -> list[np.ndarray]:
        """Crops (HWC) of an image of extreme aspect ratio, in transformers' grid and order; [] if none."""
        height, width = image.shape[:2]
        long_, short = (width, height) if width >= height else (height, width)
        if long_ / short < self.pan_and_scan_min_ratio_to_activate:
            return []
        n = min(int(math.floor(long_ / short + 0.5)), int(math.floor(long_ / self.pan_and_scan_min_crop_size)))
        n = min(self.pan_and_scan_max_num_crops, max(2, n))
        n_w, n_h = (n, 1) if width >= height else (1, n)
        crop_w, crop_h = int(math.ceil(width / n_w)), int(math.ceil(height / n_h))
        if min(crop_w, crop_h) < self.pan_and_scan_min_crop_size:
            return []
        return [image[y:y + crop_h, x:x + crop_w]
                for y, x in itertools.product(range(0, crop_h * n_h, crop_h), range(0, crop_w * n_w, crop_w))]

    def _pixels(self, image: np.ndarray) -> np.ndarray:
        if self.do_resize:
            size = (self.size["width"], self.size["height"])
            image = np.asarray(Image.fromarray(image).resize(size, resample=self.resample))
        x = image.astype(np.float64) * self.rescale_factor if self.do_rescale else image
        x = x.astype(np.float32)
        if self.do_normalize:
            x = (x - np.asarray(self.image_mean, np.float32)) / np.asarray(self.image_std, np.float32)
        return np.moveaxis(x, -1, 0)

    def __call__(self, images, do_pan_and_scan: bool | None = None, max_pixels: int = DEFAULT_MAX_PIXELS) -> dict:
        """images: PIL images, HWC uint8 arrays or encoded bytes. Each image is followed by its crops."""
        pan = self.do_pan_and_scan if do_pan_and_scan is None else do_pan_and_scan
        pixels, num_crops = [], []
        for image in images:
            if isinstance(image, (bytes, bytearray)):
                image = decode_image(bytes(image), max_pixels)
            if isinstance(image, np.ndarray):
                image = Image.fromarray(image)
            array = np.asarray(to_rgb(image) if self.do_convert_rgb else image)
            crops = self.pan_and_scan(array) if pan else []
            pixels.extend(self._pixels(a) for a in [array, *crops])
            num_crops.append(len(crops))
        return {"pixel_values": np.stack(pixels), "num_crops": num_crops}
