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


BOI, EOI, IMAGE_TOKEN = "<start_of_image>", "<end_of_image>", "<image_soft_token>"
CROPS_INTRO = "Here is the original image {} and here are some crops to help you see better "


def apply_chat_template(messages: list[dict], add_generation_prompt: bool = True, bos: str = "<bos>") -> str:
    """Gemma 3's chat template (the checkpoints' tokenizer_config.json), in Python: messages as
    transformers takes them ({"role", "content": str or [{"type": "text"|"image", ...}]}). A system
    message is prefixed to the first user turn; roles must alternate user/assistant; text is stripped;
    each image part becomes ``<start_of_image>``."""
    prefix = ""
    if messages and messages[0]["role"] == "system":
        content = messages[0]["content"]
        prefix = (content if isinstance(content, str) else content[0].get("text", "")) + "\n\n"
        messages = messages[1:]
    out = [bos]
    for i, message in enumerate(messages):
        if (message["role"] == "user") != (i % 2 == 0):
            raise ValueError("Conversation roles must alternate user/assistant/user/assistant/...")
        role = "model" if message["role"] == "assistant" else message["role"]
        content = message["content"]
        if isinstance(content, str):
            body = content.strip()
        else:
            body = "".join(BOI if c["type"] == "image" else c["text"].strip() if c["type"] == "text" else ""
                           for c in content)
        out.append(f"<start_of_turn>{role}\n{prefix if i == 0 else ''}{body}<end_of_turn>\n")
    if add_generation_prompt:
        out.append("<start_of_turn>model\n")
    return "".join(out)


class Gemma3Processor:
    """Text and images to model inputs, as transformers' ``Gemma3Processor``: every ``<start_of_image>``
    becomes ``"\\n\\n<start_of_image>" + <image_soft_token> x image_seq_length + "<end_of_image>\\n\\n"``
    (with pan-and-scan, the original image and its crops, introduced by a sentence)."""

    def __init__(self, tokenizer, image_processor: Gemma3ImageProcessor | None = None, image_seq_length: int = 256,
                 padding_side: str = "left"):
        self.tokenizer, self.image_processor = tokenizer, image_processor or Gemma3ImageProcessor()
        self.image_seq_length, self.padding_side = image_seq_length, padding_side
        self.full_image = f"\n\n{BOI}{IMAGE_TOKEN * image_seq_length}{EOI}\n\n"
        self.image_token_id = tokenizer.token_to_id(IMAGE_TOKEN)
        self.pad_id = tokenizer.token_to_id("<pad>") or 0

    @classmethod
    def from_pretrained(cls, path: str | os.PathLike) -> Gemma3Processor:
        from tokenizers import Tokenizer

        def read(name):
            if not os.path.exists(os.path.join(path, name)):
                return {}
            with open(os.path.join(path, name)) as f:
                return json.load(f)

        seq = read("processor_config.json").get("image_seq_length") or read("config.json").get("mm_tokens_per_image")
        image = Gemma3ImageProcessor.from_pretrained(path) if os.path.exists(
            os.path.join(path, "preprocessor_config.json")) else None
        return cls(Tokenizer.from_file(os.path.join(path, "tokenizer.json")), image, seq or 256,
                   read("tokenizer_config.json").get("padding_side", "left"))

    def apply_chat_template(self, messages: list[dict], add_generation_prompt: bool = True) -> str:
        return apply_chat_template(messages, add_generation_prompt)

    def expand_images(self, text: str, num_crops: list[int]) -> str:
        """Each ``<start_of_image>`` in order becomes the full image sequence for its crops."""
        pieces = text.split(BOI)
        if len(pieces) - 1 != len(num_crops):
            raise ValueError(f"the prompt has {len(pieces) - 1} image placeholders but {len(num_crops)} images")
        full = lambda n: self.full_image if not n else (  # noqa: E731
            CROPS_INTRO.format(self.full_image) + " ".join([self.full_image] * n))
        return pieces[0] + "".join(full(n) + rest for n, rest in zip(num_crops, pieces[1:]))

    def __call__(self, text, images=None, padding_side: str | None = None, do_pan_and_scan: bool | None = None):
        """text: a prompt or a list; images: one list of images per prompt. Returns NumPy input_ids,
        attention_mask, token_type_ids (1 at image soft tokens) and pixel_values (when there are images)."""
        texts = [text] if isinstance(text, str) else list(text)
        per_prompt = images if images is not None else [[] for _ in texts]
        if len(per_prompt) != len(texts):
            raise ValueError(f"{len(texts)} prompts but {len(per_prompt)} lists of images")
        pixels, rows = [], []
        for prompt, imgs in zip(texts, per_prompt):
            crops = []
            if imgs:
                batch = self.image_processor(imgs, do_pan_and_scan=do_pan_and_scan)
                pixels.append(batch["pixel_values"])
                crops = batch["num_crops"]
            rows.append(self.tokenizer.encode(self.expand_images(prompt, crops)).ids)
        width = max(len(r) for r in rows)
        ids = np.full((len(rows), width), self.pad_id, np.int64)
        mask = np.zeros((len(rows), width), np.int64)
        for i, r in enumerate(rows):
            at = slice(width - len(r), width) if (padding_side or self.padding_side) == "left" else slice(0, len(r))
            ids[i, at], mask[i, at] = r, 1
        out = {"input_ids": ids, "attention_mask": mask,
               "token_type_ids": ((ids == self.image_token_id) & (mask == 1)).astype(np.int64)}
        if pixels:
            out["pixel_values"] = np.concatenate(pixels)
        return out
