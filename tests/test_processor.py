"""Gemma3Processor against transformers' Gemma3Processor on the same tokenizer.json, text and images."""

import numpy as np
import pytest
from PIL import Image
from tokenizers import Tokenizer
from transformers import Gemma3Processor as HFGemma3Processor
from transformers import PreTrainedTokenizerFast
from transformers.models.gemma3.image_processing_pil_gemma3 import Gemma3ImageProcessorPil

from gemma3.processing import Gemma3ImageProcessor, Gemma3Processor, apply_chat_template
from tests import gemma_tokenizer
from tests.test_prompts import render

IMAGE = dict(size={"height": 28, "width": 28}, pan_and_scan_min_crop_size=8)


@pytest.fixture(scope="module")
def processors(tmp_path_factory):
    path = str(tmp_path_factory.mktemp("tok"))
    gemma_tokenizer.write(path)
    hf_tok = PreTrainedTokenizerFast(
        tokenizer_file=f"{path}/tokenizer.json", bos_token="<bos>", eos_token="<eos>", pad_token="<pad>",
        unk_token="<unk>", padding_side="left",
        extra_special_tokens={"boi_token": "<start_of_image>", "eoi_token": "<end_of_image>",
                              "image_token": "<image_soft_token>"})
    hf = HFGemma3Processor(image_processor=Gemma3ImageProcessorPil(**IMAGE), tokenizer=hf_tok, image_seq_length=4)
    ours = Gemma3Processor(Tokenizer.from_file(f"{path}/tokenizer.json"), Gemma3ImageProcessor.from_dict(IMAGE),
                           image_seq_length=4, padding_side="left")
    return hf, ours


def img(seed, size=(20, 12)):
    return Image.fromarray(np.random.default_rng(seed).integers(0, 256, (size[1], size[0], 3), dtype=np.uint8))


MESSAGES = [
    [{"role": "system", "content": [{"type": "text", "text": "Be brief."}]},
     {"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "What is in this image?"}]}],
    [{"role": "user", "content": [{"type": "text", "text": "Compare"}, {"type": "image"}, {"type": "image"}]}],
    [{"role": "user", "content": "Just text, please."}],
]


@pytest.mark.parametrize("messages", MESSAGES)
def test_chat_template_equals_the_published_one(messages):
    assert apply_chat_template(messages) == render(messages)


@pytest.mark.parametrize("case", ["text-only", "one-image", "two-images", "batch-mixed", "pan-and-scan"])
@pytest.mark.parametrize("padding_side", ["left", "right"])
def test_inputs_equal_transformers(processors, case, padding_side):
    hf, ours = processors
    texts = {"text-only": [apply_chat_template(MESSAGES[2])],
             "one-image": [apply_chat_template(MESSAGES[0])],
             "two-images": [apply_chat_template(MESSAGES[1])],
             "batch-mixed": [apply_chat_template(MESSAGES[0]), apply_chat_template(MESSAGES[2])],
             "pan-and-scan": [apply_chat_template(MESSAGES[0])]}[case]
    images = {"text-only": None, "one-image": [[img(1)]], "two-images": [[img(2), img(3, (9, 30))]],
              "batch-mixed": [[img(4)], []], "pan-and-scan": [[img(5, (60, 12))]]}[case]
    pan = case == "pan-and-scan"
    # the processor's own defaults (min crop 256) override the image processor's: pass ours explicitly
    ref = hf(text=texts, images=images, return_tensors="np", padding=True, padding_side=padding_side,
             do_pan_and_scan=pan, pan_and_scan_min_crop_size=IMAGE["pan_and_scan_min_crop_size"])
    got = ours(texts, images, padding_side=padding_side, do_pan_and_scan=pan)
    for key in ("input_ids", "attention_mask", "token_type_ids"):
        np.testing.assert_array_equal(got[key], ref[key], err_msg=key)
    if images and any(images):
        np.testing.assert_allclose(got["pixel_values"], ref["pixel_values"], atol=1e-5)
    if pan:
        assert got["pixel_values"].shape[0] > 1


def test_placeholder_count_must_match(processors):
    _, ours = processors
    with pytest.raises(ValueError, match="1 image placeholders but 2 images"):
        ours([apply_chat_template(MESSAGES[0])], [[img(1), img(2)]])
