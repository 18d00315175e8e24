"""Our Gemma3Processor against transformers' on the same checkpoint files: the chat template, image
soft tokens (pan-and-scan included), tokenization and padding; and the image inputs that
test_image_processor.py leaves out (arrays, EXIF on PIL images, limits through the processor)."""

import io
import json
import struct
import zlib

import numpy as np
import pytest
from PIL import Image
from tokenizers import Tokenizer, decoders, models, normalizers, processors, trainers
from transformers import Gemma3Processor as TransformersGemma3Processor
from transformers.models.gemma3.image_processing_pil_gemma3 import Gemma3ImageProcessorPil

from demo.tokenizer import GEMMA3_CHAT_TEMPLATE  # google/gemma-3-4b-it's, verbatim
from gemma3.processing import Gemma3ImageProcessor, Gemma3Processor

SPECIAL_TOKENS = ["<pad>", "<eos>", "<bos>", "<unk>", "<mask>", "<start_of_turn>", "<end_of_turn>",
                  "<start_of_image>", "<end_of_image>", "<image_soft_token>"]  # Gemma's first five in Gemma's order
CORPUS = ["What is in this image?\nA red circle on a blue background.", "Compare the two pictures and describe them.",
          "You are a helpful assistant. Be brief.\n\nAnswer in one word.",
          "Here is the original image and here are some crops to help you see better"]
IMAGE_SEQ_LENGTH = 4


def write_tiny_gemma3_processor(path, image_size=28, image_seq_length=IMAGE_SEQ_LENGTH, **tokenizer_config):
    """A Gemma 3 processor's files, laid out as in the official checkpoints, with a tiny BPE vocabulary.

    The tokenizer has Gemma's pipeline (spaces as "▁", byte fallback, <bos> added) because transformers'
    GemmaTokenizer keeps only tokenizer.json's vocabulary, merges, added tokens and post-processor and
    rebuilds the rest as Gemma's: only then do both read tokenizer.json the same way, as they do for the
    real checkpoints. ``tokenizer_config`` overrides tokenizer_config.json entries (None drops one)."""
    tokenizer = Tokenizer(models.BPE(unk_token="<unk>", byte_fallback=True, fuse_unk=True))
    tokenizer.normalizer = normalizers.Replace(" ", "▁")
    tokenizer.decoder = decoders.Sequence([decoders.Replace("▁", " "), decoders.ByteFallback(), decoders.Fuse()])
    tokenizer.train_from_iterator(CORPUS, trainers.BpeTrainer(vocab_size=300, special_tokens=SPECIAL_TOKENS,
                                                              show_progress=False))
    tokenizer.post_processor = processors.TemplateProcessing(single="<bos> $A", special_tokens=[("<bos>", 2)])
    tokenizer.save(str(path / "tokenizer.json"))
    config = {"tokenizer_class": "GemmaTokenizer", "processor_class": "Gemma3Processor", "bos_token": "<bos>",
              "eos_token": "<eos>", "pad_token": "<pad>", "unk_token": "<unk>", "mask_token": "<mask>",
              "boi_token": "<start_of_image>", "eoi_token": "<end_of_image>", "image_token": "<image_soft_token>",
              "add_bos_token": True, "add_eos_token": False, "chat_template": GEMMA3_CHAT_TEMPLATE}
    config.update(tokenizer_config)
    files = {
        "tokenizer_config.json": {k: v for k, v in config.items() if v is not None},
        "chat_template.json": {"chat_template": GEMMA3_CHAT_TEMPLATE},
        "processor_config.json": {"processor_class": "Gemma3Processor", "image_seq_length": image_seq_length},
        "preprocessor_config.json": {  # google/gemma-3-4b-it's, but for the size
            "image_processor_type": "Gemma3ImageProcessor", "processor_class": "Gemma3Processor",
            "size": {"height": image_size, "width": image_size}, "resample": 2, "do_resize": True,
            "do_rescale": True, "rescale_factor": 1 / 255, "do_normalize": True, "image_mean": [0.5] * 3,
            "image_std": [0.5] * 3, "image_seq_length": image_seq_length, "do_convert_rgb": None,
            "do_pan_and_scan": None, "pan_and_scan_min_crop_size": None, "pan_and_scan_max_num_crops": None,
            "pan_and_scan_min_ratio_to_activate": None},
    }
    for name, content in files.items():
        (path / name).write_text(json.dumps(content))
    return path


def load_both(path):
    """Ours and transformers' (with the PIL image processor, the one ours follows) on the same files."""
    return Gemma3Processor.from_pretrained(path), TransformersGemma3Processor.from_pretrained(path, backend="pil")


@pytest.fixture(scope="module")
def both(tmp_path_factory):
    return load_both(write_tiny_gemma3_processor(tmp_path_factory.mktemp("gemma3-processor")))


def random_image(width, height, seed=0, mode="RGB"):
    rng = np.random.default_rng(seed)
    return Image.fromarray(rng.integers(0, 256, (height, width, 4), dtype=np.uint8), "RGBA").convert(mode)


SQUARE, WIDE, TALL = random_image(40, 40, 1), random_image(800, 260, 2), random_image(300, 700, 3, "RGBA")


def assert_same_inputs(ours, theirs, text, images=None, **kwargs):
    got = ours(text, images, **kwargs)
    want = theirs(text=text, images=images, padding=True, return_tensors="np", **kwargs)
    assert sorted(got) == sorted(want)
    for key in ("input_ids", "attention_mask", "token_type_ids"):
        np.testing.assert_array_equal(got[key], want[key], err_msg=key)
    if "pixel_values" in want:
        assert got["pixel_values"].dtype == np.float32
        np.testing.assert_allclose(got["pixel_values"], want["pixel_values"], atol=1e-5)
    return got


@pytest.mark.parametrize("text, images, kwargs", [
    ("What is in this image?", None, {}),
    (["Be brief.", "Compare the two pictures and describe them.\n"], None, {}),
    (["Be brief.", "Compare the two pictures and describe them.\n"], None, {"padding_side": "right"}),
    ("What is in this image?", None, {"add_special_tokens": False}),
    ("<start_of_image>What is in this image?", [[SQUARE]], {}),
    ("Compare <start_of_image> and<start_of_image>.", [[SQUARE, TALL]], {}),
    (["<start_of_image> red", "Two: <start_of_image><start_of_image>", "none"], [[TALL], [SQUARE, WIDE], []], {}),
    (["<start_of_image> red", "Two: <start_of_image><start_of_image>"], [[TALL], [SQUARE, WIDE]],
     {"padding_side": "right"}),
], ids=["text", "text-batch", "text-batch-right-padding", "no-special-tokens", "one-image", "two-images",
        "batch-of-image-counts", "batch-right-padding"])
def test_inputs_equal_transformers(both, text, images, kwargs):
    got = assert_same_inputs(*both, text, images, **kwargs)
    n_images = sum(map(len, images or []))
    assert got["token_type_ids"].sum() == n_images * IMAGE_SEQ_LENGTH


def test_pan_and_scan_equals_transformers(both):
    got = assert_same_inputs(*both, ["Wide <start_of_image>, square <start_of_image>", "tall <start_of_image>"],
                             [[WIDE, SQUARE], [TALL]], do_pan_and_scan=True)
    assert got["pixel_values"].shape[0] == 3 + 3 + 2  # the originals, 3 crops of WIDE and 2 of TALL
    assert got["token_type_ids"].sum() == (3 + 3 + 2) * IMAGE_SEQ_LENGTH



def test_pan_and_scan_settings_in_the_config_are_honoured(tmp_path):
    """transformers' processor overrides them with its own defaults (this pins that difference)."""
    path = write_tiny_gemma3_processor(tmp_path)
    config = json.loads((path / "preprocessor_config.json").read_text())
    config.update(do_pan_and_scan=True, pan_and_scan_min_crop_size=8, pan_and_scan_max_num_crops=2)
    (path / "preprocessor_config.json").write_text(json.dumps(config))
    ours, theirs = load_both(path)
    assert ours("<start_of_image>", [[WIDE]])["pixel_values"].shape[0] == 1 + 2
    assert theirs(text="<start_of_image>", images=[[WIDE]], return_tensors="np")["pixel_values"].shape[0] == 1

CONVERSATIONS = [
    [{"role": "user", "content": "  Hello there \n"}],
    [{"role": "system", "content": " Be brief. "},
     {"role": "user", "content": [{"type": "image", "image": SQUARE}, {"type": "text", "text": " What is this? "}]}],
    [{"role": "system", "content": [{"type": "text", "text": "Be brief."}, {"type": "text", "text": "(unused)"}]},
     {"role": "user", "content": [{"type": "text", "text": "Compare"}, {"type": "image", "image": WIDE},
                                  {"type": "text", "text": " and "}, {"type": "image", "image": TALL}]},
     {"role": "assistant", "content": "The first is wide."},
     {"role": "user", "content": [{"type": "text", "text": "And this one?"}, {"type": "image", "image": SQUARE}]}],
    [{"role": "user", "content": [{"type": "video"}, {"type": "text", "text": "hi"}]},
     {"role": "tool", "content": None}],
]


@pytest.mark.parametrize("messages", CONVERSATIONS)
@pytest.mark.parametrize("add_generation_prompt", [True, False])
def test_chat_template_equals_the_official_one(both, messages, add_generation_prompt):
    ours, theirs = both
    assert ours.apply_chat_template(messages, add_generation_prompt) == theirs.apply_chat_template(
        messages, tokenize=False, add_generation_prompt=add_generation_prompt)


@pytest.mark.parametrize("messages", CONVERSATIONS[1:3])
def test_chat_with_images_equals_transformers(both, messages):
    ours, theirs = both
    images = [[part["image"] for m in messages if isinstance(m["content"], list) for part in m["content"]
               if part["type"] == "image"]]
    text = ours.apply_chat_template(messages)
    # processor(text) adds a second <bos> to the template's, in transformers as in ours ...
    assert_same_inputs(ours, theirs, text, images)
    # ... which apply_chat_template(tokenize=True) avoids with add_special_tokens=False
    got = ours(text, images, add_special_tokens=False)
    want = theirs.apply_chat_template(messages, add_generation_prompt=True, tokenize=True, return_dict=True,
                                      return_tensors="np")
    for key in ("input_ids", "attention_mask", "token_type_ids"):
        np.testing.assert_array_equal(got[key], want[key], err_msg=key)
    np.testing.assert_allclose(got["pixel_values"], want["pixel_values"], atol=1e-5)


def test_roles_must_alternate_as_in_the_template(both):
    messages = [{"role": "user", "content": "a"}, {"role": "user", "content": "b"}]
    for apply in (both[0].apply_chat_template, lambda m: both[1].apply_chat_template(m, tokenize=False)):
        with pytest.raises(Exception, match="must alternate"):
            apply(messages)
    with pytest.raises(ValueError, match="start with a text part"):
        both[0].apply_chat_template([{"role": "system", "content": [{"type": "image"}]},
                                     {"role": "user", "content": "a"}])


@pytest.mark.parametrize("tokenizer_config", [{"add_bos_token": False}, {"add_eos_token": True},
                                              {"add_bos_token": None, "add_eos_token": None},
                                              {"padding_side": "right"}])
def test_tokenizer_config_is_read_as_transformers_reads_it(tmp_path, tokenizer_config):
    """tokenizer.json's post-processor decides what is added: transformers 5 drops add_bos_token and
    add_eos_token from tokenizer_config.json when there is a tokenizer.json."""
    ours, theirs = load_both(write_tiny_gemma3_processor(tmp_path, **tokenizer_config))
    assert_same_inputs(ours, theirs, ["What is in this image?", "Be brief."])


def test_loads_what_transformers_saves(both, tmp_path):
    """transformers 5 saves the image processor's settings inside processor_config.json."""
    both[1].save_pretrained(tmp_path)
    assert not (tmp_path / "preprocessor_config.json").exists()
    assert_same_inputs(Gemma3Processor.from_pretrained(tmp_path), both[1], "<start_of_image>", [[WIDE]])


def png(image, **save_kwargs):
    buf = io.BytesIO()
    image.save(buf, "PNG", **save_kwargs)
    return buf.getvalue()


def test_images_as_bytes_and_arrays(both):
    ours, theirs = both
    text = ["<start_of_image> and <start_of_image>"]
    want = ours(text, [[SQUARE, TALL]])
    for images in ([png(SQUARE), png(TALL)], [np.asarray(SQUARE), np.asarray(TALL)]):
        got = ours(text, images)
        for key in want:
            np.testing.assert_array_equal(got[key], want[key], err_msg=key)


def test_placeholders_must_match_images(both):
    ours, _ = both
    with pytest.raises(ValueError, match="the prompt has 0 image placeholders but 1 images"):
        ours(["<start_of_image>", "no image"], [[SQUARE], [SQUARE]])
    with pytest.raises(ValueError, match="the prompt has 1 image placeholders but 0 images"):
        ours("<start_of_image>")
    with pytest.raises(ValueError, match="2 prompts but 1 lists of images"):
        ours(["<start_of_image>", "<start_of_image>"], [SQUARE, SQUARE])  # a flat list is one prompt's


def test_text_only_checkpoint_takes_no_images(both, tmp_path):
    write_tiny_gemma3_processor(tmp_path)
    (tmp_path / "preprocessor_config.json").unlink()
    ours = Gemma3Processor.from_pretrained(tmp_path)
    np.testing.assert_array_equal(ours("Be brief.")["input_ids"], both[0]("Be brief.")["input_ids"])
    with pytest.raises(ValueError, match="takes no images"):
        ours("<start_of_image>", [[SQUARE]])


# Image inputs beyond test_image_processor.py: arrays, EXIF on PIL images, limits through __call__.

PROCESSOR = Gemma3ImageProcessor.from_dict({"size": {"height": 28, "width": 28}})


@pytest.mark.parametrize("shape", [(17, 40, 3), (40, 17, 4), (30, 30, 1)])
def test_arrays_equal_transformers(shape):
    array = np.random.default_rng(sum(shape)).integers(0, 256, shape, dtype=np.uint8)
    want = Gemma3ImageProcessorPil(size={"height": 28, "width": 28})(array, return_tensors="np")["pixel_values"]
    np.testing.assert_allclose(PROCESSOR(array)["pixel_values"], want, atol=1e-5)


def test_grey_arrays_are_l_images():
    """transformers cannot tell the channels of an (H, W) array; we read it as a grey image."""
    grey = random_image(30, 20, mode="L")
    np.testing.assert_array_equal(PROCESSOR(np.asarray(grey))["pixel_values"], PROCESSOR(grey)["pixel_values"])


@pytest.mark.parametrize("array", [np.zeros((20, 30, 3), np.float32), np.zeros((3, 20, 30), np.uint8),
                                   np.zeros((20, 30, 2), np.uint8), np.zeros((2, 20, 30, 3), np.uint8),
                                   np.zeros((0, 30, 3), np.uint8)])
def test_bad_arrays_raise_clear_errors(array):
    with pytest.raises(ValueError, match="uint8 \\(H, W\\)|no pixels"):
        PROCESSOR(array)


def test_exif_orientation_applies_to_pil_images_too():
    """transformers applies EXIF orientation only to images it loads from a path or URL."""
    stored = random_image(30, 10, 4)
    exif = Image.Exif()
    exif[0x0112] = 6  # the camera was turned: rotate 90 degrees clockwise to display
    data = png(stored, exif=exif)
    upright = PROCESSOR(stored.transpose(Image.Transpose.ROTATE_270))["pixel_values"]
    np.testing.assert_array_equal(PROCESSOR(Image.open(io.BytesIO(data)))["pixel_values"], upright)
    np.testing.assert_array_equal(PROCESSOR(data)["pixel_values"], upright)
    assert not np.array_equal(PROCESSOR(stored)["pixel_values"], upright)


def png_header(width, height):
    """A PNG declaring width x height pixels with no real pixel data: nothing big is allocated."""
    def chunk(kind, data):
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))
    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"\x00")) + chunk(b"IEND", b"")


def eps(image):
    buf = io.BytesIO()
    image.save(buf, "EPS")
    return buf.getvalue()


@pytest.mark.parametrize("data, message", [
    (png_header(5000, 5000), "5000x5000, over the limit of 1000000 pixels"),  # below Pillow's own limit
    (png_header(0, 10), "no pixels|cannot decode"),
    (png(random_image(64, 64))[:200], "cannot decode"),
    (np.random.default_rng(0).bytes(1000), "cannot decode"),
    (eps(random_image(8, 8)), "cannot decode"),  # decodable by Pillow (with Ghostscript), but not allowed
])
def test_bad_bytes_raise_clear_errors_through_the_processor(data, message):
    with pytest.raises(ValueError, match=message):
        PROCESSOR([data], max_pixels=1_000_000)
