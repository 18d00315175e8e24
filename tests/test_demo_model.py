"""The shipped demo model (demo/model): it loads in transformers and answers exactly as our library does,
it answers held-out questions correctly, it stays small, and its data generator and tokenizer behave.

Our answers all go through ``demo.evaluate.answer_ids`` (one batch size, one prompt length), so the
whole file compiles one prefill and one decode step."""

import json
import os

import numpy as np
import pytest
from PIL import Image
from tokenizers import Tokenizer

from demo import EXAMPLE_IMAGE, MODEL_DIR, shapes
from demo import evaluate as ev
from demo.tokenizer import SPECIAL_TOKENS, build_tokenizer, user_turn


@pytest.fixture(scope="module")
def ours():
    from gemma3 import Gemma3ForConditionalGeneration
    from gemma3.processing import Gemma3Processor

    return Gemma3ForConditionalGeneration.from_pretrained(MODEL_DIR), Gemma3Processor.from_pretrained(MODEL_DIR)


TWO = shapes.render_scene("triangle", "purple", "top right", also=[("circle", "yellow", "bottom left")])
CASES = [  # (image, question, expected answer)
    (Image.open(EXAMPLE_IMAGE), shapes.EXAMPLE_QUESTION, shapes.EXAMPLE_ANSWER),
    (TWO, "What is in this image?", "a purple triangle in the top right and a yellow circle in the bottom left"),
    (TWO, "What colour is the circle?", "yellow"),
    (TWO, "Where is the triangle?", "top right"),
    (TWO, "How many shapes are there?", "two"),
    (shapes.render_scene("triangle", "green", "center", background=(225, 235, 250)), "What is in this image?",
     "a green triangle in the center"),
    (shapes.render_scene("square", "orange", "bottom left"), "What shape is in the bottom left?", "square"),
    (shapes.render(shapes.scene_for(3, "test")), "Describe the image.", shapes.describe(shapes.scene_for(3, "test"))),
]


def test_transformers_loads_the_checkpoint_and_answers_token_for_token_as_we_do(ours):
    import torch
    import transformers

    model, processor = ours
    hf = transformers.Gemma3ForConditionalGeneration.from_pretrained(MODEL_DIR, dtype=torch.float32).eval()
    theirs = transformers.AutoProcessor.from_pretrained(MODEL_DIR)
    images, questions, expected = zip(*CASES)
    texts = [theirs.apply_chat_template(user_turn(q), tokenize=False, add_generation_prompt=True) for q in questions]
    inputs = theirs(text=texts, images=[[image] for image in images], add_special_tokens=False, padding=True,
                    return_tensors="pt")
    mine = ev.prompt_inputs(processor, images, questions)
    width = inputs["input_ids"].shape[1]
    for key in ("input_ids", "attention_mask", "token_type_ids"):
        np.testing.assert_array_equal(mine[key][:, -width:], inputs[key].numpy(), err_msg=key)
    np.testing.assert_allclose(mine["pixel_values"], inputs["pixel_values"].numpy(), atol=1e-6)

    with torch.no_grad():
        generated = hf.generate(**inputs, max_new_tokens=ev.MAX_NEW_TOKENS, do_sample=False)[:, width:].tolist()
    stops = set(model.config.text_config.eos_token_ids)
    want = []
    for row in generated:
        end = next((i for i, t in enumerate(row) if t in stops), len(row) - 1)
        want.append(row[:end + 1])
    got = ev.answer_ids(model, processor, images, questions)
    assert got == want
    assert [processor.tokenizer.decode(ids, skip_special_tokens=True) for ids in got] == list(expected)


def test_held_out_accuracy(ours):
    result = ev.evaluate(*ours, n=100, seed=777)
    print(result.report())
    assert result.accuracy >= 0.95, result.failures


def test_the_bundled_example_is_the_example_scene():
    """(Its answer is checked with the other cases above.)"""
    assert np.array_equal(np.asarray(Image.open(EXAMPLE_IMAGE)), np.asarray(shapes.render(shapes.EXAMPLE)))
    assert os.path.getsize(EXAMPLE_IMAGE) < 50_000


def test_checkpoint_is_complete_and_small():
    files = set(os.listdir(MODEL_DIR))
    assert {"config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json", "preprocessor_config.json",
            "processor_config.json", "generation_config.json"} <= files
    assert sum(os.path.getsize(os.path.join(MODEL_DIR, f)) for f in files) <= 20 * 2**20
    with open(os.path.join(MODEL_DIR, "tokenizer_config.json")) as f:
        assert "<start_of_turn>" in json.load(f)["chat_template"]


def test_scenes_are_deterministic_and_answers_match_them():
    a, b = shapes.scene_for(42, "eval", 1), shapes.scene_for(42, "eval", 1)
    assert a == b and np.array_equal(np.asarray(shapes.render(a)), np.asarray(shapes.render(b)))
    assert shapes.scene_for(42, "train", 1) != a
    scene = shapes.make_scene(("square", "blue", "bottom right"), ("circle", "orange", "top left"))
    assert shapes.questions(scene) == [
        ("What is in this image?", "an orange circle in the top left and a blue square in the bottom right"),
        ("How many shapes are there?", "two"),
        ("What colour is the circle?", "orange"), ("Where is the circle?", "top left"),
        ("What shape is in the top left?", "circle"),
        ("What colour is the square?", "blue"), ("Where is the square?", "bottom right"),
        ("What shape is in the bottom right?", "square")]
    for i in range(200):
        scene = shapes.scene_for(i, "test")
        present = {o.shape for o in scene.objects}
        asked = {s for q, _ in shapes.questions(scene) for s in shapes.SHAPES if s in q}
        assert asked == present and len(present) == len(scene.objects)
        image = np.asarray(shapes.render(scene)).astype(int)
        for o in scene.objects:  # the shape's colour is at its centre
            left, top, right, bottom = (v * shapes.IMAGE_SIZE for v in o.box())
            centre = image[int((top + bottom) / 2) + (2 if o.shape == "triangle" else 0), int((left + right) / 2)]
            assert np.abs(centre - np.asarray(o.rgb)).max() <= 16, (scene, o)


def test_tokenizer_round_trips_any_text_and_names_the_configs_ids():
    tok = Tokenizer.from_file(os.path.join(MODEL_DIR, "tokenizer.json"))
    assert tok.to_str() == build_tokenizer().to_str()  # the shipped file is what demo.tokenizer builds
    rng = np.random.default_rng(0)
    texts = ["What colour is the circle?", "  leading and trailing  ", "Crème brûlée, 日本語 🙂\ttab\r\nnew line",
             "<start_of_turn>user\n<bos>", ""]
    for _ in range(50):  # random code points, surrogates excluded ("▁" stands for a space, as in Gemma)
        points = rng.integers(1, 0x10FFFF, rng.integers(1, 30))
        texts.append("".join(chr(p) for p in points if not 0xD800 <= p < 0xE000 and p != 0x2581))
    for text in texts:
        ids = tok.encode(text, add_special_tokens=False).ids
        assert tok.get_vocab_size() > max(ids, default=0) and tok.token_to_id("<unk>") not in ids
        assert tok.decode(ids, skip_special_tokens=False) == text
    assert tok.encode("hi").ids[0] == tok.token_to_id("<bos>")

    with open(os.path.join(MODEL_DIR, "config.json")) as f:
        config = json.load(f)
    text = config["text_config"]
    ids = {t: tok.token_to_id(t) for t in SPECIAL_TOKENS}
    assert (config["boi_token_index"], config["eoi_token_index"], config["image_token_index"]) == (
        ids["<start_of_image>"], ids["<end_of_image>"], ids["<image_soft_token>"])
    assert (text["pad_token_id"], text["bos_token_id"]) == (ids["<pad>"], ids["<bos>"])
    assert sorted(text["eos_token_id"]) == sorted([ids["<eos>"], ids["<end_of_turn>"]])
    assert text["vocab_size"] == tok.get_vocab_size()



def test_training_is_deterministic_and_writes_a_loadable_checkpoint(tmp_path):
    """Two short runs with the same seed give the same weights, saved in a layout our loader reads back."""
    import jax
    from flax import nnx

    from demo import train
    from gemma3 import Gemma3ForConditionalGeneration

    def weights(model):
        return [np.asarray(x) for x in jax.tree.leaves(nnx.state(model, nnx.Param))]

    a = train.train(str(tmp_path / "a"), steps=2, warmup=1, log_every=1)
    b = train.train(str(tmp_path / "b"), steps=2, warmup=1, log_every=1)
    loaded = Gemma3ForConditionalGeneration.from_pretrained(str(tmp_path / "a"), split_head=False)  # as trained
    for x, y, z in zip(weights(a), weights(b), weights(loaded), strict=True):
        np.testing.assert_array_equal(x, y)
        np.testing.assert_array_equal(x, z)
    untrained = train.Gemma3ForConditionalGeneration(a.config, rngs=nnx.Rngs(0))
    assert any(not np.array_equal(x, u) for x, u in zip(weights(a), weights(untrained)))  # the steps did something
