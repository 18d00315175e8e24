"""Gemma 3 input processing equal to transformers' ``Gemma3ImageProcessorPil`` and ``Gemma3Processor``,
in Pillow, NumPy and the ``tokenizers`` library.

Images, as transformers does them: RGB conversion (transparency composited onto white), optional
pan-and-scan crops of the RGB array, a PIL resize of each image straight to ``size`` (aspect ratio
not kept), ``* rescale_factor`` in float64 then float32, ``(x - mean) / std``, channels first. We add
what a server needs: EXIF orientation (transformers applies it only to images it loads from paths
or URLs), a pixel limit checked before decoding, an allow-list of formats and clear errors.

Text: the Gemma 3 chat template, each ``<start_of_image>`` expanded into the image's soft tokens
(with transformers' pan-and-scan wording), tokenization with the checkpoint's tokenizer.json and
padding, on the left by default as Gemma's tokenizer does.
"""

from __future__ import annotations

import dataclasses
import io
import itertools
import json
import math
import os
from typing import Any

import numpy as np
from PIL import Image, ImageOps
from tokenizers import Tokenizer

DEFAULT_MAX_PIXELS = 64_000_000
# What a client may send. Others are refused before decoding: EPS would run Ghostscript, and
# rarer decoders are more attack surface than they are worth.
IMAGE_FORMATS = ("PNG", "JPEG", "MPO", "WEBP", "GIF", "BMP", "TIFF", "AVIF")
BOI, EOI, IMAGE_TOKEN = "<start_of_image>", "<end_of_image>", "<image_soft_token>"
CROPS_INTRO = "Here is the original image {} and here are some crops to help you see better "


def _check_size(width: int, height: int, max_pixels: int) -> None:
    if width == 0 or height == 0:
        raise ValueError(f"the image has no pixels ({width}x{height})")
    if width * height > max_pixels:
        raise ValueError(f"the image is {width}x{height}, over the limit of {max_pixels} pixels")


def decode_image(data: bytes, max_pixels: int = DEFAULT_MAX_PIXELS) -> Image.Image:
    """Encoded bytes → an upright PIL image; ValueError for anything that is not a usable image.

    Pillow reads only the header on open, so the size is checked before any pixel is decoded.
    Pillow's own limit (``Image.MAX_IMAGE_PIXELS``, error at twice it) still applies on top."""
    if not data:
        raise ValueError("the image is empty (0 bytes)")
    Image.init()  # registers the plugins, so that the allow-list names only formats this Pillow has
    try:
        image = Image.open(io.BytesIO(data), formats=[f for f in IMAGE_FORMATS if f in Image.OPEN])
    except Image.DecompressionBombError as e:
        raise ValueError(f"the image is over the limit of {max_pixels} pixels ({e})") from e
    except Exception as e:  # Pillow raises many kinds (OSError, SyntaxError, struct.error...) on bad data
        raise ValueError(f"cannot decode the image: {e}") from e
    _check_size(*image.size, max_pixels)
    try:
        image.load()
        return ImageOps.exif_transpose(image)
    except Exception as e:
        raise ValueError(f"cannot decode the image: {e}") from e


def load_image(image: Image.Image | np.ndarray | bytes, max_pixels: int = DEFAULT_MAX_PIXELS) -> Image.Image:
    """Encoded bytes, a PIL image or a uint8 array (H, W) or (H, W, 1|3|4) → an upright PIL image."""
    if isinstance(image, (bytes, bytearray, memoryview)):
        return decode_image(bytes(image), max_pixels)
    if isinstance(image, np.ndarray):
        if image.dtype != np.uint8 or image.ndim not in (2, 3) or (image.ndim == 3 and image.shape[2] not in (1, 3, 4)):
            raise ValueError(f"an image array must be uint8 (H, W) or (H, W, 1|3|4), got {image.dtype} {image.shape}")
        _check_size(image.shape[1], image.shape[0], max_pixels)
        return Image.fromarray(image[..., 0] if image.ndim == 3 and image.shape[2] == 1 else image)
    if isinstance(image, Image.Image):
        _check_size(*image.size, max_pixels)
        return ImageOps.exif_transpose(image)
    raise TypeError(f"an image must be bytes, a PIL image or a NumPy array, got {type(image).__name__}")


def to_rgb(image: Image.Image) -> Image.Image:
    """RGB, with any transparency composited onto white (transformers' ``convert_to_rgb``). Every other
    mode goes through Pillow's ``convert``, as there: 16- and 32-bit grey (I;16, I, F) is clipped to
    0..255, not scaled, so a 16-bit PNG comes out mostly white, exactly as in transformers."""
    if "A" in image.getbands() or image.info.get("transparency") is not None:
        rgba = image.convert("RGBA")
        background = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(background, rgba).convert("RGB")
    return image.convert("RGB")


def _read_json(path: str | os.PathLike, name: str) -> dict:
    """A checkpoint's JSON file, or {} when the checkpoint has none."""
    file = os.path.join(path, name)
    if not os.path.exists(file):
        return {}
    with open(file) as f:
        return json.load(f)


@dataclasses.dataclass
class Gemma3ImageProcessor:
    """Reads ``preprocessor_config.json``; ``__call__`` returns pixel_values (N, 3, H, W) and num_crops.

    Settings that are null in the config take ``Gemma3Processor``'s defaults (pan-and-scan off, 256,
    4, 1.2), which are what transformers uses for the official checkpoints."""

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
        """From preprocessor_config.json, or from processor_config.json's "image_processor", where
        transformers 5's ``save_pretrained`` puts it."""
        config = _read_json(path, "preprocessor_config.json") or _read_json(path, "processor_config.json").get(
            "image_processor")
        if not config:
            raise FileNotFoundError(f"{path} has no image processor config (preprocessor_config.json)")
        return cls.from_dict(config)

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
        """HWC uint8 → CHW float32, transformers' operations in its order. The channels move first, so
        that each channel's arithmetic runs over a contiguous plane (3x faster than over interleaved
        pixels at 896 px, with the same values)."""
        if self.do_resize and image.shape[:2] != (self.size["height"], self.size["width"]):
            size = (self.size["width"], self.size["height"])
            image = np.asarray(Image.fromarray(image).resize(size, resample=self.resample))
        x = np.ascontiguousarray(np.moveaxis(image, -1, 0))
        x = x.astype(np.float64) * self.rescale_factor if self.do_rescale else x
        x = x.astype(np.float32)
        if self.do_normalize:
            per_channel = (-1, 1, 1)
            x = (x - np.reshape(np.asarray(self.image_mean, np.float32), per_channel)) / np.reshape(
                np.asarray(self.image_std, np.float32), per_channel)
        return x

    def __call__(self, images, do_pan_and_scan: bool | None = None, max_pixels: int = DEFAULT_MAX_PIXELS) -> dict:
        """images: one or a list of PIL images, uint8 arrays (HWC) or encoded bytes. In pixel_values each
        image is followed by its pan-and-scan crops; num_crops counts them per image (0 without)."""
        if isinstance(images, (Image.Image, np.ndarray, bytes, bytearray, memoryview)):
            images = [images]
        pan = self.do_pan_and_scan if do_pan_and_scan is None else do_pan_and_scan
        pixels, num_crops = [], []
        for image in images:
            image = load_image(image, max_pixels)
            array = np.asarray(to_rgb(image) if self.do_convert_rgb else image)
            crops = self.pan_and_scan(array) if pan else []
            pixels.extend(self._pixels(a) for a in [array, *crops])
            num_crops.append(len(crops))
        return {"pixel_values": np.stack(pixels), "num_crops": num_crops}


def _token_text(token: str | dict) -> str:
    """A special token from tokenizer_config.json, written as a string or as a serialized AddedToken."""
    return token["content"] if isinstance(token, dict) else token


def _content_text(content) -> str:
    """A message's content as the template writes it: text stripped, image parts as <start_of_image>."""
    if content is None:  # transformers renders a missing content as empty
        return ""
    if isinstance(content, str):
        return content.strip()
    text = []
    for part in content:  # other parts (video, audio) are dropped, as the template does
        if part.get("type") == "image":
            text.append(BOI)
        elif part.get("type") == "text":
            text.append(part["text"].strip())
    return "".join(text)


def apply_chat_template(messages: list[dict], add_generation_prompt: bool = True, bos: str = "<bos>") -> str:
    """Gemma 3's chat template (the one in google/gemma-3-*-it's tokenizer_config.json) in Python.

    Messages as transformers takes them: {"role": "system"|"user"|"assistant", "content": str or
    [{"type": "text", "text": ...}, {"type": "image"}]}. A system message's text (its first part,
    unstripped) prefixes the first turn; roles must alternate user/assistant; assistant turns are the
    "model"'s; text is stripped; each image part becomes ``<start_of_image>``."""
    if not messages:
        raise ValueError("a conversation needs at least one message")
    prefix = ""
    if messages[0]["role"] == "system":
        system = messages[0]["content"]
        if not isinstance(system, str):
            if not system or "text" not in system[0]:  # the template fails there too
                raise ValueError("a system message's content must be text, or start with a text part")
            system = system[0]["text"]
        prefix, messages = system + "\n\n", messages[1:]
    turns = [bos]
    for i, message in enumerate(messages):
        if (message["role"] == "user") != (i % 2 == 0):
            raise ValueError("Conversation roles must alternate user/assistant/user/assistant/...")
        role = "model" if message["role"] == "assistant" else message["role"]
        body = (prefix if i == 0 else "") + _content_text(message.get("content"))
        turns.append(f"<start_of_turn>{role}\n{body}<end_of_turn>\n")
    if add_generation_prompt:
        turns.append("<start_of_turn>model\n")
    return "".join(turns)


class Gemma3Processor:
    """Chat messages or prompts with ``<start_of_image>`` placeholders, and their images → model inputs,
    token for token what transformers' ``Gemma3Processor`` gives for the same checkpoint files: every
    placeholder becomes ``"\\n\\n<start_of_image>" + <image_soft_token> x image_seq_length +
    "<end_of_image>\\n\\n"`` (with pan-and-scan, the original image and its crops, introduced by a sentence).

    One difference: pan-and-scan settings in the image processor config are honoured, where
    transformers' processor overrides them with its own defaults (the official configs leave them
    null, so both agree there); pass ``do_pan_and_scan`` per call to switch it."""

    def __init__(self, tokenizer: Tokenizer, image_processor: Gemma3ImageProcessor | None = None,
                 image_seq_length: int = 256, padding_side: str = "left", *, bos_token: str = "<bos>",
                 pad_token: str = "<pad>", boi_token: str = BOI, eoi_token: str = EOI, image_token: str = IMAGE_TOKEN):
        self.tokenizer, self.image_processor = tokenizer, image_processor
        self.image_seq_length, self.padding_side = image_seq_length, padding_side
        self.bos_token, self.boi_token = bos_token, boi_token
        self.pad_token_id = tokenizer.token_to_id(pad_token) or 0  # masked out, so any id would do
        self.image_token_id = tokenizer.token_to_id(image_token)
        self.full_image = f"\n\n{boi_token}{image_token * image_seq_length}{eoi_token}\n\n"

    @classmethod
    def from_pretrained(cls, path: str | os.PathLike) -> Gemma3Processor:
        """tokenizer.json as it is (its post-processor adds <bos>: transformers 5 ignores
        tokenizer_config.json's add_bos_token / add_eos_token when there is a tokenizer.json),
        tokenizer_config.json's special tokens and padding side, and for images the image processor
        config and image_seq_length: processor_config.json's, else config.json's mm_tokens_per_image
        (transformers would take 256), else 256."""
        tokenizer = Tokenizer.from_file(os.path.join(path, "tokenizer.json"))
        config = _read_json(path, "tokenizer_config.json")
        tokens = {key: _token_text(config.get(key, default)) for key, default in [
            ("bos_token", "<bos>"), ("pad_token", "<pad>"), ("boi_token", BOI), ("eoi_token", EOI),
            ("image_token", IMAGE_TOKEN)]}
        try:
            image_processor = Gemma3ImageProcessor.from_pretrained(path)
        except FileNotFoundError:  # a text-only checkpoint
            image_processor = None
        image_seq_length = (_read_json(path, "processor_config.json").get("image_seq_length")
                            or _read_json(path, "config.json").get("mm_tokens_per_image") or 256)
        return cls(tokenizer, image_processor, image_seq_length, config.get("padding_side", "left"), **tokens)

    def apply_chat_template(self, messages: list[dict], add_generation_prompt: bool = True) -> str:
        return apply_chat_template(messages, add_generation_prompt, self.bos_token)

    def expand_images(self, text: str, num_crops: list[int]) -> str:
        """Each ``<start_of_image>`` in turn becomes the image sequence for its image's crop count."""
        pieces = text.split(self.boi_token)
        if len(pieces) - 1 != len(num_crops):
            raise ValueError(f"the prompt has {len(pieces) - 1} image placeholders but {len(num_crops)} images")
        return pieces[0] + "".join(self._image_sequence(n) + piece for n, piece in zip(num_crops, pieces[1:]))

    def _image_sequence(self, num_crops: int) -> str:
        if not num_crops:
            return self.full_image
        return CROPS_INTRO.format(self.full_image) + " ".join([self.full_image] * num_crops)

    def __call__(self, text: str | list[str], images=None, *, do_pan_and_scan: bool | None = None,
                 padding_side: str | None = None, add_special_tokens: bool = True) -> dict:
        """Prompts and their images (a list per prompt; a single prompt may take a flat list) → NumPy
        input_ids, attention_mask and token_type_ids (1 at image soft tokens), padded to the longest
        prompt, and pixel_values when there are images.

        Like transformers, the tokenizer's special tokens (<bos>) are added: a chat-templated prompt,
        which starts with <bos> already, wants ``add_special_tokens=False``."""
        texts = [text] if isinstance(text, str) else list(text)
        if not texts:
            raise ValueError("no prompts")
        if images is None or (isinstance(images, (list, tuple)) and not images):
            images = [[] for _ in texts]
        elif not isinstance(images, (list, tuple)):
            images = [[images]]
        elif not all(isinstance(prompt_images, (list, tuple)) for prompt_images in images):
            images = [images]
        if len(images) != len(texts):
            raise ValueError(f"{len(texts)} prompts but {len(images)} lists of images")
        flat = [image for prompt_images in images for image in prompt_images]
        pixels, crops = {}, iter([])
        if flat:
            if self.image_processor is None:
                raise ValueError("this checkpoint takes no images (it has no image processor config)")
            processed = self.image_processor(flat, do_pan_and_scan=do_pan_and_scan)
            pixels["pixel_values"], crops = processed["pixel_values"], iter(processed["num_crops"])
        texts = [self.expand_images(t, list(itertools.islice(crops, len(i)))) for t, i in zip(texts, images)]

        side = padding_side or self.padding_side
        if side not in ("left", "right"):
            raise ValueError(f"padding_side must be 'left' or 'right', got {side!r}")
        ids = [self.tokenizer.encode(t, add_special_tokens=add_special_tokens).ids for t in texts]
        length = max(map(len, ids))
        input_ids = np.full((len(ids), length), self.pad_token_id, np.int64)
        attention_mask = np.zeros_like(input_ids)
        for row, seq in enumerate(ids):
            columns = slice(length - len(seq), length) if side == "left" else slice(0, len(seq))
            input_ids[row, columns], attention_mask[row, columns] = seq, 1
        token_type_ids = ((input_ids == self.image_token_id) & (attention_mask == 1)).astype(np.int64)
        return {"input_ids": input_ids, "attention_mask": attention_mask, "token_type_ids": token_type_ids, **pixels}
